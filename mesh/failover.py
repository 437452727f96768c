"""Which entry node a query tries next, and how long it waits there. Pure: no I/O, no clock.

Both SDK clients (:class:`mesh.client.Client` and :class:`mesh.client.AsyncClient`)
run the same loop over :class:`Failover`, so they fail over the same way::

    failover = Failover(len(entries), first=current, slo=slo, timeouts=timeouts,
                        started=clock())
    while (attempt := failover.next(clock())) is not None:
        try:
            answer = send(attempt)   # connect within attempt.connect_s, then answer
        except ClientError as exc:   # within attempt.timeout_s of sending
            failover.failed(exc)
            continue
        return answer
    raise failover.error()

The rules:

* A query has an overall deadline, :attr:`Timeouts.total_s` after it started.
  Nothing waits past it.
* Each entry is tried at most once per query, starting from ``first`` (the
  client starts later queries past an entry that failed).
* An attempt may take :attr:`Timeouts.connect_s` to open a connection and must
  then answer within ``timeout_s`` of sending, which is, capped at what is left
  of the deadline:

  - for the last entry not yet tried: everything that is left of the deadline;
  - for a query with a latency target (and not ``offline``): what is left of
    ``latency_ms``, but at least :attr:`Timeouts.min_attempt_s`, because an
    answer that is a little late beats starting again elsewhere;
  - otherwise :attr:`Timeouts.attempt_s`.

  The query carries ``timeout_ms`` = ``timeout_s``, so the entry node gives up on
  its own hops before the client gives up on it.
* When every entry failed or the deadline passed, :meth:`Failover.error` is the
  error to raise: :class:`~mesh.errors.MeshTimeout` when an entry did not answer
  in time or the deadline passed, :class:`~mesh.errors.MeshConnectionError`
  when every entry tried could not be reached. Its message names every attempt.

Why: a frozen (``SIGSTOP``-ed) node still accepts connections, since the kernel
completes the handshake, so only a first-answer timeout well below the query's
own timeout lets a client move on to the next entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mesh.errors import ClientError, MeshConnectionError, MeshTimeout
from mesh.wire import SLO

__all__ = ["Timeouts", "Attempt", "Failover", "rotate_past"]

#: The longest timeout a query can carry on the wire (``InferRequest.timeout_ms``).
MAX_TIMEOUT_S = 3600.0


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
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_S):
                raise ClientError(f"{keyword}: must be a number of seconds above 0 and at most "
                                  f"{MAX_TIMEOUT_S:g}, got {value!r}")


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
    #: True for the last entry this query can try.
    last: bool

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
    _tried: int = 0
    _failures: list[ClientError] = field(default_factory=list)
    _expired: bool = False

    def __post_init__(self) -> None:
        if self.entries < 1:
            raise ClientError("a client needs at least one entry URL")

    @property
    def deadline(self) -> float:
        return self.started + self.timeouts.total_s

    def next(self, now: float) -> Attempt | None:
        """The next attempt, or None when every entry was tried or the deadline passed."""
        if self._tried >= self.entries:
            return None
        remaining = self.deadline - now
        if remaining <= 0:
            self._expired = True
            return None
        index = (self.first + self._tried) % self.entries
        self._tried += 1
        last = self._tried == self.entries
        t = self.timeouts
        if last:
            wait = remaining
        elif self.slo.latency_ms is not None and not self.slo.offline:
            left = self.slo.latency_ms / 1000.0 - (now - self.started)
            wait = max(left, t.min_attempt_s)
        else:
            wait = t.attempt_s
        return Attempt(index, min(t.connect_s, remaining), min(wait, remaining), self.deadline, last)

    def failed(self, error: ClientError) -> None:
        """Record why the last attempt failed (its message should name the entry URL)."""
        self._failures.append(error)

    def error(self) -> ClientError:
        """The error to raise once :meth:`next` returned None."""
        untried = self.entries - self._tried
        if len(self._failures) == 1 and not untried:
            return self._failures[0]
        parts = [e.message for e in self._failures]
        if untried:
            parts.append(f"the query's {self.timeouts.total_s:g} s timeout passed before "
                         f"{untried} more entry node(s) could be tried")
        timed_out = self._expired or any(isinstance(e, MeshTimeout) for e in self._failures)
        cls = MeshTimeout if timed_out or not self._failures else MeshConnectionError
        return cls("; ".join(parts))


def rotate_past(current: int, failed: int, entries: int) -> int:
    """The entry later queries start from after ``failed`` failed, ``current`` being the
    one they started from: moved past it, unless a concurrent query already moved on."""
    return (failed + 1) % entries if current == failed else current
