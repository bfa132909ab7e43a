"""The training loop run by every Ray Train worker. Read it top to bottom:
build -> restore -> (step, backward, optimizer step, log, eval, checkpoint)* -> probe -> done.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict

import ray.train
import torch
import torch.distributed as dist

from distlm.checkpoint import TrainState, read_train_state, write_train_state
from distlm.config import Config
from distlm.data import PreparedData, ResumableSampler, TokenBlocks
from distlm.engine import Engine, resolve_runtime
from distlm.models import build_model, flops_per_token
from distlm.tracking import make_tracker, measure_matmul_peak


def train_worker(config: Dict[str, Any]) -> None:
    cfg: Config = config["cfg"]
    data: PreparedData = config["data"]
    tr, seq_len = cfg.trainer, cfg.data.seq_len
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _quiet_libraries()
    torch.set_num_threads(tr.threads or cfg.cluster.cpus_per_worker)
    runtime = resolve_runtime(cfg.cluster)

    model = build_model(cfg.model, data.vocab_size, seq_len, data.eos_token_id, tr.seed, cfg.init_from)
    model_flops_per_token = flops_per_token(model, seq_len)
    engine = Engine(model, cfg.zero, tr, runtime, world)
    train_set = TokenBlocks(data.train_path, data.dtype, seq_len)
    val_set = TokenBlocks(data.val_path, data.dtype, seq_len)
    sampler = ResumableSampler(len(train_set), tr.global_batch_size, tr.micro_batch_size, rank, world, tr.seed)

    # Ray Train hands back the newest complete checkpoint after a worker restart or a
    # resumed run; everything needed to continue exactly is in it.
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            engine.load(directory)
            state = read_train_state(directory, rank, world)
        sampler.load_state_dict(state.sampler)

    tracker = make_tracker(cfg.tracking, rank, cfg.run_dir, state.tracker_run_id, _flat_config(cfg), config.get("sink"))
    state.tracker_run_id = tracker.run_id
    peak_flops = measure_matmul_peak(engine.device, runtime.dtype)
    tokens_per_step = tr.global_batch_size * seq_len

    if state.step == 0:  # the starting point of the validation curve
        val_loss = evaluate(engine, val_set, tr.micro_batch_size, tr.eval_batches, rank, world)
        tracker.log({"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50.0))}, 0)
    engine.train()
    while state.step < tr.max_steps:
        start = time.perf_counter()
        lr = engine.lr()
        loss_sum = torch.zeros((), device=engine.device)
        for micro_batch in sampler.next_batch():
            input_ids = torch.stack([train_set[i] for i in micro_batch]).to(engine.device)
            loss = engine(input_ids=input_ids, labels=input_ids).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
        state.step += 1
        state.tokens_seen += tokens_per_step
        train_loss = _mean_over_ranks(loss_sum / engine.accum_steps, world)
        elapsed = time.perf_counter() - start
        metrics = {
            "train/loss": train_loss,
            "train/lr": lr,
            "train/grad_norm": engine.grad_norm(),
            "train/tokens_per_s": tokens_per_step / elapsed,
            "train/mfu": tokens_per_step / world * model_flops_per_token / elapsed / peak_flops,
            "train/tokens_seen": state.tokens_seen,
            "train/step_time_s": elapsed,
        }
        last = state.step == tr.max_steps
        if state.step % tr.eval_every == 0 or last:
            val_loss = evaluate(engine, val_set, tr.micro_batch_size, tr.eval_batches, rank, world)
            metrics |= {"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50.0))}
            engine.train()
        if state.step % tr.log_every == 0 or "val/loss" in metrics:
            tracker.log(metrics, state.step)
        if state.step % tr.checkpoint_every == 0 or last:
            probe = _probe(engine, val_set) if last else None
            state.sampler = sampler.state_dict()
            save_checkpoint(engine, model, state, rank, world, metrics, probe)
    tracker.finish()


def evaluate(engine: Engine, val_set: TokenBlocks, micro: int, batches: int, rank: int, world: int) -> float:
    """Mean loss over the first `batches * micro * world` validation blocks, split across ranks.

    Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively).
    """
    engine.eval()
    total = min(len(val_set), batches * micro * world) // world * world
    indices = list(range(rank, total, world))
    loss_sum = torch.zeros((), device=engine.device, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(indices), micro):
            ids = torch.stack([val_set[j] for j in indices[i : i + micro]]).to(engine.device)
            loss_sum += engine(input_ids=ids, labels=ids).loss.double() * len(ids)
    stats = torch.stack([loss_sum, torch.tensor(float(len(indices)), device=engine.device, dtype=torch.float64)])
    if world > 1:
        dist.all_reduce(stats)
    return float(stats[0] / stats[1])


def save_checkpoint(
    engine: Engine, model, state: TrainState, rank: int, world: int, metrics: Dict[str, float], probe=None
) -> None:
    """Each rank writes its shards to a local temp dir; Ray Train merges them into the run's
    storage and registers the checkpoint only once every rank has reported."""
    directory = tempfile.mkdtemp(prefix=f"distlm-step{state.step}-rank{rank}-")
    try:
        engine.save(directory)
        write_train_state(directory, state, rank, world, engine.zero_stage)
        if rank == 0:
            model.config.save_pretrained(directory)  # lets `distlm export` rebuild the model offline
            if probe is not None:
                torch.save(probe, Path(directory) / "probe.pt")
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"step_{state.step:08d}",
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _probe(engine: Engine, val_set: TokenBlocks) -> Dict[str, torch.Tensor]:
    """Logits of the trained model on a fixed batch: the export is checked against them."""
    engine.eval()
    ids = torch.stack([val_set[i] for i in range(min(2, len(val_set)))])
    with torch.no_grad():
        logits = engine(input_ids=ids.to(engine.device)).logits.float().cpu()
    return {"input_ids": ids, "logits": logits}


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
    return float(value) / world


def _flat_config(cfg: Config) -> Dict[str, Any]:
    return {section: value for section, value in asdict(cfg).items()}


def _quiet_libraries() -> None:
    for name in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
