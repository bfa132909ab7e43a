"""One token shard: tokenize a work unit's documents into a train file and a validation file.

The same function runs in the driver (data.engine=local) and in Ray Data tasks (ray), so
both write byte-identical shards. A shard is written under temporary names and committed by
renaming its stats file into place last: a shard with a stats file is complete, anything
else is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Dict, List, Optional

import numpy as np

from distlm.config import DataConfig
from distlm.data.corpus import Document, Unit, read_unit

# Documents per encode call are capped by total characters to bound memory.
_CHUNK_CHARS = 1 << 20
_CHUNK_DOCS = 1024

Stats = Dict[str, Any]


def is_validation(seed: int, source: str, position: int, val_fraction: float) -> bool:
    """The split of one document: a hash of its identity and the seed, independent of its
    content, of how the corpus is cut into shards and of which node reads it."""
    if val_fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}\0{source}\0{position}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


@dataclass(frozen=True)
class ShardJob:
    """Everything a task needs to write one shard (picklable: it travels to Ray tasks)."""

    data: DataConfig
    seed: int
    shards_dir: str
    tokenizer_file: str
    dtype: str
    eos_token_id: int


def shard_name(unit_id: int, split: str) -> str:
    return f"{unit_id:05d}.{split}.bin"


def stats_path(shards_dir: str | Path, unit_id: int) -> Path:
    return Path(shards_dir) / f"{unit_id:05d}.json"


_ENCODERS: dict[tuple[str, float], Any] = {}


def encoder(tokenizer_file: str):
    """The Rust tokenizer, loaded once per process (a Ray worker runs many shards)."""
    from tokenizers import Tokenizer

    key = (tokenizer_file, os.stat(tokenizer_file).st_mtime)
    backend = _ENCODERS.get(key)
    if backend is None:
        backend = Tokenizer.from_file(tokenizer_file)
        # A tokenizer.json that enables truncation or padding must not cut or pad documents here.
        backend.no_truncation()
        backend.no_padding()
        _ENCODERS.clear()
        _ENCODERS[key] = backend
    return backend


def tokenize_unit(unit: Unit, job: ShardJob, on_chunk: Optional[Callable[[int, int, int], None]] = None) -> Stats:
    """Tokenize and write one shard; returns its stats (also committed as `<id>.json`).

    Each document becomes its tokens followed by EOS, in the split its identity picks.
    `on_chunk(docs, tokens, chars)` reports progress inside the shard.
    """
    backend = encoder(job.tokenizer_file)
    # The same ids as encode_batch, without computing offsets (tokenizers >= 0.21 has it).
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    out = Path(job.shards_dir)
    tag = uuid.uuid4().hex[:8]
    names = {split: shard_name(unit["id"], split) for split in ("train", "val")}
    temps = {split: out / f".{name}.tmp-{tag}" for split, name in names.items()}
    docs = {"train": 0, "val": 0}
    tokens = {"train": 0, "val": 0}
    first: Optional[List] = None
    last: Optional[List] = None
    eos = np.asarray([job.eos_token_id], dtype=job.dtype)
    try:
        with open(temps["train"], "wb") as train_f, open(temps["val"], "wb") as val_f:
            files: dict[str, IO] = {"train": train_f, "val": val_f}
            for chunk in _chunks(read_unit(job.data, unit)):
                encodings = encode([text for _, _, text in chunk], add_special_tokens=False)
                pieces: dict[str, list[np.ndarray]] = {"train": [], "val": []}
                chunk_tokens = 0
                for (source, position, _), enc in zip(chunk, encodings):
                    split = "val" if is_validation(job.seed, source, position, job.data.val_fraction) else "train"
                    ids = np.asarray(enc.ids, dtype=job.dtype)
                    pieces[split] += [ids, eos]
                    docs[split] += 1
                    tokens[split] += len(ids) + 1
                    chunk_tokens += len(ids) + 1
                    last = [split, len(ids) + 1]
                    first = first or last
                for split, arrays in pieces.items():
                    if arrays:
                        np.concatenate(arrays).tofile(files[split])
                if on_chunk is not None:
                    on_chunk(len(chunk), chunk_tokens, sum(len(d[2]) for d in chunk))
            for f in files.values():
                _sync(f)
        stats = {"id": unit["id"], "docs": docs, "tokens": tokens, "first": first, "last": last}
        for split, name in names.items():
            os.replace(temps[split], out / name)
        _write_json(stats_path(out, unit["id"]), stats)  # the commit: written last
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    return stats


def committed(shards_dir: str | Path, unit_id: int, itemsize: int) -> Optional[Stats]:
    """The stats of a shard an earlier (perhaps killed) run finished, if its files are intact."""
    try:
        stats = json.loads(stats_path(shards_dir, unit_id).read_text())
        for split in ("train", "val"):
            size = (Path(shards_dir) / shard_name(unit_id, split)).stat().st_size
            if size != stats["tokens"][split] * itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return stats


def _write_json(path: Path, data: Any) -> None:
    temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(temp, "w") as f:
            json.dump(data, f)
            _sync(f)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _sync(f: IO) -> None:
    f.flush()
    os.fsync(f.fileno())


def _chunks(docs: Iterable[Document]) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc[2])
        if chars >= _CHUNK_CHARS or len(chunk) >= _CHUNK_DOCS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


__all__ = ["ShardJob", "Stats", "committed", "encoder", "is_validation", "shard_name", "stats_path", "tokenize_unit"]
