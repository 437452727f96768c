"""What a decision round is told about the load: a snapshot, taken by whoever runs the round.

* :class:`VariantLoad` -- what one hosted (node, variant) served since the last round.
* :class:`LoadSnapshot` -- those, the arrivals per (task, subtree), and what failed where.
* :class:`LoadReport` -- a subtree's part of it, as it travels up the tree in heartbeats,
  with the :class:`~mesh.placement.machines.Machine` each node measured it runs on.

Agents (or the simulator) fill these from heartbeats; nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh.placement.machines import Machine

__all__ = ["VariantLoad", "LoadSnapshot", "LoadReport"]


@dataclass(frozen=True, slots=True)
class VariantLoad:
    """The load one (node, variant) carried, smoothed over the last round or so.

    ``busy`` is the measured compute time per second summed over its
    workers (2.0: two workers busy all the time); when the node does not
    measure it, it is reckoned from ``rate_qps`` and the profile.
    ``latency_target_ms`` and ``min_accuracy`` are the tightest targets of
    the queries it served (None: none set); ``slo_miss_frac`` the fraction
    of them that missed their latency target.
    """

    rate_qps: float = 0.0
    busy: float | None = None
    rows_per_query: float = 1.0
    queue_depth: int = 0
    slo_miss_frac: float = 0.0
    latency_target_ms: float | None = None
    min_accuracy: float | None = None
    #: measured compute time over the profiled one (1.0: as profiled; 2.0: the CPU is shared
    #: with something else and runs it at half speed)
    slowdown: float = 1.0
    #: the share of its runs' time its compute thread had a CPU (1.0: never waited for one)
    cpu_share: float = 1.0

    def __post_init__(self) -> None:
        for name in ("rate_qps", "rows_per_query", "slo_miss_frac", "slowdown", "cpu_share"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"VariantLoad.{name}: must be a finite number >= 0, got {value!r}")
        if self.busy is not None and (not math.isfinite(self.busy) or self.busy < 0):
            raise ValueError(f"VariantLoad.busy: must be a finite number >= 0, got {self.busy!r}")
        if self.rows_per_query < 1:
            raise ValueError(f"VariantLoad.rows_per_query: must be >= 1, got {self.rows_per_query}")


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """Everything observed since the last round.

    ``demand`` maps (task, node) to the queries per second of that task
    entering the mesh anywhere in the node's subtree (the node included);
    the rounds learn their forecasts from it. ``served`` maps (node,
    variant) to what that host carried; hosts missing from it carried
    nothing. ``failed`` maps a node to the variants it could not load; they
    are dropped there and not placed there again while reported. Nodes in
    ``down`` keep what they host (for when they come back) but receive no
    replica or faster variant meanwhile. ``machines`` maps a node to the CPUs it
    really has and the host it shares them on; a node missing from it is trusted to
    have what its hardware class declares.
    """

    demand: Mapping[tuple[str, str], float] = field(default_factory=dict)
    served: Mapping[tuple[str, str], VariantLoad] = field(default_factory=dict)
    failed: Mapping[str, frozenset[str]] = field(default_factory=dict)
    down: frozenset[str] = frozenset()
    machines: Mapping[str, Machine] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, rate in self.demand.items():
            if not math.isfinite(rate) or rate < 0:
                raise ValueError(f"LoadSnapshot.demand[{key!r}]: must be a finite rate >= 0, "
                                 f"got {rate!r}")


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a subtree reports up for placement, in every heartbeat: per node, what each
    variant it hosts served, and the demand per task entering the mesh in the subtree below
    (and at) that node, and the machine each node runs on. The root turns the whole tree's
    report into a :class:`LoadSnapshot`.

    On the wire ``machines`` is a key of its own, left out when empty: a parent of an older
    version ignores it, and a report without it leaves every node unknown (its declared
    hardware class trusted).
    """

    served: Mapping[str, Mapping[str, VariantLoad]] = field(default_factory=dict)
    #: node -> task -> queries per second entering in that node's subtree
    demand: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    #: node -> the CPUs it measured and the host it runs on
    machines: Mapping[str, Machine] = field(default_factory=dict)

    @classmethod
    def of_subtree(cls, node: str, own_served: Mapping[str, VariantLoad],
                   own_demand: Mapping[str, float], children: list[LoadReport],
                   child_names: list[str], own_machine: Machine | None = None) -> LoadReport:
        """``node``'s report: its own measurements plus its children's reports
        (``children[i]`` is ``child_names[i]``'s; a missing child reports nothing)."""
        served: dict[str, Mapping[str, VariantLoad]] = {}
        demand: dict[str, Mapping[str, float]] = {}
        machines: dict[str, Machine] = {}
        total = dict(own_demand)
        for child, report in zip(child_names, children, strict=True):
            served.update(report.served)
            demand.update(report.demand)
            machines.update(report.machines)
            for task, rate in report.demand.get(child, {}).items():
                total[task] = total.get(task, 0.0) + rate
        if own_served:
            served[node] = dict(own_served)
        if total:
            demand[node] = total
        if own_machine is not None:
            machines[node] = own_machine
        return cls(served, demand, machines)

    def snapshot(self, *, failed: Mapping[str, frozenset[str]] | None = None,
                 down: frozenset[str] = frozenset()) -> LoadSnapshot:
        return LoadSnapshot(
            demand={(task, node): rate for node, tasks in self.demand.items()
                    for task, rate in tasks.items()},
            served={(node, variant): vl for node, variants in self.served.items()
                    for variant, vl in variants.items()},
            failed=dict(failed or {}), down=down, machines=dict(self.machines))

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "served": {n: {v: [round(vl.rate_qps, 4), round(vl.busy or 0.0, 5),
                               round(vl.rows_per_query, 3), vl.queue_depth,
                               round(vl.slo_miss_frac, 4), vl.latency_target_ms, vl.min_accuracy,
                               round(vl.slowdown, 3), round(vl.cpu_share, 3)]
                           for v, vl in vs.items()} for n, vs in self.served.items()},
            "demand": {n: {t: round(r, 4) for t, r in ts.items()}
                       for n, ts in self.demand.items()},
        }
        if self.machines:
            wire["machines"] = {n: m.to_wire() for n, m in self.machines.items()}
        return wire

    @classmethod
    def from_wire(cls, obj: Any, *, nodes: Collection[str], where: str = "load") -> LoadReport:
        """Validate a report from the network; only ``nodes`` (the sender's subtree) may
        appear in it. Raises ``ValueError`` naming the bad field."""
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: must be a map with served and demand")
        served_in, demand_in = obj.get("served", {}), obj.get("demand", {})
        if not isinstance(served_in, dict) or not isinstance(demand_in, dict):
            raise ValueError(f"{where}.served and {where}.demand must be maps")
        served: dict[str, dict[str, VariantLoad]] = {}
        for node, variants in served_in.items():
            if node not in nodes or not isinstance(variants, dict):
                raise ValueError(f"{where}.served: {str(node)[:64]!r} is not a node of the "
                                 "sender's subtree, or its entry is not a map")
            row: dict[str, VariantLoad] = {}
            for variant, v in variants.items():
                if not isinstance(variant, str) or not isinstance(v, list) \
                        or not 7 <= len(v) <= 9:
                    raise ValueError(f"{where}.served[{node!r}]: each variant maps to a list of "
                                     "7 to 9 numbers")
                rate, busy, rows, depth, miss, target, floor = v[:7]
                try:
                    row[variant] = VariantLoad(
                        float(rate), float(busy), float(rows), int(depth), float(miss),
                        None if target is None else float(target),
                        None if floor is None else float(floor),
                        float(v[7]) if len(v) > 7 else 1.0,
                        float(v[8]) if len(v) > 8 else 1.0)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{where}.served[{node!r}][{variant[:64]!r}]: {exc}"
                                     ) from None
            served[node] = row
        demand: dict[str, dict[str, float]] = {}
        for node, tasks in demand_in.items():
            if node not in nodes or not isinstance(tasks, dict):
                raise ValueError(f"{where}.demand: {str(node)[:64]!r} is not a node of the "
                                 "sender's subtree, or its entry is not a map")
            clean: dict[str, float] = {}
            for task, rate in tasks.items():
                if not isinstance(task, str) or isinstance(rate, bool) \
                        or not isinstance(rate, int | float) or not math.isfinite(rate) \
                        or rate < 0:
                    raise ValueError(f"{where}.demand[{node!r}]: task -> a finite rate >= 0")
                clean[task] = float(rate)
            demand[node] = clean
        machines_in = obj.get("machines", {})
        if not isinstance(machines_in, dict):
            raise ValueError(f"{where}.machines must be a map of node -> [cpus, host]")
        machines: dict[str, Machine] = {}
        for node, machine in machines_in.items():
            if node not in nodes:
                raise ValueError(f"{where}.machines: {str(node)[:64]!r} is not a node of the "
                                 "sender's subtree")
            machines[node] = Machine.from_wire(machine, where=f"{where}.machines[{node!r}]")
        return cls(served, demand, machines)
