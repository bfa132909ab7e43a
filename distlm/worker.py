"""The worker side of a training run: the loop every Ray Train worker runs (started by
distlm.driver). Read it top to bottom:
build -> restore -> (batch, forward, backward, optimizer step, log, eval, checkpoint)* -> done.

Pretraining and multi-task fine-tuning share it; they differ only in the batch source
(token blocks or task examples), the adapters and the evaluation.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import ray.train
import torch

from distlm import adapters
from distlm.checkpoint import (
    TrainState,
    read_manifest,
    read_train_state,
    verify,
    write_checksums,
    write_records,
    write_train_state,
)
from distlm.config import Config
from distlm.data.batches import PretrainBatches, TaskBatches, encode_example
from distlm.data.tasks import ROUTER, load_tasks
from distlm.engine import Engine
from distlm.evaluate import evaluate_tasks, validation_loss, write_report
from distlm.failures import BadSteps, Faults, Heartbeat, SpikeGuard, Where, handle_worker_error
from distlm.heads import TaskModel, head_adapter, language_model, router_layers, write_heads_config
from distlm.models import build_model, flops_per_token
from distlm.runtime import all_reduce_sum, apply_collective_timeout, resolve_runtime
from distlm.tracking import (
    StopSignal,
    keep_heap_small,
    make_tracker,
    measure_matmul_peak,
    memory_now,
    process_rss,
    release_free_memory,
    report_placement,
)


def train_worker(config: Dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: the loop, and what a failure in it means (see
    distlm.failures: a deterministic one ends the run everywhere, an infrastructure one restarts)."""
    entered = time.time()  # the start-up report's clock (wall time: the driver's is another process)
    where = Where()
    rank = ray.train.get_context().get_world_rank()
    if config.get("log_dir"):
        _output_to_file(Path(config["log_dir"]) / f"rank{rank}.log", rank)
    heartbeat = Heartbeat(config.get("sink"), rank, where)
    try:
        _train(config, where, entered)
    except Exception as e:  # noqa: BLE001 - classified, reported, and re-raised if worth a restart
        where.flush()
        handle_worker_error(e, config.get("sink"), rank, where)
    finally:
        heartbeat.stop()


