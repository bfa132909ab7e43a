"""Every conf/ file composes; every validation error exits 2 with a one-line message, fast."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import REPO, run_cli

from distlm.config import Config, ConfigError, compose

CONF = REPO / "conf"
GROUP_FILES = sorted(p for p in CONF.glob("*/*.yaml"))


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_conf_file_composes(path: Path, tmp_path, monkeypatch):
    group, option = path.parent.name, path.stem
    overrides = [f"{group}={option}", f"hydra.run.dir={tmp_path}"]
    if group == "data" and option != "stdlib_code":
        sample = tmp_path / f"sample.{option}"
        sample.write_text("x")
        overrides.append(f"data.paths=[{sample}]")
    if option == "wandb_online":
        monkeypatch.setenv("WANDB_API_KEY", "test-key-never-sent")
    # Options that need something from the user to be complete.
    if (group, option) == ("task", "jsonl"):
        sample = tmp_path / "task.jsonl"
        sample.write_text('{"prompt": "a", "completion": "b"}\n')
        overrides.append(f"task.tasks.mine.path={sample}")
    if (group, option) == ("adapter", "per_task_lora"):
        overrides.append("task=suite")
    if (group, option) == ("task", "agent"):
        overrides.append("adapter=per_task_lora")  # the router reads the base with adapters off
    if (group, option) == ("experiment", "multitask"):
        overrides.append(f"init_from={tmp_path}")
    cfg, _ = compose(overrides)
    assert isinstance(cfg, Config)
    assert cfg.run_dir == str(tmp_path)
    node = getattr(cfg, group, None)
    if hasattr(node, "name"):
        assert node.name == option


def test_all_groups_present():
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert {"model", "data", "zero", "cluster", "tracking", "trainer", "task", "adapter", "experiment"} <= groups


def test_overrides_reach_typed_config(tmp_path):
    cfg, _ = compose(["model=tiny", "zero=zero3", "trainer.max_steps=50", f"hydra.run.dir={tmp_path}"])
    assert (cfg.model.name, cfg.zero.stage, cfg.trainer.max_steps) == ("tiny", 3, 50)
    assert isinstance(cfg.trainer.max_steps, int)


def test_the_global_batch_is_auto_unless_given():
    """auto: workers x micro batch, so any number of workers composes (the issue's 32 workers); a
    number is kept as it is on any number of workers."""
    cfg, _ = compose(["cluster=slurm", "cluster.nodes=4", "cluster.gpus_per_node=8"])
    assert cfg.trainer.global_batch_size == cfg.cluster.num_workers * cfg.trainer.micro_batch_size == 32 * 8
    cfg, _ = compose(["cluster.num_workers=1", "trainer.micro_batch_size=4"])
    assert cfg.trainer.global_batch_size == 4
    cfg, _ = compose(["cluster.num_workers=1", "trainer.micro_batch_size=4", "trainer.global_batch_size=16"])
    assert cfg.trainer.global_batch_size == 16


def test_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, _ = compose(["hydra.run.dir=relative/run", "data.cache_dir=cache"])
    assert cfg.run_dir == str(tmp_path / "relative" / "run")
    assert cfg.data.cache_dir == str(tmp_path / "cache")


BAD = [
    (["trainer.max_stepz=5"], "trainer.max_stepz"),
    (["+trainer.foo=1"], "trainer.foo"),
    (["trainer.max_steps=lots"], "trainer.max_steps"),
    (["zero.stage=4"], "zero.stage"),
    (["trainer.global_batch_size=10"], "trainer.global_batch_size"),
    (["cluster.num_workers=3", "trainer.global_batch_size=8"], "trainer.global_batch_size"),
    (["trainer.global_batch_size=big"], "trainer.global_batch_size"),
    (["data=jsonl", "data.paths=[/no/such/file.jsonl]"], "data.paths"),
    (["data=text"], "data.paths"),
    (["model=no_such_model"], "model"),
    (["zero.offload_params=true"], "zero.offload_params"),
    (["cluster.precision=fp8"], "cluster.precision"),
    (["model.hidden_size=100", "model.num_heads=3"], "model.hidden_size"),
    (["data.engine=spark"], "data.engine"),
    (["data.shard_mb=0"], "data.shard_mb"),
    (["data=hf"], "data.paths"),
    (["trainer.eval_batches=0"], "trainer.eval_batches"),
    (["trainer.min_lr_ratio=1.5"], "trainer.min_lr_ratio"),
    (["trainer.lr=0"], "trainer.lr"),
    (["data.val_fraction=0"], "data.val_fraction"),
    (["zero=zero3_offload", "task=suite"], "zero.offload_optimizer"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[b[1] + ":" + b[0][-1] for b in BAD])
def test_validation_error_in_process(overrides, key):
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    message = str(e.value)
    assert key in message
    assert "\n" not in message


@pytest.mark.parametrize("overrides,key", BAD[:8], ids=[b[1] for b in BAD[:8]])
def test_cli_validation_exits_2_fast(overrides, key, tmp_path):
    start = time.perf_counter()
    result = run_cli("train", *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("distlm: error:") and key in lines[0]
    assert elapsed < 3.0, f"validation took {elapsed:.1f}s"
    assert not (tmp_path / "run").exists(), "a rejected run must not create its run dir"


def test_prepare_validation_exits_2():
    result = run_cli("prepare", "data=jsonl", "data.paths=[/no/such/file.jsonl]")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "data.paths" in lines[0], result.stderr


def test_cli_prints_config():
    result = run_cli("train", "--cfg", "model=tiny")
    assert result.returncode == 0
    assert "hidden_size: 64" in result.stdout


@pytest.mark.parametrize(
    "overrides, warmup",
    [
        (["trainer.max_steps=10"], 1),
        (["experiment=multitask", "init_from=null", "trainer.max_steps=20"], 2),
        (["trainer.max_steps=5"], 0),
    ],
)
def test_a_short_run_composes_with_the_presets_warmup(overrides, warmup, capsys):
    """The smoke test anyone types first: a preset's warmup longer than the run is clamped to a
    tenth of it, with a one-line note."""
    cfg, _ = compose(overrides)
    assert cfg.trainer.warmup_steps == warmup
    assert "distlm: note: trainer.warmup_steps=" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="trainer.warmup_steps=-1 must be at least 0"):
        compose([*overrides, "trainer.warmup_steps=-1"])
