"""The ``cascade`` policy: answer small at the entry, name where unsure rows go.

The first stage is the cheapest feasible variant on the entry node itself
(any node when the entry has none that can serve). The second is a more
accurate variant: with ``min_accuracy``, the cheapest that meets it (even
when it is late, since accuracy is what escalation is for); without, the
most accurate that fits what is left of the latency target. The data plane
(``nodes/cascade.py``) decides per row, by confidence, whether to use it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from mesh.errors import NoRoute
from mesh.planner.model import Decision, Escalation, Rank
from mesh.planner.query import Limits
from mesh.planner.walk import closest, decision, prediction, select

if TYPE_CHECKING:
    from mesh.planner.query import PlanView, Query
    from mesh.planner.tables import CandidateTable, Row

__all__ = ["Cascade"]


_COST, _ACCURACY = Rank.COST, Rank.ACCURACY
_new = tuple.__new__  # builds a named tuple from its fields, as NamedTuple._make does


def _upstream(table: CandidateTable, accuracy: float, min_acc: float | None
              ) -> tuple[Row, ...]:
    """Rows more accurate than the first stage, in the order the second stage walks them."""
    key = ("upstream", accuracy, min_acc)
    rows = table.cache.get(key)
    if rows is None:
        order = table.by_cost if min_acc is not None else table.by_accuracy
        rows = tuple(r for r in order if r.accuracy > accuracy)
        if min_acc is not None:
            rows = tuple(r for r in rows if r.accuracy >= min_acc) or rows
        table.cache[key] = rows  # bounded: clients choose min_accuracy
    return rows


class Cascade:
    """The cheapest variant at the entry answers; unsure rows escalate upstream."""

    name = "cascade"
    rank = Rank.COST  # the first stage is the cheapest

    def choose(self, table: CandidateTable, query: Query, view: PlanView) -> Decision:
        slo = query.slo
        target = None if slo.offline else slo.latency_ms
        max_cost = slo.max_cost_per_1k
        first_stage = _new(Limits, (target, None, max_cost))  # any accuracy answers first
        picked = None
        if table.local_by_cost:
            picked = select(table.local_by_cost, _COST, query, view, first_stage)
        if picked is None:  # nothing usable at the entry itself: the nearest that is
            picked = select(table.by_cost, _COST, query, view, first_stage)
        missed = None
        if picked is not None:
            row, total = picked[0][0], picked[0][1]
            accuracy, node, variant = row.accuracy, row.node, row.variant
        else:  # nothing feasible anywhere: the closest miss answers
            missed = closest(table, table.by_cost, query, view, policy=self.name,
                             limits=first_stage)
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
            first = decision(picked, query, view, policy=self.name, rank=_COST,
                             escalation=escalation, why=why)
            return first if why is not None else replace(first, why=first.reason + note)

        upstream = _upstream(table, accuracy, slo.min_accuracy)
        if not upstream:
            return answer(None, "; nothing more accurate is reachable, so nothing is escalated")
        tuning = view.tuning
        second_stage = _new(Limits, (
            None if target is None else target - total * (1 + tuning.margin_frac),
            slo.min_accuracy, max_cost))
        rank = _COST if slo.min_accuracy is not None else _ACCURACY
        second = select(upstream, rank, query, view, second_stage)
        threshold = slo.min_confidence if slo.min_confidence is not None else (
            tuning.cascade_threshold)
        if second is not None:
            r = second[0][0]
            escalation = Escalation(r.node, r.tier, r.variant, r.accuracy,
                                    prediction(second, query, tuning)[0], threshold, True)
        else:
            try:
                late = closest(table, upstream, query, view, policy=self.name,
                               limits=second_stage)
            except NoRoute:
                return answer(None, "; every more accurate host is down")
            escalation = Escalation(late.node, late.tier, late.variant, late.accuracy,
                                    late.prediction, threshold, late.feasible)
        return answer(escalation)
