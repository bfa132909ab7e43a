"""What a run does when something goes wrong, on both sides of the Ray boundary.

Two classes of failure:

- **deterministic**: the same inputs fail the same way again (configuration, data, a bug, a
  loss that went non-finite or diverged, running out of memory). Retrying wastes the
  cluster's time, so the failing rank records the error in the metrics sink and returns; the
  other ranks, released from the collective they were waiting in, see the record and return
  too; Ray Train sees a finished run and restarts nothing. The driver then raises `RunFailed`.
- **infrastructure**: a worker process or node died, a collective broke or timed out. The rank
  re-raises, and Ray Train restarts the worker group from the newest intact checkpoint, up to
  `trainer.max_failures` times.

Either way the run ends with one message: the class, the rank and node, the step, the cause in
one line, and where the full log (`<run>/logs/failure.log`) is.
"""

from __future__ import annotations

import statistics
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional

DETERMINISTIC, INFRASTRUCTURE = "deterministic", "infrastructure"
FAILURE_LOG = "logs/failure.log"


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row were skipped for non-finite gradients or loss."""


class DivergedError(RuntimeError):
    """The loss stayed far above its running median: the run diverged."""


class RunFailed(RuntimeError):
    """Raised by the driver: the run failed, after whatever retries its class allows."""


# Errors raised by a broken process group or a dead peer: the machine, not the inputs.
_INFRA_TEXT = (
    "connection closed",
    "connection reset",
    "connection refused",
    "broken pipe",
    "timed out",
    "timeout",
    "gloo",
    "nccl",
    "socket",
    "peer",
    "process group",
    "watchdog",
)


def classify(error: BaseException) -> str:
    """deterministic or infrastructure (see the module's docstring)."""
    import torch.distributed as dist

    if isinstance(error, (NonFiniteError, DivergedError)):
        return DETERMINISTIC
    if isinstance(error, (dist.DistError, ConnectionError, TimeoutError)):
        return INFRASTRUCTURE
    try:
        from ray.exceptions import RayActorError, RaySystemError

        if isinstance(error, (RayActorError, RaySystemError)):
            return INFRASTRUCTURE
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    if isinstance(error, RuntimeError) and any(t in str(error).lower() for t in _INFRA_TEXT):
        return INFRASTRUCTURE
    return DETERMINISTIC


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


@dataclass
class Where:
    """Where a rank is: updated by the loop, read when it fails (and by the hang report)."""

    step: int = 0
    phase: str = "start-up"
    since: float = field(default_factory=time.time)
    # The tracker's flush: what rank 0 logged before a failure reaches the driver's metrics.jsonl.
    flush: Callable[[], None] = lambda: None

    def at(self, phase: str, step: Optional[int] = None) -> None:
        self.phase, self.since = phase, time.time()
        if step is not None:
            self.step = step


_COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier", "allreduce", "all_to_all")


def _training_frame(thread_id: int) -> tuple[str, bool]:
    """Where a thread is: its innermost frame in distlm (or the top one), and whether it is waiting
    in a collective (a torch.distributed call on the stack)."""
    import sys

    frame = sys._current_frames().get(thread_id)
    ours, collective = None, False
    while frame is not None:
        code = frame.f_code
        if ours is None and "/distlm/" in code.co_filename:
            ours = f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}"
        if "torch/distributed" in code.co_filename and any(c in code.co_name for c in _COLLECTIVES):
            collective = True
        frame = frame.f_back
    return ours or "?", collective


class Heartbeat:
    """A daemon thread on each worker that tells the sink every `every_s` seconds where the training
    thread is (step, phase, code line, waiting in a collective or not). When a collective times out,
    the ranks' last heartbeats say which one stalled and where."""

    def __init__(self, sink, rank: int, where: Where, every_s: float = 5.0) -> None:
        import threading

        self.sink, self.rank, self.where, self.every_s = sink, rank, where, every_s
        self.thread_id = threading.get_ident()  # the training thread: the one that creates this
        self.done = threading.Event()
        if sink is not None:
            threading.Thread(target=self._run, daemon=True, name="distlm-heartbeat").start()

    def _run(self) -> None:
        while not self.done.wait(self.every_s):
            line, collective = _training_frame(self.thread_id)
            beat = {
                "step": self.where.step,
                "phase": self.where.phase,
                "since": self.where.since,
                "line": line,
                "collective": collective,
                "time": time.time(),
            }
            try:
                self.sink.put_heartbeat.remote(self.rank, beat)
            except Exception:  # noqa: BLE001 - the driver is going away
                return

    def stop(self) -> None:
        self.done.set()


