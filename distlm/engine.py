"""The only module that imports DeepSpeed: ds_config, sharded model construction (ZeRO-3),
initialize, backward/step, save/load, export.

The training loop talks to an `Engine`; it never sees DeepSpeed. Device, backend and
precision come from distlm.runtime.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from distlm.config import TrainerConfig, ZeroConfig
from distlm.runtime import Runtime

# DeepSpeed picks its accelerator at import time; without a GPU it must be told "cpu"
# before the import, or it probes for CUDA and fails on CPU-only workers.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402

CHECKPOINT_TAG = "state"
UNIVERSAL = "universal"  # <checkpoint>/universal: the checkpoint in DeepSpeed's universal form


def build_ds_config(zero: ZeroConfig, trainer: TrainerConfig, runtime: Runtime, world_size: int) -> Dict[str, Any]:
    micro = trainer.micro_batch_size
    accum = trainer.global_batch_size // (micro * world_size)
    zero_opt: Dict[str, Any] = {"stage": zero.stage}
    if zero.stage > 0:
        zero_opt.update(
            overlap_comm=zero.overlap_comm,
            contiguous_gradients=True,
            reduce_bucket_size=zero.reduce_bucket_size,
        )
    if zero.stage == 3:
        # Keep small parameters resident; gather the rest layer by layer.
        zero_opt.update(
            stage3_param_persistence_threshold=10_000,
            stage3_gather_16bit_weights_on_model_save=False,
            sub_group_size=zero.sub_group_size,
            stage3_max_live_parameters=zero.live_parameters,
            stage3_max_reuse_distance=zero.live_parameters,
            stage3_prefetch_bucket_size=zero.live_parameters,
        )
    if zero.offload_optimizer:
        zero_opt["offload_optimizer"] = {"device": "cpu", "pin_memory": runtime.device == "cuda"}
    if zero.offload_params:
        zero_opt["offload_param"] = {"device": "cpu", "pin_memory": runtime.device == "cuda"}
    zero_opt.update(zero.extra)
    cfg: Dict[str, Any] = {
        "train_batch_size": trainer.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        # ZeRO-0 in fp32: the Engine clips (see clips_itself); DeepSpeed's ZeRO and mixed-precision optimizers do.
        "gradient_clipping": 0.0 if clips_itself(zero, runtime) else trainer.grad_clip,
        "zero_optimization": zero_opt,
        # Our optimizer is plain torch AdamW (DeepSpeed's fused one needs CUDA).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if runtime.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif runtime.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return cfg


def clips_itself(zero: ZeroConfig, runtime: Runtime) -> bool:
    """ZeRO-0 in fp32, where DeepSpeed calls our optimizer directly: DeepSpeed would clip with a
    loop over the parameters and an all-reduce of the norm, and the Engine then compute the norm
    again to log it. The Engine clips instead, with torch's clip (the plain loop's), and logs the
    norm that clip returns: one norm a step."""
    return zero.stage == 0 and runtime.precision == "fp32"


def lr_lambda(trainer: TrainerConfig):
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps."""

    def f(step: int) -> float:
        if step < trainer.warmup_steps:
            return (step + 1) / trainer.warmup_steps
        span = max(1, trainer.max_steps - trainer.warmup_steps)
        progress = min(1.0, (step - trainer.warmup_steps) / span)
        return trainer.min_lr_ratio + (1 - trainer.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Weight decay on matrices (embeddings included), none on 1-d parameters (biases, norms)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # A ZeRO-3 partitioned parameter is an empty 1-d tensor: its real shape is ds_shape.
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # DeepSpeed drops empty groups, which would leave the LR scheduler one group out.
    return [g for g in groups if g["params"]]


class TaskAwareAdamW(torch.optim.AdamW):
    """AdamW whose groups may belong to tasks (a "tasks" list): a group trains only on steps of
    those tasks and is left untouched otherwise (weights, moments, step count, weight decay), so
    a per-task adapter or head changes only on its own task's steps. The loop says whose step
    it is (`step_task`), so no gradient has to be read (no host synchronisation) to find the
    idle groups. DeepSpeed keeps one flat partition per group, so whole groups are skipped."""

    step_task: Optional[str] = None  # None: every group trains
    # Set by the engine (ZeRO-0 only, where DeepSpeed calls this optimizer directly) when the
    # averaged gradients are not finite: the step is skipped, and DeepSpeed, seeing `overflow`,
    # skips the scheduler step and counts it in skipped_steps, as its ZeRO optimizers do.
    skip_next = False
    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        self.overflow, self.skip_next = self.skip_next, False
        if self.overflow:
            return None
        hidden = []
        for group in self.param_groups:
            owners = group.get("tasks")
            if self.step_task is not None and owners is not None and self.step_task not in owners:
                hidden.append((group, [p.grad for p in group["params"]]))
                for p in group["params"]:
                    p.grad = None  # AdamW skips parameters without a gradient
        try:
            return super().step(closure)
        finally:
            for group, grads in hidden:
                for p, g in zip(group["params"], grads):
                    p.grad = g


class Engine:
    """Facade over a DeepSpeed engine: forward, backward, step, save, load.

    Made before the model: under ZeRO-3 it keeps transformers' DeepSpeed config alive, so
    transformers builds the model inside deepspeed.zero.Init and loads pretrained weights
    straight into each rank's partitions; no rank ever holds the whole model. `prepare`
    then wraps the model and its optimizer.
    """

    def __init__(self, zero: ZeroConfig, trainer: TrainerConfig, runtime: Runtime, world_size: int):
        self.runtime, self.zero_stage = runtime, zero.stage
        self.zero, self.trainer = zero, trainer
        self.ds_config = build_ds_config(zero, trainer, runtime, world_size)
        self.accum_steps = self.ds_config["gradient_accumulation_steps"]
        self.world_size = world_size
        # DeepSpeed's communication layer adopts the process group Ray Train set up; zero.Init
        # needs it before the model exists (deepspeed.initialize would do it only later).
        for line in clear_stale_build_locks():  # else the op build below waits for ever
            print(f"distlm: {line}", flush=True)
        deepspeed.init_distributed(dist_backend=runtime.backend)
        self._hf_ds_config = None
        if zero.stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # transformers keeps only a weak reference: it must live as long as the model does.
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        self.ds = None
        self._stage0_norm: Any = float("nan")

    def gather(self, params: Iterable[torch.nn.Parameter]) -> ContextManager:
        """Make partitioned (ZeRO-3) parameters whole for a block; changes made on rank 0 are kept."""
        params = [p for p in params if hasattr(p, "ds_id")]
        if not params:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    def prepare(self, model: torch.nn.Module, groups: Optional[List[Dict[str, Any]]] = None) -> None:
        trainer, zero = self.trainer, self.zero
        groups = groups if groups is not None else param_groups(model, trainer.weight_decay)
        for g in groups:  # a group's own learning rate, as a multiple of trainer.lr (the schedule scales both)
            g["lr"] = trainer.lr * g.get("lr_scale", 1.0)
        betas = (trainer.beta1, trainer.beta2)
        if zero.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            # config.validate refuses multi-task runs here: CPU Adam has no per-task groups.
            optimizer = DeepSpeedCPUAdam(groups, lr=trainer.lr, betas=betas, adamw_mode=True)
        else:
            optimizer = TaskAwareAdamW(groups, lr=trainer.lr, betas=betas, foreach=False)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(trainer))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        # A step whose gradients are not finite is skipped (no update, no scheduler step; counted
        # in skipped_steps). DeepSpeed's ZeRO optimizers check only in fp16/bf16 by default; the
        # check is one all-reduced flag, so every rank skips the same steps.
        if hasattr(self.ds.optimizer, "check_grad_overflow"):
            self.ds.optimizer.check_grad_overflow = True
        if zero.stage == 3 and not zero.offload_optimizer:
            _share_master_weights(self.ds.optimizer)
        if zero.stage == 0 and self.world_size == 1:
            # One rank has nothing to average: DeepSpeed would still flatten every gradient into
            # buckets, all-reduce them with itself and copy them back, each step.
            self.ds.enable_backward_allreduce = False

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def __call__(self, **batch):
        return self.ds(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def set_step_task(self, task: Optional[str]) -> None:
        """Whose step this is: optimizer groups of other tasks stay untouched (None = all train)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # DeepSpeed's ZeRO optimizer wraps ours
        if isinstance(inner, TaskAwareAdamW):
            inner.step_task = task

    def step(self) -> None:
        # DeepSpeed counts micro steps and applies the optimizer at the accumulation boundary.
        if self.zero_stage == 0 and self.ds.is_gradient_accumulation_boundary():
            # Without a ZeRO optimizer DeepSpeed does not report the norm; the gradients
            # are already averaged across ranks here, so every rank computes the same one.
            # Kept on the device: read only when logged.
            params = [p for p in self.ds.module.parameters() if p.grad is not None]
            if not params:
                self._stage0_norm = torch.zeros(())
            elif clips_itself(self.zero, self.runtime) and self.trainer.grad_clip > 0:
                self._stage0_norm = torch.nn.utils.clip_grad_norm_(params, self.trainer.grad_clip)
            else:
                self._stage0_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if isinstance(self.optimizer, TaskAwareAdamW) and not torch.isfinite(self._stage0_norm):
                self.optimizer.skip_next = True  # the same on every rank: the gradients are averaged
        self.ds.step()

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far for non-finite gradients (a host counter: no sync)."""
        return int(self.ds.skipped_steps)

    def advance_schedule(self, steps: int) -> None:
        """Move the learning-rate schedule on by `steps` optimizer steps (after a rollback)."""
        for _ in range(steps):
            self.scheduler.step()

    def grad_norm(self) -> float:
        norm = self.ds.get_global_grad_norm() if self.zero_stage > 0 else self._stage0_norm
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def save(self, directory: str) -> None:
        """Every rank writes its own shard files; the directory may be rank-local."""
        self.ds.save_checkpoint(directory, tag=CHECKPOINT_TAG)

    def load(self, directory: str, universal: bool = False) -> None:
        """Weights, optimizer and schedule from a checkpoint this run's number of workers wrote, or
        (universal=True) from its universal form (`to_universal`) when another number wrote it."""
        if universal:
            directory = str(Path(directory) / UNIVERSAL)
            if not (Path(directory) / CHECKPOINT_TAG).is_dir():
                raise RuntimeError(
                    f"{directory} is missing: the driver converts a checkpoint before a resume on another number of workers"
                )
        self.ds._config.load_universal_checkpoint = universal  # read by DeepSpeed only while loading
        try:
            path, _ = self.ds.load_checkpoint(
                directory, tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        finally:
            self.ds._config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}/{CHECKPOINT_TAG}")
        if universal and self.zero_stage == 3:
            self._restore_groups_stage3(Path(directory) / CHECKPOINT_TAG / "zero" / "optimizer_state.pt")

    def _restore_groups_stage3(self, path: Path) -> None:
        """DeepSpeed's ZeRO-3 universal load gives every optimizer group the first group's settings
        (weight decay, learning rate) and step; ZeRO-1/2's gives each its own. Done here as there."""
        saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        groups = self.optimizer.optimizer.param_groups  # the base optimizer, one group per ours
        for group, loaded in zip(groups, saved["param_groups"]):
            group.update({k: v for k, v in loaded.items() if k != "params"})
        flat = self.optimizer.fp32_partitioned_groups_flat  # one per group unless sub_group_size split it
        if len(flat) == len(saved["state"]):
            for i, param in enumerate(flat):
                self.optimizer.optimizer.state[param]["step"] = saved["state"][i]["step"]


def _share_master_weights(optimizer: Any) -> None:
    """Let ZeRO-3's fp32 master partition be the parameter partition itself when that is fp32 on
    the same device already. DeepSpeed means to (stage3.py, `_create_fp32_partitions`), but it
    compares a torch.device with a str, which is never equal, so it keeps a clone: 4 bytes per
    parameter per rank for nothing. Its step then copies the master partition onto itself."""
    lows, highs = optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat
    for low, high in zip(lows, highs):
        if (
            low is not None
            and low.dtype == high.dtype
            and low.device == high.device
            and low.numel() == high.numel()
            and low.data_ptr() != high.data_ptr()
        ):
            high.data = low.data


# A build of DeepSpeed's ops takes 1-3 minutes here; a lock older than this was left by a killed one.
STALE_BUILD_LOCK_S = 900


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> List[str]:
    """torch's extension builder waits, silently and for ever, on the lock file of a build that was
    killed (its FileBaton has no staleness check), and every later run with it. Remove such locks,
    older than any build takes, and say which."""
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())  # as torch resolves it
    said = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = time.time() - lock.stat().st_mtime
            if age > max_age_s:
                lock.unlink()
                said.append(f"removed {lock}, left {age / 60:.0f} min ago by a build that did not finish")
        except FileNotFoundError:  # another process took it first
            continue
    return said