def _train(config: Dict[str, Any], where: Where, entered: float) -> None:
    cfg: Config = config["cfg"]
    tr, seq_len = cfg.trainer, cfg.data.seq_len
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sink = config.get("sink")
    report_placement(sink, rank)
    if sink is not None and rank == 0:
        sink.count_start.remote()  # the driver counts the worker group's (re)starts
    rss_at_start = process_rss()  # the libraries, before any model: the baseline of memory.json
    keep_heap_small()
    _quiet_libraries()
    torch.set_num_threads(tr.threads or cfg.cluster.cpus_per_worker)
    runtime = resolve_runtime(cfg.cluster)
    apply_collective_timeout(cfg.cluster.collective_timeout_s)  # before DeepSpeed makes its groups

    # The batch source: task examples (fine-tuning) or token blocks (pretraining).
    tasks, tokenizer = {}, None
    if cfg.task.tasks:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config["tokenizer_dir"])
        tasks = load_tasks(cfg.task, tokenizer, tr.seed)
        batches = TaskBatches(tasks, tokenizer, cfg.task, tr, seq_len, rank, world)
        vocab_size, eos_id = len(tokenizer), tokenizer.eos_token_id
    else:
        data = config["data"]
        batches = PretrainBatches(data, seq_len, tr, rank, world)
        vocab_size, eos_id = data.vocab_size, data.eos_token_id

    # The engine comes first: under ZeRO-3 the model is built (or loaded) straight into partitions.
    engine = Engine(cfg.zero, tr, runtime, world)
    model = build_model(cfg.model, vocab_size, seq_len, eos_id, tr.seed, cfg.init_from, engine.gather)
    release_free_memory()  # what building took beyond the model
    model_flops_per_token = flops_per_token(model, seq_len)
    torch.manual_seed(tr.seed)  # adapters' and heads' initialisation: the same in every run and on every rank
    model = lm = adapters.apply_adapters(model, cfg.adapter, list(tasks))
    heads = {name: task.labels for name, task in tasks.items() if task.is_classification}
    if heads:  # classification tasks and the router: linear heads over the model's hidden states
        layers = {ROUTER: router_layers(lm, cfg.task.router_depth)} if ROUTER in heads else {}
        model = TaskModel(lm, heads, layers)
    engine.prepare(model, adapters.param_groups(model, cfg.adapter, list(tasks), tr.weight_decay))
    release_free_memory()
    built = time.time()

    def activate(task: Optional[str]) -> None:
        """Route the step through `task`'s layers; the optimizer leaves other tasks' layers alone."""
        adapters.activate(lm, cfg.adapter, task)
        engine.set_step_task(task)

    temperatures: Dict[str, float] = {}  # each head's calibration at the newest evaluation

    def evaluate() -> Dict[str, float]:
        try:
            return _evaluate()
        finally:
            release_free_memory()

    def _evaluate() -> Dict[str, float]:
        if tasks:
            reports: Dict[str, Dict] = {}
            metrics = evaluate_tasks(
                engine.module,
                tokenizer,
                tasks,
                cfg.task,
                engine.device,
                rank,
                world,
                engine.zero_stage == 3,
                activate,
                reports=reports,
            )
            if rank == 0 and reports:  # confusion matrices of the classifications (and the router)
                write_report(cfg.run_dir, state.step, reports)
            temperatures.update({name: report["temperature"] for name, report in reports.items()})
            return metrics
        engine.eval()
        loss = validation_loss(engine, batches.val, tr.micro_batch_size, tr.eval_batches, rank, world, engine.device)
        engine.train()
        return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}

    # Ray Train hands back the newest complete checkpoint after a worker restart or a
    # resumed run; everything needed to continue exactly is in it.
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):  # the newest intact one, when Ray's newest was damaged
        checkpoint = ray.train.Checkpoint(config["resume_from"])
    if checkpoint is not None:
        where.at("loading the checkpoint")
        with checkpoint.as_directory() as directory:
            # Written by another number of workers: its universal form, which the driver made.
            resharded = read_manifest(directory)["world_size"] != world and engine.zero_stage > 0
            engine.load(directory, universal=resharded)
            state = read_train_state(directory, rank)
        batches.load_state_dict(state.sampler)

    tracker = make_tracker(cfg.tracking, rank, cfg.run_dir, state.tracker_run_id, _flat_config(cfg), sink)
    state.tracker_run_id = tracker.run_id
    where.flush = tracker.flush
    peak_flops = measure_matmul_peak(engine.device, runtime.dtype)
    stop = StopSignal(sink, rank)

    if state.step == 0:  # the starting point of the curves (and the "before" of fine-tuning)
        where.at("evaluation", 0)
        tracker.log(evaluate(), 0)
    engine.train()
    early = tr.early_stopping
    window = _Window(engine.device)  # what happened since the last logged step
    bad_steps, spikes = BadSteps(tr.max_bad_steps), SpikeGuard(tr.loss_spike)
    faults = Faults(rank, cfg.run_dir)  # test-only fault injection; nothing unless its variable is set
    saved_step = state.step if checkpoint is not None else None  # the newest checkpoint (for rollback)
    memory_reported = False
    if sink is not None and rank == 0:  # where the start-up went (the driver reports it once)
        sink.put_startup.remote({"worker": entered, "built": built, "first_step": time.time()})
    while state.step < tr.max_steps:
        where.at("training", state.step + 1)
        faults.before_step(state.step + 1)
        lr = engine.lr()
        step = batches.next(state.step)
        activate(step.task)
        head = {"head": step.head} if step.head else {}  # a classification step: which head reads the model
        skipped_before = engine.skipped_steps
        step_loss, step_tokens = torch.zeros((), device=engine.device), 0
        for micro_batch in step.micro_batches:
            loss = engine(**{k: v.to(engine.device, non_blocking=True) for k, v in micro_batch.items()}, **head).loss
            loss = faults.loss(state.step + 1, loss)
            engine.backward(loss)
            engine.step()
            mask = micro_batch.get("attention_mask")  # on the host: counting tokens costs no sync
            step_loss += loss.detach().float()
            step_tokens += int(mask.sum()) if mask is not None else micro_batch["input_ids"].numel()
        state.step += 1
        # DeepSpeed skipped the update (non-finite gradients, found by its all-reduced check): the
        # step's loss stays out of the logged mean; too many in a row stop the run.
        skipped = engine.skipped_steps > skipped_before
        if bad_steps.update(state.step, skipped):
            raise bad_steps.error(state.step, float(step_loss) / len(step.micro_batches), lr, runtime.precision)
        if not skipped:
            window.add(step_loss, step_tokens)
            window.steps += 1
        window.tasks.add(step.task)
        last = state.step == tr.max_steps
        evaluating = state.step % tr.eval_every == 0 or last
        # With early stopping every evaluated step is a candidate for the export: it gets a checkpoint.
        saving = state.step % tr.checkpoint_every == 0 or last or (evaluating and early.metric is not None)
        if not (state.step % tr.log_every == 0 or evaluating or saving):
            continue  # no collective and no host synchronisation on steps that do not log
        # One collective and one host sync: the window's loss and tokens, and the stop vote.
        loss_sum, window_tokens, stop_votes = all_reduce_sum(
            [window.loss_sum / engine.accum_steps, window.tokens, stop.poll()], engine.device
        )
        train_loss = loss_sum / world / window.steps if window.steps else float("nan")
        state.tokens_seen += int(window_tokens)
        elapsed = time.perf_counter() - window.start
        metrics = {
            "train/loss": train_loss,
            "train/lr": lr,
            "train/grad_norm": engine.grad_norm(),
            "train/tokens_per_s": window_tokens / elapsed,
            "train/mfu": window_tokens / world * model_flops_per_token / elapsed / peak_flops,
            "train/tokens_seen": state.tokens_seen,
            "train/step_time_s": elapsed / max(1, window.steps),
            "train/skipped_steps": engine.skipped_steps,
        }
        # The loss-spike guard (the loss is all-reduced: every rank decides alike).
        spike = spikes.check(state.step, train_loss, step.task if window.tasks == {step.task} else None)
        if spike is not None:
            metrics["train/loss_spike"] = train_loss
            if spikes.diverged():
                raise spikes.error(state.step, spike, lr)
            if tr.loss_spike.action == "rollback":
                if saved_step is None:
                    spike += "; no checkpoint yet to roll back to"
                else:
                    where.at("rolling back")
                    _rollback(engine, cfg, saved_step, state.step)
                    spike += (
                        f"; rolled back to the step-{saved_step} checkpoint's weights and optimizer, "
                        f"the batches of steps {saved_step + 1}-{state.step} dropped"
                    )
            if sink is not None and rank == 0:
                sink.put_warning.remote(spike)  # the driver shows it
        if step.task is not None:
            if window.tasks == {step.task}:
                metrics[f"train/{step.task}/loss"] = train_loss
            metrics |= {f"mix/{name}": share for name, share in batches.shares().items()}
        if sink is not None and not memory_reported:
            # Model states as held between steps (after the optimizer's first step made its moments).
            memory_reported = True
            sink.put_memory.remote(rank, {"start_rss": rss_at_start, "states": memory_now(engine.device)["tensors"]})
        stopping_early = False
        if evaluating:
            where.at("evaluation")
            metrics |= evaluate()
            if early.metric is not None:
                stopping_early = track_best(state, early, metrics)
                metrics |= {"early_stopping/best_step": state.best_step, "early_stopping/best": state.best_value}
        tracker.log(metrics, state.step)
        if saving:
            where.at("saving a checkpoint")
            saved_step = state.step
            probe = _probe(engine, batches, tasks, tokenizer, cfg) if last or early.metric is not None else None
            state.sampler = batches.state_dict()
            reported = metrics | checkpoint_score(early, metrics, evaluating)
            save_checkpoint(
                engine, state, rank, world, reported, cfg, list(tasks), probe, temperatures, tracker.take_unsaved()
            )
        if stopping_early:
            break
        # Preemption (SIGTERM to the driver): every rank saves this step, unless just saved, and stops.
        if not last and stop_votes > 0:
            if not saving:
                state.sampler = batches.state_dict()
                save_checkpoint(
                    engine, state, rank, world, metrics, cfg, list(tasks), None, temperatures, tracker.take_unsaved()
                )
            break
        window = _Window(engine.device)
    if sink is not None:
        sink.put_memory.remote(rank, {"start_rss": rss_at_start, "peak": memory_now(engine.device)["peak"]})
    tracker.finish()


