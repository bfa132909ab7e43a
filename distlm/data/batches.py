"""What each optimizer step consumes, rank-sharded and resumable.

`PretrainBatches` cuts the token files into fixed-length blocks. `TaskBatches` draws one
task per step from the mixture, then that task's examples: prompt tokens are masked
out of the loss, and each global batch is sorted by length before it is dealt out to
ranks and micro steps, so micro batches hold similar lengths and little padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from distlm.config import TasksConfig, TrainerConfig
from distlm.data.corpus import DataError
from distlm.data.mixture import TaskMixture
from distlm.data.sampler import ResumableSampler
from distlm.data.tasks import ROUTER, TaskData
from distlm.data.tokens import PreparedData, TokenBlocks

IGNORE = -100  # label value the loss skips


@dataclass
class Step:
    task: Optional[str]
    micro_batches: List[Dict[str, torch.Tensor]]
    head: Optional[str] = None  # a classification step: the head that reads the hidden states


class PretrainBatches:
    def __init__(self, data: PreparedData, seq_len: int, tr: TrainerConfig, rank: int, world: int):
        self.train = TokenBlocks(data.train_path, data.dtype, seq_len)
        self.val = TokenBlocks(data.val_path, data.dtype, seq_len)
        self.sampler = ResumableSampler(
            len(self.train), tr.global_batch_size, tr.micro_batch_size, rank, world, tr.seed
        )

    def next(self, step: int) -> Step:
        micro = []
        for indices in self.sampler.next_batch():
            ids = torch.stack([self.train[i] for i in indices])
            micro.append({"input_ids": ids, "labels": ids})
        return Step(None, micro)

    def state_dict(self) -> Dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.sampler.load_state_dict(state)


def encode_example(tokenizer, prompt: str, target: str) -> Tuple[List[int], List[int]]:
    """(input ids, labels): the target and a closing EOS are learned, the prompt is not, except
    the earlier assistant turns a chat prompt marks to be learned (data/tasks.py: Turns,
    train_on=all): the tokens that lie wholly inside one of them."""
    return encode_examples(tokenizer, [(prompt, target)])[0]


def _encode_batch(tokenizer, texts: List[str], offsets: bool = False):
    """(ids, character offsets or None) of each text without special tokens: a fast tokenizer's
    own batch encoder when there is one (what `tokenizer(texts)` calls, without converting every
    field of every encoding to Python lists), else the tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings] if offsets else None
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    return encoded.input_ids, encoded.offset_mapping if offsets else None


def encode_examples(tokenizer, examples: List[Tuple[str, str]]) -> List[Tuple[List[int], List[int]]]:
    """`encode_example` for many examples in two batched tokenizer calls (the tokenizer's own
    threads; one call per example spends most of its time outside the tokenizer)."""
    if not examples:
        return []
    prompts, offsets = _encode_batch(tokenizer, [str(p) for p, _ in examples], offsets=True)
    targets, _ = _encode_batch(tokenizer, [t for _, t in examples])
    out = []
    for k, ((prompt, _), target_ids) in enumerate(zip(examples, targets)):
        prompt_ids = prompts[k]
        prompt_labels = [IGNORE] * len(prompt_ids)
        spans = getattr(prompt, "spans", ()) if getattr(prompt, "learned", False) else ()
        if spans:
            offsets_k = np.asarray(offsets[k], dtype=np.int64).reshape(-1, 2)
            start, end = offsets_k[:, 0], offsets_k[:, 1]
            inside = np.zeros(len(prompt_ids), dtype=bool)
            for a, b in spans:
                inside |= (a <= start) & (end <= b)
            for i in np.flatnonzero(inside & (end > start)):
                prompt_labels[i] = prompt_ids[i]
        target_ids = target_ids + [tokenizer.eos_token_id]
        out.append((prompt_ids + target_ids, prompt_labels + target_ids))
    return out


def collate_requests(requests: List[List[int]], labels: List[int], pad_id: int) -> Dict[str, torch.Tensor]:
    """A classification batch: the requests right-padded (masked from attention) and their classes."""
    width = max(len(ids) for ids in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for row, x in enumerate(requests):
        ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "class_labels": torch.tensor(labels, dtype=torch.long)}


def pad_id(tokenizer) -> int:
    """The padding id: the tokenizer's, else its end-of-sequence token (padding is masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(examples: List[Tuple[List[int], List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked from attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def only_target_logits(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The same loss with the output head applied only where a target token is predicted
    (transformers' boolean `logits_to_keep`): with a large vocabulary the head is a good part of
    the model's compute, and prompts carry no loss."""
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE  # the logit at position t predicts token t + 1
    targets = labels[:, 1:][keep[:, :-1]]
    # `shift_labels` is what the loss reads; `labels` only switches the loss on.
    return {**batch, "logits_to_keep": keep, "labels": targets, "shift_labels": targets}


