"""Accuracy scaling: a cheaper variant that still meets min_accuracy, before the SLO is missed."""

from __future__ import annotations

import pytest

from mesh.placement import ServingOption, scale_accuracy

CNN = ServingOption("digits-cnn", 0.996, 6.0)
INT8 = ServingOption("digits-cnn-int8", 0.994, 3.0)
MLP = ServingOption("digits-mlp", 0.972, 1.0)


def test_the_most_accurate_variant_serves_while_it_keeps_its_slack() -> None:
    choice = scale_accuracy([MLP, CNN, INT8], latency_ms=10, min_accuracy=0.97)
    assert (choice.variant, choice.degraded, choice.fits) == ("digits-cnn", False, True)
    assert choice.accuracy == 0.996


def test_under_load_a_cheaper_variant_that_meets_min_accuracy_takes_over() -> None:
    queued = ServingOption("digits-cnn", 0.996, 8.5)  # fits 10 ms, but not with 20% slack
    choice = scale_accuracy([MLP, queued, INT8], latency_ms=10, min_accuracy=0.99)
    assert (choice.variant, choice.degraded) == ("digits-cnn-int8", True)
    assert choice.accuracy == 0.994
    assert "digits-cnn would take 8.5 ms of the 10 ms target" in choice.reason
    # a stricter floor keeps the accurate one, best effort
    strict = scale_accuracy([MLP, queued, INT8], latency_ms=10, min_accuracy=0.995)
    assert (strict.variant, strict.degraded, strict.fits) == ("digits-cnn", False, True)
    assert "no variant (min_accuracy 0.995) keeps its slack" in strict.reason


def test_a_saturated_host_is_avoided_without_a_latency_target() -> None:
    busy = ServingOption("digits-cnn", 0.996, 2.0, utilization=0.97)
    choice = scale_accuracy([busy, INT8], latency_ms=None, min_accuracy=None)
    assert choice.variant == "digits-cnn-int8"
    assert "digits-cnn is 97% busy" in choice.reason


def test_nothing_accurate_enough_and_nothing_fast_enough() -> None:
    assert scale_accuracy([MLP, INT8], latency_ms=10, min_accuracy=0.999) is None
    late = scale_accuracy([CNN, INT8], latency_ms=2, min_accuracy=0.99)
    assert (late.variant, late.fits, late.degraded) == ("digits-cnn-int8", False, True)
    with pytest.raises(ValueError, match="slack_frac must be in"):
        scale_accuracy([CNN], latency_ms=10, min_accuracy=None, slack_frac=1.0)
