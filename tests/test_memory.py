"""The memory pre-flight: the ZeRO paper's model-state figures, the estimate's parts, and a run
that would not fit stopped in seconds with the figure and a setting that fits."""

from __future__ import annotations

import time

import pytest
from helpers import run_cli

from distlm.config import ConfigError
from distlm.memory import GB, ModelShape, Setting, check, estimate, model_states


def test_model_states_match_the_zero_paper():
    """Figure 1 of Rajbhandari et al. (2020): a 7.5B-parameter model on 64 GPUs with mixed-precision
    Adam (K=12) needs 120, 31.4, 16.6 and 1.88 GB per GPU for the baseline, P_os, P_os+g, P_os+g+p."""
    shape = ModelShape(
        params=7_500_000_000, trainable=7_500_000_000, layers=1, hidden=1, heads=1, vocab=1, largest_param=1
    )
    paper = {0: 120, 1: 31.4, 2: 16.6, 3: 1.88}
    for stage, expected in paper.items():
        states = model_states(shape, Setting(stage=stage, world=64, precision="bf16", micro_batch=1, seq_len=1))
        assert sum(states.values()) / 1e9 == pytest.approx(expected, rel=0.01), stage


def test_fp32_and_frozen_parameters():
    """fp32 keeps no separate master copy at stages 0 and 3; frozen parameters (LoRA's base) carry
    no gradients or optimizer states."""
    shape = ModelShape(params=1000, trainable=100, layers=1, hidden=1, heads=1, vocab=1, largest_param=10)
    fp32 = {
        s: model_states(shape, Setting(stage=s, world=2, precision="fp32", micro_batch=1, seq_len=1)) for s in range(4)
    }
    assert fp32[0] == {"params": 4000, "grads": 400, "optimizer": 800}
    assert fp32[1] == {"params": 4000, "grads": 400, "optimizer": 600}
    assert fp32[2] == {"params": 4000, "grads": 200, "optimizer": 600}
    assert fp32[3] == {"params": 2000, "grads": 200, "optimizer": 400}


def test_offloading_moves_states_to_host_memory():
    shape = ModelShape(params=10**9, trainable=10**9, layers=2, hidden=64, heads=4, vocab=100, largest_param=10**6)
    on = Setting(
        stage=3, world=2, precision="bf16", micro_batch=1, seq_len=8, offload_optimizer=True, offload_params=True
    )
    off = Setting(stage=3, world=2, precision="bf16", micro_batch=1, seq_len=8)
    a, b = estimate(shape, on, "cuda"), estimate(shape, off, "cuda")
    # Every model state leaves the GPU; the host also holds DeepSpeed's fp32 gradient partition.
    assert a.model_states == 0
    assert a.offloaded == pytest.approx(b.model_states + 4 * 10**9 / 2)
    assert a.total_on("cuda") < b.total_on("cuda")
    # On a CPU the host is the device: offloading saves nothing and costs that gradient copy, but
    # not the copies of torch Adam's step over a ZeRO-3 sub-group (DeepSpeed's CPU Adam works in place).
    cpu_on, cpu_off = estimate(shape, on, "cpu").total_on("cpu"), estimate(shape, off, "cpu").total_on("cpu")
    assert cpu_on - cpu_off == pytest.approx(4 * 10**9 / 2 - 2 * 4 * off.sub_group)


@pytest.mark.parametrize("preset", ["tiny", "small", "gpt2", "llama", "qwen2", "llama_1b"])
def test_formula_counts_equal_the_built_model(preset):
    """The pre-flight counts random-init models by formula (no transformers import); transformers'
    own skeleton on the meta device is the reference, for every preset and a Mistral config."""
    from distlm.config import compose
    from distlm.memory import formula_shape

    cfg, _ = compose([f"model={preset}"])
    configs = [cfg.model]
    if preset == "llama":
        configs.append(type(cfg.model)(**{**vars(cfg.model), "arch": "mistral", "extra": {"num_key_value_heads": 2}}))
    for model in configs:
        counted = formula_shape(model, cfg.adapter, 4096, 64)
        assert counted is not None, model.arch
        assert counted == _skeleton_shape(model, 4096, 64), (preset, model.arch)


def _skeleton_shape(model_cfg, vocab, seq_len):
    import torch
    from transformers import AutoModelForCausalLM

    from distlm.memory import ModelShape
    from distlm.models import build_config

    hf = build_config(model_cfg, vocab, seq_len, 0)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(hf)
    return ModelShape(
        params=sum(p.numel() for p in m.parameters()),
        trainable=sum(p.numel() for p in m.parameters()),
        layers=hf.num_hidden_layers,
        hidden=hf.hidden_size,
        heads=hf.num_attention_heads,
        vocab=hf.vocab_size,
        largest_param=max(p.numel() for p in m.parameters()),
    )


def test_too_big_names_the_figure_and_a_setting_that_fits():
    shape = ModelShape(params=10**9, trainable=10**9, layers=22, hidden=2048, heads=32, vocab=4096, largest_param=10**7)
    setting = Setting(stage=0, world=2, precision="fp32", micro_batch=1, seq_len=32)
    with pytest.raises(ConfigError) as e:
        check(shape, setting, "cpu", 10 * GB, "here")
    message = str(e.value)
    assert "needs ~" in message and "with zero=zero0" in message and "a worker has ~10.0 GB" in message
    assert "zero=zero3 (2 workers" in message and ": use that" in message


def test_the_one_billion_model_with_zero0_stops_before_launch(tmp_path):
    """llama_1b with zero=zero0 does not fit a worker of this machine: exit 2 within 10 s, naming zero3."""
    start = time.perf_counter()
    result = run_cli(
        "train",
        "model=llama_1b",
        "zero=zero0",
        "trainer.micro_batch_size=1",
        "trainer.global_batch_size=2",
        "data.seq_len=32",
        "cluster.memory_per_worker_gb=10",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("distlm: error:")]
    assert len(errors) == 1 and "with zero=zero0" in errors[0] and "zero=zero3" in errors[0], result.stderr[-2000:]
    assert elapsed < 10, elapsed


def test_plan_prints_every_preset(tmp_path):
    result = run_cli("plan", "model=llama_1b", "trainer.micro_batch_size=1", "data.seq_len=32")
    for preset in ("zero0", "zero1", "zero2", "zero3", "zero3_offload"):
        assert preset in result.stdout
    assert "0.98B" in result.stdout or "979" in result.stdout, result.stdout
