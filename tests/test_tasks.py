"""Fine-tuning tasks, masking, batching, mixtures and the idle-skipping optimizer (fast)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
import torch
from helpers import tiny_pretrained

from distlm.config import ConfigError, TaskConfig, TasksConfig, TrainerConfig, compose
from distlm.data.batches import IGNORE, TaskBatches, collate, encode_example, encode_examples
from distlm.data.corpus import DataError
from distlm.data.mixture import TaskMixture, mixture_weights
from distlm.data.tasks import TaskData, generate, load_task, read_jsonl
from distlm.data.tokenizer import train_tokenizer
from distlm.engine import TaskAwareAdamW


@pytest.fixture(scope="module")
def tokenizer():
    docs = [
        f"add: {a} + {b} = {a + b}\nreverse: a b c = c b a\nlookup: a 1 b 2 ; a = 1"
        for a in range(30)
        for b in range(5)
    ]
    return train_tokenizer(docs, vocab_size=300)


def _answer(generator: str, prompt: str) -> str:
    body = prompt.split(":", 1)[1].rstrip("=").strip()
    if generator == "addition":
        a, b = body.split("+")
        return " ".join(str(int(a.replace(" ", "")) + int(b.replace(" ", ""))))
    if generator == "reversal":
        return " ".join(reversed(body.split()))
    if generator == "sorting":
        return " ".join(sorted(body.split()))
    pairs, query = body.split(";")
    items = pairs.split()
    return dict(zip(items[::2], items[1::2]))[query.strip()]


@pytest.mark.parametrize("generator", ["addition", "reversal", "sorting", "kv_lookup"])
def test_generated_tasks_are_correct_deterministic_and_disjoint(generator):
    train, held_out = generate(generator, seed=7, num_train=300, num_eval=50)
    assert (train, held_out) == generate(generator, seed=7, num_train=300, num_eval=50)
    assert generate(generator, seed=8, num_train=300, num_eval=50)[0] != train
    assert len(train) == 300 and len(held_out) == 50
    assert not {p for p, _ in train} & {p for p, _ in held_out}
    for prompt, target in train[:50] + held_out:
        assert target.strip() == _answer(generator, prompt), prompt


def _write(tmp_path, name: str, lines) -> str:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_jsonl_prompt_completion_and_chat(tmp_path):
    path = _write(
        tmp_path,
        "t.jsonl",
        [
            {"prompt": "Q: 1+1?", "completion": " 2"},
            "",
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        ],
    )
    examples, skipped = read_jsonl(path, skip_malformed=False)
    assert skipped == 0
    assert examples[0] == ("Q: 1+1?", " 2")
    assert examples[1] == ("user: hi\nassistant:", " hello")


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ({"prompt": "x"}, "field 'completion' is missing"),
    ({"prompt": 3, "completion": "y"}, "field 'prompt' must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must have role 'assistant'"),
    ({"messages": [{"role": "user"}]}, "messages[0] needs string fields"),
]


@pytest.mark.parametrize("line,problem", BAD_LINES, ids=[p for _, p in BAD_LINES])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, line, problem):
    path = _write(tmp_path, "bad.jsonl", [{"prompt": "a", "completion": "b"}, line])
    with pytest.raises(DataError) as e:
        read_jsonl(path, skip_malformed=False)
    assert f"{path} line 2" in str(e.value) and problem in str(e.value)
    # on_error=skip: the bad line is counted, the good one kept.
    examples, skipped = read_jsonl(path, skip_malformed=True)
    assert (len(examples), skipped) == (1, 1)


def test_empty_and_missing_task_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no usable examples"):
        read_jsonl(str(empty), skip_malformed=False)
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(str(tmp_path / "nope.jsonl"), skip_malformed=False)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(DataError, match="line 1: not UTF-8"):
        read_jsonl(str(bad), skip_malformed=False)


def test_jsonl_task_holds_out_examples(tmp_path):
    path = _write(tmp_path, "t.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)])
    task = load_task("mine", TaskConfig(path=path, num_eval=8), seed=0)
    assert len(task.eval) == 8 and len(task.train) == 42
    assert not set(task.eval) & set(task.train)


def test_cli_reports_malformed_task_file_before_training(tmp_path):
    from helpers import run_cli

    path = _write(tmp_path, "bad.jsonl", [{"prompt": "a", "completion": "b"}] * 10 + [{"prompt": "a"}])
    model_dir = tmp_path / "model"
    tiny_pretrained(model_dir)
    result = run_cli(
        "train",
        "task=jsonl",
        f"task.tasks.mine.path={path}",
        f"init_from={model_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{path} line 11: field 'completion' is missing" in result.stderr


def test_prompt_tokens_are_masked_from_the_loss(tokenizer):
    ids, labels = encode_example(tokenizer, "add: 1 2 + 3 =", " 1 5")
    prompt_len = len(tokenizer("add: 1 2 + 3 =", add_special_tokens=False).input_ids)
    assert labels[:prompt_len] == [IGNORE] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[prompt_len:-1]) == " 1 5"
    batch = collate([(ids, labels), ([1, 2], [IGNORE, 2])], pad_id=0)
    assert batch["input_ids"].shape == (2, len(ids))
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (len(ids) - 2)
    assert (batch["labels"][1, 2:] == IGNORE).all()


def _batches(tokenizer, tasks, cfg: TasksConfig, rank=0, world=1, micro=4, global_batch=8):
    tr = TrainerConfig(micro_batch_size=micro, global_batch_size=global_batch, seed=3)
    return TaskBatches(tasks, tokenizer, cfg, tr, seq_len=64, rank=rank, world=world)


def _suite(n=200):
    return {g: TaskData(g, *generate(g, 0, n, 10)) for g in ("addition", "reversal", "sorting")}


def test_mixture_weights_per_strategy():
    sizes = {"a": 900, "b": 100}
    assert mixture_weights(TasksConfig(mixture="proportional"), sizes) == pytest.approx({"a": 0.9, "b": 0.1})
    t = mixture_weights(TasksConfig(mixture="temperature", temperature=2.0), sizes)
    assert t["a"] / t["b"] == pytest.approx(3.0)  # (900/100) ** (1/2)
    w = mixture_weights(TasksConfig(mixture="weights", weights={"a": 1.0, "b": 3.0}), sizes)
    assert w == pytest.approx({"a": 0.25, "b": 0.75})
    assert mixture_weights(TasksConfig(mixture="round_robin"), sizes) == pytest.approx({"a": 0.5, "b": 0.5})


@pytest.mark.parametrize("strategy", ["proportional", "temperature", "weights", "round_robin"])
def test_realised_shares_match_the_strategy(strategy):
    sizes = {"a": 4000, "b": 1000, "c": 250}
    cfg = TasksConfig(mixture=strategy, temperature=3.0, weights={"a": 1.0, "b": 1.0, "c": 2.0})
    mixture = TaskMixture(cfg, sizes, seed=11)
    steps = 4000
    counts = Counter(mixture.task_for_step(s) for s in range(steps))
    expected = mixture_weights(cfg, sizes)
    for name, p in expected.items():
        # Binomial standard error of a share over 4000 draws is at most 0.008: allow 4 of them.
        assert counts[name] / steps == pytest.approx(p, abs=0.032), (name, counts)
    if strategy == "round_robin":
        assert [mixture.task_for_step(s) for s in range(6)] == ["a", "b", "c", "a", "b", "c"]


def _rows(micro_batches):
    """The unpadded examples of some micro batches, order-free."""
    return sorted(
        tuple(r[m.bool()].tolist()) for b in micro_batches for r, m in zip(b["input_ids"], b["attention_mask"])
    )


def test_task_batches_shard_across_ranks_and_resume(tokenizer):
    tasks, cfg = _suite(), TasksConfig(mixture="proportional")
    single = _batches(tokenizer, tasks, cfg)
    ranks = [_batches(tokenizer, tasks, cfg, rank=r, world=2, micro=2) for r in range(2)]
    for step in range(12):
        whole = single.next(step)
        parts = [b.next(step) for b in ranks]
        assert whole.task == parts[0].task == parts[1].task
        assert _rows(whole.micro_batches) == _rows([mb for p in parts for mb in p.micro_batches])

    # A sampler restored at step 12 continues exactly like the uninterrupted one.
    resumed = _batches(tokenizer, tasks, cfg)
    resumed.load_state_dict(json.loads(json.dumps(single.state_dict())))
    reference = _batches(tokenizer, tasks, cfg)
    for step in range(12):
        reference.next(step)
    for step in range(12, 30):
        a, b = resumed.next(step), reference.next(step)
        assert a.task == b.task
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a.micro_batches, b.micro_batches))
    assert resumed.shares() == reference.shares()
    with pytest.raises(DataError, match="same task set"):
        _batches(tokenizer, {"addition": tasks["addition"]}, cfg).load_state_dict(single.state_dict())


def test_length_bucketing_reduces_padding(tokenizer):
    short = [(f"q{i}", " a") for i in range(200)]
    long = [(f"q{i} " + "x " * 20, " b") for i in range(200)]
    tasks = {"mixed": TaskData("mixed", short + long, short[:5])}
    batches = _batches(tokenizer, tasks, TasksConfig(), micro=4, global_batch=16)
    padded = real = 0
    for step in range(20):
        for mb in batches.next(step).micro_batches:
            padded += mb["attention_mask"].numel()
            real += int(mb["attention_mask"].sum())
    # Random micro batches of this half-short, half-long data would be ~40% padding.
    assert 1 - real / padded < 0.15


def test_idle_adapter_groups_are_left_untouched():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = TaskAwareAdamW([{"params": [a], "tasks": ["a"]}, {"params": [b], "tasks": ["b"]}], lr=0.1, weight_decay=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    after_first = b.detach().clone(), {k: v.clone() for k, v in opt.state[b].items()}
    opt.step_task = "a"  # b's task did not run (even a stale gradient must not move it)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    assert torch.equal(b, after_first[0])
    assert all(torch.equal(v, after_first[1][k]) for k, v in opt.state[b].items())
    assert not torch.equal(a, torch.ones(3)) and int(opt.state[a]["step"]) == 2
    assert b.grad is not None  # gradients are handed back to their owner (DeepSpeed)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["adapter=per_task_lora"], "adapter=per_task_lora"),
        (["task=suite", "adapter=lora", "adapter.target_modules=[]"], "adapter.target_modules"),
        (["task=suite", "adapter=none", "adapter.modules_to_save=[norms]"], "adapter.modules_to_save"),
        (["task=suite", "task.mixture=weights"], "task.mixture=weights"),
        (["task=suite", "task.mixture=weights", "+task.weights.nope=1"], "task.weights"),
        (["task=jsonl"], "task.tasks.mine.path"),
        (["task=jsonl", "task.tasks.mine.path=/no/such.jsonl"], "task.tasks.mine.path"),
        (["task=suite", "task.mixture=sometimes"], "task.mixture"),
    ],
)
def test_task_and_adapter_config_errors(overrides, key, tmp_path):
    with pytest.raises(ConfigError) as e:
        compose([*overrides, f"hydra.run.dir={tmp_path}"])
    assert key in str(e.value)


def test_multitask_recipe_composes(tmp_path):
    model_dir = tmp_path / "pretrained"
    tiny_pretrained(model_dir)
    cfg, _ = compose(["experiment=multitask", f"init_from={model_dir}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert cfg.adapter.name == "per_task_lora"
    assert set(cfg.task.tasks) == {"addition", "reversal", "sorting", "kv_lookup"}
    assert math.isclose(sum(mixture_weights(cfg.task, {t: 1 for t in cfg.task.tasks}).values()), 1.0)


def test_modules_to_save_naming_no_module_fails_before_launch(tmp_path):
    """A module name the pretrained model lacks: exit 2 with the names it has, before Ray starts."""
    from helpers import run_cli

    model_dir = tmp_path / "pretrained"
    tiny_pretrained(model_dir)
    result = run_cli(
        "train",
        "task=suite",
        "adapter=per_task_lora",
        "adapter.modules_to_save=[embeddings,embed_tokens]",
        f"init_from={model_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "adapter.modules_to_save: 'embed_tokens' matches no module" in result.stderr
    assert "lm_head" in result.stderr  # names the model has


# ---------------------------------------------------------------- chat conversations: every assistant turn


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CONVERSATION = {
    "tools": [WEATHER_TOOL],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "rain, 4 C"},
        {"role": "assistant", "content": "Rain and 4 C."},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "assistant", "content": "I can only tell today's."},
    ],
}


def _learned_runs(tokenizer, ids, labels):
    """The learned tokens, decoded run by run (a run: consecutive positions with a label)."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs.append(current)
    return [tokenizer.decode(r) for r in runs if r]


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_every_assistant_turn_is_learned_in_the_servers_rendering(train_on, smollm2_dir, tmp_path):
    """A tool-use conversation in SmolLM2's own template: the learned tokens are exactly each
    assistant turn (the call as distlm/tools.py writes it, the answers) with its end-of-turn
    marker; system, user and tool turns are not. The prompt is the server's rendering of the
    same messages (ModelText.encode_chat), so training and serving see the same text."""
    from transformers import AutoTokenizer

    from distlm.serve.engines.base import ModelText
    from distlm.tools import format_call

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n")
    (prompt, target), *_ = read_jsonl(str(path), False, tok.apply_chat_template, train_on=train_on)[0]
    ids, labels = encode_example(tok, prompt, target)
    # The batched encoder (the fast tokenizer's own batch call) gives the ids tokenizer() gives,
    # each row its own, in a batch as alone.
    plain = ("a plain prompt", " x")
    assert ids == tok(prompt, add_special_tokens=False).input_ids + tok(target, add_special_tokens=False).input_ids + [
        tok.eos_token_id
    ]
    assert encode_examples(tok, [(prompt, target), plain]) == [(ids, labels), encode_example(tok, *plain)]

    end = tok.eos_token  # <|im_end|>, SmolLM2's end of turn and EOS
    call = format_call("get_weather", {"city": "Oslo"})
    earlier = [call + end, "Rain and 4 C." + end] if train_on == "all" else []
    assert _learned_runs(tok, ids, labels) == [*earlier, "I can only tell today's." + end]
    served = ModelText(smollm2_dir).encode_chat(CONVERSATION["messages"][:-1], CONVERSATION["tools"])
    assert tok(prompt, add_special_tokens=False).input_ids == served
    assert "get_weather" in prompt and "rain, 4 C" in prompt


