"""Fine-tuning tasks: examples as (prompt, target) pairs, from generators or JSONL files.

A task is generative (the target is text the model generates, scored by exact match) or a
classification (the target is one of the task's labels, predicted by a head; scored by
accuracy and F1). Built-in tasks are generated deterministically from a seed and their
answers can be checked exactly; the held-out split never shares a prompt with the training
split. User tasks come from JSONL files: generative lines are {"prompt", "completion"} or chat
{"messages": [{"role", "content"}, ...]} (the last assistant message is the target);
classification lines are {"text", "label"} or {"messages": [...], "label"}. A generator may make
whole conversations (CONVERSATIONS: the tool-use task, data/tool_use.py), rendered as those lines are.

The router is one more classification task, made from the others: every task's training
prompts, labelled with the task's name (no labelling by the user).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from distlm.config import TaskConfig, TasksConfig
from distlm.data import tool_use
from distlm.data.corpus import DataError

Example = Tuple[str, str]  # (prompt, target): the target is the answer text, or the label
GENERATIVE, CLASSIFICATION = "generative", "classification"
ROUTER = "router"  # the name of the router's task (and head)

# Characters are space-separated so that any byte-level BPE splits them into one token
# each: the model then learns the algorithm, not the tokenizer's merges.


def _addition(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add: {' '.join(str(a))} + {' '.join(str(b))} =", " " + " ".join(str(a + b))


def _reversal(rng: random.Random) -> Example:
    word = [rng.choice("abcdefghij") for _ in range(rng.randint(3, 5))]
    return f"reverse: {' '.join(word)} =", " " + " ".join(reversed(word))


def _sorting(rng: random.Random) -> Example:
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5))]
    return f"sort: {' '.join(digits)} =", " " + " ".join(sorted(digits))


def _kv_lookup(rng: random.Random) -> Example:
    keys = rng.sample("abcdefgh", 3)
    values = [str(rng.randint(0, 9)) for _ in keys]
    query = rng.randrange(3)
    context = " ".join(f"{k} {v}" for k, v in zip(keys, values))
    return f"lookup: {context} ; {keys[query]} =", f" {values[query]}"


# The intent task: short requests to an assistant, one of five intents, each phrased many ways
# with random slot values (a classification task: the target is the label).
_SLOTS = {
    "time": [f"{h}:{m:02d}" for h in range(5, 12) for m in (0, 15, 30, 45)] + ["noon", "midnight"],
    "day": ["today", "tomorrow", "on monday", "on friday", "this weekend", "next week"],
    "city": ["paris", "tokyo", "lima", "oslo", "cairo", "denver", "madrid", "seoul"],
    "name": ["anna", "ben", "chloe", "dev", "emma", "farid", "grace", "hugo"],
    "artist": ["miles davis", "adele", "daft punk", "nina simone", "the beatles", "bach"],
    "genre": ["jazz", "rock", "classical music", "hip hop", "something relaxing"],
    "msg": ["i am running late", "see you soon", "call me back", "dinner is ready", "happy birthday"],
    "event": ["a meeting", "lunch", "the dentist", "a call", "a review"],
    "room": ["kitchen", "living room", "car", "office", "bedroom"],
    "song": ["blue in green", "hey jude", "clair de lune", "get lucky", "feeling good", "hello"],
}
_INTENTS = {
    "alarm": [
        "wake me up at {time}",
        "set an alarm for {time} {day}",
        "i need an alarm at {time}",
        "can you set my alarm to {time}",
        "alarm {time} please",
        "make sure i am up by {time} {day}",
    ],
    "weather": [
        "what is the weather in {city} {day}",
        "will it rain in {city} {day}",
        "how cold is it in {city}",
        "do i need an umbrella in {city} {day}",
        "forecast for {city}",
        "is it sunny in {city} {day}",
    ],
    "music": [
        "play some {genre} in the {room}",
        "put on {song} by {artist}",
        "i want to hear {song} {day}",
        "play {genre} by {artist} in the {room}",
        "can you play something by {artist} in the {room}",
        "music please, {genre}, {song} first",
    ],
    "message": [
        "text {name} that {msg}",
        "send a message to {name}: {msg}",
        "tell {name} {msg}",
        "message {name} saying {msg}",
        "let {name} know {msg}",
        "write to {name}: {msg}",
    ],
    "calendar": [
        "what is on my calendar {day}",
        "schedule {event} with {name} {day} at {time}",
        "do i have anything {day}",
        "book {event} {day} at {time}",
        "am i free {day} at {time}",
        "add {event} to my calendar {day}",
    ],
}


def _intent(rng: random.Random) -> Example:
    label = rng.choice(sorted(_INTENTS))
    template = rng.choice(_INTENTS[label])
    slots = {key: rng.choice(values) for key, values in _SLOTS.items()}
    return template.format(**slots), label


GENERATORS: Dict[str, Callable[[random.Random], Any]] = {
    "addition": _addition,
    "reversal": _reversal,
    "sorting": _sorting,
    "kv_lookup": _kv_lookup,
    "intent": _intent,
    "tool_use": tool_use.conversation,
}
# Generators of whole conversations ({"tools", "messages"}), rendered as a JSONL chat line is.
CONVERSATIONS = {"tool_use"}
# Built-in classification tasks and their labels; every other generator is generative.
CLASSIFIERS: Dict[str, List[str]] = {"intent": sorted(_INTENTS)}

# For tokenizers without a chat template; `distlm serve` renders chats with the same one.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass
class TaskData:
    name: str
    train: List[Example]
    eval: List[Example]
    skipped: int = 0  # malformed lines skipped (task.on_error=skip)
    kind: str = GENERATIVE
    labels: List[str] = field(default_factory=list)  # classification: the head's classes, in order

    @property
    def is_classification(self) -> bool:
        return self.kind == CLASSIFICATION


def _prompt_key(item) -> str:
    """What makes two generated items the same prompt: a conversation's turns before the assistant's first."""
    if isinstance(item, dict):
        first = next(i for i, m in enumerate(item["messages"]) if m["role"] == "assistant")
        return json.dumps(item["messages"][:first], sort_keys=True)
    return item[0]


def generate(generator: str, seed: int, num_train: int, num_eval: int) -> Tuple[List[Any], List[Any]]:
    """Unique examples (or conversations, see CONVERSATIONS); held-out prompts never appear in training."""
    if generator not in GENERATORS:
        raise DataError(f"unknown task generator {generator!r}: use one of {', '.join(GENERATORS)}")
    rng = random.Random(f"{generator}-{seed}")
    make = GENERATORS[generator]
    seen = set()
    examples: List[Any] = []
    for _ in range(20 * (num_train + num_eval)):
        item = make(rng)
        key = _prompt_key(item)
        if key not in seen:
            seen.add(key)
            examples.append(item)
            if len(examples) == num_train + num_eval:
                break
    if len(examples) < num_train + num_eval:
        raise DataError(
            f"task generator {generator!r} yields only {len(examples)} distinct examples: "
            f"lower num_train/num_eval (asked {num_train}+{num_eval})"
        )
    return examples[num_eval:], examples[:num_eval]


class Turns(str):
    """A chat prompt that holds earlier assistant turns: the text is the whole prompt (what the
    router and evaluation read); `spans` are the character ranges of those turns in it (through
    their end-of-turn marker), `learned` whether training learns them (train_on=all), `tools`
    the conversation's declared tools (OpenAI-shaped; evaluation checks calls against them)."""

    spans: Tuple[Tuple[int, int], ...] = ()
    learned: bool = False
    tools: Tuple[Dict[str, Any], ...] = ()

    def turn_prompts(self) -> List[str]:
        """The prompt at each earlier assistant turn: the text before it (generation prompt included)."""
        return [str(self[:start]) for start, _ in self.spans]


