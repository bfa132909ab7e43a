"""The agent's training side: classification tasks and their metrics, the router as a task made of
the other tasks, heads trained in the multi-task run under ZeRO-2 and ZeRO-3 and exported in a
layout that plain torch/transformers/peft code loads, `distlm eval` with the agent end to end,
and early stopping that exports the best step."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import compose_cfg, run_cli, tiny_pretrained

from distlm.config import ConfigError, TaskConfig, TasksConfig, compose
from distlm.data.batches import TaskBatches
from distlm.data.corpus import DataError
from distlm.data.mixture import TaskMixture
from distlm.data.tasks import CLASSIFIERS, ROUTER, generate, load_task, router_task
from distlm.data.tokenizer import train_tokenizer
from distlm.evaluate import classification_metrics
from distlm.report import read_metrics

# The tiny model's 64 positions hold no tool-use conversation (~450 tokens, the tools' schemas in
# the system turn): the walk of test_presets trains experiment=agent with it on SmolLM2.
AGENT = [
    "task=agent",
    "adapter=per_task_lora",
    "~task.tasks.tools",
    *[f"task.tasks.{t}.num_train=200" for t in ("addition", "reversal", "sorting", "kv_lookup", "intent")],
    "task.tasks.intent.num_eval=16",
    "task.eval_examples=8",
    "data.seq_len=64",
    "trainer.micro_batch_size=4",
    "trainer.global_batch_size=8",
    "trainer.warmup_steps=1",
    "trainer.lr=1e-2",
    "tracking=disabled",
]


# ---------------------------------------------------------------- data and metrics (fast)


def test_intent_is_a_deterministic_classification_with_disjoint_held_out():
    train, held_out = generate("intent", 7, 500, 50)
    assert (train, held_out) == generate("intent", 7, 500, 50)
    assert not {p for p, _ in train} & {p for p, _ in held_out}
    labels = Counter(label for _, label in train)
    assert set(labels) == set(CLASSIFIERS["intent"]) and len(labels) >= 3
    assert min(labels.values()) > 60  # every intent is well represented
    task = load_task("intent", TaskConfig(generator="intent", num_train=100, num_eval=10), 7)
    assert task.is_classification and task.labels == sorted(labels)


def test_classification_jsonl_lines(tmp_path):
    path = tmp_path / "sentiment.jsonl"
    rows = [
        {"text": f"review {i} was {'great' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"} for i in range(20)
    ]
    rows.append({"messages": [{"role": "user", "content": "loved it"}], "label": "pos"})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task("sentiment", TaskConfig(path=str(path), num_eval=4), 1)
    assert task.is_classification and task.labels == ["neg", "pos"]
    assert len(task.train) + len(task.eval) == 21
    assert "user: loved it" in "".join(p for p, _ in task.train + task.eval)  # messages rendered as a request
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": ""}) + "\n")
    with pytest.raises(DataError, match="line 1: field 'label' must be a non-empty string"):
        load_task("bad", TaskConfig(path=str(bad), kind="classification"), 1)


def test_unknown_label_names_the_label_and_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": ["a", "b", "c"][i % 3]}) for i in range(30)))
    with pytest.raises(DataError, match=r"label\(s\) \['c'\] in .*t.jsonl are not among its labels"):
        load_task("t", TaskConfig(path=str(path), labels=["a", "b"]), 1)


def test_router_task_is_every_task_labelled_with_its_name():
    tasks = {
        "addition": load_task("addition", TaskConfig(generator="addition", num_train=30, num_eval=5), 1),
        "intent": load_task("intent", TaskConfig(generator="intent", num_train=40, num_eval=6), 1),
    }
    router = router_task(tasks)
    assert router.is_classification and router.labels == ["addition", "intent"]
    assert Counter(label for _, label in router.train) == {"addition": 30, "intent": 40}
    assert Counter(label for _, label in router.eval) == {"addition": 5, "intent": 6}


def test_classification_metrics_match_a_hand_count():
    # rows: true label, columns: predicted
    confusion = torch.tensor([[5.0, 1.0, 0.0], [2.0, 3.0, 1.0], [0.0, 0.0, 4.0]])
    m = classification_metrics(confusion, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(12 / 16)
    p = {"a": 5 / 7, "b": 3 / 4, "c": 4 / 5}
    r = {"a": 5 / 6, "b": 3 / 6, "c": 4 / 4}
    for label in "abc":
        f1 = 2 * p[label] * r[label] / (p[label] + r[label])
        assert m[f"precision/{label}"] == pytest.approx(p[label])
        assert m[f"recall/{label}"] == pytest.approx(r[label])
        assert m[f"f1/{label}"] == pytest.approx(f1)
    assert m["macro_f1"] == pytest.approx(sum(2 * p[x] * r[x] / (p[x] + r[x]) for x in "abc") / 3)


def test_router_takes_its_share_of_steps_and_classification_batches_carry_labels():
    tok = train_tokenizer(["add: 1 + 2 = 3 wake me up at 7:00"] * 30, vocab_size=300)
    cfg = TasksConfig(router=True, router_share=0.25, mixture="round_robin")
    tasks = {
        "addition": load_task("addition", TaskConfig(generator="addition", num_train=64, num_eval=4), 1),
        "intent": load_task("intent", TaskConfig(generator="intent", num_train=64, num_eval=4), 1),
    }
    tasks[ROUTER] = router_task(tasks)
    mixture = TaskMixture(cfg, {n: len(t.train) for n, t in tasks.items()}, 3, ROUTER)
    picks = Counter(mixture.task_for_step(s) for s in range(2000))
    assert picks[ROUTER] / 2000 == pytest.approx(0.25, abs=0.03)
    assert picks["addition"] == pytest.approx(picks["intent"], rel=0.1)
    from distlm.config import TrainerConfig

    batches = TaskBatches(tasks, tok, cfg, TrainerConfig(micro_batch_size=4, global_batch_size=8), 64, 0, 2)
    for step in range(40):
        out = batches.next(step)
        if out.task in ("intent", ROUTER):
            assert out.head == out.task
            (micro,) = out.micro_batches
            assert micro["class_labels"].shape == (4,) and set(micro) == {"input_ids", "attention_mask", "class_labels"}
        else:
            assert out.head is None and "shift_labels" in out.micro_batches[0]


def test_agent_config_errors(tmp_path):
    for overrides, message in [
        (["task=agent", "adapter=none"], "task.router=true reads the base model"),
        (["task=agent", "adapter=per_task_lora", "task.router_share=1.5"], "task.router_share=1.5"),
        (["task=agent", "adapter=per_task_lora", "serve.agent.min_confidence=2"], "serve.agent.min_confidence=2"),
        (["trainer.early_stopping.metric=eval/nope"], "not logged by this run's evaluations"),
        (["task=agent", "adapter=per_task_lora", "+task.tasks.router={generator: addition}"], "'router' is the name"),
        (["task=agent", "adapter=per_task_lora", "+task.tasks.base={generator: addition}"], "may not be named 'base'"),
        (["task=agent", "adapter=per_task_lora", "adapter.head_lr_scale=0"], "adapter.head_lr_scale=0"),
        (["task=agent", "adapter=per_task_lora", "task.router_depth=0"], "task.router_depth=0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            compose([*overrides, f"hydra.run.dir={tmp_path}"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_router_features_are_the_first_layers_through_the_final_norm(arch, tmp_path):
    """pooled_hidden(layers=k) equals plain transformers' model loaded with num_hidden_layers=k, and
    with stop=True no layer after the k-th runs (perception costs only the layers it reads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distlm.heads import pooled_hidden, router_layers

    sizes = {"vocab_size": 97, "num_hidden_layers": 8, "hidden_size": 32, "num_attention_heads": 4}
    if arch == "llama":
        sizes.update(intermediate_size=64, num_key_value_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **sizes)).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    k = router_layers(model, 0.25)
    assert k == 2 and router_layers(model, 0.01) == 1 and router_layers(model, 1.0) == 8
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding is left out of the mean
    blocks = model.base_model.layers if arch == "llama" else model.base_model.h
    ran = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        stopped = pooled_hidden(model, ids, mask, k, stop=True)
        assert ran == [0, 1]
        full_pass = pooled_hidden(model, ids, mask, k)  # what training runs: every layer, layer k read
        assert ran[2:] == list(range(8))
    for h in hooks:
        h.remove()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, num_hidden_layers=k).eval()
    with torch.no_grad():
        hidden = plain.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    reference = torch.stack([hidden[0].mean(0), hidden[1, :6].mean(0)])
    assert torch.allclose(stopped, reference, atol=1e-5) and torch.allclose(full_pass, reference, atol=1e-5)
    with torch.no_grad():
        final = pooled_hidden(model, ids, mask)
    assert not torch.allclose(final, reference, atol=1e-3)  # the final states are something else

    # Under a peft model with adapters (as served): "__base__" rows read the base, the forward is cut
    # after layer k, and no hook is left behind on the adapter layers.
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.eval()
    with torch.no_grad():
        base_rows = pooled_hidden(peft_model, ids, mask, k, stop=True, adapter_names=["__base__"] * 2)
        adapted = pooled_hidden(peft_model, ids, mask, k, stop=True, adapter_names=["default"] * 2)
    assert torch.allclose(base_rows, reference, atol=1e-5) and not torch.allclose(adapted, reference, atol=1e-3)
    assert not any(m._forward_pre_hooks for m in peft_model.modules())


