"""Tool calls in text: how tools and calls appear in a prompt and in the model's output, shared
by training (tool-use conversations) and serving (OpenAI `tools`, `tool_calls`, role `tool`).

A chat template that renders tools itself (its source mentions `tools`, as Qwen's and
Llama 3's do) gets them through `apply_chat_template(tools=...)`. For one that does not
(SmolLM2's, distlm's plain one) distlm writes them into the system message. Either way the
model calls a tool as Hermes-style models do, one block per call:

    <tool_call>{"name":"convert","arguments":{"value":3,"unit":"km"}}</tool_call>

with compact JSON, which is also what a forced call's grammar allows (serve/grammar.py), so
what a model learns to write and what the server forces are the same text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)

TOOLS_PROMPT = (
    "You can call these tools (JSON Schema function definitions):\n{tools}\n"
    "To call a tool, answer with "
    + OPEN
    + '{{"name":<tool name>,"arguments":<JSON object>}}'
    + CLOSE
    + ", one block per call."
)


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def format_call(name: str, arguments: Any) -> str:
    """The text of one call; `arguments` is an object or its JSON text."""
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    return OPEN + compact({"name": name, "arguments": arguments}) + CLOSE


def tools_prompt(tools: Sequence[Dict[str, Any]]) -> str:
    return TOOLS_PROMPT.format(tools="\n".join(compact(t) for t in tools))


def renders_tools(chat_template: Optional[str]) -> bool:
    """Whether a chat template renders `tools` itself."""
    return bool(chat_template) and "tools" in chat_template


def chat_messages(
    messages: List[Dict[str, Any]], tools: Optional[List[Dict[str, Any]]], native: bool
) -> Tuple[List[Dict[str, Any]], Optional[List[Dict[str, Any]]]]:
    """OpenAI-shaped messages (assistant `tool_calls`, role `tool`) as a chat template takes
    them: (messages, tools for apply_chat_template or None). With `native` the template renders
    tools and calls itself (calls get their arguments as objects, as Hugging Face templates
    expect); otherwise tools go into the system message and calls into the assistant's text."""
    out: List[Dict[str, Any]] = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        calls = m.pop("tool_calls", None)
        if calls:
            parsed = [(c["function"]["name"], _arguments(c["function"]["arguments"])) for c in calls]
            if native:
                m["tool_calls"] = [
                    {"type": "function", "id": c.get("id"), "function": {"name": n, "arguments": a}}
                    for c, (n, a) in zip(calls, parsed)
                ]
            else:
                text = "".join(format_call(n, a) for n, a in parsed)
                m["content"] = (m.get("content") or "") + text
        m.setdefault("content", "")
        out.append(m)
    if not tools:
        return out, None
    if native:
        return out, list(tools)
    prompt = tools_prompt(tools)
    if out and out[0]["role"] in ("system", "developer"):
        out[0] = {**out[0], "content": prompt + "\n\n" + out[0]["content"]}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            raise ValueError(f"a tool call's arguments are not valid JSON: {arguments[:80]!r}") from None
    return arguments


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as the OpenAI API carries it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def openai(self, index: Optional[int] = None) -> Dict[str, Any]:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def _call(body: str, names: Sequence[str]) -> Optional[ToolCall]:
    """A call block's JSON as a call of one of the tools, or None if it is not one."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], compact(arguments))


def parse_calls(text: str, names: Sequence[str]) -> Tuple[Optional[str], List[ToolCall]]:
    """(the text outside the calls or None if there is none, the calls). A block that is not a
    call of one of the tools stays in the text."""
    stream = ToolStream(names)
    content, calls = stream.feed(text)
    content += stream.finish()
    return (content if content.strip() or not calls else None), calls


class ToolStream:
    """The streaming side of parse_calls: text deltas in, (content delta, finished calls) out.
    Text that may still become a call block is held back until it is one or is not."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names, self.held = list(names), ""

    def feed(self, delta: str) -> Tuple[str, List[ToolCall]]:
        self.held += delta
        content, calls = "", []
        while self.held:
            start = self.held.find(OPEN)
            if start < 0:
                keep = _partial_prefix(self.held, OPEN)
                content, self.held = content + self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
                break
            content, self.held = content + self.held[:start], self.held[start:]
            end = self.held.find(CLOSE)
            if end < 0:
                break
            block, self.held = self.held[: end + len(CLOSE)], self.held[end + len(CLOSE) :]
            call = _call(block[len(OPEN) : -len(CLOSE)], self.names)
            if call is None:
                content += block
            else:
                calls.append(call)
        return content, calls

    def finish(self) -> str:
        """What is still held at the end, as text (an unfinished block is text)."""
        held, self.held = self.held, ""
        return held


def _partial_prefix(text: str, marker: str) -> int:
    """How many trailing characters of `text` could begin `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def declared_only(schema: Any) -> Any:
    """The schema with objects that list `properties` but say nothing of `additionalProperties`
    closed to those properties. A forced call decodes to a subset of what the schema allows,
    still valid against it, and ends: with extra keys allowed, an untrained model can keep
    inventing keys until max_tokens (JSON Schema allows them; OpenAI's models just don't)."""
    if isinstance(schema, list):
        return [declared_only(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("const", "enum", "default", "examples") else declared_only(v)) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: declared_only(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


def call_grammar(tools: Sequence[Dict[str, Any]], name: Optional[str], parallel: bool) -> str:
    """Lark grammar of a forced call: of the tool `name`, or of any tool (one call, or with
    `parallel` one or more), arguments matching the tool's parameters schema."""
    from distlm.serve.grammar import json_rule

    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    rules = []
    for i, tool in enumerate(chosen):
        fn = tool["function"]
        parameters = declared_only(dict(fn.get("parameters") or {"type": "object"}))
        # "#/$defs/..." references resolve from the root: the definitions move up with them.
        definitions = {key: parameters.pop(key) for key in ("$defs", "definitions") if key in parameters}
        schema = {
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
            **definitions,
        }
        rules.append(f'call{i}: "{OPEN}" {json_rule(schema)} "{CLOSE}"')
    alternatives = " | ".join(f"call{i}" for i in range(len(chosen)))
    repeat = "+" if parallel and name is None else ""
    return "\n".join([f"start: ({alternatives}){repeat}", *rules])
