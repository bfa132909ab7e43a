"""Export a distlm checkpoint to a Hugging Face directory (save_pretrained layout, safetensors).

Tensors are consolidated one at a time and written shard by shard, so exporting a
ZeRO-3 checkpoint never builds the whole state dict in memory. The output is written
aside and renamed into place when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import save_file

from distlm.checkpoint import CheckpointError, verify

MAX_SHARD_BYTES = 2 * 1024**3


def _saved_names(config) -> List[str]:
    """State-dict names that save_pretrained would write: tied aliases (lm_head = wte) dropped."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    aliases = {n for n, _ in skeleton.named_parameters(remove_duplicate=False)} - {
        n for n, _ in skeleton.named_parameters()
    }
    return [n for n in skeleton.state_dict() if n not in aliases]


def export_checkpoint(
    checkpoint_dir: str, out_dir: str, tokenizer_dir: Optional[str] = None, verify_logits: bool = True
) -> Dict:
    from transformers import AutoConfig

    from distlm.engine import iter_fp32_state_dict

    manifest = verify(checkpoint_dir)
    config = AutoConfig.from_pretrained(checkpoint_dir)
    wanted = set(_saved_names(config))
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    shard: Dict[str, torch.Tensor] = {}
    shard_bytes, shards, weight_map, total = 0, [], {}, 0
    found = set()

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for name, tensor in iter_fp32_state_dict(checkpoint_dir, manifest["zero_stage"]):
        if name not in wanted or name in found:
            continue
        found.add(name)
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > MAX_SHARD_BYTES:
            flush()
        shard[name] = tensor.contiguous()
        shard_bytes += size
        total += size
    flush()
    missing = wanted - found
    if missing:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} lacks weights for {sorted(missing)[:5]}: it does not match its config.json"
        )
    # Rename to the standard names (one file: model.safetensors; several: an index).
    if len(shards) == 1:
        (tmp / shards[0]).rename(tmp / "model.safetensors")
    else:
        renamed = {s: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, s in enumerate(shards)}
        for old, new in renamed.items():
            (tmp / old).rename(tmp / new)
        index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(tmp)
    if (Path(checkpoint_dir) / "generation_config.json").exists():
        shutil.copy(Path(checkpoint_dir) / "generation_config.json", tmp)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, tmp / f.name)

    info = {
        "checkpoint": str(checkpoint_dir),
        "step": manifest["step"],
        "zero_stage": manifest["zero_stage"],
        "shards": len(shards),
    }
    probe = Path(checkpoint_dir) / "probe.pt"
    if verify_logits and probe.exists():
        info["probe_max_abs_diff"] = _check_probe(tmp, probe)
    (tmp / "distlm_export.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return info


def _check_probe(export_dir: Path, probe_path: Path, tolerance: float = 1e-4) -> float:
    """Reload the export with plain transformers and compare with the trained model's logits."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    probe = torch.load(probe_path, map_location="cpu", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits.float()
    diff = float((logits - probe["logits"]).abs().max())
    if diff > tolerance:
        raise CheckpointError(
            f"exported model's logits differ from the trained model's by {diff:.2e} (> {tolerance}): the export is wrong, "
            "please report this with the run's config"
        )
    return diff


def newest_checkpoint(run_dir: str) -> str:
    """The newest checkpoint of a run that Ray Train registered as complete."""
    root = Path(run_dir) / "checkpoints"
    snapshot = root / "checkpoint_manager_snapshot.json"
    candidates = sorted(root.glob("step_*"), reverse=True)
    if snapshot.exists():
        registered = snapshot.read_text()
        candidates = [c for c in candidates if f'"{c.name}"' in registered]
    for c in candidates:
        try:
            verify(str(c))
            return str(c)
        except CheckpointError:
            continue
    raise CheckpointError(f"no complete checkpoint under {root}: train first (distlm train hydra.run.dir={run_dir})")
