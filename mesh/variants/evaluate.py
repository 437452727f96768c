"""Accuracy and agreement: how a variant's outputs compare with the labels and the original.

Two output kinds:

- ``classes``: ``[N, C]`` scores (logits or probabilities); the answer is the
  argmax. Accuracy is top-1 against the labels when the validation set has
  them (metric ``top1``), else top-1 agreement with the original
  (``top1_agreement``).
- ``embedding``: ``[N, D]`` vectors; the answer is the direction. Accuracy is
  the mean cosine similarity with the original's vectors (``cosine``).

Agreement metrics (:func:`agreement`) compare a variant with the original on
the same inputs: ``max_abs_diff`` for every kind, ``top1_agreement`` for
classes, ``mean_cosine``, ``min_cosine`` and ``nn_agreement`` (the share of
rows whose nearest other row is the same under both models) for embeddings.
:func:`check` holds them against a :class:`Thresholds` tier (``fp32``,
``int8`` or ``student``) and says which limit failed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["KINDS", "Limits", "Thresholds", "agreement", "accuracy", "check"]

KINDS = ("classes", "embedding")


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits one variant must meet to be accepted (``None``: not checked)."""

    min_top1_agreement: float | None = None
    max_abs_diff: float | None = None
    min_mean_cosine: float | None = None
    min_nn_agreement: float | None = None


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Acceptance limits per kind of variant. ``max_abs_diff`` is relative to max(1, max|original|)."""

    fp32_classes: Limits = Limits(min_top1_agreement=0.99, max_abs_diff=1e-3)
    fp32_embedding: Limits = Limits(min_mean_cosine=0.9999, max_abs_diff=1e-3)
    int8_classes: Limits = Limits(min_top1_agreement=0.97)
    int8_embedding: Limits = Limits(min_mean_cosine=0.98, min_nn_agreement=0.85)
    student_classes: Limits = Limits(min_top1_agreement=0.90)
    student_embedding: Limits = Limits(min_mean_cosine=0.90)

    def limits(self, tier: str, kind: str) -> Limits:
        """The limits for ``tier`` (fp32, int8, student) and output ``kind``."""
        try:
            return getattr(self, f"{tier}_{kind}")  # type: ignore[no-any-return]
        except AttributeError:
            raise ValueError(f"no thresholds for tier {tier!r} and kind {kind!r}") from None


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")


def _unit(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1).astype(np.float64)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def _nearest_other(unit: np.ndarray) -> np.ndarray:
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return np.argmax(sims, axis=1)


def agreement(reference: np.ndarray, candidate: np.ndarray, kind: str) -> dict[str, float]:
    """Agreement metrics of ``candidate`` with ``reference`` (same inputs, first output)."""
    _check_kind(kind)
    if reference.shape != candidate.shape:
        raise ValueError(f"output shapes differ: original {reference.shape}, "
                         f"variant {candidate.shape}")
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    scale = max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    metrics = {"max_abs_diff": float(np.max(np.abs(ref - cand)) / scale) if ref.size else 0.0}
    if kind == "classes":
        metrics["top1_agreement"] = float(np.mean(
            ref.reshape(len(ref), -1).argmax(1) == cand.reshape(len(cand), -1).argmax(1)))
    else:
        ur, uc = _unit(ref), _unit(cand)
        cos = np.sum(ur * uc, axis=1)
        metrics["mean_cosine"] = float(np.mean(cos))
        metrics["min_cosine"] = float(np.min(cos))
        if len(ref) > 1:
            metrics["nn_agreement"] = float(np.mean(_nearest_other(ur) == _nearest_other(uc)))
    return metrics


def accuracy(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None,
             kind: str) -> tuple[float, str]:
    """``(value, metric)``: what the registry records as a variant's accuracy (module docstring)."""
    _check_kind(kind)
    if kind == "classes":
        predicted = outputs.reshape(len(outputs), -1).argmax(1)
        if labels is not None:
            return float(np.mean(predicted == labels)), "top1"
        return float(np.mean(predicted == reference.reshape(len(reference), -1).argmax(1))), \
            "top1_agreement"
    return float(np.mean(np.sum(_unit(outputs) * _unit(reference), axis=1))), "cosine"


def check(metrics: dict[str, float], limits: Limits) -> str | None:
    """``None`` when ``metrics`` meet ``limits``, else the first failure in words."""
    tests = [
        ("top1_agreement", limits.min_top1_agreement, ">="),
        ("mean_cosine", limits.min_mean_cosine, ">="),
        ("nn_agreement", limits.min_nn_agreement, ">="),
        ("max_abs_diff", limits.max_abs_diff, "<="),
    ]
    for name, limit, op in tests:
        if limit is None or name not in metrics:
            continue
        value = metrics[name]
        ok = value >= limit if op == ">=" else value <= limit
        if not ok:
            return f"{name} {value:.4g} misses the limit {op} {limit:g}"
    return None
