"""The served model: an export's base model, its task adapters and heads, the agent that routes
requests among them, and a batched decode loop.

No Ray here: the Serve deployment (app.py) and the benchmark's direct in-process calls
both drive `ServedModel.steps`. Greedy decoding (temperature 0) picks the same tokens as
`model.generate(do_sample=False)` on the exported model.

A batch may mix requests for the agent, the base model and any task: the agent's requests are
routed first (one forward of the base model over their prompts, adapters off), then every request
that a classification head answers gets its label at once and the rest decode together, each row
through its own adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from distlm.agent import BASE_ADAPTER
from distlm.config import AgentConfig, ConfigError

# Used when the tokenizer has no chat template of its own: the one fine-tuning used.
from distlm.data.tasks import DEFAULT_CHAT_TEMPLATE
from distlm.export import AGENT, ExportInfo, find_export  # noqa: F401  (served exports are found there)

log = logging.getLogger("ray.serve")


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: Optional[int] = None


@dataclass
class GenerationRequest:
    prompt_ids: List[int]
    params: SamplingParams
    task: Optional[str] = None  # a task's name, AGENT (the router picks one) or None (the base model)


@dataclass
class TokenEvent:
    """One generated token: the text it completes (may be empty while held back) and, on the
    request's last token, why it finished ("stop": EOS or a stop sequence, "length": max_tokens)."""

    token_id: int  # -1 for a classification head's label (no token)
    text: str
    finish_reason: Optional[str] = None
    trace: Optional[Dict[str, Any]] = None  # the agent's routing, on a routed request's first event


class ServedModel:
    """The base model loaded once, with every task adapter (peft multi-adapter), on one device."""

    def __init__(
        self,
        export: ExportInfo,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        agent: Optional[AgentConfig] = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.export = export
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(export.path)
        model = AutoModelForCausalLM.from_pretrained(export.path, dtype=dtype)
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad_id = next(
            i
            for i in (self.tokenizer.pad_token_id, model.config.pad_token_id, *sorted(self.eos_ids), 0)
            if i is not None
        )
        self.context_length = int(
            getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 0) or 0
        )
        if self.context_length <= 0:
            raise ConfigError(f"{export.path}/config.json names no context length (max_position_embeddings)")
        if export.adapters:
            from peft import PeftModel

            (first, first_path), *rest = export.adapters.items()
            model = PeftModel.from_pretrained(model, first_path, adapter_name=first)
            for task, path in rest:
                model.load_adapter(path, adapter_name=task)
            _mix_module_copies(model)
        self.model = model.to(self.device).eval()
        self.chat_template = self.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        from distlm.agent import Agent, Heads

        agent = agent or AgentConfig()
        if agent.fallback is not None and agent.fallback not in export.tasks:
            raise ConfigError(
                f"serve.agent.fallback={agent.fallback!r} is not a task of {export.path} ({', '.join(export.tasks) or 'none'}): "
                "name one of them, or null for the base model"
            )
        heads = Heads(export.path).to(self.device, dtype)
        self.agent = Agent(self.model, heads, self.pad_id, agent.min_confidence, agent.fallback)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer(text).input_ids

    def encode_chat(self, messages: List[Dict[str, str]]) -> List[int]:
        """The chat template's prompt for the assistant's next turn. Raises ValueError if the template refuses."""
        from jinja2 import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
            )
        except TemplateError as e:
            raise ValueError(f"the chat template rejected the messages: {e}") from e
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def perceive(self, requests: List[GenerationRequest]) -> tuple[List[Optional[str]], Dict[int, Dict[str, Any]]]:
        """Each request's task (the router's choice for AGENT requests) and the routed ones' traces."""
        tasks = [r.task for r in requests]
        routed = [i for i, r in enumerate(requests) if r.task == AGENT]
        traces = {}
        if routed:
            for i, route in zip(routed, self.agent.route([requests[i].prompt_ids for i in routed])):
                tasks[i], traces[i] = route.task, route.trace()
                log.info(
                    "agent: task %s (router: %s %.3f, runner-up %s %.3f)%s",
                    route.task or "base",
                    route.chosen,
                    route.confidence,
                    route.runner_up,
                    route.runner_up_confidence,
                    " below min_confidence: fallback" if route.fallback else "",
                )
        return tasks, traces

    @torch.inference_mode()
    def steps(self, requests: List[GenerationRequest]) -> Iterator[List[Optional[TokenEvent]]]:
        """Decode a batch together, one token per request per step. Each step yields one entry per
        request: its new TokenEvent, or None once it has finished. Requests that a classification head
        answers get their label (one event) in the first step. Prompts are left-padded; rows that
        finish leave the batch (and the KV cache) so the rest decode at their own size."""
        tasks, traces = self.perceive(requests)
        first: Dict[int, TokenEvent] = {}
        for task in dict.fromkeys(t for t in tasks if t in self.export.heads):
            rows = [i for i, t in enumerate(tasks) if t == task]
            for i, (label, _) in zip(rows, self.agent.classify(task, [requests[i].prompt_ids for i in rows])):
                first[i] = TokenEvent(-1, label, "stop")
        active = [i for i in range(len(requests)) if i not in first]  # batch row -> request index
        streams = {i: _TextStream(self.tokenizer, requests[i].params, self.eos_ids) for i in active}
        samplers = {i: _Sampler(requests[i].params) for i in active}
        prompts = [requests[i].prompt_ids for i in active]
        width = max((len(p) for p in prompts), default=0)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # peft's mixed-adapter batch: each row goes through its own adapter (or none).
        adapter_names = None
        if self.export.adapters:
            adapter_names = [tasks[i] if tasks[i] in self.export.adapters else BASE_ADAPTER for i in active]
        cache = None
        while active:
            extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                **extra,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float().cpu()
            events: List[Optional[TokenEvent]] = [first.pop(i, None) for i in range(len(requests))]
            tokens, keep = [], []
            for row, i in enumerate(active):
                token = samplers[i].pick(logits[row])
                events[i] = streams[i].add(token)
                tokens.append(token)
                if events[i].finish_reason is None:
                    keep.append(row)
            for i, trace in traces.items():
                if events[i] is not None:
                    events[i].trace = trace
            traces = {}
            yield events
            if len(keep) < len(active):
                if not keep:
                    return
                rows = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(rows)
                mask, positions = mask[rows], positions[rows]
                tokens = [tokens[r] for r in keep]
                active = [active[r] for r in keep]
                if adapter_names is not None:
                    adapter_names = [adapter_names[r] for r in keep]
            ids = torch.tensor(tokens, device=self.device)[:, None]
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
        if first:  # every request was answered by a head: no decoding at all
            events = [first.get(i) for i in range(len(requests))]
            for i, trace in traces.items():
                events[i].trace = trace
            yield events

    def generate(self, requests: List[GenerationRequest]) -> List[List[TokenEvent]]:
        """All events of each request (a convenience for tests and direct calls)."""
        results: List[List[TokenEvent]] = [[] for _ in requests]
        for events in self.steps(requests):
            for i, event in enumerate(events):
                if event is not None:
                    results[i].append(event)
        return results


