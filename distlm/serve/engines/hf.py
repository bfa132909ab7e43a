"""The Hugging Face engine: the export's model (transformers) with every task adapter (peft),
decoding with iteration-level scheduling (continuous batching).

One batch runs at a time. Before each decode step, requests that arrived meanwhile are
prefilled together and join the batch (their KV caches are left-padded to the batch's length
and stacked onto it); rows that finished, failed or whose client went away leave it, and the
padding columns nobody needs any more are cut. Each row keeps its own position ids, so
padding never shifts a sequence; rows of different adapters share a forward pass (peft's
mixed-adapter batch). With `continuous=False` it batches statically instead (a batch forms
within batch_wait_timeout_s and runs until its last row finishes), as distlm did before.

No Ray here: the Serve deployment (app.py), the tests and the benchmark drive it directly.
Greedy decoding picks the same tokens as `model.generate(do_sample=False)` on the export.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import types
from collections import deque
from typing import Any, AsyncIterator, Deque, List, Optional, Tuple

import torch
import torch.nn.functional as F

from distlm.agent import Agent, Heads
from distlm.config import AgentConfig, ConfigError
from distlm.export import AGENT, ExportInfo
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
from distlm.serve.grammar import Matcher

# peft's adapter name for "no adapter" in a mixed-adapter batch (adapter_names=[...]).
BASE_ADAPTER = "__base__"
# Prompts prefilled in one forward pass hold at most this many (padded) tokens.
PREFILL_TOKENS = 8192


def load_model(export: ExportInfo, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The export's model with every task adapter loaded (peft multi-adapter), in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(export.path, dtype=dtype)
    if export.adapters:
        from peft import PeftModel

        (first, first_path), *rest = export.adapters.items()
        model = PeftModel.from_pretrained(model, first_path, adapter_name=first)
        for task, path in rest:
            model.load_adapter(path, adapter_name=task)
        _mix_module_copies(model)
    return model.to(torch.device(device)).eval()


def pad_id(text: ModelText, model) -> int:
    candidates = (text.tokenizer.pad_token_id, model.config.pad_token_id, *sorted(text.eos_ids), 0)
    return next(i for i in candidates if i is not None)


def serving_agent(model, export: ExportInfo, device, dtype, agent: Optional[AgentConfig], text=None) -> Agent:
    """The export's router and heads over a loaded model, as serve.agent configures them."""
    agent = agent or AgentConfig()
    if agent.fallback is not None and agent.fallback not in export.tasks:
        raise ConfigError(
            f"serve.agent.fallback={agent.fallback!r} is not a task of {export.path} "
            f"({', '.join(export.tasks) or 'none'}): name one of them, or null for the base model"
        )
    heads = Heads(export.path).to(torch.device(device), dtype)
    return Agent(model, heads, pad_id(text or ModelText(export.path), model), agent.min_confidence, agent.fallback)


