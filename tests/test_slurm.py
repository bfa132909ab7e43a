"""`distlm launch slurm` against a real Slurm (munged, slurmctld, slurmd on this machine).

The daemons are set up once per session (tests/helpers/slurm.py: installed from Debian's
packages when missing) and stopped by process id at the end. A setup failure fails the
tests with its reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from helpers import TINY, run_cli
from helpers.slurm import SlurmCluster

from distlm.launch.slurm import Job, follow, job_state
from distlm.report import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

# Enough steps (of a model big enough to take visible time) that a SIGTERM lands mid-run;
# checkpoints only at the end, so one at any other step can only come from the SIGTERM path.
RUN = [
    *TINY,
    "tracking=disabled",
    "model.hidden_size=128",
    "model.num_layers=4",
    "trainer.micro_batch_size=8",
    "trainer.global_batch_size=16",
    "trainer.max_steps=60",
    "trainer.checkpoint_every=60",
    "trainer.eval_every=30",
]


@pytest.fixture(scope="session")
def slurm():
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="dlm-slurm-")))
    try:
        cluster.start()
        # The Slurm commands here, the launcher and the jobs (sbatch exports it) read SLURM_CONF.
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SLURM_CONF", str(cluster.conf))
            yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def train_losses(run_dir: Path):
    return {r["step"]: r["train/loss"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if "train/loss" in r}


def test_dry_run_is_a_script_slurm_accepts(slurm, tmp_path):
    """A 4-node, 8-GPU script parses: Slurm only finds that this 1-node cluster cannot run it;
    the same script at this machine's size would be scheduled."""
    overrides = [
        "cluster.nodes=4",
        "cluster.gpus_per_node=8",
        "trainer.global_batch_size=64",
        "cluster.slurm.time=02:00:00",
    ]
    result = run_cli("launch", "slurm", "--dry-run", *TINY, *overrides, f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert result.returncode == 0, result.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(result.stdout)
    check = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)
    assert check.returncode != 0 and "Requested node configuration is not available" in check.stderr, check.stderr
    small = result.stdout.replace("--nodes=4", "--nodes=1").replace("--gpus-per-node=8", "--gpus-per-node=0")
    script.write_text(small)
    check = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and f"on nodes {slurm.node}" in check.stderr, check.stderr


@pytest.fixture(scope="module")
def completed(slurm, tmp_path_factory):
    """A tiny run submitted with `distlm launch slurm --follow`, to its end."""
    run_dir = tmp_path_factory.mktemp("slurm") / "run"
    result = run_cli("launch", "slurm", "--follow", *RUN, f"hydra.run.dir={run_dir}", timeout=900)
    return run_dir, result


def test_job_trains_to_the_end(completed):
    run_dir, result = completed
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = result.stdout.splitlines()[0]
    assert job_state(job_id)["JobState"] == "COMPLETED"
    # --follow printed the job's log: Ray came up on the allocation and training finished.
    assert "distlm: Ray cluster of 1 node(s)" in result.stdout
    assert "distlm: training exited with code 0" in result.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000060"]
    assert sorted(train_losses(run_dir)) == list(range(1, 61))
    assert (run_dir / "export" / "model.safetensors").exists() and (run_dir / "slurm.sbatch").exists()
    placement = json.loads((run_dir / "placement.json").read_text())
    assert len(placement) == 2 and all(p["master_addr"] == placement[0]["node_ip"] for p in placement)


def test_failed_job_reaches_the_user(slurm, tmp_path):
    # Composes (any name could be a model type) but fails on the cluster when the driver builds the model.
    result = run_cli("launch", "slurm", "--follow", *RUN, "model.arch=no_such_arch", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2, result.stdout[-3000:]
    job_id = result.stdout.splitlines()[0]
    state = job_state(job_id)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0"
    errors = [line for line in result.stdout.splitlines() if line.startswith("distlm: error:")]
    assert errors and "model.arch='no_such_arch'" in errors[-1], result.stdout[-3000:]
    assert "distlm: training exited with code 2" in result.stdout


def test_sigterm_checkpoints_and_the_requeued_job_resumes(slurm, completed, tmp_path):
    """Two SIGTERMs to one job, each a case of its own: first what Slurm sends before preemption
    or the time limit (`--batch`: the batch script, as `#SBATCH --signal=B:TERM@<grace>` does),
    then, once the requeued job trains again, the user's kill (Slurm signals the job steps, the
    Ray nodes, whose wrapper relays it). Each time the run checkpoints at the step it reached,
    the job is requeued and resumes from that checkpoint."""
    run_dir = tmp_path / "run"
    submitted = run_cli("launch", "slurm", *RUN, "trainer.keep_checkpoints=3", f"hydra.run.dir={run_dir}", timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    job = Job(submitted.stdout.strip(), run_dir)
    last_step = 0
    for restarts, scancel in enumerate((["--batch", "--signal=TERM"], ["--signal=TERM"]), 1):
        wait_for(
            lambda after=last_step: max(train_losses(run_dir), default=0) > after, 600, f"a step after step {last_step}"
        )
        subprocess.run(["scancel", *scancel, job.job_id], check=True, timeout=60)
        wait_for(lambda n=restarts: job_state(job.job_id)["Restarts"] == str(n), 300, f"requeue {restarts}")
        last_step = max(train_losses(run_dir))
    # Slurm holds the requeued job for cred_expire (10 s in the test cluster) and starts it.
    with open(tmp_path / "follow.log", "w") as out:
        assert follow(job, out=out, poll_s=1) == 0, job.log.read_text()[-3000:]

    log = job.log.read_text()
    steps = [
        int(line.split("at step ")[1].split()[0]) for line in log.splitlines() if "stopped by SIGTERM at step" in line
    ]
    assert len(steps) == 2 and 1 <= steps[0] < steps[1] < 60, log[-3000:]
    assert log.count("requeueing job") == 2 and "(restart 1)" in log and "(restart 2)" in log, log[-3000:]
    ray_logs = "".join(f.read_text() for f in run_dir.glob(f"slurm-{job.job_id}-ray-*.out"))
    assert "SIGTERM to the Ray node step: relayed" in ray_logs, ray_logs[-3000:]
    # The SIGTERM checkpoints (not periodic ones) are what the requeued jobs resumed from: each
    # step ran once, and the losses equal those of the uninterrupted run.
    expected_checkpoints = [f"step_{s:08d}" for s in (*steps, 60)]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == expected_checkpoints
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(s for s in logged if s > 0) == list(range(1, 61)), logged
    expected = train_losses(completed[0])
    resumed = train_losses(run_dir)
    for s in range(1, 61):
        assert resumed[s] == pytest.approx(expected[s], rel=1e-6, abs=1e-6), s
    assert (run_dir / "export" / "model.safetensors").exists()
    assert job_state(job.job_id)["JobState"] == "COMPLETED"
