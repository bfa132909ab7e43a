"""Multi-task fine-tuning end to end on real Ray + DeepSpeed: adapters, isolation, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_pretrained
from safetensors.torch import load_file

from distlm.config import compose
from distlm.export import export_checkpoint
from distlm.report import read_metrics

pytestmark = pytest.mark.slow

SMALL_SUITE = [
    "task=suite",
    *[f"task.tasks.{t}.num_train=200" for t in ("addition", "reversal", "sorting", "kv_lookup")],
    "task.eval_examples=8",
    "data.seq_len=64",
    "trainer.micro_batch_size=4",
    "trainer.global_batch_size=8",
    "trainer.warmup_steps=1",
    "trainer.lr=1e-2",
    "tracking=disabled",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pretrained") / "model"
    tiny_pretrained(directory)
    return directory


def _train(overrides, run_dir: Path):
    from distlm import driver

    cfg, _ = compose([*SMALL_SUITE, *overrides, f"hydra.run.dir={run_dir}"])
    summary = driver.run(cfg)
    return cfg, summary, read_metrics(str(run_dir / "metrics.jsonl"))


def _task_of_each_step(records, tasks):
    steps = {}
    for r in records:
        for t in tasks:
            if f"train/{t}/loss" in r:
                steps[r["step"]] = t
    return steps


PER_TASK_ZERO3 = [
    "adapter=per_task_lora",
    # Each adapter also trains its own copy of the embeddings (tied to the head) and norms.
    "adapter.modules_to_save=[embeddings,norms]",
    "zero=zero3",
    "trainer.max_steps=6",
    "trainer.eval_every=6",
    "trainer.checkpoint_every=1",
    "trainer.keep_checkpoints=10",
]


@pytest.fixture(scope="module")
def per_task_zero3(pretrained, tmp_path_factory, ray_session):
    """(cfg, summary, records, run dir) of one per-task LoRA run under ZeRO-3 (two tests read it)."""
    run_dir = tmp_path_factory.mktemp("per_task_zero3") / "run"
    return (*_train([*PER_TASK_ZERO3, f"init_from={pretrained}"], run_dir), run_dir)


def test_per_task_lora_zero3_isolates_adapters(per_task_zero3, pretrained, tmp_path):
    cfg, summary, records, run_dir = per_task_zero3
    tasks = list(cfg.task.tasks)
    export = Path(summary["export"])
    assert sorted(p.name for p in (export / "adapters").iterdir()) == sorted(tasks)

    # The base weights of the export are bitwise those of the input model.
    base_in, base_out = load_file(pretrained / "model.safetensors"), load_file(export / "model.safetensors")
    assert base_in.keys() == base_out.keys()
    for name, tensor in base_in.items():
        assert torch.equal(tensor, base_out[name]), name

    # Each adapter changes only on its own task's steps.
    step_task = _task_of_each_step(records, tasks)
    assert sorted(step_task) == list(range(1, 7))
    adapters_at = {}
    for step in range(1, 7):
        out = tmp_path / f"export_{step}"
        export_checkpoint(str(run_dir / "checkpoints" / f"step_{step:08d}"), str(out), verify_logits=False)
        adapters_at[step] = {t: load_file(out / "adapters" / t / "adapter_model.safetensors") for t in tasks}
    copies = {k for k in adapters_at[1][tasks[0]] if "lora_" not in k}
    assert {"base_model.model.transformer.wte.weight", "base_model.model.lm_head.weight"} <= copies, copies
    for step in range(2, 7):
        for task in tasks:
            before, after = adapters_at[step - 1][task], adapters_at[step][task]
            changed = {k for k in before if not torch.equal(before[k], after[k])}
            if task == step_task[step]:  # its LoRA weights and its module copies train
                assert changed & copies and changed - copies, (step, task)
            else:
                assert not changed, (step, task, step_task[step], sorted(changed)[:3])

    # The exported adapters load with plain peft and reproduce the trained model's logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    probe = torch.load(run_dir / "checkpoints" / "step_00000006" / "probe.pt", weights_only=True)
    for task in tasks:
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(export), export / "adapters" / task
        ).eval()
        with torch.no_grad():
            logits = model(input_ids=probe["input_ids"]).logits
        assert torch.allclose(logits, probe["adapters"][task], atol=1e-5, rtol=0), task

    # Per-task metrics, the realised mixture, and the before/after table.
    last = records[-1]
    for task in tasks:
        assert 0.0 <= last[f"eval/{task}/exact_match"] <= 1.0 and last[f"eval/{task}/loss"] > 0
        assert last[f"mix/{task}"] == pytest.approx(sum(1 for t in step_task.values() if t == task) / 6)
    assert set(summary["tasks"]) == {*tasks, "mean"}
    best = json.loads((run_dir / "best.json").read_text())
    assert set(best) == {*tasks, "overall"}


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_shared_lora_and_full_finetuning_zero2(adapter, pretrained, tmp_path, ray_session):
    run_dir = tmp_path / "run"
    overrides = [
        f"adapter={adapter}",
        # The shared adapter also with module copies: ZeRO-2 hands tied copies as one tensor.
        *(["adapter.modules_to_save=[embeddings,norms]"] if adapter == "lora" else []),
        "zero=zero2",
        f"init_from={pretrained}",
        "trainer.max_steps=4",
        "trainer.eval_every=4",
    ]
    cfg, summary, records = _train(overrides, run_dir)
    export = Path(summary["export"])
    base_in, base_out = load_file(pretrained / "model.safetensors"), load_file(export / "model.safetensors")
    base_unchanged = all(torch.equal(t, base_out[n]) for n, t in base_in.items())
    info = json.loads((export / "distlm_export.json").read_text())
    assert info["probe_max_abs_diff"] < 1e-5
    if adapter == "lora":
        assert base_unchanged and info["adapters"] == ["shared"]
        assert (export / "adapters" / "shared" / "adapter_model.safetensors").exists()
    else:
        assert not base_unchanged and info["adapters"] == []

    # `distlm eval` reads the export with its adapters and prints the per-task table.
    result = run_cli("eval", str(run_dir), "--json", str(tmp_path / "eval.json"), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exact match" in result.stdout and "kv_lookup" in result.stdout
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    # Same model, same held-out examples: the same numbers as the run's final evaluation.
    for task in cfg.task.tasks:
        assert evaluated[f"eval/{task}/loss"] == pytest.approx(records[-1][f"eval/{task}/loss"], rel=1e-4)
        assert evaluated[f"eval/{task}/exact_match"] == records[-1][f"eval/{task}/exact_match"]


def test_fine_tuning_is_reproducible(per_task_zero3, pretrained, tmp_path):
    """A fresh run of the same command trains the same adapters: equal losses at every step (the
    adapters' initialisation comes from the run's seed, not the process's RNG state)."""
    again = _train([*PER_TASK_ZERO3, f"init_from={pretrained}"], tmp_path / "run")[2]
    losses = [[r["train/loss"] for r in records if "train/loss" in r] for records in (per_task_zero3[2], again)]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
