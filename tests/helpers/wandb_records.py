"""Read back a W&B offline run file (run-<id>.wandb) without a server.

The file is a LevelDB-style log (32 KiB blocks of checksummed chunks) after a 7-byte
W&B header; each record is a protobuf `wandb_internal_pb2.Record`. Recent wandb
releases no longer ship a Python reader, so the tests carry this small one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Dict, Iterator, List

BLOCK = 32768
HEADER = 7  # ":W&B" + 2-byte magic + 1-byte version
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_raw(path: Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            break


def read_run(path: Path) -> Dict[str, Any]:
    """{'run_id', 'config': {...}, 'history': [{key: value}, ...]} of one offline run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    run: Dict[str, Any] = {"run_id": None, "config": {}, "history": []}
    for raw in iter_raw(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["run_id"] = record.run.run_id
            for item in record.run.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            run["history"].append(row)
    return run


def read_runs(wandb_dir: Path) -> List[Dict[str, Any]]:
    return [read_run(f) for f in sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"))]
