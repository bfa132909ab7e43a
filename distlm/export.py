"""Export a distlm checkpoint to a Hugging Face directory (save_pretrained layout, safetensors).

Tensors are consolidated one at a time and written shard by shard, so exporting a
ZeRO-3 checkpoint never builds the whole state dict in memory. Task adapters go to
`adapters/<name>/` in peft's own layout. The output is written aside, checked against
the trained model's logits, and renamed into place only when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import save_file

from distlm.checkpoint import CheckpointError, verify

MAX_SHARD_BYTES = 2 * 1024**3
PEFT_PREFIX = "base_model.model."


def _saved_names(config) -> List[str]:
    """State-dict names that save_pretrained would write: tied aliases (lm_head = wte) dropped."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    aliases = {n for n, _ in skeleton.named_parameters(remove_duplicate=False)} - {
        n for n, _ in skeleton.named_parameters()
    }
    return [n for n in skeleton.state_dict() if n not in aliases]


def _split(name: str, adapters: List[str]) -> Tuple[Optional[str], str]:
    """(adapter or None, name): a peft-wrapped name becomes the base model's name, or an
    adapter tensor's name in peft's saved layout (adapter name removed)."""
    if not adapters:
        return None, name
    name = name.removeprefix(PEFT_PREFIX)
    for adapter in adapters:
        marker = f".{adapter}."
        if ".lora_" in name and marker in name:
            return adapter, PEFT_PREFIX + name.replace(marker, ".")
    return None, name.replace(".base_layer.", ".")


class _ShardWriter:
    def __init__(self, directory: Path):
        self.directory, self.shard, self.shard_bytes = directory, {}, 0
        self.files: List[str] = []
        self.weight_map: Dict[str, str] = {}
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.shard and self.shard_bytes + size > MAX_SHARD_BYTES:
            self.flush()
        self.shard[name] = tensor.contiguous()
        self.shard_bytes += size
        self.total += size

    def flush(self) -> None:
        if self.shard:
            file = f"model-{len(self.files) + 1:05d}.safetensors"
            save_file(self.shard, str(self.directory / file), metadata={"format": "pt"})
            self.files.append(file)
            self.weight_map.update({k: file for k in self.shard})
            self.shard, self.shard_bytes = {}, 0

    def finish(self) -> int:
        """Standard names: one file is model.safetensors; several get an index."""
        self.flush()
        if len(self.files) == 1:
            (self.directory / self.files[0]).rename(self.directory / "model.safetensors")
        else:
            n = len(self.files)
            renamed = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(self.files)}
            for old, new in renamed.items():
                (self.directory / old).rename(self.directory / new)
            index = {
                "metadata": {"total_size": self.total},
                "weight_map": {k: renamed[v] for k, v in self.weight_map.items()},
            }
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return len(self.files)


def export_checkpoint(
    checkpoint_dir: str,
    out_dir: str,
    tokenizer_dir: Optional[str] = None,
    verify_logits: bool = True,
    merged: bool = False,
) -> Dict:
    from transformers import AutoConfig

    from distlm.engine import iter_fp32_state_dict

    manifest = verify(checkpoint_dir)
    checkpoint = Path(checkpoint_dir)
    config = AutoConfig.from_pretrained(checkpoint_dir)
    adapter_dirs = sorted(p for p in (checkpoint / "adapters").glob("*") if p.is_dir())
    adapters = [p.name for p in adapter_dirs]
    wanted = set(_saved_names(config))
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    base = _ShardWriter(tmp)
    adapter_tensors: Dict[str, Dict[str, torch.Tensor]] = {a: {} for a in adapters}
    found = set()
    for name, tensor in iter_fp32_state_dict(checkpoint_dir, manifest["zero_stage"]):
        adapter, name = _split(name, adapters)
        if adapter is not None:
            adapter_tensors[adapter][name] = tensor.contiguous()
        elif name in wanted and name not in found:
            found.add(name)
            base.add(name, tensor)
    shards = base.finish()
    missing = wanted - found
    if missing:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} lacks weights for {sorted(missing)[:5]}: it does not match its config.json"
        )
    config.save_pretrained(tmp)
    if (checkpoint / "generation_config.json").exists():
        shutil.copy(checkpoint / "generation_config.json", tmp)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, tmp / f.name)
    for adapter_dir in adapter_dirs:
        target = tmp / "adapters" / adapter_dir.name
        target.mkdir(parents=True)
        shutil.copy(adapter_dir / "adapter_config.json", target / "adapter_config.json")
        if not adapter_tensors[adapter_dir.name]:
            raise CheckpointError(f"checkpoint {checkpoint_dir} has no weights for adapter {adapter_dir.name!r}")
        save_file(
            adapter_tensors[adapter_dir.name], str(target / "adapter_model.safetensors"), metadata={"format": "pt"}
        )

    info = {
        "checkpoint": str(checkpoint_dir),
        "step": manifest["step"],
        "zero_stage": manifest["zero_stage"],
        "shards": shards,
        "adapters": adapters,
    }
    probe = checkpoint / "probe.pt"
    if verify_logits and probe.exists():
        info["probe_max_abs_diff"] = _check_probe(tmp, probe, adapters)
    if merged and adapters:
        _write_merged(tmp, adapters)
    (tmp / "distlm_export.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return info


def load_exported(export_dir: str, adapters: Optional[List[str]] = None):
    """The exported model with plain transformers (+ peft for adapters): no distlm code."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    if not adapters:
        return model
    from peft import PeftModel

    root = Path(export_dir) / "adapters"
    peft_model = PeftModel.from_pretrained(model, str(root / adapters[0]), adapter_name=adapters[0])
    for name in adapters[1:]:
        peft_model.load_adapter(str(root / name), adapter_name=name)
    return peft_model.eval()


def _check_probe(export_dir: Path, probe_path: Path, adapters: List[str], tolerance: float = 1e-4) -> float:
    """Reload the export with plain transformers/peft and compare with the trained model's logits."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    probe = torch.load(probe_path, map_location="cpu", weights_only=True)
    model = load_exported(str(export_dir), adapters)
    diffs = []
    with torch.no_grad():
        if adapters:
            with model.disable_adapter():
                diffs.append(_max_diff(model, probe["input_ids"], probe["logits"]))
            for name in adapters:
                model.set_adapter(name)
                diffs.append(_max_diff(model, probe["input_ids"], probe["adapters"][name]))
        else:
            diffs.append(_max_diff(model, probe["input_ids"], probe["logits"]))
    diff = max(diffs)
    if diff > tolerance:
        raise CheckpointError(
            f"exported model's logits differ from the trained model's by {diff:.2e} (> {tolerance}): the export is wrong, "
            "please report this with the run's config"
        )
    return diff


def _max_diff(model, input_ids: torch.Tensor, expected: torch.Tensor) -> float:
    return float((model(input_ids=input_ids).logits.float() - expected).abs().max())


def _write_merged(export_dir: Path, adapters: List[str]) -> None:
    """merged/<adapter>/: base + that adapter folded into plain weights."""
    for name in adapters:
        model = load_exported(str(export_dir), [name]).merge_and_unload()
        target = export_dir / "merged" / name
        model.save_pretrained(target)
        for f in export_dir.iterdir():
            if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, target / f.name)


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
