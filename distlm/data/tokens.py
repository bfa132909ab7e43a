"""Tokenize a corpus once into sharded token files, cached by content hash, and read them as blocks.

Layout of one prepared corpus, `<cache_dir>/<key[:16]>/`:

    COMPLETE                  written last: only a directory with it is ever used
    meta.json                 PreparedData (paths relative to the directory)
    tokenizer/                save_pretrained layout
    plan.json                 the work units (which files or ranges make each shard)
    shards/<id>.{train,val}.bin, shards/<id>.json   token files of each unit, and their counts
    train.index.json, val.index.json                the token streams: [[file, offset, length], ...]
    build.json                how it was built (engine, time, nodes); not part of the content

The train stream is the train shards' tokens in unit order, which is the corpus order: the
same stream as one file of every train document (tokens + EOS) in order. TokenBlocks cuts
it into blocks across shard boundaries, so the sampler's block indices (and a resumed
run's position) mean what they mean over one file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
import os
import shutil
import sys
import time
import uuid
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Dict, List, Optional

import numpy as np
import tokenizers
import torch

from distlm.config import ConfigError, DataConfig
from distlm.data.corpus import (
    DataError,
    Unit,
    corpus_bytes,
    corpus_manifest,
    no_documents,
    plan_units,
    read_unit,
    stdlib_topics,
)
from distlm.data.shards import ShardJob, Stats, committed, is_validation, shard_name
from distlm.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

# Bump when the on-disk layout or the split/encoding rules change: old caches become misses.
# 3: sharded token files; the split is keyed by document identity (source, position).
FORMAT_VERSION = 3
COMPLETE = "COMPLETE"
MB = 1 << 20
# A model directory given as the tokenizer also holds weights: they do not decide the tokens.
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack"}
# Shards of a corpus smaller than shard_mb x 4 x CPUs are cut finer, but not below this.
_MIN_UNIT_BYTES = MB
# How long a run whose half-built cache another run took over waits for that run to publish it.
_CLAIM_WAIT_S = 300


@dataclass
class PreparedData:
    key: str
    tokenizer_dir: str
    train_path: str
    val_path: str
    dtype: str
    vocab_size: int
    eos_token_id: int
    num_train_tokens: int
    num_val_tokens: int


def cache_key(cfg: DataConfig, seed: int = 0) -> str:
    """sha256 over everything the token files depend on (corpus bytes, tokenizer, split)."""
    h = hashlib.sha256()

    # Every entry is labelled and length-prefixed, so different inputs never hash the same stream.
    def add(label: str, data: bytes) -> None:
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)

    add("format_version", str(FORMAT_VERSION).encode())
    split = {"format": cfg.format, "text_field": cfg.text_field, "val_fraction": cfg.val_fraction, "seed": seed}
    if cfg.format == "hf":
        split["hf_split"] = cfg.hf_split
    add("split", json.dumps(split, sort_keys=True).encode())
    digests = _FileDigests(Path(cfg.cache_dir))
    for name, path in corpus_manifest(cfg):
        add(f"corpus:{name}", digests.get(path))
    if cfg.format == "stdlib_code":
        # The topics are not files on disk, and both they and the stdlib change with the Python version.
        add("pydoc_topics", json.dumps(stdlib_topics(), sort_keys=True).encode())
        add("sys.version", sys.version.encode())
    if cfg.tokenizer is None:
        # Training output may change with the tokenizers release, so it is part of the spec.
        spec = (
            f"bpe vocab_size={cfg.vocab_size} sample_mb={cfg.tokenizer_sample_mb} tokenizers={tokenizers.__version__}"
        )
        add("tokenizer", spec.encode())
    else:
        root = Path(cfg.tokenizer)
        if not root.is_dir():
            raise ConfigError(
                f"data.tokenizer={root} is not a directory: give a local Hugging Face tokenizer directory"
            )
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES):
            add(f"tokenizer:{path.relative_to(root).as_posix()}", digests.get(path))
    digests.save()
    return h.hexdigest()


class _FileDigests:
    """sha256 of files, remembered by (size, mtime, ctime, inode) in the cache dir, so a run
    on an unchanged corpus only stats its files instead of reading them all again."""

    def __init__(self, root: Path) -> None:
        self.path = root / ".file-digests.json"
        try:
            self.memo: Dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.memo = {}
        self.changed = False

    def get(self, path: Path) -> bytes:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        key = str(path.resolve())
        entry = self.memo.get(key)
        if entry is None or entry[:4] != stamp:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            entry = self.memo[key] = [*stamp, h.hexdigest()]
            self.changed = True
        return f"{entry[0]}:{entry[4]}".encode()

    def save(self) -> None:
        if not self.changed:
            return
        try:  # best effort: a memo that cannot be written only costs a re-read next time
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_json(self.path, self.memo)
        except OSError as e:
            log.warning("cannot write %s: %s", self.path, e)


def find_prepared(cfg: DataConfig, seed: int = 0) -> Optional[PreparedData]:
    """The prepared data for this config if a complete cache entry exists (nothing is built)."""
    final = Path(cfg.cache_dir) / cache_key(cfg, seed)[:16]
    return _load(final) if (final / COMPLETE).is_file() else None


def prepare_data(
    cfg: DataConfig, seed: int = 0, progress: bool = True, ray_init: Optional[Callable[[], None]] = None
) -> PreparedData:
    """Tokenize the corpus into `<cache_dir>/<key[:16]>/`, or reuse it.

    The build happens in `.<key>.partial/`, one committed shard at a time, so a run killed
    half-way is continued by the next one (only missing shards are tokenized). When every
    shard is there, the directory is renamed away (which only one run can do), completed
    with the index and the COMPLETE marker, and renamed into place. `ray_init` starts or
    joins the run's Ray cluster; it is called only when data.engine picks Ray Data.
    """
    key = cache_key(cfg, seed)
    final = Path(cfg.cache_dir) / key[:16]
    for _ in range(3):
        if (final / COMPLETE).is_file():
            log.info("data cache hit: %s", final)
            return _load(final)
        try:
            return _build(cfg, seed, key, final, progress, ray_init)
        except _TakenOver:
            # Another run finished the shards first and is writing the index: wait for it.
            deadline = time.monotonic() + _CLAIM_WAIT_S
            while not (final / COMPLETE).is_file() and time.monotonic() < deadline:
                time.sleep(0.5)
    raise RuntimeError(f"could not prepare {final}: other runs kept taking over the build; run again")


class _TakenOver(Exception):
    """Another run took the half-built cache over (renamed it to finish it)."""


def _build(
    cfg: DataConfig, seed: int, key: str, final: Path, progress: bool, ray_init: Optional[Callable[[], None]]
) -> PreparedData:
    say = _printer(progress)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{final.name}.partial"
    (partial / "shards").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        manifest = corpus_manifest(cfg)
        total = corpus_bytes(cfg, manifest)
        engine = cfg.engine if cfg.engine != "auto" else ("ray" if total >= cfg.ray_min_mb * MB else "local")
        if engine == "ray":
            from distlm.data.pipeline import connect

            cpus = connect(ray_init)
        else:
            cpus = os.cpu_count() or 1
        units = _plan(cfg, manifest, total, cpus, partial)
        tokenizer_started = time.perf_counter()
        tokenizer = _tokenizer(cfg, seed, units, partial, say)
        tokenizer_s = time.perf_counter() - tokenizer_started
        vocab_size = len(tokenizer)
        dtype = "uint16" if vocab_size < 2**16 else "uint32"
        job = ShardJob(
            cfg,
            seed,
            str(partial / "shards"),
            str(partial / "tokenizer" / "tokenizer.json"),
            dtype,
            tokenizer.eos_token_id,
        )
        itemsize = np.dtype(dtype).itemsize
        done = {u["id"]: s for u in units if (s := committed(job.shards_dir, u["id"], itemsize)) is not None}
        pending = [u for u in units if u["id"] not in done]
        if done:
            say(f"resuming {partial}: {len(done)} of {len(units)} shards are done")
        say(f"tokenizing {total / MB:,.1f} MB in {len(pending)} shards ({engine}, {cpus} CPUs) into {final}")
        from distlm.data.pipeline import Progress, run_shards

        bar = Progress(total, sum(u["bytes"] for u in units if u["id"] in done), len(pending), progress)
        tokenize_started = time.perf_counter()
        try:
            results, nodes = run_shards(pending, job, engine, bar)
        finally:
            bar.close()
        tokenize_s = time.perf_counter() - tokenize_started
        stats = [done.get(u["id"]) or results[u["id"]] for u in units]
        if done:
            nodes["(earlier run)"] = len(done)
        train, val, counts = _streams(stats, cfg.val_fraction)
        if counts["docs"] == 0:
            raise no_documents(cfg)
    except ConfigError:
        # A bad file or setting fails the same way every time: nothing here is worth keeping.
        _discard(partial)
        raise
    except Exception:
        if not partial.exists():
            raise _TakenOver() from None
        raise

    # Only one run can rename the partial dir: from here on it is this run's alone.
    building = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(partial, building)
    except FileNotFoundError:
        raise _TakenOver() from None
    try:
        # Temp files and dirs of writers killed mid-write (shards, the plan, the tokenizer).
        for stray in [*building.glob(".*"), *(building / "shards").glob(".*")]:
            if stray.is_dir():
                shutil.rmtree(stray)
            else:
                stray.unlink(missing_ok=True)
        for s in stats:  # every shard named by the index must be whole
            if committed(building / "shards", s["id"], itemsize) is None:
                raise RuntimeError(f"shard {s['id']} of {building} is incomplete: run again to redo it")
        prepared = PreparedData(
            key=key,
            tokenizer_dir="tokenizer",
            train_path="train.index.json",
            val_path="val.index.json",
            dtype=dtype,
            vocab_size=vocab_size,
            eos_token_id=tokenizer.eos_token_id,
            num_train_tokens=sum(p[2] for p in train),
            num_val_tokens=sum(p[2] for p in val),
        )
        _write_json(building / "train.index.json", train)
        _write_json(building / "val.index.json", val)
        _write_json(building / "meta.json", {**asdict(prepared), "format_version": FORMAT_VERSION}, indent=2)
        seconds = time.perf_counter() - started
        build = {
            "engine": engine,
            "cpus": cpus,
            "shards": len(units),
            "reused_shards": len(done),
            "input_bytes": total,
            "docs": counts["docs_by_split"],
            "tokens": {"train": prepared.num_train_tokens, "val": prepared.num_val_tokens},
            "seconds": round(seconds, 3),
            "tokenizer_seconds": round(tokenizer_s, 3),
            "tokenize_seconds": round(tokenize_s, 3),
            "tokens_per_s": round(sum(sum(s["tokens"].values()) for s in results.values()) / max(tokenize_s, 1e-9)),
            "nodes": nodes,
        }
        _write_json(building / "build.json", build, indent=2)
        # Written last: its presence means every other file is complete and on disk.
        with open(building / COMPLETE, "w") as f:
            _sync(f)
        _publish(building, final)
    except BaseException:
        try:  # give the shards back to the next run rather than lose them
            os.rename(building, partial)
        except OSError:
            pass
        raise
    finally:
        shutil.rmtree(building, ignore_errors=True)  # a published or a losing build: nothing to keep
    say(summary_line(build))
    return _load(final)


def summary_line(build: Dict[str, Any]) -> str:
    tokens = build["tokens"]
    nodes = [n for n in build["nodes"] if n != "(earlier run)"]
    reused = f", {build['reused_shards']} reused from an interrupted run" if build["reused_shards"] else ""
    return (
        f"prepared {tokens['train']:,} train + {tokens['val']:,} val tokens "
        f"({sum(build['docs'].values()):,} documents) in {build['shards']} shards{reused}: "
        f"{build['seconds']:.1f} s, {build['tokens_per_s']:,} tokens/s, {build['engine']} on "
        f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}"
    )


def _plan(cfg: DataConfig, manifest, total: int, cpus: int, partial: Path) -> List[Unit]:
    """The work units: an interrupted build's own (its shards were cut that way), else a new cut
    into units of at most data.shard_mb, finer for small corpora so each CPU gets about four.

    The saved plan names files by manifest index and name, not path: the cache key is the
    same after the corpus moves, and so is the plan."""
    saved = partial / "plan.json"
    if not saved.is_file():
        unit_bytes = max(1, int(min(cfg.shard_mb * MB, max(total / (4 * cpus), _MIN_UNIT_BYTES))))
        units = plan_units(cfg, unit_bytes, manifest)
        for part in (part for unit in units for part in unit["parts"]):
            del part["path"]
        _create_json(saved, {"unit_bytes": unit_bytes, "units": units})
    # Two runs starting together may both plan, maybe for different CPU counts: the first
    # plan written is the only one, and every shard follows it.
    units = json.loads(saved.read_text())["units"]
    for part in (part for unit in units for part in unit["parts"]):
        name, path = manifest[part["file"]] if part["kind"] != "topics" else (part["name"], "")
        if name != part["name"]:
            raise RuntimeError(f"{saved} does not match the corpus (a foreign file?): remove {partial} and run again")
        part["path"] = str(path)
    return units


def _tokenizer(cfg: DataConfig, seed: int, units: List[Unit], partial: Path, say: Callable[[str], None]):
    """The interrupted build's tokenizer (its shards were tokenized with it), else the given
    one, else a BPE trained on a bounded sample; saved into the build before any shard."""
    saved = partial / "tokenizer"
    if not (saved / "tokenizer.json").is_file():
        if cfg.tokenizer is None:
            say(
                f"training a byte-level BPE tokenizer (vocab_size={cfg.vocab_size}) on up to {cfg.tokenizer_sample_mb} MB"
            )
            sample = _SampleCounter(training_sample(cfg, seed, units, cfg.tokenizer_sample_mb * MB))
            tokenizer = train_tokenizer(sample, cfg.vocab_size)
            if sample.docs == 0:
                raise no_documents(cfg)
        else:
            tokenizer = load_tokenizer(cfg.tokenizer)
            if not getattr(tokenizer, "is_fast", False):
                raise ConfigError(
                    f"data.tokenizer={cfg.tokenizer} has no fast (Rust) tokenizer (tokenizer.json): "
                    "save it with a fast tokenizer class, or unset data.tokenizer to train one"
                )
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                f"data.tokenizer={cfg.tokenizer} has no eos_token, which separates documents: "
                "set eos_token in its tokenizer_config.json, or unset data.tokenizer to train one"
            )
        temp = partial / f".tokenizer.tmp-{uuid.uuid4().hex[:8]}"
        save_tokenizer(tokenizer, temp)
        try:
            os.rename(temp, saved)
        except OSError:  # a concurrent run saved its copy first: every shard uses that one
            shutil.rmtree(temp, ignore_errors=True)
    return load_tokenizer(saved)


class _SampleCounter:
    def __init__(self, docs: Iterator[str]) -> None:
        self.inner, self.docs = docs, 0

    def __iter__(self) -> Iterator[str]:
        for doc in self.inner:
            self.docs += 1
            yield doc


def training_sample(cfg: DataConfig, seed: int, units: List[Unit], budget: int) -> Iterator[str]:
    """Training documents for the tokenizer: all of them when the corpus fits in `budget`
    characters; else every k-th unit first (k = corpus / budget), so the sample spans the
    corpus, until `budget` is reached. Deterministic: the same units in the same order."""
    total = sum(u["bytes"] for u in units)
    stride = max(1, math.ceil(total / budget))
    order = [u for offset in range(stride) for u in units[offset::stride]]
    taken = count = 0
    any_val = False
    first: Optional[str] = None
    held: Optional[str] = None  # the newest train document: it may be the last one, which _streams may move to val
    for unit in order:
        for source, position, text in read_unit(cfg, unit):
            count += 1
            first = text if first is None else first
            if is_validation(seed, source, position, cfg.val_fraction):
                any_val = True
                continue
            if held is not None:
                yield held
                taken += len(held)
                if taken >= budget:
                    return
            held = text
    if held is not None and not (stride == 1 and cfg.val_fraction > 0 and not any_val and count >= 2):
        yield held
    elif held is None and first is not None:
        yield first  # every document hashed into val: the first one trains (see _streams)


def _streams(stats: List[Stats], val_fraction: float) -> tuple[list, list, Dict[str, Any]]:
    """The train and validation streams as [file, offset, length] pieces over the shards.

    As with one file, a corpus of two or more documents always has both splits: if every
    document hashed into val, the first one trains; if none did (and val_fraction > 0), the
    last one is validation. Either move is a piece of another shard file, not a copy.
    """
    train = [[f"shards/{shard_name(s['id'], 'train')}", 0, s["tokens"]["train"]] for s in stats]
    val = [[f"shards/{shard_name(s['id'], 'val')}", 0, s["tokens"]["val"]] for s in stats]
    docs = {split: sum(s["docs"][split] for s in stats) for split in ("train", "val")}
    with_docs = [i for i, s in enumerate(stats) if s["first"] is not None]
    if docs["train"] == 0 and docs["val"] > 0:
        i = with_docs[0]
        n = stats[i]["first"][1]
        train[i] = [val[i][0], 0, n]
        val[i] = [val[i][0], n, val[i][2] - n]
        docs = {"train": 1, "val": docs["val"] - 1}
    elif val_fraction > 0 and docs["val"] == 0 and docs["train"] >= 2:
        i = with_docs[-1]
        n = stats[i]["last"][1]
        val[i] = [train[i][0], train[i][2] - n, n]
        train[i] = [train[i][0], 0, train[i][2] - n]
        docs = {"train": docs["train"] - 1, "val": 1}
    keep = [[f, o, n] for f, o, n in train if n > 0], [[f, o, n] for f, o, n in val if n > 0]
    return keep[0], keep[1], {"docs": docs["train"] + docs["val"], "docs_by_split": docs}


def _discard(path: Path) -> None:
    aside = path.with_name(f"{path.name}.discard-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)  # out of the way at once, even if removing takes long
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _printer(enabled: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        log.info(message)
        if enabled:
            print(f"data: {message}", file=sys.stderr, flush=True)

    return say


def _sync(f: IO) -> None:
    f.flush()
    os.fsync(f.fileno())


def _write_json(path: Path, data: Any, indent: Optional[int] = None) -> None:
    temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(temp, "w") as f:
            json.dump(data, f, indent=indent)
            _sync(f)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _create_json(path: Path, data: Any) -> None:
    """Write `path` whole, unless it exists: a hard link never replaces a file (rename would)."""
    temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(temp, "w") as f:
            json.dump(data, f)
            _sync(f)
        os.link(temp, path)
    except FileExistsError:
        pass
    finally:
        temp.unlink(missing_ok=True)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished build into place; if another process got there first, keep theirs."""
    if final.exists() and not (final / COMPLETE).is_file():
        # prepare_data only ever publishes complete dirs, so this is foreign or broken: set it aside.
        stale = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(final, stale)
        except FileNotFoundError:
            pass  # another process moved it already
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / COMPLETE).is_file():
            raise
        log.info("another process prepared %s first: using its copy", final)


