"""Which Ray a run gets: the one cluster.address or RAY_ADDRESS names (answering, or a clear error
instead of Ray's minutes of waiting), the one `ray start` runs on this machine (as ray.init()
joins it), or one of the run's own (`cluster.address=local`, or a `ray start` record of a Ray
that is gone). Each test keeps Ray's record in a temp dir of its own (RAY_TMPDIR)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import TINY, run_cli

from distlm.config import ConfigError
from distlm.runtime import free_port, ray_target

BIN = Path(sys.executable).parent


@pytest.fixture
def ray_tmp(monkeypatch):
    temp = Path(tempfile.mkdtemp(prefix="dlm-rt-", dir="/tmp"))  # short: Ray's socket paths
    monkeypatch.setenv("RAY_TMPDIR", str(temp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


def test_a_named_ray_that_does_not_answer_is_a_config_error(ray_tmp, monkeypatch):
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=rf"no Ray answers at {dead} \(cluster.address\).*cluster.address=local"):
        ray_target(dead)
    monkeypatch.setenv("RAY_ADDRESS", dead)
    with pytest.raises(ConfigError, match=rf"no Ray answers at {dead} \(RAY_ADDRESS\)"):
        ray_target(None)
    assert ray_target("local").address is None  # local wins over RAY_ADDRESS
    assert ray_target("ray://head:10001").address == "ray://head:10001"  # Ray Client: left to Ray


def test_a_stale_ray_start_record_is_passed_over_with_a_note(ray_tmp):
    assert ray_target(None).address is None and not ray_target(None).note
    dead = f"127.0.0.1:{free_port()}"
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    target = ray_target(None)
    assert target.address is None
    assert dead in target.note and "no longer answers" in target.note and "ray stop" in target.note


@pytest.mark.slow
def test_a_run_joins_the_ray_that_ray_start_runs_here(ray_tmp, tmp_path):
    """Before, `distlm train` with a `ray start` Ray on the machine failed in ray.init ("num_cpus
    must not be provided"). Now it joins it (as ray.init() would), and `local` keeps its own."""
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=false"]
        + ["--disable-usage-stats", f"--port={free_port()}", "--object-store-memory=200000000"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        record = ray_tmp / "ray" / "ray_current_cluster"  # where ray.init() looks
        deadline = time.monotonic() + 120
        while not (record.exists() and ray_target(None).address) and head.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        recorded = record.read_text().strip()
        assert ray_target(None).address == recorded
        (session,) = (ray_tmp / "ray").glob("session_2*")  # the head's (the probes' own Ray adds another)

        probe = (
            "import sys, ray; from distlm.runtime import init_ray;"
            "print(init_ray(sys.argv[1] if len(sys.argv) > 1 else None, 1, quiet=True),"
            " ray.get_runtime_context().gcs_address)"
        )
        joined = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        own = subprocess.run(
            [sys.executable, "-c", probe, "local"], env=env, capture_output=True, text=True, timeout=120
        )
        assert joined.stdout.split() == ["False", recorded], joined.stderr[-2000:]
        assert own.stdout.split()[0] == "True" and own.stdout.split()[1] != recorded, own.stderr[-2000:]

        run_dir = tmp_path / "run"
        overrides = ["tracking=disabled", f"hydra.run.dir={run_dir}"]
        result = run_cli("train", *TINY, *overrides, env={**env, "COLUMNS": "400"})  # console lines unwrapped
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"joined the Ray that `ray start` runs at {recorded}" in result.stdout + result.stderr
        assert json.loads((run_dir / "summary.json").read_text())["final_val_loss"] is not None
        # The run's workers were that Ray's: Ray Train's worker logged into the head's session.
        logs = "".join(p.read_text(errors="replace") for p in (session / "logs").glob("*") if p.is_file())
        assert "RayTrainWorker" in logs
    finally:  # this Ray only (`ray stop` would stop every Ray on the machine)
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
