"""Training throughput of distlm against a plain PyTorch loop and plain DeepSpeed, on CPU.

Same model, data order, global batch and number of steps for every variant:
  a   plain single-process PyTorch loop (torch AdamW, lr_lambda, grad clipping), all cores
  b   the `deepspeed` launcher: 2 processes, ZeRO (zero=zero2 unless overridden) over gloo, cores split
  r   a's loop as the one worker of a Ray Train run (local Ray started as distlm starts it), all cores:
      what distlm's 1-worker start-up and step stand on (Ray, Ray Train's worker group)
  r2  b's loop (DeepSpeed, ZeRO) as the 2 workers of a Ray Train run, cores split: c2's floor
  c1  distlm.driver.run: 1 Ray worker with all cores
  c2  distlm.driver.run: 2 Ray workers, the cores split between them

Each variant runs in a fresh process tree, one after the other, so the wall column (launch
to exit) holds the start-up each one really costs (imports, config, data-cache lookup, Ray,
DeepSpeed init; for c also distlm's step-0 eval, final checkpoint and export). tokens/s is steady state: the median step
time after the warm-up steps. MFU is against the fp32 matmul peak of the whole machine,
measured here with torch threads = all cores.

    .venv/bin/python benchmarks/train_throughput.py --steps 40 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distlm.runtime import free_port

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "a": "plain PyTorch",
    "b": "deepspeed launcher",
    "r": "plain loop in Ray Train",
    "r2": "deepspeed loop in Ray Train",
    "c1": "distlm, 1 worker",
    "c2": "distlm, 2 workers",
    "j1": "distlm, 1 worker, on a running Ray",
}
# (distlm variant, its peer): the ratios printed.
RATIOS = [("c1", "a"), ("c1", "b"), ("c1", "r"), ("c2", "a"), ("c2", "b"), ("c2", "r2"), ("j1", "a"), ("j1", "c1")]
DEFAULT_MODEL = "model=tiny model.hidden_size=128 model.num_layers=4"


def num_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def layout(variant: str, cores: int) -> tuple[int, int]:
    """(processes, torch threads per process): every variant uses the whole machine."""
    return (1, cores) if variant in ("a", "r", "c1", "j1") else (2, max(1, cores // 2))


def warmup_steps(steps: int) -> int:
    # The first steps pay for allocator growth, lazy init and thread-pool start (seconds on CPU).
    return max(2, math.ceil(0.2 * steps))


# ----------------------------------------------------------------------------- workers


FIRST_STEP: dict[str, float] = {}


def _timed_steps(cfg, data, rank: int, world: int, micro_step: Callable, optimizer_step: Callable) -> list[float]:
    """The same per-step clock as distlm's loop: from fetching the batch to the optimizer step."""
    import torch

    from distlm.data import ResumableSampler, TokenBlocks

    tr = cfg.trainer
    blocks = TokenBlocks(data.train_path, data.dtype, cfg.data.seq_len)
    sampler = ResumableSampler(len(blocks), tr.global_batch_size, tr.micro_batch_size, rank, world, tr.seed)
    times = []
    FIRST_STEP["at"] = time.time()  # the start-up clock: launch to here
    for _ in range(tr.max_steps):
        start = time.perf_counter()
        for batch in sampler.next_batch():
            micro_step(torch.stack([blocks[i] for i in batch]))
        optimizer_step()
        times.append(time.perf_counter() - start)
    return times


def worker_a(cfg, data, threads: int) -> list[float]:
    import torch

    from distlm.reference import PlainLoop

    torch.set_num_threads(threads)
    loop = PlainLoop(cfg, data.vocab_size, data.eos_token_id)
    accum = cfg.trainer.global_batch_size // cfg.trainer.micro_batch_size
    return _timed_steps(cfg, data, 0, 1, lambda ids: loop.micro_step(ids, accum), loop.optimizer_step)