def save_checkpoint(
    engine: Engine,
    state: TrainState,
    rank: int,
    world: int,
    metrics: Dict[str, float],
    cfg: Config,
    task_names: List[str],
    probe=None,
    temperatures: Optional[Dict[str, float]] = None,
    records: Optional[List[Dict[str, Any]]] = None,
) -> None:
    """Each rank writes its shards to a local temp dir; Ray Train merges them into the run's
    storage and registers the checkpoint only once every rank has reported."""
    directory = tempfile.mkdtemp(prefix=f"distlm-step{state.step}-rank{rank}-")
    try:
        engine.save(directory)
        write_train_state(directory, state, rank, world, engine.zero_stage, cfg.trainer.global_batch_size)
        if rank == 0:
            # What `distlm export` needs to rebuild the model (and its adapters and heads) offline.
            lm = language_model(engine.module)
            _base_model(lm).config.save_pretrained(directory)
            if adapters.adapter_names(cfg.adapter, task_names):
                adapters.save_adapter_configs(lm, directory)
            if hasattr(engine.module, "heads"):
                write_heads_config(directory, engine.module, cfg.adapter, task_names, temperatures or {})
            if probe is not None:
                torch.save(probe, Path(directory) / "probe.pt")
            write_records(directory, records or [])
        write_checksums(directory, rank)  # last: what this rank wrote, as it wrote it
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"step_{state.step:08d}",
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _rollback(engine: Engine, cfg: Config, saved_step: int, step: int) -> None:
    """The weights, optimizer and schedule of the newest checkpoint (this run's, at saved_step), with the
    step count, data position and logs going on from `step`: the batches since the checkpoint,
    which led to the spike, are not trained on again."""
    directory = Path(cfg.cluster.storage_path or cfg.run_dir) / "checkpoints" / f"step_{saved_step:08d}"
    verify(str(directory))
    engine.load(str(directory))
    engine.advance_schedule(step - saved_step)