def _render(template: Optional[Callable], messages, tools, generation: bool) -> str:
    if template is not None:
        return template(messages, tools=tools, add_generation_prompt=generation, tokenize=False)
    import jinja2

    return jinja2.Template(DEFAULT_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=generation)


def render_conversation(
    messages: List[Dict[str, Any]], tools: Optional[List[Dict[str, Any]]], template: Optional[Callable], train_on: str
) -> Example:
    """An OpenAI-shaped conversation (assistant `tool_calls`, role `tool`, the `tools` it may call)
    as the server renders it (distlm/tools.py): prompt = everything before the last assistant
    turn, target = that turn. When the conversation has earlier assistant turns or tools the
    prompt is Turns (train_on=all: its earlier turns are learned as well). Raises ValueError when
    train_on=all and the template does not render a conversation's beginning as a prefix of the whole."""
    from distlm.tools import chat_messages, renders_tools

    declared = tools
    native = renders_tools(getattr(getattr(template, "__self__", None), "chat_template", None))
    messages, tools = chat_messages(messages, tools, native)
    prompt = _render(template, messages[:-1], tools, True)
    target = messages[-1]["content"] if template is not None else " " + messages[-1]["content"]
    spans = []
    for k, m in enumerate(messages[:-1]):
        if m["role"] != "assistant":
            continue
        before, through = (
            _render(template, messages[:k], tools, True),
            _render(template, messages[: k + 1], tools, False),
        )
        through = through.rstrip()
        if not (through.startswith(before) and prompt.startswith(through)):
            if train_on == "last":  # nothing to learn in place; evaluation scores the last turn only
                spans = []
                break
            raise ValueError(
                "the chat template does not render the conversation's earlier turns as a prefix of the "
                "whole, so they cannot be learned in place"
            )
        spans.append((len(before), len(through)))
    if not spans and not declared:
        return prompt, target
    turns = Turns(prompt)
    turns.spans, turns.learned, turns.tools = tuple(spans), train_on == "all", tuple(declared or ())
    return turns, target


