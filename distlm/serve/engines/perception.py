"""The agent's perception for an engine that generates elsewhere (vLLM): the router and the
classification heads on the export's Hugging Face model (distlm.agent), in one thread of their
own, and requests that arrive in the same turn of the event loop perceived in one batch.

    request for "<run>" -> the router (the base's first task.router_depth layers) -> its task
        -> a classification task: its head's label, here
        -> a generative task: the generating engine, with that task's LoRA

It costs a second copy of the base's weights beside the generating engine's: the router reads
only the first layers, but the heads read the whole model under their adapters.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from distlm.agent import Route
from distlm.config import AgentConfig
from distlm.export import ExportInfo
from distlm.serve.engines.base import EngineError

_ROUTE = "__route__"  # the router's queue; the others are named by their classification task


class Perception:
    def __init__(self, export: ExportInfo, device: str, dtype, agent: Optional[AgentConfig] = None) -> None:
        from distlm.serve.engines.hf import load_model, serving_agent

        model = load_model(export, device, dtype)
        self.agent = serving_agent(model, export, device, dtype, agent)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="distlm-perception")
        self._pending: Dict[str, List[Tuple[Sequence[int], asyncio.Future]]] = {}

    async def route(self, prompt_ids: Sequence[int]) -> Route:
        return await self._ask(_ROUTE, prompt_ids)

    async def classify(self, task: str, prompt_ids: Sequence[int]) -> str:
        label, _ = await self._ask(task, prompt_ids)
        return label

    async def _ask(self, queue: str, prompt_ids: Sequence[int]):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(lambda: asyncio.ensure_future(self._flush()))
        self._pending.setdefault(queue, []).append((list(prompt_ids), future))
        return await future

    async def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        loop = asyncio.get_running_loop()
        for queue, items in pending.items():
            try:
                results = await loop.run_in_executor(self._thread, self._run, queue, [p for p, _ in items])
            except Exception as e:  # noqa: BLE001 - these requests fail, the engine keeps serving
                error = EngineError(f"the agent's router or heads failed: {type(e).__name__}: {e}")
                results = [error] * len(items)
            for (_, future), result in zip(items, results):
                if future.done():  # its client went away
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _run(self, queue: str, prompts: List[List[int]]):
        if queue == _ROUTE:
            return self.agent.route(prompts)
        return self.agent.classify(queue, prompts)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