def worker_b(cfg, data, threads: int) -> list[float] | None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from distlm.engine import build_ds_config
    from distlm.reference import PlainLoop
    from distlm.runtime import resolve_runtime

    torch.set_num_threads(threads)
    # The launcher sets RANK/WORLD_SIZE/MASTER_*; gloo is what Ray Train sets up for distlm (and for r2).
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loop = PlainLoop(cfg, data.vocab_size, data.eos_token_id)
    model, opt, sched = loop.model, loop.optimizer, loop.schedule
    ds_config = build_ds_config(cfg.zero, cfg.trainer, resolve_runtime(cfg.cluster), world)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_config, dist_init_required=False
    )
    engine.train()

    def micro_step(ids: torch.Tensor) -> None:
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()  # applies the optimizer (and clipping, scheduler) at the accumulation boundary

    times = _timed_steps(cfg, data, rank, world, micro_step, lambda: None)
    dist.barrier()
    if own_group:
        dist.destroy_process_group()
    # ZeRO-2 synchronises the ranks every step, so rank 0's clock is the step time.
    return times if rank == 0 else None


def worker_r(cfg, data, threads: int, out: Path, workers: int = 1) -> None:
    """a's loop as the one worker of a Ray Train run (b's as its 2 workers), on a local Ray
    started as distlm starts its own: the start-up and the step distlm's run cannot go below.
    Rank 0 writes `out`."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distlm.driver import ray_for_run

    here = str(Path(__file__).resolve().parent)

    def train_fn(_config) -> None:
        sys.path.insert(0, here)
        import train_throughput as bench  # by name: its FIRST_STEP is the one worker_a sets

        times = bench.worker_a(cfg, data, threads) if workers == 1 else bench.worker_b(cfg, data, threads)
        if times is not None:  # rank 0
            out.write_text(json.dumps({"step_times": times, "first_step_at": bench.FIRST_STEP["at"]}))

    ray_for_run(cfg)
    TorchTrainer(
        train_fn,
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=str(out.parent / "ray_train"), name=out.stem),
    ).fit()
    ray.shutdown()  # part of what a user pays, as for c


def worker_c(cfg) -> list[float]:
    import psutil
    import ray

    from distlm.driver import run
    from distlm.report import read_metrics

    started = psutil.Process().create_time()  # as `distlm train` counts: from the process's start
    summary = run(cfg, started=started)
    ray.shutdown()  # part of what a user pays, so inside the wall time
    FIRST_STEP["at"] = started + summary["startup_s"]["first_step"]  # distlm's own start-up report
    records = read_metrics(str(Path(cfg.run_dir) / "metrics.jsonl"))
    return [r["train/step_time_s"] for r in records if "train/step_time_s" in r]


def worker_main(variant: str, workdir: Path, threads: int, run_name: str, cold: bool) -> None:
    from distlm.config import compose
    from distlm.data import prepare_data

    # The driver's Config, rebuilt from the same overrides (not pickled, so it always matches
    # the distlm code this process imports). c also gets its worker layout and run dir.
    overrides = json.loads((workdir / "overrides.json").read_text())
    if variant in ("c1", "c2", "j1"):
        procs = layout(variant, num_cores())[0]
        # cpus_per_worker is also what distlm sets each worker's torch threads to.
        overrides += [f"cluster.num_workers={procs}", f"cluster.cpus_per_worker={threads}"]
        overrides += [f"hydra.run.dir={workdir / run_name}"]
        if cold:  # a data cache of its own: the first run on a fresh machine tokenizes the corpus
            overrides += [f"data.cache_dir={workdir / run_name / 'cache'}"]
        if variant == "j1":  # the Ray that `ray start` runs (run_variant started it), found as distlm finds it
            overrides += ["cluster.address=null"]
    cfg, _ = compose(overrides)
    if variant == "a":
        times = worker_a(cfg, prepare_data(cfg.data, seed=cfg.trainer.seed, progress=False), threads)
    elif variant == "b":
        times = worker_b(cfg, prepare_data(cfg.data, seed=cfg.trainer.seed, progress=False), threads)
    elif variant in ("r", "r2"):
        data = prepare_data(cfg.data, seed=cfg.trainer.seed, progress=False)
        return worker_r(cfg, data, threads, workdir / f"{run_name}.json", layout(variant, num_cores())[0])
    else:
        times = worker_c(cfg)  # run() prepares the data itself
    if times is not None:
        out = {"step_times": times, "first_step_at": FIRST_STEP["at"]}
        (workdir / f"{run_name}.json").write_text(json.dumps(out))


# ----------------------------------------------------------------------------- driver


@dataclass
class Result:
    variant: str
    procs: int
    threads: int
    round: int = 0
    error: str = ""
    wall_s: float = float("nan")
    first_step_s: float = float("nan")  # launch to the first training step
    step_times: list[float] = field(default_factory=list)
    tokens_per_s: float = float("nan")  # from the median measured step
    tokens_per_s_mean: float = float("nan")  # from the total time of the measured steps
    mfu: float = float("nan")
    log: str = ""


def _command(variant: str, workdir: Path, threads: int, run_name: str, cold: bool) -> list[str]:
    me = [str(Path(__file__).resolve()), "--worker", variant, "--workdir", str(workdir), "--threads", str(threads)]
    me += ["--run-name", run_name] + (["--cold"] if cold else [])
    if variant != "b":
        return [sys.executable, *me]
    launcher = Path(sys.executable).with_name("deepspeed")  # the venv's launcher, not one on PATH
    if not launcher.exists():
        launcher = Path(shutil.which("deepspeed") or "deepspeed")
    # No hostfile: the runner launches locally, --num_accelerators sets the process count (CPU
    # "accelerators" are NUMA nodes otherwise). No --bind_cores_to_rank: it needs numactl.
    ds = [str(launcher), "--num_accelerators", "2", "--master_port", str(free_port()), "--no_local_rank"]
    return [*ds, "--log_level", "warning", *me]


def _session_pids(sid: int) -> list[int]:
    """Live processes of a session. Ray's workers get process groups of their own, so a
    killpg would miss them, but they stay in the session the variant was started in."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(session) == sid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _kill_session(proc: subprocess.Popen) -> None:
    """Stop whatever is left of a variant (launcher ranks, Ray daemons and workers): only the
    processes of the session it was started in, each by its pid."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + grace
        for pid in _session_pids(proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader so it does not linger as a zombie
            if not _session_pids(proc.pid):
                return
            time.sleep(0.2)
    proc.wait()


def drop_page_cache() -> bool:
    """What a fresh machine has: no library or data file in the page cache (root only)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _ray_start(workdir: Path, env: dict[str, str]) -> subprocess.Popen:
    """A Ray as `ray start --head` runs one (its record in a temp dir of the benchmark's, set in
    env for the variant), up and settled; stopped with its session after the variant."""
    from distlm.runtime import ray_target

    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="dlm-b-", dir="/tmp")  # short: Ray's socket paths
    ray = Path(sys.executable).with_name("ray")
    cmd = [str(ray), "start", "--head", "--block", "--disable-usage-stats", "--include-dashboard=false"]
    cmd += [f"--num-cpus={num_cores()}", f"--port={free_port()}"]
    with open(workdir / "ray-start.log", "w") as log:
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    saved, os.environ["RAY_TMPDIR"] = os.environ.get("RAY_TMPDIR"), env["RAY_TMPDIR"]
    try:
        deadline = time.monotonic() + 120
        while not ray_target(None).recorded:
            if head.poll() is not None or time.monotonic() > deadline:
                _kill_session(head)
                raise RuntimeError(f"`ray start` did not come up: {_tail(str(workdir / 'ray-start.log'))}")
            time.sleep(0.5)
    finally:
        os.environ.pop("RAY_TMPDIR") if saved is None else os.environ.update(RAY_TMPDIR=saved)
    _settle(head.pid)  # its start-up work done (prestarted workers too), as a Ray that was already there
    return head


