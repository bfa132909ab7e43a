"""The driver side of a training run (the `distlm train` process, outside the Ray workers): checks,
data, the Ray Train worker group, progress, export, plot. The workers run distlm.worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from distlm import report
from distlm.config import Config, ConfigError
from distlm.failures import FAILURE_LOG

CHECKPOINTS = "checkpoints"


def run(
    cfg: Config,
    console=None,
    verbose: bool = False,
    overrides: Sequence[str] = (),
    started: Optional[float] = None,
) -> Dict[str, Any]:
    """Train, export and plot. Returns a summary; raises on failure after Ray's retries.
    started: the start-up report's zero (time.time()): the command's start for `distlm train`,
    else this call.

    The console shows distlm's own lines; what Ray, DeepSpeed, torch and the workers print goes
    to <run>/logs/rank<r>.log (verbose=True: to the console as well, as Ray streams it)."""
    from rich.console import Console

    from distlm.checkpoint import checkpoint_step

    started = started or time.time()
    console = console or Console(stderr=True)
    run_dir = Path(cfg.run_dir).resolve()
    storage = cfg.cluster.storage_path or str(run_dir)
    checkpoints = Path(storage) / CHECKPOINTS
    # Checkpoints on disk that Ray Train may not have registered (a run ended right after saving one).
    resuming = any(checkpoints.glob("step_*")) or (checkpoints / "checkpoint_manager_snapshot.json").exists()
    if cfg.trainer.resume == "never" and resuming:
        raise ConfigError(
            f"{run_dir} already has checkpoints and trainer.resume=never: use trainer.resume=auto to continue it, "
            "or a new hydra.run.dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)

    console.log(f"run dir: {run_dir}")
    from distlm.runtime import ray_target, resolve_runtime

    convert_gguf_inputs(cfg, console)
    # The memory pre-flight: before anything slow (data, Ray) when the workers run on this machine,
    # after joining the cluster otherwise.
    target = ray_target(cfg.cluster.address)
    if target.note:
        console.log(f"ray: {target.note}")
    joined = target.address is not None
    if not joined:
        plan = _preflight(cfg, resolve_runtime(cfg.cluster), joined, console)
    data, source_tokenizer = _prepare_inputs(cfg, console, verbose)
    tokenizer_dir = run_dir / "tokenizer"
    if not tokenizer_dir.exists():
        shutil.copytree(
            source_tokenizer, tokenizer_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "config.json")
        )

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distlm.failures import controller_callback
    from distlm.tracking import MetricsSink

    ray_for_run(cfg, verbose)
    if cfg.task.tasks:  # the encoded tasks (tens of MB) into the object store; the driver keeps the reference only
        data = ray.put(data)
    runtime = resolve_runtime(cfg.cluster, cuda_available=_cluster_has_gpus())
    if joined:
        plan = _preflight(cfg, runtime, joined, console)
    resume_from, resumed = None, None
    if resuming:
        from distlm.checkpoint import find_resumable

        # A damaged or missing newest checkpoint: resume from the newest intact one, saying so.
        resume_from = find_resumable(checkpoints, lambda line: console.log(f"[yellow]checkpoints:[/] {line}"))
        resumed = resume_from or _newest_registered(checkpoints)
    note = _single_worker_zero(cfg, resumed)
    console.log(
        f"runtime: {cfg.cluster.num_workers} workers on {runtime.device}, {runtime.backend}, {runtime.precision}, "
        f"ZeRO-{cfg.zero.stage}{note}"
    )
    if resuming:
        _check_resume(resumed, cfg, console)
    # Only now, with every driver-side check passed: a refused command leaves an existing run's config as it was.
    _save_config(cfg, run_dir, overrides)
    sink = ray.remote(num_cpus=0)(MetricsSink).remote()
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if runtime.device == "cuda":
        resources["GPU"] = cfg.cluster.gpus_per_worker
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={
            "cfg": cfg,
            "data": data,
            "tokenizer_dir": str(tokenizer_dir),
            "sink": sink,
            "resume_from": resume_from,
            # Workers' output to files: local or shared storage only (the run dir is there too).
            "log_dir": None if verbose or "://" in storage else str(run_dir / "logs"),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.cluster.num_workers,
            use_gpu=runtime.device == "cuda",
            resources_per_worker=resources,
            placement_strategy=cfg.cluster.placement_strategy,
        ),
        torch_config=TorchConfig(backend=runtime.backend, timeout_s=cfg.cluster.collective_timeout_s),
        run_config=RunConfig(
            callbacks=[cb for cb in [controller_callback(sink)] if cb is not None],
            name=CHECKPOINTS,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
            checkpoint_config=_checkpoint_config(cfg),
        ),
    )
    metrics_path = run_dir / "metrics.jsonl"
    if resuming:
        from distlm.checkpoint import recover_records

        if recovered := recover_records(checkpoints, metrics_path):
            console.log(
                f"metrics.jsonl: {recovered} records the interrupted run had not written, read back from its checkpoints"
            )
    error = None
    fit_called = time.time()
    with _StopOnSigterm(sink, console) as stop, _Progress(sink, metrics_path, cfg.trainer.max_steps, console):
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001 - Ray Train gave up (restarts spent): reported below
            error = e
    # Which node each rank ran on and the rendezvous address it used (multi-node debugging).
    placement = ray.get(sink.placement_by_rank.remote(), timeout=60)
    (run_dir / "placement.json").write_text(json.dumps(placement, indent=2))
    _write_memory(run_dir, ray.get(sink.memory_by_rank.remote(), timeout=60), plan, console)
    startup = _startup(ray.get(sink.startup_times.remote(), timeout=60), started, fit_called, console)
    restarts = _raise_on_failure(sink, run_dir, error or result.error, placement, metrics_path)
    if restarts:
        console.log(
            f"the worker group was restarted {restarts} time(s) after infrastructure failures: {run_dir / FAILURE_LOG}"
        )
    # None when the run resumed from a checkpoint already at max_steps (killed after its last save,
    # before Ray registered it): nothing was trained, and that checkpoint is the run's last.
    checkpoint = result.checkpoint.path if result.checkpoint is not None else resumed
    if checkpoint is None:
        raise RuntimeError(f"the run ended without a checkpoint: see {run_dir / 'logs'}")
    step = checkpoint_step(checkpoint)
    records = report.read_metrics(str(metrics_path))  # the end-of-run report reads it once
    best = report.best_step(records) if cfg.trainer.early_stopping.metric is not None else None
    if best is not None and best != step and not stop.requested:
        stopped = "stopped early" if step < cfg.trainer.max_steps else "finished"
        checkpoint = str(Path(checkpoint).parent / f"step_{best:08d}")
        console.log(f"early stopping: {stopped} at step {step}; the best evaluation was step {best}: exporting it")
    if stop.requested and step < cfg.trainer.max_steps:
        raise Preempted(
            f"stopped by SIGTERM at step {step} of {cfg.trainer.max_steps} with a checkpoint ({checkpoint}): "
            f"run the same command (same hydra.run.dir={run_dir}) to continue"
        )
    console.log(f"final checkpoint: {checkpoint}")
    report.plot_losses(records, run_dir.name, str(run_dir / "loss.png"))
    summary = {
        "run_dir": str(run_dir),
        "checkpoint": checkpoint,
        "export": None,
        "restarts": restarts,
        "startup_s": startup,
        **report.losses(records),
    }
    if cfg.task.tasks:
        summary["tasks"] = report.task_table(records, list(cfg.task.tasks), checkpoint_step(checkpoint))
        (run_dir / "best.json").write_text(json.dumps(report.best_steps(records, list(cfg.task.tasks)), indent=2))
    if not cfg.trainer.export:
        console.log(f"trainer.export=false: `distlm export {run_dir}` writes the export from that checkpoint")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    from distlm.export import export_checkpoint

    try:
        info = export_checkpoint(
            checkpoint, str(run_dir / "export"), str(tokenizer_dir), merged=cfg.adapter.export_merged
        )
    except Exception as e:
        raise ExportFailed(
            f"training finished but the export failed ({type(e).__name__}: {e}); the checkpoint {checkpoint} "
            f"is complete: `distlm export {run_dir}` retries the export"
        ) from e
    console.log(
        f"export: {run_dir / 'export'} (max |logit diff| vs trained model {info.get('probe_max_abs_diff', float('nan')):.1e})"
    )
    summary["export"] = str(run_dir / "export")
    if cfg.task.router:
        # The agent end to end on the export, in this process: every held-out example where the router sends it.
        from distlm.evaluate import evaluate_export

        console.log("evaluating the agent (router -> task layer) on the export")
        agent, step = cfg.serve.agent, checkpoint_step(checkpoint)
        # Each task through its own layer was scored at this step by the training: taken from there.
        evaluated = next((r for r in reversed(records) if r["step"] == step and "eval/mean_score" in r), None)
        metrics, _, tasks, adapters = evaluate_export(
            summary["export"], cfg.task, cfg.trainer.seed, agent.min_confidence, agent.fallback, evaluated
        )
        (run_dir / "agent_eval.json").write_text(json.dumps(metrics, indent=2))
        examples = {n: (t.kind, min(len(t.eval), cfg.task.eval_examples)) for n, t in tasks.items()}
        summary["agent"] = {"metrics": metrics, "tasks": examples, "adapters": adapters}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _worker_entry(config: Dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: distlm.worker.train_worker, imported there, so this
    process never imports torch's training stack, DeepSpeed or peft just to name the function."""
    from distlm.worker import train_worker as run

    run(config)