def render_request(messages: List[Dict[str, str]], template: Optional[Callable] = None) -> str:
    """The prompt for the assistant's next turn after these messages (what a served request is)."""
    return _render(template, messages, None, True)


def _messages(record: Dict, where: str) -> List[Dict[str, Any]]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: messages[{i}] needs a string field 'role'")
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list) or not calls:
                raise DataError(f"{where}: messages[{i}].tool_calls must be a non-empty list on an assistant message")
            for j, c in enumerate(calls):
                function = c.get("function") if isinstance(c, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise DataError(
                        f"{where}: messages[{i}].tool_calls[{j}] needs "
                        '{"type": "function", "function": {"name": ..., "arguments": ...}}'
                    )
                arguments = function.get("arguments", {})
                try:
                    parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{where}: messages[{i}].tool_calls[{j}].function.arguments is not valid JSON ({e.msg})"
                    ) from e
                if not isinstance(parsed, dict):
                    raise DataError(f"{where}: messages[{i}].tool_calls[{j}].function.arguments must be a JSON object")
            if m.get("content") is not None and not isinstance(m["content"], str):
                raise DataError(f"{where}: messages[{i}].content must be a string or null")
        elif not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] needs string fields 'role' and 'content'")
    return messages


def _parse_classification(record: Dict, where: str, chat_template, chat: bool) -> Example:
    label = record.get("label")
    if not isinstance(label, str) or not label:
        raise DataError(f"{where}: field 'label' must be a non-empty string (the example's class)")
    if "messages" in record:
        return render_request(_messages(record, where), chat_template), label
    text = record.get("text")
    if not isinstance(text, str) or not text:
        raise DataError(
            f"{where}: a classification line needs a non-empty string 'text' (or 'messages') next to 'label'"
        )
    return (render_request([{"role": "user", "content": text}], chat_template) if chat else text), label


