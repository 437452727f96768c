"""The per-variant batcher: requests that wait together run together."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mesh.errors import Overloaded, Unavailable
from nodes.batching import Batcher


class _GatedModel:
    """Doubles its input; the first batch blocks until released, so others pile up."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()

    def __call__(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if not self.batches:
            self.gate.wait(5)
        self.batches.append(int(inputs[0].shape[0]))
        return [inputs[0] * 2]


async def test_waiting_requests_are_batched_and_answers_split_back() -> None:
    model = _GatedModel()
    with ThreadPoolExecutor(1) as pool:
        async with Batcher("m", model, pool, max_batch=8, max_queue=64) as batcher:
            first = asyncio.create_task(batcher.submit([np.full((1, 2), 1.0, np.float32)]))
            await asyncio.sleep(0.05)
            rest = [asyncio.create_task(batcher.submit([np.full((1, 2), float(i), np.float32)]))
                    for i in range(2, 12)]
            await asyncio.sleep(0.05)
            assert batcher.depth == 11
            model.gate.set()
            results = await asyncio.gather(first, *rest)
    assert model.batches[0] == 1
    assert max(model.batches[1:]) == 8  # max_batch rows per batch
    assert sum(model.batches) == 11
    for i, r in enumerate(results, start=1):
        np.testing.assert_array_equal(r.outputs[0], np.full((1, 2), 2.0 * i))
    assert results[1].batch_rows == 8


async def test_full_queue_is_refused_at_once_with_retry_after() -> None:
    model = _GatedModel()
    with ThreadPoolExecutor(1) as pool:
        async with Batcher("m", model, pool, max_batch=1, max_queue=2) as batcher:
            running = asyncio.create_task(batcher.submit([np.ones((1, 1), np.float32)]))
            await asyncio.sleep(0.05)  # the worker holds this one
            tasks = [running] + [asyncio.create_task(batcher.submit([np.ones((1, 1), np.float32)]))
                                 for _ in range(2)]
            await asyncio.sleep(0.05)
            with pytest.raises(Overloaded, match="queue for m is full") as info:
                await batcher.submit([np.ones((1, 1), np.float32)])
            assert info.value.retry_after_s is not None and info.value.status == 429
            model.gate.set()
            await asyncio.gather(*tasks)


async def test_a_failing_model_fails_its_batch_and_the_worker_survives() -> None:
    calls = []

    def flaky(inputs: list[np.ndarray]) -> list[np.ndarray]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bad kernel")
        return [inputs[0]]

    with ThreadPoolExecutor(1) as pool:
        async with Batcher("m", flaky, pool, max_batch=4, max_queue=8) as batcher:
            with pytest.raises(Unavailable, match="failed to run: bad kernel"):
                await batcher.submit([np.ones((1, 1), np.float32)])
            ok = await batcher.submit([np.ones((1, 1), np.float32)])
    assert ok.outputs[0].shape == (1, 1)


async def test_shutdown_fails_waiting_requests_instead_of_hanging() -> None:
    model = _GatedModel()
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher("m", model, pool, max_batch=1, max_queue=8)
        await batcher.__aenter__()
        running = asyncio.create_task(batcher.submit([np.ones((1, 1), np.float32)]))
        waiting = asyncio.create_task(batcher.submit([np.ones((1, 1), np.float32)]))
        await asyncio.sleep(0.05)
        await batcher.__aexit__(None, None, None)
        model.gate.set()
        with pytest.raises(Unavailable, match="shutting down"):
            await waiting
        running.cancel()
