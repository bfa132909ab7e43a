"""Tokenize a corpus once into flat token files, cached by content hash, and read them as blocks."""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import numpy as np
import tokenizers
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from distlm.config import ConfigError, DataConfig
from distlm.data.corpus import DataError, corpus_manifest, iter_documents, stdlib_topics
from distlm.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

# Bump when the on-disk layout or the split/encoding rules change: old caches become misses.
FORMAT_VERSION = 2
COMPLETE = "COMPLETE"
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack"}
# Documents per encode_batch call are capped by total characters to bound memory.
_CHUNK_CHARS = 1 << 20
_CHUNK_DOCS = 1024


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

    def add_file(label: str, path: Path) -> None:
        h.update(f"{label}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)

    add("format_version", str(FORMAT_VERSION).encode())
    split = {"format": cfg.format, "text_field": cfg.text_field, "val_fraction": cfg.val_fraction, "seed": seed}
    add("split", json.dumps(split, sort_keys=True).encode())
    for name, path in corpus_manifest(cfg):
        add_file(f"corpus:{name}", path)
    if cfg.format == "stdlib_code":
        # The topics are not files on disk, and both they and the stdlib change with the Python version.
        add("pydoc_topics", json.dumps(stdlib_topics(), sort_keys=True).encode())
        add("sys.version", sys.version.encode())
    if cfg.tokenizer is None:
        # Training output may change with the tokenizers release, so it is part of the spec.
        add("tokenizer", f"bpe vocab_size={cfg.vocab_size} tokenizers={tokenizers.__version__}".encode())
    else:
        root = Path(cfg.tokenizer)
        if not root.is_dir():
            raise ConfigError(
                f"data.tokenizer={root} is not a directory: give a local Hugging Face tokenizer directory"
            )
        # A model directory also holds weights: only the tokenizer's files decide the tokens.
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES):
            add_file(f"tokenizer:{path.relative_to(root).as_posix()}", path)
    return h.hexdigest()


def prepare_data(cfg: DataConfig, seed: int = 0, progress: bool = True) -> PreparedData:
    """Tokenize the corpus into `<cache_dir>/<key[:16]>/{tokenizer/,train.bin,val.bin}`, or reuse it.

    A cache dir counts only once it has the COMPLETE marker: builds happen in a private
    temporary sibling that is renamed into place when finished, so a crash or a concurrent
    build never leaves a half-written cache that a later run would trust.
    """
    key = cache_key(cfg, seed)
    root = Path(cfg.cache_dir)
    final = root / key[:16]
    if (final / COMPLETE).is_file():
        log.info("data cache hit: %s", final)
        return _load(final)
    log.info("preparing data into %s", final)
    root.mkdir(parents=True, exist_ok=True)
    # A private build dir (not mkdtemp: its 0700 mode would carry over to the shared cache).
    tmp = root / f".{key[:16]}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _build(cfg, seed, key, tmp, final, progress)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after a successful rename
    return _load(final)