def _parse_line(
    line: str, where: str, chat_template, kind: str = GENERATIVE, chat: bool = False, train_on: str = "all"
) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}): each line must be one JSON object") from e
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if kind == CLASSIFICATION:
        return _parse_classification(record, where, chat_template, chat)
    if "messages" in record:
        messages = _messages(record, where)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must have role 'assistant' (it is the training target)")
        tools = record.get("tools")
        if tools is not None and not (
            isinstance(tools, list) and all(isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools)
        ):
            raise DataError(f'{where}: field \'tools\' must be a list of {{"type": "function", "function": {{...}}}}')
        try:
            return render_conversation(messages, tools, chat_template, train_on)
        except ValueError as e:
            raise DataError(f"{where}: {e}: set task.tasks.<name>.train_on=last") from e
    for key in ("prompt", "completion"):
        if key not in record:
            raise DataError(
                f"{where}: field '{key}' is missing: each line needs 'prompt' and 'completion' strings (or 'messages')"
            )
        if not isinstance(record[key], str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(record[key]).__name__}")
    if not record["completion"]:
        raise DataError(f"{where}: field 'completion' is empty: nothing to learn from this line")
    return record["prompt"], record["completion"]


def file_kind(path: str) -> str:
    """classification when the file's first JSON line has a 'label', else generative."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict):
                return CLASSIFICATION if "label" in record else GENERATIVE
    return GENERATIVE


def read_jsonl(
    path: str, skip_malformed: bool, chat_template=None, kind: str = GENERATIVE, chat: bool = False, train_on="all"
) -> Tuple[List[Example], int]:
    """Examples of a JSONL task file and the number of malformed lines skipped."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"task file {path} does not exist: fix task.tasks.<name>.path")
    examples, skipped = [], 0
    with p.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                examples.append(_parse_line(line, where, chat_template, kind, chat, train_on))
            except UnicodeDecodeError as e:
                if not skip_malformed:
                    raise DataError(f"{where}: not UTF-8 text: save the file as UTF-8") from e
                skipped += 1
            except DataError:
                if not skip_malformed:
                    raise
                skipped += 1
    if not examples:
        raise DataError(f"task file {path} has no usable examples ({skipped} malformed lines skipped): add examples")
    return examples, skipped


def chat_renderer(tokenizer, prompt_format: str) -> Optional[Callable]:
    """How chats become prompts: the tokenizer's chat template, or None for distlm's plain one.
    task.prompt_format=plain keeps generated prompts as they are even with a template."""
    if prompt_format != "plain" and tokenizer.chat_template:
        return tokenizer.apply_chat_template
    return None


def as_chat(example: Example, template: Optional[Callable]) -> Example:
    """A generated (prompt, target) as a user turn and the assistant's answer."""
    prompt, target = example
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": target.strip()}]
    return render_conversation(messages, None, template, "last")


def load_tasks(cfg: TasksConfig, tokenizer, seed: int) -> Dict[str, TaskData]:
    """Every task of the `task` group, rendered for this tokenizer (see task.prompt_format), and the
    router's task when task.router is on."""
    template = chat_renderer(tokenizer, cfg.prompt_format)
    chat = cfg.prompt_format == "chat" or (cfg.prompt_format == "auto" and template is not None)
    tasks = {name: load_task(name, t, seed, template, chat) for name, t in cfg.tasks.items()}
    if cfg.router:
        tasks[ROUTER] = router_task(tasks)
    return tasks


def router_task(tasks: Dict[str, TaskData]) -> TaskData:
    """Perception as a classification task: each task's prompts, labelled with the task's name; a
    conversation gives the prompt at each of its assistant turns (before a tool call, after its result)."""

    def prompts(examples):
        for prompt, _ in examples:
            yield from getattr(prompt, "turn_prompts", list)()
            yield str(prompt)

    train = [(prompt, name) for name, task in tasks.items() for prompt in prompts(task.train)]
    held_out = [(prompt, name) for name, task in tasks.items() for prompt in prompts(task.eval)]
    return TaskData(ROUTER, train, held_out, kind=CLASSIFICATION, labels=list(tasks))