# ---------------------------------------------------------------- end to end (real Ray + DeepSpeed)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pretrained") / "model"
    tiny_pretrained(directory)
    return directory


def _train(overrides, run_dir: Path):
    from distlm import driver

    cfg, _ = compose([*overrides, f"hydra.run.dir={run_dir}"])
    summary = driver.run(cfg)
    return cfg, summary, read_metrics(str(run_dir / "metrics.jsonl"))


def _plain_head_logits(export: Path, name: str, input_ids: torch.Tensor) -> torch.Tensor:
    """An exported head used the way the README documents, with plain torch/transformers/peft."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = export / "router" if name == ROUTER else export / "heads" / name
    config = json.loads((folder / "head_config.json").read_text())
    weights = load_file(folder / "head.safetensors")
    head = torch.nn.Linear(config["in_features"], len(config["labels"]))
    head.load_state_dict(weights)
    layers = {"num_hidden_layers": config["num_hidden_layers"]} if config["num_hidden_layers"] else {}
    model = AutoModelForCausalLM.from_pretrained(export, **layers)
    if config["adapter"] is not None:
        model = PeftModel.from_pretrained(model, export / "adapters" / config["adapter"]).merge_and_unload()
    with torch.no_grad():
        hidden = model.base_model(input_ids=input_ids).last_hidden_state
        return head(hidden.mean(dim=1))  # mean over the request's tokens (no padding here)


@pytest.fixture(scope="module")
def agent_runs(pretrained, tmp_path_factory, ray_session):
    """A short agent run per ZeRO stage, trained once for the module's tests: (run dir, summary, records)."""
    runs = {}

    def get(zero: str):
        if zero not in runs:
            run_dir = tmp_path_factory.mktemp(f"agent-{zero}") / "run"
            overrides = [
                *AGENT,
                f"init_from={pretrained}",
                f"zero={zero}",
                "trainer.max_steps=10",
                "trainer.eval_every=10",
            ]
            _, summary, records = _train(overrides, run_dir)
            runs[zero] = (run_dir, summary, records)
        return runs[zero]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_heads_and_router_train_export_and_load_without_distlm(zero, agent_runs, tmp_path):
    run_dir, summary, records = agent_runs(zero)
    last = records[-1]
    for key in ("eval/intent/accuracy", "eval/intent/macro_f1", "eval/router/accuracy", "eval/mean_score"):
        assert 0.0 <= last[key] <= 1.0, key
    assert {f"eval/intent/f1/{label}" for label in CLASSIFIERS["intent"]} <= set(last)
    # The router's and the intent head's steps both happened, and each trained only its own layers.
    trained = {t for r in records for t in ("intent", ROUTER) if f"train/{t}/loss" in r}
    assert trained == {"intent", ROUTER}
    report = json.loads((run_dir / "eval_report.json").read_text())
    assert sorted(report["tasks"]) == ["intent", ROUTER]
    assert sum(map(sum, report["tasks"]["intent"]["confusion"])) == 8  # task.eval_examples of them
    assert sum(map(sum, report["tasks"][ROUTER]["confusion"])) == 8 * 5  # as many of each task it routes to
    # The export: heads in their own layout, checked against the trained model's logits.
    export = Path(summary["export"])
    info = json.loads((export / "distlm_export.json").read_text())
    assert info["heads"] == ["intent", ROUTER] and info["probe_max_abs_diff"] <= 1e-4
    probe = torch.load(Path(summary["checkpoint"]) / "probe.pt", weights_only=True)
    router_config = json.loads((export / ROUTER / "head_config.json").read_text())
    assert router_config["num_hidden_layers"] == 1  # task.router_depth 0.25 of the model's 2 layers
    assert json.loads((export / "heads" / "intent" / "head_config.json").read_text())["num_hidden_layers"] is None
    for name in ("intent", ROUTER):
        logits = _plain_head_logits(export, name, probe["input_ids"])
        assert torch.allclose(logits, probe["heads"][name], atol=1e-4), name
    assert "agent" in summary and 0.0 <= summary["agent"]["metrics"]["eval/agent/routing_accuracy"] <= 1.0

    # `distlm eval` on the export: the run's final numbers again, plus the agent end to end.
    result = run_cli("eval", str(run_dir), "--json", str(tmp_path / "eval.json"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    for task in ("addition", "intent", ROUTER):
        assert evaluated[f"eval/{task}/score"] == pytest.approx(last[f"eval/{task}/score"]), task
    assert "eval/agent/routing_accuracy" in evaluated and "score (agent)" in result.stdout


@pytest.mark.slow
def test_early_stopping_ends_the_run_and_exports_the_best_step(tmp_path, ray_session):
    """The tracked metric is made to get worse at every evaluation (val/loss with mode=max): the
    first evaluated step stays the best, the run stops after `patience` more evaluations, and the
    export is that step's model although newer checkpoints exist."""
    run_dir = tmp_path / "run"
    cfg = compose_cfg(
        [
            "tracking=disabled",
            "trainer.max_steps=40",
            "trainer.eval_every=2",
            "trainer.checkpoint_every=100",
            "trainer.keep_checkpoints=1",
            "trainer.early_stopping.metric=val/loss",
            "trainer.early_stopping.mode=max",
            "trainer.early_stopping.patience=2",
        ],
        run_dir,
    )
    from distlm import driver

    summary = driver.run(cfg)
    records = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if "val/loss" in r and r["step"] > 0]
    assert [r["step"] for r in records] == [2, 4, 6]  # stopped after two evaluations without improvement
    assert records[1]["val/loss"] < records[0]["val/loss"]  # (the loss did fall: "max" saw no gain)
    info = json.loads((Path(summary["export"]) / "distlm_export.json").read_text())
    assert info["step"] == 2 and info["probe_max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000006"]


@pytest.mark.slow
def test_the_agent_is_served_as_one_model(agent_runs):
    """Through the official openai client: `<run>` routes each request (the trace names the task,
    and the answer equals the one `<run>:<task>` forces); mixed tasks in flight together; streaming
    through the agent; the intent head answers with a label; `<run>:base`; /v1/models."""
    import concurrent.futures

    import httpx
    from openai import OpenAI
    from ray import serve

    from distlm.data.tasks import load_tasks
    from distlm.runtime import free_port
    from distlm.serve.app import build_app

    run_dir, _, _ = agent_runs("zero2")
    name = run_dir.name
    cfg, _ = compose([*AGENT, f"hydra.run.dir={run_dir}"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "export")
    tasks = load_tasks(cfg.task, tokenizer, cfg.trainer.seed)
    prompts = [(t, p) for t, task in tasks.items() if t != ROUTER for p, _ in task.eval[:3]]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # min_confidence 0: ten steps leave the router unsure; every request follows its top task.
    app = build_app({"path": str(run_dir), "max_batch_size": 8, "agent": {"min_confidence": 0.0}})
    serve.run(app, name="agent", route_prefix="/")
    try:
        client = OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", http_client=httpx.Client(trust_env=False)
        )
        models = {m.id: m.model_extra["description"] for m in client.models.list().data}
        assert set(models) == {name, f"{name}:base", *(f"{name}:{t}" for t in cfg.task.tasks)}
        assert models[name].startswith("the agent") and "classification head" in models[f"{name}:intent"]

        def ask(model: str, prompt: str):
            r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
            return r.choices[0].text, (r.model_extra or {}).get("agent")

        # The agent's requests in flight together with requests forced to every task and to the base:
        # batches mix tasks, adapters and heads.
        mixed = [(name, p) for _, p in prompts] + [(f"{name}:{t}", p) for t, p in prompts] + [(f"{name}:base", "x")]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda mp: ask(*mp), mixed))
        routed = answers[: len(prompts)]
        for (_, prompt), (text, trace) in zip(prompts, routed):
            assert set(trace) >= {"task", "confidence", "runner_up", "fallback"} and not trace["fallback"]
            assert trace["runner_up"] != trace["chosen"] and trace["confidence"] >= trace["runner_up_confidence"]
            forced = f"{name}:{trace['task']}" if trace["task"] else f"{name}:base"
            assert ask(forced, prompt) == (text, None), (prompt, trace)  # (ten steps: the router need not be right)
            if trace["task"] == "intent":
                assert text in CLASSIFIERS["intent"]
        for (model, prompt), answer in zip(mixed[len(prompts) :], answers[len(prompts) :]):
            assert answer == ask(model, prompt), model  # batched with others = alone
        assert ask(f"{name}:intent", prompts[0][1])[0] in CLASSIFIERS["intent"]

        # Streaming through the agent: the trace on the first chunk, the same text as without streaming.
        prompt = prompts[0][1]
        chunks = list(client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0, stream=True))
        assert chunks[0].model_extra["agent"]["task"] == ask(name, prompt)[1]["task"]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == ask(name, prompt)[0]
    finally:
        serve.delete("agent")
        serve.shutdown()


