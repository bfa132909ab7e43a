"""Command line: `distlm train [overrides]`, `distlm prepare [overrides]`, `distlm export <run>`, ...

Configuration is composed and validated before anything heavy is imported, so a bad
override fails in about a second with exit code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

EXIT_CONFIG = 2
# SIGTERM (Slurm preemption or time limit): a checkpoint was saved; run the same command to continue.
EXIT_PREEMPTED = 75


def _fail(message: str, code: int) -> int:
    print(f"distlm: error: {message}", file=sys.stderr)
    return code


def _process_start() -> float:
    """When this command started (the start-up report counts from there, imports included)."""
    import psutil

    return psutil.Process().create_time()


def cmd_train(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from distlm.config import ConfigError, compose

    try:
        cfg, composed = compose(args.overrides)
    except ConfigError as e:
        return _fail(str(e), EXIT_CONFIG)
    if args.cfg:
        print(OmegaConf.to_yaml(composed, resolve=True))
        return 0
    run_dir = Path(cfg.run_dir)

    from rich.console import Console

    from distlm import driver
    from distlm.checkpoint import CheckpointError
    from distlm.failures import RunFailed

    console = Console(stderr=True)
    try:
        summary = driver.run(cfg, console, verbose=args.verbose, overrides=args.overrides, started=_process_start())
    except ConfigError as e:  # problems found on the driver after composition (data files, ...)
        return _fail(str(e), EXIT_CONFIG)
    except driver.Preempted as e:
        return _fail(str(e), EXIT_PREEMPTED)
    except (driver.ExportFailed, RunFailed, CheckpointError) as e:
        return _fail(str(e), 1)
    except KeyboardInterrupt:
        return _fail(
            f"interrupted; continue with: distlm train {' '.join(args.overrides)} hydra.run.dir={run_dir}", 130
        )
    except Exception as e:  # noqa: BLE001 - the run failed after Ray's retries: say why, once
        return _fail(f"training failed: {type(e).__name__}: {e}", 1)
    _print_summary(console, summary, cfg)
    return 0


def _print_summary(console, summary, cfg) -> None:
    from rich.table import Table

    table = Table(title="distlm run", show_header=False)
    table.add_row("run dir", summary["run_dir"])
    if summary.get("first_val_loss") is not None:
        table.add_row("val loss", f"{summary['first_val_loss']:.3f} -> {summary['final_val_loss']:.3f}")
    table.add_row("train loss", f"{summary['first_train_loss']:.3f} -> {summary['final_train_loss']:.3f}")
    table.add_row("export", summary["export"] or f"none (trainer.export=false): distlm export {summary['run_dir']}")
    table.add_row("loss plot", str(Path(summary["run_dir"]) / "loss.png"))
    table.add_row("metrics", str(Path(summary["run_dir"]) / "metrics.jsonl"))
    if cfg.tracking.backend == "wandb" and cfg.tracking.mode == "offline":
        table.add_row("W&B (offline)", f"wandb sync {Path(summary['run_dir']) / 'wandb'}/offline-run-*")
    console.print(table)
    if summary.get("tasks"):
        tasks = Table(title="held-out score per task")
        for column in ("task", "metric", "before", "after", "loss before", "loss after"):
            tasks.add_column(column)
        for name, row in summary["tasks"].items():
            tasks.add_row(
                name,
                row["metric"],
                f"{row['before']:.3f}",
                f"{row['after']:.3f}",
                f"{row['loss_before']:.3f}",
                f"{row['loss_after']:.3f}",
            )
        console.print(tasks)
        report = Path(summary["run_dir"]) / "eval_report.json"
        if report.exists():
            print_reports(console, json.loads(report.read_text())["tasks"])
    if summary.get("agent"):
        agent = summary["agent"]
        console.print(eval_table("the agent on held-out examples", agent["metrics"], agent["tasks"], agent["adapters"]))


def print_reports(console, reports) -> None:
    """Per class precision/recall/F1 and the confusion matrix of each classification (and the router)."""
    from rich.table import Table

    from distlm.evaluate import classification_metrics

    for name, report in reports.items():
        import torch

        labels, confusion = report["labels"], torch.tensor(report["confusion"], dtype=torch.float64)
        m = classification_metrics(confusion, labels)
        table = Table(title=f"{name}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} (held-out)")
        for column in ("label", "precision", "recall", "f1", "support", *[f"-> {label}" for label in labels]):
            table.add_column(column)
        for i, label in enumerate(labels):
            row = [f"{m[f'{k}/{label}']:.3f}" for k in ("precision", "recall", "f1")]
            table.add_row(label, *row, str(int(confusion[i].sum())), *[str(int(v)) for v in confusion[i]])
        console.print(table)


def cmd_prepare(args: argparse.Namespace) -> int:
    """Tokenize the corpus of `data=...` into the shared cache (Ray Data across the cluster for
    large corpora), so training runs with the same data settings start at once."""
    from omegaconf import OmegaConf

    from distlm.config import ConfigError, compose

    try:
        cfg, composed = compose(args.overrides)
    except ConfigError as e:
        return _fail(str(e), EXIT_CONFIG)
    if args.cfg:
        print(OmegaConf.to_yaml(composed.data, resolve=True))
        return 0
    import json

    from distlm.data.tokens import find_prepared, prepare_data, summary_line
    from distlm.driver import ray_for_run

    try:
        data = find_prepared(cfg.data, seed=cfg.trainer.seed)
        cached = data is not None
        if data is None:
            data = prepare_data(cfg.data, seed=cfg.trainer.seed, progress=True, ray_init=lambda: ray_for_run(cfg))
    except ConfigError as e:
        return _fail(str(e), EXIT_CONFIG)
    except KeyboardInterrupt:
        return _fail(
            f"interrupted; `distlm prepare {' '.join(args.overrides)}` continues (finished shards are kept)", 130
        )
    except Exception as e:  # noqa: BLE001 - say why, once; finished shards are kept for the next try
        return _fail(f"data preparation failed: {type(e).__name__}: {e}", 1)
    cache = Path(data.train_path).parent
    build = json.loads((cache / "build.json").read_text())
    print(("already prepared: " if cached else "") + summary_line(build))
    print(f"cache: {cache}")
    print(f"tokenizer: {data.tokenizer_dir} (vocab {data.vocab_size})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """The memory pre-flight's estimate per worker for the composed run, for every ZeRO preset."""
    from distlm.config import ConfigError, compose

    try:
        cfg, _ = compose(args.overrides)
        from rich.console import Console
        from rich.table import Table

        from distlm import memory
        from distlm.driver import convert_gguf_inputs
        from distlm.runtime import ray_target, resolve_runtime

        console = Console(width=max(120, Console().width))
        convert_gguf_inputs(cfg, console)
        runtime = resolve_runtime(cfg.cluster)
        joined = ray_target(cfg.cluster.address).address is not None
        if joined:
            from distlm.runtime import init_ray

            init_ray(cfg.cluster.address, 0, quiet=True)
        plan = memory.plan(cfg, runtime.device, runtime.precision, joined)
    except ConfigError as e:
        return _fail(str(e), EXIT_CONFIG)
    shape = plan.shape
    title = (
        f"memory per worker: {shape.params / 1e6:,.1f}M parameters ({shape.trainable / 1e6:,.1f}M trainable), "
        f"{plan.setting.describe()}"
    )
    table = Table(title=title)
    rows = plan.table()
    for column in rows[0]:
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    console.print(plan.summary())
    try:
        plan.check()
    except ConfigError as e:
        console.print(f"does not fit: {e}")
        return EXIT_CONFIG
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from distlm.checkpoint import CheckpointError
    from distlm.export import export_checkpoint, newest_checkpoint

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        return _fail(f"{run_dir} is not a directory: give a run directory (runs/<run>)", EXIT_CONFIG)
    try:
        checkpoint = args.checkpoint or newest_checkpoint(str(run_dir))
        out = args.out or str(run_dir / "export")
        tokenizer = run_dir / "tokenizer"
        info = export_checkpoint(checkpoint, out, str(tokenizer) if tokenizer.is_dir() else None)
    except CheckpointError as e:
        return _fail(str(e), EXIT_CONFIG)
    print(f"exported step {info['step']} of {checkpoint} to {out}")
    return 0


