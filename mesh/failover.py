"""Which entry node a query tries next, when, and how long it waits there. Pure: no I/O,
no clock, no global randomness.

Both SDK clients (:class:`mesh.client.Client` and :class:`mesh.client.AsyncClient`)
run the same loop over :class:`Failover`, so they fail over and retry the same way::

    failover = Failover(len(entries), first=current, slo=slo, timeouts=timeouts,
                        started=clock(), policy=policy, budget=budget, rng=rng)
    while (attempt := failover.next(clock())) is not None:
        sleep(attempt.delay_s)       # backoff, or the mesh's Retry-After
        try:
            answer = send(attempt)   # connect within attempt.connect_s, then answer
        except MeshError as exc:     # within attempt.timeout_s of sending; or an error answer
            failover.failed(exc, clock())
            if not exc.retryable:
                raise
            continue
        return answer
    raise failover.error()

Every attempt of one query carries the same ``request_id``: it is the query's
idempotency id, so a node can tell a retry from a new query.

The rules:

* A query has an overall deadline, :attr:`Timeouts.total_s` after it started
  (or ``limit_s``, when the client keeps part of the budget for an on-device
  answer). Nothing waits past it.
* Retryable failures are those whose error says so (``retryable``): the entry
  could not be reached (:class:`~mesh.errors.MeshConnectionError`) or did not
  answer in time (:class:`~mesh.errors.MeshTimeout`), or the mesh answered 429
  :class:`~mesh.errors.Overloaded`, 503 :class:`~mesh.errors.Unavailable`
  (``NoRoute``, ``CannotMeetDeadline``, ``RuntimeMissing``) or 502
  :class:`~mesh.errors.UpstreamError`. Anything else (a 4xx: bad input,
  unknown task, forbidden) is the caller's to fix and is raised at once.
* A query makes at most :attr:`RetryPolicy.max_attempts` attempts (3). Entries
  are tried from ``first`` on, each one not yet tried before any is tried
  again; an entry that could not be reached or did not answer is not tried
  again by this query (the client starts later queries past it), while one that
  answered "busy" may be, after a pause.
* The pause before a retry is exponential backoff with full jitter: uniform in
  ``[0, min(max_backoff_s, initial_backoff_s * multiplier ** n)]`` for the n-th
  pause of the query (50 ms, 100 ms, ... up to 1 s). Failing over from an entry
  that could not be reached to one not yet tried does not pause: the first put no
  load on anything.
* ``Retry-After`` (an error's ``retry_after_s``) is honoured for every entry,
  since they all route into one mesh: no retry starts sooner than it says. When
  it points past the deadline, the query is not retried and the error left says
  so.
* Retries draw on the client's :class:`RetryBudget`: over a sliding window
  (10 s), retries may be at most 20% of the queries started plus a small
  reserve (3), as Envoy's and Finagle's retry budgets. Moving on from an entry
  that could not be reached (:class:`~mesh.errors.MeshConnectionError`) to one
  not tried yet is failover, not a retry, and draws nothing: the first entry
  got no load. A timeout does draw: the query may still be running there. A fleet of clients can
  then add at most a fifth to the load of a mesh that is failing; a spent
  budget ends the query with its last error, which says so.
* An attempt may take :attr:`Timeouts.connect_s` to open a connection and must
  then answer within ``timeout_s`` of sending, which is, capped at what is left
  of the deadline:

  - when no other entry is left to move on to: everything that is left;
  - for a query with a latency target (and not ``offline``): what is left of
    ``latency_ms``, but at least :attr:`Timeouts.min_attempt_s`, because an
    answer that is a little late beats starting again elsewhere;
  - otherwise :attr:`Timeouts.attempt_s`.

  The query carries ``timeout_ms`` = ``timeout_s``, so the entry node gives up on
  its own hops before the client gives up on it.
* When no attempt is left, :meth:`Failover.error` is the error to raise, its
  message naming every attempt and why there was no other: the last error the
  mesh answered with (its class and ``retry_after_s``) if there was one, else
  :class:`~mesh.errors.MeshTimeout` when an entry did not answer in time or the
  deadline passed, else :class:`~mesh.errors.MeshConnectionError`.

Why: a frozen (``SIGSTOP``-ed) node still accepts connections, since the kernel
completes the handshake, so only a first-answer timeout well below the query's
own timeout lets a client move on to the next entry.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from mesh.errors import ClientError, MeshConnectionError, MeshError, MeshTimeout
from mesh.health import RetryBudget
from mesh.wire import SLO

__all__ = ["Timeouts", "RetryPolicy", "RetryBudget", "Attempt", "Failover", "rotate_past"]

#: The longest timeout a query can carry on the wire (``InferRequest.timeout_ms``).
MAX_TIMEOUT_S = 3600.0


def _seconds(value: object, keyword: str, *, zero: bool = False) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not (0 <= value if zero else 0 < value)
            or value > MAX_TIMEOUT_S):
        above = "at least 0" if zero else "above 0"
        raise ClientError(f"{keyword}: must be a number of seconds {above} and at most "
                          f"{MAX_TIMEOUT_S:g}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long the SDK waits, in seconds. Raises :class:`ClientError` naming a bad value."""

    #: The whole query, every attempt included.
    total_s: float = 30.0
    #: Opening a connection to one entry node.
    connect_s: float = 1.0
    #: An entry's answer to a query without a latency target, when other entries are left.
    attempt_s: float = 5.0
    #: The least an entry is given to answer a query with a latency target.
    min_attempt_s: float = 0.5

    def __post_init__(self) -> None:
        for name, keyword in (("total_s", "timeout_s"), ("connect_s", "connect_timeout_s"),
                              ("attempt_s", "attempt_timeout_s"), ("min_attempt_s", "min_attempt_s")):
            _seconds(getattr(self, name), keyword)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a client retries a query. ``RetryPolicy(max_attempts=1)`` turns retries off.

    Raises :class:`ClientError` naming a bad value.
    """

    #: Attempts per query, the first included (gRPC's ``maxAttempts``).
    max_attempts: int = 3
    #: The first pause's ceiling; each later pause's ceiling is ``multiplier`` times more.
    initial_backoff_s: float = 0.05
    #: The largest pause's ceiling.
    max_backoff_s: float = 1.0
    multiplier: float = 2.0
    #: Retries may be at most this share of the queries started within ``budget_window_s`` ...
    budget_ratio: float = 0.2
    #: ... plus this many, so that a quiet client can still fail over.
    budget_min_retries: int = 3
    budget_window_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_attempts", "budget_min_retries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name == "max_attempts"):
                least = 1 if name == "max_attempts" else 0
                raise ClientError(f"retry.{name}: must be an integer of at least {least}, "
                                  f"got {value!r}")
        for name in ("initial_backoff_s", "max_backoff_s"):
            _seconds(getattr(self, name), f"retry.{name}", zero=True)
        _seconds(self.budget_window_s, "retry.budget_window_s")
        if isinstance(self.multiplier, bool) or not isinstance(self.multiplier, (int, float)) \
                or not 1 <= self.multiplier <= 10:
            raise ClientError(f"retry.multiplier: must be a number from 1 to 10, "
                              f"got {self.multiplier!r}")
        if isinstance(self.budget_ratio, bool) or not isinstance(self.budget_ratio, (int, float)) \
                or not 0 <= self.budget_ratio <= 1:
            raise ClientError(f"retry.budget_ratio: must be a share from 0 to 1, "
                              f"got {self.budget_ratio!r}")

    def backoff_ceiling_s(self, pause: int) -> float:
        """The ceiling of the ``pause``-th pause of a query (0 for the first)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** pause)

    def budget(self) -> RetryBudget:
        """A fresh budget with this policy's numbers (one per client)."""
        return RetryBudget(self.budget_ratio, self.budget_min_retries, self.budget_window_s)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at one entry node."""

    #: Which entry URL, as an index into the client's list.
    index: int
    #: How long opening a connection may take.
    connect_s: float
    #: How long the answer may take, from sending the query; sent along as ``timeout_ms``.
    timeout_s: float
    #: The query's overall deadline (same clock as ``now``); the attempt never waits past it.
    deadline: float
    #: True when no other entry is left to move on to.
    last: bool
    #: How long to wait before sending (backoff, or what ``Retry-After`` asked).
    delay_s: float = 0.0

    @property
    def timeout_ms(self) -> float:
        return self.timeout_s * 1000.0

    def answer_timeout(self, now: float) -> float:
        """How long to wait for the answer when sending at ``now`` (after connecting)."""
        return max(0.0, min(self.timeout_s, self.deadline - now))


@dataclass(slots=True)
class Failover:
    """The attempts of one query. Time comes in as ``now`` (seconds, any monotonic clock)."""

    entries: int
    first: int
    slo: SLO
    timeouts: Timeouts
    #: When the query started (same clock as every ``now``).
    started: float
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    #: The client's budget, shared by its queries (None: retries are not rationed).
    budget: RetryBudget | None = None
    #: Draws the jittered pauses.
    rng: random.Random = field(default_factory=random.Random)
    #: The query's own limit in seconds when below ``timeouts.total_s`` (the mesh's share
    #: of a budget that keeps time for an on-device answer).
    limit_s: float | None = None
    _tried: list[int] = field(default_factory=list)
    _unreachable: set[int] = field(default_factory=set)
    _failures: list[MeshError] = field(default_factory=list)
    _fatal: MeshError | None = None
    _not_before: float = -math.inf
    _pauses: int = 0
    _sent_at: float = 0.0
    _expired: bool = False
    _stop: str | None = None

    def __post_init__(self) -> None:
        if self.entries < 1:
            raise ClientError("a client needs at least one entry URL")

    @property
    def deadline(self) -> float:
        limit = self.timeouts.total_s if self.limit_s is None \
            else min(self.limit_s, self.timeouts.total_s)
        return self.started + limit

    @property
    def attempts(self) -> int:
        return len(self._tried)

    def next(self, now: float) -> Attempt | None:
        """The next attempt, or None when no attempt is left (then raise :meth:`error`)."""
        if self._fatal is not None or self._stop is not None:
            return None
        rationed = False  # whether this attempt draws on the retry budget
        if not self._tried:
            index, delay = self.first, 0.0
        else:
            picked = self._pick()
            if picked is None:
                return None  # every entry failed to connect or answer: error() names each
            index, untried = picked
            if len(self._tried) >= self.policy.max_attempts:
                # with retries off the error stays the node's own
                self._stop = f"gave up after {len(self._tried)} attempt(s) (retry.max_attempts)" \
                    if self.policy.max_attempts > 1 else ""
                return None
            delay = self._pause(untried)
            # an entry that could not be reached got nothing: moving on to a fresh one is
            # failover, not a retry that adds load
            rationed = not (untried and bool(self._failures)
                            and isinstance(self._failures[-1], MeshConnectionError))
        start = max(now + delay, self._not_before)
        if start >= self.deadline:
            self._stop_at_deadline(now, start)
            return None
        if rationed:
            if self.budget is not None and not self.budget.can_retry(now):
                b = self.budget
                self._stop = ("not retried: this client's retry budget is spent (retries are "
                              f"kept to {b.ratio:.0%} of its queries over {b.window_s:g} s, plus "
                              f"{b.min_retries}), to spare a mesh that is failing")
                return None
            if self.budget is not None:
                self.budget.retried(now)
        elif not self._tried and self.budget is not None:
            self.budget.started(now)
        self._tried.append(index)
        self._sent_at = start
        remaining = self.deadline - start
        last = not any(i != index and i not in self._tried for i in range(self.entries))
        t = self.timeouts
        if last:
            wait = remaining
        elif self.slo.latency_ms is not None and not self.slo.offline:
            left = self.slo.latency_ms / 1000.0 - (start - self.started)
            wait = max(left, t.min_attempt_s)
        else:
            wait = t.attempt_s
        return Attempt(index, min(t.connect_s, remaining), min(wait, remaining), self.deadline,
                       last, start - now)

    def _pick(self) -> tuple[int, bool] | None:
        """The next entry, round from the last one tried: one not tried yet if any is left
        (True), else one that answered busy (False); None when every entry is unreachable."""
        last = self._tried[-1]
        order = [(last + 1 + k) % self.entries for k in range(self.entries)]
        for i in order:
            if i not in self._tried:
                return i, True
        for i in order:
            if i not in self._unreachable:
                return i, False
        return None

    def _pause(self, untried: bool) -> float:
        previous = self._failures[-1] if self._failures else None
        if untried and isinstance(previous, ClientError):
            return 0.0  # failing over from an entry that got nothing: no load to spare
        ceiling = self.policy.backoff_ceiling_s(self._pauses)
        self._pauses += 1
        return self.rng.uniform(0.0, ceiling)

    def _stop_at_deadline(self, now: float, start: float) -> None:
        limit = self.deadline - self.started
        if self._not_before >= self.deadline and self._not_before > now:
            waits = self._not_before - now
            self._stop = (f"not retried: the mesh asked to wait {waits:.3g} s, longer than the "
                          f"{max(self.deadline - now, 0.0):.3g} s left of the query's "
                          f"{limit:g} s timeout")
            return
        self._expired = True
        untried = self.entries - len(set(self._tried))
        if untried:
            self._stop = (f"the query's {limit:g} s timeout passed before {untried} more "
                          "entry node(s) could be tried")
        elif self._tried:
            self._stop = f"the query's {limit:g} s timeout left no time to retry"

    def failed(self, error: MeshError, now: float | None = None) -> None:
        """Record why the last attempt failed (its message should name the entry URL).

        ``now``: when it failed, which ``error.retry_after_s`` counts from (default: when
        the attempt was sent). A non-retryable error ends the query.
        """
        self._failures.append(error)
        if not error.retryable:
            self._fatal = error
            return
        if isinstance(error, ClientError) and self._tried:
            self._unreachable.add(self._tried[-1])
        if error.retry_after_s is not None:
            at = (self._sent_at if now is None else now) + error.retry_after_s
            self._not_before = max(self._not_before, at)

    def error(self) -> MeshError:
        """The error to raise once :meth:`next` returned None."""
        if self._fatal is not None:
            return self._fatal
        parts = [e.message for e in self._failures]
        if self._stop:
            parts.append(self._stop)
        if len(self._failures) == 1 and len(parts) == 1:
            return self._failures[0]
        message = "; ".join(parts)
        answered = [e for e in self._failures if not isinstance(e, ClientError)]
        if answered:  # the mesh's own word: Overloaded, Unavailable, ... with its Retry-After
            return type(answered[-1])(message, retry_after_s=answered[-1].retry_after_s)
        timed_out = self._expired or any(isinstance(e, MeshTimeout) for e in self._failures)
        cls = MeshTimeout if timed_out or not self._failures else MeshConnectionError
        return cls(message)


def rotate_past(current: int, failed: int, entries: int) -> int:
    """The entry later queries start from after ``failed`` failed, ``current`` being the
    one they started from: moved past it, unless a concurrent query already moved on."""
    return (failed + 1) % entries if current == failed else current