@pytest.mark.slow
def test_below_min_confidence_the_agent_falls_back(agent_runs):
    """With min_confidence above every routing confidence, each request goes to the fallback (the
    base model, or the configured task) and its trace says so."""
    import asyncio

    from distlm.config import AgentConfig
    from distlm.export import AGENT as ROUTED
    from distlm.export import find_export
    from distlm.serve.engines import GenerationRequest, SamplingParams
    from distlm.serve.engines.hf import HFEngine

    async def answers(engine, requests):
        async def one(request):
            return [e async for e in engine.generate(request)]

        try:
            return await asyncio.gather(*(one(r) for r in requests))  # one batch: they arrive together
        finally:
            engine.shutdown()

    run_dir, _, _ = agent_runs("zero2")
    export = find_export(str(run_dir))
    prompts = ["add: 12 + 7 =", "reverse: a b c ="]
    for fallback in (None, "sorting"):
        engine = HFEngine(export, agent=AgentConfig(min_confidence=1.0, fallback=fallback))
        ids = [engine.text.encode(p) for p in prompts]
        requests = [GenerationRequest(i, SamplingParams(6, temperature=0), ROUTED) for i in ids]
        forced = [GenerationRequest(i, SamplingParams(6, temperature=0), fallback) for i in ids]
        for events, reference in zip(asyncio.run(answers(engine, requests)), asyncio.run(answers(engine, forced))):
            trace = events[0].trace
            assert trace["fallback"] and trace["task"] == fallback and trace["confidence"] < 1.0
            assert [e.token_id for e in events] == [e.token_id for e in reference]
    with pytest.raises(ConfigError, match="serve.agent.fallback='nope' is not a task"):
        HFEngine(export, agent=AgentConfig(fallback="nope"))
