"""Fine-tuning tasks: examples as (prompt, target) pairs, from generators or JSONL files.

Built-in tasks are generated deterministically from a seed and their answers can be
checked exactly; the held-out split never shares a prompt with the training split.
User tasks come from JSONL files, either {"prompt", "completion"} or chat
{"messages": [{"role", "content"}, ...]} (the last assistant message is the target).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from distlm.config import TaskConfig, TasksConfig
from distlm.data.corpus import DataError

Example = Tuple[str, str]  # (prompt, target)

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


GENERATORS: Dict[str, Callable[[random.Random], Example]] = {
    "addition": _addition,
    "reversal": _reversal,
    "sorting": _sorting,
    "kv_lookup": _kv_lookup,
}

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


def generate(generator: str, seed: int, num_train: int, num_eval: int) -> Tuple[List[Example], List[Example]]:
    """Unique examples; held-out prompts never appear in training."""
    if generator not in GENERATORS:
        raise DataError(f"unknown task generator {generator!r}: use one of {', '.join(GENERATORS)}")
    rng = random.Random(f"{generator}-{seed}")
    make = GENERATORS[generator]
    seen: Dict[str, str] = {}
    examples: List[Example] = []
    for _ in range(20 * (num_train + num_eval)):
        prompt, target = make(rng)
        if prompt not in seen:
            seen[prompt] = target
            examples.append((prompt, target))
            if len(examples) == num_train + num_eval:
                break
    if len(examples) < num_train + num_eval:
        raise DataError(
            f"task generator {generator!r} yields only {len(examples)} distinct examples: "
            f"lower num_train/num_eval (asked {num_train}+{num_eval})"
        )
    return examples[num_eval:], examples[:num_eval]


def render_chat(messages: List[Dict[str, str]], template: Optional[Callable] = None) -> Example:
    """Prompt = everything before the last assistant message (plus the assistant cue); target = it."""
    if template is not None:
        return template(messages[:-1], add_generation_prompt=True, tokenize=False), messages[-1]["content"]
    import jinja2

    prompt = jinja2.Template(DEFAULT_CHAT_TEMPLATE).render(messages=messages[:-1], add_generation_prompt=True)
    return prompt, " " + messages[-1]["content"]


def _parse_line(line: str, where: str, chat_template) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}): each line must be one JSON object") from e
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs string fields 'role' and 'content'")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must have role 'assistant' (it is the training target)")
        return render_chat(messages, chat_template)
    for field in ("prompt", "completion"):
        if field not in record:
            raise DataError(
                f"{where}: field '{field}' is missing: each line needs 'prompt' and 'completion' strings (or 'messages')"
            )
        if not isinstance(record[field], str):
            raise DataError(f"{where}: field '{field}' must be a string, got {type(record[field]).__name__}")
    if not record["completion"]:
        raise DataError(f"{where}: field 'completion' is empty: nothing to learn from this line")
    return record["prompt"], record["completion"]


def read_jsonl(path: str, skip_malformed: bool, chat_template=None) -> Tuple[List[Example], int]:
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
                examples.append(_parse_line(line, where, chat_template))
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
    return render_chat(messages, template)


def load_tasks(cfg: TasksConfig, tokenizer, seed: int) -> Dict[str, TaskData]:
    """Every task of the `task` group, rendered for this tokenizer (see task.prompt_format)."""
    template = chat_renderer(tokenizer, cfg.prompt_format)
    chat = cfg.prompt_format == "chat" or (cfg.prompt_format == "auto" and template is not None)
    return {name: load_task(name, t, seed, template, chat) for name, t in cfg.tasks.items()}


def load_task(name: str, cfg: TaskConfig, seed: int, chat_template=None, chat: bool = False) -> TaskData:
    """`chat`: generated examples become chat turns (user prompt, assistant answer)."""
    if cfg.generator is not None:
        train, held_out = generate(cfg.generator, seed, cfg.num_train, cfg.num_eval)
        if chat:
            train, held_out = [as_chat(e, chat_template) for e in train], [as_chat(e, chat_template) for e in held_out]
        return TaskData(name, train, held_out)
    if cfg.path is None:
        raise DataError(f"task {name!r} has neither a generator nor a path: set task.tasks.{name}.path=<file.jsonl>")
    examples, skipped = read_jsonl(cfg.path, cfg.on_error == "skip", chat_template)
    if cfg.eval_path is not None:
        held_out, skipped_eval = read_jsonl(cfg.eval_path, cfg.on_error == "skip", chat_template)
        return TaskData(name, examples, held_out[: cfg.num_eval], skipped + skipped_eval)
    # Hold out the last examples of a deterministic shuffle.
    order = list(range(len(examples)))
    random.Random(f"{name}-{seed}").shuffle(order)
    n_eval = min(cfg.num_eval, len(examples) // 5)
    if n_eval == 0:
        raise DataError(
            f"task file {cfg.path} has {len(examples)} examples: need at least 5 to hold some out (or set eval_path)"
        )
    held = [examples[i] for i in order[:n_eval]]
    train = [examples[i] for i in order[n_eval:]]
    return TaskData(name, train, held, skipped)
