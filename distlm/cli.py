"""Command line: `distlm train [overrides]`, `distlm export <run>`.

Configuration is composed and validated before anything heavy is imported, so a bad
override fails in about a second with exit code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

EXIT_CONFIG = 2


def _fail(message: str, code: int) -> int:
    print(f"distlm: error: {message}", file=sys.stderr)
    return code


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
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(composed, resolve=True))
    (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(args.overrides))))

    from rich.console import Console

    from distlm import trainer

    console = Console(stderr=True)
    try:
        summary = trainer.run(cfg, console)
    except ConfigError as e:  # problems found on the driver after composition (data files, ...)
        return _fail(str(e), EXIT_CONFIG)
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
    table.add_row("export", summary["export"])
    table.add_row("loss plot", str(Path(summary["run_dir"]) / "loss.png"))
    table.add_row("metrics", str(Path(summary["run_dir"]) / "metrics.jsonl"))
    if cfg.tracking.backend == "wandb" and cfg.tracking.mode == "offline":
        table.add_row("W&B (offline)", f"wandb sync {Path(summary['run_dir']) / 'wandb'}/offline-run-*")
    console.print(table)


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
    train.add_argument("overrides", nargs="*", help="Hydra overrides")
    train.set_defaults(func=cmd_train)
    export = sub.add_parser("export", help="export a run's newest checkpoint in Hugging Face format")
    export.add_argument("run", help="run directory")
    export.add_argument("--checkpoint", help="a specific checkpoint directory (default: the newest complete one)")
    export.add_argument("--out", help="output directory (default: <run>/export)")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