def stalled_ranks(beats: Dict[int, Dict[str, Any]], rank: int) -> str:
    """From the ranks' last heartbeats, the ones that were not waiting in a collective (or were at an
    earlier step) when `rank`'s collective timed out: the stalled ones."""
    if not beats:
        return ""
    newest_step = max(b["step"] for b in beats.values())
    stalled = [
        f"rank {r} at step {b['step']} ({b['phase']}, {b['line']}, for {time.time() - b['since']:.0f} s)"
        for r, b in sorted(beats.items())
        if r != rank and (not b["collective"] or b["step"] < newest_step)
    ]
    return f"; not in the collective: {', '.join(stalled)}" if stalled else ""


def failure_record(error: BaseException, kind: str, rank: int, where: Where) -> Dict[str, Any]:
    import socket

    import ray

    try:
        node_ip = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - only for the message
        node_ip = "?"
    return {
        "kind": kind,
        "rank": rank,
        "node": f"{socket.gethostname()} ({node_ip})",
        "step": where.step,
        "phase": where.phase,
        "cause": one_line(error),
        "traceback": "".join(traceback.format_exception(error)),
        "time": time.time(),
    }


def handle_worker_error(error: BaseException, sink, rank: int, where: Where) -> None:
    """Called by a worker whose loop raised. Returns normally for a deterministic failure (the driver
    then aborts the run: no restart), re-raises an infrastructure one (Ray Train restarts the group)."""
    import ray

    if sink is None:
        raise error
    if ray.get(sink.deterministic_failure.remote(), timeout=60) is not None:
        return  # collateral: another rank failed deterministically, the run is being aborted
    import torch.distributed as dist

    kind = classify(error)
    record = failure_record(error, kind, rank, where)
    if kind == DETERMINISTIC and not dist.is_initialized():
        # Ray Train set the process group up before the loop began; gone now, it was torn down
        # around this rank because another rank died (e.g. killed by Ray for memory).
        kind = record["kind"] = INFRASTRUCTURE
        record["cause"] += " (the process group was torn down: another rank or its node died first)"
    if kind == INFRASTRUCTURE:  # e.g. a collective timed out: which rank did not come, and where it was
        record["cause"] += stalled_ranks(ray.get(sink.heartbeats.remote(), timeout=60), rank)
    ray.get(sink.put_failure.remote(record), timeout=60)
    if kind == INFRASTRUCTURE:
        raise error


def controller_callback(sink):
    """A Ray Train controller callback that hands the driver (through the sink) the controller's
    handle, so that a deterministic failure on one rank ends the run at once, with the abort that
    Ctrl-C uses, instead of leaving the other ranks in a collective until it times out.
    ControllerCallback is Ray Train's developer API; without it the run still ends, later."""
    try:
        from ray.train.v2._internal.execution.callback import ControllerCallback
    except ImportError:  # pragma: no cover - another Ray Train version
        return None

    class ShareController(ControllerCallback):
        def __init__(self, sink) -> None:
            self.sink = sink

        def after_controller_start(self, train_run_context) -> None:
            import ray

            self.sink.set_controller.remote(ray.get_runtime_context().current_actor)

    return ShareController(sink)


def abort_run(sink) -> bool:
    """Abort the Ray Train run (its controller tears the worker group down). True if it was asked."""
    import ray

    controller = ray.get(sink.controller.remote(), timeout=30)
    if controller is None:
        return False
    try:
        ray.get(controller.abort.remote(), timeout=60)
    except ray.exceptions.RayActorError:
        pass  # the controller exits as it aborts
    return True


def failure_message(record: Dict[str, Any], run_dir: Path, restarts: int) -> str:
    retried = (
        "not retried"
        if record["kind"] == DETERMINISTIC
        else f"{restarts} restart{'s' if restarts != 1 else ''} from the newest checkpoint, then gave up"
    )
    return (
        f"training failed ({record['kind']}: {retried}) on rank {record['rank']}, node {record['node']}, "
        f"step {record['step']} ({record['phase']}): {record['cause']}; full log: {run_dir / FAILURE_LOG}"
    )


def write_failure_log(run_dir: Path, records: List[Dict[str, Any]], extra: str = "") -> Path:
    path = run_dir / FAILURE_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in records:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))
            f.write(
                f"--- {stamp} {r['kind']} failure: rank {r['rank']}, node {r['node']}, step {r['step']} "
                f"({r['phase']})\ncause: {r['cause']}\n{r.get('traceback', '')}\n"
            )
        if extra:
            f.write(f"--- Ray Train's error\n{extra}\n")
    return path


# ---------------------------------------------------------------------------- bad steps and spikes


