"""Serving on a real Ray Serve over real HTTP: OpenAI routes (httpx, the `openai` client and
curl), greedy answers equal to `generate` on the exported model (with and without task
adapters, peft's own loading as the reference), adapters answered concurrently, every bad
input a 4xx with an OpenAI error body and the replica still serving (no restarts),
overload answered 503 with Retry-After, bearer auth, and `distlm serve` end to end.

The model is a tiny random-init GPT-2 saved with transformers in an export's layout, plus
two LoRA adapters saved by peft under export/adapters/<task>/ (random init, different
seeds, so each changes the output; one also with its own embedding, head and norm copies).
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import REPO, compose_cfg, distlm_cmd, run_cli

from distlm.config import ConfigError, ServeConfig, compose, validate_serve
from distlm.runtime import free_port

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
NAME = "tinyrun"
CONTEXT = 64
# Settings the tests rely on: batches form within 50 ms; 4 running per replica, and at most
# 8 requests waiting in the proxy (a burst's requests wait there until assigned), then 503.
SERVE_ARGS = {
    "api_key": API_KEY,
    "max_batch_size": "4",
    "batch_wait_timeout_s": "0.05",
    "max_ongoing_requests": "4",
    "max_queued_requests": "8",
    "retry_after_s": "2",
    "default_max_tokens": "8",
    "max_tokens_limit": "48",
    "max_body_bytes": "20000",
}
PROMPTS = ["def main(argv):\n", "import os\nimport sys\n", "class Parser(object):", "x = [i for i in"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """<tmp>/tinyrun/export: a random-init GPT-2 + the project tokenizer + adapters alpha and beta."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from distlm.data import prepare_data

    root = tmp_path_factory.mktemp("serve") / NAME
    cfg = compose_cfg([], root)
    data = prepare_data(cfg.data, seed=cfg.trainer.seed, progress=False)
    export = root / "export"
    torch.manual_seed(0)
    eos = data.eos_token_id
    config = GPT2Config(
        vocab_size=data.vocab_size,
        n_positions=CONTEXT,
        n_embd=64,
        n_layer=2,
        n_head=4,
        initializer_range=0.2,  # a peaked random model: greedy answers vary with the prompt
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    GPT2LMHeadModel(config).save_pretrained(export)
    AutoTokenizer.from_pretrained(data.tokenizer_dir).save_pretrained(export)
    # beta also has its own copies of the embeddings, head and final norm (modules_to_save).
    for seed, (task, copies) in enumerate([("alpha", None), ("beta", ["wte", "lm_head", "ln_f"])]):
        torch.manual_seed(100 + seed)
        lora = LoraConfig(
            r=8, lora_alpha=32, target_modules=["c_attn", "c_proj"], modules_to_save=copies, init_lora_weights=False
        )
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(export), lora)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".modules_to_save." in name:
                    param.add_(0.2 * torch.randn_like(param))
        model.save_pretrained(export / "adapters" / task)
    return root


