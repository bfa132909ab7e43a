"""The agent over one export: perception (the router), reasoning (the routed task's layer), response.

    request -> router head on the base model's pooled hidden states (adapters off; its first
               task.router_depth of layers, and no more) -> task, confidence
            -> that task's layer: its LoRA adapter generates, or its classification head labels
               (below min_confidence: the fallback, the base model or a configured task)
            -> the answer, and a trace: task, confidence, runner-up, whether it fell back

`Agent` holds the model and the heads in one process (evaluation, the Hugging Face serving
engine); the serving deployments use its `route` and `classify` with whatever engine generates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from distlm.heads import ROUTER, load_head, pooled_hidden

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch (adapter_names)


@dataclass
class Route:
    """Where the router sends a request, and how sure it is (calibrated softmax probabilities)."""

    task: Optional[str]  # the layer that answers; None = the base model
    confidence: float  # the router's probability of its top task
    chosen: str  # the router's top task (also when it fell back)
    runner_up: Optional[str]
    runner_up_confidence: float
    fallback: bool = False  # the top task was below min_confidence

    def trace(self) -> Dict:
        return asdict(self)


class Heads:
    """The exported router and classification heads (export/router/, export/heads/<task>/)."""

    def __init__(self, export_dir: str | Path) -> None:
        export = Path(export_dir)
        self.layers: Dict[str, torch.nn.Linear] = {}
        self.configs: Dict[str, Dict] = {}
        found = [export / ROUTER] if (export / ROUTER / "head_config.json").is_file() else []
        found += sorted(p for p in (export / "heads").glob("*") if (p / "head_config.json").is_file())
        for directory in found:
            layer, config = load_head(directory)
            self.layers[config["name"]] = layer.eval()
            self.configs[config["name"]] = config

    @property
    def router(self) -> Optional[str]:
        return ROUTER if ROUTER in self.layers else None

    def to(self, device, dtype) -> Heads:
        self.layers = {name: layer.to(device=device, dtype=dtype) for name, layer in self.layers.items()}
        return self

    @torch.no_grad()
    def probabilities(self, name: str, features: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities from pooled hidden states."""
        layer, temperature = self.layers[name], self.configs[name].get("temperature", 1.0)
        return torch.softmax(layer(features.to(layer.weight.dtype)).float() / temperature, dim=-1)


def _batch(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = torch.tensor(list(p))
        mask[row, : len(p)] = 1
    return ids.to(device), mask.to(device)


class Agent:
    """Routing and classification with a loaded model (peft with the export's adapters, or plain)."""

    def __init__(self, model, heads: Heads, pad_id: int, min_confidence: float = 0.5, fallback: Optional[str] = None):
        self.model, self.heads, self.pad_id = model, heads, pad_id
        self.min_confidence, self.fallback = min_confidence, fallback
        self.device = next(model.parameters()).device

    def _features(self, prompts: Sequence[Sequence[int]], head: str) -> torch.Tensor:
        """The head's input: its adapter on each row (none = the base), the decoder layers it reads
        and no more (the router stops after the first task.router_depth of them). Adapters are
        chosen per row (peft's adapter_names), never switched on the shared model."""
        config = self.heads.configs[head]
        adapter, layers = config.get("adapter"), config.get("num_hidden_layers")
        ids, mask = _batch(prompts, self.pad_id, self.device)
        names = [adapter or BASE_ADAPTER] * len(prompts) if getattr(self.model, "peft_config", None) else None
        with torch.no_grad():
            return pooled_hidden(self.model, ids, mask, layers, stop=True, adapter_names=names)

    def route(self, prompts: Sequence[Sequence[int]]) -> List[Route]:
        """The router's choice for each request (the base model's features: no adapter involved)."""
        probs = self.heads.probabilities(ROUTER, self._features(prompts, ROUTER)).cpu()
        labels = self.heads.configs[ROUTER]["labels"]
        routes = []
        for row in probs:
            top = torch.topk(row, k=min(2, len(labels)))
            best, confidence = labels[int(top.indices[0])], float(top.values[0])
            runner, runner_conf = (
                (labels[int(top.indices[1])], float(top.values[1])) if len(labels) > 1 else (None, 0.0)
            )
            fallback = confidence < self.min_confidence
            task = (self.fallback if fallback else best) or None
            routes.append(Route(task, confidence, best, runner, runner_conf, fallback))
        return routes

    def classify(self, task: str, prompts: Sequence[Sequence[int]]) -> List[tuple[str, float]]:
        """(label, calibrated confidence) of a classification task's head, with its adapter under it."""
        config = self.heads.configs[task]
        probs = self.heads.probabilities(task, self._features(prompts, task)).cpu()
        confidence, index = probs.max(-1)
        return [(config["labels"][int(i)], float(c)) for i, c in zip(index, confidence)]
