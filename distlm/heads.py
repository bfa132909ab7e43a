"""Classification heads and the router: task adaptation layers over the language model's hidden states.

A head reads the model's final hidden states (after its last norm), averaged over the request's
tokens (padding excluded), and maps them to its task's labels with one linear layer. A
classification task's head reads them with that task's LoRA adapter active (when the run has
adapters), so adapter and head train together. The router is a head over the tasks themselves;
it reads the base model with every adapter disabled, so what it sees of a request does not
depend on which adapter happens to be active, and it can run before any adapter is chosen.

`TaskModel` wraps the language model and its heads in one module, so DeepSpeed shards and
checkpoints them together; the model itself still knows nothing about ranks.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from distlm.data.tasks import ROUTER

HEADS_DIR = "heads"  # export/heads/<task>/ and export/router/: head.safetensors + head_config.json
POOLING = "mean"  # the final hidden states averaged over the request's tokens


@dataclass
class HeadOutput:
    loss: Optional[torch.Tensor]
    logits: torch.Tensor


def hidden_size(lm: torch.nn.Module) -> int:
    config = lm.config
    return int(config.get_text_config().hidden_size)


def decoder(lm: torch.nn.Module) -> torch.nn.Module:
    """The transformer under the output head (transformers' `base_model`), with any LoRA layers
    peft injected into it."""
    causal_lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return causal_lm.base_model


def pooled_hidden(lm: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states averaged over the tokens of each request: (batch, hidden)."""
    hidden = decoder(lm)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


class TaskModel(torch.nn.Module):
    """The language model (with its peft adapters, if any) plus one linear head per classification
    task and, optionally, the router. forward(head=None) is the language model's own forward."""

    def __init__(self, lm: torch.nn.Module, heads: Dict[str, List[str]]) -> None:
        super().__init__()
        self.lm = lm
        self.labels = dict(heads)
        hidden = hidden_size(lm)
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(hidden, len(labels)) for name, labels in heads.items()})

    @property
    def config(self):
        return self.lm.config

    def forward(self, head: Optional[str] = None, class_labels: Optional[torch.Tensor] = None, **batch):
        if head is None:
            return self.lm(**batch)
        if head == ROUTER:
            # The base alone, no gradient into it: the router's features are fixed by the base.
            frozen = self.lm.disable_adapter() if hasattr(self.lm, "disable_adapter") else contextlib.nullcontext()
            with frozen, torch.no_grad():
                features = pooled_hidden(self.lm, batch["input_ids"], batch["attention_mask"])
        else:
            features = pooled_hidden(self.lm, batch["input_ids"], batch["attention_mask"])
        layer = self.heads[head]
        logits = layer(features.to(layer.weight.dtype)).float()
        loss = None
        if class_labels is not None:
            loss = torch.nn.functional.cross_entropy(logits, class_labels)
        return HeadOutput(loss, logits)

    def generate(self, *args, **kwargs):
        return self.lm.generate(*args, **kwargs)


def head_adapter(name: str, adapter_cfg, tasks: List[str]) -> Optional[str]:
    """The peft adapter active under a head: the task's own (per-task LoRA), the shared one, or none
    (full fine-tuning, and always for the router, which reads the base)."""
    if name == ROUTER or adapter_cfg.name == "none":
        return None
    return name if adapter_cfg.name == "per_task_lora" else "shared"


def write_heads_config(
    directory: str, labels: Dict[str, List[str]], adapter_cfg, tasks: List[str], temperatures: Dict[str, float]
) -> None:
    """heads.json in a checkpoint: each head's labels, the adapter under it and the temperature that
    calibrates it (fitted at the newest evaluation), for the export."""
    heads = {
        name: {
            "labels": names,
            "adapter": head_adapter(name, adapter_cfg, tasks),
            "temperature": temperatures.get(name, 1.0),
        }
        for name, names in labels.items()
    }
    (Path(directory) / "heads.json").write_text(json.dumps(heads, indent=2))


def head_config(name: str, labels: List[str], adapter: Optional[str], temperature: float = 1.0) -> Dict:
    """What export/heads/<task>/head_config.json (or export/router/) says about a head."""
    return {
        "name": name,
        "labels": labels,
        "in_features": None,  # filled at export from the weight
        "pooling": POOLING,
        "hidden_states": "final hidden states of the model (after its last norm), averaged over the "
        "request's tokens (attention mask 1)",
        # The peft adapter (export/adapters/<adapter>/) active under the head; null = the base model alone.
        "adapter": adapter,
        # Softmax temperature that calibrates the head's confidence (fitted on held-out examples).
        "temperature": temperature,
    }


def load_head(directory: str | Path):
    """(torch.nn.Linear, config) of an exported head: plain torch and safetensors, no distlm needed."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "head_config.json").read_text())
    weights = load_file(str(directory / "head.safetensors"))
    layer = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
    layer.load_state_dict(weights)
    return layer, config


def attach_heads(lm: torch.nn.Module, export_heads) -> TaskModel:
    """A TaskModel over a loaded export: the language model and the exported heads' weights."""
    model = TaskModel(lm, {name: config["labels"] for name, config in export_heads.configs.items()})
    with torch.no_grad():
        for name, layer in export_heads.layers.items():
            model.heads[name].load_state_dict(layer.state_dict())
    return model.eval()