def _settle(sid: int, idle_cores: float = 0.05, timeout_s: float = 60) -> None:
    """Wait until the processes of session `sid` use under `idle_cores` CPUs over a second."""

    def cpu_s() -> float:
        total = 0
        for pid in _session_pids(sid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
            except (OSError, IndexError):
                pass
        return total / os.sysconf("SC_CLK_TCK")

    deadline, last = time.monotonic() + timeout_s, cpu_s()
    while time.monotonic() < deadline:
        time.sleep(1)
        now = cpu_s()
        if now - last < idle_cores:
            return
        last = now


def _launch(cmd: list[str], log_path: str, env: dict[str, str], timeout: float) -> tuple[str, float]:
    """Run one variant's command to its end: (error or "", wall seconds)."""
    start, error = time.perf_counter(), ""
    with open(log_path, "w") as log:
        # A session of its own: everything the variant starts can be found and stopped.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            if rc != 0:
                error = f"exit code {rc}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:.0f}s"
        finally:
            wall = time.perf_counter() - start
            _kill_session(proc)
    return error, wall


def run_variant(variant: str, workdir: Path, cores: int, steps: int, timeout: float, rnd: int, cold: bool) -> Result:
    procs, threads = layout(variant, cores)
    run_name = f"{variant}-r{rnd}"
    res = Result(variant, procs, threads, round=rnd, log=str(workdir / f"{run_name}.log"))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)  # c starts (and pays for) its own local Ray
    head = None
    try:
        if variant == "j1":  # before the clock: a Ray that is running and has served a run, as when iterating
            head = _ray_start(workdir, env)
            warm = f"{run_name}-first"
            res.error, _ = _launch(
                _command(variant, workdir, threads, warm, cold), str(workdir / f"{warm}.log"), env, timeout
            )
            if res.error:
                res.error, res.log = f"its first run: {res.error}", str(workdir / f"{warm}.log")
                return res
        if cold:
            drop_page_cache()
        launched = time.time()
        res.error, wall = _launch(_command(variant, workdir, threads, run_name, cold), res.log, env, timeout)
        if not res.error:
            res.wall_s = wall
    except RuntimeError as e:  # `ray start` did not come up
        res.error = str(e)
        return res
    finally:
        if head is not None:
            _kill_session(head)
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    out = workdir / f"{run_name}.json"
    if not res.error:
        if not out.exists():
            res.error = f"exited 0 but wrote no {out.name}"
        else:
            written = json.loads(out.read_text())
            res.step_times, res.first_step_s = written["step_times"], written["first_step_at"] - launched
            if len(res.step_times) != steps:
                res.error = f"timed {len(res.step_times)} of {steps} steps"
    return res