def _startup(times: Dict[str, float], started: float, fit_called: float, console) -> Dict[str, float]:
    """Where the time from the command to the first training step went, from rank 0's clock on the
    first start of the worker group (logged; in summary.json). Wall clocks of one machine or of
    NTP-synchronised nodes: good to a fraction of a second."""
    if not times:
        return {}  # no worker reached its first step
    parts = {
        "first_step": times["first_step"] - started,
        "driver": fit_called - started,  # imports, config, data, Ray's start (or joining it)
        "worker_group": times["worker"] - fit_called,  # Ray Train's controller and workers, their imports
        "build": times["built"] - times["worker"],  # model, adapters, DeepSpeed
        "step0": times["first_step"] - times["built"],  # checkpoint load, tracker, the step-0 evaluation
    }
    parts = {k: round(v, 2) for k, v in parts.items()}
    console.log(
        f"start-up: first step {parts['first_step']:.1f} s after the command (driver and Ray {parts['driver']:.1f} s, "
        f"worker group {parts['worker_group']:.1f} s, model and DeepSpeed {parts['build']:.1f} s, "
        f"step-0 evaluation {parts['step0']:.1f} s)"
    )
    return parts


def _single_worker_zero(cfg: Config, resumed: Optional[str]) -> str:
    """ZeRO-1/2 with one worker shards nothing: such a run trains without ZeRO (zero.shard_single_worker),
    and so do its resumes on any number of workers (a ZeRO-0 checkpoint is whole, not the shards a
    ZeRO optimizer loads). A resume of a ZeRO checkpoint keeps its stage. The stage chosen is in
    cfg, which the workers get; the return value is the console's note."""
    zero = cfg.zero
    if zero.stage not in (1, 2) or zero.offload_optimizer or zero.shard_single_worker:
        return ""
    if resumed is not None:
        from distlm.checkpoint import read_manifest

        manifest = read_manifest(resumed)
        if manifest["zero_stage"] != 0:
            return ""
        configured, zero.stage = zero.stage, 0
        return (
            f" (zero.stage={configured}, but {Path(resumed).name} was written without ZeRO by "
            f"{manifest['world_size']} worker(s): the run goes on without it)"
        )
    if cfg.cluster.num_workers != 1:
        return ""
    configured, zero.stage = zero.stage, 0
    return f" (zero.stage={configured} has nothing to shard on 1 worker; zero.shard_single_worker=true keeps it)"


