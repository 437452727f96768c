"""The planner: (query, entry node, mesh view) -> which (node, variant) serves it.

Pure and explainable. For each candidate (node n, variant v) reachable from
the entry node e it predicts::

    network  = 2 x (path latency(e, n) + hops x per-hop cost)
               + bytes in / bottleneck + bytes out / bottleneck
    queue    = batches ahead of us at n (reported queue depth, batch model of v)
    compute  = profiled latency of v on n's hardware class for this many rows
               + the cost of dispatching to the runtime
    load     = 0 if v is loaded on n, else v's profiled cold start

A candidate is *feasible* when ``total x (1 + margin_frac) + margin_ms`` fits
the latency target (if any) and v's measured accuracy meets the minimum (if
any) and its cost fits the ceiling (if any). The policy picks among the
feasible: ``cheapest`` (hardware cost per inference; the default),
``most-accurate`` or ``fastest``. When nothing is feasible the planner still
answers with the closest candidate and says so (``feasible=False``).

Candidate tables (which variants each node may host, with their profile on
that node's hardware and the path cost from each entry) are built once per
(entry, task) and reused for every query; a topology or placement change
means building a new :class:`Planner`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mesh.errors import NoRoute
from mesh.registry import Profile, Registry, Variant
from mesh.state import MeshView
from mesh.topology import Topology
from mesh.wire import SLO

__all__ = ["Candidate", "Prediction", "Scored", "Decision", "Planner"]


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

    def cost_per_1k(self, rows: int) -> float:
        """Hardware cost (USD) of 1,000 inferences at this batch size."""
        per_row_ms = self.profile.latency_ms(rows) / max(rows, 1)
        return self.cost_per_hour * per_row_ms / 3_600_000.0 * 1000.0


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

    @property
    def feasible(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        c = self.candidate
        return {"node": c.node, "tier": c.tier, "variant": c.variant,
                "accuracy": c.accuracy, "cost_per_1k": self.cost_per_1k,
                "predicted": self.prediction.to_dict(), "feasible": self.feasible,
                "problems": list(self.problems)}


@dataclass(frozen=True, slots=True)
class Decision:
    node: str
    tier: str
    variant: str
    accuracy: float
    prediction: Prediction
    feasible: bool
    policy: str
    reason: str
    candidates: tuple[Scored, ...] = field(default=())

    def to_dict(self) -> dict[str, object]:
        return {"node": self.node, "tier": self.tier, "variant": self.variant,
                "accuracy": self.accuracy, "predicted": self.prediction.to_dict(),
                "feasible": self.feasible, "policy": self.policy, "reason": self.reason}


class Planner:
    """Decides where each query runs. Build one per (topology, registry) snapshot."""

    #: Predictions are inflated by this fraction before checking the latency target.
    margin_frac: float = 0.10
    #: ...and by this many milliseconds (client overheads the model does not see).
    margin_ms: float = 1.0
    #: Cost of one forwarding hop beyond the wire (HTTP, msgpack, proxy), each way.
    per_hop_ms: float = 0.75
    #: Cost of handing a query to the local runtime (queueing, thread hand-off).
    dispatch_ms: float = 0.3

    def __init__(self, topology: Topology, registry: Registry, *,
                 margin_frac: float | None = None, margin_ms: float | None = None) -> None:
        self.topology = topology
        self.registry = registry
        if margin_frac is not None:
            self.margin_frac = margin_frac
        if margin_ms is not None:
            self.margin_ms = margin_ms
        self._tables: dict[tuple[str, str], tuple[Candidate, ...]] = {}

    # ------------------------------------------------------------------ tables
    def hosted(self, node: str) -> list[Variant]:
        """Registered variants this node may host and has a profile for."""
        spec = self.topology.nodes[node]
        key = self.topology.hardware_of(node).profile_key
        return [v for v in self.registry.variants.values()
                if spec.allows(v.name) and v.profile_for(key) is not None]

    def candidates(self, entry: str, task: str) -> tuple[Candidate, ...]:
        cached = self._tables.get((entry, task))
        if cached is not None:
            return cached
        if entry not in self.topology.nodes:
            raise NoRoute(f"entry node {entry!r} is not in topology {self.topology.name!r}")
        self.registry.for_task(task)  # raises UnknownTask with the known tasks
        table: list[Candidate] = []
        for node, path in self.topology.paths_from(entry).items():
            spec = self.topology.nodes[node]
            hardware = self.topology.hardware_of(node)
            for variant in self.hosted(node):
                if variant.task != task:
                    continue
                profile = variant.profile_for(hardware.profile_key)
                assert profile is not None
                out_row = sum(
                    math.prod(d for d in o.shape[1:] if d > 0) * _itemsize(o.dtype)
                    for o in variant.outputs
                )
                table.append(Candidate(
                    node=node, tier=spec.tier, variant=variant.name,
                    accuracy=variant.accuracy, path_latency_ms=path.latency_ms,
                    hops=len(path.hops) - 1,
                    bottleneck_mbps=path.bottleneck_mbps, profile=profile,
                    max_batch=variant.max_batch, cost_per_hour=hardware.cost_per_hour,
                    out_bytes_per_row=out_row,
                ))
        result = tuple(table)
        self._tables[(entry, task)] = result
        return result

    # ------------------------------------------------------------------ scoring
    def predict(self, c: Candidate, *, rows: int, payload_bytes: int, view: MeshView,
                now: float) -> Prediction:
        network = 0.0
        if c.hops:
            bits = (payload_bytes + c.out_bytes_per_row * rows) * 8
            transfer = 0.0 if math.isinf(c.bottleneck_mbps) else bits / (c.bottleneck_mbps * 1000.0)
            network = 2 * (c.path_latency_ms + c.hops * self.per_hop_ms) + transfer
        depth = view.queue_depth(c.node, now)
        queue = 0.0
        if depth > 0:
            full, rest = divmod(depth, c.max_batch)
            queue = full * c.profile.latency_ms(c.max_batch) + (
                c.profile.latency_ms(rest) if rest else 0.0)
        compute = c.profile.latency_ms(rows) + self.dispatch_ms
        load = 0.0 if view.is_loaded(c.node, c.variant, now) else c.profile.cold_start_ms
        return Prediction(network, queue, compute, load)

    def score(self, c: Candidate, slo: SLO, *, rows: int, payload_bytes: int, view: MeshView,
              now: float) -> Scored:
        p = self.predict(c, rows=rows, payload_bytes=payload_bytes, view=view, now=now)
        cost = c.cost_per_1k(rows)
        problems: list[str] = []
        violation = 0.0
        if slo.latency_ms is not None and not slo.offline:
            padded = p.total_ms * (1 + self.margin_frac) + self.margin_ms
            if padded > slo.latency_ms:
                problems.append(f"predicted {padded:.1f} ms (with margin) > {slo.latency_ms:g} ms")
                violation += (padded - slo.latency_ms) / max(slo.latency_ms, 1e-3)
        if slo.min_accuracy is not None and c.accuracy < slo.min_accuracy:
            problems.append(f"accuracy {c.accuracy:.4f} < {slo.min_accuracy:g}")
            # relative growth of the error rate over what was asked for
            violation += (slo.min_accuracy - c.accuracy) / max(1 - slo.min_accuracy, 0.01)
        if slo.max_cost_per_1k is not None and cost > slo.max_cost_per_1k:
            problems.append(f"cost ${cost:.6f}/1k > ${slo.max_cost_per_1k:g}/1k")
            violation += (cost - slo.max_cost_per_1k) / max(slo.max_cost_per_1k, 1e-9)
        return Scored(c, p, cost, tuple(problems), violation)

    # ------------------------------------------------------------------ decide
    def plan(self, task: str, slo: SLO, entry: str, view: MeshView, *, now: float,
             rows: int = 1, payload_bytes: int = 0, explain: bool = False) -> Decision:
        """Choose a (node, variant). Raises UnknownTask / NoRoute when there is none at all."""
        table = self.candidates(entry, task)
        scored = [
            self.score(c, slo, rows=rows, payload_bytes=payload_bytes, view=view, now=now)
            for c in table
            if not view.is_down(c.node, now) and not view.has_failed(c.node, c.variant)
        ]
        if not scored:
            if not table:
                raise NoRoute(f"no node reachable from {entry!r} hosts a variant of task {task!r}")
            raise NoRoute(f"every node hosting task {task!r} is down")
        feasible = [s for s in scored if s.feasible]
        policy = slo.policy
        if feasible:
            best = min(feasible, key=_POLICY_KEYS[policy])
            reason = _why(best, feasible, policy)
        else:
            best = min(scored, key=lambda s: (s.violation, s.prediction.total_ms))
            reason = "no candidate meets the SLO; closest: " + "; ".join(best.problems)
        c = best.candidate
        ordered: tuple[Scored, ...] = ()
        if explain:
            ordered = tuple(sorted(scored, key=lambda s: (not s.feasible, _POLICY_KEYS[policy](s))))
        return Decision(c.node, c.tier, c.variant, c.accuracy, best.prediction,
                        best.feasible, policy, reason, ordered)


def _itemsize(dtype: str) -> int:
    return {"float64": 8, "int64": 8, "float16": 2, "int16": 2, "int8": 1, "uint8": 1,
            "bool": 1}.get(dtype, 4)


_POLICY_KEYS = {
    "cheapest": lambda s: (s.cost_per_1k, s.prediction.total_ms),
    "most-accurate": lambda s: (-s.candidate.accuracy, s.cost_per_1k, s.prediction.total_ms),
    "fastest": lambda s: (s.prediction.total_ms, s.cost_per_1k),
}


def _why(best: Scored, feasible: list[Scored], policy: str) -> str:
    others = len(feasible) - 1
    c = best.candidate
    if policy == "cheapest":
        what = f"cheapest feasible at ${best.cost_per_1k:.6f}/1k"
    elif policy == "most-accurate":
        what = f"most accurate feasible ({c.accuracy:.4f})"
    else:
        what = f"fastest feasible ({best.prediction.total_ms:.1f} ms predicted)"
    return f"{what}; {others} other feasible candidate(s)"
