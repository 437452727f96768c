"""The compute workers of one loaded variant: one :class:`~nodes.batching.Batcher` each.

Placement gives a hot variant more than one worker on a node (where the
hardware has slots to spare). Each worker is a batcher over its own session
(a TFLite interpreter, for one, must not be shared between threads), so
batches of one variant run side by side on the node's compute executor. A
query goes to the worker that would answer it soonest (its predicted wait);
with one worker the pool adds nothing to the query path.

A worker taken away stops receiving queries at once and closes once what it
holds has run, so scaling down never fails a query.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from mesh.errors import Unavailable
from nodes.batching import Batcher, BatchResult

__all__ = ["WorkerPool"]


class WorkerPool:
    """One variant's workers. Quacks like a :class:`Batcher` for the agent and the manager."""

    def __init__(self, name: str, first: Batcher) -> None:
        self.name = name
        self._active: list[Batcher] = [first]
        self._retiring: set[asyncio.Task[None]] = set()
        self._draining: list[Batcher] = []
        self._retired_served = 0
        self._retired_batches = 0

    # ------------------------------------------------------------------ size
    @property
    def workers(self) -> int:
        """Workers taking new queries."""
        return len(self._active)

    def add(self, batcher: Batcher) -> None:
        """One more worker (started already)."""
        self._active.append(batcher)

    def retire(self) -> bool:
        """Take the newest worker out of service (never the last); False when only one is left.
        It closes in the background once its queue has run."""
        if len(self._active) <= 1:
            return False
        batcher = self._active.pop()
        self._draining.append(batcher)
        task = asyncio.create_task(self._drain(batcher), name=f"retire:{self.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return True

    async def _drain(self, batcher: Batcher) -> None:
        while not batcher.idle:
            await asyncio.sleep(0.01)
        await batcher.__aexit__(None, None, None)
        self._draining.remove(batcher)
        self._retired_served += batcher.served
        self._retired_batches += batcher.batches

    # ------------------------------------------------------------------ what the agent reads
    @property
    def depth(self) -> int:
        return sum(b.depth for b in self._active) + sum(b.depth for b in self._draining)

    @property
    def idle(self) -> bool:
        return all(b.idle for b in self._active) and all(b.idle for b in self._draining)

    @property
    def running(self) -> bool:
        return bool(self._active) and self._active[0].running

    @property
    def served(self) -> int:
        return self._retired_served + sum(b.served for b in (*self._active, *self._draining))

    @property
    def batches(self) -> int:
        return self._retired_batches + sum(b.batches for b in (*self._active, *self._draining))

    @property
    def cpu_share(self) -> float:
        """The least CPU share of its workers' runs (:attr:`Batcher.cpu_share`)."""
        return min(b.cpu_share for b in self._active) if self._active else 1.0

    @property
    def slowdown(self) -> float:
        """Measured compute time over the profiled one, the worst of its workers."""
        return max(b.slowdown for b in self._active) if self._active else 1.0

    # ------------------------------------------------------------------ serving
    async def submit(self, inputs: list[np.ndarray], *, budget_ms: float | None = None,
                     offline: bool = False, alone: bool = False) -> BatchResult:
        """To the worker that would answer soonest (see :meth:`Batcher.submit`)."""
        active = self._active
        if len(active) == 1:
            return await active[0].submit(inputs, budget_ms=budget_ms, offline=offline,
                                          alone=alone)
        if not active:
            raise Unavailable(f"variant {self.name} is not running", retry_after_s=1.0)
        now = time.perf_counter()
        rows = int(inputs[0].shape[0])
        best = min(active, key=lambda b: (b.predicted_wait_s(now, rows), b.depth))
        return await best.submit(inputs, budget_ms=budget_ms, offline=offline,
                                 alone=alone and best.idle)

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> WorkerPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        batchers, self._active = [*self._active, *self._draining], []
        self._draining = []
        for batcher in batchers:
            await batcher.__aexit__(None, None, None)