@pytest.fixture(scope="module")
def reference(run_dir):
    """Greedy `generate` on the export loaded by transformers (adapters loaded by peft itself)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = run_dir / "export"
    tokenizer = AutoTokenizer.from_pretrained(export)
    models = {None: AutoModelForCausalLM.from_pretrained(export).eval()}
    for task in ("alpha", "beta"):
        base = AutoModelForCausalLM.from_pretrained(export)
        models[task] = PeftModel.from_pretrained(base, export / "adapters" / task).eval()

    def generate(prompt: str, adapter, max_tokens: int):
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = models[adapter].generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        new = out[0, ids.input_ids.shape[1] :].tolist()
        return new, tokenizer.decode(new, skip_special_tokens=True)

    generate.tokenizer = tokenizer
    return generate


@pytest.fixture(scope="module")
def server(run_dir, ray_session):
    """The app deployed the way `serve run distlm.serve.app:build_app path=... key=value` does it:
    the builder found by import path, called with string arguments; Ray Serve's proxy on a free port."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    module, attr = "distlm.serve.app:build_app".split(":")
    builder = getattr(importlib.import_module(module), attr)
    serve.run(builder({"path": str(run_dir), **SERVE_ARGS}), name="distlm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, headers=AUTH, timeout=120, trust_env=False) as client:
        health = client.get("/healthz").json()
        yield {"url": url, "client": client, "replica": health["replica"], "actors": _replica_actors()}
    serve.shutdown()


def _replica_actors() -> set:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA")}


def assert_still_serving(server) -> None:
    """The same replica answers (no restart, no replacement) and Serve reports it healthy."""
    from ray import serve

    client = server["client"]
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["replica"] == server["replica"]
    ok = client.post("/v1/completions", json={"model": NAME, "prompt": "def f(", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    assert _replica_actors() == server["actors"]
    app = serve.status().applications["distlm"]
    assert app.status == "RUNNING"
    assert dict(app.deployments["distlm"].replica_states) == {"RUNNING": 1}


def openai_client(server):
    import openai

    http = httpx.Client(trust_env=False, timeout=120)
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, http_client=http, max_retries=0)


# ---------------------------------------------------------------- without Ray Serve


def test_serve_config_group_matches_schema_and_validates():
    cfg, _ = compose(["serve.port=8123", "serve.max_batch_size=4"])
    # conf/serve/default.yaml mirrors the dataclass; overrides reach the typed section.
    assert cfg.serve == ServeConfig(port=8123, max_batch_size=4)
    with pytest.raises(ConfigError, match=r"serve\.max_ongoing_requests"):
        compose(["serve.max_batch_size=32"])
    bad = {
        "max_batch_size": (dict(max_batch_size=32), "serve.max_ongoing_requests"),
        "overload_status": (dict(overload_status=500), "serve.overload_status"),
        "min without max": (dict(min_replicas=1), "serve.max_replicas"),
        "min over max": (dict(min_replicas=3, max_replicas=2), "serve.min_replicas"),
        "unbounded queue": (dict(max_queued_requests=-1), "serve.max_queued_requests"),
        "model_name": (dict(model_name="a:b"), "serve.model_name"),
        "device": (dict(device="tpu"), "serve.device"),
        "port": (dict(port=0), "serve.port"),
        "route_prefix": (dict(route_prefix="v1"), "serve.route_prefix"),
        "limit under default": (dict(max_tokens_limit=4), "serve.max_tokens_limit"),
    }
    for fields, key in bad.values():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_serve(ServeConfig(**fields))
    validate_serve(ServeConfig(min_replicas=0, max_replicas=2))


def test_find_export_and_build_app_errors(run_dir, tmp_path, monkeypatch):
    from distlm.serve.app import build_app, resolve_api_key
    from distlm.serve.model import find_export

    info = find_export(str(run_dir))
    assert info.name == NAME and info.model_ids == [NAME, f"{NAME}:alpha", f"{NAME}:beta"]
    assert find_export(str(run_dir / "export")).name == NAME
    assert find_export(str(run_dir), "mine").model_ids[1] == "mine:alpha"
    # No router in this export: the bare name is the base model, as is <name>:base.
    assert info.task_for(f"{NAME}:beta") == "beta" and info.task_for(NAME) is None
    assert info.task_for(f"{NAME}:base") is None
    for missing in (f"{NAME}:gamma", "other", "other:alpha", f"{NAME}:"):
        with pytest.raises(KeyError):
            info.task_for(missing)

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="distlm export"):
        find_export(str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="does not exist"):
        find_export(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    (broken / "adapters" / "half").mkdir(parents=True)
    for f in (run_dir / "export").iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "adapters" / "half" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="adapter_model.safetensors"):
        find_export(str(broken))

    with pytest.raises(ConfigError, match="path="):
        build_app({})
    with pytest.raises(ConfigError, match="max_batch_size"):
        build_app({"path": str(run_dir), "max_batch_size": "many"})
    with pytest.raises(ConfigError, match="nonsense"):
        build_app({"path": str(run_dir), "nonsense": "1"})
    app = build_app({"path": str(run_dir), "num_replicas": "2", "max_ongoing_requests": "32"})
    assert app is not None

    monkeypatch.setenv("MY_KEY", "from-env")
    assert resolve_api_key(ServeConfig(api_key_env="MY_KEY")) == "from-env"
    assert resolve_api_key(ServeConfig(api_key="given", api_key_env="MY_KEY")) == "given"
    monkeypatch.delenv("MY_KEY")
    assert resolve_api_key(ServeConfig(api_key_env="MY_KEY")) is None


def test_mixed_adapter_batch_equals_generate(run_dir, reference):
    """One decode batch with base, alpha and beta rows of different prompt lengths and budgets
    (rows leave the batch at different steps) gives each row its own `generate` answer."""
    from distlm.serve.model import GenerationRequest, SamplingParams, ServedModel, find_export

    model = ServedModel(find_export(str(run_dir)))
    cases = [(PROMPTS[0], None, 12), (PROMPTS[1], "alpha", 20), (PROMPTS[2], "beta", 5), (PROMPTS[3], "alpha", 30)]
    requests = [GenerationRequest(model.encode(p), SamplingParams(n, temperature=0), a) for p, a, n in cases]
    results = model.generate(requests)
    answers = set()
    for (prompt, adapter, n), events in zip(cases, results):
        ids, text = reference(prompt, adapter, n)
        assert [e.token_id for e in events] == ids
        assert "".join(e.text for e in events) == text
        assert events[-1].finish_reason == ("length" if len(ids) == n else "stop")
        answers.add(text)
    assert len(answers) == len(cases)
    # Adapters change the answer: the same prompt through base, alpha and beta.
    same = [
        GenerationRequest(model.encode(PROMPTS[0]), SamplingParams(10, temperature=0), a)
        for a in (None, "alpha", "beta")
    ]
    texts = ["".join(e.text for e in events) for events in model.generate(same)]
    assert len(set(texts)) == 3


@pytest.mark.slow
def test_serve_build_cli(run_dir, tmp_path):
    """`serve build` (Ray's CLI) imports distlm.serve.app:app, built from $DISTLM_SERVE_PATH."""
    import yaml

    out = tmp_path / "serve.yaml"
    env = {**os.environ, "DISTLM_SERVE_PATH": str(run_dir)}
    serve_cli = Path(sys.executable).parent / "serve"
    done = subprocess.run(
        [str(serve_cli), "build", "distlm.serve.app:app", "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    config = yaml.safe_load(out.read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "distlm.serve.app:app"
    (deployment,) = app["deployments"]
    defaults = ServeConfig()
    assert deployment["name"] == "distlm"
    assert deployment["max_ongoing_requests"] == defaults.max_ongoing_requests
    assert deployment["max_queued_requests"] == defaults.max_queued_requests


# ---------------------------------------------------------------- `distlm serve` as a user runs it
# (before the module's Serve starts, so the two Ray clusters do not compete for the cores)


@pytest.mark.slow
def test_distlm_serve_cli_curl_and_ctrl_c(run_dir):
    bad = run_cli("serve", str(run_dir / "nope"), timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    bad = run_cli("serve", str(run_dir), "serve.max_batch_size=0", timeout=120)
    assert bad.returncode == 2 and "serve.max_batch_size" in bad.stderr

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DISTLM_API_KEY")}
    proc = subprocess.Popen(
        distlm_cmd("serve", str(run_dir), f"serve.port={port}"),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        deadline = time.time() + 400
        while time.time() < deadline and not any("Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
        out = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1" in out, out
        assert f"models: {NAME}, {NAME}:alpha, {NAME}:beta" in out
        curl = next(line.strip() for line in lines if line.strip().startswith("curl "))
        answer = subprocess.run(
            ["bash", "-c", curl.replace("curl ", "curl -s --noproxy '*' ", 1)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        reply = json.loads(answer.stdout)
        assert reply["model"] == NAME and reply["usage"]["completion_tokens"] >= 1, answer.stdout
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
        assert "shutting down" in proc.stdout.read()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10, trust_env=False)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_curl_line_is_valid_shell(run_dir):
    """The printed curl example parses as one shell command with a JSON body."""
    from distlm.serve.model import find_export
    from distlm.serve.server import banner

    text = banner(find_export(str(run_dir)), ServeConfig(port=8123))
    curl = next(line.strip() for line in text.splitlines() if line.strip().startswith("curl "))
    words = shlex.split(curl)
    assert words[1] == "http://127.0.0.1:8123/v1/completions"
    assert json.loads(words[words.index("-d") + 1])["model"] == NAME


# ---------------------------------------------------------------- real Ray Serve, real HTTP


@pytest.mark.slow
def test_models_health_and_auth(server):
    url = server["url"]
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as anonymous:
        health = anonymous.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions")):
                r = anonymous.request(method, path, headers=headers, json={"model": NAME, "prompt": "x"})
                assert r.status_code == 401, (headers, path, r.text)
                error = r.json()["error"]
                assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
    models = server["client"].get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [NAME, f"{NAME}:alpha", f"{NAME}:beta"]
    assert models["data"][1]["parent"] == NAME and "LoRA adapter" in models["data"][1]["description"]
    assert_still_serving(server)


@pytest.mark.slow
def test_greedy_answers_equal_generate(server, reference):
    client = server["client"]
    for i, (prompt, adapter) in enumerate(zip(PROMPTS, [None, "alpha", "beta", None])):
        max_tokens = 10 + 4 * i
        ids, text = reference(prompt, adapter, max_tokens)
        model = NAME if adapter is None else f"{NAME}:{adapter}"
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "seed": 7}
        body |= {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "logprobs": None, "n": 1}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        reply = r.json()
        assert reply["object"] == "text_completion" and reply["model"] == model
        assert reply["choices"][0]["text"] == text
        prompt_tokens = len(reference.tokenizer(prompt).input_ids)
        assert reply["usage"] == {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(ids),
            "total_tokens": prompt_tokens + len(ids),
        }
        assert reply["choices"][0]["finish_reason"] == ("length" if len(ids) == max_tokens else "stop")


@pytest.mark.slow
def test_openai_client_completions_chat_and_streaming(server, reference):
    client = openai_client(server)
    ids, text = reference(PROMPTS[0], "alpha", 12)
    done = client.completions.create(model=f"{NAME}:alpha", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert done.choices[0].text == text and done.usage.completion_tokens == len(ids)

    chunks = list(
        client.completions.create(model=f"{NAME}:alpha", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True)
    )
    assert len(chunks) == len(ids)  # one event per new token
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A parser:"}]
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    # The reference: the same default chat template rendered by the tokenizer, then generate.
    from distlm.serve.model import DEFAULT_CHAT_TEMPLATE

    prompt = reference.tokenizer.apply_chat_template(
        messages, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    chat_ids, chat_text = reference(prompt, None, 10)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == chat_text
    assert chat.usage.completion_tokens == len(chat_ids)

    stream = client.chat.completions.create(
        model=NAME,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_text
    assert chunks[-1].usage.completion_tokens == len(chat_ids)

    # The wire format itself: `data: {...}` per token, then `data: [DONE]`.
    body = {"model": NAME, "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "stream": True}
    with server["client"].stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert len(payloads) == len(reference(PROMPTS[1], None, 6)[0])


@pytest.mark.slow
def test_sampling_seed_top_p_and_stop(server, reference):
    client = server["client"]

    def complete(**kw):
        r = client.post("/v1/completions", json={"model": NAME, "prompt": PROMPTS[2], "max_tokens": 16} | kw)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    greedy = complete(temperature=0)["text"]
    assert complete(temperature=1.0, top_p=0.0, seed=3)["text"] == greedy  # nucleus of one token = greedy
    first = complete(temperature=1.5, seed=11)["text"]
    assert complete(temperature=1.5, seed=11)["text"] == first
    others = {complete(temperature=1.5, seed=s)["text"] for s in range(12, 16)}
    assert others - {first}, "different seeds all sampled the same text"

    # A stop sequence taken from the greedy answer: the text ends right before it.
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 3]
    cut = complete(temperature=0, stop=[stop, "never-produced"])
    assert cut["finish_reason"] == "stop" and cut["text"] == greedy[: greedy.index(stop)]
    streamed = openai_client(server).completions.create(
        model=NAME, prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut["text"]


@pytest.mark.slow
def test_two_adapters_concurrently(server, reference):
    """Requests for alpha, beta and the base model in flight together (they share batches):
    each gets its own adapter's answer."""
    # 6 requests: fewer than the 8 the proxy lets wait (a larger burst would partly get 503).
    jobs = [(prompt, adapter) for prompt in PROMPTS[:2] for adapter in ("alpha", "beta", None)]
    expected = {(p, a): reference(p, a, 14)[1] for p, a in set(jobs)}
    assert expected[(PROMPTS[0], "alpha")] != expected[(PROMPTS[0], "beta")]
    start = threading.Barrier(len(jobs))

    def ask(job):
        prompt, adapter = job
        model = NAME if adapter is None else f"{NAME}:{adapter}"
        with httpx.Client(base_url=server["url"], headers=AUTH, timeout=120, trust_env=False) as c:
            start.wait()
            r = c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 14, "temperature": 0})
        return r.status_code, r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for job, (status, text) in zip(jobs, answers):
        assert status == 200 and text == expected[job], job


BIG = "x" * 30_000
BAD_INPUTS = {
    "malformed JSON": (b'{"model": "tinyrun", "prompt": ', 400, None, "not valid JSON"),
    "non-UTF-8 bytes": (b'{"model": "tinyrun", "prompt": "caf\xe9"}', 400, None, "not valid UTF-8"),
    "lone surrogate": (b'{"model": "tinyrun", "prompt": "\\ud800"}', 400, "prompt", "not valid Unicode"),
    "not an object": (b"[1, 2]", 400, None, "JSON object"),
    "empty body": (b"", 400, None, "empty"),
    "missing model": ({"prompt": "def"}, 400, "model", "missing required parameter"),
    "missing prompt": ({"model": NAME}, 400, "prompt", "missing required parameter"),
    "mistyped max_tokens": ({"model": NAME, "prompt": "a", "max_tokens": "5"}, 400, "max_tokens", "integer"),
    "mistyped temperature": ({"model": NAME, "prompt": "a", "temperature": "hot"}, 400, "temperature", "number"),
    "mistyped stream": ({"model": NAME, "prompt": "a", "stream": "yes"}, 400, "stream", "boolean"),
    "mistyped prompt": ({"model": NAME, "prompt": 42}, 400, "prompt", "string"),
    "unknown field": ({"model": NAME, "prompt": "a", "best_of": 3}, 400, "best_of", "unrecognized"),
    "unsupported penalty": (
        {"model": NAME, "prompt": "a", "presence_penalty": 0.5},
        400,
        "presence_penalty",
        "not supported",
    ),
    "unknown model": ({"model": "gpt-4", "prompt": "a"}, 404, "model", "does not exist"),
    "unknown adapter": ({"model": f"{NAME}:gamma", "prompt": "a"}, 404, "model", "tinyrun:alpha"),
    "empty prompt": ({"model": NAME, "prompt": ""}, 400, "prompt", "empty"),
    "prompt over context": ({"model": NAME, "prompt": "a b " * 60}, 400, "prompt", "context is 64 tokens"),
    "prompt + max_tokens over context": (
        {"model": NAME, "prompt": "a b " * 10, "max_tokens": 44},
        400,
        "max_tokens",
        "at most",
    ),
    "max_tokens zero": (
        {"model": NAME, "prompt": "a", "max_tokens": 0},
        400,
        "max_tokens",
        "greater than or equal to 1",
    ),
    "max_tokens negative": ({"model": NAME, "prompt": "a", "max_tokens": -3}, 400, "max_tokens", "greater than"),
    "max_tokens over limit": ({"model": NAME, "prompt": "a", "max_tokens": 49}, 400, "max_tokens", "limit of 48"),
    "temperature out of range": ({"model": NAME, "prompt": "a", "temperature": 2.5}, 400, "temperature", "less than"),
    "five stop sequences": ({"model": NAME, "prompt": "a", "stop": list("abcde")}, 400, "stop", "at most 4"),
    "n > 1": ({"model": NAME, "prompt": "a", "n": 2}, 400, "n", "less than or equal to 1"),
    "body over limit": ({"model": NAME, "prompt": BIG}, 413, None, "limit of 20000 bytes"),
    "chat: no messages": ({"model": NAME, "messages": []}, 400, "messages", "at least 1"),
    "chat: bad role": (
        {"model": NAME, "messages": [{"role": "robot", "content": "hi"}]},
        400,
        "messages[0].role",
        "'user'",
    ),
    "chat: mistyped content": (
        {"model": NAME, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
        "string",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_4xx_and_the_replica_keeps_serving(server, case):
    body, status, param, words = BAD_INPUTS[case]
    path = "/v1/chat/completions" if case.startswith("chat") else "/v1/completions"
    if isinstance(body, bytes):
        r = server["client"].post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = server["client"].post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert_still_serving(server)


@pytest.mark.slow
def test_streamed_body_over_limit_and_unknown_routes(server):
    client = server["client"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"model": "tinyrun", "prompt": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'

    r = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = client.post("/v1/embeddings", json={"model": NAME, "input": "a"})
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
    assert_still_serving(server)


@pytest.mark.slow
def test_overload_gets_503_with_retry_after(server):
    """Past 8 waiting requests, the rest of a burst is refused at once by Ray Serve's proxy."""
    burst = 32
    start = threading.Barrier(burst)

    def ask(_):
        with httpx.Client(base_url=server["url"], headers=AUTH, timeout=300, trust_env=False) as c:
            start.wait()
            r = c.post("/v1/completions", json={"model": NAME, "prompt": "def f(", "max_tokens": 40, "temperature": 0})
        return r.status_code, r.headers.get("retry-after")

    with ThreadPoolExecutor(burst) as pool:
        results = list(pool.map(ask, range(burst)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= 4, statuses
    assert all(retry == "2" for status, retry in results if status == 503), results
    assert_still_serving(server)