def build_ops() -> List[str]:
    """Compile (or find already compiled) the C++ ops that DeepSpeed would otherwise build on a run's
    first start (minutes): CPU Adam (optimizer offload) and, without CUDA, the shared-memory
    all-reduce of its CPU backend. One line per op; a failure is reported, not raised (the
    first run then builds it, or says why)."""
    from deepspeed.accelerator import get_accelerator

    names = ["CPUAdamBuilder"] + ([] if torch.cuda.is_available() else ["ShareMemCommBuilder"])
    builders = [get_accelerator().get_op_builder(name) for name in names]
    said = []
    for builder in builders:
        name = builder.NAME
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                builder().load(verbose=False)
            said.append(f"{name}: ready")
        except Exception as e:  # noqa: BLE001 - a missing compiler is reported, not fatal
            said.append(f"{name}: not built ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return said


def to_universal(checkpoint_dir: str, workers: int = 1) -> str:
    """DeepSpeed's universal checkpoint of a ZeRO-1/2/3 checkpoint, in <checkpoint>/universal: every
    parameter's weights and optimizer moments whole, so any number of workers can load them. Made
    once, beside and then renamed: a conversion cut short is never taken for a complete one."""
    import argparse
    import shutil

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = Path(checkpoint_dir) / UNIVERSAL
    if (out / CHECKPOINT_TAG).is_dir():
        return str(out)
    partial = Path(checkpoint_dir) / f"{UNIVERSAL}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(Path(checkpoint_dir) / CHECKPOINT_TAG),
        output_folder=str(partial / CHECKPOINT_TAG),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # no tensor or pipeline parallelism: nothing for it to describe
    )
    said = io.StringIO()  # it prints its progress (and tqdm bars): kept for the error only
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            ds_to_universal(args)
    except Exception as e:
        raise RuntimeError(
            f"DeepSpeed's ds_to_universal failed on {checkpoint_dir}: {e}\n{said.getvalue()[-2000:]}"
        ) from e
    partial.rename(out)
    return str(out)


def iter_fp32_state_dict(checkpoint_dir: str, zero_stage: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """Consolidated fp32 weights from a DeepSpeed checkpoint, one tensor at a time.

    ZeRO 1-3 go through DeepSpeed's zero_to_fp32 in lazy mode: each tensor is assembled
    from the rank shards only when it is taken, so the export never holds the whole
    model plus every shard at once.
    """
    tag_dir = Path(checkpoint_dir) / CHECKPOINT_TAG
    if zero_stage == 0:
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        for name, tensor in states["module"].items():
            yield name, _fp32(tensor)
        return
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    said = io.StringIO()  # its progress (prints and tqdm bars)
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        lazy = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG, lazy_mode=True)
    for name in list(lazy):
        yield name, _fp32(lazy.pop(name).contiguous())


def _fp32(tensor: torch.Tensor) -> torch.Tensor:
    # Integer buffers (position ids, masks) keep their dtype.
    return tensor.float() if tensor.is_floating_point() else tensor