def _newest_registered(checkpoints: Path) -> Optional[str]:
    """The checkpoint Ray Train resumes from: the newest its snapshot lists."""
    from distlm.checkpoint import checkpoint_step, registered

    names = registered(checkpoints)
    return str(checkpoints / max(names, key=checkpoint_step)) if names else None


def _check_resume(checkpoint: Optional[str], cfg: Config, console) -> None:
    """The checkpoint a resume starts from must have this run's global batch size. A run resumed on
    another number of workers than wrote it loads DeepSpeed's universal form of it (ZeRO-1/2/3
    shards are cut per worker; ZeRO-0's state is whole), made here once by a Ray task (on the
    cluster, which holds the storage and the memory)."""
    import ray

    from distlm.checkpoint import read_manifest

    if checkpoint is None:
        return
    manifest = read_manifest(checkpoint)
    batch = manifest.get("global_batch_size")
    if batch is not None and batch != cfg.trainer.global_batch_size:
        raise ConfigError(
            f"{checkpoint} was trained with global batches of {batch} and this run's are {cfg.trainer.global_batch_size} "
            f"(trainer.global_batch_size; auto is workers x micro batch): resume with trainer.global_batch_size={batch}"
        )
    workers, stage = manifest["world_size"], manifest["zero_stage"]
    if workers == cfg.cluster.num_workers or stage == 0:
        return
    if stage != cfg.zero.stage:
        raise ConfigError(
            f"{checkpoint} was written with ZeRO-{stage}, this run uses ZeRO-{cfg.zero.stage}: resume with zero=zero{stage}"
        )
    if "://" in checkpoint:
        raise ConfigError(
            f"{checkpoint} was written by {workers} workers and this run has {cfg.cluster.num_workers}: converting a "
            f"checkpoint in object storage is not supported; resume with cluster.num_workers={workers}"
        )
    console.log(
        f"checkpoints: {Path(checkpoint).name} was written by {workers} workers, this run has "
        f"{cfg.cluster.num_workers}: converting it to DeepSpeed's universal checkpoint"
    )
    start = time.perf_counter()
    path = ray.get(ray.remote(num_cpus=1)(_to_universal).remote(checkpoint))
    console.log(f"checkpoints: {path} ({time.perf_counter() - start:.0f} s)")


