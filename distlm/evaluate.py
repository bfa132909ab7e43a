"""Evaluation: validation loss for pretraining; per-task loss and exact match for fine-tuning.

Both split the work across ranks and all-reduce the sums. Every rank runs the same
number of forward passes (and generation runs with `synced_gpus` under ZeRO-3),
because a ZeRO-3 forward gathers parameters collectively.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch

from distlm.config import TasksConfig
from distlm.data.batches import IGNORE, collate, collate_requests, encode_examples, pad_id
from distlm.data.tasks import ROUTER, TaskData
from distlm.data.tokens import TokenBlocks
from distlm.runtime import all_reduce_sum


def validation_loss(
    forward: Callable, val: TokenBlocks, micro: int, batches: int, rank: int, world: int, device
) -> float:
    """Mean loss over the first `batches * micro * world` validation blocks."""
    total = min(len(val), batches * micro * world) // world * world
    indices = list(range(rank, total, world))
    loss_sum = 0.0
    with torch.no_grad():
        for i in range(0, len(indices), micro):
            ids = torch.stack([val[j] for j in indices[i : i + micro]]).to(device)
            loss_sum += float(forward(input_ids=ids, labels=ids).loss) * len(ids)
    loss_sum, count = all_reduce_sum([loss_sum, float(len(indices))], device)
    return loss_sum / count


def _left_pad(prompts: List[List[int]], pad_id: int):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def _rank_share(examples: List, rank: int, world: int) -> List[Tuple[object, float]]:
    """This rank's examples with weight 1, padded with weight-0 repeats so that every rank runs the
    same number of forward passes (a ZeRO-3 forward gathers parameters collectively)."""
    per_rank = math.ceil(len(examples) / world)
    return [
        (examples[i], 1.0) if i < len(examples) else (examples[0], 0.0) for i in range(rank, per_rank * world, world)
    ]


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: Dict[str, TaskData],
    cfg: TasksConfig,
    device,
    rank: int = 0,
    world: int = 1,
    synced_gpus: bool = False,
    activate: Optional[Callable[[str], None]] = None,
    batch_size: int = 16,
    reports: Optional[Dict[str, Dict]] = None,
) -> Dict[str, float]:
    """Per task: eval/<task>/loss and eval/<task>/score, which is exact_match (greedy generation)
    for a generative task and accuracy for a classification (with macro_f1 and per-class
    precision/recall/f1); their means over the tasks (the router, scored like a classification,
    is not one of them) and val/loss. A task whose assistant turns call tools also gets
    call_exact_match and call_valid, and its score is the mean of exact_match (the final answer,
    after the tool's result) and call_exact_match. `reports` receives each classification's
    confusion matrix."""
    metrics: Dict[str, float] = {}
    was_training = model.training
    model.eval()
    for name, task in tasks.items():
        if activate is not None:
            activate(name)
        examples = _per_label(task.eval, cfg.eval_examples) if name == ROUTER else task.eval[: cfg.eval_examples]
        if task.is_classification:
            report = _classification(model, tokenizer, task, examples, device, rank, world, batch_size)
            metrics |= {f"eval/{name}/{key}": value for key, value in report.pop("metrics").items()}
            if reports is not None:
                reports[name] = report
        else:
            max_new = cfg.tasks[name].max_new_tokens if name in cfg.tasks else 16
            found = _generative(model, tokenizer, examples, device, rank, world, batch_size, max_new, synced_gpus)
            scored = [found["exact_match"]] + ([found["call_exact_match"]] if "call_exact_match" in found else [])
            found["score"] = sum(scored) / len(scored)
            metrics |= {f"eval/{name}/{key}": value for key, value in found.items()}
    names = [n for n in tasks if n != ROUTER]
    generative = [n for n in names if not tasks[n].is_classification]
    if generative:
        metrics["eval/mean_exact_match"] = sum(metrics[f"eval/{n}/exact_match"] for n in generative) / len(generative)
    metrics["eval/mean_score"] = sum(metrics[f"eval/{n}/score"] for n in names) / len(names)
    metrics["val/loss"] = sum(metrics[f"eval/{n}/loss"] for n in names) / len(names)
    model.train(was_training)
    return metrics


def _per_label(examples: List, n: int) -> List:
    """The first n examples of each label, in their order (the router's prompts of each task)."""
    seen: Dict[str, int] = {}
    kept = []
    for example in examples:
        seen[example[1]] = seen.get(example[1], 0) + 1
        if seen[example[1]] <= n:
            kept.append(example)
    return kept


def _greedy(model, tokenizer, prompts: List[str], device, max_new: int, synced_gpus: bool) -> List[str]:
    """The greedy continuation of each prompt (one batch)."""
    pad = pad_id(tokenizer)
    ids, attention = _left_pad(tokenizer(prompts, add_special_tokens=False).input_ids, pad)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=attention.to(device),
        max_new_tokens=max_new,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        synced_gpus=synced_gpus,
    )
    return [tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out]


def _generative(model, tokenizer, examples, device, rank, world, batch_size, max_new, synced_gpus) -> Dict:
    """loss (per target token) and exact_match (of the greedy answer) over the examples, all ranks
    together; and where the assistant's turns call tools, call_exact_match and call_valid."""
    pad = pad_id(tokenizer)
    mine = _rank_share(examples, rank, world)
    loss_sum = tokens = correct = counted = 0.0
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            encoded = encode_examples(tokenizer, [example for example, _ in chunk])
            weights = torch.tensor([w for _, w in chunk], device=device)
            batch = {k: v.to(device) for k, v in collate(encoded, pad).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            per_token = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
            )
            mask = (labels != IGNORE).float() * weights[:, None]
            loss_sum += float((per_token * mask).sum())
            tokens += float(mask.sum())
            texts = _greedy(model, tokenizer, [str(p) for (p, _), _ in chunk], device, max_new, synced_gpus)
            for text, ((_, target), w) in zip(texts, chunk):
                correct += w * float(text.strip() == target.strip())
                counted += w
    loss_sum, tokens, correct, counted = all_reduce_sum([loss_sum, tokens, correct, counted], device)
    metrics = {"loss": loss_sum / max(tokens, 1.0), "exact_match": correct / max(counted, 1.0)}
    turns = call_turns(examples)
    if turns:  # the same list on every rank, so every rank runs as many generations
        metrics |= _calls(model, tokenizer, turns, device, rank, world, batch_size, max_new, synced_gpus)
    return metrics


def call_turns(examples) -> List[Tuple[str, List, Tuple]]:
    """(prompt, expected calls, declared tools) for every assistant turn of the examples that calls
    tools: the earlier turns a conversation's prompt holds (data/tasks.py: Turns) and the target."""
    from distlm.tools import parse_calls

    turns = []
    for prompt, target in examples:
        tools = tuple(getattr(prompt, "tools", ()))
        if not tools:
            continue
        names = [t["function"]["name"] for t in tools]
        earlier = zip(prompt.turn_prompts(), (prompt[a:b] for a, b in prompt.spans))
        texts = [*earlier, (str(prompt), target)]
        for before, text in texts:
            calls = parse_calls(text, names)[1]
            if calls:
                turns.append((before, [(c.name, json.loads(c.arguments)) for c in calls], tools))
    return turns


def _calls(model, tokenizer, turns, device, rank, world, batch_size, max_new, synced_gpus) -> Dict[str, float]:
    """call_exact_match and call_valid (see score_call) of the greedy turns, all ranks together."""
    exact = valid = counted = 0.0
    mine = _rank_share(turns, rank, world)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        texts = _greedy(model, tokenizer, [p for (p, _, _), _ in chunk], device, max_new, synced_gpus)
        for text, ((_, expected, tools), w) in zip(texts, chunk):
            right, ok = score_call(text, expected, tools)
            exact, valid, counted = exact + w * right, valid + w * ok, counted + w
    exact, valid, counted = all_reduce_sum([exact, valid, counted], device)
    return {"call_exact_match": exact / max(counted, 1.0), "call_valid": valid / max(counted, 1.0)}


def score_call(text: str, expected: List[Tuple[str, Dict]], tools) -> Tuple[bool, bool]:
    """(exact, valid) for an assistant turn's text: exact when it makes exactly the expected calls
    (names, and arguments as JSON values, in order); valid when it makes at least one call and each
    names a declared tool with arguments valid against that tool's parameters schema."""
    import jsonschema

    from distlm.tools import parse_calls

    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
    calls = [(c.name, json.loads(c.arguments)) for c in parse_calls(text, list(schemas))[1]]
    validator = jsonschema.Draft202012Validator
    valid = bool(calls) and all(validator(schemas[name]).is_valid(arguments) for name, arguments in calls)
    return calls == expected, valid


def _classification(model, tokenizer, task: TaskData, examples, device, rank, world, batch_size) -> Dict:
    """The head's predictions on the examples (all ranks together): loss, accuracy, macro-F1,
    per-class precision/recall/F1 and the confusion matrix (rows: true label, columns: predicted)."""
    index = {label: i for i, label in enumerate(task.labels)}
    n = len(task.labels)
    confusion = torch.zeros((n, n), dtype=torch.float64, device=device)
    # Temperature scaling (Guo et al., 2017): the softmax temperature with the least held-out NLL,
    # searched on a grid; then the calibration error of the confidences it gives (10 bins).
    grid = torch.logspace(-1.5, 1.5, 61, dtype=torch.float64, device=device)
    nll = torch.zeros_like(grid)
    collected: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    loss_sum = 0.0
    mine = _rank_share(examples, rank, world)
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            ids = tokenizer([p for (p, _), _ in chunk], add_special_tokens=False).input_ids
            batch = {k: v.to(device) for k, v in collate_requests(ids, [index[y] for (_, y), _ in chunk], 0).items()}
            out = model(head=task.name, **batch)
            weights = torch.tensor([w for _, w in chunk], device=device, dtype=torch.float64)
            per_example = torch.nn.functional.cross_entropy(out.logits, batch["class_labels"], reduction="none")
            loss_sum += float((per_example.double() * weights).sum())
            flat = batch["class_labels"] * n + out.logits.argmax(-1)
            confusion += torch.bincount(flat, weights=weights, minlength=n * n).reshape(n, n)
            logits = out.logits.double()
            log_probs = torch.log_softmax(logits[None] / grid[:, None, None], dim=-1)
            picked = log_probs.gather(-1, batch["class_labels"][None, :, None].expand(len(grid), -1, 1))[..., 0]
            nll -= (picked * weights).sum(-1)
            collected.append((logits, batch["class_labels"], weights))
    totals = all_reduce_sum([loss_sum, *confusion.flatten().tolist(), *nll.tolist()], device)
    loss_sum, confusion = totals[0], torch.tensor(totals[1 : 1 + n * n], dtype=torch.float64).reshape(n, n)
    temperature = float(grid[int(torch.tensor(totals[1 + n * n :]).argmin())])
    bins = torch.zeros((3, 10), dtype=torch.float64, device=device)  # weight, confidence, correct per bin
    for logits, labels, weights in collected:
        confidence, predicted = torch.softmax(logits / temperature, -1).max(-1)
        slot = (confidence * 10).long().clamp(max=9)
        for row, value in enumerate((weights, confidence * weights, (predicted == labels).double() * weights)):
            bins[row].index_add_(0, slot, value)
    weight, conf, correct = torch.tensor(all_reduce_sum(bins.flatten().tolist(), device)).reshape(3, 10)
    ece = float((conf - correct).abs().sum() / weight.sum().clamp(min=1))
    metrics = classification_metrics(confusion, task.labels, loss_sum) | {"temperature": temperature, "ece": ece}
    return {
        "metrics": metrics,
        "labels": task.labels,
        "confusion": confusion.long().tolist(),
        "temperature": temperature,
    }


def classification_metrics(confusion: torch.Tensor, labels: List[str], loss_sum: float = 0.0) -> Dict[str, float]:
    """Accuracy, macro-F1 and per-class precision/recall/F1 from a confusion matrix (rows: true)."""
    total = float(confusion.sum())
    hits = confusion.diag()
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), torch.zeros_like(hits))
    recall = torch.where(actual > 0, hits / actual.clamp(min=1), torch.zeros_like(hits))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0 * hits)
    metrics = {
        "loss": loss_sum / max(total, 1.0),
        "accuracy": float(hits.sum()) / max(total, 1.0),
        "macro_f1": float(f1.mean()),
    }
    metrics["score"] = metrics["accuracy"]
    for i, label in enumerate(labels):
        metrics |= {
            f"precision/{label}": float(precision[i]),
            f"recall/{label}": float(recall[i]),
            f"f1/{label}": float(f1[i]),
        }
    return metrics


