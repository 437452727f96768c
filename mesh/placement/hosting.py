"""Which variants a node hosts: the computed placement, for every node (all are managed).
A node's ``variants:`` globs (its allow list) and ``deny_variants:`` are constraints the
placement chooses within, not the placement. What a node hosts comes from the root's
latest round (``live``, handed down the tree by :mod:`nodes.placement`); until one
arrives, from the base placement, which every node computes exactly as the root does from
the same topology and registry (pure and deterministic), so a mesh serves from its first
second.

The planner (whom to route to), the agent (what to load), the artifact pull policy (what
to pull and serve) and the body caps (which tasks a node serves) all ask one
:class:`Hosting`, built per (topology, registry): a newly registered model is placed, and
served, as soon as the registry reaches a node.
"""

from __future__ import annotations

from collections.abc import Hashable

from mesh.placement.constraints import HostRule
from mesh.placement.inputs import LoadSnapshot
from mesh.placement.model import Placement, PlacementDecision
from mesh.placement.scaling import Autoscaler
from mesh.registry import Registry
from mesh.topology import Topology

__all__ = ["Hosting"]


class Hosting:
    """``allows(node, variant)`` for every node of ``topology`` given ``registry``."""

    def __init__(self, topology: Topology, registry: Registry, *,
                 live: Placement | None = None,
                 decisions: tuple[PlacementDecision, ...] = ()) -> None:
        """``live``: the placement the root's latest round decided (with its ``decisions``);
        without one, the base placement, computed here as the root computes it."""
        self.topology = topology
        # Every node is placed by the mesh; its globs only constrain the placement.
        self.managed = frozenset(topology.nodes)
        self.placement: Placement | None = live
        self.decisions: tuple[PlacementDecision, ...] = decisions
        if live is None and registry.variants:
            round_ = Autoscaler(topology).step(registry, LoadSnapshot(), 0.0)
            self.placement, self.decisions = round_.placement, round_.decisions

    def workers(self, node: str, variant: str) -> int:
        """Compute workers the placement gives ``variant`` on ``node`` (at least 1)."""
        if self.placement is None:
            return 1
        return max(self.placement.workers(node, variant), 1)

    def allows(self, node: str, variant: str) -> bool:
        return self.placement is not None and self.placement.allows(node, variant)

    def explain(self, node: str) -> dict[str, object]:
        """What ``node`` hosts and why, for its status: ``managed`` (placed by the mesh),
        the globs it was placed within (``allow``, ``deny``; absent: none) and the
        placement's decisions about it."""
        spec = self.topology.nodes[node]
        rule = HostRule(tuple(spec.variants) if spec.variants is not None else None,
                        tuple(spec.deny_variants or ()))
        return {"managed": node in self.managed, **rule.describe(),
                "hosts": dict(self.placement.variants(node)) if self.placement else {},
                "decisions": [d.to_json() for d in self.decisions if d.node == node]}

    def key(self, node: str) -> Hashable:
        """Nodes with equal keys host the same variants (tables share their work)."""
        if self.placement is None:
            return ()
        return frozenset(self.placement.variants(node))
