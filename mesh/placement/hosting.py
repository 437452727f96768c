"""Which variants a node hosts: its own ``variants:`` globs where the topology gives them,
else the computed placement (a managed node). Pure and deterministic: every node computes
the same answer from the same topology and registry, so no placement has to travel.

The planner (whom to route to), the agent (what to load), the artifact pull policy (what
to pull and serve) and the body caps (which tasks a node serves) all ask one
:class:`Hosting`, built per (topology, registry): a newly registered model is placed, and
served, as soon as the registry reaches a node.
"""

from __future__ import annotations

from collections.abc import Hashable

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
        self.managed = frozenset(n for n, spec in topology.nodes.items() if spec.variants is None)
        self.placement: Placement | None = live
        self.decisions: tuple[PlacementDecision, ...] = decisions
        if live is None and self.managed and registry.variants:
            round_ = Autoscaler(topology).step(registry, LoadSnapshot(), 0.0)
            self.placement, self.decisions = round_.placement, round_.decisions

    def workers(self, node: str, variant: str) -> int:
        """Compute workers the placement gives ``variant`` on ``node`` (1 where it does not
        say: a node with globs, or no placement yet)."""
        if self.placement is None:
            return 1
        return max(self.placement.workers(node, variant), 1)

    def allows(self, node: str, variant: str) -> bool:
        spec = self.topology.nodes[node]
        if spec.variants is not None:
            return spec.allows(variant)
        return self.placement is not None and self.placement.allows(node, variant)

    def explain(self, node: str) -> dict[str, object]:
        """What ``node`` hosts and why, for its status: ``managed`` (placed by the mesh) or
        its globs, and the placement's decisions about it."""
        if node not in self.managed:
            return {"managed": False, "globs": list(self.topology.nodes[node].variants or ())}
        return {"managed": True,
                "hosts": dict(self.placement.variants(node)) if self.placement else {},
                "decisions": [d.to_json() for d in self.decisions if d.node == node]}

    def key(self, node: str) -> Hashable:
        """Nodes with equal keys host the same variants (tables share their work)."""
        spec = self.topology.nodes[node]
        return tuple(spec.variants) if spec.variants is not None else ("placed", node)
