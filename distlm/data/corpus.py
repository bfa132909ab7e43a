"""Corpus readers: a DataConfig becomes an ordered list of files, cut into work units (shards)
whose documents any process can read on its own, in the same order every time.

Every document has an identity, (source, position): the file's stable name and where the
document starts in it (byte offset of a JSONL line, row of a parquet or arrow file, 0 for a
text file). The train/validation split is a function of that identity and the seed, so a
shard decides its documents' split by itself, wherever and in whatever order it runs.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Dict, Tuple

from distlm.config import ConfigError, DataConfig

# Directories of the standard library that are not representative library code.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
_SUFFIXES = {"text": (".txt", ".md"), "jsonl": (".jsonl",), "parquet": (".parquet",), "hf": (".arrow",)}
_PARQUET_BATCH_ROWS = 1024
TOPICS = "pydoc_data.topics"

# A unit of work: {"id": int, "bytes": int, "parts": [part, ...]}; a part is a whole file or a
# range of one: {"kind": text|jsonl|parquet|arrow|topics, "name", "path", "file" (its index in the
# manifest), "start", "end", "row0"}.
Unit = Dict[str, Any]
# (source, position, text)
Document = Tuple[str, int, str]


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
            if cfg.format == "hf" and path.is_dir():
                named = _hf_files(path, cfg.hf_split)
            elif path.is_dir():
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
        raise ConfigError(f"data.format={cfg.format!r} is not valid: use one of stdlib_code, text, jsonl, parquet, hf")
    if not entries:
        raise DataError(f"no corpus files found in {searched}: add files or fix data.paths / data.format")
    return entries


def _hf_files(path: Path, split: str) -> list[tuple[str, Path]]:
    """The arrow files of a dataset written by `save_to_disk` (a Dataset, or one split of a
    DatasetDict), in its own order; any other directory: its *.arrow files, sorted."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise DataError(
                f"{path} is a DatasetDict without the split {split!r} (splits: {', '.join(splits)}): "
                "set data.hf_split to one of them"
            )
        return [(f"{path.name}/{name}", p) for name, p in _hf_files(path / split, split)]
    state = path / "state.json"
    if state.is_file():
        files = [path / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(
                f"{path}: state.json lists missing files ({', '.join(missing[:3])}): save the dataset again"
            )
        return [(f"{path.name}/{f.name}", f) for f in files]
    found = sorted(p for p in path.rglob("*.arrow") if p.is_file())
    return [(f"{path.name}/{p.relative_to(path).as_posix()}", p) for p in found]


def _stdlib_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into (possibly huge) site-packages.
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]
        yield from (Path(dirpath, name) for name in filenames if name.endswith(".py"))


def corpus_files(cfg: DataConfig) -> list[Path]:
    """The corpus files in document order (sorted within each data.paths entry)."""
    return [path for _, path in corpus_manifest(cfg)]


def corpus_bytes(cfg: DataConfig, manifest: list[tuple[str, Path]] | None = None) -> int:
    manifest = corpus_manifest(cfg) if manifest is None else manifest
    total = sum(p.stat().st_size for _, p in manifest)
    if cfg.format == "stdlib_code":
        total += sum(len(t) for t in stdlib_topics().values())
    return total


# ---------------------------------------------------------------- work units


def plan_units(cfg: DataConfig, unit_bytes: int, manifest: list[tuple[str, Path]] | None = None) -> list[Unit]:
    """Cut the corpus into units of about `unit_bytes` of input, in document order.

    Consecutive small files share a unit; a large JSONL file is cut by byte ranges (a line
    belongs to the range its first byte is in), parquet by row groups, arrow by rows. A text
    file is one document and never cut. Column names and types are checked here, on the
    driver, so a wrong data.text_field fails before any task starts.
    """
    manifest = corpus_manifest(cfg) if manifest is None else manifest
    parts: list[dict] = []
    for index, (name, path) in enumerate(manifest):
        size = path.stat().st_size
        base = {"name": name, "path": str(path), "file": index}
        if cfg.format == "jsonl":
            for start in range(0, max(size, 1), unit_bytes):
                parts.append({**base, "kind": "jsonl", "start": start, "end": min(start + unit_bytes, size)})
        elif cfg.format == "parquet":
            parts.extend(_parquet_parts(path, base, cfg.text_field, size, unit_bytes))
        elif cfg.format == "hf":
            parts.extend(_arrow_parts(path, base, cfg.text_field, size, unit_bytes))
        else:
            parts.append({**base, "kind": "text", "start": 0, "end": size})
    if cfg.format == "stdlib_code":
        size = sum(len(t) for t in stdlib_topics().values())
        parts.append({"kind": "topics", "name": TOPICS, "path": "", "file": -1, "start": 0, "end": size})
    units: list[Unit] = []
    for part in parts:
        size = part.pop("bytes", part["end"] - part["start"])
        if not units or (units[-1]["bytes"] + size > unit_bytes and units[-1]["parts"]):
            units.append({"id": len(units), "bytes": 0, "parts": []})
        units[-1]["parts"].append(part)
        units[-1]["bytes"] += size
    return units


