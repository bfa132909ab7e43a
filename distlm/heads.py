"""Classification heads and the router: task adaptation layers over the language model's hidden states.

A head reads the model's hidden states after its last norm, averaged over the request's tokens
(padding excluded), and maps them to its task's labels with one linear layer. A classification
task's head reads the final ones with that task's LoRA adapter active (when the run has
adapters), so adapter and head train together. The router is a head over the tasks themselves;
it reads the base model with every adapter disabled, so what it sees of a request does not
depend on which adapter happens to be active, and it can run before any adapter is chosen.
It reads only the first `task.router_depth` of the decoder layers (their output through the
model's final norm: what the base loaded with `num_hidden_layers=k` returns), so perception at
serving time costs a fraction of a prefill and stops there.

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

from distlm.config import ConfigError
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


def _child(module: torch.nn.Module, names: tuple, what: str) -> torch.nn.Module:
    for name in names:
        if isinstance(getattr(module, name, None), torch.nn.Module):
            return getattr(module, name)
    raise ConfigError(
        f"task.router_depth < 1 needs the decoder's {what} ({' or '.join(names)}), which "
        f"{type(module).__name__} does not have: set task.router_depth=1.0 for this model"
    )


def num_layers(lm: torch.nn.Module) -> int:
    return int(lm.config.get_text_config().num_hidden_layers)


def router_layers(lm: torch.nn.Module, depth: float) -> int:
    """The number of decoder layers the router reads: round(depth x layers), at least 1."""
    return max(1, min(num_layers(lm), round(depth * num_layers(lm))))


def router_flops_per_token(lm: torch.nn.Module, seq_len: int, layers: int) -> float:
    """A router step's FLOPs per token: the forward alone (2 per parameter, 4*d*T of attention a
    layer) through the decoder layers it computes; no gradient reaches the base, only its head."""
    from distlm.models import numel

    blocks = _child(decoder(lm), ("layers", "h"), "layer list")
    params = sum(numel(p) for block in list(blocks)[:layers] for p in block.parameters())
    return 2.0 * params + 4.0 * layers * hidden_size(lm) * seq_len


class _Stop(Exception):
    """Raised by the hook on the last layer a head reads: nothing after it needs computing."""


def _captured(call, capture_at: torch.nn.Module, stop: bool) -> torch.Tensor:
    """Run call() and return what `capture_at` outputs in it; stop=True skips everything after it."""
    seen: List[torch.Tensor] = []

    def capture(_module, _args, output):
        seen.append(output[0] if isinstance(output, tuple) else output)
        if stop:
            raise _Stop

    handle = capture_at.register_forward_hook(capture)
    try:
        call()
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


@contextlib.contextmanager
def rows_through(lm: torch.nn.Module, adapter_names: Optional[List[str]]):
    """Inside, each row of a batch goes through its own peft adapter ("__base__": none), without
    switching the model's adapters (switching them all off costs more than a forward here): peft's
    mixed-batch forward (adapter_names), with the hooks that pass it always removed, also when the
    forward is cut short (peft's own context leaves them behind on an exception)."""
    if adapter_names is None:
        yield
        return
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    def inject(_module, args, kwargs):
        return args, {**kwargs, "adapter_names": adapter_names}

    handles = []
    try:
        for module in lm.modules():
            if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
                handles.append(module.register_forward_pre_hook(inject, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def pooled_hidden(
    lm: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Optional[int] = None,
    stop: bool = False,
    adapter_names: Optional[List[str]] = None,
) -> torch.Tensor:
    """Hidden states after the final norm averaged over the tokens of each request: (batch, hidden).
    layers=None reads the final ones; layers=k the output of the k-th decoder layer put through the
    final norm (= last_hidden_state of the model loaded with num_hidden_layers=k). stop=True skips
    the layers after it (not under ZeRO-3: it gathers parameters per layer in forward order).
    adapter_names: each row's peft adapter (see rows_through)."""
    model = decoder(lm)

    def call():
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    with rows_through(lm, adapter_names):
        if layers is None or layers >= num_layers(lm):
            hidden = call().last_hidden_state
        else:
            norm = _child(model, ("norm", "ln_f", "final_layernorm"), "final norm")
            hidden = norm(_captured(call, _child(model, ("layers", "h"), "layer list")[layers - 1], stop))
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The language model inside a TaskModel (the model itself when it has no heads)."""
    return model.lm if isinstance(model, TaskModel) else model


class TaskModel(torch.nn.Module):
    """The language model (with its peft adapters, if any) plus one linear head per classification
    task and, optionally, the router. forward(head=None) is the language model's own forward.
    stop_early: a head that reads fewer layers than the model has skips the rest (the router reads
    a quarter of them); not under ZeRO-3, which gathers parameters in the traced forward order."""

    def __init__(
        self,
        lm: torch.nn.Module,
        heads: Dict[str, List[str]],
        layers: Optional[Dict[str, Optional[int]]] = None,
        stop_early: bool = False,
    ) -> None:
        super().__init__()
        self.lm, self.stop_early = lm, stop_early
        self.labels = dict(heads)
        self.layers = {name: (layers or {}).get(name) for name in heads}  # decoder layers each reads; None = all
        hidden = hidden_size(lm)
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(hidden, len(labels)) for name, labels in heads.items()})

    @property
    def config(self):
        return self.lm.config

    def forward(self, head: Optional[str] = None, class_labels: Optional[torch.Tensor] = None, **batch):
        if head is None:
            return self.lm(**batch)

        def read():
            return pooled_hidden(
                self.lm, batch["input_ids"], batch["attention_mask"], self.layers[head], self.stop_early
            )

        if head == ROUTER:
            # The base alone, no gradient into it: the router's features are fixed by the base.
            frozen = self.lm.disable_adapter() if hasattr(self.lm, "disable_adapter") else contextlib.nullcontext()
            with frozen, torch.no_grad():
                features = read()
        else:
            features = read()
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
    directory: str, model: TaskModel, adapter_cfg, tasks: List[str], temperatures: Dict[str, float]
) -> None:
    """heads.json in a checkpoint: each head's labels, the adapter under it, the decoder layers it
    reads and the temperature that calibrates it (fitted at the newest evaluation), for the export."""
    heads = {
        name: {
            "labels": names,
            "adapter": head_adapter(name, adapter_cfg, tasks),
            "layers": model.layers[name],
            "temperature": temperatures.get(name, 1.0),
        }
        for name, names in model.labels.items()
    }
    (Path(directory) / "heads.json").write_text(json.dumps(heads, indent=2))


def head_config(
    name: str, labels: List[str], adapter: Optional[str], temperature: float = 1.0, layers: Optional[int] = None
) -> Dict:
    """What export/heads/<task>/head_config.json (or export/router/) says about a head."""
    which = "final hidden states" if layers is None else f"hidden states after decoder layer {layers}"
    return {
        "name": name,
        "labels": labels,
        "in_features": None,  # filled at export from the weight
        "pooling": POOLING,
        "hidden_states": f"{which} of the model, through its final norm, averaged over the request's "
        "tokens (attention mask 1)",
        # Decoder layers the head reads (null = all): the base loaded with num_hidden_layers=<this>
        # returns its features as last_hidden_state.
        "num_hidden_layers": layers,
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
    configs = export_heads.configs
    model = TaskModel(
        lm,
        {name: config["labels"] for name, config in configs.items()},
        {name: config.get("num_hidden_layers") for name, config in configs.items()},
        stop_early=True,
    )
    with torch.no_grad():
        for name, layer in export_heads.layers.items():
            model.heads[name].load_state_dict(layer.state_dict())
    return model.eval()
