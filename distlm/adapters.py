"""Task adaptation layers with peft: none (full fine-tuning), one shared LoRA, or one LoRA per task.

With per-task LoRA every optimizer step trains on one task (the mixture picks it), and
`activate` routes the whole step through that task's adapter; the other adapters take
no part in the forward pass, get no gradient, and their optimizer group is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch

from distlm.config import AdapterConfig
from distlm.export import ADAPTERS_DIR

SHARED = "shared"


def adapter_names(cfg: AdapterConfig, tasks: List[str]) -> List[str]:
    if cfg.name == "per_task_lora":
        return list(tasks)
    return [SHARED] if cfg.name == "lora" else []


def lora_config(cfg: AdapterConfig):
    from peft import LoraConfig

    targets = cfg.target_modules
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )


def apply_adapters(model: torch.nn.Module, cfg: AdapterConfig, tasks: List[str]) -> torch.nn.Module:
    """Wrap the model in peft with one adapter per name; the base is frozen."""
    names = adapter_names(cfg, tasks)
    if not names:
        return model
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(cfg), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, lora_config(cfg))
    # Every adapter trainable while DeepSpeed builds its optimizer groups over them.
    for param_name, param in peft_model.named_parameters():
        if "lora_" in param_name:
            param.requires_grad_(True)
    return peft_model


def activate(model: torch.nn.Module, cfg: AdapterConfig, task: Optional[str]) -> None:
    """Route the next forward passes through `task`'s adapter (per-task LoRA only).

    peft's set_adapter also freezes the other adapters for the step: ZeRO then hands the
    optimizer zero gradients for them (a trainable parameter that merely sat out the
    forward pass would keep ZeRO-3's stale gradient buffer), and their group is skipped.
    """
    if cfg.name == "per_task_lora" and task is not None:
        model.set_adapter(task)


def param_groups(model: torch.nn.Module, cfg: AdapterConfig, tasks: List[str], weight_decay: float) -> List[Dict]:
    """Optimizer groups. Per-task LoRA: one group per adapter, marked `skip_when_idle`, so an
    adapter whose task did not take part in a step keeps its weights and optimizer moments."""
    if cfg.name != "per_task_lora":
        from distlm.engine import param_groups as default_groups

        return default_groups(model, weight_decay)
    groups = []
    for task in tasks:
        params = [p for n, p in model.named_parameters() if f".{task}." in n and "lora_" in n]
        groups.append({"params": params, "weight_decay": 0.0, "skip_when_idle": True, "name": task})
    return groups


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter_configs(model: torch.nn.Module, directory: str) -> None:
    """Each adapter's resolved peft config (adapters/<name>/adapter_config.json): what export
    needs to split a consolidated state dict into the base and peft adapters."""
    for name, config in model.peft_config.items():
        config.save_pretrained(str(Path(directory) / ADAPTERS_DIR / name))
