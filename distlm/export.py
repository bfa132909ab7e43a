"""Export a distlm checkpoint to a Hugging Face directory (save_pretrained layout, safetensors).

Tensors are consolidated one at a time and written shard by shard, so exporting a
ZeRO-3 checkpoint never builds the whole state dict in memory. Task adapters go to
`adapters/<name>/` in peft's own layout. The output is written aside, checked against
the trained model's logits, and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import save_file

from distlm.checkpoint import SNAPSHOT, CheckpointError, registered, verify
from distlm.config import ConfigError
from distlm.heads import HEADS_DIR, ROUTER

MAX_SHARD_BYTES = 2 * 1024**3
ADAPTERS_DIR = "adapters"  # export/adapters/<name>/: peft layout
PEFT_PREFIX = "base_model.model."
# What a served model id selects besides a task: the agent (`<run>` with a router), the base (`<run>:base`).
AGENT = "__agent__"
BASE = "base"


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
        # An adapter's copy of a fully trained module (modules_to_save) is saved under the module's own name.
        copy = f".modules_to_save{marker}"
        if copy in name:
            return adapter, PEFT_PREFIX + name.replace(copy, ".")
    return None, name.replace(".base_layer.", ".").replace(".original_module.", ".")


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
    adapter_dirs = sorted(p for p in (checkpoint / ADAPTERS_DIR).glob("*") if p.is_dir())
    adapters = [p.name for p in adapter_dirs]
    wanted = set(_saved_names(config))
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    base = _ShardWriter(tmp)
    adapter_tensors: Dict[str, Dict[str, torch.Tensor]] = {a: {} for a in adapters}
    heads = json.loads((checkpoint / "heads.json").read_text()) if (checkpoint / "heads.json").exists() else {}
    head_tensors: Dict[str, Dict[str, torch.Tensor]] = {h: {} for h in heads}
    found = set()
    for name, tensor in iter_fp32_state_dict(checkpoint_dir, manifest["zero_stage"]):
        if heads:  # a TaskModel: the language model under `lm.`, the heads under `heads.<name>.`
            if name.startswith("heads."):
                head, _, key = name.removeprefix("heads.").rpartition(".")
                head_tensors[head][key] = tensor.clone()
                continue
            name = name.removeprefix("lm.")
        adapter, name = _split(name, adapters)
        if adapter is not None:
            # A copy: tied module copies (embedding and head) arrive as one shared tensor.
            adapter_tensors[adapter][name] = tensor.clone()
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
        target = tmp / ADAPTERS_DIR / adapter_dir.name
        target.mkdir(parents=True)
        shutil.copy(adapter_dir / "adapter_config.json", target / "adapter_config.json")
        if not adapter_tensors[adapter_dir.name]:
            raise CheckpointError(f"checkpoint {checkpoint_dir} has no weights for adapter {adapter_dir.name!r}")
        save_file(
            adapter_tensors[adapter_dir.name], str(target / "adapter_model.safetensors"), metadata={"format": "pt"}
        )

    for head, spec in heads.items():
        _write_head(tmp, head, spec, head_tensors[head], checkpoint_dir)

    info = {
        "checkpoint": str(checkpoint_dir),
        "step": manifest["step"],
        "zero_stage": manifest["zero_stage"],
        "shards": shards,
        "adapters": adapters,
        "heads": sorted(heads),
    }
    probe = checkpoint / "probe.pt"
    if verify_logits and probe.exists():
        info["probe_max_abs_diff"] = _check_probe(tmp, probe, adapters, list(heads))
    if merged and adapters:
        _write_merged(tmp, adapters)
    (tmp / "distlm_export.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return info


def head_dir(export_dir: Path, name: str) -> Path:
    """Where an exported head lives: export/router/ for the router, export/heads/<task>/ otherwise."""
    return Path(export_dir) / (ROUTER if name == ROUTER else f"{HEADS_DIR}/{name}")


def _write_head(export_dir: Path, name: str, spec: Dict, tensors: Dict[str, torch.Tensor], checkpoint: str) -> None:
    from distlm.heads import head_config

    if set(tensors) != {"weight", "bias"}:
        raise CheckpointError(f"checkpoint {checkpoint} has no complete weights for the head {name!r}")
    target = head_dir(export_dir, name)
    target.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(target / "head.safetensors"), metadata={"format": "pt"}
    )
    config = head_config(name, spec["labels"], spec["adapter"], spec.get("temperature", 1.0), spec.get("layers"))
    config["in_features"] = int(tensors["weight"].shape[1])
    (target / "head_config.json").write_text(json.dumps(config, indent=2))


def load_exported(export_dir: str, adapters: Optional[List[str]] = None):
    """The exported model with plain transformers (+ peft for adapters): no distlm code."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    if not adapters:
        return model
    from peft import PeftModel

    root = Path(export_dir) / ADAPTERS_DIR
    peft_model = PeftModel.from_pretrained(model, str(root / adapters[0]), adapter_name=adapters[0])
    for name in adapters[1:]:
        peft_model.load_adapter(str(root / name), adapter_name=name)
    return peft_model.eval()