def _tool_use_reference(conversation):
    """The call and result a tool-use conversation must have, worked out from its request (and,
    for the extension lookup, from the staff table in its system turn) without the generator."""
    system, user = conversation["messages"][0]["content"], conversation["messages"][1]["content"]
    numbers = [int(n) for n in re.findall(r"\d+", user)]
    ops = {
        "+": ("plus", "Add", "+", "sum"),
        "-": ("minus", "Subtract", " - ", "take away"),
        "*": ("times", "Multiply", "*", "product"),
    }
    for op, words in ops.items():
        if any(w in user for w in words):
            a, b = numbers[::-1] if user.startswith("Subtract") else numbers
            return "calculator", {"a": a, "op": op, "b": b}, str(eval(f"{a} {op} {b}"))
    units = {"kilometers": ("km", "m", 1000), "meters": ("m", "cm", 100), "kilograms": ("kg", "g", 1000)}
    units |= {"hours": ("hour", "minute", 60), "minutes": ("minute", "second", 60)}
    for word, (frm, to, factor) in units.items():
        if numbers and f"{numbers[0]} {word}" in user:
            return "convert_units", {"value": numbers[0], "from_unit": frm, "to_unit": to}, str(numbers[0] * factor)
    staff = dict(re.findall(r"(\w+): (\d+)", system.split("Staff directory (name: id):")[1]))
    (name,) = [n for n in staff if n in user]
    return "get_extension", {"employee_id": int(staff[name])}, None