# transformers 5.20 renamed the cache argument and output (past_key_values -> cache).
def _cache_field() -> str:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _growing_cache_layer():
    """A transformers DynamicLayer that appends each step's keys and values into spare room
    instead of concatenating (a copy of the whole cache per layer and step; ~10% of a decode
    step at 50 tokens, growing with length). `keys`/`values` stay views of the used part; when
    something replaces them (rows join or leave, columns are cut) the next update makes new room."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        room_k: Optional[torch.Tensor] = None
        room_v: Optional[torch.Tensor] = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            used = self.keys.shape[-2] if self.keys.dim() == 4 else 0
            new = key_states.shape[-2]
            room = self.room_k
            if (
                room is None
                or used + new > room.shape[-2]
                or room.shape[:2] != key_states.shape[:2]
                or (used and self.keys.data_ptr() != room.data_ptr())
            ):
                size = (*key_states.shape[:2], max(2 * (used + new), 64), key_states.shape[-1])
                self.room_k, self.room_v = key_states.new_empty(size), value_states.new_empty(size)
                if used:
                    self.room_k[..., :used, :] = self.keys
                    self.room_v[..., :used, :] = self.values
            self.room_k[..., used : used + new, :] = key_states
            self.room_v[..., used : used + new, :] = value_states
            self.keys, self.values = self.room_k[..., : used + new, :], self.room_v[..., : used + new, :]
            return self.keys, self.values

    return GrowingLayer


class _Sampler:
    """Greedy at temperature 0 (below GREEDY_BELOW); otherwise temperature + nucleus (top_p)
    sampling from a per-request generator, so a seeded request samples the same tokens whatever
    else is in its batch. Before that, as vLLM orders them: the grammar's mask, logit_bias, and
    the presence and frequency penalties over the tokens this request generated."""

    def __init__(self, params: SamplingParams, matcher: Optional[Matcher] = None) -> None:
        self.greedy, self.temperature, self.top_p = params.greedy, params.temperature, params.top_p
        self.matcher = matcher
        self.bias = params.logit_bias
        self.presence, self.frequency = params.presence_penalty, params.frequency_penalty
        self.counts: dict = {}  # generated token -> times (kept only with a penalty)
        self.generator = None
        if not self.greedy:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed % 2**64)  # negative seeds wrap, as numpy's do not

    def pick(self, logits: torch.Tensor) -> int:
        if self.matcher is not None or self.bias or self.counts:
            logits = self._adjusted(logits)
        token = self._sample(logits)
        if self.presence or self.frequency:
            self.counts[token] = self.counts.get(token, 0) + 1
        if self.matcher is not None:
            self.matcher.advance(token)
        return token

    def _adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        if self.matcher is not None:
            self.matcher.restrict(logits)
            if not bool(torch.isfinite(logits).any()):
                raise EngineError("the request's grammar allows no token here")
        if self.bias:
            ids = torch.tensor(list(self.bias), device=logits.device)
            logits[ids] += torch.tensor(list(self.bias.values()), device=logits.device, dtype=logits.dtype)
        if self.counts:
            ids = torch.tensor(list(self.counts), device=logits.device)
            counts = torch.tensor(list(self.counts.values()), device=logits.device, dtype=logits.dtype)
            logits[ids] -= self.frequency * counts + self.presence
        return logits

    def _sample(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Drop tokens once the mass before them already reaches top_p; the top token always stays.
            drop = sorted_probs.cumsum(0) - sorted_probs >= self.top_p
            drop[0] = False
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        if not bool(torch.isfinite(probs).all()):
            raise EngineError("the model's output is not finite for this request")
        return int(torch.multinomial(probs, 1, generator=self.generator))


class _Seq:
    """One request inside the engine: its sampler and text stream, where it stands, and the queue
    its events go to (read by the coroutine that submitted it)."""

    def __init__(self, request: GenerationRequest, text: ModelText) -> None:
        self.request, self.params = request, request.params
        self.stream = TextStream(text, request.params)
        constraint = request.params.constraint
        self.sampler = _Sampler(request.params, text.grammars.matcher(constraint) if constraint else None)
        self.out: asyncio.Queue = asyncio.Queue()
        self.arrived = time.monotonic()
        self.cancelled = False
        self.next_token = -1  # the token to feed at the next decode step
        self.position = len(request.prompt_ids)  # its position id
        self.task = request.adapter  # the task whose layer answers (the router's choice for AGENT)
        self.trace: Optional[dict] = None  # the agent's routing, sent with the first event


def _top(logp: torch.Tensor, k: int) -> List[Tuple[int, float]]:
    if k <= 0:
        return []
    values, ids = logp.topk(k)
    return list(zip(ids.tolist(), values.tolist()))


class HFEngine(Engine):
    name = "hf"

    def __init__(
        self,
        export: ExportInfo,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 16,
        continuous: bool = True,
        batch_wait_timeout_s: float = 0.01,
        agent: Optional[AgentConfig] = None,
    ) -> None:
        self.export = export
        self.text = ModelText(export.path)
        self.model = load_model(export, device, dtype)
        self.device = torch.device(device)
        self.pad_id = pad_id(self.text, self.model)
        # The agent's perception (router) and the classification heads, on this engine's model:
        # they run in the scheduler's thread, between steps, as the model is not shared across threads.
        self.agent = serving_agent(self.model, export, device, dtype, agent, self.text)
        self.max_batch_size, self.continuous, self.batch_wait_timeout_s = (
            max_batch_size,
            continuous,
            batch_wait_timeout_s,
        )
        self._cache_field = _cache_field()
        self._layer = None
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if all(type(layer) is DynamicLayer for layer in DynamicCache(config=self.model.config).layers):
            self._layer = _growing_cache_layer()  # full attention only (no sliding-window layers)
        self._waiting: Deque[_Seq] = deque()
        # The running batch: its rows (requests), attention mask (rows x columns) and KV cache.
        self._rows: List[_Seq] = []
        self._mask: Optional[torch.Tensor] = None
        self._cache: Any = None
        self._task: Optional[asyncio.Task] = None
        self._wake: Optional[asyncio.Event] = None
        self._failure: Optional[BaseException] = None

    # ------------------------------------------------------------ the asyncio side

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        seq = _Seq(request, self.text)
        self._start()
        self._waiting.append(seq)
        self._wake.set()
        try:
            while True:
                item = await seq.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            seq.cancelled = True  # a stream closed early: its row leaves at the next step

    async def check_health(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the engine's scheduler stopped: {self._failure!r}")

    def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._schedule())

    async def _schedule(self) -> None:
        """Forever: admit waiting requests, run one step in a worker thread (the event loop keeps
        serving HTTP meanwhile), hand each request its events."""
        try:
            while True:
                if not self._waiting and not self._rows:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if not self.continuous and not self._rows and len(self._waiting) < self.max_batch_size:
                    # Static batching: give a batch batch_wait_timeout_s to fill.
                    wait = self._waiting[0].arrived + self.batch_wait_timeout_s - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                admitted = self._admit()
                try:
                    results = await asyncio.to_thread(self._step, admitted)
                except Exception as e:  # a bug in the step itself: fail what it held, keep serving
                    error = EngineError(f"internal engine error: {type(e).__name__}: {e}")
                    results = [(s, error) for s in {*admitted, *self._rows}]
                    self._reset()
                for seq, item in results:
                    seq.out.put_nowait(item)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: B036 (recorded for check_health, then re-raised)
            self._failure = e
            raise

    def _admit(self) -> List[_Seq]:
        if not self.continuous and self._rows:
            return []
        admitted: List[_Seq] = []
        while self._waiting and len(self._rows) + len(admitted) < self.max_batch_size:
            seq = self._waiting.popleft()
            if not seq.cancelled:
                admitted.append(seq)
        return admitted

    # ------------------------------------------------------------ the worker thread's side

    @torch.inference_mode()
    def _step(self, admitted: List[_Seq]) -> List[Tuple[_Seq, Any]]:
        """Rows whose client left go; admitted requests are prefilled and join; one decode step for all."""
        if any(s.cancelled for s in self._rows):
            self._select([i for i, s in enumerate(self._rows) if not s.cancelled])
        results: List[Tuple[_Seq, Any]] = []
        running = len(self._rows)
        answered = self._perceive(admitted)
        results += answered
        done = {id(seq) for seq, _ in answered}
        for group in self._prefill_groups([s for s in admitted if id(s) not in done]):
            results += self._prefill(group)
        if running:
            results += self._decode()
        for seq, item in results:  # the routing goes with a request's first event
            if seq.trace is not None and isinstance(item, TokenEvent):
                item.trace, seq.trace = seq.trace, None
        return results

    def _perceive(self, admitted: List[_Seq]) -> List[Tuple[_Seq, Any]]:
        """The agent's requests get their task from the router (one forward of the base's first
        layers for all of them); requests for a classification task get their label at once (one
        event, no token). Returns those answers; the rest go on to decode with their task's layer."""
        routed = [s for s in admitted if s.request.adapter == AGENT]
        try:
            if routed:
                for seq, route in zip(routed, self.agent.route([s.request.prompt_ids for s in routed])):
                    seq.task, seq.trace = route.task, route.trace()
                    log_route(route)
            answers: List[Tuple[_Seq, Any]] = []
            for task in dict.fromkeys(s.task for s in admitted if s.task in self.export.heads):
                asking = [s for s in admitted if s.task == task]
                for seq, (label, _) in zip(asking, self.agent.classify(task, [s.request.prompt_ids for s in asking])):
                    answers.append((seq, TokenEvent(None, label, "stop")))
            return answers
        except Exception as e:  # noqa: BLE001 - these requests fail, the engine keeps serving
            asked = [s for s in admitted if s in routed or s.task in self.export.heads]
            for seq in asked:
                seq.task = "__failed__"
            error = EngineError(f"the agent's router or heads failed: {type(e).__name__}: {e}")
            return [(s, error) for s in asked]

    def _prefill_groups(self, seqs: List[_Seq]) -> List[List[_Seq]]:
        """Requests that need every prompt position's logits go alone (vocabulary x prompt floats);
        the others share forward passes of at most PREFILL_TOKENS padded tokens."""
        groups: List[List[_Seq]] = []
        shared: List[_Seq] = []
        for seq in sorted(seqs, key=lambda s: len(s.request.prompt_ids)):
            if seq.params.prompt_logprobs is not None:
                groups.append([seq])
                continue
            if shared and (len(shared) + 1) * len(seq.request.prompt_ids) > PREFILL_TOKENS:
                groups.append(shared)
                shared = []
            shared.append(seq)
        return groups + ([shared] if shared else [])

    def _adapter(self, seq: _Seq) -> Optional[str]:
        return seq.task if seq.task in self.export.adapters else None

    def _forward(self, ids, mask, positions, cache, adapters: List[Optional[str]], all_logits: bool):
        kwargs = {self._cache_field: cache, "logits_to_keep": 0 if all_logits else 1}
        context = contextlib.nullcontext()
        if self.export.adapters:
            names = [a or BASE_ADAPTER for a in adapters]
            if set(names) == {BASE_ADAPTER}:
                context = self.model.disable_adapter()
            elif len(set(names)) == 1:  # one adapter: peft's plain path, without per-row routing
                if self.model.active_adapter != names[0]:
                    self.model.set_adapter(names[0], inference_mode=True)
            else:  # peft's mixed-adapter batch: each row goes through its own adapter (or none)
                kwargs["adapter_names"] = names
        with context:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits, getattr(out, self._cache_field)

    def _prefill(self, group: List[_Seq]) -> List[Tuple[_Seq, Any]]:
        prompts = [s.request.prompt_ids for s in group]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        all_logits = group[0].params.prompt_logprobs is not None  # such requests come alone
        cache = None
        if self._layer is not None:
            from transformers import DynamicCache

            cache = DynamicCache()
            cache.layer_class_to_replicate = self._layer
        try:
            logits, cache = self._forward(ids, mask, positions, cache, [self._adapter(s) for s in group], all_logits)
        except Exception as e:
            if len(group) > 1:  # find the request it fails on: the others go ahead
                return [r for s in group for r in self._prefill([s])]
            return [(group[0], EngineError(f"the model failed on this prompt: {type(e).__name__}: {e}"))]
        logits = logits.float()
        results: List[Tuple[_Seq, Any]] = []
        joining: List[int] = []
        for row, seq in enumerate(group):
            try:
                prompt_logprobs = None
                if seq.params.prompt_logprobs is not None:
                    prompt_logprobs = self._prompt_logprobs(logits[row, width - len(prompts[row]) :], seq)
                if seq.params.max_tokens == 0:
                    results.append((seq, TokenEvent(None, "", "length", prompt_logprobs=prompt_logprobs)))
                    continue
                event = self._next(seq, logits[row, -1])
                event.prompt_logprobs = prompt_logprobs
            except Exception as e:
                results.append((seq, _failed(e)))
                continue
            results.append((seq, event))
            if event.finish_reason is None and not seq.cancelled:
                joining.append(row)
        if joining:
            self._join([group[r] for r in joining], mask, cache, joining)
        return results

    def _decode(self) -> List[Tuple[_Seq, Any]]:
        rows = self._rows
        ids = torch.tensor([[s.next_token] for s in rows], device=self.device)
        positions = torch.tensor([[s.position] for s in rows], device=self.device)
        mask = torch.cat([self._mask, torch.ones_like(ids)], dim=1)
        try:
            logits, self._cache = self._forward(
                ids, mask, positions, self._cache, [self._adapter(s) for s in rows], False
            )
        except Exception as e:
            self._reset()
            error = EngineError(f"the model failed on this batch: {type(e).__name__}: {e}")
            return [(s, error) for s in rows]
        self._mask = mask
        logits = logits[:, -1].float()
        results: List[Tuple[_Seq, Any]] = []
        keep: List[int] = []
        for row, seq in enumerate(rows):
            seq.position += 1
            try:
                event = self._next(seq, logits[row])
            except Exception as e:
                results.append((seq, _failed(e)))
                continue
            results.append((seq, event))
            if event.finish_reason is None and not seq.cancelled:
                keep.append(row)
        if len(keep) < len(rows):
            self._select(keep)
        return results

    def _next(self, seq: _Seq, logits: torch.Tensor) -> TokenEvent:
        """The request's next token from its last position's logits, as an event."""
        token = seq.sampler.pick(logits)
        logprob = None
        if seq.params.logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            logprob = TokenLogprob(token, float(logp[token]), _top(logp, seq.params.logprobs))
        text, finish = seq.stream.add(token)
        seq.next_token = token
        return TokenEvent(token, text, finish, logprob)

    def _prompt_logprobs(self, logits: torch.Tensor, seq: _Seq) -> List[Optional[TokenLogprob]]:
        """Each prompt token's log-probability given the tokens before it (logits: one row per prompt token)."""
        prompt = seq.request.prompt_ids
        logp = torch.log_softmax(logits[: len(prompt) - 1], dim=-1)
        targets = torch.tensor(prompt[1:], device=logp.device)
        chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
        k = seq.params.prompt_logprobs
        tops = [[]] * len(chosen) if k <= 0 else None
        if tops is None:
            values, ids = logp.topk(k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        return [None] + [TokenLogprob(t, lp, top) for t, lp, top in zip(prompt[1:], chosen, tops)]

    # ------------------------------------------------------------ the batch's tensors

    def _join(self, seqs: List[_Seq], mask: torch.Tensor, cache: Any, rows: List[int]) -> None:
        """Stack these rows of a prefill onto the running batch, left-padding whichever is shorter."""
        if len(rows) < mask.shape[0]:
            index = torch.tensor(rows, device=self.device)
            mask = mask[index]
            cache.batch_select_indices(index)
        if not self._rows:
            self._rows, self._mask, self._cache = list(seqs), mask, cache
            self._trim()
            return
        old, new = self._mask.shape[1], mask.shape[1]
        width = max(old, new)
        self._mask = torch.cat([F.pad(self._mask, (width - old, 0)), F.pad(mask, (width - new, 0))])
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat(
                [F.pad(mine.keys, (0, 0, width - old, 0)), F.pad(theirs.keys, (0, 0, width - new, 0))]
            )
            mine.values = torch.cat(
                [F.pad(mine.values, (0, 0, width - old, 0)), F.pad(theirs.values, (0, 0, width - new, 0))]
            )
        self._rows += seqs

    def _select(self, keep: List[int]) -> None:
        """Keep only these rows of the batch."""
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask = self._mask[index]
        self._cache.batch_select_indices(index)
        self._trim()

    def _trim(self) -> None:
        """Cut the leading columns that no row attends to (left padding of rows that left)."""
        first = int(self._mask.any(dim=0).int().argmax())
        if first > 0:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]

    def _reset(self) -> None:
        self._rows, self._mask, self._cache = [], None, None