def cmd_build_ops(args: argparse.Namespace) -> int:
    """Compile DeepSpeed's C++ ops now (make install does), not on the first run."""
    from distlm.engine import build_ops, clear_stale_build_locks

    for line in clear_stale_build_locks():
        print(f"distlm: {line}")
    for line in build_ops():
        print(f"deepspeed op {line}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Verify every checkpoint of a run (each file's size and checksum) without training. Exit 0
    when the newest is intact (a resume starts there), 1 otherwise."""
    from rich.console import Console
    from rich.table import Table

    from distlm.checkpoint import check_all

    checkpoints = Path(args.run) / "checkpoints"
    if not checkpoints.is_dir():
        return _fail(f"{args.run} has no checkpoints/ folder: give a run directory (runs/<run>)", EXIT_CONFIG)
    rows = check_all(checkpoints)
    if not rows:
        return _fail(f"no checkpoints in {checkpoints}", 1)
    table = Table(title=f"checkpoints of {args.run}")
    for column in ("step", "registered", "status", "path"):
        table.add_column(column, overflow="fold")
    for r in rows:
        status = "intact" if r["error"] is None else f"[red]{r['error']}[/]"
        table.add_row(str(r["step"]), "yes" if r["registered"] else "no", status, r["path"])
    Console().print(table)
    if rows[0]["error"] is not None:
        intact = next((r for r in rows if r["error"] is None), None)
        after = f"a resume starts from step {intact['step']}, the newest intact one" if intact else "none is intact"
        print(f"the newest checkpoint (step {rows[0]['step']}) is damaged: {after}")
        return 1
    print(f"the newest checkpoint (step {rows[0]['step']}) is intact")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Per-task scores of an export (each example through its own task's layer), and, when the export
    has a router, the agent end to end (each example where the router sends it)."""
    from distlm.config import ConfigError, compose
    from distlm.export import find_export

    try:
        found = find_export(args.run)
        export = Path(found.path)
        # init_from is the model being evaluated here, not something to resolve.
        cfg, _ = compose([*args.overrides, "init_from=null"])
        # Unless told otherwise, evaluate the tasks (and seed: it picks the held-out split) of the run.
        saved = export.parent / ".hydra" / "config.yaml"
        if saved.exists() and not any(o.lstrip("+").startswith("task") for o in args.overrides):
            from omegaconf import OmegaConf

            from distlm.config import TasksConfig, task_configs

            run = OmegaConf.load(saved)
            cfg.task = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TasksConfig), run.task))
            cfg.task.tasks = task_configs(cfg.task.tasks)
            cfg.trainer.seed = int(run.trainer.seed)
        if not cfg.task.tasks:
            raise ConfigError("no tasks to evaluate: pick a task set, e.g. task=suite")
        from rich.console import Console

        from distlm.evaluate import evaluate_export

        agent = cfg.serve.agent
        metrics, reports, tasks, adapters = evaluate_export(
            str(export), cfg.task, cfg.trainer.seed, agent.min_confidence, agent.fallback
        )
    except ConfigError as e:
        return _fail(str(e), EXIT_CONFIG)
    console = Console(width=max(140, Console().width))
    console.print(eval_table(f"distlm eval: {export}", metrics, describe_tasks(tasks, cfg.task), adapters))
    print_reports(console, reports)
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


