"""The placement's value objects: what each node hosts, and the decisions that changed it.

* :class:`Placement` -- node -> {variant: compute workers}. Immutable; a
  variant a node hosts has at least one worker.
* :class:`PlacementDecision` -- one change (or one refusal) with its cause
  and a reason a person can read: what ``mesh status`` shows.
* :class:`Round` -- the outcome of one decision round: the new placement,
  the decisions that made it, and the variants placed nowhere (with why).

All have ``to_json`` for status pages; nothing here does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

#: (node, variant)
Pair = tuple[str, str]

__all__ = [
    "Pair","DecisionKind", "Cause", "Placement", "PlacementDecision", "Round"]


class DecisionKind(enum.StrEnum):
    """What a decision does to one (node, variant)."""

    #: host the variant (base placement, coverage, a new model, a restored variant)
    PLACE = "place"
    #: more compute workers for a hosted variant
    ADD_WORKERS = "add-workers"
    #: fewer compute workers (never below one)
    REMOVE_WORKERS = "remove-workers"
    #: host a hot variant on one more node
    REPLICATE = "replicate"
    #: host a faster variant, or the same on faster hardware, when replicas cannot hold the load
    SWITCH = "switch"
    #: stop hosting (idle, or its memory is needed)
    EVICT = "evict"
    #: stop hosting because it may no longer run there (unregistered, denied, failed)
    DROP = "drop"
    #: nothing could be done (no slot, no memory, no host); changes nothing
    BLOCKED = "blocked"
    #: a task some entry node cannot reach; changes nothing
    UNCOVERED = "uncovered"


class Cause(enum.StrEnum):
    """Why a decision was taken."""

    BASE = "base"  # the sensible placement of the registry on the topology
    COVERAGE = "coverage"  # a task had no host on some entry node's path
    REGISTRY = "registry"  # the registry changed (a new model, a removed variant)
    TOPOLOGY = "topology"  # the topology's allow/deny lists
    FAILED = "failed"  # the node reported it cannot run the variant
    LOAD = "load"  # observed load
    FORECAST = "forecast"  # forecast load, ahead of time
    SLO = "slo"  # queries missed their latency target for want of speed
    IDLE = "idle"  # no load for a while
    PRESSURE = "pressure"  # memory needed by a hotter variant
    RESTORE = "restore"  # a base variant evicted under pressure comes back


@dataclass(frozen=True, slots=True)
class PlacementDecision:
    """One decision about one (node, variant); ``workers`` is its worker count afterwards.

    For ``uncovered``, ``node`` is an entry node and ``variant`` the task it cannot reach.
    """

    kind: DecisionKind
    node: str
    variant: str
    workers: int
    cause: Cause
    reason: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "node": self.node, "variant": self.variant,
                "workers": self.workers, "cause": str(self.cause), "reason": self.reason,
                "at": self.at}


class Placement:
    """Which variants each node hosts, and with how many compute workers. Immutable.

    Nodes hosting nothing are left out. Two placements are equal when they
    host the same variants with the same workers everywhere.
    """

    __slots__ = ("_hosts",)

    def __init__(self, hosts: Mapping[str, Mapping[str, int]] | None = None) -> None:
        """Raises ``ValueError`` for a worker count below one (leave the variant out instead)."""
        frozen: dict[str, Mapping[str, int]] = {}
        for node, variants in (hosts or {}).items():
            for variant, workers in variants.items():
                if not isinstance(workers, int) or workers < 1:
                    raise ValueError(f"placement[{node!r}][{variant!r}]: workers must be an "
                                     f"integer >= 1, got {workers!r}")
            if variants:
                frozen[node] = (variants if isinstance(variants, MappingProxyType)
                                else MappingProxyType(dict(variants)))
        self._hosts = frozen

    @classmethod
    def _trusted(cls, frozen: dict[str, Mapping[str, int]]) -> Placement:
        """From node -> read-only mappings already checked (the autoscaler's, each round)."""
        placement = cls.__new__(cls)
        placement._hosts = frozen
        return placement

    def variants(self, node: str) -> Mapping[str, int]:
        """variant -> workers on ``node`` (empty when it hosts nothing)."""
        return self._hosts.get(node, _EMPTY)

    def workers(self, node: str, variant: str) -> int:
        """Compute workers of ``variant`` on ``node``; 0 when it is not hosted there."""
        return self._hosts.get(node, _EMPTY).get(variant, 0)

    def allows(self, node: str, variant: str) -> bool:
        """Whether ``node`` hosts ``variant`` (what the planner should ask instead of globs)."""
        return variant in self._hosts.get(node, _EMPTY)

    def hosts(self, variant: str) -> list[str]:
        """The nodes hosting ``variant``, sorted. O(nodes)."""
        return sorted(n for n, vs in self._hosts.items() if variant in vs)

    def nodes(self) -> list[str]:
        return sorted(self._hosts)

    def __iter__(self) -> Iterator[tuple[str, Mapping[str, int]]]:
        return iter(sorted(self._hosts.items()))

    def __len__(self) -> int:
        """How many (node, variant) pairs are hosted."""
        return sum(len(vs) for vs in self._hosts.values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return self._hosts == other._hosts

    __hash__ = None  # type: ignore[assignment]  # equal placements may be built differently

    def __repr__(self) -> str:
        return f"Placement({len(self._hosts)} nodes, {len(self)} hosted variants)"

    def to_json(self) -> dict[str, dict[str, int]]:
        return {node: dict(sorted(vs.items())) for node, vs in sorted(self._hosts.items())}

    @classmethod
    def from_json(cls, obj: Any) -> Placement:
        """From :meth:`to_json`'s form; raises ``ValueError`` naming what is malformed."""
        if not isinstance(obj, dict):
            raise ValueError("placement: must be a mapping of node -> {variant: workers}")
        for node, variants in obj.items():
            if not isinstance(variants, dict):
                raise ValueError(f"placement[{node!r}]: must be a mapping of variant -> workers")
        return cls(obj)


_EMPTY: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Round:
    """The outcome of one decision round at time ``at``."""

    placement: Placement
    decisions: tuple[PlacementDecision, ...]
    at: float
    #: variant -> why no node hosts it (dominated, too large, denied everywhere, no profile)
    unplaced: Mapping[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """Whether any decision of this round changed the placement."""
        return any(d.kind not in (DecisionKind.BLOCKED, DecisionKind.UNCOVERED)
                   for d in self.decisions)

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "placement": self.placement.to_json(),
                "decisions": [d.to_json() for d in self.decisions],
                "unplaced": dict(sorted(self.unplaced.items()))}
