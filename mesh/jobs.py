"""Offline batch jobs: a large input run through the mesh at the lowest cost, never in the way.

``job = client.submit("digits", images, deadline_s=600)`` splits the rows into
chunks and sends each as an ``offline`` query with the ``cheapest`` policy:
nodes run offline work only on idle capacity, in large batches, after every
online query waiting (:class:`nodes.batching.Batcher`), and refuse it when
their offline queue is full; the job then waits as long as the node's
``Retry-After`` says and sends again. ``job.progress`` is the share of rows
answered; ``job.result()`` the outputs, in input order, once every chunk is
in. A job that cannot finish by its deadline fails with
:class:`~mesh.errors.MeshTimeout` naming how far it got.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from mesh.errors import ClientError, MeshError, MeshTimeout, Overloaded, Unavailable


class _Querying(Protocol):
    """What a job needs of a blocking client (mesh.client.Client)."""

    def infer(self, task: str, *inputs: Any, **slo: Any) -> Any: ...

    def close(self) -> None: ...


class _AsyncQuerying(Protocol):
    """What a job needs of an asyncio client (mesh.client.AsyncClient)."""

    async def infer(self, task: str, *inputs: Any, **slo: Any) -> Any: ...

__all__ = ["AsyncJob", "Job", "chunks"]

#: Waits between a refused chunk and the next try, when the node gives none.
BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0)


def chunks(inputs: Sequence[np.ndarray], rows: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    """``(first row, inputs[first:first + rows])`` over every input tensor together."""
    total = int(inputs[0].shape[0])
    for start in range(0, total, rows):
        yield start, [x[start:start + rows] for x in inputs]


class _Progress:
    def __init__(self, inputs: Sequence[Any], chunk_rows: int, deadline_s: float | None) -> None:
        if chunk_rows < 1:
            raise ClientError(f"chunk_rows: must be at least 1, got {chunk_rows}")
        self.inputs = [np.asarray(x) for x in inputs]
        if not self.inputs or self.inputs[0].ndim == 0:
            raise ClientError("submit() needs at least one input tensor with rows")
        self.total = int(self.inputs[0].shape[0])
        self.chunk_rows = chunk_rows
        self.done_rows = 0
        self.started = time.monotonic()
        self.deadline = None if deadline_s is None else self.started + deadline_s
        self._parts: dict[int, list[np.ndarray]] = {}
        self.retries = 0

    @property
    def progress(self) -> float:
        """The share of rows answered (0..1)."""
        return self.done_rows / self.total if self.total else 1.0

    def left_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check_deadline(self) -> None:
        left = self.left_s()
        if left is not None and left <= 0:
            raise MeshTimeout(f"offline job missed its deadline with {self.done_rows} of "
                              f"{self.total} rows answered")

    def wait_after(self, exc: MeshError, attempt: int) -> float:
        self.retries += 1
        pause = exc.retry_after_s or BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
        left = self.left_s()
        return pause if left is None else max(min(pause, left), 0.0)

    def add(self, start: int, outputs: list[np.ndarray]) -> None:
        self._parts[start] = outputs
        self.done_rows += int(outputs[0].shape[0])

    def outputs(self) -> list[np.ndarray]:
        ordered = [self._parts[k] for k in sorted(self._parts)]
        return [np.concatenate([part[i] for part in ordered]) for i in range(len(ordered[0]))]


class AsyncJob(_Progress):
    """An offline job on an :class:`~mesh.client.AsyncClient`; started by ``submit``."""

    def __init__(self, client: _AsyncQuerying, task: str, inputs: Sequence[Any], *,
                 deadline_s: float | None, chunk_rows: int, concurrency: int,
                 slo: dict[str, Any]) -> None:
        super().__init__(inputs, chunk_rows, deadline_s)
        self._client, self._task_name, self._slo = client, task, slo
        self._limit = asyncio.Semaphore(max(concurrency, 1))
        self._runner = asyncio.get_running_loop().create_task(self._run())

    @property
    def done(self) -> bool:
        return self._runner.done()

    async def result(self) -> list[np.ndarray]:
        """The outputs, in input order; raises what stopped the job."""
        await self._runner
        return self.outputs()

    def cancel(self) -> None:
        self._runner.cancel()

    async def _run(self) -> None:
        await asyncio.gather(*(self._chunk(start, part)
                               for start, part in chunks(self.inputs, self.chunk_rows)))

    async def _chunk(self, start: int, part: list[np.ndarray]) -> None:
        async with self._limit:
            for attempt in range(1_000_000):
                self.check_deadline()
                try:
                    result = await self._client.infer(self._task_name, *part, offline=True,
                                                      **self._slo)
                except (Overloaded, Unavailable) as exc:  # busy: idle capacity comes back
                    await asyncio.sleep(self.wait_after(exc, attempt))
                    continue
                self.add(start, result.outputs)
                return


class Job(_Progress):
    """An offline job on a blocking :class:`~mesh.client.Client`, run on its own thread
    with its own client (closed when the job ends)."""

    def __init__(self, client: _Querying, task: str, inputs: Sequence[Any], *,
                 deadline_s: float | None, chunk_rows: int, slo: dict[str, Any]) -> None:
        super().__init__(inputs, chunk_rows, deadline_s)
        self._client, self._task_name, self._slo = client, task, slo
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tiermesh-job", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout_s: float | None = None) -> list[np.ndarray]:
        """The outputs, in input order (waits for the job); raises what stopped it."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise MeshTimeout(f"offline job still running ({self.progress:.0%} done)")
        if self._error is not None:
            raise self._error
        return self.outputs()

    def cancel(self) -> None:
        self._cancelled.set()

    def _run(self) -> None:
        try:
            for start, part in chunks(self.inputs, self.chunk_rows):
                for attempt in range(1_000_000):
                    if self._cancelled.is_set():
                        raise ClientError("offline job cancelled")
                    self.check_deadline()
                    try:
                        result = self._client.infer(self._task_name, *part, offline=True,
                                                    **self._slo)
                    except (Overloaded, Unavailable) as exc:
                        time.sleep(self.wait_after(exc, attempt))
                        continue
                    self.add(start, result.outputs)
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for the result
            self._error = exc
        finally:
            self._client.close()  # the job's own connection