def _probe(engine: Engine, batches, tasks, tokenizer, cfg: Config) -> Dict[str, Any]:
    """Logits of the trained model (and of each adapter and head) on a fixed input: the export is
    checked against them."""
    if tasks:
        prompt, target = next(iter(tasks.values())).eval[0]
        ids = torch.tensor([encode_example(tokenizer, prompt, target)[0]])
    else:
        ids = torch.stack([batches.val[i] for i in range(min(2, len(batches.val)))])
    module = engine.module
    module.eval()
    lm = language_model(module)
    names = adapters.adapter_names(cfg.adapter, list(tasks))
    # The precision the logits were computed in: the export (fp32 master weights) is checked in it.
    probe: Dict[str, Any] = {"input_ids": ids, "precision": engine.runtime.precision}
    device_ids = ids.to(engine.device)
    with torch.no_grad():
        if names:
            with lm.disable_adapter():
                probe["logits"] = lm(input_ids=device_ids).logits.float().cpu()
            probe["adapters"] = {}
            for name in names:
                lm.set_adapter(name)
                probe["adapters"][name] = lm(input_ids=device_ids).logits.float().cpu()
        else:
            probe["logits"] = lm(input_ids=device_ids).logits.float().cpu()
        if hasattr(module, "heads"):
            probe["heads"] = {}
            mask = torch.ones_like(device_ids)
            for name in module.heads:
                adapter = head_adapter(name, cfg.adapter, list(tasks))
                if adapter is not None:
                    lm.set_adapter(adapter)
                logits = module(head=name, input_ids=device_ids, attention_mask=mask).logits
                probe["heads"][name] = logits.float().cpu()
    return probe


def _base_model(module: torch.nn.Module) -> torch.nn.Module:
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def track_best(state: TrainState, early, metrics: Dict[str, float]) -> bool:
    """Note the evaluation's early-stopping metric in the train state; True once it has not improved
    for `patience` evaluations in a row. Every rank sees the same (all-reduced) metrics."""
    if early.metric not in metrics:
        known = ", ".join(sorted(k for k in metrics if k.startswith(("eval/", "val/")) and k.count("/") <= 2)[:12])
        raise ValueError(
            f"trainer.early_stopping.metric={early.metric!r} is not logged by this run's evaluations: use one of {known}"
        )
    value, best = float(metrics[early.metric]), state.best_value
    if early.mode == "max":
        improved = best is None or value > best + early.min_delta
    else:
        improved = best is None or value < best - early.min_delta
    if improved:
        state.best_value, state.best_step, state.evals_since_best = value, state.step, 0
        return False
    state.evals_since_best += 1
    return state.evals_since_best >= early.patience


def checkpoint_score(early, metrics: Dict[str, float], evaluating: bool) -> Dict[str, float]:
    """What Ray Train ranks checkpoints by under early stopping (it keeps the best and the newest):
    the metric on evaluated steps, the worst value on others."""
    if early.metric is None:
        return {}
    worst = float("-inf") if early.mode == "max" else float("inf")
    return {"checkpoint/score": float(metrics[early.metric]) if evaluating else worst}


class _Window:
    """Loss and tokens summed since the last logged step; the loss stays on the device."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.tokens = 0
        self.steps = 0
        self.tasks: set = set()
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss_sum += loss.float()
        self.tokens += tokens


def _output_to_file(path: Path, rank: int) -> None:
    """This worker process's stdout and stderr (DeepSpeed, torch, Ray Train, warnings; C++ too: the
    file descriptors themselves) go to <run>/logs/rank<r>.log, one block per start of the group."""
    import os
    import socket
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with path.open("a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    print(
        f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} worker started: rank {rank}, {socket.gethostname()}, pid {os.getpid()}",
        flush=True,
    )


def _flat_config(cfg: Config) -> Dict[str, Any]:
    return {section: value for section, value in asdict(cfg).items()}


def _quiet_libraries() -> None:
    for name in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