# Largest |logit| difference between the export and the trained model that passes, by the precision
# the model trained in, for logits up to PROBE_SCALE in magnitude (larger ones scale it): bf16/fp16
# logits computed on another device (the driver's CPU after GPU training) differ in their last
# bits, and in fp32 summation order alone (another thread count) moves a 30-layer model's logits
# of ~20 by ~1e-4. A wrong export moves them by whole units.
PROBE_TOLERANCE = {"fp32": 1e-4, "bf16": 0.25, "fp16": 0.05}
PROBE_SCALE = 10.0


def _check_probe(export_dir: Path, probe_path: Path, adapters: List[str], heads: Optional[List[str]] = None) -> float:
    """Reload the export with plain transformers/peft and compare with the trained model's logits
    (in the precision it trained in: bf16 training keeps fp32 master weights, which the export holds)."""
    from transformers.utils import logging as hf_logging

    from distlm.runtime import torch_dtype

    hf_logging.disable_progress_bar()
    probe = torch.load(probe_path, map_location="cpu", weights_only=True)
    precision = probe.get("precision", "fp32")
    tolerance = PROBE_TOLERANCE[precision]
    model = load_exported(str(export_dir), adapters).to(torch_dtype(precision))
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
        for name in heads or []:
            from distlm.heads import load_head, pooled_hidden

            layer, config = load_head(head_dir(export_dir, name))
            layer = layer.to(torch_dtype(precision))
            ids = probe["input_ids"]
            if config["adapter"] is None:
                context = model.disable_adapter() if adapters else contextlib.nullcontext()
            else:
                model.set_adapter(config["adapter"])
                context = contextlib.nullcontext()
            with context:
                features = pooled_hidden(model, ids, torch.ones_like(ids), config.get("num_hidden_layers"))
            logits = layer(features.to(layer.weight.dtype)).float()
            diffs.append(float((logits - probe["heads"][name]).abs().max()))
    diff = max(diffs)
    expected = [probe["logits"], *probe.get("adapters", {}).values(), *probe.get("heads", {}).values()]
    allowed = tolerance * max(1.0, max(float(t.abs().max()) for t in expected) / PROBE_SCALE)
    if diff > allowed:
        raise CheckpointError(
            f"exported model's logits differ from the trained model's by {diff:.2e} (> {allowed:.1e} in {precision}): "
            "the export is wrong, "
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
    candidates = sorted(root.glob("step_*"), reverse=True)
    if (root / SNAPSHOT).exists():
        listed = set(registered(root))
        candidates = [c for c in candidates if c.name in listed]
    for c in candidates:
        try:
            verify(str(c))
            return str(c)
        except CheckpointError:
            continue
    raise CheckpointError(f"no complete checkpoint under {root}: train first (distlm train hydra.run.dir={run_dir})")


@dataclass(frozen=True)
class ExportInfo:
    """Where an export lives and the names it is served under: `<name>` (the agent when the export
    has a router, else the base model), `<name>:base`, and `<name>:<task>` for each task's layer."""

    path: str  # the export directory (config.json, weights, tokenizer)
    name: str  # the model's id in the API
    adapters: Dict[str, str] = field(default_factory=dict)  # task -> adapter directory (peft layout)
    heads: Dict[str, str] = field(default_factory=dict)  # classification task -> head directory
    router: Optional[str] = None  # the router's directory

    @property
    def tasks(self) -> List[str]:
        return sorted(set(self.adapters) | set(self.heads))

    @property
    def model_ids(self) -> List[str]:
        # `<name>:base` is listed where `<name>` is the agent (it is accepted either way).
        base = [f"{self.name}:{BASE}"] if self.router else []
        return [self.name, *base] + [f"{self.name}:{task}" for task in self.tasks]

    def task_for(self, model_id: str) -> Optional[str]:
        """What a model id selects: AGENT (the router picks a task per request), None (the base
        model) or a task; KeyError if the id is unknown."""
        if model_id == self.name:
            return AGENT if self.router else None
        base, _, task = model_id.partition(":")
        if base == self.name and task == BASE:
            return None
        if base == self.name and task in self.tasks:
            return task
        raise KeyError(model_id)

    def describe(self, model_id: str) -> str:
        task = self.task_for(model_id)
        if task == AGENT:
            return f"the agent: its router sends each request to one of {', '.join(self.tasks)} (or the base model)"
        if task is None:
            return "the base model, no task layer"
        if task in self.heads:
            under = " with its LoRA adapter under it" if task in self.adapters else ""
            return f"task {task}: a classification head{under}; answers with a label"
        return f"task {task}: the base model with this task's LoRA adapter"


def find_export(path: str, model_name: Optional[str] = None) -> ExportInfo:
    """Resolve a run directory (its `export/`) or an export directory; check that it is complete."""
    given = Path(path).expanduser().absolute()
    if not given.exists():
        raise ConfigError(f"{path} does not exist: give a run directory (runs/<run>) or an export directory")
    export = given / "export" if (given / "export").is_dir() else given
    if not (export / "config.json").is_file():
        hint = (
            f" (it has checkpoints: export them with `distlm export {given}`)"
            if (given / "checkpoints").is_dir()
            else ""
        )
        raise ConfigError(
            f"{path} holds no model export (no config.json in {export}){hint}: "
            "give a run directory (runs/<run>) or an export directory"
        )
    if not any(export.glob("model*.safetensors")) and not any(export.glob("pytorch_model*.bin")):
        raise ConfigError(f"{export} has a config.json but no weights (model.safetensors): re-export the run")
    if not (export / "tokenizer.json").is_file() and not (export / "tokenizer_config.json").is_file():
        raise ConfigError(f"{export} has no tokenizer files: re-export the run (distlm export) so it carries them")
    name = model_name or (given.name if export == given and given.name != "export" else export.parent.name)
    if ":" in name:
        raise ConfigError(f"the model name {name!r} contains ':' (it separates model and task): set serve.model_name")
    adapters = {}
    root = export / ADAPTERS_DIR
    for task_dir in sorted(root.iterdir()) if root.is_dir() else []:
        if not task_dir.is_dir():
            continue
        weights = task_dir / "adapter_model.safetensors"
        if not (task_dir / "adapter_config.json").is_file() or not weights.is_file():
            raise ConfigError(
                f"adapter {task_dir} is incomplete: it needs adapter_config.json and adapter_model.safetensors "
                "(peft's save_pretrained layout); re-export it or remove the directory"
            )
        try:
            json.loads((task_dir / "adapter_config.json").read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{task_dir / 'adapter_config.json'} is not valid JSON ({e}): re-export the adapter"
            ) from e
        adapters[task_dir.name] = str(task_dir)
    heads = {}
    for directory in [export / ROUTER, *sorted((export / HEADS_DIR).glob("*"))]:
        if not directory.is_dir():
            continue
        if not (directory / "head_config.json").is_file() or not (directory / "head.safetensors").is_file():
            raise ConfigError(
                f"head {directory} is incomplete: it needs head_config.json and head.safetensors; re-export the run "
                "(distlm export) or remove the directory"
            )
        heads[directory.name] = str(directory)
    if BASE in adapters or BASE in heads:
        raise ConfigError(f"{export} has a task named {BASE!r}, which `<model>:{BASE}` reserves: rename the task")
    router = heads.pop(ROUTER, None)
    return ExportInfo(str(export), name, adapters, heads, router)
