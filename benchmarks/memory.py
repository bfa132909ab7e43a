"""Per-rank memory of distlm training for each ZeRO preset, next to the ZeRO paper's formula and
the memory pre-flight's estimate.

For SmolLM2-135M-Instruct (model=smollm2_135m: continued pretraining of the real model on the
embedded corpus) and a ~1B-parameter Llama (model=llama_1b, random init), every preset runs
`distlm train` with 2 CPU workers, micro batch 1, short sequences and a few steps:

  formula   model states per rank by the ZeRO paper (distlm.memory.model_states)
  states    measured: bytes held in live tensors on a rank after its first optimizer step
            (parameters, gradients, optimizer states and DeepSpeed's buffers; max over ranks)
  estimate  the pre-flight's figure per worker (model states, buffers, activations, baseline)
  peak      measured: the worker process's peak resident memory (max over ranks)

A preset that the pre-flight refuses on this machine does not run (it would exit 2 in
seconds, as `distlm train` does): its row shows the estimate and `refused`.

    .venv/bin/python benchmarks/memory.py                       # both models, every preset
    .venv/bin/python benchmarks/memory.py --models smollm2_135m --presets zero2,zero3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESETS = ["zero0", "zero1", "zero2", "zero3", "zero3_offload"]
MODELS = {
    "smollm2_135m": ["model=smollm2_135m"],
    "llama_1b": ["model=llama_1b"],
}
RUN = [
    "trainer.max_steps=3",
    "trainer.micro_batch_size=1",
    "trainer.global_batch_size=2",
    "trainer.warmup_steps=1",
    "trainer.eval_every=1000",
    "trainer.eval_batches=1",
    "trainer.checkpoint_every=1000",
    "trainer.export=false",
    "data.seq_len=64",
    "tracking=disabled",
]
GB = 1024**3


def run(model: str, preset: str, root: Path, timeout: int) -> dict:
    run_dir = root / f"{model}-{preset}"
    cmd = [sys.executable, "-m", "distlm.cli", "train", *MODELS[model], f"zero={preset}", *RUN]
    cmd.append(f"hydra.run.dir={run_dir}")
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    (root / f"{model}-{preset}.log").write_text(result.stdout + result.stderr)
    if result.returncode == 2:
        line = next((x for x in result.stderr.splitlines() if x.startswith("distlm: error:")), "")
        return {"status": "refused", "message": line, "wall": wall}
    if result.returncode != 0:
        return {"status": "FAILED", "message": result.stderr[-1500:], "wall": wall}
    memory = json.loads((run_dir / "memory.json").read_text())
    ranks = memory["ranks"]
    return {
        "status": "ok",
        "states": max(r["states"] for r in ranks),
        "peak": max(r["peak"] for r in ranks),
        "start": max(r["start_rss"] for r in ranks),
        "wall": wall,
    }


def planned(model: str, preset: str) -> dict:
    """The pre-flight's figures for this run (what `distlm plan` prints), in this process."""
    from distlm import memory
    from distlm.config import compose
    from distlm.driver import convert_gguf_inputs
    from distlm.runtime import resolve_runtime

    class Quiet:
        def log(self, *args, **kwargs) -> None:
            pass

    cfg, _ = compose([*MODELS[model], f"zero={preset}", *RUN])
    convert_gguf_inputs(cfg, Quiet())
    runtime = resolve_runtime(cfg.cluster)
    plan = memory.plan(cfg, runtime.device, runtime.precision, joined=False)
    states = memory.model_states(plan.shape, plan.setting)
    return {
        "params": plan.shape.params,
        "formula": sum(states.values()),
        "estimate": plan.estimate.total_on(runtime.device),
        "budget": plan.budget,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="distlm-memory-") as tmp:
        for model in args.models.split(","):
            for preset in args.presets.split(","):
                plan = planned(model, preset)
                print(f"{model} {preset}: estimate {plan['estimate'] / GB:.2f} GB per worker ...", flush=True)
                row = {"model": model, "preset": preset, **plan, **run(model, preset, Path(tmp), args.timeout)}
                rows.append(row)
                if args.out:  # as it goes: a later failure loses no measurement
                    Path(args.out).write_text(json.dumps(rows, indent=2, default=float))
                if row["status"] != "ok":  # a refusal is one line; a failure's tail
                    said = row["message"] if row["status"] == "refused" else row["message"][-400:]
                    print(f"  {row['status']}: {said}", flush=True)
    load = os.getloadavg()[0]
    print(f"\nper-rank memory, 2 CPU workers, fp32, micro batch 1, seq 64 (load average {load:.1f})\n")
    header = (
        f"{'model':<13} {'preset':<14} {'params':>7} {'formula':>8} {'states':>8} {'states/':>8} "
        f"{'estimate':>9} {'peak':>8} {'estimate/':>10}"
    )
    print(header + "\n" + " " * 37 + "(GB)     (GB)  formula      (GB)     (GB)       peak")
    for r in rows:
        params = f"{r['params'] / 1e9:.2f}B"
        if r["status"] != "ok":
            print(
                f"{r['model']:<13} {r['preset']:<14} {params:>7} {r['formula'] / GB:>8.2f} {'-':>8} {'-':>8} "
                f"{r['estimate'] / GB:>9.2f} {r['status']:>8}"
            )
            continue
        print(
            f"{r['model']:<13} {r['preset']:<14} {params:>7} {r['formula'] / GB:>8.2f} {r['states'] / GB:>8.2f} "
            f"{r['states'] / r['formula']:>8.2f} {r['estimate'] / GB:>9.2f} {r['peak'] / GB:>8.2f} "
            f"{r['estimate'] / r['peak']:>10.2f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2, default=float))
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
