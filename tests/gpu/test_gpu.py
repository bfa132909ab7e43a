"""The GPU suite (`make gpu-test`, which sets DISTLM_GPU_TESTS=1; the default run leaves it out).

On a GPU: nccl and bf16 chosen by default, every tensor of the loop on the device, ZeRO-2 and
ZeRO-3 (sharded construction) training against an fp32 reference, per-task evaluation,
export checked in bf16, and serving on the GPU equal to transformers' generate there. Without
a GPU the suite stops with one message rather than skipping its tests one by one."""

from __future__ import annotations

import asyncio
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers import compose_cfg, reference_losses

from distlm.config import ClusterConfig  # noqa: E402
from distlm.report import read_metrics  # noqa: E402
from distlm.runtime import Runtime, resolve_runtime  # noqa: E402

if not torch.cuda.is_available():
    pytest.exit("tests/gpu needs a CUDA GPU (torch.cuda.is_available() is False here)", returncode=1)

WORKERS = min(2, torch.cuda.device_count())  # nccl needs one GPU per rank


@pytest.fixture(scope="module")
def ray_gpus():
    import ray

    ray.init(num_cpus=4, num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_runtime_defaults_to_nccl_and_bf16():
    assert resolve_runtime(ClusterConfig()) == Runtime("cuda", "nccl", "bf16")


def _train(tmp_path, overrides):
    from distlm import driver

    per_step = WORKERS * 2
    cfg = compose_cfg(
        [
            "tracking=disabled",
            f"cluster.num_workers={WORKERS}",
            "zero.shard_single_worker=true",  # with one GPU, ZeRO-2 is still the stage under test
            "trainer.micro_batch_size=2",
            f"trainer.global_batch_size={per_step}",
            *overrides,
        ],
        tmp_path / "run",
    )
    summary = driver.run(cfg)
    return cfg, summary, [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "train/loss" in r]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_training_on_gpus_tracks_the_fp32_reference(zero, tmp_path, ray_gpus):
    """bf16 on the GPU against the same steps in fp32 on the CPU (test_train_e2e's reference loop)."""
    cfg, summary, records = _train(tmp_path, [f"zero={zero}", "trainer.max_steps=8", "trainer.log_every=2"])
    assert [r["step"] for r in records] == [2, 4, 6, 8]  # logged only every log_every steps
    reference = reference_losses(cfg, 8)
    for r in records:
        # A logged loss is the mean over the steps since the last log.
        expected = sum(reference[r["step"] - 2 : r["step"]]) / 2
        assert r["train/loss"] == pytest.approx(expected, rel=3e-2)
        assert math.isfinite(r["train/grad_norm"]) and r["train/mfu"] > 0
    export = Path(summary["export"])
    info = (export / "distlm_export.json").read_text()
    assert '"probe_max_abs_diff"' in info
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export).cuda()
    assert model(input_ids=torch.tensor([[1, 2, 3]], device="cuda")).logits.isfinite().all()


def test_fine_tuning_and_evaluation_on_gpus(tmp_path, ray_gpus):
    """Per-task LoRA and greedy evaluation with every tensor on the device (a pretrained tiny model first)."""
    _, pre, _ = _train(tmp_path / "pre", ["trainer.max_steps=4"])
    _, summary, records = _train(
        tmp_path / "ft",
        [
            "task=suite",
            "adapter=per_task_lora",
            f"init_from={pre['export']}",
            "trainer.max_steps=4",
            "task.eval_examples=8",
            "data.seq_len=64",
        ],
    )
    assert records and all(math.isfinite(r["train/loss"]) for r in records)
    table = summary["tasks"]
    assert set(table) == {"addition", "reversal", "sorting", "kv_lookup", "mean"}
    assert all(0.0 <= row["after"] <= 1.0 for row in table.values())


def test_serving_on_the_gpu_equals_generate(tmp_path, ray_gpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distlm.export import find_export
    from distlm.serve.engines import GenerationRequest, SamplingParams
    from distlm.serve.engines.hf import HFEngine

    _, summary, _ = _train(tmp_path, ["trainer.max_steps=4"])
    export = find_export(summary["export"])
    served = HFEngine(export, "cuda", torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(export.path)
    model = AutoModelForCausalLM.from_pretrained(export.path, dtype=torch.bfloat16).cuda().eval()
    prompts = ["def main(", "import os\n", "class A:"]
    requests = [GenerationRequest(tokenizer(p).input_ids, SamplingParams(max_tokens=8, temperature=0)) for p in prompts]

    async def answers():  # submitted together: one batch
        async def events(request):
            return [e async for e in served.generate(request)]

        return await asyncio.gather(*(events(r) for r in requests))

    for prompt, events in zip(prompts, asyncio.run(answers())):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.cuda()
        expected = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
        got = [e.token_id for e in events]
        assert got == expected[: len(got)]
