"""The built-in tool-use task: a conversation in which the assistant calls one of three tools (a
calculator, a unit converter, a phone-extension lookup by an id that only the staff table in the
system turn gives), reads the tool's result and answers. The right call, its arguments and the
final answer are known, so evaluation scores each exactly (evaluate.py: call_exact_match,
call_valid, exact_match). Conversations are OpenAI-shaped, as a JSONL tool-use task's lines are.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List

from distlm.tools import compact


def _function(name: str, description: str, properties: Dict[str, Any]) -> Dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": list(properties)}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_UNITS = {  # from -> (to, factor), and how a person writes each
    "km": ("m", 1000),
    "m": ("cm", 100),
    "kg": ("g", 1000),
    "hour": ("minute", 60),
    "minute": ("second", 60),
}
_WORDS = {
    "km": "kilometers",
    "m": "meters",
    "cm": "centimeters",
    "kg": "kilograms",
    "g": "grams",
    "hour": "hours",
    "minute": "minutes",
    "second": "seconds",
}

TOOLS: List[Dict[str, Any]] = [
    _function(
        "calculator",
        "a op b",
        {"a": {"type": "number"}, "op": {"type": "string", "enum": list(_OPS)}, "b": {"type": "number"}},
    ),
    _function(
        "convert_units",
        "Convert a value between units",
        {
            "value": {"type": "number"},
            "from_unit": {"type": "string", "enum": sorted(_UNITS)},
            "to_unit": {"type": "string", "enum": sorted(to for to, _ in _UNITS.values())},
        },
    ),
    _function(
        "get_extension",
        "Phone extension of a staff id",
        {"employee_id": {"type": "integer"}},
    ),
]

_NAMES = "Ana Ben Chloe Dev Emma Finn Grace Hugo Ivy Jack Kira Liam Maya Noah Olga Paul Rosa Sam Tara Yuki".split()

_ASK = {
    "+": ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "What's the sum of {a} and {b}?"],
    "-": ["What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.", "What's {a} take away {b}?"],
    "*": ["What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}.", "What's the product of {a} and {b}?"],
    "convert": ["How many {to} are in {v} {frm}?", "Convert {v} {frm} to {to}.", "What is {v} {frm} in {to}?"],
    "extension": [
        "What is {name}'s phone extension?",
        "Can you get me {name}'s extension?",
        "I need to call {name}. What's their extension?",
    ],
}


def conversation(rng: random.Random) -> Dict[str, Any]:
    """One conversation: {"tools", "messages"}, the last message the assistant's final answer."""
    staff = dict(zip(rng.sample(_NAMES, 4), rng.sample(range(100, 1000), 4)))
    system = "You are a helpful assistant. Staff directory (name: id): " + ", ".join(
        f"{n}: {i}" for n, i in staff.items()
    )
    kind = rng.choice(["calculator", "convert_units", "get_extension"])
    if kind == "calculator":
        op, a, b = rng.choice(list(_OPS)), rng.randint(0, 99), rng.randint(0, 99)
        request = rng.choice(_ASK[op]).format(a=a, b=b)
        arguments, result = {"a": a, "op": op, "b": b}, str(_OPS[op](a, b))
        answer = f"{a} {op} {b} = {result}."
    elif kind == "convert_units":
        frm = rng.choice(list(_UNITS))
        (to, factor), v = _UNITS[frm], rng.randint(1, 50)
        request = rng.choice(_ASK["convert"]).format(v=v, frm=_WORDS[frm], to=_WORDS[to])
        arguments, result = {"value": v, "from_unit": frm, "to_unit": to}, str(v * factor)
        answer = f"{v} {_WORDS[frm]} is {result} {_WORDS[to]}."
    else:
        name = rng.choice(list(staff))
        request = rng.choice(_ASK["extension"]).format(name=name)
        arguments, result = {"employee_id": staff[name]}, str(rng.randint(1000, 9999))
        answer = f"{name}'s extension is {result}."
    call = {"id": "call_1", "type": "function", "function": {"name": kind, "arguments": compact(arguments)}}
    return {
        "tools": TOOLS,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": request},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": result},
            {"role": "assistant", "content": answer},
        ],
    }