class _Sampler:
    """Greedy at temperature 0; otherwise temperature + nucleus (top_p) sampling from a per-request
    generator, so a seeded request samples the same tokens whatever else is in its batch."""

    def __init__(self, params: SamplingParams) -> None:
        self.temperature, self.top_p = params.temperature, params.top_p
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def pick(self, logits: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Drop tokens once the mass before them already reaches top_p; the top token always stays.
            drop = sorted_probs.cumsum(0) - sorted_probs >= self.top_p
            drop[0] = False
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class _TextStream:
    """Turns one request's tokens into text deltas: holds back an incomplete UTF-8 character
    and any tail that could still become a stop sequence, and cuts the text at a stop sequence
    (which is not returned, as in the OpenAI API)."""

    def __init__(self, tokenizer, params: SamplingParams, eos_ids: set) -> None:
        self.tokenizer, self.stop, self.eos_ids = tokenizer, list(params.stop), eos_ids
        self.max_tokens = params.max_tokens
        self.ids: List[int] = []
        self.count = 0
        self.sent = 0  # characters of the decoded text already returned

    def add(self, token: int) -> TokenEvent:
        self.count += 1
        is_eos = token in self.eos_ids
        if not is_eos:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            end, finish = max(min(hits), self.sent), "stop"
        elif is_eos:
            end, finish = len(text), "stop"
        elif self.count >= self.max_tokens:
            end, finish = len(text), "length"
        else:
            end, finish = self._safe_end(text), None
        delta, self.sent = text[self.sent : end], max(end, self.sent)
        return TokenEvent(token, delta, finish)

    def _safe_end(self, text: str) -> int:
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":  # bytes of a character still to come
            end -= 1
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, end - self.sent), hold, -1):
                if text[end - k : end] == s[:k]:
                    hold = k
                    break
        return end - hold


def _mix_module_copies(model) -> None:
    """Mixed-adapter batches through the adapters' module copies (modules_to_save).

    peft routes each row of a mixed batch through its adapter's copy of such a module, but
    only for Linear/Embedding/Conv modules, and fails for an adapter that has no copy. Norm
    layers work row by row as well, so every copy takes its rows here; an adapter without a
    copy (or a row without an adapter) goes through the base module."""
    import types

    from peft.utils import ModulesToSaveWrapper

    def mixed_batch_forward(self, x, *args, adapter_names: List[str], **kwargs):
        out = None
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, a in enumerate(adapter_names) if a == name]
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            y = module(x[rows], *args, **kwargs)
            if out is None:
                out = y.new_empty((len(adapter_names), *y.shape[1:]))
            out[rows] = y
        return out

    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module._mixed_batch_forward = types.MethodType(mixed_batch_forward, module)
