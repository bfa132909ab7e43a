"""Data preparation throughput: distlm's pipelines against the Rust tokenizer's own batch rate.

The corpus is at least --mb MB of JSONL generated in a temporary directory from the embedded
stdlib corpus, repeated with variations (each copy shuffles the documents, re-indents them and
renames the functions it defines), and deleted afterwards. The tokenizer is a byte-level BPE
(vocab 4096) trained once on the stdlib corpus, not timed. Same corpus and tokenizer for:

  encode_batch         tokenizers' Tokenizer.encode_batch over every document (already in
                       memory), in chunks of 1 MB, one process, all cores: the reference
  encode_batch_fast    the same without offsets (the call distlm makes)
  distlm local         prepare_data(data.engine=local): read, split, encode on all cores, write shards
  distlm ray (cold)    prepare_data(data.engine=ray): Ray Data map_batches, one task per CPU, the
                       first pipeline on a fresh local Ray (its workers start and import)
  distlm ray (warm)    the same again on that Ray

tokens/s is all tokens written (train + val, EOS included) over the wall time of the whole
prepare_data call (cache lookup, plan, tokenizer, tokenizing, index, publish). Ray itself is
started before the clock, as a cluster is up before a run; the file digests of the cache key
are computed once before the clock too (later runs only stat the files).

--small measures instead what Ray Data costs on the embedded corpus (~12 MB, its own BPE
trained as in a default run): distlm local against distlm ray with Ray's start counted, and
again on the running Ray.

    .venv/bin/python benchmarks/data_prep.py                # 200 MB, all variants
    .venv/bin/python benchmarks/data_prep.py --mb 20 --only encode_batch,ray   # a quick check
    .venv/bin/python benchmarks/data_prep.py --small        # the default corpus: local vs Ray Data
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

VARIANTS = ["encode_batch", "encode_batch_fast", "local", "ray", "ray_warm"]
NAMES = {
    "encode_batch": "encode_batch",
    "encode_batch_fast": "encode_batch_fast",
    "local": "distlm local",
    "ray": "distlm ray (cold)",
    "ray_warm": "distlm ray (warm)",
}
MB = 1 << 20


def num_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_corpus(out: Path, min_bytes: int) -> int:
    """JSONL copies of the stdlib corpus, each one varied, until min_bytes are written."""
    from distlm.config import DataConfig
    from distlm.data import iter_documents

    docs = list(iter_documents(DataConfig()))
    out.mkdir(parents=True, exist_ok=True)
    written, copy = 0, 0
    while written < min_bytes:
        rng = random.Random(copy)
        order = list(range(len(docs)))
        rng.shuffle(order)
        indent = ["    ", "  ", "\t", "   "][copy % 4]
        path = out / f"part-{copy:04d}.jsonl"
        with open(path, "w") as f:
            for i in order:
                text = re.sub(r"(?m)^((?:    )+)", lambda m, ind=indent: ind * (len(m.group(1)) // 4), docs[i])
                text = re.sub(r"\bdef (\w+)", rf"def \1_v{copy}", text)
                f.write(json.dumps({"text": text}) + "\n")
        written += path.stat().st_size
        copy += 1
    return written


def reference(corpus: Path, tokenizer_file: str, fast: bool) -> tuple[int, float]:
    """Total tokens (+ one EOS per document) and seconds of encode_batch over the corpus."""
    from tokenizers import Tokenizer

    docs = [json.loads(line)["text"] for path in sorted(corpus.glob("*.jsonl")) for line in open(path)]
    docs = [d for d in docs if d]
    tok = Tokenizer.from_file(tokenizer_file)
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    chunks, chunk, chars = [], [], 0
    for doc in docs:  # the chunking distlm uses: ~1 MB of text per call
        chunk.append(doc)
        chars += len(doc)
        if chars >= MB or len(chunk) >= 1024:
            chunks.append(chunk)
            chunk, chars = [], 0
    chunks.append(chunk)
    start = time.perf_counter()
    tokens = 0
    for c in chunks:
        tokens += sum(len(e.ids) + 1 for e in encode(c, add_special_tokens=False))
    return tokens, time.perf_counter() - start


def distlm_prepare(cfg, cache: Path) -> tuple[int, float, dict]:
    from distlm.data import prepare_data

    start = time.perf_counter()
    data = prepare_data(replace(cfg, cache_dir=str(cache)), progress=False)
    seconds = time.perf_counter() - start
    final = Path(data.train_path).parent
    build = json.loads((final / "build.json").read_text())
    shutil.rmtree(final)  # the next variant must build again (the file digests stay remembered)
    return data.num_train_tokens + data.num_val_tokens, seconds, build


def small(console) -> int:
    """The embedded corpus, as `distlm train` prepares it by default: is Ray Data worth it there?"""
    from rich.table import Table

    from distlm.config import DataConfig
    from distlm.data import cache_key

    work = Path(tempfile.mkdtemp(prefix="distlm-dataprep-small-"))
    rows = {}
    try:
        cfg = DataConfig(cache_dir=str(work / "cache"))
        cache_key(cfg)  # remember the file digests before any clock
        for name, engine in [
            ("distlm local", "local"),
            ("distlm ray (Ray start + cold)", "ray"),
            ("distlm ray (warm)", "ray"),
        ]:
            start = time.perf_counter()
            if name.endswith("cold)"):
                import ray

                ray.init(num_cpus=num_cores(), include_dashboard=False, log_to_driver=False)
            tokens, seconds, build = distlm_prepare(replace(cfg, engine=engine), work / "cache")
            rows[name] = (time.perf_counter() - start, build)
            console.print(f"{name}: {tokens:,} tokens in {rows[name][0]:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows["distlm local"][0]
    table = Table(title="the embedded corpus (stdlib_code), BPE training included")
    for column in ("variant", "seconds", "tokenizer s", "tokenizing s", "vs local"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, (seconds, build) in rows.items():
        table.add_row(
            name,
            f"{seconds:.1f}",
            f"{build['tokenizer_seconds']:.1f}",
            f"{build['tokenize_seconds']:.1f}",
            f"{seconds / base:.2f}",
        )
    console.print(table)
    console.print(f"load average {os.getloadavg()[0]:.1f} at the end (other work on the machine skews every row)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=200, help="corpus size in MB (default: %(default)s)")
    p.add_argument("--only", default=",".join(VARIANTS), help="variants to run (default: %(default)s)")
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument("--keep", action="store_true", help="keep the work dir (corpus, caches)")
    p.add_argument("--small", action="store_true", help="the embedded corpus instead: local vs Ray Data")
    args = p.parse_args()
    only = args.only.split(",")
    if not set(only) <= set(VARIANTS) or "encode_batch" not in only:
        p.error(f"--only={args.only!r}: a comma-separated subset of {','.join(VARIANTS)} that includes encode_batch")

    from rich.console import Console
    from rich.table import Table

    from distlm.config import DataConfig
    from distlm.data import cache_key, iter_documents, train_tokenizer
    from distlm.data.tokenizer import save_tokenizer

    console = Console(width=120)
    if args.small:
        return small(console)
    cores = num_cores()
    work = Path(tempfile.mkdtemp(prefix="distlm-dataprep-"))
    console.print(f"{cores} cores, load average {os.getloadavg()[0]:.1f} at start; work dir {work}")
    results: dict[str, dict] = {}
    try:
        size = make_corpus(work / "corpus", int(args.mb * MB))
        console.print(f"corpus: {size / MB:,.0f} MB of JSONL in {len(list((work / 'corpus').glob('*.jsonl')))} files")
        tokenizer = train_tokenizer(iter_documents(DataConfig()), 4096)
        save_tokenizer(tokenizer, work / "tokenizer")
        tokenizer_file = str(work / "tokenizer" / "tokenizer.json")
        cfg = DataConfig(format="jsonl", paths=[str(work / "corpus")], tokenizer=str(work / "tokenizer"))
        cache = work / "cache"
        cache_key(replace(cfg, cache_dir=str(cache)))  # remember the file digests before any clock
        if any(v.startswith("ray") for v in only):
            import ray

            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        for variant in [v for v in VARIANTS if v in only]:
            console.print(f"[bold]{variant}[/] {NAMES[variant]} ...")
            if variant.startswith("encode_batch"):
                tokens, seconds = reference(work / "corpus", tokenizer_file, fast=variant.endswith("fast"))
                extra = {}
            else:
                engine = "local" if variant == "local" else "ray"
                tokens, seconds, build = distlm_prepare(replace(cfg, engine=engine), cache)
                extra = {
                    "shards": build["shards"],
                    "nodes": len(build["nodes"]),
                    "tokenize_s": build["tokenize_seconds"],
                }
            results[variant] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, **extra}
            console.print(f"    {tokens:,} tokens in {seconds:.1f} s")
    finally:
        if args.keep:
            console.print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    base = results["encode_batch"]
    table = Table(title=f"data preparation, {size / MB:,.0f} MB JSONL, {cores} cores, one node")
    for column in ("variant", "tokens", "seconds", "tokens/s", "vs encode_batch"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for variant, r in results.items():
        same = "" if r["tokens"] == base["tokens"] else " (token count differs!)"
        table.add_row(
            NAMES[variant] + same,
            f"{r['tokens']:,}",
            f"{r['seconds']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}",
        )
    console.print(table)
    console.print(f"load average {os.getloadavg()[0]:.1f} at the end (other work on the machine skews every row)")
    if args.out:
        Path(args.out).write_text(json.dumps({"cores": cores, "corpus_bytes": size, "results": results}, indent=2))
    return 0 if all(r["tokens"] == base["tokens"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
