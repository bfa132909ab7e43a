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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

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
from distlm.heads import (
    TaskModel,
    head_adapter,
    language_model,
    num_layers,
    router_flops_per_token,
    router_layers,
    write_heads_config,
)
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


@dataclass
class WorkerArgs:
    """What the driver hands every worker (Ray Train's train_loop_config, a dict at the boundary)."""

    cfg: Config
    # Pretraining: the prepared token files (PreparedData); fine-tuning: the encoded tasks
    # (distlm.data.batches.EncodedTasks, or a Ray ObjectRef to them).
    data: Any = None
    tokenizer_dir: Optional[str] = None  # fine-tuning: the tokenizer the tasks are encoded with
    sink: Any = None  # the driver's MetricsSink actor (None in a bare Ray Train run)
    resume_from: Optional[str] = None  # the newest intact checkpoint, when Ray's newest was damaged
    log_dir: Optional[str] = None  # workers' output to <log_dir>/rank<r>.log


def train_worker(config: Dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: the loop, and what a failure in it means (see
    distlm.failures: a deterministic one ends the run everywhere, an infrastructure one restarts)."""
    entered = time.time()  # the start-up report's clock (wall time: the driver's is another process)
    args = WorkerArgs(**config)
    where = Where()
    rank = ray.train.get_context().get_world_rank()
    if args.log_dir:
        _output_to_file(Path(args.log_dir) / f"rank{rank}.log", rank)
    heartbeat = Heartbeat(args.sink, rank, where)
    try:
        trainer = Trainer(args, where, entered)
        trainer.restore()
        trainer.train()
    except Exception as e:  # noqa: BLE001 - classified, reported, and re-raised if worth a restart
        where.flush()
        handle_worker_error(e, args.sink, rank, where)
    finally:
        heartbeat.stop()


class Trainer:
    """One worker's run: built (data, model, engine), restored, then trained step by step; on the
    steps that log, the window's metrics, the loss-spike guard, evaluation, checkpoints, preemption."""

    def __init__(self, args: WorkerArgs, where: Where, entered: float) -> None:
        cfg = self.cfg = args.cfg
        self.args, self.where, self.entered = args, where, entered
        self.tr, seq_len = cfg.trainer, cfg.data.seq_len
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.sink = args.sink
        report_placement(self.sink, self.rank)
        if self.sink is not None and self.rank == 0:
            self.sink.count_start.remote()  # the driver counts the worker group's (re)starts
        self.rss_at_start = process_rss()  # the libraries, before any model: the baseline of memory.json
        keep_heap_small()
        _quiet_libraries()
        torch.set_num_threads(self.tr.threads or cfg.cluster.cpus_per_worker)
        self.runtime = resolve_runtime(cfg.cluster)
        apply_collective_timeout(cfg.cluster.collective_timeout_s)  # before DeepSpeed makes its groups

        # The batch source: task examples (fine-tuning) or token blocks (pretraining).
        self.tasks, self.tokenizer = {}, None
        if cfg.task.tasks:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir)
            # The driver's encoded tasks (distlm.driver: _prepare_inputs); built here in a bare Ray Train run.
            encoded = ray.get(args.data) if isinstance(args.data, ray.ObjectRef) else args.data
            self.tasks = encoded.tasks if encoded is not None else load_tasks(cfg.task, self.tokenizer, self.tr.seed)
            self.batches = TaskBatches(
                self.tasks, self.tokenizer, cfg.task, self.tr, seq_len, self.rank, self.world, encoded
            )
            vocab_size, eos_id = len(self.tokenizer), self.tokenizer.eos_token_id
        else:
            self.batches = PretrainBatches(args.data, seq_len, self.tr, self.rank, self.world)
            vocab_size, eos_id = args.data.vocab_size, args.data.eos_token_id

        # The engine comes first: under ZeRO-3 the model is built (or loaded) straight into partitions.
        engine = self.engine = Engine(cfg.zero, self.tr, self.runtime, self.world)
        model = build_model(cfg.model, vocab_size, seq_len, eos_id, self.tr.seed, cfg.init_from, engine.gather)
        release_free_memory()  # what building took beyond the model
        self.flops_per_token = {None: flops_per_token(model, seq_len)}  # a step's task -> its FLOPs a token
        torch.manual_seed(self.tr.seed)  # adapters' and heads' initialisation: the same in every run and on every rank
        model = self.lm = adapters.apply_adapters(model, cfg.adapter, list(self.tasks))
        heads = {name: task.labels for name, task in self.tasks.items() if task.is_classification}
        if heads:  # classification tasks and the router: linear heads over the model's hidden states
            layers = {ROUTER: router_layers(self.lm, cfg.task.router_depth)} if ROUTER in heads else {}
            stop_early = cfg.zero.stage < 3  # ZeRO-3 gathers parameters in the traced order of every layer
            if ROUTER in heads:  # its steps compute a fraction of the base, forward only
                computed = layers[ROUTER] if stop_early else num_layers(self.lm)
                self.flops_per_token[ROUTER] = router_flops_per_token(self.lm, seq_len, computed)
            model = TaskModel(self.lm, heads, layers, stop_early=stop_early)
        engine.prepare(model, adapters.param_groups(model, cfg.adapter, list(self.tasks), self.tr.weight_decay))
        release_free_memory()
        self.built = time.time()
        self.temperatures: Dict[str, float] = {}  # each head's calibration at the newest evaluation
        self.state = TrainState()
        self.saved_step: Optional[int] = None  # the newest checkpoint (for rollback)

    def restore(self) -> None:
        """Ray Train hands back the newest complete checkpoint after a worker restart or a resumed
        run; everything needed to continue exactly is in it. Then the tracker (the same run)."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.args.resume_from:
            checkpoint = ray.train.Checkpoint(self.args.resume_from)
        if checkpoint is not None:
            self.where.at("loading the checkpoint")
            with checkpoint.as_directory() as directory:
                # Written by another number of workers: its universal form, which the driver made.
                resharded = read_manifest(directory)["world_size"] != self.world and self.engine.zero_stage > 0
                self.engine.load(directory, universal=resharded)
                self.state = read_train_state(directory, self.rank)
            self.batches.load_state_dict(self.state.sampler)
            self.saved_step = self.state.step
        cfg, state = self.cfg, self.state
        self.tracker = make_tracker(
            cfg.tracking, self.rank, cfg.run_dir, state.tracker_run_id, _flat_config(cfg), self.sink
        )
        state.tracker_run_id = self.tracker.run_id
        self.where.flush = self.tracker.flush
        self.peak_flops = measure_matmul_peak(self.engine.device, self.runtime.dtype)
        self.stop = StopSignal(self.sink, self.rank)
        self.bad_steps, self.spikes = BadSteps(self.tr.max_bad_steps), SpikeGuard(self.tr.loss_spike)
        self.faults = Faults(self.rank, cfg.run_dir)  # test-only fault injection; nothing unless its variable is set

    def train(self) -> None:
        tr, early, state = self.tr, self.tr.early_stopping, self.state
        if state.step == 0:  # the starting point of the curves (and the "before" of fine-tuning)
            self.where.at("evaluation", 0)
            self.tracker.log(self.evaluate(), 0)
        self.engine.train()
        if self.sink is not None and self.rank == 0:  # where the start-up went (the driver reports it once)
            self.sink.put_startup.remote({"worker": self.entered, "built": self.built, "first_step": time.time()})
        self.window, memory_reported = _Window(self.engine.device), False
        while state.step < tr.max_steps:
            task = self.train_step()
            last = state.step == tr.max_steps
            evaluating = state.step % tr.eval_every == 0 or last
            # With early stopping every evaluated step is a candidate for the export: it gets a checkpoint.
            saving = state.step % tr.checkpoint_every == 0 or last or (evaluating and early.metric is not None)
            if not (state.step % tr.log_every == 0 or evaluating or saving):
                continue  # no collective and no host synchronisation on steps that do not log
            metrics, stop_votes = self.window_metrics(task)
            self.guard_loss_spike(metrics, task)
            if self.sink is not None and not memory_reported:
                # Model states as held between steps (after the optimizer's first step made its moments).
                memory_reported = True
                states = memory_now(self.engine.device)["tensors"]
                self.sink.put_memory.remote(self.rank, {"start_rss": self.rss_at_start, "states": states})
            stopping_early = False
            if evaluating:
                self.where.at("evaluation")
                metrics |= self.evaluate()
                if early.metric is not None:
                    stopping_early = track_best(state, early, metrics)
                    metrics |= {"early_stopping/best_step": state.best_step, "early_stopping/best": state.best_value}
            self.tracker.log(metrics, state.step)
            if saving:
                probe = last or early.metric is not None
                self.save_checkpoint(metrics | checkpoint_score(early, metrics, evaluating), probe)
            if stopping_early:
                break
            # Preemption (SIGTERM to the driver): every rank saves this step, unless just saved, and stops.
            if not last and stop_votes > 0:
                if not saving:
                    self.save_checkpoint(metrics)
                break
            self.window = _Window(self.engine.device)
        if self.sink is not None:
            peak = memory_now(self.engine.device)["peak"]
            self.sink.put_memory.remote(self.rank, {"start_rss": self.rss_at_start, "peak": peak})
        self.tracker.finish()

    def activate(self, task: Optional[str]) -> None:
        """Route the step through `task`'s layers; the optimizer leaves other tasks' layers alone."""
        adapters.activate(self.lm, self.cfg.adapter, task)
        self.engine.set_step_task(task)

    def train_step(self) -> Optional[str]:
        """One optimizer step over its micro batches (of one task, when fine-tuning); its task."""
        state, engine, faults = self.state, self.engine, self.faults
        self.where.at("training", state.step + 1)
        faults.before_step(state.step + 1)
        lr = engine.lr()
        step = self.batches.next(state.step)
        self.activate(step.task)
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
        if self.bad_steps.update(state.step, skipped):
            mean_loss = float(step_loss) / len(step.micro_batches)
            raise self.bad_steps.error(state.step, mean_loss, lr, self.runtime.precision)
        if not skipped:
            flops = self.flops_per_token.get(step.task, self.flops_per_token[None])
            self.window.add(step_loss, step_tokens, step_tokens * flops)
            self.window.steps += 1
        self.window.tasks.add(step.task)
        self.lr = lr
        return step.task

    def window_metrics(self, task: Optional[str]):
        """(the train/ metrics of the steps since the last logged one, the ranks' stop votes): one
        collective and one host sync, for the window's loss and tokens and the stop vote."""
        engine, window, state = self.engine, self.window, self.state
        loss_sum, window_tokens, window_flops, stop_votes = all_reduce_sum(
            [window.loss_sum / engine.accum_steps, window.tokens, window.flops, self.stop.poll()], engine.device
        )
        train_loss = loss_sum / self.world / window.steps if window.steps else float("nan")
        state.tokens_seen += int(window_tokens)
        elapsed = time.perf_counter() - window.start
        metrics = {
            "train/loss": train_loss,
            "train/lr": self.lr,
            "train/grad_norm": engine.grad_norm(),
            "train/tokens_per_s": window_tokens / elapsed,
            "train/mfu": window_flops / self.world / elapsed / self.peak_flops,
            "train/tokens_seen": state.tokens_seen,
            "train/step_time_s": elapsed / max(1, window.steps),
            "train/skipped_steps": engine.skipped_steps,
        }
        if task is not None:
            if window.tasks == {task}:
                metrics[f"train/{task}/loss"] = train_loss
            metrics |= {f"mix/{name}": share for name, share in self.batches.shares().items()}
        return metrics, stop_votes

    def guard_loss_spike(self, metrics: Dict[str, float], task: Optional[str]) -> None:
        """The loss-spike guard (the loss is all-reduced: every rank decides alike): warn, roll back
        to the newest checkpoint, or stop the run once the loss has diverged."""
        train_loss, step = metrics["train/loss"], self.state.step
        spike = self.spikes.check(step, train_loss, task if self.window.tasks == {task} else None)
        if spike is None:
            return
        metrics["train/loss_spike"] = train_loss
        if self.spikes.diverged():
            raise self.spikes.error(step, spike, self.lr)
        if self.tr.loss_spike.action == "rollback":
            if self.saved_step is None:
                spike += "; no checkpoint yet to roll back to"
            else:
                self.where.at("rolling back")
                _rollback(self.engine, self.cfg, self.saved_step, step)
                spike += (
                    f"; rolled back to the step-{self.saved_step} checkpoint's weights and optimizer, "
                    f"the batches of steps {self.saved_step + 1}-{step} dropped"
                )
        if self.sink is not None and self.rank == 0:
            self.sink.put_warning.remote(spike)  # the driver shows it

    def evaluate(self) -> Dict[str, float]:
        """Each task's metrics (fine-tuning), or the validation loss (pretraining); all ranks together."""
        try:
            if not self.tasks:
                engine, tr = self.engine, self.tr
                engine.eval()
                loss = validation_loss(
                    engine, self.batches.val, tr.micro_batch_size, tr.eval_batches, self.rank, self.world, engine.device
                )
                engine.train()
                return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}
            reports: Dict[str, Dict] = {}
            metrics = evaluate_tasks(
                self.engine.module,
                self.tokenizer,
                self.tasks,
                self.cfg.task,
                self.engine.device,
                self.rank,
                self.world,
                self.engine.zero_stage == 3,
                self.activate,
                reports=reports,
            )
            if self.rank == 0 and reports:  # confusion matrices of the classifications (and the router)
                write_report(self.cfg.run_dir, self.state.step, reports)
            self.temperatures.update({name: report["temperature"] for name, report in reports.items()})
            return metrics
        finally:
            release_free_memory()

    def save_checkpoint(self, metrics: Dict[str, float], probe: bool = False) -> None:
        """Each rank writes its shards to a local temp dir; Ray Train merges them into the run's
        storage and registers the checkpoint only once every rank has reported. `probe`: with the
        trained model's logits on a fixed input, which the export is checked against."""
        self.where.at("saving a checkpoint")
        engine, state, rank, cfg = self.engine, self.state, self.rank, self.cfg
        self.saved_step = state.step
        state.sampler = self.batches.state_dict()
        task_names = list(self.tasks)
        logits = _probe(engine, self.batches, self.tasks, self.tokenizer, cfg) if probe else None
        records = self.tracker.take_unsaved()
        directory = tempfile.mkdtemp(prefix=f"distlm-step{state.step}-rank{rank}-")
        try:
            engine.save(directory)
            write_train_state(directory, state, rank, self.world, engine.zero_stage, cfg.trainer.global_batch_size)
            if rank == 0:
                # What `distlm export` needs to rebuild the model (and its adapters and heads) offline.
                lm = language_model(engine.module)
                _base_model(lm).config.save_pretrained(directory)
                if adapters.adapter_names(cfg.adapter, task_names):
                    adapters.save_adapter_configs(lm, directory)
                if hasattr(engine.module, "heads"):
                    write_heads_config(directory, engine.module, cfg.adapter, task_names, self.temperatures)
                if logits is not None:
                    torch.save(logits, Path(directory) / "probe.pt")
                write_records(directory, records)
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
        self.flops = 0.0  # each step's tokens times its FLOPs a token (a router step computes less)
        self.steps = 0
        self.tasks: set = set()
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int, flops: float) -> None:
        self.loss_sum += loss.float()
        self.tokens += tokens
        self.flops += flops


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
