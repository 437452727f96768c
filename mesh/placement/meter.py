"""What one node measures for placement, turned into rates: pure, the clock passed in.

A node counts, as queries go by, per variant it serves (queries, rows, compute
seconds, queries that missed their budget here, the tightest budget and
``min_accuracy`` seen) and per task entering the mesh at it (arrivals). Every
heartbeat :meth:`LoadMeter.report` turns the counts since the previous report
into smoothed rates (an EWMA with ``half_life_s``): the node's own part of a
:class:`~mesh.placement.inputs.LoadReport`.

The simulator drives the same meter with simulated time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from mesh.placement.inputs import VariantLoad

__all__ = ["LoadMeter"]


@dataclass(slots=True)
class _Counts:
    queries: int = 0
    rows: int = 0
    busy_s: float = 0.0
    missed: int = 0
    with_target: int = 0
    tightest_ms: float = math.inf
    min_accuracy: float = -math.inf


@dataclass(slots=True)
class _Smoothed:
    rate: float = 0.0
    rows: float = 0.0
    busy: float = 0.0
    missed: float = 0.0
    with_target: float = 0.0


class LoadMeter:
    """Counts per served variant and per entering task; :meth:`report` gives rates."""

    #: how many reports the tightest targets are remembered for
    target_memory: int = 20

    def __init__(self, *, half_life_s: float = 5.0) -> None:
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s!r}")
        self.half_life_s = half_life_s
        self._served: dict[str, _Counts] = {}
        self._arrived: dict[str, int] = {}
        self._rates: dict[str, _Smoothed] = {}
        self._demand: dict[str, float] = {}
        self._targets: dict[str, deque[tuple[float, float]]] = {}
        self._last: float | None = None

    # ------------------------------------------------------------------ counting (hot path)
    def arrived(self, task: str) -> None:
        """A query of ``task`` entered the mesh at this node."""
        self._arrived[task] = self._arrived.get(task, 0) + 1

    def served(self, variant: str, rows: int, *, budget_ms: float | None = None,
               spent_ms: float = 0.0, min_accuracy: float | None = None) -> None:
        """``variant`` answered one query of ``rows`` rows here, in ``spent_ms`` of the
        ``budget_ms`` it had here (None: no latency target)."""
        c = self._served.get(variant)
        if c is None:
            c = self._served[variant] = _Counts()
        c.queries += 1
        c.rows += rows
        if budget_ms is not None:
            c.with_target += 1
            if spent_ms > budget_ms:
                c.missed += 1
            if budget_ms < c.tightest_ms:
                c.tightest_ms = budget_ms
        if min_accuracy is not None and min_accuracy > c.min_accuracy:
            c.min_accuracy = min_accuracy

    def computed(self, variant: str, seconds: float) -> None:
        """``variant``'s workers computed for ``seconds`` (one batch)."""
        c = self._served.get(variant)
        if c is None:
            c = self._served[variant] = _Counts()
        c.busy_s += seconds

    # ------------------------------------------------------------------ reporting
    def report(self, now: float, depth: dict[str, int] | None = None,
               slowdown: dict[str, float] | None = None,
               cpu_share: dict[str, float] | None = None
               ) -> tuple[dict[str, VariantLoad], dict[str, float]]:
        """Rates since the previous report, smoothed: (variant -> load, task -> arrivals/s).

        ``depth``: each variant's queue now; ``slowdown``: its compute time over the
        profiled one now; ``cpu_share``: the share of its runs' time its compute thread had a
        CPU. Variants and tasks whose smoothed rates fell to nothing are left out.
        """
        slowdown, cpu_share = slowdown or {}, cpu_share or {}
        dt = 0.0 if self._last is None else now - self._last
        self._last = now
        weight = 1.0 if dt <= 0 else 1.0 - 0.5 ** (dt / self.half_life_s)
        span = max(dt, 1e-9)
        served, self._served = self._served, {}
        arrived, self._arrived = self._arrived, {}
        depth = depth or {}
        out: dict[str, VariantLoad] = {}
        for variant in set(self._rates) | set(served):
            c = served.get(variant, _Counts())
            s = self._rates.get(variant)
            if s is None:
                s = self._rates[variant] = _Smoothed()
            if dt > 0:
                for name, value in (("rate", c.queries), ("rows", c.rows), ("busy", c.busy_s),
                                    ("missed", c.missed), ("with_target", c.with_target)):
                    old = getattr(s, name)
                    setattr(s, name, old + weight * (value / span - old))
            kept = self._targets.setdefault(variant, deque(maxlen=self.target_memory))
            if c.with_target or c.min_accuracy > -math.inf:
                kept.append((c.tightest_ms, c.min_accuracy))
            if s.rate < 1e-4 and s.busy < 1e-6 and not depth.get(variant):
                del self._rates[variant]
                self._targets.pop(variant, None)
                continue
            tightest = min((t for t, _ in kept), default=math.inf)
            floor = max((a for _, a in kept), default=-math.inf)
            out[variant] = VariantLoad(
                rate_qps=s.rate, busy=s.busy,
                rows_per_query=max(s.rows / s.rate, 1.0) if s.rate > 0 else 1.0,
                queue_depth=int(depth.get(variant, 0)),
                slo_miss_frac=min(s.missed / s.with_target, 1.0) if s.with_target > 1e-9 else 0.0,
                latency_target_ms=None if tightest == math.inf else tightest,
                min_accuracy=None if floor == -math.inf else floor,
                slowdown=max(slowdown.get(variant, 1.0), 0.0),
                cpu_share=min(max(cpu_share.get(variant, 1.0), 0.0), 1.0))
        for task in set(self._demand) | set(arrived):
            old = self._demand.get(task, 0.0)
            rate = old + weight * (arrived.get(task, 0) / span - old) if dt > 0 else old
            if rate < 1e-4 and not arrived.get(task):
                self._demand.pop(task, None)
            else:
                self._demand[task] = rate
        return out, dict(self._demand)
