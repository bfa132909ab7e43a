"""A deterministic, rank-sharded batch sampler whose position can be checkpointed and resumed."""

from __future__ import annotations

import torch

from distlm.config import ConfigError


class ResumableSampler:
    """Hands each rank its share of every global batch, as `accum_steps` micro batches.

    The global sample stream is a fresh permutation of all samples per epoch (seeded by
    seed + epoch). Global batch b is stream indices [b*G, (b+1)*G), whatever the world size,
    so a run can resume on a different number of workers and still see the same batches.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        if num_samples < 1:
            raise ConfigError("the dataset has no samples: add data or lower data.seq_len")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        per_step = micro_batch_size * world_size
        if micro_batch_size < 1 or global_batch_size % per_step != 0:
            raise ConfigError(
                f"trainer.global_batch_size={global_batch_size} must be a positive multiple of "
                f"trainer.micro_batch_size x workers = {micro_batch_size} x {world_size} = {per_step}"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.accum_steps = global_batch_size // per_step
        self.position = 0  # global batches consumed
        self._epoch = -1
        self._perm: list[int] = []

    def _sample(self, k: int) -> int:
        """The sample at global stream index k."""
        epoch, offset = divmod(k, self.num_samples)
        if epoch != self._epoch:  # a batch crosses at most one epoch boundary, so this rarely recomputes
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.num_samples, generator=generator).tolist()
            self._epoch = epoch
        return self._perm[offset]

    def next_batch(self) -> list[list[int]]:
        """This rank's micro batches of the next global batch; advances the position."""
        start = self.position * self.global_batch_size
        step = self.world_size * self.micro_batch_size
        batches = []
        for a in range(self.accum_steps):
            first = start + a * step + self.rank * self.micro_batch_size
            batches.append([self._sample(k) for k in range(first, first + self.micro_batch_size)])
        self.position += 1
        return batches

    def state_dict(self) -> dict[str, int]:
        return {
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for name, hint in [
            ("num_samples", "the data (corpus, tokenizer or data.seq_len) changed"),
            ("global_batch_size", "trainer.global_batch_size changed"),
            ("seed", "trainer.seed changed"),
        ]:
            if state[name] != getattr(self, name):
                raise ConfigError(
                    f"cannot resume the data order: the checkpoint has {name}={state[name]} but this run has "
                    f"{name}={getattr(self, name)} ({hint}): restore the original setting, "
                    "or start a fresh run (trainer.resume=never)"
                )
        self.position = int(state["position"])


__all__ = ["ResumableSampler"]