def _failed(e: Exception) -> EngineError:
    return e if isinstance(e, EngineError) else EngineError(f"this request failed: {type(e).__name__}: {e}")


def _mix_module_copies(model) -> None:
    """Mixed-adapter batches through the adapters' module copies (modules_to_save).

    peft routes each row of a mixed batch through its adapter's copy of such a module, but
    only for Linear/Embedding/Conv modules, and fails for an adapter that has no copy. Norm
    layers work row by row as well, so every copy takes its rows here; an adapter without a
    copy (or a row without an adapter) goes through the base module.

    This replaces a private peft method (tested with peft 0.21): refuse, naming the fix, if it moved."""
    import inspect

    import peft
    from peft.utils import ModulesToSaveWrapper

    private = getattr(ModulesToSaveWrapper, "_mixed_batch_forward", None)
    if private is None or "adapter_names" not in inspect.signature(private).parameters:
        raise RuntimeError(
            f"peft {peft.__version__} no longer has ModulesToSaveWrapper._mixed_batch_forward(x, adapter_names=...), "
            "which serving adapters with module copies (adapter.modules_to_save) replaces: install peft 0.21 "
            "(pip install 'peft>=0.21,<0.22') or export without module copies"
        )

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


def log_route(route) -> None:
    import logging

    logging.getLogger("ray.serve").info(
        "agent: task %s (router: %s %.3f, runner-up %s %.3f)%s",
        route.task or "base",
        route.chosen,
        route.confidence,
        route.runner_up,
        route.runner_up_confidence,
        " below min_confidence: fallback" if route.fallback else "",
    )