def _load(final: Path) -> PreparedData:
    meta = json.loads((final / "meta.json").read_text())
    meta.pop("format_version", None)
    # Paths are rebuilt from where the cache is now, so a moved cache dir still works.
    meta.update(
        tokenizer_dir=str(final / "tokenizer"),
        train_path=str(final / "train.index.json"),
        val_path=str(final / "val.index.json"),
    )
    return PreparedData(**meta)


class TokenBlocks(torch.utils.data.Dataset):
    """Non-overlapping blocks of `seq_len` tokens of a token stream, memory-mapped.

    `path` is a stream index (`*.index.json`: [file, offset, length] pieces, relative to the
    index) or one flat token file. A block may span pieces; block i is tokens
    [i * seq_len, (i + 1) * seq_len) of the stream either way.
    """

    _OPEN_FILES = 64  # memory maps kept open per process (a large corpus has thousands of shards)

    def __init__(self, path: str | Path, dtype: str, seq_len: int) -> None:
        self.path = str(path)
        self.dtype = np.dtype(dtype)
        self.seq_len = seq_len
        if self.path.endswith(".json"):
            base = Path(self.path).parent
            pieces = [(str(base / f), int(o), int(n)) for f, o, n in json.loads(Path(self.path).read_text())]
        else:
            pieces = [(self.path, 0, os.path.getsize(self.path) // self.dtype.itemsize)]
        self.files = [f for f, _, _ in pieces]
        self.offsets = [o for _, o, _ in pieces]
        self.starts = [0]
        for _, _, n in pieces:
            self.starts.append(self.starts[-1] + n)
        self.num_tokens = self.starts[-1]
        if self.num_tokens < seq_len:
            raise DataError(
                f"{self.path} has {self.num_tokens} tokens, fewer than one block of data.seq_len={seq_len}: "
                "lower data.seq_len or add data"
            )
        self._maps: OrderedDict[str, np.memmap] = OrderedDict()

    def _map(self, file: str) -> np.memmap:
        tokens = self._maps.get(file)
        if tokens is None:
            tokens = np.memmap(file, dtype=self.dtype, mode="r")
            if len(self._maps) >= self._OPEN_FILES:
                self._maps.popitem(last=False)
            self._maps[file] = tokens
        else:
            self._maps.move_to_end(file)
        return tokens

    def __len__(self) -> int:
        return self.num_tokens // self.seq_len

    def __getitem__(self, index: int) -> torch.Tensor:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        start, end = index * self.seq_len, (index + 1) * self.seq_len
        piece = bisect_right(self.starts, start) - 1
        parts = []
        while start < end:
            take = min(end, self.starts[piece + 1]) - start
            if take > 0:
                at = self.offsets[piece] + start - self.starts[piece]
                parts.append(self._map(self.files[piece])[at : at + take])
                start += take
            piece += 1
        block = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return torch.from_numpy(block.astype(np.int64))

    # Pickle (e.g. to DataLoader workers) the paths, not the mapped tokens; reopen on arrival.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_maps"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._maps = OrderedDict()


__all__ = [
    "COMPLETE",
    "FORMAT_VERSION",
    "PreparedData",
    "TokenBlocks",
    "cache_key",
    "find_prepared",
    "prepare_data",
    "summary_line",
    "training_sample",
]
