"""Live accuracy: what applications' ground truth says each variant delivers. Pure.

Applications report the true label of queries they sent (``client.feedback``);
the entry node that answered compares it with the class it returned and
records the outcome here, per variant. Once a variant has ``min_samples``
outcomes its live accuracy (over the last ``window`` of them) replaces the
validation figure in planning, so a variant that no longer delivers what it
promised stops being chosen for SLOs it cannot meet; :meth:`report` shows
both figures and whether it fell short.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["LiveAccuracy", "LiveFigure"]


@dataclass(frozen=True, slots=True)
class LiveFigure:
    variant: str
    live: float
    samples: int
    promised: float | None
    #: True when the live figure is below the promised one by more than the tolerance.
    below_promise: bool

    def to_json(self) -> dict[str, object]:
        return {"live": round(self.live, 4), "samples": self.samples,
                "promised": self.promised, "below_promise": self.below_promise}


class LiveAccuracy:
    """Outcomes per variant, over a sliding window."""

    def __init__(self, *, window: int = 1000, min_samples: int = 50,
                 tolerance: float = 0.01) -> None:
        if window < 1 or min_samples < 1:
            raise ValueError("window and min_samples must be at least 1")
        self.window = window
        self.min_samples = min_samples
        #: how far below its promise a variant may fall before it is flagged
        self.tolerance = tolerance
        self._outcomes: dict[str, collections.deque[bool]] = {}
        self._correct: dict[str, int] = {}

    def record(self, variant: str, correct: bool) -> None:
        seen = self._outcomes.setdefault(variant, collections.deque())
        if len(seen) == self.window:
            self._correct[variant] -= seen.popleft()
        seen.append(correct)
        self._correct[variant] = self._correct.get(variant, 0) + correct

    def live(self, variant: str) -> float | None:
        """The live accuracy once there are ``min_samples`` outcomes, else None."""
        seen = self._outcomes.get(variant)
        if not seen or len(seen) < self.min_samples:
            return None
        return self._correct[variant] / len(seen)

    def overrides(self) -> dict[str, float]:
        """variant -> live accuracy, for every variant with enough outcomes."""
        out = {}
        for variant in self._outcomes:
            value = self.live(variant)
            if value is not None:
                out[variant] = value
        return out

    def report(self, promised: Mapping[str, float]) -> dict[str, LiveFigure]:
        out = {}
        for variant, seen in sorted(self._outcomes.items()):
            live = self._correct[variant] / len(seen)
            claim = promised.get(variant)
            below = (len(seen) >= self.min_samples and claim is not None
                     and live < claim - self.tolerance)
            out[variant] = LiveFigure(variant, live, len(seen), claim, below)
        return out