def task_kind(cfg: TaskConfig) -> str:
    """The kind a task's config says, or finds (task.tasks.<name>.kind=auto)."""
    if cfg.kind != "auto":
        return cfg.kind
    if cfg.generator is not None:
        return CLASSIFICATION if cfg.generator in CLASSIFIERS else GENERATIVE
    return file_kind(cfg.path) if cfg.path is not None and Path(cfg.path).is_file() else GENERATIVE


def load_task(name: str, cfg: TaskConfig, seed: int, chat_template=None, chat: bool = False) -> TaskData:
    """`chat`: generated examples become chat turns (user prompt, assistant answer)."""
    kind = task_kind(cfg)
    if cfg.generator is not None:
        if (kind == CLASSIFICATION) != (cfg.generator in CLASSIFIERS):
            raise DataError(
                f"task.tasks.{name}.kind={cfg.kind} does not fit the generator {cfg.generator!r} "
                f"(a {task_kind(TaskConfig(generator=cfg.generator))} task): leave kind=auto"
            )
        train, held_out = generate(cfg.generator, seed, cfg.num_train, cfg.num_eval)
        if cfg.generator in CONVERSATIONS:  # always a chat: the template's, or distlm's plain one

            def render(c):
                return render_conversation(c["messages"], c["tools"], chat_template, cfg.train_on)

            return TaskData(name, [render(c) for c in train], [render(c) for c in held_out])
        if kind == CLASSIFICATION:
            if chat:
                train = [(render_request([{"role": "user", "content": p}], chat_template), y) for p, y in train]
                held_out = [(render_request([{"role": "user", "content": p}], chat_template), y) for p, y in held_out]
            return _labelled(TaskData(name, train, held_out, kind=kind), cfg.labels or CLASSIFIERS[cfg.generator])
        if chat:
            train, held_out = [as_chat(e, chat_template) for e in train], [as_chat(e, chat_template) for e in held_out]
        return TaskData(name, train, held_out)
    if cfg.path is None:
        raise DataError(f"task {name!r} has neither a generator nor a path: set task.tasks.{name}.path=<file.jsonl>")
    skip = cfg.on_error == "skip"
    examples, skipped = read_jsonl(cfg.path, skip, chat_template, kind, chat, cfg.train_on)
    if cfg.eval_path is not None:
        held_out, skipped_eval = read_jsonl(cfg.eval_path, skip, chat_template, kind, chat, cfg.train_on)
        task = TaskData(name, examples, held_out[: cfg.num_eval], skipped + skipped_eval, kind)
    else:
        # Hold out the first examples of a deterministic shuffle.
        order = list(range(len(examples)))
        random.Random(f"{name}-{seed}").shuffle(order)
        n_eval = min(cfg.num_eval, len(examples) // 5)
        if n_eval == 0:
            raise DataError(
                f"task file {cfg.path} has {len(examples)} examples: need at least 5 to hold some out (or set eval_path)"
            )
        held = [examples[i] for i in order[:n_eval]]
        train = [examples[i] for i in order[n_eval:]]
        task = TaskData(name, train, held, skipped, kind)
    if kind == CLASSIFICATION:
        return _labelled(task, cfg.labels or sorted({label for _, label in task.train}), cfg.path)
    return task


def _labelled(task: TaskData, labels: List[str], path: Optional[str] = None) -> TaskData:
    """The task with its label set; a label outside it is an error naming the label (and file)."""
    if len(labels) < 2:
        raise DataError(f"task {task.name!r} has {len(labels)} label(s): a classification needs at least 2")
    known = set(labels)
    for split, examples in (("training", task.train), ("held-out", task.eval)):
        unknown = sorted({label for _, label in examples} - known)
        if unknown:
            where = f" in {path}" if path else ""
            raise DataError(
                f"task {task.name!r}: {split} label(s) {unknown[:5]}{where} are not among its labels {labels}: "
                f"fix the data or set task.tasks.{task.name}.labels"
            )
    task.labels = list(labels)
    return task
