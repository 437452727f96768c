"""Dynamic batching per loaded variant.

Requests queue per variant; one worker task takes the oldest request plus
whatever else is already waiting (up to ``max_batch`` rows), runs them as one
batch on the node's compute executor and splits the answers. The queue is
bounded: a full queue is refused at once with :class:`~mesh.errors.Overloaded`
rather than left to time out.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from mesh.errors import MeshError, Overloaded, Unavailable

__all__ = ["BatchResult", "Batcher"]

RunFn = Callable[[list[np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True, slots=True)
class BatchResult:
    outputs: list[np.ndarray]
    queue_ms: float
    compute_ms: float
    batch_rows: int


@dataclass(slots=True)
class _Pending:
    inputs: list[np.ndarray]
    rows: int
    enqueued: float
    future: asyncio.Future[BatchResult]


class Batcher:
    """One queue and one worker for one loaded variant. An async context manager."""

    def __init__(self, name: str, run: RunFn, executor: Executor, *, max_batch: int,
                 max_queue: int) -> None:
        self.name = name
        self._run = run
        self._executor = executor
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.in_flight = 0
        self.batches = 0
        self.served = 0

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return len(self._queue) + self.in_flight

    async def __aenter__(self) -> Batcher:
        self._task = asyncio.create_task(self._worker(), name=f"batcher:{self.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(Unavailable(f"variant {self.name} is shutting down"))

    async def submit(self, inputs: list[np.ndarray]) -> BatchResult:
        if self._task is None:
            raise Unavailable(f"variant {self.name} is not running")
        if len(self._queue) >= self.max_queue:
            raise Overloaded(
                f"queue for {self.name} is full ({self.max_queue} waiting); retry shortly",
                retry_after_s=0.05,
            )
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(inputs, int(inputs[0].shape[0]), time.perf_counter(), future))
        self._wakeup.set()
        return await future

    def _take_batch(self) -> list[_Pending]:
        batch = [self._queue.popleft()]
        rows = batch[0].rows
        while self._queue and rows + self._queue[0].rows <= self.max_batch:
            item = self._queue.popleft()
            batch.append(item)
            rows += item.rows
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [p for p in self._take_batch() if not p.future.cancelled()]
            if not batch:
                continue
            self.in_flight = len(batch)
            started = time.perf_counter()
            try:
                if len(batch) == 1:
                    joined = batch[0].inputs
                else:
                    joined = [np.concatenate([p.inputs[i] for p in batch])
                              for i in range(len(batch[0].inputs))]
                outputs = await loop.run_in_executor(self._executor, self._run, joined)
            except MeshError as exc:
                self._fail(batch, exc)
                continue
            except Exception as exc:  # a runtime failure must not kill the worker
                self._fail(batch, Unavailable(f"variant {self.name} failed to run: {exc}"))
                continue
            finally:
                self.in_flight = 0
            done = time.perf_counter()
            compute_ms = (done - started) * 1000
            rows = sum(p.rows for p in batch)
            self.batches += 1
            offset = 0
            for p in batch:
                part = [o[offset:offset + p.rows] for o in outputs]
                offset += p.rows
                self.served += 1
                if not p.future.done():
                    p.future.set_result(
                        BatchResult(part, (started - p.enqueued) * 1000, compute_ms, rows))

    @staticmethod
    def _fail(batch: list[_Pending], exc: MeshError) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)
