"""End-to-end training on a real local Ray with real DeepSpeed (gloo, CPU).

Numbers are checked against an independent reference: a plain single-process PyTorch
loop over the same global batches (no Ray, no DeepSpeed).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, compose_cfg, distlm_cmd, reference_losses, run_cli
from helpers.wandb_records import read_runs

from distlm.report import read_metrics

pytestmark = pytest.mark.slow


def train_in_process(overrides, run_dir):
    from distlm import driver

    cfg = compose_cfg(["tracking=disabled", *overrides], run_dir)
    summary = driver.run(cfg)
    return cfg, summary, read_metrics(str(Path(run_dir) / "metrics.jsonl"))


LLAMA = [
    "model=llama",
    "model.hidden_size=64",
    "model.num_heads=4",
    "model.intermediate_size=128",
    "model.extra.num_key_value_heads=2",
]
# ZeRO-2 without accumulation meets the reference in
# test_resume_on_another_number_of_workers_continues_the_same_run[zero2] (steps 1-4, 2 workers).
CASES = {
    "zero0": ["zero=zero0"],
    "zero1": ["zero=zero1"],
    # 2 micro steps per optimizer step on each worker.
    "zero2-accumulation": ["zero=zero2", "trainer.global_batch_size=8"],
    "zero3": ["zero=zero3"],
    "zero3-llama-activation-checkpointing": ["zero=zero3", *LLAMA, "model.activation_checkpointing=true"],
    "zero3-offload": ["zero=zero3_offload"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_workers_match_single_process_reference(case, tmp_path, ray_session):
    overrides = [*CASES[case], "trainer.max_steps=6", "trainer.checkpoint_every=6", "trainer.eval_every=3"]
    cfg, summary, records = train_in_process(overrides, tmp_path / "run")
    assert cfg.cluster.num_workers == 2
    assert records[0]["step"] == 0 and "val/loss" in records[0]  # the curve's starting point
    records = [r for r in records if "train/loss" in r]
    distlm_losses = [r["train/loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 7))
    reference = reference_losses(cfg, 6)
    assert distlm_losses == pytest.approx(reference, rel=2e-5, abs=2e-5)
    # Training did something: the loss moved, and every metric is a finite number.
    assert distlm_losses[-1] < distlm_losses[0]
    for r in records:
        for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert 0 < records[-1]["train/mfu"] < 1

    # The export loads with plain transformers and reproduces the trained model's logits.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = Path(summary["export"])
    assert (export / "model.safetensors").exists() and (export / "config.json").exists()
    probe = torch.load(Path(summary["checkpoint"]) / "probe.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    assert torch.allclose(logits, probe["logits"], atol=1e-5, rtol=0)
    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = tokenizer("def main(", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


# --- runs driven through the CLI, as a user would: uninterrupted, interrupted, a worker killed ---

# Enough steps that a kill lands mid-run; small model so each step takes a visible time.
LONG = [
    *TINY,
    "trainer.max_steps=30",
    "trainer.checkpoint_every=10",
    "trainer.eval_every=10",
    "trainer.max_failures=1",
    "model.hidden_size=128",
    "model.num_layers=4",
    "trainer.micro_batch_size=8",
    "trainer.global_batch_size=16",
]


def _losses(run_dir: Path):
    return {r["step"]: r["train/loss"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if "train/loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_cli("train", *LONG, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir.parent / "console.txt").write_text(result.stdout + result.stderr)
    return run_dir


def test_the_console_shows_distlms_own_lines_and_the_rest_goes_to_the_run_logs(uninterrupted):
    """By default nothing that Ray, DeepSpeed, torch or the workers print reaches the console (and
    nothing reads like an error); each rank's output is in <run>/logs/rank<r>.log."""
    import re

    console = (uninterrupted.parent / "console.txt").read_text()
    noise = [
        line
        for line in console.splitlines()
        if re.search(r"(?i)warn|error|raytrainworker|traincontroller|ray instance", line)
    ]
    assert not noise, noise[:5]
    assert "final checkpoint:" in console and "distlm run" in console
    for rank in (0, 1):
        log = (uninterrupted / "logs" / f"rank{rank}.log").read_text()
        assert log.count(f"worker started: rank {rank},") == 1 and "DeepSpeed" in log, log[-2000:]