@dataclass
class EncodedTasks:
    """Every task's training examples as token ids, built once on the driver and handed to the
    workers through Ray's object store (each worker would otherwise tokenize them all again)."""

    tasks: Dict[str, TaskData]
    examples: Dict[str, List[Tuple[List[int], Any]]]  # (ids, labels) or (request ids, class index)
    too_long: Dict[str, int]  # examples dropped as longer than data.seq_len


def encode_tasks(tasks: Dict[str, TaskData], tokenizer, seq_len: int, global_batch_size: int) -> EncodedTasks:
    examples: Dict[str, List[Tuple[List[int], Any]]] = {}
    too_long: Dict[str, int] = {}
    for name, task in tasks.items():
        if task.is_classification:
            index = {label: i for i, label in enumerate(task.labels)}
            ids, _ = _encode_batch(tokenizer, [str(p) for p, _ in task.train])
            encoded = [(x, index[label]) for x, (_, label) in zip(ids, task.train)]
        else:
            encoded = encode_examples(tokenizer, task.train)
        kept = [e for e in encoded if len(e[0]) <= seq_len]
        too_long[name] = len(encoded) - len(kept)
        if len(kept) < global_batch_size:
            raise DataError(
                f"task {name!r} has {len(kept)} training examples within data.seq_len={seq_len} "
                f"({too_long[name]} longer ones dropped), fewer than trainer.global_batch_size={global_batch_size}: "
                "add examples, raise data.seq_len or lower the batch size"
            )
        examples[name] = kept
    return EncodedTasks(tasks, examples, too_long)


class TaskBatches:
    def __init__(
        self,
        tasks: Dict[str, TaskData],
        tokenizer,
        cfg: TasksConfig,
        tr: TrainerConfig,
        seq_len: int,
        rank: int,
        world: int,
        encoded: Optional[EncodedTasks] = None,  # the driver's encode_tasks; built here when None
    ):
        self.rank, self.world, self.micro = rank, world, tr.micro_batch_size
        self.pad_id = pad_id(tokenizer)
        self.classification = {name: task.labels for name, task in tasks.items() if task.is_classification}
        encoded = encoded or encode_tasks(tasks, tokenizer, seq_len, tr.global_batch_size)
        self.examples, self.too_long = encoded.examples, encoded.too_long
        router = ROUTER if ROUTER in self.examples else None
        self.mixture = TaskMixture(cfg, {n: len(e) for n, e in self.examples.items()}, tr.seed, router)
        # Each task's sampler walks the whole global batch; ranks take their share below.
        self.samplers = {
            name: ResumableSampler(len(ex), tr.global_batch_size, tr.global_batch_size, 0, 1, tr.seed + i)
            for i, (name, ex) in enumerate(self.examples.items())
        }
        self.steps_per_task = {name: 0 for name in self.examples}

    def next(self, step: int) -> Step:
        task = self.mixture.task_for_step(step)
        (indices,) = self.samplers[task].next_batch()
        examples = sorted((self.examples[task][i] for i in indices), key=lambda e: len(e[0]))
        per_micro_step = self.micro * self.world
        micro = []
        for start in range(0, len(examples), per_micro_step):
            mine = examples[start + self.rank * self.micro : start + (self.rank + 1) * self.micro]
            if task in self.classification:
                micro.append(collate_requests([x for x, _ in mine], [y for _, y in mine], self.pad_id))
            else:
                micro.append(only_target_logits(collate(mine, self.pad_id)))
        self.steps_per_task[task] += 1
        return Step(task, micro, head=task if task in self.classification else None)

    def shares(self) -> Dict[str, float]:
        """Realised share of steps per task so far (logged as mix/<task>)."""
        total = max(1, sum(self.steps_per_task.values()))
        return {name: count / total for name, count in self.steps_per_task.items()}

    def state_dict(self) -> Dict:
        return {
            "samplers": {n: s.state_dict() for n, s in self.samplers.items()},
            "steps_per_task": dict(self.steps_per_task),
        }

    def load_state_dict(self, state: Dict) -> None:
        if set(state["samplers"]) != set(self.samplers):
            raise DataError(
                f"checkpoint was trained on tasks {sorted(state['samplers'])}, this run has {sorted(self.samplers)}: "
                "resume with the same task set"
            )
        for name, s in state["samplers"].items():
            self.samplers[name].load_state_dict(s)
        self.steps_per_task = dict(state["steps_per_task"])