def summarize(res: Result, tokens_per_step: int, warmup: int, flops_per_token: float, peak: float) -> None:
    measured = res.step_times[warmup:]
    if res.error or not measured:
        return
    res.tokens_per_s = tokens_per_step / statistics.median(measured)
    res.tokens_per_s_mean = tokens_per_step * len(measured) / sum(measured)
    res.mfu = res.tokens_per_s * flops_per_token / peak


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hydra overrides for the model (default: %(default)s)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per variant (default: %(default)s)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--only", default=",".join(VARIANTS), help="variants to run (default: %(default)s)")
    p.add_argument(
        "--cores",
        type=int,
        help="cores the variants' threads use (default: all); fewer leaves the rest to Ray's own processes",
    )
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per variant before it is killed")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, run dirs) even on success")
    p.add_argument(
        "--rounds", type=int, default=1,
        help="run the variants this many times, interleaved (a c1 b c2 a c1 ...); ratios are the median of the "
        "rounds' ratios, so a machine that drifts over minutes moves both sides of each (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--cold", action="store_true",
        help="a fresh machine's start: the page cache dropped before each variant (root only) and a data cache of "
        "their own for c1/c2 (the corpus is tokenized in their start-up)",
    )  # fmt: skip
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. zero.overlap_comm=true")
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-name", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config_overrides(args: argparse.Namespace, workdir: Path, cores: int) -> list[str]:
    s = args.steps
    return [
        "experiment=pretrain_tiny",
        f"data.cache_dir={REPO / 'runs' / '.cache'}",
        *shlex.split(args.model),
        f"data.seq_len={args.seq_len}",
        f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.global_batch_size={args.global_batch}",
        f"trainer.max_steps={s}",
        f"trainer.warmup_steps={max(1, s // 10)}",
        # distlm evaluates at step 0 and at the end and checkpoints at the end only: outside the
        # step clock, inside the wall time.
        f"trainer.eval_every={s}", f"trainer.checkpoint_every={s}", "trainer.eval_batches=1", "trainer.log_every=1",
        "trainer.max_failures=0",  # a failure fails the variant instead of restarting mid-measurement
        "tracking=disabled",
        "cluster.device=cpu", "cluster.backend=gloo", "cluster.precision=fp32",
        "cluster.address=local",  # a Ray of each variant's own, even where `ray start` runs one (j1 joins that)
        # The strictest layout (2 workers), so validation covers every variant's batch split.
        "cluster.num_workers=2", f"cluster.cpus_per_worker={max(1, cores // 2)}",
        f"hydra.run.dir={workdir / 'run'}",
        *args.overrides,
    ]  # fmt: skip


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def print_report(console, results: list[Result], warmup: int, steps: int) -> dict[str, float | None]:
    from rich.table import Table

    rounds = max(r.round for r in results) + 1
    title = f"steady-state training throughput (median step of {warmup + 1}..{steps})"
    table = Table(title=title + (f", median of {rounds} interleaved rounds" if rounds > 1 else ""))
    for name in ("variant", "procs x threads", "tokens/s", "MFU", "step", "first step", "wall (incl. startup)"):
        table.add_column(name, justify="left" if name == "variant" else "right")
    by: dict[str, list[Result]] = {}
    for r in results:
        by.setdefault(r.variant, []).append(r)
    for variant, runs in by.items():
        ok = [r for r in runs if not r.error]
        spread = lambda xs, f: f(_median(xs)) + (f" ({f(min(xs))}..{f(max(xs))})" if len(xs) > 1 else "")  # noqa: E731
        table.add_row(
            f"{variant}  {VARIANTS[variant]}" + (f" [red]{len(runs) - len(ok)} FAILED" if len(ok) < len(runs) else ""),
            f"{runs[0].procs} x {runs[0].threads}",
            spread([r.tokens_per_s for r in ok], lambda x: f"{x:,.0f}") if ok else "[red]FAILED",
            f"{_median([r.mfu for r in ok]):.1%}" if ok else "-",
            f"{_median([statistics.median(r.step_times[warmup:]) for r in ok]) * 1e3:.0f} ms" if ok else "-",
            spread([r.first_step_s for r in ok], lambda x: f"{x:.1f} s") if ok else "-",
            f"{_median([r.wall_s for r in runs]):.1f} s" if any(not math.isnan(r.wall_s) for r in runs) else "-",
        )
    console.print(table)
    ratios: dict[str, float | None] = {}
    for c, base in RATIOS:
        key = f"{c}/{base}"
        # Each round's ratio (both variants run minutes apart at most), then their median.
        per_round = [
            x.tokens_per_s / y.tokens_per_s
            for x in by.get(c, []) for y in by.get(base, [])
            if x.round == y.round and not x.error and not y.error
        ]  # fmt: skip
        ratios[key] = _median(per_round) if per_round else None
        missing = [v for v in (c, base) if not any(not r.error for r in by.get(v, []))]
        why = ", ".join(f"{v} {'failed' if v in by else 'not run'}" for v in missing) or "no round with both"
        value = f"{ratios[key]:.2f}" if ratios[key] is not None else f"n/a ({why})"
        if len(per_round) > 1:
            value += f"  (rounds: {', '.join(f'{x:.2f}' for x in per_round)})"
        console.print(f"  tokens/s {key} = {value}   ({VARIANTS[c]} vs {VARIANTS[base]})")
    for r in results:
        if r.error:  # the log tail may hold brackets: print it without markup
            console.print(f"\n[red]{r.variant} (round {r.round + 1}) FAILED: {r.error}[/] (log: {r.log})")
            console.print(_tail(r.log), markup=False, highlight=False)
    return ratios


