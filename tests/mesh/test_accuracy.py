"""Live accuracy per variant: a window of outcomes, a minimum before it counts."""

from __future__ import annotations

import pytest

from mesh.accuracy import LiveAccuracy


def test_live_accuracy_counts_only_with_enough_outcomes_and_over_its_window() -> None:
    live = LiveAccuracy(window=4, min_samples=3, tolerance=0.05)
    live.record("m", True)
    live.record("m", True)
    assert live.live("m") is None and live.overrides() == {}
    live.record("m", False)
    assert live.live("m") == pytest.approx(2 / 3)
    for _ in range(4):  # the window forgets the early successes
        live.record("m", False)
    assert live.live("m") == 0.0
    report = live.report({"m": 0.9})["m"]
    assert report.below_promise and report.samples == 4 and report.promised == 0.9


def test_a_variant_within_tolerance_of_its_promise_is_not_flagged() -> None:
    live = LiveAccuracy(window=100, min_samples=10, tolerance=0.05)
    for i in range(20):
        live.record("m", i % 10 != 0)  # 90 %
    assert not live.report({"m": 0.92})["m"].below_promise
    assert live.report({"m": 0.99})["m"].below_promise
