"""Deadline-aware dynamic batching per loaded variant.

Requests queue per variant; one worker task forms batches from the head of
the queue and runs them on the node's compute executor. Each request may
carry a budget (milliseconds it may still spend here); with the variant's
profiled latency(batch) model that gives a deadline, and :class:`BatchPolicy`
decides, from the queue alone, when a batch closes:

- it is full (``max_batch`` rows), or more is queued than fits;
- adding the next request would make the tightest deadline in the batch miss
  (so a batch never grows past what its most urgent member can afford);
- waiting for one more request would make a deadline in the batch miss
  (``deadline - latency(rows + 1)``), or a request without a deadline has
  waited ``max_wait_ms``, the default wait cap;
- waiting does not pay: the node is not busy (nothing arrived while the
  previous batch ran), the next request is not due (the arrival-gap estimate
  has passed), or merging one more request would save less compute than the
  wait costs the requests already waiting. A CPU model whose latency grows
  with every row therefore never waits: its batches are whatever queued up
  while the previous batch ran (work-conserving). A GPU-like flat latency
  curve makes waiting worth a few milliseconds.

Admission is decided at :meth:`Batcher.submit`, at once and never by a
timeout: a full queue is refused with :class:`~mesh.errors.Overloaded`, and
so is a request without a deadline that would wait longer than
``max_queue_wait_ms`` (the queue is bounded in time as well as in length); a
request whose predicted completion (the work queued ahead, the batch it will
join, its own compute) falls after its deadline is refused with
:class:`~mesh.errors.CannotMeetDeadline`, so that the entry node can place it
elsewhere. All carry ``retry_after_s``: how long the queue needs to drain.

A batch whose run fails is run again one request at a time, so that one bad
input fails only its own request (:class:`~mesh.errors.InputRejected`). The
runtime's exception is logged on the node and never sent to the client.

Batches predicted to take less than ``inline_max_ms`` run on the event loop
thread itself: for a model that takes 10 microseconds the hop to a worker
thread costs several times more than the model. Every request still goes
through the worker, one loop pass after it arrives, so that the requests
read off the sockets in the same pass share its batch (running each inline
as it arrives would serialise them).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from mesh.errors import CannotMeetDeadline, InputRejected, MeshError, Overloaded, Unavailable
from mesh.registry import Profile
from nodes.tasks import cancel_all

__all__ = ["BatchSettings", "BatchPolicy", "BatchResult", "Batcher"]

RunFn = Callable[[list[np.ndarray]], list[np.ndarray]]
#: Called after every batch with (rows, compute_ms).
BatchObserver = Callable[[int, float], None]

log = logging.getLogger("tiermesh.batching")

#: asyncio timers fire on millisecond ticks; shorter waits become one loop pass.
_TIMER_RESOLUTION_S = 0.001


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
    #: latest completion time on the batcher's clock; None when the query has no latency SLO.
    deadline: float | None
    future: asyncio.Future[BatchResult]


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """How a node batches and admits, for every variant it loads. Parsed once, shared.

    The node's :class:`~nodes.agent.AgentConfig` holds one; the model manager
    hands it to every variant's :class:`BatchPolicy`. Raises ``ValueError``
    naming a bad value.
    """

    #: Caps every variant's own max_batch (1 turns batching off; None: the variant's).
    max_batch: int | None = None
    #: Longest a request without a latency SLO waits for company.
    max_wait_ms: float = 2.0
    #: Batches predicted faster than this run on the event loop thread (no thread hop).
    inline_max_ms: float = 0.1
    #: A request without a deadline is refused when it would wait longer than this.
    max_queue_wait_ms: float = 2000.0
    #: Compute predictions are inflated by this fraction...
    margin_frac: float = 0.10
    #: ...plus this many milliseconds (dispatch, splitting the answers).
    margin_ms: float = 0.2
    #: Waiting stops when no request arrived within this many mean arrival gaps.
    gap_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (or None), got {self.max_batch}")
        for name in ("max_wait_ms", "inline_max_ms", "max_queue_wait_ms", "margin_frac",
                     "margin_ms", "gap_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class BatchPolicy:
    """When a batch closes, how long it may wait, and whether to run it inline. Pure.

    Times are seconds on the batcher's clock. Without a ``profile`` the
    compute estimate is zero: deadlines then only cap waiting.
    """

    max_batch: int
    profile: Profile | None = None
    settings: BatchSettings = BatchSettings()
    #: Measured compute time over the profile's, as the batcher last observed it (a node
    #: whose cores are contended runs slower than it was profiled; admission must know).
    slowdown: float = 1.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")

    @property
    def max_wait_ms(self) -> float:
        return self.settings.max_wait_ms

    @property
    def max_queue_wait_ms(self) -> float:
        return self.settings.max_queue_wait_ms

    @property
    def margin_ms(self) -> float:
        return self.settings.margin_ms

    def compute_s(self, rows: int) -> float:
        """Predicted compute for ``rows`` rows, with the safety margin, in seconds."""
        if self.profile is None or rows <= 0:
            return 0.0
        return (self.profile.latency_ms(rows) * self.slowdown * (1 + self.settings.margin_frac)
                + self.settings.margin_ms) / 1000.0

    def runs_inline(self, rows: int) -> bool:
        return (self.profile is not None
                and self.profile.latency_ms(rows) <= self.settings.inline_max_ms)

    def drain_s(self, rows: int) -> float:
        """Predicted time to run ``rows`` queued rows in full batches."""
        full, rest = divmod(rows, self.max_batch)
        return full * self.compute_s(self.max_batch) + self.compute_s(rest)

    def decide(self, queue: Sequence[_Pending], now: float, *, busy: bool,
               gap_s: float | None, last_arrival: float) -> tuple[int, float]:
        """``(n, wake_at)``: run the first ``n`` requests now, or (``n == 0``) wait until ``wake_at``.

        ``busy`` says requests arrived while the previous batch ran; ``gap_s``
        is the mean arrival gap (None when unknown); ``last_arrival`` is when
        the newest request came.
        """
        n = rows = 0
        tightest = float("inf")
        closed = False
        for p in queue:
            new_rows = rows + p.rows
            if new_rows > self.max_batch:
                closed = True
                break
            # A request that is already late does not constrain its batch.
            own = p.deadline if p.deadline is not None and now + self.compute_s(p.rows) <= p.deadline \
                else float("inf")
            if n and now + self.compute_s(new_rows) > min(tightest, own):
                closed = True
                break
            n, rows, tightest = n + 1, new_rows, min(tightest, own)
        if n == 0:  # the head alone exceeds max_batch: run it alone and let the runtime decide
            return 1, now
        if closed or rows >= self.max_batch or n < len(queue):
            return n, now
        close_at = float("inf")
        for p in itertools.islice(queue, n):
            if p.deadline is None:
                close_at = min(close_at, p.enqueued + self.max_wait_ms / 1000.0)
            elif now + self.compute_s(p.rows) <= p.deadline:
                close_at = min(close_at, p.deadline - self.compute_s(rows + 1))
            else:
                close_at = now  # late already: do not make it later
        if now >= close_at or not busy or gap_s is None:
            return n, now
        next_due = last_arrival + self.settings.gap_factor * gap_s
        if now >= next_due:
            return n, now
        # Waiting pays only when merging one more request saves more compute than the wait
        # costs the n requests already waiting: true of GPU-like flat latency curves, rarely
        # of a CPU model whose latency grows with every row.
        saving_s = (self.compute_s(1) + self.compute_s(rows) - self.compute_s(rows + 1)
                    - self.margin_ms / 1000.0)
        if saving_s <= n * gap_s:
            return n, now
        return 0, min(close_at, next_due)


class Batcher:
    """One queue and one worker for one loaded variant. An async context manager."""

    #: Weight of the newest arrival gap in the running mean.
    gap_alpha: float = 0.2
    #: An offline batch is sized to take at most this long: how long an online request
    #: that arrives while it runs may have to wait for it.
    offline_batch_ms: float = 20.0
    #: Weight of the newest batch in the running slowdown estimate (measured / profiled).
    slowdown_alpha: float = 0.2
    #: Bounds of the slowdown estimate, and the shortest profiled batch that updates it
    #: (below it, Python's own overhead dwarfs the model and the ratio means nothing).
    slowdown_bounds: tuple[float, float] = (0.5, 20.0)
    slowdown_min_ms: float = 0.5
    #: Without new batches the estimate relaxes towards 1 with this half-life, so that a
    #: variant refused because it ran slow once is tried again (and measured again).
    slowdown_half_life_s: float = 2.0
    #: Weight of the newest observation in the running event-loop lag estimate.
    lag_alpha: float = 0.2
    #: Runs shorter than this do not update the CPU share (too short to measure), and the
    #: weight of the newest run in its running estimate.
    cpu_share_min_s: float = 0.001
    cpu_share_alpha: float = 0.2

    def __init__(self, name: str, run: RunFn, executor: Executor, *, max_batch: int,
                 max_queue: int, policy: BatchPolicy | None = None,
                 observer: BatchObserver | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.name = name
        self._run = run
        self._executor = executor
        self.policy = policy if policy is not None else BatchPolicy(max_batch)
        if self.policy.max_batch != max_batch:
            raise ValueError(f"policy.max_batch {self.policy.max_batch} != max_batch {max_batch}")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._observer = observer
        self._clock = clock
        self._queue: collections.deque[_Pending] = collections.deque()
        #: offline (throughput) requests: run only when ``_queue`` is empty
        self._offline: collections.deque[_Pending] = collections.deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: list[_Pending] = []
        self._running_until = 0.0
        self._arrived_during_run = False
        self._gap_s: float | None = None
        self._slowdown = self.policy.slowdown
        self._slowdown_at = 0.0
        #: running estimate of the time between work done and its answer on its way: the
        #: compute thread's result waiting for the loop, then the caller waiting for it
        self._lag_s = 0.0
        self._lag_at = 0.0
        self._resume_lag_s = 0.0
        self._delivered_at = 0.0
        self._last_arrival = 0.0
        self.in_flight = 0
        self.batches = 0
        self.served = 0
        #: the share of its runs' time the compute thread had a CPU (1.0: never waited for
        #: one; 0.5: the machine's CPUs were busy elsewhere half the time). Only runs on the
        #: executor measure it: a session with one intra-op thread computes on that thread.
        self.cpu_share = 1.0

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return len(self._queue) + len(self._offline) + self.in_flight

    @property
    def idle(self) -> bool:
        return not self._queue and not self._offline and not self.in_flight

    @property
    def running(self) -> bool:
        """True between start and shutdown: submit() accepts requests."""
        return self._task is not None

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Batcher:
        self._task = asyncio.create_task(self._worker(), name=f"batcher:{self.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_all([self._task])
        self._task = None
        stopping = Unavailable(f"variant {self.name} is shutting down; retry", retry_after_s=1.0)
        self._fail(self._running, stopping)
        self._running = []
        while self._queue:
            self._fail([self._queue.popleft()], stopping)
        while self._offline:
            self._fail([self._offline.popleft()], stopping)
        self._queued_rows = 0

    # ------------------------------------------------------------------ admission
    def predicted_wait_s(self, now: float, rows: int = 0) -> float:
        """Until a request of ``rows`` rows admitted now would be answered."""
        ahead = max(self._running_until - now, 0.0) if self.in_flight else 0.0
        return ahead + self.policy.drain_s(self._queued_rows + rows) + self._lag_now(now)

    async def submit(self, inputs: list[np.ndarray], *, budget_ms: float | None = None,
                     offline: bool = False, alone: bool = False) -> BatchResult:
        """Queue one request and wait for its share of a batch.

        ``budget_ms``: how long it may take here at most (None: no latency
        SLO). Raises :class:`Overloaded` when the queue is full and
        :class:`CannotMeetDeadline` when the prediction says it would be late.
        ``offline``: throughput work; it runs only when no online request waits,
        in batches no longer than ``offline_batch_ms``, so online queries keep
        their deadlines. ``alone``: the caller knows no other query is in
        progress, so nothing could share this one's batch.
        """
        if self._task is None:
            raise Unavailable(f"variant {self.name} is not running", retry_after_s=1.0)
        now = self._clock()
        rows = int(inputs[0].shape[0])
        if offline:
            return await self._submit_offline(inputs, rows, now)
        deadline = None if budget_ms is None else now + budget_ms / 1000.0
        if len(self._queue) >= self.max_queue:
            raise Overloaded(
                f"queue for {self.name} is full ({self.max_queue} waiting); retry shortly",
                retry_after_s=max(self.predicted_wait_s(now), 0.05),
            )
        if self._slowdown != 1.0 and not self.in_flight:
            self._apply_slowdown(self._relaxed_slowdown(now))
        wait_s = self.predicted_wait_s(now, rows)
        if deadline is None:
            cap_s = self.policy.max_queue_wait_ms / 1000.0
            if wait_s > cap_s:
                raise Overloaded(
                    f"queue for {self.name} holds {wait_s * 1000:.0f} ms of work, over this "
                    f"node's {self.policy.max_queue_wait_ms:g} ms cap; retry shortly",
                    retry_after_s=max(wait_s - cap_s, 0.05))
        else:
            if now + wait_s > deadline:
                raise CannotMeetDeadline(
                    f"variant {self.name} would answer in {wait_s * 1000:.1f} ms here, over the "
                    f"{budget_ms:.1f} ms left for this query; place it elsewhere or retry",
                    retry_after_s=max(wait_s, 0.05))
        if self._last_arrival:
            gap = now - self._last_arrival
            self._gap_s = gap if self._gap_s is None else self._gap_s + self.gap_alpha * (
                gap - self._gap_s)
        self._last_arrival = now
        if (alone and not self._queue and not self.in_flight and not self._offline
                and self.policy.runs_inline(rows)):
            # The only query in progress, on an idle batcher: nothing could share its batch,
            # so run it now rather than hand it to the worker (saves ~15 us a query).
            return self._run_now(inputs, rows, now)
        if self.in_flight:
            self._arrived_during_run = True
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(inputs, rows, now, deadline, future))
        self._queued_rows += rows
        self._wakeup.set()
        result = await future
        self._learn_lag(self._resume_lag_s + self._clock() - self._delivered_at)
        return result

    # ------------------------------------------------------------------ worker
    async def _submit_offline(self, inputs: list[np.ndarray], rows: int, now: float
                              ) -> BatchResult:
        if len(self._offline) >= self.max_queue:
            raise Overloaded(f"offline queue for {self.name} is full ({self.max_queue} waiting); "
                             "retry later", retry_after_s=max(self.predicted_wait_s(now), 0.5))
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._offline.append(_Pending(inputs, rows, now, None, future))
        self._wakeup.set()
        return await future

    def _offline_batch(self) -> list[_Pending]:
        """The offline requests to run now: as many rows as fit ``offline_batch_ms``."""
        limit_s = self.offline_batch_ms / 1000.0
        batch: list[_Pending] = []
        rows = 0
        while self._offline:
            head = self._offline[0]
            if batch and (rows + head.rows > self.max_batch
                          or self.policy.compute_s(rows + head.rows) > limit_s):
                break
            batch.append(self._offline.popleft())
            rows += head.rows
        return [p for p in batch if not p.future.cancelled()]

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue and not self._offline:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                if not self._queue:  # idle capacity: offline work, in large batches
                    batch = self._offline_batch()
                    if batch:
                        await self._run_batch(loop, batch)
                    await asyncio.sleep(0)  # let online requests that came meanwhile in
                    continue
                await self._next_batch(loop)
            except Exception:  # a bug here must fail the queue loudly, not hang it
                log.exception("batcher %s failed; failing its queue", self.name)
                failed = Unavailable(f"variant {self.name} failed to batch; retry", retry_after_s=1.0)
                while self._queue:
                    self._fail([self._queue.popleft()], failed)
                while self._offline:
                    self._fail([self._offline.popleft()], failed)
                self._queued_rows = 0

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Form the next batch (waiting for company when that pays) and run it."""
        busy = self._arrived_during_run or len(self._queue) > 1
        now = self._clock()
        n, wake_at = self.policy.decide(self._queue, now, busy=busy, gap_s=self._gap_s,
                                        last_arrival=self._last_arrival)
        if n == 0:
            before = self._last_arrival
            await self._wait(loop, wake_at - now)
            if self._last_arrival != before or not self._queue:
                return
            # nobody came: close with what is here
            n, _ = self.policy.decide(self._queue, self._clock(), busy=False, gap_s=None,
                                      last_arrival=self._last_arrival)
        batch = [self._queue.popleft() for _ in range(n)]
        self._queued_rows -= sum(p.rows for p in batch)
        batch = [p for p in batch if not p.future.cancelled()]
        if batch:
            await self._run_batch(loop, batch)

    async def _wait(self, loop: asyncio.AbstractEventLoop, delay_s: float) -> None:
        """Wait ``delay_s`` or until a request arrives; sub-tick waits are one loop pass."""
        self._wakeup.clear()
        if delay_s < _TIMER_RESOLUTION_S:
            await asyncio.sleep(0)  # collects requests already read off the sockets
            return
        timer = loop.call_later(delay_s, self._wakeup.set)
        try:
            await self._wakeup.wait()
        finally:
            timer.cancel()

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        rows = sum(p.rows for p in batch)
        started = self._clock()
        self._running = batch
        self.in_flight = len(batch)
        self._running_until = started + self.policy.compute_s(rows)
        self._arrived_during_run = False
        try:
            if len(batch) == 1:
                joined = batch[0].inputs
            else:
                joined = [np.concatenate([p.inputs[i] for p in batch])
                          for i in range(len(batch[0].inputs))]
            outputs = await self._execute(loop, joined, rows)
        except MeshError as exc:
            self.in_flight, self._running = 0, []
            self._fail(batch, exc)
            return
        except Exception:  # a runtime failure must not kill the worker, nor fail the others
            log.warning("variant %s failed on a batch of %d request(s)", self.name, len(batch),
                        exc_info=True)
            try:
                await self._run_alone(loop, batch)
            finally:
                self.in_flight, self._running = 0, []
            return
        except BaseException:
            self.in_flight, self._running = 0, []
            raise
        self.in_flight, self._running = 0, []
        compute_ms = (self._clock() - started) * 1000
        self.batches += 1
        if self._observer is not None:
            self._observer(rows, compute_ms)
        self._learn_slowdown(rows, compute_ms)
        self._delivered_at = self._clock()
        offset = 0
        for p in batch:
            part = outputs if len(batch) == 1 else [o[offset:offset + p.rows] for o in outputs]
            offset += p.rows
            self.served += 1
            if not p.future.done():
                p.future.set_result(
                    BatchResult(part, (started - p.enqueued) * 1000, compute_ms, rows))

    def _run_now(self, inputs: list[np.ndarray], rows: int, started: float) -> BatchResult:
        try:
            outputs = self._run(inputs)
        except MeshError:
            raise
        except Exception:
            log.warning("variant %s failed on a request", self.name, exc_info=True)
            raise InputRejected(f"variant {self.name} could not run this input (the node "
                                "logged why); check its values against the task's inputs"
                                ) from None
        compute_ms = (self._clock() - started) * 1000
        self.batches += 1
        self.served += 1
        if self._observer is not None:
            self._observer(rows, compute_ms)
        return BatchResult(outputs, 0.0, compute_ms, rows)

    def _learn_slowdown(self, rows: int, compute_ms: float) -> None:
        """Track how much slower (or faster) than its profile the variant runs here now."""
        profile = self.policy.profile
        if profile is None:
            return
        expected = profile.latency_ms(rows)
        if expected < self.slowdown_min_ms:
            return
        now = self._clock()
        current = self._relaxed_slowdown(now)
        lo, hi = self.slowdown_bounds
        self._slowdown = min(max(current + self.slowdown_alpha * (compute_ms / expected - current),
                                 lo), hi)
        self._slowdown_at = now
        self._apply_slowdown(self._slowdown)

    def _relaxed_slowdown(self, now: float) -> float:
        age = now - self._slowdown_at
        if age <= 0 or self._slowdown == 1.0:
            return self._slowdown
        return 1.0 + (self._slowdown - 1.0) * 0.5 ** (age / self.slowdown_half_life_s)

    def _apply_slowdown(self, value: float) -> None:
        if abs(value - self.policy.slowdown) > 0.05 * self.policy.slowdown:
            self.policy = dataclasses.replace(self.policy, slowdown=value)

    @property
    def slowdown(self) -> float:
        """Measured compute time over the profiled one (running estimate; 1.0 at start)."""
        return self._relaxed_slowdown(self._clock())

    async def _execute(self, loop: asyncio.AbstractEventLoop, joined: list[np.ndarray],
                       rows: int) -> list[np.ndarray]:
        if self.policy.runs_inline(rows):
            self._resume_lag_s = 0.0
            return self._run(joined)
        outputs, ended = await loop.run_in_executor(self._executor, self._timed_run, joined)
        self._resume_lag_s = self._clock() - ended
        return outputs

    def _timed_run(self, joined: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
        """On the compute thread: the outputs, and when they were ready. Also learns what
        share of the run's time the thread actually had a CPU (:attr:`cpu_share`)."""
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        outputs = self._run(joined)
        wall = time.perf_counter() - wall0
        if wall >= self.cpu_share_min_s:
            share = min((time.thread_time() - cpu0) / wall, 1.0)
            self.cpu_share += self.cpu_share_alpha * (share - self.cpu_share)
        return outputs, self._clock()

    def _learn_lag(self, lag_s: float) -> None:
        """How long finished work waits for the event loop (busy answering others)."""
        now = self._clock()
        self._lag_s = self._lag_now(now) + self.lag_alpha * (max(lag_s, 0.0) - self._lag_now(now))
        self._lag_at = now

    def _lag_now(self, now: float) -> float:
        """The lag estimate, relaxing towards 0 while nothing is measured (half-life as the
        slowdown's): a burst that made admission refuse everything must not do so for good,
        since nothing admitted means nothing measured."""
        if not self._lag_s:
            return 0.0
        age = now - self._lag_at
        return self._lag_s * 0.5 ** (age / self.slowdown_half_life_s) if age > 0 else self._lag_s

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        """After a failed batch: run each request by itself; only those that fail alone fail."""
        for p in batch:
            if p.future.done():
                continue
            if len(batch) == 1:
                outcome: list[np.ndarray] | BaseException = RuntimeError("failed alone")
            else:
                started = self._clock()
                try:
                    outcome = await self._execute(loop, p.inputs, p.rows)
                except Exception as exc:
                    outcome = exc
            if isinstance(outcome, MeshError):
                self._fail([p], outcome)
            elif isinstance(outcome, BaseException):
                if len(batch) > 1:
                    log.warning("variant %s failed on one request run alone: %r", self.name,
                                outcome)
                self._fail([p], InputRejected(
                    f"variant {self.name} could not run this input (the node logged why); "
                    "check its values against the task's inputs"))
            else:
                compute_ms = (self._clock() - started) * 1000
                self._delivered_at = self._clock()
                self.batches += 1
                self.served += 1
                if self._observer is not None:
                    self._observer(p.rows, compute_ms)
                p.future.set_result(BatchResult(outcome, (started - p.enqueued) * 1000,
                                                compute_ms, p.rows))

    @staticmethod
    def _fail(batch: list[_Pending], exc: MeshError) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)