def main() -> int:
    args = parse_args()
    if args.worker:
        worker_main(args.worker, Path(args.workdir), args.threads, args.run_name, args.cold)
        return 0
    # SIGTERM unwinds like Ctrl-C, so the running variant's processes are still stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 110)
    only = [v.strip() for v in args.only.split(",") if v.strip()]
    if not only or any(v not in VARIANTS for v in only):
        console.print(f"[red]--only={args.only!r}: use a comma-separated subset of {','.join(VARIANTS)}")
        return 2
    if args.rounds < 1:
        console.print(f"[red]--rounds={args.rounds}: use 1 or more")
        return 2
    warmup = warmup_steps(args.steps)
    if args.steps < warmup + 2:
        console.print(f"[red]--steps={args.steps}: {warmup} warm-up steps are skipped, use at least {warmup + 2}")
        return 2

    import torch

    from distlm.config import ConfigError, compose
    from distlm.data import prepare_data
    from distlm.models import build_model, count_parameters, flops_per_token
    from distlm.tracking import measure_matmul_peak

    cores = args.cores or num_cores()
    if not 1 <= cores <= num_cores():
        console.print(f"[red]--cores={args.cores}: use 1..{num_cores()}")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="distlm-bench-"))
    overrides = config_overrides(args, workdir, cores)
    (workdir / "overrides.json").write_text(json.dumps(overrides))
    try:
        cfg, _ = compose(overrides)
        # Tokenize (or hit the cache) once, before any clock starts: the variants only find the cache.
        data = prepare_data(cfg.data, seed=cfg.trainer.seed, progress=False)
        model = build_model(
            cfg.model, data.vocab_size, cfg.data.seq_len, data.eos_token_id, cfg.trainer.seed, cfg.init_from
        )
    except ConfigError as e:
        console.print(f"[red]config: {e}")
        shutil.rmtree(workdir, ignore_errors=True)
        return 2
    fpt, n_params = flops_per_token(model, cfg.data.seq_len), count_parameters(model)
    del model
    torch.set_num_threads(cores)
    # The peak is what the machine can do, so noise (a busy machine) only lowers a sample: keep the
    # best of several, taken before and between the variants (never while one runs).
    peaks = [measure_matmul_peak(torch.device("cpu"), torch.float32, trials=10) for _ in range(3)]
    tokens_per_step = cfg.trainer.global_batch_size * cfg.data.seq_len
    load_before = os.getloadavg()[0]
    console.print(
        f"{n_params / 1e6:.2f}M params, {fpt / 1e6:.1f} MFLOP/token, {tokens_per_step} tokens/step, {args.steps} steps "
        f"({warmup} warm-up skipped), ZeRO-{cfg.zero.stage} for b/c, {cores} of {num_cores()} cores, load {load_before:.1f}"
    )
    console.print(f"work dir: {workdir}")

    results: list[Result] = []
    interrupted = False
    if args.cold and not drop_page_cache():
        console.print("[yellow]--cold: cannot drop the page cache (not root): files read before stay cached")
    try:
        for rnd in range(args.rounds):
            for v in only:
                procs, threads = layout(v, cores)
                round_note = f" round {rnd + 1}/{args.rounds}" if args.rounds > 1 else ""
                console.print(f"[bold]{v}[/] {VARIANTS[v]} ({procs} x {threads}){round_note} ...")
                res = run_variant(v, workdir, cores, args.steps, args.timeout, rnd, args.cold)
                results.append(res)
                if res.error:
                    status = f"[red]FAILED: {res.error}[/]"
                else:
                    status = f"{tokens_per_step / statistics.median(res.step_times[warmup:]):,.0f} tokens/s"
                    status += f", first step {res.first_step_s:.1f} s"
                console.print(f"    {status}" + ("" if math.isnan(res.wall_s) else f", wall {res.wall_s:.1f} s"))
                peaks.append(measure_matmul_peak(torch.device("cpu"), torch.float32, trials=10))
    except KeyboardInterrupt:  # the running variant was stopped in run_variant; report the finished ones
        console.print("[red]interrupted")
        interrupted = True
    load_after = os.getloadavg()[0]
    peak = max(peaks)
    for res in results:
        summarize(res, tokens_per_step, warmup, fpt, peak)

    ratios = print_report(console, results, warmup, args.steps)
    console.print(
        f"MFU against the best fp32 matmul peak measured, {peak / 1e9:.1f} GFLOP/s with {cores} threads "
        f"(samples {min(peaks) / 1e9:.1f}..{peak / 1e9:.1f}); 1-min load average {load_before:.1f} -> {load_after:.1f}"
    )
    if min(peaks) < 0.7 * peak or load_after > cores + 0.5:
        console.print(
            "[yellow]the machine looked busy (peak samples spread or load above the core count): numbers are noisy"
        )
    resolved = ["--model", args.model, "--steps", str(args.steps), "--micro-batch", str(args.micro_batch),
                "--global-batch", str(args.global_batch), "--seq-len", str(args.seq_len), "--only", ",".join(only),
                "--rounds", str(args.rounds)] + (["--cold"] if args.cold else []) \
        + (["--cores", str(cores)] if args.cores else [])  # fmt: skip
    command = shlex.join([sys.executable, str(Path(__file__).resolve()), *resolved, *args.overrides])
    console.print(f"reproduce: {command}", soft_wrap=True, markup=False, highlight=False)
    if args.out:
        report: dict[str, Any] = {
            "command": command, "cores": cores, "torch": torch.__version__, "params": n_params,
            "flops_per_token": fpt, "peak_flops": peak, "peak_samples": peaks, "tokens_per_step": tokens_per_step, "steps": args.steps,
            "warmup_steps": warmup, "load_average": [load_before, load_after], "ratios": ratios,
            "results": [{k: None if isinstance(x, float) and math.isnan(x) else x for k, x in asdict(r).items()} for r in results],
        }  # fmt: skip
        Path(args.out).write_text(json.dumps(report, indent=2))
        console.print(f"results: {args.out}")
    failed = interrupted or any(r.error for r in results)
    if failed or args.keep:
        console.print(f"work dir kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
