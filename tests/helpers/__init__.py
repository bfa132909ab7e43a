"""Helpers the tests share (fixtures are in conftest.py): composing configs, running the CLI as a
user would, a tiny pretrained model, the plain-PyTorch reference loop, data fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[2]
# A shared data cache for all tests: the tokenizer and token files are built once.
CACHE = os.environ.get("DISTLM_TEST_CACHE", str(REPO / "runs" / ".cache"))

# The tiny end-to-end recipe most tests use; W&B stays offline and local.
TINY = ["experiment=pretrain_tiny", f"data.cache_dir={CACHE}"]


def compose_cfg(overrides: List[str], run_dir: Path):
    from distlm.config import compose

    cfg, _ = compose([*TINY, f"hydra.run.dir={run_dir}", *overrides])
    return cfg


def distlm_cmd(*args: str) -> List[str]:
    return [sys.executable, "-m", "distlm.cli", *args]


def run_cli(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(distlm_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO, **kwargs)


def tiny_pretrained(directory) -> None:
    """A tiny random GPT-2 with its own small tokenizer, saved as a pretrained model directory."""
    from transformers import AutoModelForCausalLM

    from distlm.config import ModelConfig
    from distlm.data.tokenizer import train_tokenizer
    from distlm.models import build_config

    tok = train_tokenizer(["add: 1 + 2 = 3", "reverse: a b = b a"] * 20, vocab_size=300)
    AutoModelForCausalLM.from_config(build_config(ModelConfig(), len(tok), 64, tok.eos_token_id)).save_pretrained(
        directory
    )
    tok.save_pretrained(directory)


def reference_losses(cfg, steps: int):
    """The same model, data order, optimizer, schedule and clipping in one process."""
    import torch

    from distlm.data import ResumableSampler, TokenBlocks, prepare_data
    from distlm.reference import PlainLoop

    tr = cfg.trainer
    data = prepare_data(cfg.data, seed=tr.seed, progress=False)
    loop = PlainLoop(cfg, data.vocab_size, data.eos_token_id)
    blocks = TokenBlocks(data.train_path, data.dtype, cfg.data.seq_len)
    sampler = ResumableSampler(len(blocks), tr.global_batch_size, tr.global_batch_size, 0, 1, tr.seed)
    losses = []
    for _ in range(steps):
        (indices,) = sampler.next_batch()
        loss = loop.micro_step(torch.stack([blocks[i] for i in indices]))
        loop.optimizer_step()
        losses.append(loss.item())
    return losses


def code_doc(i: int) -> str:
    """A small Python document, different for each i."""
    return (
        f"def function_{i}(x, y={i}):\n"
        f'    """Return the sum of x and y times {i}."""\n'
        f"    result = x + y * {i}\n"
        f"    if result > {i * 7}:\n"
        f"        return result - {i}\n"
        f"    return result\n\n"
        f"class Widget{i}:\n    value = {i!r}\n"
    )


def assert_same_cache(a: Path, b: Path) -> None:
    """Every file byte for byte, but build.json (how long it took, on which nodes)."""
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file() and p.name != "build.json")
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file() and p.name != "build.json")
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def token_stream(path: str, dtype: str) -> list[int]:
    """A token stream read straight from its index, independently of TokenBlocks."""
    import numpy as np

    base = Path(path).parent
    out: list[int] = []
    for file, offset, length in json.loads(Path(path).read_text()):
        out += np.fromfile(base / file, dtype=dtype)[offset : offset + length].tolist()
    return out


def reference_streams(cfg, tokenizer_dir: str, seed: int) -> dict[bool, list[int]]:
    """Every document encoded on its own by the saved tokenizer, + EOS, in corpus order, in the
    split its identity hashes to (as one file of each split would hold them)."""
    from transformers import AutoTokenizer

    from distlm.data import is_validation
    from distlm.data.corpus import documents

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = [(is_validation(seed, s, p, cfg.val_fraction), t) for s, p, t in documents(cfg)]
    if not any(not v for v, _ in docs):
        docs[0] = (False, docs[0][1])
    elif cfg.val_fraction > 0 and not any(v for v, _ in docs) and len(docs) >= 2:
        docs[-1] = (True, docs[-1][1])
    streams: dict[bool, list[int]] = {False: [], True: []}
    for is_val, text in docs:
        streams[is_val] += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    return streams
