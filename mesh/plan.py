"""The plan an answer carries: what served the query, what was predicted, and why. Pure.

A :class:`Plan` is made from the planner's :class:`~mesh.planner.Decision` at
the node that planned the query, amended (never mutated) when the query is
handed to another candidate or planned again further along, and sent with
the answer (:meth:`Plan.to_wire`). The SDK reads it back with
:meth:`Plan.from_wire` into :attr:`mesh.Result.plan`. It always describes the
(node, variant) that served the query: ``accuracy`` and ``feasible`` are
that variant's, so ``slo_met`` can be computed from it.

On the wire it is a msgpack map with the field names below; absent optional
fields are left out. Unknown keys are ignored, so a newer node can add some.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["Plan", "Detour"]

#: The parts of a predicted latency split, in milliseconds.
PREDICTED_KEYS = ("network_ms", "queue_ms", "compute_ms", "load_ms", "total_ms")


@dataclass(frozen=True, slots=True)
class Detour:
    """Where the query was first meant to run, and why it did not run there."""

    node: str
    variant: str
    reason: str

    def to_wire(self) -> dict[str, str]:
        return {"node": self.node, "variant": self.variant, "reason": self.reason}

    @classmethod
    def from_wire(cls, obj: Any) -> Detour | None:
        if not isinstance(obj, Mapping):
            return None
        return cls(str(obj.get("node", "")), str(obj.get("variant", "")),
                   str(obj.get("reason", "")))


@dataclass(frozen=True, slots=True)
class Plan:
    """What served one query and what the planner expected of it."""

    node: str
    tier: str
    variant: str
    #: Measured held-out accuracy of ``variant`` (None when the node does not know it).
    accuracy: float | None
    #: False when the mesh knowingly answered outside the SLO.
    feasible: bool
    policy: str = "cheapest"
    reason: str = ""
    #: The predicted latency split (PREDICTED_KEYS) for this (node, variant); empty when
    #: the query ran somewhere it was not predicted for.
    predicted: Mapping[str, float] = field(default_factory=dict)
    cost_per_1k: float | None = None
    margin_ms: float = 0.0
    #: How many near-equivalent candidates the winner was drawn from.
    equivalents: int = 1
    runner_up: str | None = None
    #: A cascade's escalation target, as the planner described it.
    escalation: Mapping[str, Any] | None = None
    #: The planned (node, variant) refused the query or could not be reached.
    handed_back: Detour | None = None
    #: A node further along planned the query again; this was the plan before it.
    replanned_from: Detour | None = None
    #: A cascade's outcome: rows escalated, threshold, where to, what failed.
    cascade: Mapping[str, Any] | None = None
    #: Why the answer is worse than the SLO asked for because part of the mesh is down or
    #: cut off (a partition, an ejected node): served by the best variant reachable, whose
    #: accuracy is ``accuracy``. None: not degraded by a failure.
    degraded: str | None = None

    @classmethod
    def from_decision(cls, decision: Any) -> Plan:
        """From a :class:`~mesh.planner.Decision` (duck-typed: this module stays below it)."""
        escalation = decision.escalation.to_dict() if decision.escalation is not None else None
        p = decision.prediction
        predicted = {"network_ms": p.network_ms, "queue_ms": p.queue_ms,
                     "compute_ms": p.compute_ms, "load_ms": p.load_ms,
                     "total_ms": p.network_ms + p.queue_ms + p.compute_ms + p.load_ms}
        return cls(decision.node, decision.tier, decision.variant, decision.accuracy,
                   decision.feasible, decision.policy, decision.reason, predicted,
                   decision.cost_per_1k, decision.margin_ms, decision.equivalents,
                   decision.runner_up, escalation)

    def amended(self, **changes: Any) -> Plan:
        return replace(self, **changes)

    def describes(self, node: str, variant: str) -> bool:
        return self.node == node and self.variant == variant

    # ------------------------------------------------------------------ wire
    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.node, "tier": self.tier, "variant": self.variant,
                               "accuracy": self.accuracy, "feasible": self.feasible,
                               "policy": self.policy, "reason": self.reason,
                               "margin_ms": self.margin_ms, "equivalents": self.equivalents}
        if self.predicted:
            out["predicted"] = dict(self.predicted)
        if self.cost_per_1k is not None:
            out["cost_per_1k"] = self.cost_per_1k
        if self.runner_up is not None:
            out["runner_up"] = self.runner_up
        if self.escalation is not None:
            out["escalation"] = dict(self.escalation)
        if self.handed_back is not None:
            out["handed_back"] = self.handed_back.to_wire()
        if self.replanned_from is not None:
            out["replanned_from"] = self.replanned_from.to_wire()
        if self.cascade is not None:
            out["cascade"] = dict(self.cascade)
        if self.degraded is not None:
            out["degraded"] = self.degraded
        return out

    @classmethod
    def from_wire(cls, obj: Any) -> Plan | None:
        """The plan in an answer, or None when there is none. Lenient: wrong types drop out."""
        if not isinstance(obj, Mapping) or not obj.get("node"):
            return None
        predicted = obj.get("predicted")
        return cls(
            node=str(obj.get("node", "")), tier=str(obj.get("tier", "")),
            variant=str(obj.get("variant", "")), accuracy=_number(obj.get("accuracy")),
            feasible=obj.get("feasible") is not False, policy=str(obj.get("policy", "")),
            reason=str(obj.get("reason", "")),
            predicted={k: float(v) for k, v in predicted.items()
                       if k in PREDICTED_KEYS and _number(v) is not None}
            if isinstance(predicted, Mapping) else {},
            cost_per_1k=_number(obj.get("cost_per_1k")),
            margin_ms=_number(obj.get("margin_ms")) or 0.0,
            equivalents=int(obj["equivalents"]) if isinstance(obj.get("equivalents"), int) else 1,
            runner_up=obj.get("runner_up") if isinstance(obj.get("runner_up"), str) else None,
            escalation=dict(obj["escalation"]) if isinstance(obj.get("escalation"), Mapping)
            else None,
            handed_back=Detour.from_wire(obj.get("handed_back")),
            replanned_from=Detour.from_wire(obj.get("replanned_from")),
            cascade=dict(obj["cascade"]) if isinstance(obj.get("cascade"), Mapping) else None,
            degraded=obj["degraded"][:500] if isinstance(obj.get("degraded"), str) else None,
        )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
