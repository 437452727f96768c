"""Agreement and accuracy: the numbers that decide whether a variant is accepted."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.variants.evaluate import Limits, Thresholds, accuracy, agreement, check


def _scores(n: int = 200, k: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def test_identical_outputs_agree_fully() -> None:
    ref = _scores()
    metrics = agreement(ref, ref.copy(), "classes")
    assert metrics == {"max_abs_diff": 0.0, "top1_agreement": 1.0}
    assert check(metrics, Thresholds().fp32_classes) is None


def test_flipped_predictions_lower_top1_agreement_and_fail_the_check() -> None:
    ref = _scores()
    cand = ref.copy()
    cand[:20] = -cand[:20]  # 20 of 200 rows now pick another class
    metrics = agreement(ref, cand, "classes")
    assert metrics["top1_agreement"] == pytest.approx(0.9, abs=0.01)
    reason = check(metrics, Thresholds().int8_classes)
    assert reason is not None and reason.startswith("top1_agreement 0.9")
    assert ">= 0.97" in reason


def test_small_noise_passes_int8_but_not_fp32_limits() -> None:
    ref = _scores() * 5
    cand = ref + np.random.default_rng(1).normal(0, 0.01, ref.shape).astype(np.float32)
    metrics = agreement(ref, cand, "classes")
    assert check(metrics, Thresholds().int8_classes) is None
    assert "max_abs_diff" in (check(metrics, Thresholds().fp32_classes) or "")


def test_max_abs_diff_is_relative_to_the_output_scale() -> None:
    ref = np.full((4, 3), 1000.0, dtype=np.float32)
    ref[:, 0] += 1.0
    cand = ref + 0.5
    assert agreement(ref, cand, "classes")["max_abs_diff"] == pytest.approx(0.5 / 1001.0)


def test_embedding_agreement_measures_cosine_and_nearest_neighbours() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((50, 16))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    same = agreement(ref, ref * 3.0, "embedding")  # direction is all that counts
    assert same["mean_cosine"] == pytest.approx(1.0)
    assert same["nn_agreement"] == 1.0
    scrambled = agreement(ref, rng.standard_normal((50, 16)), "embedding")
    assert scrambled["mean_cosine"] < 0.5
    assert scrambled["nn_agreement"] < 0.5
    assert "mean_cosine" in (check(scrambled, Thresholds().int8_embedding) or "")


def test_accuracy_uses_labels_when_given_else_agreement() -> None:
    ref = np.eye(4, dtype=np.float32)
    out = ref.copy()
    out[3] = [1, 0, 0, 0]
    labels = np.array([0, 1, 3, 3])  # predictions are 0, 1, 2, 0
    assert accuracy(out, ref, labels, "classes") == (0.5, "top1")
    assert accuracy(out, ref, None, "classes") == (0.75, "top1_agreement")
    value, metric = accuracy(ref, ref, None, "embedding")
    assert (value, metric) == (pytest.approx(1.0), "cosine")


def test_mismatched_shapes_and_unknown_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match="output shapes differ"):
        agreement(np.zeros((3, 2)), np.zeros((3, 4)), "classes")
    with pytest.raises(ValueError, match="kind 'regression'"):
        agreement(np.zeros((3, 2)), np.zeros((3, 2)), "regression")
    with pytest.raises(ValueError, match="no thresholds"):
        Thresholds().limits("fp16", "classes")


def test_unchecked_limits_pass() -> None:
    assert check({"top1_agreement": 0.1}, Limits()) is None