def describe_tasks(tasks, cfg) -> dict:
    """{task: (kind, held-out examples evaluated)} for eval_table."""
    return {name: (task.kind, min(len(task.eval), cfg.eval_examples)) for name, task in tasks.items()}


def eval_table(title: str, metrics, tasks, adapters):
    """One row per task: its layer, its score through that layer (the oracle) and through the agent.
    `tasks`: {task: (kind, examples)}."""
    from rich.table import Table

    agent = "eval/agent/mean_score" in metrics
    table = Table(title=title)
    columns = ["task", "kind", "layer", "examples", "loss", "score (own layer)"]
    columns += ["routed right", "score (agent)", "agent / own"] if agent else []
    for column in columns:
        table.add_column(column)
    names = [n for n in tasks if n != "router"]
    for name in names:
        kind, examples = tasks[name]
        layer = name if name in adapters else ("shared" if "shared" in adapters else "base")
        if kind == "classification":
            layer = f"head ({layer})"
        score = metrics[f"eval/{name}/score"]
        metric = "accuracy" if kind == "classification" else "exact match"
        if f"eval/{name}/call_exact_match" in metrics:  # the mean of the calls' and the answers' exact match
            metric = "call + answer"
        row = [name, metric, layer]
        row += [str(examples), f"{metrics[f'eval/{name}/loss']:.3f}", f"{score:.3f}"]
        if agent:
            through = metrics[f"eval/agent/{name}/score"]
            ratio = f"{through / score:.3f}" if score > 0 else "-"
            row += [f"{metrics[f'eval/agent/{name}/routed_right']:.3f}", f"{through:.3f}", ratio]
        table.add_row(*row)
    mean = ["mean", "", "", "", f"{metrics['val/loss']:.3f}", f"{metrics['eval/mean_score']:.3f}"]
    if agent:
        mean += [f"{metrics['eval/agent/routing_accuracy']:.3f}", f"{metrics['eval/agent/mean_score']:.3f}", ""]
    table.add_row(*mean)
    return table


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a run's export (and its task adapters) over an OpenAI-style HTTP API until Ctrl-C."""
    from distlm.config import ConfigError, compose

    try:
        cfg, _ = compose(args.overrides)
        from distlm.export import find_export

        export = find_export(args.path, cfg.serve.model_name)
        from distlm.serve.server import serve_forever

        serve_forever(export, cfg.serve, cfg.cluster.address)
    except ConfigError as e:
        return _fail(str(e), EXIT_CONFIG)
    except KeyboardInterrupt:  # before the server was up
        return _fail("interrupted", 130)
    except Exception as e:  # noqa: BLE001 - e.g. a replica that could not load the model: say why, once
        return _fail(f"serving failed: {type(e).__name__}: {e}", 1)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from distlm.config import ConfigError
    from distlm.launch import LaunchOptions, launch

    options = LaunchOptions(
        args.target,
        args.overrides,
        dry_run=args.dry_run,
        apply=getattr(args, "apply", False),
        follow=getattr(args, "follow", False),
        multirun=args.multirun,
        serve=getattr(args, "serve", False),
        out=getattr(args, "out", None),
    )
    try:
        return launch(options)
    except ConfigError as e:
        return _fail(str(e), EXIT_CONFIG)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distlm", description="Distributed LM training on Ray + DeepSpeed ZeRO.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train a model (Hydra overrides: group=option key=value)",
        description="Examples: distlm train | distlm train model=tiny zero=zero3 trainer.max_steps=50 | "
        "distlm train hydra.run.dir=runs/mine (continues it if it has checkpoints)",
    )
    train.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    train.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show what Ray, DeepSpeed and the workers print (always in <run>/logs/rank<r>.log)",
    )
    train.add_argument("overrides", nargs="*", help="Hydra overrides")
    train.set_defaults(func=cmd_train)
    prepare = sub.add_parser(
        "prepare",
        help="tokenize the corpus into the shared data cache (Ray Data across the cluster), ahead of training",
        description="Examples: distlm prepare | distlm prepare data=jsonl data.paths=[/data/corpus/] | "
        "distlm prepare data=hf data.paths=[/data/my_dataset] cluster.address=<head>:6379. Training runs with "
        "the same data settings (and trainer.seed) then find it prepared.",
    )
    prepare.add_argument("--cfg", action="store_true", help="print the composed data config and exit")
    prepare.add_argument("overrides", nargs="*", help="Hydra overrides (data.*, cluster.address, trainer.seed)")
    prepare.set_defaults(func=cmd_prepare)
    plan = sub.add_parser(
        "plan",
        help="estimate each worker's memory for a run (model states, activations) and check that it fits",
        description="Examples: distlm plan model=smollm2_135m | distlm plan model=llama_1b zero=zero0",
    )
    plan.add_argument("overrides", nargs="*", help="Hydra overrides, as for distlm train")
    plan.set_defaults(func=cmd_plan)
    export = sub.add_parser("export", help="export a run's newest checkpoint in Hugging Face format")
    export.add_argument("run", help="run directory")
    export.add_argument("--checkpoint", help="a specific checkpoint directory (default: the newest complete one)")
    export.add_argument("--out", help="output directory (default: <run>/export)")
    export.set_defaults(func=cmd_export)
    build_ops = sub.add_parser(
        "build-ops",
        help="compile DeepSpeed's C++ ops for this machine now (make install does) instead of on the first run",
    )
    build_ops.set_defaults(func=cmd_build_ops)
    check = sub.add_parser("check", help="verify a run's checkpoints (every file's size and checksum) without training")
    check.add_argument("run", help="the run directory (runs/<run>)")
    check.set_defaults(func=cmd_check)
    evaluate = sub.add_parser("eval", help="per-task loss and exact match of a run's export (task=... picks the tasks)")
    evaluate.add_argument("run", help="run directory or export directory")
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    evaluate.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task=suite task.eval_examples=128")
    evaluate.set_defaults(func=cmd_eval)
    serve = sub.add_parser(
        "serve",
        help="serve a run's export with Ray Serve: OpenAI-style HTTP API, one model id per task adapter",
        description="Examples: distlm serve runs/<run> | distlm serve runs/<run> serve.port=8001 serve.max_batch_size=16 "
        "| DISTLM_API_KEY=secret distlm serve runs/<run>/export",
    )
    serve.add_argument("path", help="a run directory (its export/) or an export directory")
    serve.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. serve.port=8001 cluster.address=auto")
    serve.set_defaults(func=cmd_serve)
    launch = sub.add_parser("launch", help="run training on a cluster: Slurm (sbatch) or Kubernetes (KubeRay)")
    targets = launch.add_subparsers(dest="target", required=True)
    slurm = targets.add_parser(
        "slurm",
        help="render an sbatch script (Ray on the allocation, then distlm train) and submit it",
        description="Examples: distlm launch slurm --dry-run cluster.nodes=4 cluster.gpus_per_node=8 | "
        "distlm launch slurm --follow experiment=pretrain_tiny | distlm launch slurm -m trainer.lr=1e-3,3e-3",
    )
    slurm.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    slurm.add_argument("--follow", action="store_true", help="print the job's log until it ends; exit with its code")
    k8s = targets.add_parser(
        "k8s",
        help="render KubeRay manifests: a RayJob (training) and a RayService (serving); kubectl apply them",
        description="Examples: distlm launch k8s --dry-run cluster.nodes=2 cluster.gpus_per_node=8 | "
        "distlm launch k8s --apply cluster.k8s.image=registry/distlm:0.1 | distlm launch k8s --apply --serve hydra.run.dir=...",
    )
    k8s.add_argument("--dry-run", action="store_true", help="print the manifests, apply nothing")
    k8s.add_argument("--apply", action="store_true", help="kubectl apply the RayJob (the RayService with --serve)")
    k8s.add_argument("--serve", action="store_true", help="with --apply: apply the RayService that serves the run")
    k8s.add_argument("--out", help="directory for the manifest files (default: runs/k8s/<run>)")
    for target in (slurm, k8s):
        target.add_argument("-m", "--multirun", action="store_true", help="Hydra sweep (a=1,2): a job per point")
        target.add_argument("overrides", nargs="*", help="Hydra overrides of the run (cluster=<target> is implied)")
        target.set_defaults(func=cmd_launch)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
