"""`distlm launch slurm|k8s`: the same `distlm train` run, started on a cluster.

The launcher composes and validates the run here (a mistake fails before anything is
submitted), fixes its run dir, and hands the overrides to `distlm train` on the cluster:
an sbatch script for Slurm (slurm.py), KubeRay manifests for Kubernetes (k8s.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from distlm.config import ClusterConfig, Config, ConfigError, compose

TARGETS = ("slurm", "k8s")


@dataclass
class LaunchOptions:
    target: str
    overrides: List[str] = field(default_factory=list)
    dry_run: bool = False
    apply: bool = False
    follow: bool = False
    multirun: bool = False
    serve: bool = False
    out: Optional[str] = None


@dataclass
class Point:
    """One run to start: its composed config and the overrides `distlm train` gets on the cluster."""

    cfg: Config
    train_args: List[str]


def templates_dir() -> Path:
    """launch/ templates inside an installed wheel, else the repository's top-level launch/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent.parent / "launch"):
        if (candidate / "sbatch.sh.j2").exists():
            return candidate
    raise FileNotFoundError(
        f"distlm's sbatch template is missing (looked in {here / 'templates'} and the repo's launch/)"
    )


def sweep(overrides: List[str]) -> List[List[str]]:
    """Hydra multirun expansion (`trainer.lr=1e-3,3e-3 model=tiny,small` -> 4 override lists)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"cannot parse the sweep: {str(e).splitlines()[0]}") from e
    (points,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return points


def set_override(overrides: List[str], key: str, value: str) -> List[str]:
    """overrides with key=value replacing any value the user gave."""
    return [o for o in overrides if not o.lstrip("+~").startswith(f"{key}=")] + [f"{key}={value}"]


def plan(target: str, overrides: List[str], multirun: bool, extra: Optional[List[str]] = None) -> List[Point]:
    """Compose every point of the run (one without -m) with its run dir fixed, so a requeued
    or restarted job continues the same run dir instead of making a new timestamped one."""
    overrides = list(overrides)
    if not any(o.lstrip("+").startswith("cluster=") for o in overrides):
        overrides.insert(0, f"cluster={target}")
    overrides += extra or []
    if not multirun:
        cfg, _ = compose(overrides)
        return [Point(cfg, set_override(overrides, "hydra.run.dir", cfg.run_dir))]
    if any(o.lstrip("+").startswith("hydra.run.dir=") for o in overrides):
        raise ConfigError("hydra.run.dir is one directory for every point of a sweep: set hydra.sweep.dir instead")
    points = sweep(overrides)
    # One sweep dir for all points (composing each separately could straddle a clock second).
    sweep_dir = compose([*points[0], "hydra.run.dir=${hydra.sweep.dir}"])[0].run_dir
    planned = []
    for i, point in enumerate(points):
        point = set_override(point, "hydra.run.dir", f"{sweep_dir}/{i}")
        cfg, _ = compose(point)
        planned.append(Point(cfg, point))
    return planned


def check_cluster(c: ClusterConfig) -> None:
    """What a multi-node launch needs beyond the schema's checks. Raises ConfigError."""
    for key, value, least in [
        ("cluster.nodes", c.nodes, 1),
        ("cluster.cpus_per_node", c.cpus_per_node, 1),
        ("cluster.gpus_per_node", c.gpus_per_node, 0),
        ("cluster.gpus_per_worker", c.gpus_per_worker, 1 if c.gpus_per_node else 0),
    ]:
        if value < least:
            raise ConfigError(f"{key}={value} must be at least {least}")
    if c.gpus_per_node > 0:
        per_node, what = (
            c.gpus_per_node // c.gpus_per_worker,
            f"{c.gpus_per_node} GPUs / {c.gpus_per_worker} per worker",
        )
    else:
        per_node, what = (
            c.cpus_per_node // c.cpus_per_worker,
            f"{c.cpus_per_node} CPUs / {c.cpus_per_worker} per worker",
        )
    if c.num_workers > c.nodes * per_node:
        raise ConfigError(
            f"cluster.num_workers={c.num_workers} does not fit on cluster.nodes={c.nodes} node(s) of {what} "
            f"= {per_node} worker(s) each: set cluster.num_workers<={c.nodes * per_node} or add nodes"
        )
    if c.placement_strategy == "STRICT_SPREAD" and c.num_workers > c.nodes:
        raise ConfigError(
            f"cluster.placement_strategy=STRICT_SPREAD puts every worker on its own node, but cluster.num_workers="
            f"{c.num_workers} > cluster.nodes={c.nodes}: use SPREAD or PACK, or more nodes"
        )


def launch(opts: LaunchOptions) -> int:
    """The `distlm launch` command. Returns the exit code; raises ConfigError for bad input."""
    if opts.target not in TARGETS:
        raise ConfigError(f"unknown launch target {opts.target!r}: use slurm or k8s")
    if opts.target == "slurm":
        if opts.apply or opts.serve:
            raise ConfigError(
                "--apply and --serve are for k8s: `distlm launch slurm` submits; --dry-run prints the script"
            )
        from distlm.launch import slurm

        return slurm.launch(plan("slurm", opts.overrides, opts.multirun), opts.dry_run, opts.follow)
    if opts.follow:
        raise ConfigError("--follow is for slurm: on Kubernetes watch the job with `kubectl get rayjob -w`")
    if opts.dry_run and opts.apply:
        raise ConfigError(
            "--dry-run and --apply exclude each other: --dry-run prints the manifests, --apply applies them"
        )
    from distlm.launch import k8s

    return k8s.launch(k8s.plan(opts.overrides, opts.multirun), opts.dry_run, opts.apply, opts.serve, opts.out)


def log(message: str) -> None:
    print(f"distlm: {message}", file=sys.stderr, flush=True)
