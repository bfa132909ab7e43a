"""Build causal LMs with transformers. The model knows nothing about ranks or DeepSpeed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from distlm.config import ConfigError, ModelConfig

# Names of the feed-forward width where an architecture does not call it intermediate_size.
_FFN_NAME = {"gpt2": "n_inner", "gpt_neo": "intermediate_size", "gptj": "n_inner"}


def build_config(cfg: ModelConfig, vocab_size: int, seq_len: int, eos_token_id: int) -> PretrainedConfig:
    """A transformers config for random init, from the generic sizes in ModelConfig."""
    try:
        hf = AutoConfig.for_model(cfg.arch)
    except ValueError as e:
        raise ConfigError(
            f"model.arch={cfg.arch!r} is not a transformers model type: use e.g. gpt2, llama, qwen2, mistral"
        ) from e
    # attribute_map translates the generic names (hidden_size, ...) to each architecture's own.
    sizes = {
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": seq_len,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "use_cache": True,
    }
    if cfg.intermediate_size is not None:
        sizes[_FFN_NAME.get(cfg.arch, "intermediate_size")] = cfg.intermediate_size
    for key, value in sizes.items():
        setattr(hf, key, value)
    # Pretraining from scratch uses no dropout (as modern LMs do); it also keeps runs
    # on different worker counts numerically comparable. `model.extra` can set it back.
    for key in list(hf.to_dict()):
        if key.endswith("pdrop") or key.endswith("dropout") or key == "dropout":
            if isinstance(getattr(hf, key, None), float):
                setattr(hf, key, 0.0)
    for key, value in cfg.extra.items():
        setattr(hf, key, value)
    return hf


def build_model(
    cfg: ModelConfig,
    vocab_size: int,
    seq_len: int,
    eos_token_id: int,
    seed: int,
    init_from: Optional[str] = None,
) -> PreTrainedModel:
    """Load `init_from`/`cfg.pretrained` if given, else a random init seeded identically on every rank."""
    source = init_from or cfg.pretrained
    if source is not None:
        if not (Path(source) / "config.json").exists():
            raise ConfigError(f"{source} has no config.json: give a directory written by save_pretrained")
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    else:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            build_config(cfg, vocab_size, seq_len, eos_token_id), dtype=torch.float32
        )
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters counted once even when tied (embedding and LM head)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*d*T for attention (PaLM appendix B)."""
    c = model.config
    return 6.0 * count_parameters(model) + 12.0 * c.num_hidden_layers * c.hidden_size * seq_len