def _build(cfg: DataConfig, seed: int, key: str, out: Path, final: Path, progress: bool) -> None:
    if cfg.tokenizer is None:
        log.info("training a byte-level BPE tokenizer (vocab_size=%d)", cfg.vocab_size)
        train_docs = (doc for is_val, doc in split_documents(iter_documents(cfg), seed, cfg.val_fraction) if not is_val)
        tokenizer = train_tokenizer(train_docs, cfg.vocab_size)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"data.tokenizer={cfg.tokenizer} has no eos_token, which separates documents: "
            "set eos_token in its tokenizer_config.json, or unset data.tokenizer to train one"
        )
    save_tokenizer(tokenizer, out / "tokenizer")
    vocab_size = len(tokenizer)
    dtype = "uint16" if vocab_size < 2**16 else "uint32"
    eos = tokenizer.eos_token_id

    # A private copy of the Rust tokenizer: encode_batch runs on all cores, and a tokenizer.json
    # that enables truncation or padding must not cut or pad documents here.
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()

    counts = {False: 0, True: 0}
    with open(out / "train.bin", "wb") as train_f, open(out / "val.bin", "wb") as val_f:
        files = {False: train_f, True: val_f}
        bar = tqdm(desc="tokenizing", unit="doc", disable=None if progress else True)
        for chunk in _chunks(split_documents(iter_documents(cfg), seed, cfg.val_fraction)):
            encodings = backend.encode_batch([doc for _, doc in chunk], add_special_tokens=False)
            ids: dict[bool, list[int]] = {False: [], True: []}
            for (is_val, _), enc in zip(chunk, encodings):
                ids[is_val].extend(enc.ids)
                ids[is_val].append(eos)
            for is_val, tokens in ids.items():
                np.asarray(tokens, dtype=dtype).tofile(files[is_val])
                counts[is_val] += len(tokens)
            bar.update(len(chunk))
            bar.set_postfix(tokens=counts[False] + counts[True])
        bar.close()
        for f in files.values():
            _sync(f)

    prepared = PreparedData(
        key=key,
        tokenizer_dir=str(final / "tokenizer"),
        train_path=str(final / "train.bin"),
        val_path=str(final / "val.bin"),
        dtype=dtype,
        vocab_size=vocab_size,
        eos_token_id=eos,
        num_train_tokens=counts[False],
        num_val_tokens=counts[True],
    )
    with open(out / "meta.json", "w") as f:
        json.dump(asdict(prepared), f, indent=2)
        _sync(f)
    # Written last: its presence means every other file is complete and on disk.
    (out / COMPLETE).touch()


def _sync(f: IO) -> None:
    f.flush()
    os.fsync(f.fileno())


def split_documents(docs: Iterable[str], seed: int, val_fraction: float) -> Iterator[tuple[bool, str]]:
    """Yield (is_val, doc): deterministic by document index and seed, independent of content.

    Document 0 always trains; when val_fraction > 0 and no other document hashed into val,
    the last document goes to val, so a corpus of >= 2 documents always has both splits.
    """
    held: tuple[bool, str] | None = None  # the newest document: it may turn out to be the last one
    any_val = False
    for index, doc in enumerate(docs):
        if held is not None:
            yield held
        digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
        is_val = index > 0 and int.from_bytes(digest[:8], "big") < val_fraction * 2**64
        any_val |= is_val
        held = (is_val, doc)
    if held is not None:
        needs_val = val_fraction > 0 and not any_val and index > 0
        yield (True, held[1]) if needs_val else held


def _chunks(items: Iterable[tuple[bool, str]]) -> Iterator[list[tuple[bool, str]]]:
    chunk: list[tuple[bool, str]] = []
    chars = 0
    for item in items:
        chunk.append(item)
        chars += len(item[1])
        if chars >= _CHUNK_CHARS or len(chunk) >= _CHUNK_DOCS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


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
    # Paths are rebuilt from where the cache is now, so a moved cache dir still works.
    meta.update(
        tokenizer_dir=str(final / "tokenizer"),
        train_path=str(final / "train.bin"),
        val_path=str(final / "val.bin"),
    )
    return PreparedData(**meta)


class TokenBlocks(torch.utils.data.Dataset):
    """Non-overlapping blocks of `seq_len` tokens from a flat token file, memory-mapped."""

    def __init__(self, path: str | Path, dtype: str, seq_len: int) -> None:
        self.path = str(path)
        self.dtype = np.dtype(dtype)
        self.seq_len = seq_len
        self.num_tokens = os.path.getsize(self.path) // self.dtype.itemsize
        if self.num_tokens < seq_len:
            raise DataError(
                f"{self.path} has {self.num_tokens} tokens, fewer than one block of data.seq_len={seq_len}: "
                "lower data.seq_len or add data"
            )
        self.tokens = self._open()

    def _open(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    def __len__(self) -> int:
        return self.num_tokens // self.seq_len

    def __getitem__(self, index: int) -> torch.Tensor:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        start = index * self.seq_len
        return torch.from_numpy(self.tokens[start : start + self.seq_len].astype(np.int64))

    # Pickle (e.g. to DataLoader workers) the path, not the mapped tokens; reopen on arrival.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "tokens"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.tokens = self._open()


__all__ = ["COMPLETE", "FORMAT_VERSION", "PreparedData", "TokenBlocks", "cache_key", "prepare_data", "split_documents"]
