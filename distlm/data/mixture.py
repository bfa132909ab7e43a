"""Task mixtures: which task each optimizer step trains on.

The task of step s is a pure function of (seed, s), identical on every rank, so a
resumed run continues the same task sequence with no state beyond the step.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional

from distlm.config import TasksConfig


def mixture_weights(cfg: TasksConfig, sizes: Dict[str, int]) -> Dict[str, float]:
    """Normalised sampling probability per task for the configured strategy."""
    names = list(sizes)
    if cfg.mixture == "proportional":
        raw = {n: float(sizes[n]) for n in names}
    elif cfg.mixture == "temperature":
        # T=1 is proportional; large T tends to uniform (up-samples small tasks).
        raw = {n: float(sizes[n]) ** (1.0 / cfg.temperature) for n in names}
    elif cfg.mixture == "weights":
        raw = {n: float(cfg.weights.get(n, 0.0)) for n in names}
    else:  # round_robin
        raw = {n: 1.0 for n in names}
    total = sum(raw.values())
    return {n: w / total for n, w in raw.items()}


class TaskMixture:
    """`router`: the name of the router's task, which takes task.router_share of the steps; the
    other steps follow the strategy."""

    def __init__(self, cfg: TasksConfig, sizes: Dict[str, int], seed: int, router: Optional[str] = None):
        self.router, self.router_share = router, cfg.router_share if router else 0.0
        sizes = {name: size for name, size in sizes.items() if name != router}
        self.names: List[str] = list(sizes)
        self.weights = mixture_weights(cfg, sizes)
        self.round_robin = cfg.mixture == "round_robin"
        self.seed = seed
        self._cum = []
        acc = 0.0
        for n in self.names:
            acc += self.weights[n]
            self._cum.append(acc)

    def task_for_step(self, step: int) -> str:
        if self.router is not None and random.Random(f"{self.seed}-router-{step}").random() < self.router_share:
            return self.router
        if self.round_robin:
            return self.names[step % len(self.names)]
        u = random.Random(f"{self.seed}-{step}").random() * self._cum[-1]
        for name, edge in zip(self.names, self._cum):
            if u < edge:
                return name
        return self.names[-1]
