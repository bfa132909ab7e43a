"""The plain single-process PyTorch loop that distlm is checked and measured against (the tests'
reference losses, the throughput benchmark's peer): the model, optimizer, schedule and clipping
that distlm's Engine uses, without Ray or DeepSpeed."""

from __future__ import annotations

import torch

from distlm.config import Config


class PlainLoop:
    def __init__(self, cfg: Config, vocab_size: int, eos_token_id: int) -> None:
        from distlm.engine import lr_lambda, param_groups
        from distlm.models import build_model

        tr = cfg.trainer
        self.grad_clip = tr.grad_clip
        self.model = build_model(cfg.model, vocab_size, cfg.data.seq_len, eos_token_id, tr.seed, cfg.init_from)
        self.model.train()
        # The optimizer distlm's Engine builds without offloading (foreach=False there too).
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, tr.weight_decay), lr=tr.lr, betas=(tr.beta1, tr.beta2), foreach=False
        )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(tr))

    def micro_step(self, ids: torch.Tensor, accumulation: int = 1) -> torch.Tensor:
        """Forward and backward of one micro batch; the loss, detached (no host synchronisation)."""
        loss = self.model(input_ids=ids, labels=ids).loss
        (loss / accumulation).backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
