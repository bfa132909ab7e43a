"""Failures as clusters have them: non-finite steps skipped then a stop, loss spikes (warned,
rolled back, or a diverged stop), deterministic errors never retried and ended at once on every
rank, each with distlm's one-line account. Real DeepSpeed on gloo, real Ray Train runs through
the CLI; faults are injected with the test-only DISTLM_TEST_FAULTS hook."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import REPO, TINY, distlm_cmd

from distlm.failures import DETERMINISTIC, INFRASTRUCTURE, SpikeGuard, classify
from distlm.report import read_metrics
from distlm.runtime import free_port

# ---------------------------------------------------------------- units


def test_failure_classes():
    import torch.distributed as dist

    assert classify(ValueError("bad label")) == DETERMINISTIC
    assert classify(KeyError("input_ids")) == DETERMINISTIC
    assert classify(torch.OutOfMemoryError("CUDA out of memory")) == DETERMINISTIC
    assert classify(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer")) == INFRASTRUCTURE
    assert classify(dist.DistBackendError("NCCL communicator was aborted")) == INFRASTRUCTURE
    assert classify(TimeoutError("store")) == INFRASTRUCTURE


@dataclass
class _Spike:
    factor: float = 10.0
    window: int = 20
    min_history: int = 3
    action: str = "warn"
    patience: int = 2


def test_spike_guard_judges_against_the_running_median_of_its_task():
    guard = SpikeGuard(_Spike())
    for step, loss in enumerate([6.0, 5.0, 4.0], 1):
        assert guard.check(step, loss, "a") is None
    assert guard.check(4, 30.0, "a") is None  # 30 < 10 x median 5
    warning = guard.check(5, 60.0, "a")
    assert warning is not None and "step 5 (a)" in warning and "median of 5" in warning
    assert not guard.diverged()
    assert guard.check(6, 4.0, "a") is None and guard.in_a_row == 0  # back to normal: the count restarts
    # Another task has its own history; tiny losses are judged against a floor of 1.0.
    for step, loss in enumerate([0.01, 0.02, 0.01], 7):
        assert guard.check(step, loss, "b") is None
    assert guard.check(10, 0.5, "b") is None  # 50x the median, but under 10 x 1.0
    assert guard.check(11, float("nan"), "a") is not None  # non-finite is always a spike
    assert guard.check(12, 1e9, "a") is not None and guard.diverged()  # spikes stay out of the median


# ---------------------------------------------------------------- DeepSpeed skips a non-finite step


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).pow(2).mean()


def _full_params(engine):
    params = list(engine.module.parameters())
    with engine.gather(params):
        return [p.detach().clone() for p in params]


def _skip_on_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from distlm.config import compose
    from distlm.engine import Engine
    from distlm.runtime import resolve_runtime

    results = {}
    for stage in (0, 1, 2, 3):
        cfg, _ = compose(
            [f"zero=zero{stage}", "trainer.micro_batch_size=1", "trainer.global_batch_size=4", "trainer.warmup_steps=0"]
        )
        engine = Engine(cfg.zero, cfg.trainer, resolve_runtime(cfg.cluster), 2)
        torch.manual_seed(0)
        engine.prepare(_Tiny())
        gen = torch.Generator().manual_seed(rank)
        rows = []
        for step in range(4):
            before, lr, skipped = _full_params(engine), engine.lr(), engine.skipped_steps
            for micro in range(engine.accum_steps):
                loss = engine(x=torch.randn(1, 8, generator=gen))
                if step == 2 and micro == 1 and rank == 1:
                    loss = loss * float("nan")  # one rank, one micro-batch: the whole step must go
                engine.backward(loss)
                engine.step()
            after = _full_params(engine)
            rows.append(
                {
                    "changed": any(not torch.equal(a, b) for a, b in zip(before, after)),
                    "finite": all(bool(torch.isfinite(p).all()) for p in after),
                    "skipped": engine.skipped_steps - skipped,
                    "lr_moved": engine.lr() != lr,
                }
            )
        results[stage] = rows
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_a_non_finite_step_is_skipped_on_every_zero_stage(tmp_path):
    """NaN gradients on one rank's micro-batch: on every rank and ZeRO stage, that step changes no
    weight, does not move the schedule, and is counted; the steps around it train."""
    port = free_port()
    procs = [mp.get_context("spawn").Process(target=_skip_on_rank, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for stage, rows in results.items():
            assert [r["skipped"] for r in rows] == [0, 0, 1, 0], (rank, stage)
            assert [r["changed"] for r in rows] == [True, True, False, True], (rank, stage)
            assert [r["lr_moved"] for r in rows] == [True, True, False, True], (rank, stage)
            assert all(r["finite"] for r in rows), (rank, stage)


# ---------------------------------------------------------------- whole runs through the CLI

SHORT = [*TINY, "trainer.max_steps=20", "trainer.checkpoint_every=10", "trainer.eval_every=10", "tracking=disabled"]


def _run(run_dir: Path, *overrides: str, faults=None, timeout: float = 900):
    env = dict(os.environ)
    if faults is not None:
        env["DISTLM_TEST_FAULTS"] = json.dumps(faults)
    start = time.time()
    result = subprocess.run(
        distlm_cmd("train", *SHORT, f"hydra.run.dir={run_dir}", *overrides),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )
    return result, time.time() - start


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("distlm: error:")]
    assert lines, result.stderr[-3000:]
    return lines[-1]


def _group_starts(run_dir) -> int:
    """How many times the worker group started: each start heads rank 0's log with a line."""
    return (run_dir / "logs" / "rank0.log").read_text().count("worker started: rank 0,")


