"""Forecasts: an EWMA that follows the rate, and a daily shape learned from arrivals."""

from __future__ import annotations

import math

import pytest

from mesh.placement import ArrivalForecast, Forecaster

DAY = 2400.0  # a day compressed into 40 minutes, as the benchmark replays it


def daily(t: float) -> float:
    """Quiet nights, a morning rise to a noon peak (30 -> 330 q/s)."""
    return 180.0 - 150.0 * math.cos(2 * math.pi * t / DAY)


def _learn(days: float, *, step: float = 10.0, **kw) -> tuple[ArrivalForecast, float]:
    stream = ArrivalForecast(period_s=DAY, buckets=24, half_life_s=60.0, **kw)
    t = 0.0
    while t < days * DAY:
        t += step
        stream.observe(daily(t), t)
    return stream, t


def test_the_ewma_follows_a_step_in_the_rate_with_its_half_life() -> None:
    stream = ArrivalForecast(half_life_s=60.0)
    for t in range(0, 601, 5):
        stream.observe(10.0, float(t))
    assert stream.rate(600.0) == pytest.approx(10.0)
    stream.observe(110.0, 660.0)  # one half-life at the new rate
    assert stream.rate(660.0) == pytest.approx(60.0)
    assert stream.forecast(660.0, 600.0) == pytest.approx(60.0)  # no shape yet: flat


def test_a_daily_shape_is_learned_and_forecasts_the_morning_rise() -> None:
    stream, now = _learn(3)
    assert stream.shape_ready
    shape = stream.shape()
    assert len(shape) == 24
    assert max(shape) > 1.6 and min(shape) < 0.4  # busy noon, quiet night
    assert shape.index(max(shape)) in (11, 12)

    # At 6 a.m. (a quarter into the day) the rate is rising fast: look 3 "hours" ahead.
    morning = now + DAY / 4
    stream.observe(daily(morning), morning)
    horizon = DAY / 8
    truth = daily(morning + horizon)
    assert stream.forecast(morning, horizon) == pytest.approx(truth, rel=0.15)
    # the EWMA alone still says what the rate is now, far below what is coming
    assert stream.rate(morning) < 0.75 * truth
    assert stream.peak(morning, horizon) >= stream.forecast(morning, horizon)


def test_the_shape_stays_flat_until_every_slice_of_the_day_was_seen() -> None:
    stream, now = _learn(0.5)
    assert not stream.shape_ready
    assert stream.shape() == (1.0,) * 24
    assert stream.forecast(now, DAY / 4) == pytest.approx(stream.rate(now))


def test_a_changed_habit_is_learned_within_a_week() -> None:
    stream, now = _learn(2)
    # From now on, nights are as busy as noons: flat 300 q/s.
    t = now
    while t < now + 7 * DAY:  # each day moves each slice 30% of the way (shape_alpha)
        t += 10.0
        stream.observe(300.0, t)
    assert max(stream.shape()) < 1.1 and min(stream.shape()) > 0.9
    assert stream.forecast(t, DAY / 2) == pytest.approx(300.0, rel=0.15)


def test_late_and_bad_observations() -> None:
    stream = ArrivalForecast()
    stream.observe(5.0, 100.0)
    stream.observe(500.0, 50.0)  # older than the last one: arrived late, ignored
    assert stream.rate(100.0) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="rate_qps must be a finite number >= 0, got -1"):
        stream.observe(-1.0, 200.0)
    with pytest.raises(ValueError, match="buckets must be between 1 and 10000"):
        ArrivalForecast(buckets=0)
    with pytest.raises(ValueError, match="half_life_s must be > 0"):
        Forecaster(half_life_s=0)


def test_arrival_counts_become_rates() -> None:
    stream = ArrivalForecast(half_life_s=1e-6)  # no smoothing: the last rate
    stream.observe_arrivals(0, 0.0)
    stream.observe_arrivals(50, 10.0)
    assert stream.rate(10.0) == pytest.approx(5.0)


def test_the_forecaster_keeps_one_stream_per_key() -> None:
    fc: Forecaster[tuple[str, str]] = Forecaster(half_life_s=1e-6)
    fc.observe(("digits", "site-1"), 40.0, 1.0)
    fc.observe(("digits", "site-2"), 4.0, 1.0)
    assert fc.rate(("digits", "site-1"), 1.0) == pytest.approx(40.0)
    assert fc.forecast(("digits", "site-2"), 1.0, 60.0) == pytest.approx(4.0)
    assert fc.rate(("minilm", "site-1"), 1.0) == 0.0
    assert ("digits", "site-1") in fc