class BadSteps:
    """Consecutive optimizer steps skipped for non-finite gradients (DeepSpeed's overflow check:
    no update, no scheduler step). Every rank sees the same skips (the check is all-reduced)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row, self.first = limit, 0, 0

    def update(self, step: int, skipped: bool) -> bool:
        """True when the limit is reached."""
        if not skipped:
            self.in_a_row = 0
            return False
        if self.in_a_row == 0:
            self.first = step
        self.in_a_row += 1
        return self.in_a_row >= self.limit

    def error(self, step: int, loss: float, lr: float, precision: str) -> NonFiniteError:
        import math

        what = f"the loss ({loss})" if not math.isfinite(loss) else f"the gradients (the loss was finite: {loss:.4g})"
        steps = f"steps {self.first}-{step}" if self.first != step else f"step {step}"
        fp16 = "; or train in bf16/fp32 instead of fp16" if precision == "fp16" else ""
        return NonFiniteError(
            f"{what} went non-finite at {steps}, {self.in_a_row} step(s) in a row (trainer.max_bad_steps={self.limit}); "
            f"every such update was skipped. Likely fix: lower trainer.lr (now {lr:.3g}) or trainer.grad_clip, "
            f"or check the data those steps read{fp16}"
        )


class SpikeGuard:
    """A logged loss above `factor` x the running median of the previous logged losses of the same
    task (floored at 1.0, so tiny losses do not spike on noise) is a spike. Spikes stay out of the
    median, so a run that diverged keeps spiking; `patience` spikes in a row stop it."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.history: Dict[Optional[str], Deque[float]] = {}
        self.in_a_row = 0

    def check(self, step: int, loss: float, task: Optional[str]) -> Optional[str]:
        """None, or a one-line warning when this loss is a spike."""
        import math

        cfg = self.cfg
        if cfg.factor <= 0:
            return None
        history = self.history.setdefault(task, deque(maxlen=cfg.window))
        median = statistics.median(history) if len(history) >= cfg.min_history else None
        if median is not None and (not math.isfinite(loss) or loss > cfg.factor * max(median, 1.0)):
            self.in_a_row += 1
            of = f" ({task})" if task else ""
            return (
                f"loss spike at step {step}{of}: {loss:.4g} against a running median of {median:.4g} "
                f"(trainer.loss_spike.factor={cfg.factor}), {self.in_a_row} in a row"
            )
        self.in_a_row = 0
        if math.isfinite(loss):
            history.append(loss)
        return None

    def diverged(self) -> bool:
        return self.cfg.patience > 0 and self.in_a_row >= self.cfg.patience

    def error(self, step: int, warning: str, lr: float) -> DivergedError:
        return DivergedError(
            f"the loss diverged: {warning} (trainer.loss_spike.patience={self.cfg.patience}). Likely fix: lower "
            f"trainer.lr (now {lr:.3g}) or raise trainer.warmup_steps; trainer.loss_spike.action=rollback "
            "goes back to the newest checkpoint and skips the batches instead"
        )


# ---------------------------------------------------------------------------- test-only faults

FAULTS_ENV = "DISTLM_TEST_FAULTS"


class Faults:
    """Test-only fault injection, read from the DISTLM_TEST_FAULTS environment variable (JSON):
    {"raise": {"rank": 1, "step": 5}} raises a ValueError on that rank before that step,
    {"stall": {"rank": 1, "step": 8, "seconds": 120}} sleeps there, {"scale_loss": {"step": 12,
    "factor": 1e4}} multiplies every rank's loss at that step. Each fires once per run (a marker
    file in the run directory survives restarts). Unset, as in every real run, it does nothing."""

    def __init__(self, rank: int, run_dir: str) -> None:
        import json
        import os

        self.rank, self.run_dir = rank, Path(run_dir)
        self.spec = json.loads(os.environ[FAULTS_ENV]) if os.environ.get(FAULTS_ENV) else {}

    def _fires(self, name: str, step: int, every_rank: bool = False) -> Optional[Dict[str, Any]]:
        fault = self.spec.get(name)
        if not fault or fault["step"] != step or (not every_rank and fault["rank"] != self.rank):
            return None
        marker = self.run_dir / f".fault-{name}-rank{self.rank}"
        if marker.exists():
            return None
        marker.touch()
        return fault

    def before_step(self, step: int) -> None:
        if not self.spec:
            return
        if self._fires("raise", step):
            raise ValueError(f"injected fault on rank {self.rank} at step {step} ({FAULTS_ENV})")
        if stall := self._fires("stall", step):
            time.sleep(stall["seconds"])

    def loss(self, step: int, loss):
        if self.spec and (fault := self._fires("scale_loss", step, every_rank=True)):
            return loss * fault["factor"]
        return loss
