"""The end of a run, from its metrics.jsonl: read once (read_metrics), then the summary's losses,
the per-task table (before/after fine-tuning), the best steps, early stopping's best step and the
loss plot. No torch: the driver and the CLI import it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

Records = List[Dict[str, Any]]


def read_metrics(path: str) -> Records:
    """metrics.jsonl as a list, one record per step: steps re-run after a restart from a
    checkpoint replace the ones logged before the failure."""
    latest: Dict[int, Dict[str, Any]] = {}
    p = Path(path)
    if p.exists():
        for line in p.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                latest[record["step"]] = record
    return [latest[k] for k in sorted(latest)]


def last_step(metrics_path: Path) -> int:
    return max((r["step"] for r in read_metrics(str(metrics_path))), default=0)


def best_step(records: Records) -> Optional[int]:
    """Under early stopping, the step whose evaluation was best (the workers' own record of it)."""
    steps = [r["early_stopping/best_step"] for r in records if "early_stopping/best_step" in r]
    return int(steps[-1]) if steps else None


def losses(records: Records) -> Dict[str, Optional[float]]:
    vals = [r["val/loss"] for r in records if "val/loss" in r]
    trains = [r["train/loss"] for r in records if "train/loss" in r]
    return {
        "first_train_loss": trains[0] if trains else None,
        "final_train_loss": trains[-1] if trains else None,
        "first_val_loss": vals[0] if vals else None,
        "final_val_loss": vals[-1] if vals else None,
    }


def task_table(records: Records, tasks: List[str], step: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
    """Per task: its score (exact match, or accuracy for a classification) and loss before fine-tuning
    (step 0) and after (the exported step's evaluation, else the last); the router's accuracy; the
    mean over the tasks."""
    evals = [r for r in records if "eval/mean_score" in r]
    if not evals:
        return {}
    first, last = evals[0], next((r for r in evals if r["step"] == step), evals[-1])
    table = {}
    for t in [*tasks, *(["router"] if "eval/router/accuracy" in last else [])]:
        metric = "exact match" if f"eval/{t}/exact_match" in last else "accuracy"
        if f"eval/{t}/call_exact_match" in last:  # the mean of the calls' and the answers' exact match
            metric = "call + answer"
        table[t] = {
            "metric": metric,
            "before": first[f"eval/{t}/score"],
            "after": last[f"eval/{t}/score"],
            "loss_before": first[f"eval/{t}/loss"],
            "loss_after": last[f"eval/{t}/loss"],
        }
    table["mean"] = {
        "metric": "score",
        "before": first["eval/mean_score"],
        "after": last["eval/mean_score"],
        "loss_before": sum(table[t]["loss_before"] for t in tasks) / len(tasks),
        "loss_after": sum(table[t]["loss_after"] for t in tasks) / len(tasks),
    }
    return table


def best_steps(records: Records, tasks: List[str]) -> Dict[str, Dict[str, float]]:
    """The step with the best score per task and overall (ties: the earliest)."""
    evals = [r for r in records if "eval/mean_score" in r]
    best = {}
    if not evals:
        return best
    for key, name in [(f"eval/{t}/score", t) for t in tasks] + [("eval/mean_score", "overall")]:
        top = max(evals, key=lambda r: (r[key], -r["step"]))
        best[name] = {"step": top["step"], "score": top[key]}
    return best


def plot_losses(records: Records, title: str, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "train/loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["train/loss"] for r in train], label="train")
    val = [r for r in records if "val/loss" in r]
    ax.plot([r["step"] for r in val], [r["val/loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
