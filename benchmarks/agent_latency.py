"""The serving cost of perception: p50 latency of the agent (`<run>`: the router picks the task's
layer) against the same requests forced to that layer (`<run>:<task>`), at concurrency 1.

The requests are held-out prompts of every task of the run. Each prompt is sent first to the
agent, then to the layer the agent's trace names, alternating over the prompts (so drift in the
machine's load affects both sides alike); both answers are checked equal. It prints p50/p90 per
side and their ratio (goal: <= 1.2).

    .venv/bin/python benchmarks/agent_latency.py runs/<agent run> [--rounds 3] [--max-tokens 16]

Absolute numbers depend on the machine and what else runs on it; compare the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from distlm.runtime import free_port

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run directory trained with task.router=true (e.g. experiment=agent)")
    parser.add_argument("--per-task", type=int, default=4, help="held-out prompts per task")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="the replica's serve.num_cpus")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    import httpx
    import ray
    from omegaconf import OmegaConf
    from ray import serve

    from distlm.config import TasksConfig, task_configs
    from distlm.data.tasks import load_tasks
    from distlm.export import find_export
    from distlm.serve.app import build_app

    run = Path(args.run)
    export = find_export(str(run))
    if not export.router:
        print(f"{run} has no router: train it with task.router=true (e.g. experiment=agent)", file=sys.stderr)
        return 2
    saved = OmegaConf.load(Path(export.path).parent / ".hydra" / "config.yaml")  # the run's tasks and seed
    task_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TasksConfig), saved.task))
    task_cfg.tasks = task_configs(task_cfg.tasks)
    from transformers import AutoTokenizer

    from distlm.data.tasks import ROUTER

    tasks_data = load_tasks(task_cfg, AutoTokenizer.from_pretrained(export.path), int(saved.trainer.seed))
    prompts = [p for name, task in tasks_data.items() if name != ROUTER for p, _ in task.eval[: args.per_task]]

    ray.init(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app({"path": str(run), "num_cpus": args.threads, "max_batch_size": 1}), name="bench", route_prefix="/"
    )
    times = {"agent": [], "forced": []}
    tasks = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300, trust_env=False) as client:

            def ask(model: str, prompt: str):
                body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
                start = time.perf_counter()
                r = client.post("/v1/completions", json=body)
                elapsed = time.perf_counter() - start
                r.raise_for_status()
                reply = r.json()
                return elapsed, reply["choices"][0]["text"], reply.get("agent")

            ask(export.name, prompts[0])  # warm-up: the replica's first request
            for _ in range(args.rounds):
                for prompt in prompts:
                    t_agent, text, trace = ask(export.name, prompt)
                    task = trace["task"] or "base"
                    t_forced, forced_text, _ = ask(f"{export.name}:{task}", prompt)
                    if forced_text != text:
                        raise SystemExit(f"the agent's answer differs from {task}'s for {prompt!r}")
                    times["agent"].append(t_agent)
                    times["forced"].append(t_forced)
                    tasks[task] = tasks.get(task, 0) + 1
    finally:
        serve.shutdown()
        ray.shutdown()

    def pct(xs, q):
        return statistics.quantiles(xs, n=100)[q - 1] * 1000

    rows = {side: {"p50_ms": statistics.median(xs) * 1000, "p90_ms": pct(xs, 90)} for side, xs in times.items()}
    ratio = rows["agent"]["p50_ms"] / rows["forced"]["p50_ms"]
    print(f"{len(times['agent'])} requests per side, concurrency 1, max_tokens {args.max_tokens}; routed to {tasks}")
    print(f"{'':10} {'p50 ms':>9} {'p90 ms':>9}")
    print(f"{'<run>':10} {rows['agent']['p50_ms']:9.1f} {rows['agent']['p90_ms']:9.1f}")
    print(f"{'<run>:task':10} {rows['forced']['p50_ms']:9.1f} {rows['forced']['p90_ms']:9.1f}")
    print(f"p50 ratio agent / forced task: {ratio:.3f} (goal <= 1.2)")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "ratio_p50": ratio, "routed": tasks}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