def _wait_for(predicate, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run ended (rc={proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _registered(run_dir: Path, name: str) -> bool:
    snapshot = run_dir / "checkpoints" / "checkpoint_manager_snapshot.json"
    return snapshot.exists() and f'"{name}"' in snapshot.read_text()


def _intact(directory: Path) -> bool:
    from distlm.checkpoint import CheckpointError, verify

    try:
        verify(str(directory))
        return True
    except CheckpointError:
        return False


def test_resume_after_interrupt_matches_uninterrupted(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    cmd = distlm_cmd("train", *LONG, f"hydra.run.dir={run_dir}")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # Killed as soon as the step-10 checkpoint is whole on disk, registered by Ray Train or not
    # (registration lags the write, and by then a tiny run may have saved step 30 too).
    try:
        _wait_for(lambda: _intact(run_dir / "checkpoints" / "step_00000010"), 300, "the step-10 checkpoint", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and the workers, at once
        proc.wait()
    assert not (run_dir / "checkpoints" / "step_00000030").exists()
    result = run_cli("train", *LONG, f"hydra.run.dir={run_dir}", "trainer.resume=auto")
    assert result.returncode == 0, result.stderr[-3000:]

    expected, resumed = _losses(uninterrupted), _losses(run_dir)
    assert sorted(resumed) == list(range(1, 31))
    for step in range(1, 31):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step
    # The W&B run continues under one id across the interruption: the id is carried in the
    # checkpoint, both offline records (before and after) bear it, and the resumed one logs
    # the steps after its checkpoint. (wandb buffers offline records in memory, so the SIGKILLed process's file
    # may hold no rows; metrics.jsonl, written by the driver, has them all.)
    dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2
    run_ids = {d.name.rsplit("-", 1)[-1] for d in dirs}
    assert len(run_ids) == 1
    checkpoint_state = torch.load(
        run_dir / "checkpoints" / "step_00000030" / "train_state_rank0.pt", weights_only=False
    )
    assert {checkpoint_state["train_state"]["tracker_run_id"]} == run_ids
    resumed_record = read_runs(run_dir / "wandb")[-1]
    assert {resumed_record["run_id"]} == run_ids
    logged = {row["_step"]: row["train/loss"] for row in resumed_record["history"] if "train/loss" in row}
    # It resumed from a checkpoint taken before the kill (step 10 or 20), not from scratch.
    assert min(logged) in (11, 21) and sorted(logged) == list(range(min(logged), 31))
    for step in logged:
        assert logged[step] == pytest.approx(resumed[step], rel=1e-6)
    assert resumed_record["config"]["trainer"]["max_steps"] == 30


def _run_and_kill_a_worker(run_dir: Path, *overrides: str):
    """Start a run, SIGKILL one Ray Train worker process after step 12, wait for the end."""
    import psutil

    cmd = distlm_cmd("train", *LONG, f"hydra.run.dir={run_dir}", *overrides)
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        _wait_for(
            lambda: _registered(run_dir, "step_00000010") and max(_losses(run_dir), default=0) >= 12,
            300,
            "step 12",
            proc,
        )
        # Only this run's workers: its local Ray (and so its workers) descend from the driver.
        workers = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline() or [])
        ]
        assert workers, "no Ray Train worker process found"
        workers[-1].send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, output


def test_worker_killed_mid_run_is_survived(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    returncode, output = _run_and_kill_a_worker(run_dir)
    assert returncode == 0, output[-3000:]
    expected, survived = _losses(uninterrupted), _losses(run_dir)
    assert sorted(survived) == list(range(1, 31))
    for step in range(1, 31):
        assert survived[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step
    assert (run_dir / "export" / "model.safetensors").exists()
    assert json.loads((run_dir / "summary.json").read_text())["restarts"] == 1


def test_run_stops_with_the_cause_when_retries_are_spent(tmp_path):
    returncode, output = _run_and_kill_a_worker(tmp_path / "run", "trainer.max_failures=0")
    assert returncode == 1, output[-3000:]
    last = [line for line in output.splitlines() if line.startswith("distlm: error:")]
    assert last and "training failed (infrastructure: 0 restarts" in last[-1], output[-3000:]
    assert "on rank" in last[-1] and "logs/failure.log" in last[-1], last[-1]
    assert not (tmp_path / "run" / "export").exists()


def test_resume_never_refuses_existing_run(uninterrupted):
    saved = {name: (uninterrupted / ".hydra" / name).read_text() for name in ["config.yaml", "overrides.yaml"]}
    assert "trainer.max_steps=30" in saved["overrides.yaml"]
    result = run_cli("train", *LONG, f"hydra.run.dir={uninterrupted}", "trainer.resume=never")
    assert result.returncode == 2
    assert "trainer.resume" in result.stderr
    # The refused command leaves the run's record of how it was made as it was.
    assert {name: (uninterrupted / ".hydra" / name).read_text() for name in saved} == saved


def test_export_command_rebuilds_export(uninterrupted, tmp_path):
    out = tmp_path / "export"
    result = run_cli("export", str(uninterrupted), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    # Only the newest trainer.keep_checkpoints (2) checkpoints are kept.
    assert sorted(p.name for p in (uninterrupted / "checkpoints").glob("step_*")) == ["step_00000020", "step_00000030"]
    info = json.loads((out / "distlm_export.json").read_text())
    assert info["step"] == 30 and info["probe_max_abs_diff"] < 1e-5
    bad = run_cli("export", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "not a directory" in bad.stderr


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_newest_checkpoint_resumes_from_the_newest_intact_one(uninterrupted, tmp_path, damage):
    """The finished run's newest checkpoint (step 30) gets its optimizer shard truncated to 100
    bytes, or is deleted while Ray Train's snapshot still lists it. `distlm check` says so; the same
    train command reports it by path and resumes from step 20, and steps 21-30 repeat the
    uninterrupted run's losses exactly."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    newest = run_dir / "checkpoints" / "step_00000030"
    if damage == "truncated":
        shard = sorted((newest / "state").glob("*optim_states.pt"))[-1]
        with shard.open("r+b") as f:
            f.truncate(100)
    else:
        shutil.rmtree(newest)
    check = run_cli("check", str(run_dir))
    assert check.returncode == 1, check.stdout
    assert "a resume starts from step 20" in " ".join(check.stdout.split())
    result = run_cli("train", *LONG, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    said = " ".join(result.stderr.split())
    assert "step_00000030" in said and ("does not exist" in said if damage == "deleted" else "100 bytes" in said)
    assert "resuming from" in said and "step_00000020, the newest intact checkpoint" in said
    expected, resumed = _losses(uninterrupted), _losses(run_dir)  # the resumed steps' records come last
    for step in range(21, 31):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step
    assert run_cli("check", str(run_dir)).returncode == 0  # the damaged one moved to checkpoints/damaged/
    assert list((run_dir / "checkpoints" / "damaged").glob("*/checkpoint_manager_snapshot.json"))


def test_a_stalled_rank_is_found_at_the_collective_timeout_and_the_run_restarts(uninterrupted, tmp_path):
    """Rank 1 sleeps through step 15 (test-only hook). Rank 0's collective times out after
    cluster.collective_timeout_s (30 s); the failure is an infrastructure one, reported with the
    rank that did not come and where it was; Ray Train restarts the group from the step-10
    checkpoint, and the run ends as the uninterrupted one did."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "DISTLM_TEST_FAULTS": json.dumps({"stall": {"rank": 1, "step": 15, "seconds": 300}})}
    result = subprocess.run(
        distlm_cmd("train", *LONG, f"hydra.run.dir={run_dir}", "cluster.collective_timeout_s=30"),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["restarts"] == 1
    log = (run_dir / "logs" / "failure.log").read_text()
    assert "infrastructure failure: rank 0" in log, log[-3000:]
    import re

    found = re.search(
        r"not in the collective: rank 1 at step 15 \(training, failures.py:\d+ before_step, for (\d+) s\)", log
    )
    assert found, log[-3000:]
    assert 30 <= int(found.group(1)) <= 30 + 20  # detected at the timeout, plus a step and a heartbeat
    expected, survived = _losses(uninterrupted), _losses(run_dir)
    for step in range(1, 31):
        assert survived[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step


# ZeRO-1 is left out: DeepSpeed saves and converts it with ZeRO-2's code (one optimizer,
# stage_1_and_2.py, one checkpoint layout), so it would take 2 minutes to test the same path.
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_resume_on_another_number_of_workers_continues_the_same_run(zero, tmp_path, ray_session):
    """Steps 1-4 on 2 workers, 5-8 on 1, 9-12 on 2 again, each run resuming the previous one's last
    checkpoint (a constant learning rate, so that stopping at step 4 or 8 changes no schedule): the
    driver converts the checkpoint to DeepSpeed's universal form when the number of workers
    changed, and the 12 losses are those of one plain PyTorch loop over the same global batches,
    so the weights and the Adam moments carried over."""
    run_dir = tmp_path / "run"
    common = [f"zero={zero}", "trainer.checkpoint_every=4", "trainer.eval_every=100", "trainer.lr=3e-3"]
    common += ["trainer.keep_checkpoints=3"]
    common += ["trainer.micro_batch_size=4", "trainer.global_batch_size=8"]
    common += ["trainer.warmup_steps=0", "trainer.min_lr_ratio=1.0"]
    for workers, steps in [(2, 4), (1, 8), (2, 12)]:
        cfg, _, records = train_in_process(
            [*common, f"cluster.num_workers={workers}", f"trainer.max_steps={steps}"], run_dir
        )
    losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    assert sorted(losses) == list(range(1, 13))
    # Global batches of another size would change the data order: refused before any worker starts.
    from distlm.config import ConfigError

    auto = [o for o in common if not o.startswith("trainer.global_batch_size")]  # auto: 1 x 4
    with pytest.raises(ConfigError, match="resume with trainer.global_batch_size=8"):
        train_in_process([*auto, "cluster.num_workers=1", "trainer.max_steps=16"], run_dir)
    assert [losses[s] for s in range(1, 13)] == pytest.approx(reference_losses(cfg, 12), rel=2e-5, abs=2e-5)
    checkpoints = run_dir / "checkpoints"
    # Each resume's checkpoint was converted (2 -> 1 and 1 -> 2); the last one is 2 workers' own.
    for step, workers in [(4, 2), (8, 1), (12, 2)]:
        assert json.loads((checkpoints / f"step_{step:08d}" / "manifest.json").read_text())["world_size"] == workers
        assert (checkpoints / f"step_{step:08d}" / "universal" / "state" / "zero").is_dir() == (step < 12)
