"""What every serving engine shares: the request and event types, the engine interface, the
tokenizer side of an export, and the text stream (detokenizing, stop sequences, finish reasons).

An engine takes a `GenerationRequest` (prompt token ids, sampling parameters, a task adapter's
name or None for the base model) and returns an async stream of `TokenEvent`s, one per new
token. Both engines cut text the same way (`TextStream`), so the same request gets the same
text from either of them.
"""

from __future__ import annotations

import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from distlm.serve.grammar import Constraint, Grammars

# Below this temperature a request decodes greedily (vLLM uses the same threshold): dividing the
# logits by a tinier one overflows the sampler.
GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int  # 0: no new token, only the prompt's log-probabilities (scoring)
    temperature: float = 1.0  # below GREEDY_BELOW: greedy
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: Optional[int] = None
    # None: no log-probabilities; k: each new token's log-probability and the k most likely tokens.
    logprobs: Optional[int] = None
    # The same for every prompt token after the first (echo); None: not computed.
    prompt_logprobs: Optional[int] = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    # Applied to the logits before temperature and top_p (log-probabilities stay the model's own).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Dict[int, float] = field(default_factory=dict)
    constraint: Optional[Constraint] = None  # the output must match this grammar (then ends)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class GenerationRequest:
    prompt_ids: List[int]
    params: SamplingParams
    adapter: Optional[str] = None  # a task's name, AGENT (the router picks one) or None (the base model)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class TokenLogprob:
    """One position's log-probabilities under the model (before temperature and top_p)."""

    token_id: int
    logprob: float
    top: List[Tuple[int, float]]  # the k most likely tokens, most likely first


@dataclass
class TokenEvent:
    """One generated token: the text it completes (may be empty while held back), why the request
    finished on its last token ("stop": EOS, a stop token or sequence; "length": max_tokens), and
    the log-probabilities that were asked for. `token_id` is None only on the single event of a
    scoring request (max_tokens=0) and of a classification task's answer (its label as the text).
    The first event carries the prompt's log-probabilities (position 0 is None: nothing predicts
    the first token) and, for the agent's requests, the routing."""

    token_id: Optional[int]
    text: str
    finish_reason: Optional[str] = None
    logprob: Optional[TokenLogprob] = None
    prompt_logprobs: Optional[List[Optional[TokenLogprob]]] = None
    trace: Optional[Dict] = None  # the agent's routing (task, confidence, ...), on a routed request's first event


class EngineError(Exception):
    """A request the engine could not finish. Only that request fails; the engine keeps serving."""


class Engine(ABC):
    """Serves an export's base model and its task adapters. `generate` may be called from many
    coroutines at once; requests for different adapters share batches."""

    name: str
    text: ModelText

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """The request's events; raises EngineError if it fails. Closing the iterator early (a
        client that went away) drops the request from the engine."""

    @abstractmethod
    async def check_health(self) -> None:
        """Raises if the engine can no longer serve (Ray Serve then replaces the replica)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stops the engine's background work (a replica going away)."""


class ModelText:
    """The tokenizer side of an export: encoding prompts and chats, token strings, the EOS ids,
    the context length and the vocabulary size (no weights loaded)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from distlm.config import ConfigError

        # Used when the tokenizer has no chat template of its own: the one fine-tuning used.
        from distlm.data.tasks import DEFAULT_CHAT_TEMPLATE

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        try:
            eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:  # no generation_config.json
            eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.context_length = int(
            getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0) or 0
        )
        if self.context_length <= 0:
            raise ConfigError(f"{path}/config.json names no context length (max_position_embeddings)")
        self.vocab_size = int(config.vocab_size)  # rows of the embedding: the valid token ids
        self.chat_template = self.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        self._strings: Dict[int, str] = {}
        self._pieces: Dict[int, str] = {}
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"

    def encode(self, text: str) -> List[int]:
        return self.tokenizer(text).input_ids

    def encode_chat(self, messages: List[Dict[str, Any]], tools: Optional[List[Dict[str, Any]]] = None) -> List[int]:
        """The chat template's prompt for the assistant's next turn, with the tools the model may
        call (distlm/tools.py: rendered by the template if it knows tools, else in the system
        message). Raises ValueError if the template refuses."""
        from jinja2 import TemplateError

        from distlm.tools import chat_messages, renders_tools

        messages, template_tools = chat_messages(messages, tools, renders_tools(self.chat_template))
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tools=template_tools,
                chat_template=self.chat_template,
                add_generation_prompt=True,
                tokenize=False,
            )
        except TemplateError as e:
            raise ValueError(f"the chat template rejected the messages: {e}") from e
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @property
    def grammars(self) -> Grammars:
        """The tokenizer as the grammar library sees it (built on first use: ~0.5 s)."""
        if getattr(self, "_grammars", None) is None:
            self._grammars = Grammars(self.tokenizer, self.vocab_size, sorted(self.eos_ids))
        return self._grammars

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (special tokens: their name), also for a token that holds
        part of a UTF-8 character (byte-level BPE, or SentencePiece's <0xNN> byte tokens)."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
        if self._byte_level and all(ch in _BYTE_DECODER for ch in piece):
            return bytes(_BYTE_DECODER[ch] for ch in piece)
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def token_string(self, token_id: int) -> str:
        """How a token is shown in log-probabilities: its text (special tokens by name), or for
        a part of a UTF-8 character its bytes as "bytes:\\xNN..." (as OpenAI does), so that no two
        tokens share a string."""
        if token_id not in self._strings:
            raw = self.token_bytes(token_id)
            try:
                self._strings[token_id] = raw.decode("utf-8")
            except UnicodeDecodeError:
                self._strings[token_id] = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return self._strings[token_id]

    def token_piece(self, token_id: int) -> str:
        """The text a token adds to a completion (special tokens add none): for text offsets."""
        if token_id not in self._pieces:
            self._pieces[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=True)
        return self._pieces[token_id]


def _bytes_to_unicode() -> Dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), mapped back to the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_DECODER = _bytes_to_unicode()


class TextStream:
    """Turns one request's tokens into text deltas: holds back an incomplete UTF-8 character
    and any tail that could still become a stop sequence, and cuts the text at a stop sequence
    (which is not returned, as in the OpenAI API). EOS (unless ignore_eos) and stop_token_ids
    end the request without adding text."""

    def __init__(self, text: ModelText, params: SamplingParams) -> None:
        self.text, self.stop = text, list(params.stop)
        self.max_tokens = params.max_tokens
        self.end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else text.eos_ids)
        self.ids: List[int] = []
        self.count = 0
        self.sent = 0  # characters of the decoded text already returned

    def add(self, token: int) -> Tuple[str, Optional[str]]:
        """(text delta, finish reason or None) after one more token."""
        self.count += 1
        ends = token in self.end_ids
        if not ends:
            self.ids.append(token)
        text = self.text.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            end, finish = max(min(hits), self.sent), "stop"
        elif ends:
            end, finish = len(text), "stop"
        elif self.count >= self.max_tokens:
            end, finish = len(text), "length"
        else:
            end, finish = self._safe_end(text), None
        delta, self.sent = text[self.sent : end], max(end, self.sent)
        return delta, finish

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