def _to_universal(checkpoint: str) -> str:
    from distlm.engine import to_universal

    return to_universal(checkpoint, workers=max(1, min(4, (os.cpu_count() or 2) // 2)))


def _checkpoint_config(cfg: Config):
    """Keep the newest keep_checkpoints; with early stopping, the best by its metric (and the newest)."""
    from ray.train import CheckpointConfig

    early = cfg.trainer.early_stopping
    if early.metric is None:
        return CheckpointConfig(num_to_keep=cfg.trainer.keep_checkpoints)
    return CheckpointConfig(
        num_to_keep=cfg.trainer.keep_checkpoints,
        checkpoint_score_attribute="checkpoint/score",
        checkpoint_score_order=early.mode,
    )


def _prepare_inputs(cfg: Config, console, verbose: bool = False):
    """(PreparedData or EncodedTasks, tokenizer dir). Pretraining tokenizes the corpus (cached);
    fine-tuning takes the pretrained model's tokenizer and generates/reads and encodes the tasks."""
    source = cfg.init_from or cfg.model.pretrained
    if cfg.task.tasks:
        if source is None:
            raise ConfigError(
                "fine-tuning on tasks needs a pretrained model: set init_from=runs/<pretraining run>/export "
                "(or model.pretrained=<HF model dir>)"
            )
        from distlm.data.batches import encode_tasks
        from distlm.data.tasks import load_tasks
        from distlm.data.tokenizer import load_tokenizer

        # Once, here: clear errors now (bad tokenizer, malformed task files), and the workers take
        # the encoded examples from Ray's object store instead of each tokenizing them all again.
        tokenizer = load_tokenizer(source)
        tasks = load_tasks(cfg.task, tokenizer, cfg.trainer.seed)
        encoded = encode_tasks(tasks, tokenizer, cfg.data.seq_len, cfg.trainer.global_batch_size)
        for name, task in tasks.items():
            skipped = f", {task.skipped} malformed lines skipped" if task.skipped else ""
            too_long = encoded.too_long[name]
            dropped = f", {too_long} longer than data.seq_len={cfg.data.seq_len} dropped" if too_long else ""
            console.log(f"task {name}: {len(task.train)} train / {len(task.eval)} held-out examples{skipped}{dropped}")
        console.log(f"fine-tuning {source} on tasks {', '.join(cfg.task.tasks)} with adapter={cfg.adapter.name}")
        return encoded, source
    from distlm.data import prepare_data

    if source is not None and cfg.data.tokenizer is None:
        # Continued pretraining reads the corpus with the model's own tokenizer.
        cfg.data.tokenizer = source
        console.log(f"tokenizer: {source}'s own (data.tokenizer=<dir> picks another)")
    # Ray is started (or joined) here only if the data is large enough for Ray Data (data.engine).
    data = prepare_data(cfg.data, seed=cfg.trainer.seed, progress=True, ray_init=lambda: ray_for_run(cfg, verbose))
    console.log(f"data: {data.num_train_tokens:,} train / {data.num_val_tokens:,} val tokens, vocab {data.vocab_size}")
    if cfg.model.pretrained is None and cfg.init_from is None:
        check_model_config(cfg, data)
    return data, data.tokenizer_dir


def check_model_config(cfg: Config, data) -> None:
    """Fail here, not in every worker, if transformers cannot build the model. A config that
    was built once is remembered in the data cache (its fields, the data's vocabulary, the
    transformers version and distlm's model code, hashed): importing transformers costs the
    driver seconds of every start, and the workers import it anyway."""
    import hashlib
    from dataclasses import asdict
    from importlib.metadata import version
    from importlib.util import find_spec

    code = Path(find_spec("distlm.models").origin).read_bytes()  # not imported: it imports transformers
    fields = [asdict(cfg.model), data.vocab_size, cfg.data.seq_len, data.eos_token_id, version("transformers")]
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode() + code).hexdigest()
    marker = Path(cfg.data.cache_dir) / "model_configs" / digest[:32]
    if marker.is_file():
        return
    from distlm.models import build_config

    build_config(cfg.model, data.vocab_size, cfg.data.seq_len, data.eos_token_id)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:  # a read-only cache: checked again at the next start, nothing else lost
        pass


def _preflight(cfg: Config, runtime, joined: bool, console):
    """Stop now (ConfigError, exit 2) when a worker would run out of memory; log the estimate."""
    from distlm import memory

    plan = memory.plan(cfg, runtime.device, runtime.precision, joined)
    if cfg.trainer.memory_check:
        plan.check()
    console.log(plan.summary())
    return plan


def _write_memory(run_dir: Path, measured: List[Dict[str, float]], plan, console) -> None:
    """memory.json: each rank's measured memory next to the pre-flight's estimate."""
    from distlm.memory import gb

    e = plan.estimate
    estimate = {"per_worker": e.total_on(plan.device), "model_states": e.model_states, "activations": e.activations}
    (run_dir / "memory.json").write_text(json.dumps({"estimate": estimate, "ranks": measured}, indent=2))
    peaks = [r["peak"] for r in measured if "peak" in r]
    if peaks:
        console.log(f"memory: peak {gb(max(peaks))} per worker (estimate {gb(estimate['per_worker'])})")


def convert_gguf_inputs(cfg: Config, console) -> None:
    """.gguf files given as the model, init_from or tokenizer become Hugging Face directories,
    converted once on the driver into the data cache; the workers then load those."""
    for section, key, name in [
        (cfg, "init_from", "init_from"),
        (cfg.model, "pretrained", "model.pretrained"),
        (cfg.data, "tokenizer", "data.tokenizer"),
    ]:
        path = getattr(section, key)
        if path is not None and str(path).lower().endswith(".gguf"):
            from distlm.models import resolve_pretrained  # imports transformers: only when needed

            converted = resolve_pretrained(path, cfg.data.cache_dir)
            console.log(f"{name}: {path} as the Hugging Face directory {converted}")
            setattr(section, key, converted)


def _save_config(cfg: Config, run_dir: Path, overrides: Sequence[str]) -> None:
    """The resolved config of the run and the command line's overrides (Hydra's layout), for people
    and for `distlm eval`."""
    from omegaconf import OmegaConf

    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(exist_ok=True)
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))


