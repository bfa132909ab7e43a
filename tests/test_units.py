"""Fast unit tests: model presets, runtime resolution, ds_config, LR schedule, checkpoint checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distlm.checkpoint import CheckpointError, TrainState, read_train_state, verify, write_checksums, write_train_state
from distlm.config import ClusterConfig, ConfigError, TrainerConfig, ZeroConfig, compose
from distlm.engine import build_ds_config, lr_lambda
from distlm.models import build_model, flops_per_token
from distlm.runtime import Runtime, resolve_runtime


@pytest.mark.parametrize("preset", ["tiny", "small", "llama", "qwen2", "gpt2"])
def test_model_presets_build_and_run(preset, tmp_path):
    cfg, _ = compose([f"model={preset}", f"hydra.run.dir={tmp_path}"])
    model = build_model(cfg.model, vocab_size=512, seq_len=32, eos_token_id=0, seed=0)
    assert model.config.model_type == cfg.model.arch
    assert model.config.hidden_size == cfg.model.hidden_size
    assert model.config.num_hidden_layers == cfg.model.num_layers
    ids = torch.randint(0, 512, (2, 32))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 32, 512)
    # A fresh model predicts roughly uniformly: loss near ln(vocab).
    assert abs(out.loss.item() - math.log(512)) < 1.0
    assert flops_per_token(model, 32) > 6 * 512 * cfg.model.hidden_size
    # A router step is the forward alone through its layers: a third of their training FLOPs, so
    # through every layer 1/3 of the whole model's less the parameters outside the layers
    # (embeddings, final norm, an untied output head).
    from distlm.heads import router_flops_per_token

    layers = cfg.model.num_layers
    blocks = model.base_model.layers if hasattr(model.base_model, "layers") else model.base_model.h  # gpt2: h
    outside = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in blocks.parameters())
    assert 3 * router_flops_per_token(model, 32, layers) == pytest.approx(flops_per_token(model, 32) - 6 * outside)
    assert router_flops_per_token(model, 32, 1) == pytest.approx(router_flops_per_token(model, 32, layers) / layers)
    # What every checkpoint and export writes: transformers validates the config as it saves it.
    model.config.save_pretrained(tmp_path / "saved")
    assert type(model.config).from_pretrained(tmp_path / "saved").num_hidden_layers == cfg.model.num_layers


def test_random_init_is_identical_for_the_same_seed(tmp_path):
    cfg, _ = compose(["model=tiny", f"hydra.run.dir={tmp_path}"])
    a = build_model(cfg.model, 256 + 8, 16, 0, seed=3)
    b = build_model(cfg.model, 256 + 8, 16, 0, seed=3)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na


def test_unknown_arch_is_a_config_error(tmp_path):
    cfg, _ = compose(["model=tiny", "model.arch=not_a_model", f"hydra.run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="model.arch"):
        build_model(cfg.model, 256 + 8, 16, 0, seed=0)


def test_the_driver_checks_a_model_config_once_then_remembers_it(tmp_path):
    """The driver refuses a model transformers cannot build before any worker starts; a config
    that passed is remembered in the data cache, so the next start does without importing
    transformers (seconds of every start). A refused config is never remembered."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from distlm.driver import check_model_config

    common = [f"data.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run"]
    data = SimpleNamespace(vocab_size=264, eos_token_id=0)
    remembered = lambda: sorted(p.name for p in (tmp_path / "cache" / "model_configs").glob("*"))  # noqa: E731
    cfg, _ = compose(["model=tiny", *common])
    check_model_config(cfg, data)
    assert len(remembered()) == 1
    fresh_start = (
        "import sys; from types import SimpleNamespace; from distlm.config import compose; "
        "from distlm.driver import check_model_config; "
        f"cfg, _ = compose({['model=tiny', *common]!r}); "
        "check_model_config(cfg, SimpleNamespace(vocab_size=264, eos_token_id=0)); "
        "assert 'transformers' not in sys.modules, 'the remembered check imported transformers'"
    )
    subprocess.run([sys.executable, "-c", fresh_start], check=True, timeout=120)
    bad, _ = compose(["model=tiny", "model.arch=not_a_model", *common])
    for _ in range(2):
        with pytest.raises(ConfigError, match="model.arch"):
            check_model_config(bad, data)
    assert len(remembered()) == 1
    # Another vocabulary is another config: checked (and remembered) on its own.
    check_model_config(compose(["model=tiny", *common])[0], SimpleNamespace(vocab_size=300, eos_token_id=0))
    assert len(remembered()) == 2


