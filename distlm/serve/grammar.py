"""Constrained decoding: a request's grammar (a JSON schema, a forced tool call) as the set of
tokens allowed at each step, with llguidance.

llguidance was measured against xgrammar and outlines-core on the same schemas and tokenizer
(`benchmarks/grammar_libraries.py`, figures in docs/serving.md): a schema the server has not
seen compiles in well under a millisecond (the others take 100-300 ms, paid before the
request's first token), its per-token mask is the cheapest, and it has no dependencies (xgrammar
pulls triton). Every grammar is a Lark grammar; JSON parts are `%json {schema}` with compact
whitespace, so an untrained model cannot pad its output with spaces until max_tokens. vLLM is
given the same Lark text with its llguidance backend (engines/vllm.py): both engines accept
the same outputs.

One `Matcher` per request: requests with different grammars (or none) share a batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch


@dataclass(frozen=True)
class Constraint:
    """A Lark grammar (llguidance's dialect) that a request's output must match, then EOS."""

    lark: str
    what: str  # for errors: "response_format", "tool_choice"


def _compact(schema: Dict[str, Any]) -> Dict[str, Any]:
    return {**schema, "x-guidance": {"whitespace_flexible": False}}


def json_rule(schema: Dict[str, Any]) -> str:
    return "%json " + json.dumps(_compact(schema))


def json_constraint(schema: Dict[str, Any], what: str = "response_format") -> Constraint:
    """Output that is one JSON value matching `schema` ({"type": "object"} for json_object)."""
    return Constraint("start: " + json_rule(schema), what)


class Grammars:
    """llguidance's view of one tokenizer (built once, ~0.5 s for a 50k vocabulary) and the
    grammars checked and matched against it."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: List[int]) -> None:
        import llguidance.hf

        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids))

    def check(self, constraint: Constraint) -> Optional[str]:
        """None if the grammar compiles, else what is wrong with it."""
        import llguidance

        try:
            error = llguidance.LLMatcher.validate_grammar(constraint.lark, self.tokenizer)
        except Exception as e:  # noqa: BLE001 (a grammar it cannot even read: the same answer)
            error = f"{type(e).__name__}: {e}"
        return error or None

    def matcher(self, constraint: Constraint) -> Matcher:
        return Matcher(self, constraint)


class Matcher:
    """One request's position in its grammar: masks the logits, advances with each token."""

    def __init__(self, grammars: Grammars, constraint: Constraint) -> None:
        import llguidance
        import llguidance.torch

        self._torch = llguidance.torch
        self.matcher = llguidance.LLMatcher(grammars.tokenizer, constraint.lark, log_level=0)
        self.mask = llguidance.torch.allocate_token_bitmask(1, grammars.vocab_size)
        self.vocab_size = grammars.vocab_size

    def restrict(self, logits: torch.Tensor) -> None:
        """Sets the logits of every token the grammar does not allow next to -inf (in place)."""
        self._torch.fill_next_token_bitmask(self.matcher, self.mask, 0)
        self._check()
        row = logits[: self.vocab_size].unsqueeze(0)
        self._torch.apply_token_bitmask_inplace(row, self.mask)
        logits[self.vocab_size :] = float("-inf")

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            self._check()
            raise ValueError(f"token {token} does not fit the request's grammar")

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ValueError(f"the request's grammar failed: {self.matcher.get_error()}")