REPORT = "eval_report.json"


def write_report(run_dir: str, step: int, reports: Dict[str, Dict]) -> None:
    """<run>/eval_report.json: the newest evaluation's confusion matrices (written whole, then renamed)."""
    import json
    import os
    from pathlib import Path

    path = Path(run_dir) / REPORT
    tmp = path.with_name(f".{REPORT}.tmp")
    tmp.write_text(json.dumps({"step": step, "tasks": reports}, indent=2))
    os.replace(tmp, path)


def _generate_texts(model, tokenizer, prompts: List[str], max_new: int, batch_size: int = 16) -> List[str]:
    """Greedy answers to the prompts with the model's active adapter."""
    texts = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            texts += _greedy(model, tokenizer, prompts[start : start + batch_size], "cpu", max_new, False)
    return texts


def evaluate_agent(model, tokenizer, tasks: Dict[str, TaskData], cfg: TasksConfig, agent, activate) -> Dict[str, float]:
    """End to end through the agent, in this process: each held-out example of every task goes where
    the router sends it (or to the fallback below the agent's min_confidence), and the answer of that
    layer is scored against the example's target (exact match; for a classification, the label).
    eval/agent/<task>/score next to the oracle's eval/<task>/score (the example's own layer)."""
    metrics: Dict[str, float] = {}
    routed_right = counted = 0
    from distlm.heads import language_model

    lm = language_model(model)
    for name, task in tasks.items():
        if name == ROUTER:
            continue
        examples = task.eval[: cfg.eval_examples]
        ids = tokenizer([p for p, _ in examples], add_special_tokens=False).input_ids
        routes = [r for start in range(0, len(ids), 32) for r in agent.route(ids[start : start + 32])]
        routed_right += sum(r.chosen == name for r in routes)
        counted += len(routes)
        answers: List[str] = [""] * len(examples)
        for layer in dict.fromkeys(r.task for r in routes):
            rows = [i for i, r in enumerate(routes) if r.task == layer]
            if layer is not None and tasks[layer].is_classification:
                labels = agent.classify(layer, [ids[i] for i in rows])
                texts = [label for label, _ in labels]
            else:
                max_new = cfg.tasks[name].max_new_tokens if name in cfg.tasks else 16
                if layer is None:  # the base model: every adapter off
                    context = lm.disable_adapter() if hasattr(lm, "peft_config") else contextlib.nullcontext()
                else:
                    activate(layer)
                    context = contextlib.nullcontext()
                with context:
                    texts = _generate_texts(lm, tokenizer, [str(examples[i][0]) for i in rows], max_new)
            for i, text in zip(rows, texts):
                answers[i] = text
        correct = sum(a.strip() == target.strip() for a, (_, target) in zip(answers, examples))
        metrics[f"eval/agent/{name}/score"] = correct / max(len(examples), 1)
        metrics[f"eval/agent/{name}/routed_right"] = sum(r.chosen == name for r in routes) / max(len(routes), 1)
    names = [n for n in tasks if n != ROUTER]
    metrics["eval/agent/mean_score"] = sum(metrics[f"eval/agent/{n}/score"] for n in names) / len(names)
    metrics["eval/agent/routing_accuracy"] = routed_right / max(counted, 1)
    return metrics


