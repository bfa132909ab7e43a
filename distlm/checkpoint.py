"""Train state and checkpoint layout.

A checkpoint directory (one per saved step, persisted by Ray Train) holds:
  state/                  DeepSpeed's shards (model, optimizer, scheduler), one file set per rank
  train_state_rank{r}.pt  step, sampler position, RNG states, tracker run id (per rank)
  manifest.json           step, world size, ZeRO stage: written by rank 0
  checksums_rank{r}.json  size and SHA-256 of every file rank r wrote, computed as it saved
  probe.pt                (final checkpoint only) a fixed batch and the trained model's logits
  metrics.jsonl           rank 0's logged records since the previous checkpoint

Ray Train registers a checkpoint only after every rank has reported it, so a crash while
saving leaves nothing that a resume would pick up. `verify` checks every file's size and
checksum; the driver checks the newest checkpoint before resuming, and resumes from the newest
intact one when it is damaged or missing (`find_resumable`); `distlm check` checks them all.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

FORMAT_VERSION = 2  # 2: checksums_rank{r}.json
RECORDS = "metrics.jsonl"
CHECKSUMS = "checksums_rank{rank}.json"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the run's checkpoints


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0
    sampler: Dict[str, Any] = field(default_factory=dict)
    tracker_run_id: Optional[str] = None
    tokens_seen: int = 0
    # Early stopping: the best value of the metric so far, its step, and evaluations since.
    best_value: Optional[float] = None
    best_step: int = 0
    evals_since_best: int = 0


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_train_state(
    directory: str,
    state: TrainState,
    rank: int,
    world_size: int,
    zero_stage: int,
    global_batch_size: Optional[int] = None,
) -> None:
    d = Path(directory)
    torch.save({"train_state": asdict(state), "rng": rng_state()}, d / f"train_state_rank{rank}.pt")
    if rank == 0:
        manifest = {"format": FORMAT_VERSION, "step": state.step, "world_size": world_size, "zero_stage": zero_stage}
        if global_batch_size is not None:  # a resume must keep it: the data order is in global batches
            manifest["global_batch_size"] = global_batch_size
        (d / "manifest.json").write_text(json.dumps(manifest, indent=2))


def write_records(directory: str, records: List[Dict[str, Any]]) -> None:
    (Path(directory) / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in records))


def recover_records(checkpoints: Path, metrics_path: Path) -> int:
    """Append to metrics.jsonl the records that the checkpoints hold and it lacks (a driver killed
    after a checkpoint was saved but before it wrote that step's records). Returns how many."""
    have = set()
    if metrics_path.exists():
        have = {json.loads(line)["step"] for line in metrics_path.read_text().splitlines() if line.strip()}
    missing = []
    for f in sorted(checkpoints.glob(f"step_*/{RECORDS}")):
        for record in (json.loads(line) for line in f.read_text().splitlines() if line.strip()):
            if record["step"] not in have:
                have.add(record["step"])
                missing.append(record)
    if missing:
        missing.sort(key=lambda r: r["step"])
        with metrics_path.open("a") as out:
            out.writelines(json.dumps(r) + "\n" for r in missing)
    return len(missing)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: str, rank: int) -> None:
    """Record the size and SHA-256 of every file this rank wrote (the last thing it writes)."""
    d = Path(directory)
    files = {
        str(p.relative_to(d)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(d.rglob("*"))
        if p.is_file() and not p.name.startswith("checksums_rank")
    }
    (d / CHECKSUMS.format(rank=rank)).write_text(json.dumps(files, indent=1))


def read_manifest(directory: str) -> Dict[str, Any]:
    path = Path(directory) / "manifest.json"
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not path.exists():
        raise CheckpointError(f"{directory} is not a complete distlm checkpoint (no manifest.json)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"checkpoint {directory} is damaged: manifest.json is not valid JSON ({e})") from e


def verify(directory: str, checksums: bool = True) -> Dict[str, Any]:
    """The manifest, after checking that every rank's files are there with the size (and, with
    checksums=True, the SHA-256) they were written with. Raises CheckpointError naming the files."""
    manifest = read_manifest(directory)
    d = Path(directory)
    problems: List[str] = []
    if manifest.get("format", 1) < 2:  # written before checksums: presence only
        problems += [
            f"train_state_rank{r}.pt missing"
            for r in range(manifest["world_size"])
            if not (d / f"train_state_rank{r}.pt").exists()
        ]
        if not (d / "state").is_dir():
            problems.append("state/ missing")
    for rank in range(manifest["world_size"] if manifest.get("format", 1) >= 2 else 0):
        listing = d / CHECKSUMS.format(rank=rank)
        if not listing.exists():
            problems.append(f"{listing.name} missing")
            continue
        for name, expected in json.loads(listing.read_text()).items():
            path = d / name
            if not path.is_file():
                problems.append(f"{name} missing")
            elif path.stat().st_size != expected["size"]:
                problems.append(f"{name} has {path.stat().st_size} bytes, {expected['size']} were written")
            elif checksums and _sha256(path) != expected["sha256"]:
                problems.append(f"{name} does not match the checksum it was written with")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"checkpoint {directory} is damaged: {'; '.join(problems[:3])}{more}")
    return manifest


def checkpoint_step(directory: str | Path) -> int:
    """The step of a checkpoint directory named step_<n> (object-storage paths too); -1 otherwise."""
    match = re.search(r"step_(\d+)$", str(directory).rstrip("/"))
    return int(match.group(1)) if match else -1


def registered(checkpoints: Path) -> List[str]:
    """The checkpoint directories Ray Train's snapshot lists (the ones it would resume from)."""
    try:
        snapshot = json.loads((checkpoints / SNAPSHOT).read_text())
        return [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def check_all(checkpoints: Path) -> List[Dict[str, Any]]:
    """Every step_* checkpoint of a run, newest first: step, path, registered, error (None = intact)."""
    listed = set(registered(checkpoints))
    names = {p.name for p in checkpoints.glob("step_*") if p.is_dir()} | listed
    rows = []
    for name in sorted(names, key=checkpoint_step, reverse=True):
        try:
            verify(str(checkpoints / name))
            error = None
        except CheckpointError as e:
            error = str(e)
        rows.append(
            {
                "step": checkpoint_step(name),
                "path": str(checkpoints / name),
                "registered": name in listed,
                "error": error,
            }
        )
    return rows


def _problem(directory: Path) -> Optional[str]:
    try:
        verify(str(directory))
        return None
    except CheckpointError as e:
        return str(e)


def find_resumable(checkpoints: Path, log) -> Optional[str]:
    """Before resuming: None when Ray Train can resume from its newest registered checkpoint as it is
    (only that one is read whole). Otherwise the newest intact checkpoint on disk, for the workers to
    start from: when Ray's newest is damaged or missing (the damaged ones and Ray's snapshot move to
    checkpoints/damaged/), or when a newer one, or any at all, was saved but never registered (the
    run failed right after saving; the snapshot moves to checkpoints/superseded/). Raises
    CheckpointError when none is intact (never a silent fresh start)."""
    listed = registered(checkpoints)
    on_disk = sorted((p for p in checkpoints.glob("step_*") if p.is_dir()), key=checkpoint_step, reverse=True)
    if not on_disk and not listed:
        return None
    missing = [name for name in listed if not (checkpoints / name).is_dir()]
    newest_listed = max(listed, key=checkpoint_step) if listed else None
    unregistered = newest_listed is None or (on_disk and checkpoint_step(on_disk[0]) > checkpoint_step(newest_listed))
    if not missing and not unregistered and _problem(checkpoints / newest_listed) is None:
        return None
    bad = [f"checkpoint {checkpoints / name} does not exist" for name in missing]
    to_move, newest = [], None
    for directory in on_disk:  # newest first, until one is intact
        problem = _problem(directory)
        if problem is None:
            newest = directory
            break
        bad.append(problem)
        to_move.append(directory)
    if newest is None:
        raise CheckpointError(
            f"no checkpoint of this run is intact ({'; '.join(bad[:3])}): they are left as they are for "
            "inspection (`distlm check` lists them); to train from scratch, use a new hydra.run.dir"
        )
    for line in bad:
        log(line)
    aside = checkpoints / ("damaged" if bad else "superseded") / time.strftime("%Y%m%d-%H%M%S")
    if to_move or listed:
        aside.mkdir(parents=True)
    for directory in to_move:
        shutil.move(str(directory), aside / directory.name)
    if listed:
        shutil.move(str(checkpoints / SNAPSHOT), aside / SNAPSHOT)
    if bad:
        log(f"resuming from {newest}, the newest intact checkpoint (the damaged ones are in {aside})")
    else:
        log(f"resuming from {newest}, the newest checkpoint: the run ended before Ray Train registered it")
    return str(newest)


def read_train_state(directory: str, rank: int) -> TrainState:
    """This rank's train state. On a run resumed with more workers than wrote the checkpoint, a new
    rank takes rank 0's: the data position is global (the same on every rank), and so is the rest
    but the RNG state, which only dropout reads."""
    manifest = verify(directory, checksums=False)  # sizes: the driver checked the checksums
    source = rank if rank < manifest["world_size"] else 0
    blob = torch.load(Path(directory) / f"train_state_rank{source}.pt", map_location="cpu", weights_only=False)
    set_rng_state(blob["rng"])
    return TrainState(**blob["train_state"])
