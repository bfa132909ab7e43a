"""Training across two Ray nodes, started on this machine the way the sbatch script starts them
on a cluster (`ray start --head`, then `ray start --address`). The second node has its own
IP address (127.0.0.3), so the test can tell which node's address the workers rendezvoused at.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import (
    TINY,
    assert_same_cache,
    code_doc,
    compose_cfg,
    reference_losses,
    reference_streams,
    run_cli,
    token_stream,
)

from distlm.report import read_metrics

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SECOND_NODE_IP = "127.0.0.3"


def _helper(*args: str, env) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "distlm.launch.ray_nodes", *args], env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


@pytest.fixture(scope="module")
def two_nodes():
    """A two-node Ray cluster of our own: its own auth token, ports and temp dir (short, for
    Ray's socket paths). The nodes are stopped by process id at the end."""
    temp = Path(tempfile.mkdtemp(prefix="dlm-ray-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    address = _helper("address", env=env)
    nodes: list[subprocess.Popen] = []

    def start(*args: str) -> None:
        log = open(temp / f"node{len(nodes)}.log", "w")
        cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--num-cpus=1", f"--temp-dir={temp}"]
        cmd += ["--dashboard-agent-listen-port=0", "--object-store-memory=200000000", *args]
        nodes.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))

    try:
        host, port = address.rsplit(":", 1)
        start("--head", f"--node-ip-address={host}", f"--port={port}", "--include-dashboard=false")
        start(f"--address={address}", f"--node-ip-address={SECOND_NODE_IP}")
        _helper("wait", address, "2", "300", *(str(p.pid) for p in nodes), env=env)
        yield address, env
    finally:
        for node in reversed(nodes):  # workers first; the head drains (up to 30 s) unless killed
            node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=5)
            except subprocess.TimeoutExpired:
                node.kill()  # its reaper process stops the node's Ray processes
                node.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_zero2_workers_on_two_nodes(two_nodes, tmp_path):
    address, env = two_nodes
    run_dir = tmp_path / "run"
    overrides = ["zero=zero2", "tracking=disabled", "cluster.placement_strategy=STRICT_SPREAD"]
    result = run_cli("train", *TINY, *overrides, f"cluster.address={address}", f"hydra.run.dir={run_dir}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    # One worker on each node, and both used the rank-0 worker's node address for the process
    # group (Ray Train's rendezvous): the nodes' addresses differ, so a fixed one could not match.
    placement = json.loads((run_dir / "placement.json").read_text())
    assert [p["rank"] for p in placement] == [0, 1]
    assert placement[0]["node_id"] != placement[1]["node_id"]
    assert {p["node_ip"] for p in placement} == {address.rsplit(":", 1)[0], SECOND_NODE_IP}
    assert {p["master_addr"] for p in placement} == {placement[0]["node_ip"]}

    # Two nodes train exactly like one process: same losses as the single-process reference.
    cfg = compose_cfg(overrides, run_dir)
    losses = [r["train/loss"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if "train/loss" in r]
    assert losses == pytest.approx(reference_losses(cfg, cfg.trainer.max_steps), rel=2e-5, abs=2e-5)
    assert (run_dir / "export" / "model.safetensors").exists()


def test_prepare_with_ray_data_on_two_nodes(two_nodes, tmp_path):
    """`distlm prepare` joins the cluster and tokenizes with Ray Data tasks on both nodes; the
    cache is byte for byte the one this process writes alone, and its streams are each
    document encoded on its own, in corpus order and split."""
    from distlm.data import prepare_data

    address, env = two_nodes
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": code_doc(i) * (1 + i % 3)}) + "\n" for i in range(1500)))
    data = ["data=jsonl", f"data.paths=[{corpus}]", "data.vocab_size=300", "data.shard_mb=0.05"]
    result = run_cli(
        "prepare", *data, "data.engine=ray", f"data.cache_dir={tmp_path / 'ray'}", f"cluster.address={address}", env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ray on 2 nodes" in result.stdout
    (ray_cache,) = (tmp_path / "ray").glob("*/COMPLETE")
    build = json.loads((ray_cache.parent / "build.json").read_text())
    assert build["engine"] == "ray" and set(build["nodes"]) == {address.rsplit(":", 1)[0], SECOND_NODE_IP}
    assert sum(build["nodes"].values()) == build["shards"] > 2

    cfg = compose_cfg([*data, "data.engine=local", f"data.cache_dir={tmp_path / 'local'}"], tmp_path / "run")
    local = prepare_data(cfg.data, seed=cfg.trainer.seed, progress=False)
    assert_same_cache(Path(local.train_path).parent, ray_cache.parent)
    expected = reference_streams(cfg.data, local.tokenizer_dir, cfg.trainer.seed)
    assert token_stream(local.train_path, local.dtype) == expected[False]
    assert token_stream(local.val_path, local.dtype) == expected[True] != []