def evaluate_export(
    export_dir: str,
    cfg: TasksConfig,
    seed: int,
    min_confidence: float = 0.5,
    fallback=None,
    evaluated: Optional[Dict[str, float]] = None,
):
    """(metrics, reports) of an export on its tasks, in this process: the same per-task evaluation as
    training (each example through its own task's layer), and, when the export has a router, the
    agent end to end. `evaluated`: training's own evaluation of the exported step (a metrics.jsonl
    record), whose per-task numbers are taken rather than computed a second time."""
    from transformers import AutoTokenizer

    from distlm.agent import Agent, Heads
    from distlm.data.tasks import load_tasks
    from distlm.export import find_export, load_exported
    from distlm.heads import attach_heads

    found = find_export(export_dir)
    adapters = list(found.adapters)
    lm = load_exported(found.path, adapters)
    tokenizer = AutoTokenizer.from_pretrained(found.path)
    tasks = load_tasks(cfg, tokenizer, seed)
    heads = Heads(found.path)
    missing = [n for n, t in tasks.items() if t.is_classification and n not in heads.layers]
    if missing:
        from distlm.config import ConfigError

        raise ConfigError(f"{found.path} has no head for the classification task(s) {missing}: evaluate other tasks")
    model = attach_heads(lm, heads) if heads.layers else lm

    def activate(task: str) -> None:
        if task in adapters:
            lm.set_adapter(task)
        elif "shared" in adapters:
            lm.set_adapter("shared")

    reports: Dict[str, Dict] = {}
    if evaluated is None:
        metrics = evaluate_tasks(model, tokenizer, tasks, cfg, "cpu", activate=activate, reports=reports)
    else:
        metrics = {k: v for k, v in evaluated.items() if k.startswith("eval/") or k == "val/loss"}
    if heads.router is not None:
        agent = Agent(lm, heads, pad_id(tokenizer), min_confidence, fallback)
        metrics |= evaluate_agent(model, tokenizer, tasks, cfg, agent, activate)
    return metrics, reports, tasks, adapters