def _parquet_parts(path: Path, base: dict, column: str, size: int, unit_bytes: int) -> list[dict]:
    meta = _open_parquet(path, column).metadata
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    weight = sum(g.total_byte_size for g in groups) or 1
    parts, row = [], 0
    for i, group in enumerate(groups):
        group_bytes = max(1, size * group.total_byte_size // weight)
        if parts and parts[-1]["bytes"] + group_bytes <= unit_bytes:
            parts[-1]["end"], parts[-1]["bytes"] = i + 1, parts[-1]["bytes"] + group_bytes
        else:
            parts.append({**base, "kind": "parquet", "start": i, "end": i + 1, "row0": row, "bytes": group_bytes})
        row += group.num_rows
    return parts


def _arrow_parts(path: Path, base: dict, column: str, size: int, unit_bytes: int) -> list[dict]:
    rows = 0
    for batch in _arrow_batches(path, column):
        rows += batch.num_rows
    pieces = max(1, -(-size // unit_bytes))
    step = max(1, -(-rows // pieces))
    return [
        {
            **base,
            "kind": "arrow",
            "start": a,
            "end": min(a + step, rows),
            "bytes": size * (min(a + step, rows) - a) // max(rows, 1),
        }
        for a in range(0, max(rows, 1), step)
    ]


def read_unit(cfg: DataConfig, unit: Unit) -> Iterator[Document]:
    """Every non-empty document of a unit, in order, as (source, position, text)."""
    for part in unit["parts"]:
        kind, name, path = part["kind"], part["name"], Path(part["path"])
        if kind == "text":
            # Text mode: universal newlines, as a user's editor shows the file.
            text = path.read_text(encoding="utf-8", errors="replace")
            docs: Iterator[tuple[int, str]] = iter([(0, text)])
        elif kind == "topics":
            topics = stdlib_topics()
            yield from ((f"{TOPICS}/{t}", 0, topics[t]) for t in sorted(topics) if topics[t])
            continue
        elif kind == "jsonl":
            docs = _read_jsonl(path, cfg.text_field, part["start"], part["end"])
        elif kind == "parquet":
            docs = _read_parquet(path, cfg.text_field, part["start"], part["end"], part["row0"])
        else:
            docs = _read_arrow(path, cfg.text_field, part["start"], part["end"])
        for position, text in docs:
            if text:
                yield name, position, text


def documents(cfg: DataConfig) -> Iterator[Document]:
    """Every non-empty document of the corpus as (source, position, text), always in the same order."""
    count = 0
    for unit in plan_units(cfg, 1 << 62):
        for doc in read_unit(cfg, unit):
            count += 1
            yield doc
    if count == 0:
        raise no_documents(cfg)


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Yield every non-empty document of the corpus, always in the same order."""
    return (text for _, _, text in documents(cfg))


def no_documents(cfg: DataConfig) -> DataError:
    files = corpus_files(cfg)
    shown = ", ".join(str(p) for p in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    return DataError(f"no documents in {shown}: every file is empty or blank: add data or fix data.paths")


def _read_jsonl(path: Path, field: str, start: int, end: int) -> Iterator[tuple[int, str]]:
    """Documents of the lines that start in [start, end), keyed by their byte offset."""
    fix = f"every line needs a string '{field}' (or set data.text_field)"
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line under way at `start` belongs to the previous range
        offset = f.tell()
        while offset < end:
            raw = f.readline()
            if not raw:
                break
            line_start, offset = offset, offset + len(raw)
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{_where(path, line_start)}: not valid JSON ({e.msg}): every line must be one JSON object"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{_where(path, line_start)}: expected a JSON object, got {type(record).__name__}: {fix}"
                )
            if field not in record:
                raise DataError(f"{_where(path, line_start)}: field '{field}' is missing: {fix}")
            value = record[field]
            if not isinstance(value, str):
                raise DataError(
                    f"{_where(path, line_start)}: field '{field}' is {type(value).__name__}, not a string: {fix}"
                )
            yield line_start, value


def _where(path: Path, offset: int) -> str:
    """`<file> line <n>` for the line starting at byte `offset` (counted only for an error)."""
    count, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            chunk = f.read(min(1 << 20, offset - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return f"{path} line {count}"


def _check_text_column(path: Path, schema, column: str, what: str) -> None:
    import pyarrow as pa

    if column not in schema.names:
        raise DataError(
            f"{path}: {what} '{column}' is missing ({what}s: {', '.join(schema.names)}): "
            f"set data.text_field to the {what} that holds the text"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: {what} '{column}' has type {kind}, not string: set data.text_field to a text {what}")


def _open_parquet(path: Path, column: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot be read as parquet ({e}): check the file") from None
    _check_text_column(path, pf.schema_arrow, column, "column")
    return pf


def _read_parquet(path: Path, column: str, first: int, last: int, row0: int) -> Iterator[tuple[int, str]]:
    pf = _open_parquet(path, column)
    row = row0
    # Batches keep memory bounded for files larger than RAM.
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=range(first, last), columns=[column]):
        for value in batch.column(0).to_pylist():
            if value is not None:  # null rows carry no text
                yield row, value
            row += 1


def _arrow_batches(path: Path, column: str):
    """Record batches of an Arrow IPC file, memory-mapped: the stream format that
    `save_to_disk` writes, or the random-access file format."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path), "r")
        try:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"{path}: cannot be read as an Arrow file ({e}): give a dataset written by save_to_disk"
        ) from None
    _check_text_column(path, reader.schema, column, "column")
    yield from batches


def _read_arrow(path: Path, column: str, start: int, end: int) -> Iterator[tuple[int, str]]:
    row = 0
    for batch in _arrow_batches(path, column):
        a, b = max(start, row), min(end, row + batch.num_rows)
        if a < b:
            values = batch.slice(a - row, b - a).column(column).to_pylist()
            for i, value in enumerate(values):
                if value is not None:
                    yield a + i, value
        row += batch.num_rows
        if row >= end:
            break


__all__ = [
    "DataError",
    "Document",
    "Unit",
    "corpus_bytes",
    "corpus_files",
    "corpus_manifest",
    "documents",
    "iter_documents",
    "no_documents",
    "plan_units",
    "read_unit",
    "stdlib_dir",
    "stdlib_topics",
]
