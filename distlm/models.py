"""Build or load causal LMs with transformers. The model knows nothing about ranks or DeepSpeed.

Pretrained models come from a local Hugging Face directory or a `.gguf` file; a GGUF file is
converted once (dequantised to float) into a Hugging Face directory in the cache and reused.
Random initialisation is a function of the seed and each module's name only, so a run starts
from the same weights whatever the ZeRO stage or the number of workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from distlm.cache import building, is_complete
from distlm.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

# Names of the feed-forward width where an architecture does not call it intermediate_size.
_FFN_NAME = {"gpt2": "n_inner", "gpt_neo": "intermediate_size", "gptj": "n_inner"}
GGUF_MAGIC = b"GGUF"
# Bump when the conversion changes: older converted directories become cache misses.
_CONVERSION_VERSION = 1
# GGUF architectures transformers reads that are not causal language models.
_NOT_CAUSAL_LM = {"general", "tokenizer", "t5", "umt5"}

# Gathers a module's partitioned parameters for the duration of a block (ZeRO-3), or does nothing.
Gather = Callable[[Iterable[torch.nn.Parameter]], ContextManager]


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
    if getattr(hf, "head_dim", None) is not None:
        # Computed from the default sizes when the config was made: follow the new ones.
        sizes["head_dim"] = cfg.hidden_size // cfg.num_heads
    for key, value in sizes.items():
        setattr(hf, key, value)
    layer_types = getattr(hf, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) != cfg.num_layers:
        # Per-layer attention types (qwen2, ...) were listed for the default depth when the config
        # was made; transformers refuses to save such a config. Made again for the new depth.
        fields = hf.to_dict()
        fields.pop("layer_types")
        hf = type(hf).from_dict(fields)
    # Pretraining from scratch uses no dropout (as modern LMs do); it also keeps runs
    # on different worker counts numerically comparable. `model.extra` can set it back.
    for key in list(hf.to_dict()):
        if key.endswith("pdrop") or key.endswith("dropout") or key == "dropout":
            if isinstance(getattr(hf, key, None), float):
                setattr(hf, key, 0.0)
    for key, value in cfg.extra.items():
        setattr(hf, key, value)
    return hf


def _no_gather(params: Iterable[torch.nn.Parameter]) -> ContextManager:
    return contextlib.nullcontext()


def build_model(
    cfg: ModelConfig,
    vocab_size: int,
    seq_len: int,
    eos_token_id: int,
    seed: int,
    init_from: Optional[str] = None,
    gather: Gather = _no_gather,
) -> PreTrainedModel:
    """Load `init_from`/`cfg.pretrained` (a Hugging Face directory) if given, else a random init.

    Under ZeRO-3 the caller keeps transformers' DeepSpeed config alive (engine.Engine), so
    transformers builds the model inside deepspeed.zero.Init and loads weights straight into
    each rank's partitions; `gather` then makes one module's parameters whole at a time.
    """
    source = init_from or cfg.pretrained
    if source is not None:
        if not (Path(source) / "config.json").exists():
            raise ConfigError(f"{source} has no config.json: give a directory written by save_pretrained or a .gguf")
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, local_files_only=True)
    else:
        from transformers.initialization import no_init_weights

        # transformers' own init is skipped: init_weights below sets every weight exactly once.
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(
                build_config(cfg, vocab_size, seq_len, eos_token_id), dtype=torch.float32
            )
        init_weights(model, seed, gather)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@torch.no_grad()
def init_weights(model: PreTrainedModel, seed: int, gather: Gather = _no_gather) -> None:
    """transformers' initialisation of every module, each from its own generator seeded by
    (seed, module name): the result does not depend on the order or the place (whole or
    partitioned) in which modules are built. Children first, as transformers does, because a
    module's init may overwrite a child's weights (GPT-2's scaled residual projections)."""
    # Tied weights (an output head sharing the embedding) must be one tensor before the init, as
    # they are after it: which module initialises them last then is the same in every case.
    model.tie_weights()
    for param in model.parameters():
        param._is_hf_initialized = False

    def apply(module: torch.nn.Module, prefix: str, init: Callable[[torch.nn.Module], None]) -> None:
        for name, child in module.named_children():
            apply(child, f"{prefix}{name}.", child._init_weights if isinstance(child, PreTrainedModel) else init)
        params = list(module.parameters(recurse=False))
        for child in module.children():
            if not isinstance(child, PreTrainedModel):
                params.extend(child.parameters(recurse=False))
        digest = hashlib.sha256(f"{seed}:{prefix}".encode()).digest()
        with torch.random.fork_rng(devices=[]), gather(params):
            torch.manual_seed(int.from_bytes(digest[:8], "big") >> 1)
            init(module)

    apply(model, "", model._init_weights)


def numel(param: torch.Tensor) -> int:
    """A parameter's full size, also when ZeRO-3 holds only a partition of it here."""
    return int(getattr(param, "ds_numel", param.numel()))


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters counted once even when tied (embedding and LM head)."""
    return sum(numel(p) for p in model.parameters())


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*d*T for attention (PaLM appendix B)."""
    c = model.config
    return 6.0 * count_parameters(model) + 12.0 * c.num_hidden_layers * c.hidden_size * seq_len


# ---------------------------------------------------------------- pretrained models from GGUF files


def gguf_architecture(path: Path) -> str:
    """The GGUF file's `general.architecture`; ConfigError naming the file if it is no GGUF
    file or not a causal LM that transformers can load from GGUF."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ConfigError(
            f"{path} is not a GGUF file (it does not start with the GGUF header): give a .gguf model file "
            "or a Hugging Face model directory"
        )
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError(f"reading {path} needs the gguf package: pip install gguf") from None
    try:
        field = GGUFReader(path).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways inside the reader
        raise ConfigError(f"{path} is not a readable GGUF model ({type(e).__name__}: {e}): check the file") from e
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_CAUSAL_LM)
    if arch not in supported:
        raise ConfigError(
            f"{path} holds a GGUF model of architecture {arch!r}, not a causal language model that transformers "
            f"loads from GGUF ({', '.join(supported)}): give such a .gguf file or a Hugging Face model directory"
        )
    return arch


def _file_digest(path: Path) -> str:
    h = hashlib.sha256(f"distlm-gguf-{_CONVERSION_VERSION}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def resolve_pretrained(path: str, cache_dir: str) -> str:
    """A Hugging Face model directory for `path`: the directory itself, or for a .gguf file
    its conversion under <cache_dir>/models/ (made once, all-or-nothing, then reused)."""
    given = Path(path)
    if given.is_dir():
        return str(given)
    if not given.is_file():
        raise ConfigError(f"{path} does not exist: give a Hugging Face model directory or a .gguf file")
    gguf_architecture(given)
    import transformers

    key = hashlib.sha256(f"{_file_digest(given)}:{transformers.__version__}".encode()).hexdigest()
    final = Path(cache_dir) / "models" / f"{given.stem}-{key[:16]}"
    if is_complete(final):
        return str(final)
    log.warning("converting %s to a Hugging Face model directory (once; cached in %s)", given, final)
    with building(final) as tmp:
        convert_gguf(given, tmp)
    return str(final)


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantise a GGUF model to float32 and save model, generation config and tokenizer in
    the save_pretrained layout."""
    from transformers import AutoTokenizer

    from distlm.data.tokenizer import save_tokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(
            f"transformers could not load {path} as a causal language model ({type(e).__name__}: {e}): "
            "give a language model's .gguf file or a Hugging Face model directory"
        ) from e
    if getattr(model, "hf_quantizer", None) is not None:
        # The weights are plain floats now; a quantization_config would make loaders look for GGUF again.
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    # GGUF carries no model_max_length (it comes out as ~1e30): the context is the model's.
    tokenizer.model_max_length = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    save_tokenizer(tokenizer, out)
