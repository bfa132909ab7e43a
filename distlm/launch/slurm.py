"""`distlm launch slurm`: render the sbatch script (launch/sbatch.sh.j2), submit it, follow the job.

The script starts a Ray cluster private to the job (head on the first node, the other
nodes joined with srun), waits until every node is in, runs `distlm train` against it,
stops Ray and exits with training's exit code. On SIGTERM it has the run checkpoint and
requeues the job, which resumes from that checkpoint in the same run dir.
"""

from __future__ import annotations

import codecs
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, TextIO

from distlm.config import ClusterConfig, ConfigError
from distlm.launch import Point, check_cluster, log, templates_dir

# Job states after which a job runs no more (a requeued job goes back to PENDING instead).
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def check_slurm(c: ClusterConfig) -> None:
    check_cluster(c)
    s = c.slurm
    if s.signal_grace_s < 1:
        raise ConfigError(f"cluster.slurm.signal_grace_s={s.signal_grace_s} must be at least 1 (seconds)")
    for i, arg in enumerate(s.sbatch_args):
        if not arg.startswith("-"):
            raise ConfigError(f"cluster.slurm.sbatch_args[{i}]={arg!r} is not an sbatch option: write it as --{arg}")
    for key, lines in [("sbatch_args", s.sbatch_args), ("setup", s.setup), ("ray_start_args", s.ray_start_args)]:
        for i, line in enumerate(lines):
            if "\n" in line:
                raise ConfigError(f"cluster.slurm.{key}[{i}] holds a newline: give one line per list item")


def render_sbatch(c: ClusterConfig, run_dir: str, run_name: str, train_args: List[str], workdir: str) -> str:
    """The sbatch script for one run. `train_args` are `distlm train`'s overrides (run dir fixed)."""
    import jinja2

    check_slurm(c)
    s = c.slurm
    options = [
        f"--{key}={shlex.quote(str(value))}"
        for key, value in [
            ("partition", s.partition),
            ("account", s.account),
            ("qos", s.qos),
            ("time", s.time),
            ("constraint", s.constraint),
            ("mem", s.mem),
        ]
        if value is not None
    ]
    # Default environment: the one distlm runs in now (a shared path on a cluster).
    setup = list(s.setup) or [f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"']
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        comment_start_string="<!--",  # bash has `${#array[@]}`, which is Jinja's default comment start
        comment_end_string="-->",
    )
    return env.get_template("sbatch.sh.j2").render(
        run_name=run_name,
        job_name=s.job_name or f"distlm-{run_name}",
        nodes=c.nodes,
        cpus_per_node=c.cpus_per_node,
        gpus_per_node=c.gpus_per_node,
        options=options,
        workdir=shlex.quote(workdir),
        log=shlex.quote(str(Path(run_dir) / "slurm-%j.out")),
        run_dir=shlex.quote(run_dir),
        requeue=s.requeue,
        grace=s.signal_grace_s,
        sbatch_args=s.sbatch_args,
        setup=setup,
        ray_start_args=[shlex.quote(a) for a in s.ray_start_args],
        join_timeout=s.join_timeout_s,
        train_command=shlex.join(["distlm", "train", *train_args]),
    )


@dataclass
class Job:
    job_id: str
    run_dir: Path

    @property
    def log(self) -> Path:
        return self.run_dir / f"slurm-{self.job_id}.out"


def submit(script: str, run_dir: Path) -> Job:
    """sbatch the script (kept in the run dir as slurm.sbatch). Raises RuntimeError with sbatch's message."""
    if shutil.which("sbatch") is None:
        raise RuntimeError(
            "sbatch is not on PATH: run this on a Slurm login node, or use --dry-run to print the script"
        )
    run_dir.mkdir(parents=True, exist_ok=True)  # sbatch --output needs it to exist
    path = run_dir / "slurm.sbatch"
    path.write_text(script)
    result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed: {(result.stderr or result.stdout).strip()}")
    return Job(result.stdout.strip().split(";")[0], run_dir)


def job_state(job_id: str) -> Optional[Dict[str, str]]:
    """JobState, Reason, ExitCode and Restarts from `scontrol show job`; None once Slurm forgot the job."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return None
    fields = dict(re.findall(r"\b(JobState|Reason|ExitCode|Restarts)=(\S+)", result.stdout))
    return fields or None


def exit_code(state: Dict[str, str]) -> int:
    """The job's exit code: the script's, 128+signal if a signal ended it, 1 for any other failure."""
    code, signal = (int(x) for x in state.get("ExitCode", "0:0").split(":"))
    if state["JobState"] == "COMPLETED":
        return code
    return code or (128 + signal if signal else 1)


def follow(job: Job, out: TextIO = sys.stdout, poll_s: float = 2.0) -> int:
    """Print the job's log as it grows (across requeues) until the job ends; return its exit code."""
    position, last = 0, None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # reads may split a character
    while True:
        state = job_state(job.job_id)
        position = _print_new(job.log, position, out, decoder)
        if state is None:
            log(f"job {job.job_id} is no longer known to Slurm (see {job.log})")
            return 1
        summary = f"{state['JobState']} ({state.get('Reason', 'None')})"
        if summary != last:
            log(f"job {job.job_id}: {summary}")
            last = summary
        if state["JobState"] in TERMINAL:
            _print_new(job.log, position, out, decoder)
            return exit_code(state)
        time.sleep(poll_s)


def _print_new(path: Path, position: int, out: TextIO, decoder: codecs.IncrementalDecoder) -> int:
    if not path.exists():
        return position
    with path.open("rb") as f:
        f.seek(position)
        data = f.read()
    if data:
        out.write(decoder.decode(data))
        out.flush()
    return position + len(data)


def launch(points: List[Point], dry_run: bool, follow_jobs: bool) -> int:
    for p in points:
        if p.cfg.cluster.slurm.requeue and p.cfg.trainer.resume != "auto":
            raise ConfigError(
                "cluster.slurm.requeue=true needs trainer.resume=auto (a requeued job continues its checkpoints): "
                "drop trainer.resume=never or set cluster.slurm.requeue=false"
            )
    scripts = [
        (p, render_sbatch(p.cfg.cluster, p.cfg.run_dir, Path(p.cfg.run_dir).name, p.train_args, str(Path.cwd())))
        for p in points
    ]
    if dry_run:
        for _, script in scripts:
            print(script)
        return 0
    jobs = []
    for point, script in scripts:
        try:
            job = submit(script, Path(point.cfg.run_dir))
        except RuntimeError as e:
            log(f"error: {e}")
            return 1
        print(job.job_id, flush=True)
        log(f"submitted job {job.job_id}: run dir {job.run_dir}, log {job.log}")
        jobs.append(job)
    if not follow_jobs:
        return 0
    # A sweep's jobs one after the other: the first failure's code, else 0.
    codes = [follow(job) for job in jobs]
    return next((c for c in codes if c != 0), 0)
