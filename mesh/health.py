"""Failing peers and retries, judged from request outcomes: pure, the clock passed in.

Heartbeats (:mod:`mesh.state`) tell a node which peers are dead or cut off.
A peer can also be alive and still fail the queries sent to it: its runtime
breaks, a disk goes bad, it is swapping. :class:`OutlierDetector` watches what
happens to the queries a node sends each peer, as Envoy's outlier detection
does:

* **consecutive failures**: ``consecutive_failures`` (5) in a row (a hop that
  did not answer, or answered with a server error; refusals for load are not
  failures: they have their own path, the hand-back);
* **latency**: ``slow_streak`` (10) answers in a row slower than
  ``slow_factor`` (10x) their predicted latency plus ``slow_floor_ms`` (250 ms):
  far enough out that a mesh merely overloaded (everything slow, a few times
  its prediction) ejects nobody.

A hop that does not answer within what the query could give it is not
counted here: the node marks it (and what is behind it) down until a fresh
report says otherwise, which keeps a frozen node avoided, but a busy node is
not ejected for a minute for being busy.

Either ejects the peer for ``base_ejection_s`` (2 s) times 2^(times ejected
before), at most ``max_ejection_s`` (60 s). An ejected peer counts as down in
the node's view (:meth:`mesh.state.MeshView.eject`), so the planner stops
choosing it at once, for the very next query. When the time is up the peer is
*on probation*: queries may go to it again, and the first outcome decides:
a failure ejects it again (for twice as long), a success readmits it, and
after ``forgive_after_s`` without failing its ejection count starts over.

:class:`RetryBudget` bounds retries the way Envoy's retry budget does: a
node retries a query elsewhere only while its retries over the last
``window_s`` stay within ``ratio`` (20%) of its requests, plus
``min_retries`` (10) so that a quiet node can still retry at all. Failures
therefore never multiply the load on a mesh that is already failing.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OutlierDetector", "Ejection", "RetryBudget"]


@dataclass(slots=True)
class _Peer:
    failures: int = 0
    slow: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    last_failure: float = float("-inf")
    probation: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Ejection:
    """A peer was ejected: until when, and why."""

    peer: str
    until: float
    reason: str
    times: int


@dataclass
class OutlierDetector:
    """Per-peer outcomes -> ejections (see the module docstring)."""

    consecutive_failures: int = 5
    slow_streak: int = 10
    slow_factor: float = 10.0
    slow_floor_ms: float = 250.0
    base_ejection_s: float = 2.0
    max_ejection_s: float = 60.0
    forgive_after_s: float = 60.0
    _peers: dict[str, _Peer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1 or self.slow_streak < 1:
            raise ValueError("consecutive_failures and slow_streak must be at least 1")
        if not 0 < self.base_ejection_s <= self.max_ejection_s:
            raise ValueError("need 0 < base_ejection_s <= max_ejection_s")

    def _peer(self, peer: str) -> _Peer:
        p = self._peers.get(peer)
        if p is None:
            p = self._peers[peer] = _Peer()
        return p

    def success(self, peer: str, now: float, *, latency_ms: float | None = None,
                predicted_ms: float | None = None) -> Ejection | None:
        """An answer from ``peer``; ejects it when it has been far too slow too often."""
        p = self._peer(peer)
        p.failures = 0
        if p.probation and now >= p.ejected_until:
            p.probation = False  # back in service
        if p.ejections and now - p.last_failure > self.forgive_after_s:
            p.ejections = 0
        if latency_ms is not None and predicted_ms is not None \
                and latency_ms > predicted_ms * self.slow_factor + self.slow_floor_ms:
            p.slow += 1
            if p.slow >= self.slow_streak:
                return self._eject(peer, p, now, f"{p.slow} answers in a row far slower than "
                                   f"predicted (last {latency_ms:.0f} ms, predicted "
                                   f"{predicted_ms:.0f} ms)")
        else:
            p.slow = 0
        return None

    def failure(self, peer: str, now: float, reason: str) -> Ejection | None:
        """A query to ``peer`` failed (no answer, or a server error): maybe eject it."""
        p = self._peer(peer)
        p.failures += 1
        p.last_failure = now
        if p.probation:
            return self._eject(peer, p, now, f"failed again on probation: {reason}")
        if p.failures >= self.consecutive_failures:
            return self._eject(peer, p, now, f"{p.failures} failures in a row, the last: {reason}")
        return None

    def _eject(self, peer: str, p: _Peer, now: float, reason: str) -> Ejection:
        seconds = min(self.base_ejection_s * 2 ** p.ejections, self.max_ejection_s)
        p.ejections += 1
        p.ejected_until = now + seconds
        p.probation = True
        p.failures = p.slow = 0
        p.reason = reason
        return Ejection(peer, p.ejected_until, reason, p.ejections)

    def status(self, now: float) -> dict[str, dict[str, Any]]:
        """Peers ejected now or on probation, for status pages."""
        out = {}
        for name, p in sorted(self._peers.items()):
            if p.probation or now < p.ejected_until:
                out[name] = {"ejected": now < p.ejected_until,
                             "for_s": round(max(p.ejected_until - now, 0.0), 3),
                             "times": p.ejections, "reason": p.reason}
        return out


class RetryBudget:
    """Retries allowed over a sliding ``window_s``: below ``ratio`` times the requests
    started there, plus ``min_retries``. Nodes (one per node) and the SDK (one per client)
    keep one each. Time comes in as ``now``.

    Counts are kept in ten buckets a tenth of the window wide, so memory stays the same
    whatever the rate.
    """

    BUCKETS = 10

    def __init__(self, ratio: float = 0.2, min_retries: int = 10, window_s: float = 10.0) -> None:
        if not 0 <= ratio <= 1 or min_retries < 0 or window_s <= 0:
            raise ValueError("need 0 <= ratio <= 1, min_retries >= 0, window_s > 0")
        self.ratio, self.min_retries, self.window_s = ratio, min_retries, window_s
        self._width = window_s / self.BUCKETS
        #: [bucket number, requests started, retries made], oldest first
        self._buckets: deque[list[int]] = deque()
        #: retries made, and refused for want of budget, since the start
        self.spent = 0
        self.refused = 0

    def _bucket(self, now: float) -> list[int]:
        number = math.floor(now / self._width)
        while self._buckets and self._buckets[0][0] <= number - self.BUCKETS:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != number:
            self._buckets.append([number, 0, 0])
        return self._buckets[-1]

    def counts(self, now: float) -> tuple[int, int]:
        """(requests started, retries made) within the window ending at ``now``."""
        self._bucket(now)
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def started(self, now: float) -> None:
        """A request started (its first attempt, not a retry)."""
        self._bucket(now)[1] += 1

    def allowance(self, now: float) -> int:
        queries, _ = self.counts(now)
        return int(self.min_retries + self.ratio * queries)

    def can_retry(self, now: float) -> bool:
        queries, retries = self.counts(now)
        return retries < self.min_retries + self.ratio * queries

    def retried(self, now: float) -> None:
        self._bucket(now)[2] += 1
        self.spent += 1

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget; False (and counted as refused) when none is left."""
        if not self.can_retry(now):
            self.refused += 1
            return False
        self.retried(now)
        return True

    def status(self, now: float) -> dict[str, Any]:
        queries, retries = self.counts(now)
        return {"window_s": self.window_s, "requests": queries, "retries": retries,
                "allowed": self.allowance(now), "spent_total": self.spent,
                "refused_total": self.refused}
