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
from distlm.heads import ROUTER, language_model

SHARED = "shared"


def adapter_names(cfg: AdapterConfig, tasks: List[str]) -> List[str]:
    """The peft adapters of a run: one per task (the router has none: it reads the base), or one shared."""
    if cfg.name == "per_task_lora":
        return [task for task in tasks if task != ROUTER]
    return [SHARED] if cfg.name == "lora" else []


def is_adapter_param(name: str, adapter: Optional[str] = None) -> bool:
    """A LoRA weight or an adapter's own copy of a fully trained module (of `adapter`, if given)."""
    if "lora_" not in name and ".modules_to_save." not in name:
        return False
    return adapter is None or f".{adapter}." in name


def _tied_head(model: torch.nn.Module) -> bool:
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embeddings is not None and head.weight is embeddings.weight


def modules_to_save(model: torch.nn.Module, cfg: AdapterConfig) -> List[str]:
    """The full names of the modules each adapter trains a copy of (adapter.modules_to_save
    resolved on this model); ValueError naming the entry that matches nothing."""
    found = set()
    for item in cfg.modules_to_save:
        if item == "embeddings":
            head = model.get_output_embeddings() if _tied_head(model) else None
            names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding) or m is head]
        elif item == "norms":
            names = [
                n
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))
            ]
        else:
            names = [n for n, _ in model.named_modules() if n and (n == item or n.endswith("." + item))]
        if not names:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules()} - {""})
            examples = ", ".join([leaf for leaf in leaves if not leaf.isdigit()][:10])
            raise ValueError(
                f"adapter.modules_to_save: {item!r} matches no module of this {type(model).__name__}: use "
                f"embeddings, norms, or module names it has ({examples}, ...)"
            )
        found.update(names)
    return sorted(found)


def lora_config(cfg: AdapterConfig, save: Optional[List[str]] = None):
    from peft import LoraConfig

    targets = cfg.target_modules
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else list(targets),
        modules_to_save=list(save) if save else None,
        task_type="CAUSAL_LM",
    )


def apply_adapters(model: torch.nn.Module, cfg: AdapterConfig, tasks: List[str]) -> torch.nn.Module:
    """Wrap the model in peft with one adapter per name; the base is frozen."""
    names = adapter_names(cfg, tasks)
    if not names:
        return model
    from peft import get_peft_model

    save = modules_to_save(model, cfg)
    tied = _tied_head(model)
    peft_model = get_peft_model(model, lora_config(cfg, save), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, lora_config(cfg, save))
    head, embeddings = peft_model.get_output_embeddings(), peft_model.get_input_embeddings()
    if tied and hasattr(head, "modules_to_save") and hasattr(embeddings, "modules_to_save"):
        # Each adapter's output head copy stays tied to its embedding copy, as in the base
        # (peft's ensure_weight_tying covers only the first adapter).
        for name in names:
            head.modules_to_save[name].weight = embeddings.modules_to_save[name].weight
    # Every adapter trainable while DeepSpeed builds its optimizer groups over them.
    for param_name, param in peft_model.named_parameters():
        if is_adapter_param(param_name):
            param.requires_grad_(True)
    return peft_model


def activate(model: torch.nn.Module, cfg: AdapterConfig, task: Optional[str]) -> None:
    """Route the next forward passes through `task`'s adapter (per-task LoRA only; the router's
    steps read the base, so every adapter is frozen for them).

    peft's set_adapter also freezes the other adapters for the step: ZeRO then hands the
    optimizer zero gradients for them (a trainable parameter that merely sat out the
    forward pass would keep ZeRO-3's stale gradient buffer), and their group is skipped.
    """
    if cfg.name == "per_task_lora" and task is not None:
        if task in model.peft_config:
            model.set_adapter(task)
        # peft's set_adapter unfreezes the new adapter's module copies (modules_to_save) but
        # freezes only the previously active adapter's: freeze every other adapter here.
        for name, param in model.named_parameters():
            if is_adapter_param(name):
                param.requires_grad_(is_adapter_param(name, task))


def param_groups(model: torch.nn.Module, cfg: AdapterConfig, tasks: List[str], weight_decay: float) -> List[Dict]:
    """Optimizer groups, each with the tasks whose steps train it ("tasks"; see engine.TaskAwareAdamW):
    a per-task adapter and a task's head train only on that task's steps, the router's head only
    on the router's, and the shared model (full fine-tuning, or one shared LoRA) on every task's
    step but the router's. An idle group keeps its weights and optimizer moments."""
    from distlm.engine import param_groups as default_groups

    heads = getattr(model, "heads", None)
    lm = language_model(model)
    task_steps = [t for t in tasks if t != ROUTER]
    if cfg.name == "per_task_lora":
        groups = []
        for task in task_steps:
            params = [p for n, p in lm.named_parameters() if is_adapter_param(n, task)]
            groups.append({"params": params, "weight_decay": 0.0, "tasks": [task], "name": task})
    else:
        groups = [g | {"tasks": task_steps or None} for g in default_groups(lm, weight_decay)]
    for name, head in (heads or {}).items():
        groups.append(
            {
                "params": list(head.parameters()),
                "weight_decay": 0.0,
                "tasks": [name],
                "name": f"head:{name}",
                "lr_scale": cfg.head_lr_scale,
            }
        )
    return [g for g in groups if g["params"]]


def save_adapter_configs(model: torch.nn.Module, directory: str) -> None:
    """Each adapter's resolved peft config (adapters/<name>/adapter_config.json): what export
    needs to split a consolidated state dict into the base and peft adapters."""
    for name, config in model.peft_config.items():
        config.save_pretrained(str(Path(directory) / ADAPTERS_DIR / name))
