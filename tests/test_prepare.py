"""`distlm prepare` as a user runs it: killed half-way, the same command finishes the job and
the cache is the one an uninterrupted run writes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO, assert_same_cache, code_doc, distlm_cmd, run_cli

pytestmark = pytest.mark.slow


def _corpus(path: Path, docs: int) -> Path:
    path.write_text("".join(json.dumps({"text": code_doc(i) * (1 + i % 4)}) + "\n" for i in range(docs)))
    return path


def test_killed_prepare_resumes_to_the_same_cache(tmp_path):
    corpus = _corpus(tmp_path / "corpus.jsonl", 3000)  # ~1.8 MB: about 36 shards of 0.05 MB
    data = ["data=jsonl", f"data.paths=[{corpus}]", "data.vocab_size=300", "data.shard_mb=0.05", "data.engine=local"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        distlm_cmd("prepare", *data, f"data.cache_dir={killed}"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while len(list(killed.glob(".*.partial/shards/*.json"))) < 3:
        assert proc.poll() is None, f"prepare ended before it could be killed: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no shard was finished within 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not list(killed.glob("*/COMPLETE")), "a killed build must not publish a cache"

    again = run_cli("prepare", *data, f"data.cache_dir={killed}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused from an interrupted run" in again.stdout
    (resumed,) = killed.glob("*/COMPLETE")
    build = json.loads((resumed.parent / "build.json").read_text())
    assert 3 <= build["reused_shards"] < build["shards"]
    assert not list(killed.glob(".*")) or [p.name for p in killed.glob(".*")] == [".file-digests.json"]

    fresh = run_cli("prepare", *data, f"data.cache_dir={tmp_path / 'fresh'}")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    (uninterrupted,) = (tmp_path / "fresh").glob("*/COMPLETE")
    assert_same_cache(uninterrupted.parent, resumed.parent)

    hit = run_cli("prepare", *data, f"data.cache_dir={killed}")
    assert hit.returncode == 0 and hit.stdout.startswith("already prepared: ")