def test_runtime_follows_hardware():
    auto = ClusterConfig()
    assert resolve_runtime(auto, cuda_available=False) == Runtime("cpu", "gloo", "fp32")
    assert resolve_runtime(auto, cuda_available=True) == Runtime("cuda", "nccl", "bf16")
    assert resolve_runtime(ClusterConfig(precision="fp32"), cuda_available=True).precision == "fp32"
    with pytest.raises(ConfigError, match="cluster.device"):
        resolve_runtime(ClusterConfig(device="cuda"), cuda_available=False)
    with pytest.raises(ConfigError, match="cluster.backend"):
        resolve_runtime(ClusterConfig(backend="nccl"), cuda_available=False)


def test_ds_config_per_stage():
    tr = TrainerConfig(micro_batch_size=2, global_batch_size=16, grad_clip=0.5)
    cpu, gpu = Runtime("cpu", "gloo", "fp32"), Runtime("cuda", "nccl", "bf16")
    c = build_ds_config(ZeroConfig(stage=2), tr, cpu, world_size=2)
    assert c["gradient_accumulation_steps"] == 4 and c["train_batch_size"] == 16
    assert c["zero_optimization"]["stage"] == 2 and c["gradient_clipping"] == 0.5
    assert "bf16" not in c
    c = build_ds_config(ZeroConfig(stage=3, offload_optimizer=True, offload_params=True), tr, gpu, world_size=8)
    assert c["bf16"] == {"enabled": True}
    assert c["gradient_accumulation_steps"] == 1
    assert c["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert c["zero_optimization"]["offload_optimizer"]["pin_memory"] is True
    c = build_ds_config(ZeroConfig(stage=1, extra={"reduce_scatter": False}), tr, cpu, world_size=1)
    assert c["zero_optimization"]["reduce_scatter"] is False
    # ZeRO-0 in fp32: distlm's Engine clips (one norm a step); DeepSpeed's mixed-precision optimizers clip themselves.
    assert build_ds_config(ZeroConfig(stage=0), tr, cpu, world_size=2)["gradient_clipping"] == 0.0
    assert build_ds_config(ZeroConfig(stage=0), tr, gpu, world_size=2)["gradient_clipping"] == 0.5


def test_lr_schedule_warmup_then_cosine():
    tr = TrainerConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = lr_lambda(tr)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_checkpoint_verification(tmp_path):
    (tmp_path / "state").mkdir()
    state = TrainState(step=7, sampler={"position": 7}, tracker_run_id="abc")
    write_train_state(str(tmp_path), state, rank=0, world_size=2, zero_stage=2)
    write_checksums(str(tmp_path), 0)
    with pytest.raises(CheckpointError, match="checksums_rank1.json missing"):  # rank 1 never finished
        verify(str(tmp_path))
    write_train_state(str(tmp_path), state, rank=1, world_size=2, zero_stage=2)
    write_checksums(str(tmp_path), 1)
    assert verify(str(tmp_path))["step"] == 7
    assert read_train_state(str(tmp_path), rank=1) == state
    assert read_train_state(str(tmp_path), rank=3) == state  # a run resumed on 4 workers: rank 0's
    with pytest.raises(CheckpointError, match="manifest"):
        verify(str(tmp_path / "state"))


def _fake_checkpoint(checkpoints, step: int):
    d = checkpoints / f"step_{step:08d}"
    (d / "state").mkdir(parents=True)
    (d / "state" / "shard.pt").write_bytes(b"x" * 64)
    for rank in range(2):
        write_train_state(str(d), TrainState(step=step), rank=rank, world_size=2, zero_stage=2)
        write_checksums(str(d), rank)
    return d


def test_a_checkpoint_saved_but_never_registered_is_resumed_from(tmp_path):
    """A run that fails right after saving a checkpoint may end before Ray Train registers it: the
    next run starts from it (with no snapshot at all, or one listing only older checkpoints), never
    from scratch or from an older one; a damaged newest one is passed over."""
    import json

    from distlm.checkpoint import SNAPSHOT, find_resumable

    checkpoints, said = tmp_path / "checkpoints", []
    assert find_resumable(checkpoints, said.append) is None  # nothing saved: a fresh start
    _fake_checkpoint(checkpoints, 4)
    assert find_resumable(checkpoints, said.append) == str(checkpoints / "step_00000004")
    assert "before Ray Train registered it" in said[-1]
    (checkpoints / SNAPSHOT).write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": "step_00000004"}]}))
    assert find_resumable(checkpoints, said.append) is None  # Ray Train's own newest: it resumes by itself
    _fake_checkpoint(checkpoints, 8)
    assert find_resumable(checkpoints, said.append) == str(checkpoints / "step_00000008")
    assert list(checkpoints.glob(f"superseded/*/{SNAPSHOT}"))  # Ray's snapshot set aside, so it does not win
    (checkpoints / SNAPSHOT).write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": "step_00000004"}]}))
    with (checkpoints / "step_00000008" / "state" / "shard.pt").open("r+b") as f:
        f.truncate(10)
    assert find_resumable(checkpoints, said.append) == str(checkpoints / "step_00000004")
    assert "shard.pt has 10 bytes" in " ".join(said) and list(checkpoints.glob("damaged/*/step_00000008"))


def test_records_lost_by_a_killed_driver_come_back_from_the_checkpoints(tmp_path):
    """Each checkpoint holds rank 0's records since the previous one; a driver killed after a
    checkpoint was saved but before it wrote those steps gets them back, once, in step order."""
    import json

    from distlm.checkpoint import recover_records, write_records
    from distlm.report import read_metrics

    checkpoints, metrics = tmp_path / "checkpoints", tmp_path / "metrics.jsonl"
    for step in (10, 20):
        (checkpoints / f"step_{step:08d}").mkdir(parents=True)
        write_records(
            str(checkpoints / f"step_{step:08d}"),
            [{"step": s, "train/loss": float(s)} for s in range(step - 9, step + 1)],
        )
    metrics.write_text("".join(json.dumps({"step": s, "train/loss": float(s)}) + "\n" for s in range(1, 18)))
    assert recover_records(checkpoints, metrics) == 3
    assert [r["step"] for r in read_metrics(str(metrics))] == list(range(1, 21))
    assert recover_records(checkpoints, metrics) == 0


@pytest.mark.parametrize(
    "overrides, written, stage",
    [
        ([], None, 0),  # one worker: nothing to shard
        (["zero=zero1"], None, 0),
        (["zero.shard_single_worker=true"], None, 2),
        (["zero=zero3"], None, 3),  # ZeRO-3 builds models straight into partitions: always kept
        (["zero.offload_optimizer=true"], None, 2),
        (["cluster.num_workers=2"], None, 2),
        (["cluster.num_workers=2"], (0, 1), 0),  # a one-worker run's checkpoint is whole: goes on without ZeRO
        ([], (2, 2), 2),  # a ZeRO-2 checkpoint of 2 workers resumed on 1: its universal form, under ZeRO-2
    ],
)
def test_one_worker_trains_without_zero_and_its_resumes_follow_the_checkpoint(overrides, written, stage, tmp_path):
    import json

    from distlm.driver import _single_worker_zero

    cfg, _ = compose(["cluster.num_workers=1", "trainer.global_batch_size=16", *overrides])
    checkpoint = None
    if written is not None:
        checkpoint = tmp_path / "step_00000004"
        checkpoint.mkdir()
        (checkpoint / "manifest.json").write_text(json.dumps({"zero_stage": written[0], "world_size": written[1]}))
    note = _single_worker_zero(cfg, None if checkpoint is None else str(checkpoint))
    assert cfg.zero.stage == stage
    configured = {"zero=zero1": 1, "zero=zero3": 3}.get(next(iter(overrides), ""), 2)
    assert bool(note) == (stage != configured)  # the console says when the stage differs from the config


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_the_export_check_passes_summation_noise_and_refuses_a_wrong_export(scale, tmp_path):
    """The export is reloaded with plain transformers and its logits compared with the trained
    model's (the probe): noise of summation order passes, scaled with the logits' magnitude; an
    export off by a tenth of a unit does not."""
    from distlm.export import PROBE_SCALE, PROBE_TOLERANCE, _check_probe

    cfg, _ = compose(["model=tiny", f"hydra.run.dir={tmp_path}"])
    model = build_model(cfg.model, vocab_size=512, seq_len=32, eos_token_id=0, seed=0).eval()
    with torch.no_grad():  # an export whose logits reach `scale` in magnitude
        model.lm_head.weight.mul_(scale / float(model(input_ids=torch.arange(16)[None]).logits.abs().max()))
    model.save_pretrained(tmp_path / "export")
    ids = torch.arange(16)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    noise = 0.9 * PROBE_TOLERANCE["fp32"] * max(1.0, scale / PROBE_SCALE)
    probe = tmp_path / "probe.pt"
    torch.save({"input_ids": ids, "logits": logits + noise, "precision": "fp32"}, probe)
    assert _check_probe(tmp_path / "export", probe, []) == pytest.approx(noise, rel=0.2)
    torch.save({"input_ids": ids, "logits": logits + 0.1, "precision": "fp32"}, probe)
    with pytest.raises(CheckpointError, match="the export is wrong"):
        _check_probe(tmp_path / "export", probe, [])


def _zero0_against_torch(port: int, out: str) -> None:
    import json
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    os.environ.update(LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from distlm.engine import Engine, param_groups

    # A clip far below the gradients' norm: every step is clipped.
    cfg, _ = compose(
        [
            "zero=zero0",
            "cluster.num_workers=1",
            "trainer.micro_batch_size=2",
            "trainer.global_batch_size=2",
            "trainer.grad_clip=0.01",
        ]
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    reference.load_state_dict(model.state_dict())
    tr = cfg.trainer
    engine = Engine(cfg.zero, tr, resolve_runtime(cfg.cluster), 1)
    engine.prepare(model)
    opt = torch.optim.AdamW(
        param_groups(reference, tr.weight_decay), lr=tr.lr, betas=(tr.beta1, tr.beta2), foreach=False
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tr))
    gen = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(4):
        x = torch.randn(2, 8, generator=gen)
        engine.backward(engine(input=x).pow(2).mean() * 100)
        engine.step()
        reference(x).pow(2).mean().mul(100).backward()
        norms.append((engine.grad_norm(), float(torch.nn.utils.clip_grad_norm_(reference.parameters(), tr.grad_clip))))
        opt.step()
        schedule.step()
        opt.zero_grad()
    gaps = [float((a - b).abs().max()) for a, b in zip(engine.module.parameters(), reference.parameters())]
    ds_clip = engine.ds_config["gradient_clipping"]
    Path(out).write_text(json.dumps({"norms": norms, "gaps": gaps, "ds_clip": ds_clip}))
    torch.distributed.destroy_process_group()


def test_zero0_clips_once_a_step_as_the_plain_loop_does(tmp_path):
    """ZeRO-0 in fp32: the Engine clips (DeepSpeed's own clip is off) and logs the norm it clipped
    by; weights and norms follow torch's clip_grad_norm_ + AdamW step for step."""
    import json
    import multiprocessing as mp

    from distlm.runtime import free_port

    out = tmp_path / "result.json"
    proc = mp.get_context("spawn").Process(target=_zero0_against_torch, args=(free_port(), str(out)))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 0
    result = json.loads(out.read_text())
    assert result["ds_clip"] == 0.0
    for logged, torch_norm in result["norms"]:
        assert torch_norm > 0.01 * 10  # clipped for real
        assert logged == pytest.approx(torch_norm, rel=1e-6)
    # Adam is nearly blind to a gradient's scale: a clip twice too loose moves these weights ~2e-6.
    assert max(result["gaps"]) < 1e-9, result["gaps"]


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    """torch waits for ever on the lock of a killed extension build; distlm removes locks older than
    any build takes (build-ops and each worker, before DeepSpeed loads its ops) and says so."""
    import os
    import time

    from distlm.engine import STALE_BUILD_LOCK_S, clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, live = tmp_path / "py311_cpu" / "cpu_adam" / "lock", tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir(parents=True)
        lock.touch()
    then = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(stale, (then, then))
    said = clear_stale_build_locks()
    assert not stale.exists() and live.exists()
    assert len(said) == 1 and str(stale) in said[0] and "did not finish" in said[0]
    assert clear_stale_build_locks() == []
