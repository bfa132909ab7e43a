"""Evaluation: validation loss for pretraining; per-task loss and exact match for fine-tuning.

Both split the work across ranks and all-reduce the sums. Every rank runs the same
number of forward passes (and generation runs with `synced_gpus` under ZeRO-3),
because a ZeRO-3 forward gathers parameters collectively.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch

from distlm.config import TasksConfig
from distlm.data.batches import IGNORE, collate, encode_example
from distlm.data.tasks import TaskData
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
) -> Dict[str, float]:
    """eval/<task>/loss, eval/<task>/exact_match (greedy generation), their means, val/loss."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    metrics: Dict[str, float] = {}
    was_training = model.training
    model.eval()
    for name, task in tasks.items():
        if activate is not None:
            activate(name)
        examples = task.eval[: cfg.eval_examples]
        # Equal work on every rank: pad this rank's share with weight-0 repeats.
        per_rank = math.ceil(len(examples) / world)
        mine = [
            (examples[i], 1.0) if i < len(examples) else (examples[0], 0.0)
            for i in range(rank, per_rank * world, world)
        ]
        loss_sum = tokens = correct = counted = 0.0
        max_new = cfg.tasks[name].max_new_tokens if name in cfg.tasks else 16
        with torch.no_grad():
            for start in range(0, len(mine), batch_size):
                chunk = mine[start : start + batch_size]
                encoded = [encode_example(tokenizer, p, t) for (p, t), _ in chunk]
                weights = torch.tensor([w for _, w in chunk], device=device)
                batch = {k: v.to(device) for k, v in collate(encoded, pad_id).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                per_token = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
                )
                mask = (labels != IGNORE).float() * weights[:, None]
                loss_sum += float((per_token * mask).sum())
                tokens += float(mask.sum())

                prompts = [ids[: labels.count(IGNORE)] for ids, labels in encoded]  # the masked prefix
                ids, attention = _left_pad(prompts, pad_id)
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=pad_id,
                    eos_token_id=tokenizer.eos_token_id,
                    synced_gpus=synced_gpus,
                )
                for row, ((_, target), w) in enumerate(chunk):
                    text = tokenizer.decode(out[row, ids.shape[1] :], skip_special_tokens=True)
                    correct += w * float(text.strip() == target.strip())
                    counted += w
        loss_sum, tokens, correct, counted = all_reduce_sum([loss_sum, tokens, correct, counted], device)
        metrics[f"eval/{name}/loss"] = loss_sum / max(tokens, 1.0)
        metrics[f"eval/{name}/exact_match"] = correct / max(counted, 1.0)
    names = list(tasks)
    metrics["eval/mean_exact_match"] = sum(metrics[f"eval/{n}/exact_match"] for n in names) / len(names)
    metrics["val/loss"] = sum(metrics[f"eval/{n}/loss"] for n in names) / len(names)
    model.train(was_training)
    return metrics