def _raise_on_failure(sink, run_dir: Path, error, placement: List[Dict[str, Any]], metrics_path: Path) -> int:
    """Raise RunFailed with distlm's one-line account when the run failed (a deterministic failure on
    any rank, or Ray Train out of restarts); otherwise return how many restarts it took."""
    import ray

    from distlm.failures import DETERMINISTIC, INFRASTRUCTURE, RunFailed, failure_message, one_line, write_failure_log

    records = ray.get(sink.all_failures.remote(), timeout=60)
    restarts = max(0, ray.get(sink.start_count.remote(), timeout=60) - 1)
    deterministic = next((r for r in records if r["kind"] == DETERMINISTIC), None)
    if deterministic is None and error is None:
        if records:
            write_failure_log(run_dir, records)
        return restarts
    # (after a deterministic failure, Ray Train's error is only the abort's)
    write_failure_log(run_dir, records, extra=str(error) if error is not None and deterministic is None else "")
    record = deterministic
    if record is None:
        # A worker that died took no record with it: Ray Train names its rank. Prefer it over the
        # collateral errors of the ranks that were waiting for it.
        dead = {
            rank: e
            for rank, e in (getattr(error, "worker_failures", None) or {}).items()
            if isinstance(e, ray.exceptions.RayActorError)
        }
        if dead:
            rank, e = min(dead.items())
            node = next((p for p in placement if p["rank"] == rank), {})
            steps = [r["step"] for r in records] or [report.last_step(metrics_path)]
            record = {
                "kind": INFRASTRUCTURE,
                "rank": rank,
                "node": f"{node.get('hostname', '?')} ({node.get('node_ip', '?')})",
                "step": max(steps),
                "phase": "the worker process died",
                "cause": one_line(e),
                "time": time.time(),
            }
        elif records:
            record = records[-1]
        else:
            record = {
                "kind": INFRASTRUCTURE,
                "rank": "?",
                "node": "?",
                "step": report.last_step(metrics_path),
                "phase": "?",
                "cause": one_line(error),
                "time": time.time(),
            }
    if error is not None and "running low on memory" in str(error):  # Ray's memory monitor, not a bug
        import re

        used = re.search(r"was ([\d.]+GB used / [\d.]+GB limit)", str(error))
        record = record | {
            "cause": f"Ray killed workers: the node ran low on memory ({used.group(1) if used else 'see the log'}; "
            f"Ray kills at 95%); then {record['cause']}. Fit it with fewer workers per node, a smaller "
            "trainer.micro_batch_size or data.seq_len, or another zero= preset (distlm plan)"
        }
    summary = {k: v for k, v in record.items() if k != "traceback"} | {"restarts": restarts}
    (run_dir / "logs" / "failure.json").write_text(json.dumps(summary, indent=2))
    raise RunFailed(failure_message(record, run_dir, restarts)) from error


