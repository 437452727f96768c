"""The per-variant batcher: requests that wait together run together."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mesh.errors import CannotMeetDeadline, InputRejected, Overloaded, Unavailable
from mesh.registry import Profile
from nodes.batching import Batcher, BatchPolicy, BatchSettings, _Pending


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
            with pytest.raises(InputRejected, match="could not run this input") as info:
                await batcher.submit([np.ones((1, 1), np.float32)])
            ok = await batcher.submit([np.ones((1, 1), np.float32)])
    assert ok.outputs[0].shape == (1, 1)
    # what the runtime said stays in the node's log: clients see no internals
    assert "bad kernel" not in info.value.message and "RuntimeError" not in info.value.message
    assert info.value.status == 422


async def test_one_bad_request_fails_alone_and_its_batch_mates_are_answered() -> None:
    """A batch whose run fails is run again request by request; only the bad one fails."""
    model = _GatedModel()

    def picky(inputs: list[np.ndarray]) -> list[np.ndarray]:
        x = model(inputs)[0]
        if np.isnan(x).any():  # stands for an input the runtime cannot digest
            raise ValueError("/opt/model/kernels.cc:42 index out of range")
        return [x]

    with ThreadPoolExecutor(1) as pool:
        async with Batcher("m", picky, pool, max_batch=8, max_queue=16) as batcher:
            model.gate.clear()
            first = asyncio.create_task(batcher.submit([np.ones((1, 1), np.float32)]))
            await asyncio.sleep(0.05)  # running alone, holding the compute thread
            rows = [np.full((1, 1), i, np.float32) for i in range(5)]
            rows[2] = np.full((1, 1), np.nan, np.float32)
            queued = [asyncio.create_task(batcher.submit([r])) for r in rows]
            await asyncio.sleep(0.05)
            model.gate.set()  # the five queued run as one batch, which fails on rows[2]
            results = await asyncio.gather(first, *queued, return_exceptions=True)
    assert not isinstance(results[0], BaseException)
    bad = results[3]
    assert isinstance(bad, InputRejected) and "kernels.cc" not in bad.message
    for i in (0, 1, 3, 4):
        answer = results[1 + i]
        assert not isinstance(answer, BaseException), answer
        assert float(answer.outputs[0][0, 0]) == 2.0 * i


async def test_a_query_without_slo_is_refused_when_the_queue_holds_too_much_work() -> None:
    """The queue for queries without a deadline is bounded by time, not only by length."""
    model = _GatedModel()
    profile = Profile(batch_ms={1: 100.0, 4: 100.0}, cold_start_ms=1.0)
    policy = BatchPolicy(1, profile, BatchSettings(max_queue_wait_ms=350.0))
    with ThreadPoolExecutor(1) as pool:
        async with Batcher("m", model, pool, max_batch=1, max_queue=100,
                           policy=policy) as batcher:
            model.gate.clear()
            admitted = [asyncio.create_task(batcher.submit([np.ones((1, 1), np.float32)]))
                        for _ in range(3)]
            await asyncio.sleep(0.05)
            with pytest.raises(Overloaded, match="350 ms cap") as info:
                await batcher.submit([np.ones((1, 1), np.float32)])
            assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
            model.gate.set()
            await asyncio.gather(*admitted)


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


# --------------------------------------------------------------------------- the policy

# GPU-like: 10 ms a batch plus 0.01 ms a row (waiting for company pays)
FLAT = Profile(batch_ms={1: 10.01, 32: 10.32})
# CPU-like: the digits CNN on one thread (every row costs about as much as a lone request)
STEEP = Profile(batch_ms={1: 0.043, 8: 0.186, 32: 0.771})


def _policy(profile: Profile = FLAT, max_batch: int = 32, **kw: float) -> BatchPolicy:
    # margins off so the arithmetic is exact
    settings = BatchSettings(**{"margin_frac": 0.0, "margin_ms": 0.0, "max_wait_ms": 2.0, **kw})
    return BatchPolicy(max_batch, profile, settings)


def _pending(enqueued: float, deadline: float | None, rows: int = 1) -> _Pending:
    return _Pending([np.zeros((rows, 1), np.float32)], rows, enqueued, deadline, None)  # type: ignore[arg-type]


def test_a_batch_closes_when_waiting_longer_would_make_its_oldest_request_late() -> None:
    policy = _policy()
    queue = [_pending(0.000, deadline=0.0175), _pending(0.001, deadline=0.100)]
    # three rows take 10.03 ms: the oldest (due at 17.5 ms) can wait until 7.47 ms
    n, wake_at = policy.decide(queue, 0.002, busy=True, gap_s=0.0015, last_arrival=0.001)
    assert n == 0 and wake_at == pytest.approx(0.004)  # the next arrival is due first
    close_at = 0.0175 - policy.compute_s(3)
    n, wake_at = policy.decide(queue, 0.002, busy=True, gap_s=0.004, last_arrival=0.001)
    assert n == 0 and wake_at == pytest.approx(close_at)  # the deadline comes first
    n, _ = policy.decide(queue, close_at, busy=True, gap_s=0.004, last_arrival=0.001)
    assert n == 2  # closed at the last moment that keeps the oldest on time
    assert close_at + policy.compute_s(2) <= 0.0175


def test_a_batch_never_grows_past_what_its_tightest_deadline_affords() -> None:
    policy = _policy()
    queue = [_pending(0.0, deadline=0.0112)] + [_pending(0.0, deadline=1.0) for _ in range(30)]
    n, _ = policy.decide(queue, 0.001, busy=True, gap_s=0.001, last_arrival=0.0)
    # 1 ms + (10 + 0.01 n) ms <= 11.2 ms  ->  n <= 20
    assert n == 20
    assert 0.001 + policy.compute_s(n) <= 0.0112 < 0.001 + policy.compute_s(n + 1)


def test_a_full_batch_closes_at_once_and_late_requests_do_not_shrink_it() -> None:
    policy = _policy(max_batch=4)
    queue = [_pending(0.0, deadline=0.0001)] + [_pending(0.0, None) for _ in range(5)]
    n, _ = policy.decide(queue, 0.001, busy=True, gap_s=0.001, last_arrival=0.0)
    assert n == 4  # the first is already late: it runs, but does not cap the batch


def test_requests_without_a_latency_slo_wait_at_most_the_default_cap() -> None:
    policy = _policy(max_wait_ms=2.0)
    queue = [_pending(0.010, None), _pending(0.011, None)]
    n, wake_at = policy.decide(queue, 0.0112, busy=True, gap_s=0.004, last_arrival=0.011)
    assert n == 0 and wake_at == pytest.approx(0.012)  # 10 ms + the 2 ms cap
    n, _ = policy.decide(queue, 0.012, busy=True, gap_s=0.004, last_arrival=0.011)
    assert n == 2


def test_nothing_waits_when_the_node_is_not_busy_or_waiting_would_not_pay() -> None:
    queue = [_pending(0.0, deadline=1.0), _pending(0.0, deadline=1.0)]
    n, _ = _policy().decide(queue, 0.0, busy=False, gap_s=0.0001, last_arrival=0.0)
    assert n == 2
    # the CNN on a CPU: one more row saves ~20 us of compute, less than 2 x 50 us of waiting
    n, _ = _policy(STEEP).decide(queue, 0.0, busy=True, gap_s=0.00005, last_arrival=0.0)
    assert n == 2


async def test_a_request_the_queue_would_make_late_is_refused_at_once() -> None:
    model = _GatedModel()
    # the profile says a batch takes a second: the one running now ends in about a second
    policy = BatchPolicy(4, Profile(batch_ms={1: 1000.0, 4: 1000.0}),
                         BatchSettings(margin_frac=0.0, margin_ms=0.0))
    with ThreadPoolExecutor(1) as pool:
        async with Batcher("m", model, pool, max_batch=4, max_queue=64, policy=policy) as batcher:
            running = asyncio.create_task(batcher.submit([np.ones((1, 1), np.float32)]))
            for _ in range(3):
                await asyncio.sleep(0)  # the worker takes it and holds it
            assert batcher.in_flight == 1
            with pytest.raises(CannotMeetDeadline, match="place it elsewhere") as info:
                await batcher.submit([np.ones((1, 1), np.float32)], budget_ms=1500.0)
            assert info.value.status == 503 and info.value.retry_after_s
            queued = asyncio.create_task(
                batcher.submit([np.ones((1, 1), np.float32)], budget_ms=60_000.0))
            await asyncio.sleep(0.01)
            assert batcher.depth == 2
            model.gate.set()
            await asyncio.gather(running, queued)


async def test_a_variant_running_slower_than_profiled_is_admitted_by_what_it_measures() -> None:
    """Profiled at 3 ms, it takes 30 ms here (a contended node): admission learns that."""
    import time

    def slow(inputs: list[np.ndarray]) -> list[np.ndarray]:
        time.sleep(0.03)
        return [inputs[0]]

    profile = Profile(batch_ms={1: 3.0, 8: 3.0}, cold_start_ms=1.0)
    with ThreadPoolExecutor(1) as pool:
        async with Batcher("m", slow, pool, max_batch=8, max_queue=16,
                           policy=BatchPolicy(8, profile)) as batcher:
            x = [np.ones((1, 1), np.float32)]
            await batcher.submit(x, budget_ms=15)  # the profile says it fits: admitted
            for _ in range(8):
                await batcher.submit(x)
            assert batcher.slowdown > 5
            with pytest.raises(CannotMeetDeadline):
                await batcher.submit(x, budget_ms=15)
            # unobserved, the estimate relaxes back so that the variant is measured again
            batcher.slowdown_half_life_s = 0.01
            await asyncio.sleep(0.2)
            assert batcher.slowdown < 1.1


async def test_offline_work_runs_on_idle_capacity_and_yields_to_online_requests() -> None:
    model = _GatedModel()
    profile = Profile(batch_ms={1: 1.0, 8: 1.0}, cold_start_ms=1.0)
    with ThreadPoolExecutor(1) as pool:
        async with Batcher("m", model, pool, max_batch=8, max_queue=64,
                           policy=BatchPolicy(8, profile)) as batcher:
            model.gate.clear()
            first = asyncio.create_task(batcher.submit([np.ones((1, 1), np.float32)]))
            await asyncio.sleep(0.05)  # runs alone, holding the compute thread
            offline = [asyncio.create_task(batcher.submit([np.full((1, 1), i, np.float32)],
                                                          offline=True)) for i in range(20)]
            await asyncio.sleep(0.01)
            online = asyncio.create_task(batcher.submit([np.full((1, 1), 99, np.float32)]))
            await asyncio.sleep(0.01)
            model.gate.set()
            await asyncio.gather(first, online, *offline)
    # after the first batch: the online request alone, then the offline work in full batches
    assert model.batches[:2] == [1, 1]
    assert model.batches[2:] == [8, 8, 4]
    assert [float(t.result().outputs[0][0, 0]) for t in offline] == [2.0 * i for i in range(20)]


async def test_a_burst_that_made_admission_strict_does_not_refuse_everything_for_good() -> None:
    """The loop-lag estimate is learned only from admitted queries; left alone it relaxes."""
    model = _GatedModel()
    model.gate.set()
    profile = Profile(batch_ms={1: 1.0, 8: 1.0}, cold_start_ms=1.0)
    with ThreadPoolExecutor(1) as pool:
        async with Batcher("m", model, pool, max_batch=8, max_queue=16,
                           policy=BatchPolicy(8, profile)) as batcher:
            batcher._learn_lag(0.5)  # what a saturated loop looks like: 500 ms
            batcher._learn_lag(0.5)
            with pytest.raises(CannotMeetDeadline):
                await batcher.submit([np.ones((1, 1), np.float32)], budget_ms=20)
            batcher.slowdown_half_life_s = 0.01
            await asyncio.sleep(0.3)  # nothing admitted, nothing measured: it relaxes
            await batcher.submit([np.ones((1, 1), np.float32)], budget_ms=20)


async def test_a_compute_thread_starved_of_cpu_is_measured() -> None:
    """A run that waits (sleeps: no CPU) most of its time has a low CPU share; one that
    computes throughout has a share near 1."""
    import concurrent.futures
    import time as _time

    def waits(inputs: list[np.ndarray]) -> list[np.ndarray]:
        _time.sleep(0.01)  # off the CPU, as a thread the OS does not schedule
        return [inputs[0] * 2]

    def computes(inputs: list[np.ndarray]) -> list[np.ndarray]:
        end = _time.thread_time() + 0.01
        while _time.thread_time() < end:
            pass
        return [inputs[0] * 2]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for run, low in ((waits, True), (computes, False)):
            batcher = Batcher("v", run, pool, max_batch=4, max_queue=16,
                              policy=BatchPolicy(4, settings=BatchSettings(inline_max_ms=0.0)))
            async with batcher:
                for _ in range(10):
                    await batcher.submit([np.ones((1, 2), np.float32)])
            assert (batcher.cpu_share < 0.5) if low else (batcher.cpu_share > 0.6)
