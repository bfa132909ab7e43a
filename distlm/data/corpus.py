"""Corpus readers: turn a DataConfig into a deterministic stream of documents (strings)."""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from distlm.config import ConfigError, DataConfig

# Directories of the standard library that are not representative library code.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
_SUFFIXES = {"text": (".txt", ".md"), "jsonl": (".jsonl",), "parquet": (".parquet",)}
_PARQUET_BATCH_ROWS = 1024


class DataError(ConfigError):
    """The corpus cannot be read; the message names the file (and line) and the fix."""


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_topics() -> dict[str, str]:
    """pydoc's help topics: prose that complements the stdlib code."""
    from pydoc_data.topics import topics

    return topics


def corpus_manifest(cfg: DataConfig) -> list[tuple[str, Path]]:
    """(stable name, path) for every corpus file, in document order.

    The name is relative to the directory the file was found under (or is the bare file
    name for a file given directly), so the cache key survives moving the data around.
    """
    if cfg.format == "stdlib_code":
        root = stdlib_dir()
        entries = sorted((p.relative_to(root).as_posix(), p) for p in _stdlib_files(root))
        searched = f"{root} (*.py)"
    elif cfg.format in _SUFFIXES:
        suffixes = _SUFFIXES[cfg.format]
        entries, seen = [], set()
        for given in cfg.paths:
            path = Path(given)
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file())
                named = [(f"{path.name}/{p.relative_to(path).as_posix()}", p) for p in found]
            elif path.is_file():
                named = [(path.name, path)]
            else:
                raise DataError(f"data.paths: {given} does not exist: fix the path or create the file")
            for name, p in named:
                if p.resolve() not in seen:  # a file listed directly and via its directory is read once
                    seen.add(p.resolve())
                    entries.append((name, p))
        searched = f"{', '.join(map(str, cfg.paths)) or '(data.paths is empty)'} (*{', *'.join(suffixes)})"
    else:
        raise ConfigError(f"data.format={cfg.format!r} is not valid: use one of stdlib_code, text, jsonl, parquet")
    if not entries:
        raise DataError(f"no corpus files found in {searched}: add files or fix data.paths / data.format")
    return entries


def _stdlib_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into (possibly huge) site-packages.
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]
        yield from (Path(dirpath, name) for name in filenames if name.endswith(".py"))


def corpus_files(cfg: DataConfig) -> list[Path]:
    """The corpus files in document order (sorted within each data.paths entry)."""
    return [path for _, path in corpus_manifest(cfg)]


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Yield every non-empty document of the corpus, always in the same order."""
    files = corpus_files(cfg)
    count = 0
    for path in files:
        for doc in _read_file(cfg, path):
            if doc:
                count += 1
                yield doc
    if cfg.format == "stdlib_code":
        topics = stdlib_topics()
        for name in sorted(topics):
            count += 1
            yield topics[name]
    if count == 0:
        shown = ", ".join(str(p) for p in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        raise DataError(f"no documents in {shown}: every file is empty or blank: add data or fix data.paths")


def _read_file(cfg: DataConfig, path: Path) -> Iterator[str]:
    if cfg.format == "jsonl":
        yield from _read_jsonl(path, cfg.text_field)
    elif cfg.format == "parquet":
        yield from _read_parquet(path, cfg.text_field)
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    fix = f"every line needs a string '{field}' (or set data.text_field)"
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path} line {lineno}: not valid JSON ({e.msg}): every line must be one JSON object"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}: {fix}")
            if field not in record:
                raise DataError(f"{path} line {lineno}: field '{field}' is missing: {fix}")
            value = record[field]
            if not isinstance(value, str):
                raise DataError(f"{path} line {lineno}: field '{field}' is {type(value).__name__}, not a string: {fix}")
            yield value


def _read_parquet(path: Path, column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot be read as parquet ({e}): check the file") from None
    schema = pf.schema_arrow
    if column not in schema.names:
        raise DataError(
            f"{path}: column '{column}' is missing (columns: {', '.join(schema.names)}): "
            "set data.text_field to the column that holds the text"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column '{column}' has type {kind}, not string: set data.text_field to a text column")
    # Batches keep memory bounded for files larger than RAM.
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
        for value in batch.column(0).to_pylist():
            if value is not None:  # null rows carry no text
                yield value


__all__ = ["DataError", "corpus_files", "corpus_manifest", "iter_documents", "stdlib_dir", "stdlib_topics"]