class ExportFailed(Exception):
    """Training finished with a complete checkpoint; writing its export did not."""


class Preempted(Exception):
    """The run stopped on SIGTERM after saving a checkpoint; the same command continues it."""


class _StopOnSigterm:
    """SIGTERM to the driver (Slurm's warning before preemption or the time limit) asks the
    workers, through the metrics sink, to save a checkpoint and stop at the next step.
    The handler only starts a thread: Ray calls are not safe inside a signal handler."""

    def __init__(self, sink, console) -> None:
        self.sink, self.console = sink, console
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.requested = True
            threading.Thread(target=self._stop_workers, daemon=True).start()

    def _stop_workers(self) -> None:
        import ray

        self.console.log("SIGTERM: the workers save a checkpoint and stop")
        ray.get(self.sink.request_stop.remote(), timeout=60)


def ray_for_run(cfg: Config, verbose: bool = False) -> None:
    """Join cluster.address (or RAY_ADDRESS), else start a local Ray. Unless verbose, Ray's own
    start-up lines and the actors' output (Ray Train's controller, the workers) stay off the console."""
    from distlm.runtime import init_ray as start_or_join

    # Ray Train's controller and workers log plain lines (to the run's logs) rather than JSON.
    for key in ["RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING", "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING"]:
        os.environ.setdefault(key, "0")
    cpus = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    if start_or_join(cfg.cluster.address, cpus, quiet=not verbose, dashboard=cfg.cluster.dashboard):
        # A Ray of this process alone has no autoscaler to drain its node: Ray Train's preemption
        # watcher (one more actor process at every start) would wait for a notice that never comes.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


class _Progress:
    """Drains rank 0's metrics from the sink: appends them to metrics.jsonl and shows a bar."""

    def __init__(self, sink, path: Path, total: int, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.sink, self.path, self.console = sink, path, console
        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.bar.add_task("train", total=total, loss="-", val="-", tps="-")
        self.aborted = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self.bar.start()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._drain()
        self.bar.stop()

    def _loop(self) -> None:
        while not self.stop.wait(0.5):
            self._drain()

    def _drain(self) -> None:
        import ray

        try:  # one round trip a tick: new records, warnings, and whether a rank failed deterministically
            news = ray.get(self.sink.poll.remote(), timeout=10)
        except Exception:  # a slow or restarting cluster: try again on the next tick
            return
        records: List[Dict[str, Any]] = news["records"]
        for warning in news["warnings"]:
            self.console.log(f"[yellow]warning:[/] {warning}")
        # A deterministic failure on any rank: end the run now (the others may be waiting in a
        # collective for the rank that failed); the driver reports it once fit() returns.
        if news["failed"] and not self.aborted:
            self.aborted = True
            from distlm.failures import abort_run

            try:
                abort_run(self.sink)
            except Exception:  # noqa: BLE001 - the run then ends at the collective timeout
                pass
        if not records:
            return
        with self.path.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        fields = {}
        for r in records:
            if "train/loss" in r:
                fields |= {"loss": f"{r['train/loss']:.3f}", "tps": f"{r['train/tokens_per_s']:,.0f}"}
            if "val/loss" in r:
                fields["val"] = f"{r['val/loss']:.3f}"
                train = f"train loss {r['train/loss']:.3f}, " if "train/loss" in r else ""
                self.console.log(f"step {r['step']}: {train}val loss {r['val/loss']:.3f}")
        self.bar.update(self.task, completed=records[-1]["step"], **fields)
