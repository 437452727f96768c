"""Arrival-rate forecasts: an EWMA level times a daily shape learned from what arrived.

:class:`ArrivalForecast` follows one arrival stream (one task entering one
subtree). It is a multiplicative seasonal EWMA (Holt-Winters without a
trend):

* the day (``period_s``, compressible for benchmarks) is cut into
  ``buckets`` equal slices; each slice learns the mean rate seen in it with
  its own EWMA across days (``shape_alpha`` per day), so a busy morning
  is learned in one day and a change of habit takes a few;
* the *level* is an EWMA (``half_life_s``) of the observed rate divided by
  the shape at the time it was seen: the rate the stream would have at an
  average moment of the day;
* ``forecast(now, horizon_s)`` is the level times the shape at
  ``now + horizon_s`` (linear between slice centres). Until every slice has
  been seen once the shape is flat and the forecast is the EWMA itself.

:class:`Forecaster` keeps one per key. Time is always an argument (seconds
on any clock whose zero is a midnight, when the daily shape should line up
with the wall clock); nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["ArrivalForecast", "Forecaster"]

K = TypeVar("K", bound=Hashable)


class ArrivalForecast:
    """One stream's level and daily shape."""

    def __init__(self, *, period_s: float = 86_400.0, buckets: int = 48,
                 half_life_s: float = 300.0, shape_alpha: float = 0.3,
                 min_shape: float = 0.05) -> None:
        """Raises ``ValueError`` naming a bad argument."""
        if not period_s > 0:
            raise ValueError(f"period_s must be > 0, got {period_s!r}")
        if not 1 <= buckets <= 10_000:
            raise ValueError(f"buckets must be between 1 and 10000, got {buckets!r}")
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s!r}")
        if not 0 < shape_alpha <= 1:
            raise ValueError(f"shape_alpha must be in (0, 1], got {shape_alpha!r}")
        if not 0 < min_shape <= 1:
            raise ValueError(f"min_shape must be in (0, 1], got {min_shape!r}")
        self.period_s = float(period_s)
        self.buckets = buckets
        self.bucket_s = self.period_s / buckets
        self.half_life_s = half_life_s
        self.shape_alpha = shape_alpha
        self.min_shape = min_shape
        #: mean rate per slice of the day (None: never seen)
        self._slices: list[float | None] = [None] * buckets
        self._seen = 0
        self._level: float | None = None
        self._last: float | None = None
        # The slice being visited: (day number, slice), rate x seconds, seconds.
        self._visit: tuple[int, int] | None = None
        self._visit_sum = 0.0
        self._visit_s = 0.0

    # ------------------------------------------------------------------ learning
    def observe(self, rate_qps: float, now: float) -> None:
        """The mean arrival rate since the previous observation, seen at ``now``.

        An observation older than the previous one is ignored (it arrived
        late); raises ``ValueError`` for a negative or non-finite rate.
        """
        if not math.isfinite(rate_qps) or rate_qps < 0:
            raise ValueError(f"rate_qps must be a finite number >= 0, got {rate_qps!r}")
        if self._last is not None and now < self._last:
            return
        dt = self.bucket_s if self._last is None else now - self._last
        self._last = now
        self._learn_shape(rate_qps, now, max(dt, 0.0))
        seasonal = self._shape_at(now) if self.shape_ready else 1.0
        deseasoned = rate_qps / seasonal
        if self._level is None:
            self._level = deseasoned
        elif dt > 0:
            weight = 1.0 - 0.5 ** (dt / self.half_life_s)
            self._level += weight * (deseasoned - self._level)

    def observe_arrivals(self, arrivals: float, now: float) -> None:
        """``arrivals`` queries since the previous observation (the first one only starts the clock)."""
        if self._last is None:
            self._last = now
            return
        dt = now - self._last
        if dt > 0:
            self.observe(arrivals / dt, now)

    def _learn_shape(self, rate: float, now: float, dt: float) -> None:
        day, pos = divmod(now, self.period_s)
        visit = (int(day), min(int(pos // self.bucket_s), self.buckets - 1))
        if visit != self._visit:
            self._close_visit()
            self._visit = visit
        weight = dt if dt > 0 else 1e-9
        self._visit_sum += rate * weight
        self._visit_s += weight

    def _close_visit(self) -> None:
        if self._visit is None or self._visit_s <= 0:
            return
        was_ready = self.shape_ready
        i = self._visit[1]
        mean = self._visit_sum / self._visit_s
        old = self._slices[i]
        if old is None:
            self._slices[i] = mean
            self._seen += 1
        else:
            self._slices[i] = old + self.shape_alpha * (mean - old)
        self._visit_sum = self._visit_s = 0.0
        if self.shape_ready and not was_ready and self._level is not None and self._last is not None:
            # The level was a plain EWMA until now: express it as a level of the average moment.
            self._level /= self._shape_at(self._last)

    # ------------------------------------------------------------------ reading
    @property
    def shape_ready(self) -> bool:
        """Whether every slice of the day has been seen at least once."""
        return self._seen == self.buckets

    def shape(self) -> tuple[float, ...]:
        """The learned shape, one factor per slice with mean 1 (all 1.0 until it is ready)."""
        if not self.shape_ready:
            return (1.0,) * self.buckets
        values = [v or 0.0 for v in self._slices]
        mean = sum(values) / self.buckets
        if mean <= 0:
            return (1.0,) * self.buckets
        return tuple(max(v / mean, self.min_shape) for v in values)

    def _shape_at(self, t: float) -> float:
        values = [v or 0.0 for v in self._slices]
        mean = sum(values) / self.buckets
        if mean <= 0:
            return 1.0
        # Linear between slice centres, wrapping round the day.
        x = (t % self.period_s) / self.bucket_s - 0.5
        i = math.floor(x)
        frac = x - i
        lo, hi = values[i % self.buckets], values[(i + 1) % self.buckets]
        return max((lo + (hi - lo) * frac) / mean, self.min_shape)

    def rate(self, now: float) -> float:
        """The smoothed rate now (0 before the first observation)."""
        return self.forecast(now, 0.0)

    def forecast(self, now: float, horizon_s: float) -> float:
        """The expected arrival rate at ``now + horizon_s``."""
        if self._level is None:
            return 0.0
        if not self.shape_ready:
            return self._level
        return self._level * self._shape_at(now + horizon_s)

    def peak(self, now: float, horizon_s: float) -> float:
        """The highest expected rate between ``now`` and ``now + horizon_s``."""
        if horizon_s <= 0 or not self.shape_ready:
            return self.forecast(now, max(horizon_s, 0.0))
        steps = min(math.ceil(horizon_s / (self.bucket_s / 2)), 2 * self.buckets)
        return max(self.forecast(now, horizon_s * i / steps) for i in range(steps + 1))

    def to_json(self, now: float) -> dict[str, Any]:
        return {"rate_qps": round(self.rate(now), 6), "shape_ready": self.shape_ready,
                "shape": [round(s, 4) for s in self.shape()]}


class Forecaster(Generic[K]):
    """One :class:`ArrivalForecast` per key (in placement: per (task, subtree root))."""

    def __init__(self, **settings: Any) -> None:
        """``settings`` are :class:`ArrivalForecast`'s; checked now, not at the first key."""
        ArrivalForecast(**settings)
        self.settings = settings
        self.streams: dict[K, ArrivalForecast] = {}

    def observe(self, key: K, rate_qps: float, now: float) -> None:
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = ArrivalForecast(**self.settings)
        stream.observe(rate_qps, now)

    def __contains__(self, key: object) -> bool:
        return key in self.streams

    def __iter__(self) -> Iterator[K]:
        return iter(self.streams)

    def rate(self, key: K, now: float) -> float:
        stream = self.streams.get(key)
        return stream.rate(now) if stream is not None else 0.0

    def forecast(self, key: K, now: float, horizon_s: float) -> float:
        stream = self.streams.get(key)
        return stream.forecast(now, horizon_s) if stream is not None else 0.0

    def peak(self, key: K, now: float, horizon_s: float) -> float:
        stream = self.streams.get(key)
        return stream.peak(now, horizon_s) if stream is not None else 0.0
