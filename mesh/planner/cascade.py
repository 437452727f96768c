"""The ``cascade`` policy: answer small at the entry, name where unsure rows go.

The first stage is the cheapest feasible variant on the entry node itself
(any node when the entry has none that can serve). The second is a more
accurate variant: with ``min_accuracy``, the cheapest that meets it (even
when it is late, since accuracy is what escalation is for); without, the
most accurate that fits what is left of the latency target. The data plane
(``nodes/cascade.py``) decides per row, by confidence, whether to use it.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import TYPE_CHECKING

from mesh.errors import NoRoute
from mesh.planner.model import Decision, Escalation
from mesh.planner.tables import CandidateTable, Row
from mesh.state import MeshView
from mesh.wire import SLO

if TYPE_CHECKING:
    from mesh.planner.core import Planner

__all__ = ["plan_cascade"]


def _upstream(table: CandidateTable, slo: SLO, accuracy: float) -> tuple[Row, ...]:
    """Rows more accurate than the first stage, in the order the second stage walks them."""
    key = ("upstream", accuracy, slo.min_accuracy)
    rows = table.cache.get(key)
    if rows is None:
        order = table.by_cost if slo.min_accuracy is not None else table.by_accuracy
        rows = tuple(r for r in order if r.accuracy > accuracy)
        if slo.min_accuracy is not None:
            rows = tuple(r for r in rows if r.accuracy >= slo.min_accuracy) or rows
        table.cache[key] = rows
    return rows


def plan_cascade(planner: Planner, table: CandidateTable, slo: SLO, target: float | None,
                 view: MeshView, now: float, rows: int, payload: int,
                 rng: random.Random) -> Decision:
    max_cost = slo.max_cost_per_1k
    picked = None
    if table.local_by_cost:
        picked = planner._select(table.local_by_cost, "cheapest", target, None, max_cost, view,
                                 now, rows, payload, rng)
    if picked is None:  # nothing usable at the entry itself: the nearest that is
        picked = planner._select(table.by_cost, "cheapest", target, None, max_cost, view, now,
                                 rows, payload, rng)
    missed = None
    if picked is not None:
        row, total = picked[0][0], picked[0][1]
        accuracy, node, variant = row.accuracy, row.node, row.variant
    else:  # nothing feasible anywhere: the closest miss answers
        missed = replace(planner._decide(table, table.by_cost, "cheapest", target, None,
                                         max_cost, view, now, rows, payload, rng),
                         policy="cascade")
        accuracy, node, variant = missed.accuracy, missed.node, missed.variant
        total = missed.prediction.total_ms

    def answer(escalation: Escalation | None, note: str = "") -> Decision:
        """The first stage's decision, with its escalation (or the note why there is none)."""
        why = None if escalation is None else (
            "cascade", variant, node, escalation.threshold, escalation.variant,
            escalation.node, accuracy, escalation.accuracy)
        if missed is not None:
            return replace(missed, escalation=escalation, why=why or missed.reason + note)
        assert picked is not None
        decision = planner._decision(picked, "cascade", rows, payload, escalation, why)
        return decision if why is not None else replace(decision, why=decision.reason + note)

    upstream = _upstream(table, slo, accuracy)
    if not upstream:
        return answer(None, "; nothing more accurate is reachable, so nothing is escalated")
    remaining = None if target is None else target - total * (1 + planner.margin_frac)
    policy = "cheapest" if slo.min_accuracy is not None else "most-accurate"
    second = planner._select(upstream, policy, remaining, slo.min_accuracy, max_cost, view, now,
                             rows, payload, rng)
    threshold = slo.min_confidence if slo.min_confidence is not None else (
        planner.cascade_threshold)
    if second is not None:
        r = second[0][0]
        prediction = planner._prediction(second, rows, payload)[0]
        escalation = Escalation(r.node, r.tier, r.variant, r.accuracy, prediction, threshold,
                                True)
    else:
        try:
            late = planner._closest(table, upstream, remaining, slo.min_accuracy, max_cost, view,
                                    now, rows, payload, policy)
        except NoRoute:
            return answer(None, "; every more accurate host is down")
        escalation = Escalation(late.node, late.tier, late.variant, late.accuracy,
                                late.prediction, threshold, late.feasible)
    return answer(escalation)
