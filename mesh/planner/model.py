"""The planner's value objects: candidates, predictions, scores, decisions, ranks."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # mesh.wire imports the policy registry, which imports this: keep it light
    from mesh.registry import Profile

__all__ = ["Candidate", "Prediction", "Scored", "Escalation", "Decision", "Rank"]


class Rank(enum.Enum):
    """How a walk over a candidate table ranks the feasible rows (``mesh.planner.walk``).

    Each has its own static row order in a :class:`~mesh.planner.tables.CandidateTable`,
    its own rule for stopping early, and its own window of near-equivalent rows
    that share the load by power of two choices.
    """

    #: Lowest cost per inference, then lowest predicted latency.
    COST = "cost"
    #: Highest accuracy, then cheapest, then fastest.
    ACCURACY = "accuracy"
    #: Lowest predicted latency, then cheapest.
    LATENCY = "latency"

    # Members are singletons compared by identity; Enum's own __hash__ is Python code, and
    # ranks key the per-table caches read on every query.
    __hash__ = object.__hash__

_T = TypeVar("_T")


def _fills_slots(cls: type[_T]) -> type[_T]:
    """Give a frozen, slotted dataclass an ``__init__`` that fills its slots directly.

    The ``__init__`` dataclasses generate for a frozen class goes through
    ``object.__setattr__`` once per field; calling each slot's own setter
    does the same work in half the time. A :class:`Decision` and its
    :class:`Prediction` (and a cascade's :class:`Escalation`) are built on
    every query: this saves about 0.6 us of a 3 us decision
    (``benchmarks/planner.py``). The signature and defaults
    are the generated ones, so construction, ``dataclasses.replace``, pickling
    and equality behave exactly as before; instances stay immutable.
    """
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if any(f.default_factory is not dataclasses.MISSING or not f.init for f in fields):
        raise TypeError(f"{cls.__name__}: only plain fields and plain defaults are supported")
    params = ", ".join(f.name if f.default is dataclasses.MISSING else f"{f.name}=_d_{f.name}"
                       for f in fields)
    closure = [f"_s_{f.name}" for f in fields] + [
        f"_d_{f.name}" for f in fields if f.default is not dataclasses.MISSING]
    source = "\n".join([f"def make({', '.join(closure)}):",
                        f"    def __init__(self, {params}):",
                        *(f"        _s_{f.name}(self, {f.name})" for f in fields),
                        "    return __init__"])
    namespace: dict[str, Any] = {}
    exec(source, {}, namespace)  # noqa: S102  (our own field names, as dataclasses does)
    init = namespace["make"](*(vars(cls)[f.name].__set__ for f in fields),
                             *(f.default for f in fields if f.default is not dataclasses.MISSING))
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[misc]
    return cls


_MS_PER_HOUR = 3_600_000.0
_J_PER_KWH = 3_600_000.0


@dataclass(frozen=True, slots=True)
class Candidate:
    """A (node, variant) pair as seen from one entry node. Precomputed."""

    node: str
    tier: str
    variant: str
    accuracy: float
    path_latency_ms: float  # one way
    hops: int  # links crossed, one way
    bottleneck_mbps: float
    profile: Profile
    max_batch: int
    cost_per_hour: float
    out_bytes_per_row: int
    #: Probability that a packet is lost on the path (one way).
    loss: float = 0.0
    hardware: str = ""
    #: Watts while computing and fixed joules per inference (see HardwareClass).
    power_w: float = 0.0
    energy_per_inference_j: float = 0.0
    energy_cost_per_kwh: float = 0.0

    def energy_j(self, rows: int) -> float:
        """Energy of one inference (joules) when it runs in a batch of ``rows``."""
        per_row_ms = self.profile.latency_ms(rows) / max(rows, 1)
        return self.power_w * per_row_ms / 1000.0 + self.energy_per_inference_j

    def cost_per_1k(self, rows: int) -> float:
        """Cost (USD) of 1,000 inferences at this batch size: machine time plus energy."""
        per_row_ms = self.profile.latency_ms(rows) / max(rows, 1)
        machine = self.cost_per_hour * per_row_ms / _MS_PER_HOUR
        energy = self.energy_j(rows) / _J_PER_KWH * self.energy_cost_per_kwh
        return (machine + energy) * 1000.0


@_fills_slots
@dataclass(frozen=True, slots=True)
class Prediction:
    network_ms: float
    queue_ms: float
    compute_ms: float
    load_ms: float

    @property
    def total_ms(self) -> float:
        return self.network_ms + self.queue_ms + self.compute_ms + self.load_ms

    def to_dict(self) -> dict[str, float]:
        return {"network_ms": round(self.network_ms, 3), "queue_ms": round(self.queue_ms, 3),
                "compute_ms": round(self.compute_ms, 3), "load_ms": round(self.load_ms, 3),
                "total_ms": round(self.total_ms, 3)}


@dataclass(frozen=True, slots=True)
class Scored:
    candidate: Candidate
    prediction: Prediction
    cost_per_1k: float
    problems: tuple[str, ...]  # empty when feasible
    violation: float  # 0 when feasible; grows with how far it misses
    energy_j_per_1k: float = 0.0

    @property
    def feasible(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        c = self.candidate
        return {"node": c.node, "tier": c.tier, "variant": c.variant, "hardware": c.hardware,
                "accuracy": c.accuracy, "cost_per_1k": self.cost_per_1k,
                "energy_j_per_1k": round(self.energy_j_per_1k, 6),
                "predicted": self.prediction.to_dict(), "feasible": self.feasible,
                "problems": list(self.problems)}


@_fills_slots
@dataclass(frozen=True, slots=True)
class Escalation:
    """Where a cascade sends the inputs its first stage is unsure about."""

    node: str
    tier: str
    variant: str
    accuracy: float
    prediction: Prediction
    #: Rows whose top probability is below this are escalated.
    threshold: float
    feasible: bool

    def to_dict(self) -> dict[str, object]:
        return {"node": self.node, "tier": self.tier, "variant": self.variant,
                "accuracy": self.accuracy, "threshold": self.threshold,
                "predicted": self.prediction.to_dict(), "feasible": self.feasible}


@_fills_slots
@dataclass(frozen=True, slots=True)
class Decision:
    """Where one query goes, what it is predicted to cost, and why (:attr:`reason`)."""

    node: str
    tier: str
    variant: str
    accuracy: float
    prediction: Prediction
    feasible: bool
    policy: str
    #: The reason as text, or the numbers it is written from (formatting costs
    #: microseconds, so the hot path leaves it to whoever reads :attr:`reason`).
    why: str | tuple[Any, ...]
    candidates: tuple[Scored, ...] = field(default=())
    cost_per_1k: float = 0.0
    #: The safety margin applied to the prediction before checking the latency target.
    margin_ms: float = 0.0
    #: How many near-equivalent candidates the winner was drawn from (power of two choices).
    equivalents: int = 1
    #: The other candidate of the power-of-two draw, when there was a draw.
    runner_up: str | None = None
    escalation: Escalation | None = None

    def misses_latency(self, target_ms: float | None) -> bool:
        """True when this decision is predicted (with its margin) to miss ``target_ms``."""
        if self.feasible or target_ms is None:
            return False
        if isinstance(self.why, tuple) and self.why[0] == "closest":
            return bool(self.why[1] > target_ms)  # the padded prediction it was judged by
        return self.prediction.total_ms + self.margin_ms > target_ms

    @property
    def reason(self) -> str:
        if isinstance(self.why, str):
            return self.why
        tag, *args = self.why
        return _REASONS[tag](self.policy, *args)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node": self.node, "tier": self.tier, "variant": self.variant,
            "accuracy": self.accuracy, "predicted": self.prediction.to_dict(),
            "feasible": self.feasible, "policy": self.policy, "reason": self.reason,
            "cost_per_1k": self.cost_per_1k, "margin_ms": round(self.margin_ms, 3),
            "equivalents": self.equivalents,
        }
        if self.runner_up is not None:
            out["runner_up"] = self.runner_up
        if self.escalation is not None:
            out["escalation"] = self.escalation.to_dict()
        return out


def _chosen(policy: str, rank: Rank, accuracy: float, total: float, cost: float,
            equivalents: int, runner_up: str | None) -> str:
    if rank is Rank.ACCURACY:
        text = f"most accurate feasible ({accuracy:.4f}, {total:.1f} ms predicted)"
    elif rank is Rank.LATENCY:
        text = f"fastest feasible ({total:.1f} ms predicted, ${cost:.3g}/1k)"
    else:
        text = f"cheapest feasible (${cost:.3g}/1k, {total:.1f} ms predicted)"
    if runner_up is not None:
        text += (f"; {equivalents} near-equivalent candidates, the less loaded of two drawn "
                 f"at random (the other: {runner_up.split('/')[0]})")
    return text


def _closest(policy: str, padded: float, target: float | None, accuracy: float,
             min_acc: float | None, cost: float, max_cost: float | None) -> str:
    problems = []
    if target is not None and padded > target:
        problems.append(f"predicted {padded:.1f} ms (with margin) > {target:g} ms")
    if min_acc is not None and accuracy < min_acc:
        problems.append(f"accuracy {accuracy:.4f} < {min_acc:g}")
    if max_cost is not None and cost > max_cost:
        problems.append(f"cost ${cost:.6f}/1k > ${max_cost:g}/1k")
    return "no candidate meets the SLO; closest: " + ("; ".join(problems) or "none")


def _cascade(policy: str, first: str, first_node: str, threshold: float, second: str,
             second_node: str, first_acc: float, second_acc: float) -> str:
    return (f"cascade: answer with {first} on {first_node}; rows below {threshold:g} "
            f"confidence go to {second} on {second_node} "
            f"(accuracy {first_acc:.4f} -> {second_acc:.4f})")


_REASONS: dict[str, Any] = {"chosen": _chosen, "closest": _closest, "cascade": _cascade}