def test_the_tool_use_task_has_checkable_calls_and_answers():
    train, held_out = generate("tool_use", 3, 600, 60)
    assert (train, held_out) == generate("tool_use", 3, 600, 60)
    requests = lambda cs: {(c["messages"][0]["content"], c["messages"][1]["content"]) for c in cs}  # noqa: E731
    assert not requests(train) & requests(held_out)
    kinds = Counter()
    for c in train + held_out:
        system, user, call, result, answer = c["messages"]
        assert [m["role"] for m in c["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
        assert {t["function"]["name"] for t in c["tools"]} == {"calculator", "convert_units", "get_extension"}
        (fn,) = [x["function"] for x in call["tool_calls"]]
        name, arguments, value = _tool_use_reference(c)
        assert (fn["name"], json.loads(fn["arguments"])) == (name, arguments), user
        assert value is None or result["content"] == value, user
        assert result["content"] in answer["content"] and result["tool_call_id"] == call["tool_calls"][0]["id"]
        kinds[name] += 1
    assert min(kinds.values()) > 150  # each tool is well represented


def test_the_tool_use_task_is_rendered_as_the_server_renders_its_requests(smollm2_dir):
    """At each assistant turn the prompt is, token for token, what `distlm serve` makes of a request
    with the messages so far and the tools; the call turn is learned, and the router sees both turns."""
    from transformers import AutoTokenizer

    from distlm.data.tasks import ROUTER, router_task
    from distlm.serve.engines.base import ModelText

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = TaskConfig(generator="tool_use", num_train=20, num_eval=4)
    task = load_task("tools", cfg, 3, tok.apply_chat_template, True)
    conversation = generate("tool_use", 3, 20, 4)[1][0]
    prompt, target = task.eval[0]
    served = ModelText(smollm2_dir)
    assert tok(prompt.turn_prompts()[0], add_special_tokens=False).input_ids == served.encode_chat(
        conversation["messages"][:2], conversation["tools"]
    )
    assert tok(prompt, add_special_tokens=False).input_ids == served.encode_chat(
        conversation["messages"][:4], conversation["tools"]
    )
    assert target == conversation["messages"][-1]["content"]
    ids, labels = encode_example(tok, prompt, target)
    call = conversation["messages"][2]["tool_calls"][0]["function"]
    from distlm.tools import format_call

    end = tok.eos_token
    assert _learned_runs(tok, ids, labels) == [format_call(call["name"], call["arguments"]) + end, target + end]
    router = router_task({"tools": task})
    assert len(router.train) == 2 * len(task.train) and {y for _, y in router.train} == {"tools"}
    assert ROUTER not in router.labels


def test_score_call_checks_the_names_the_arguments_and_the_schema():
    from distlm.data.tool_use import TOOLS
    from distlm.evaluate import score_call

    def call(name, **arguments):
        return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"

    expected = [("calculator", {"a": 3, "op": "*", "b": 4})]
    cases = [
        (call("calculator", a=3, op="*", b=4), (True, True)),
        (call("calculator", b=4.0, op="*", a=3), (True, True)),  # key order, 4.0 == 4: the same JSON values
        (call("calculator", a=3, op="*", b=5), (False, True)),  # valid, wrong value
        (call("calculator", a=3, op="/", b=4), (False, False)),  # not in the enum
        (call("calculator", a=3, op="*"), (False, False)),  # a required argument missing
        (call("convert_units", value=3, from_unit="km", to_unit="m"), (False, True)),  # the wrong tool
        (call("weather", city="Oslo"), (False, False)),  # not a declared tool: text, no call
        (call("calculator", a=3, op="*", b=4) * 2, (False, True)),  # one call too many
        ("3 * 4 = 12.", (False, False)),
    ]
    for text, want in cases:
        assert score_call(text, expected, TOOLS) == want, text


def test_malformed_tool_conversations_name_the_field(tmp_path):
    bad_calls = dict(CONVERSATION, messages=[*CONVERSATION["messages"][:2], {"role": "assistant", "tool_calls": []}])
    bad_args = json.loads(json.dumps(CONVERSATION))
    bad_args["messages"][2]["tool_calls"][0]["function"]["arguments"] = "{city: Oslo"
    cases = [
        (bad_calls, "messages[2].tool_calls must be a non-empty list"),
        (bad_args, "messages[2].tool_calls[0].function.arguments is not valid JSON"),
        (dict(CONVERSATION, tools={"get_weather": {}}), "field 'tools' must be a list"),
    ]
    for record, message in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(DataError, match=re.escape(message)):
            read_jsonl(str(path), False)
    with pytest.raises(ConfigError, match="train_on"):
        compose(["task=jsonl", "task.tasks.mine.path=x.jsonl", "task.tasks.mine.train_on=first"])
