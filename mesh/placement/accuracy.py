"""Accuracy scaling: under load, serve a query with a cheaper variant that still meets its
``min_accuracy``, before the better one would miss its latency target (as Proteus does).

:func:`scale_accuracy` is pure: given the variants a query could be served
by (each with its accuracy and its latency predicted under the current load,
queue included) and the query's SLO, it keeps the most accurate variant
while that one leaves ``slack_frac`` of the latency target unused and is
not saturated, and otherwise steps down to the most accurate variant that
does, never below ``min_accuracy``. The answer says which variant, the
accuracy delivered, whether it is a step down, and why.

How the planner uses it (which candidates it passes, per entry or per
host) is the planner's business; this module only decides.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ServingOption", "AccuracyChoice", "scale_accuracy"]


@dataclass(frozen=True, slots=True)
class ServingOption:
    """A variant a query could be served by, as predicted now."""

    variant: str
    accuracy: float
    #: end-to-end latency predicted under the current load (network, queue, compute)
    predicted_ms: float
    #: how busy its host's workers are (1.0: saturated); above ``busy_util`` it is avoided
    utilization: float = 0.0


@dataclass(frozen=True, slots=True)
class AccuracyChoice:
    """The variant to serve with, and why."""

    variant: str
    accuracy: float
    predicted_ms: float
    #: a less accurate variant than the best one allowed was chosen because of load
    degraded: bool
    #: the prediction fits the latency target (False: best effort, nothing fits)
    fits: bool
    reason: str


def scale_accuracy(options: Iterable[ServingOption], *, latency_ms: float | None,
                   min_accuracy: float | None, slack_frac: float = 0.2,
                   busy_util: float = 0.9) -> AccuracyChoice | None:
    """The most accurate option that keeps ``slack_frac`` of ``latency_ms`` and is below
    ``busy_util``; among those meeting ``min_accuracy`` only.

    Without a latency target the most accurate option that is not saturated
    is chosen. When nothing keeps its slack, the option with the lowest
    prediction is returned (``fits`` says whether even that one meets the
    target). Returns None when no option meets ``min_accuracy``. Raises
    ``ValueError`` for a slack outside [0, 1).
    """
    if not 0 <= slack_frac < 1:
        raise ValueError(f"slack_frac must be in [0, 1), got {slack_frac!r}")
    eligible = sorted((o for o in options
                       if min_accuracy is None or o.accuracy >= min_accuracy),
                      key=lambda o: (-o.accuracy, o.predicted_ms, o.variant))
    if not eligible:
        return None
    best = eligible[0]
    floor = "" if min_accuracy is None else f" (min_accuracy {min_accuracy:g})"
    budget = math.inf if latency_ms is None else latency_ms * (1 - slack_frac)
    for o in eligible:
        if o.predicted_ms <= budget and o.utilization < busy_util:
            if o is best:
                return AccuracyChoice(o.variant, o.accuracy, o.predicted_ms, False, True,
                                      f"{o.variant} is the most accurate{floor} and keeps its "
                                      "slack")
            why = (f"{best.variant} is {best.utilization:.0%} busy" if best.utilization >= busy_util
                   else f"{best.variant} would take {best.predicted_ms:.1f} ms of the "
                        f"{latency_ms:g} ms target (more than {1 - slack_frac:.0%} of it)")
            return AccuracyChoice(o.variant, o.accuracy, o.predicted_ms, True, True,
                                  f"{why}; {o.variant} (accuracy {o.accuracy:.3f}{floor}) answers "
                                  f"in {o.predicted_ms:.1f} ms")
    fastest = min(eligible, key=lambda o: (o.predicted_ms, -o.accuracy, o.variant))
    fits = latency_ms is None or fastest.predicted_ms <= latency_ms
    target = "" if latency_ms is None else f" of {latency_ms:g} ms"
    return AccuracyChoice(fastest.variant, fastest.accuracy, fastest.predicted_ms,
                          fastest is not best, fits,
                          f"no variant{floor} keeps its slack{target}: {fastest.variant} is the "
                          f"fastest ({fastest.predicted_ms:.1f} ms)")
