"""Train state and checkpoint layout.

A checkpoint directory (one per saved step, persisted by Ray Train) holds:
  state/                  DeepSpeed's shards (model, optimizer, scheduler), one file set per rank
  train_state_rank{r}.pt  step, sampler position, RNG states, tracker run id (per rank)
  manifest.json           step, world size, ZeRO stage: written by rank 0
  probe.pt                (final checkpoint only) a fixed batch and the trained model's logits
  metrics.jsonl           rank 0's logged records since the previous checkpoint

Ray Train registers a checkpoint only after every rank has reported it, so a crash while
saving leaves nothing that a resume would pick up; `verify` double-checks the files.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

FORMAT_VERSION = 1
RECORDS = "metrics.jsonl"


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


def write_train_state(directory: str, state: TrainState, rank: int, world_size: int, zero_stage: int) -> None:
    d = Path(directory)
    torch.save({"train_state": asdict(state), "rng": rng_state()}, d / f"train_state_rank{rank}.pt")
    if rank == 0:
        manifest = {"format": FORMAT_VERSION, "step": state.step, "world_size": world_size, "zero_stage": zero_stage}
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


def read_manifest(directory: str) -> Dict[str, Any]:
    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise CheckpointError(f"{directory} is not a distlm checkpoint (no manifest.json)")
    return json.loads(path.read_text())


def verify(directory: str) -> Dict[str, Any]:
    """The manifest, after checking that every rank's files are present."""
    manifest = read_manifest(directory)
    d = Path(directory)
    missing = [
        f"train_state_rank{r}.pt" for r in range(manifest["world_size"]) if not (d / f"train_state_rank{r}.pt").exists()
    ]
    if not (d / "state").is_dir():
        missing.append("state/")
    if missing:
        raise CheckpointError(
            f"checkpoint {directory} is incomplete, missing {', '.join(missing)}: delete it to resume from an earlier one"
        )
    return manifest


def read_train_state(directory: str, rank: int, world_size: int) -> TrainState:
    manifest = verify(directory)
    if manifest["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {directory} was written by {manifest['world_size']} workers, this run has {world_size}: "
            f"resume with cluster.num_workers={manifest['world_size']}"
        )
    blob = torch.load(Path(directory) / f"train_state_rank{rank}.pt", map_location="cpu", weights_only=False)
    set_rng_state(blob["rng"])
    return TrainState(**blob["train_state"])