@pytest.mark.slow
def test_a_diverging_run_stops_after_max_bad_steps_and_is_not_retried(tmp_path):
    """trainer.lr=1e30: the first updates make the weights huge, then non-finite; such steps are
    skipped and counted, and after trainer.max_bad_steps (3) in a row the run stops: exit 1, one
    line naming the steps and the fix, no restart, no export."""
    import re

    run_dir = tmp_path / "run"
    result, _ = _run(run_dir, "trainer.lr=1e30")
    assert result.returncode == 1
    line = _error_line(result)
    assert "deterministic: not retried" in line and "NonFiniteError" in line, line
    first, last = map(int, re.search(r"went non-finite at steps (\d+)-(\d+)", line).groups())
    assert last - first == 2 and "lower trainer.lr" in line, line
    assert _group_starts(run_dir) == 1
    assert not (run_dir / "export").exists()
    skipped = [
        r["train/skipped_steps"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if "train/skipped_steps" in r
    ]
    assert skipped[0] == 0 and skipped[-1] >= 1  # counted in the logged records (steps 2-3 logged before the stop)
    assert "NonFiniteError" in (run_dir / "logs" / "failure.log").read_text()


@pytest.mark.slow
def test_an_error_on_one_rank_ends_the_run_at_once_without_a_restart(tmp_path):
    """A ValueError on rank 1 only, at step 5, while rank 0 waits for it in a collective: the run
    ends within seconds (not the collective timeout), naming rank 1, its node, the step and the
    cause, with the traceback in logs/failure.log."""
    run_dir = tmp_path / "run"
    result, _ = _run(run_dir, "cluster.collective_timeout_s=600", faults={"raise": {"rank": 1, "step": 5}})
    assert result.returncode == 1
    line = _error_line(result)
    assert "(deterministic: not retried) on rank 1, node" in line and "step 5 (training)" in line, line
    assert "ValueError: injected fault on rank 1 at step 5" in line and str(run_dir / "logs/failure.log") in line
    assert _group_starts(run_dir) == 1
    log = (run_dir / "logs" / "failure.log").read_text()
    assert "Traceback" in log and "injected fault" in log
    failed_at = json.loads((run_dir / "logs" / "failure.json").read_text())["time"]
    assert (run_dir / "logs" / "failure.log").stat().st_mtime - failed_at < 60  # not 600 s of collective timeout


@pytest.mark.slow
def test_a_loss_spike_rolls_back_to_the_newest_checkpoint(tmp_path):
    """Every rank's loss x 1e4 at step 12, trainer.loss_spike.action=rollback: a warning names the
    spike and the rollback to step 10, the spike is logged, and the run finishes and exports."""
    run_dir = tmp_path / "run"
    result, _ = _run(run_dir, "trainer.loss_spike.action=rollback", faults={"scale_loss": {"step": 12, "factor": 1e4}})
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "loss spike at step 12" in line]
    assert warnings and "rolled back to the step-10 checkpoint" in " ".join(result.stderr.split()), result.stderr[
        -3000:
    ]
    records = {r["step"]: r for r in read_metrics(str(run_dir / "metrics.jsonl"))}
    assert "train/loss_spike" in records[12] and sorted(s for s in records if s > 0) == list(range(1, 21))
    assert records[13]["train/loss"] < 2 * records[11]["train/loss"]
    assert (run_dir / "export" / "model.safetensors").exists()


def test_verify_catches_a_changed_byte_a_short_file_and_a_missing_rank(tmp_path):
    from distlm.checkpoint import CheckpointError, TrainState, verify, write_checksums, write_train_state

    d = tmp_path / "step_00000010"
    (d / "state").mkdir(parents=True)
    for rank in range(2):
        (d / "state" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(os.urandom(4096))
        write_train_state(str(d), TrainState(step=10), rank, 2, 2)
    write_checksums(str(d), 0)
    with pytest.raises(CheckpointError, match="checksums_rank1.json missing"):
        verify(str(d))
    write_checksums(str(d), 1)
    assert verify(str(d))["step"] == 10
    shard = d / "state" / "zero_pp_rank_1_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_optim_states.pt does not match the checksum"):
        verify(str(d))
    assert verify(str(d), checksums=False)["step"] == 10  # the workers' quick check: sizes only
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="has 100 bytes, 4096 were written"):
        verify(str(d), checksums=False)
