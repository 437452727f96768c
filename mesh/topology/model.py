"""The validated :class:`Topology`: nodes, links, the reporting hierarchy, path costs.

Every node has at most one *parent* (the node it reports its load to); the
parents form a forest. When every link is a parent link, the mesh is a tree
(per connected part) and the path between two nodes is the unique one through
their lowest common ancestor: :meth:`Topology.path` walks it in O(depth), so
nothing is precomputed per pair and 10,000-node meshes cost nothing to load.
A mesh with cross links falls back on Dijkstra from the source (cached).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import networkx as nx

from mesh.topology.schema import (
    HardwareClass,
    Link,
    MembershipSpec,
    Node,
    NodeAddress,
    PlacementSpec,
    Tenant,
)
from mesh.topology.summary import summarise

__all__ = ["Path_", "Topology"]


@dataclass(frozen=True, slots=True)
class Path_:
    """The cost of a path between two nodes (one way)."""

    hops: tuple[str, ...]
    latency_ms: float
    bottleneck_mbps: float
    #: Probability that a packet is lost somewhere on the path.
    loss: float = 0.0

    def transfer_ms(self, payload_bytes: int) -> float:
        """Serialisation time of ``payload_bytes`` over the bottleneck link."""
        if payload_bytes <= 0 or math.isinf(self.bottleneck_mbps):
            return 0.0
        return payload_bytes * 8 / (self.bottleneck_mbps * 1000.0)


class Topology:
    """A validated mesh description with path costs. Immutable after construction."""

    def __init__(self, name: str, hardware: dict[str, HardwareClass], nodes: list[Node],
                 links: list[Link], *, tenants: list[Tenant] | None = None,
                 membership: MembershipSpec | None = None, energy_cost_per_kwh: float = 0.15,
                 groups: dict[str, int] | None = None,
                 placement: PlacementSpec | None = None,
                 operator_keys: tuple[str, ...] = ()) -> None:
        self.name = name
        self.hardware = dict(hardware)
        self.nodes: dict[str, Node] = {n.name: n for n in nodes}
        self.links = tuple(links)
        self.tenants: dict[str, Tenant] = {t.name: t for t in tenants or ()}
        self.membership = membership or MembershipSpec()
        self.placement = placement or PlacementSpec()
        #: hashes of the keys that may read status and metrics (mesh.tenants)
        self.operator_keys = tuple(operator_keys)
        self.energy_cost_per_kwh = energy_cost_per_kwh
        #: group name -> how many nodes it expanded into (for summaries).
        self.groups = dict(groups or {})
        graph = nx.Graph()
        graph.add_nodes_from(self.nodes)
        for link in links:
            a, b = link.between
            graph.add_edge(a, b, latency_ms=link.latency_ms, bandwidth_mbps=link.bandwidth_mbps,
                           loss=link.loss, link=link)
        self.graph = graph
        self._paths: dict[str, dict[str, Path_]] = {}
        self.parent: dict[str, str | None] = {n.name: n.parent for n in nodes}
        kids: dict[str, list[str]] = {n: [] for n in self.nodes}
        for node, parent in self.parent.items():
            if parent is not None:
                kids[parent].append(node)
        self.children: dict[str, tuple[str, ...]] = {n: tuple(sorted(c)) for n, c in kids.items()}
        self.roots: tuple[str, ...] = tuple(sorted(n for n, p in self.parent.items() if p is None))
        parent_links = sum(1 for p in self.parent.values() if p is not None)
        #: True when the parent links are all the links: paths follow the hierarchy.
        self.is_tree = parent_links == len(self.links)
        # Per node: depth in the hierarchy and the link to its parent (latency, bandwidth, loss).
        self.depth: dict[str, int] = {}
        self._up: dict[str, tuple[float, float, float]] = {}
        for root in self.roots:
            self.depth[root] = 0
            stack = [root]
            while stack:
                node = stack.pop()
                for child in self.children[node]:
                    self.depth[child] = self.depth[node] + 1
                    edge = graph.edges[child, node]
                    self._up[child] = (edge["latency_ms"], edge["bandwidth_mbps"], edge["loss"])
                    stack.append(child)

    # ------------------------------------------------------------------ lookups
    def hardware_of(self, node: str) -> HardwareClass:
        return self.hardware[self.nodes[node].hardware]

    def link(self, a: str, b: str) -> Link:
        return self.graph.edges[a, b]["link"]

    def neighbours(self, node: str) -> list[str]:
        return sorted(self.graph.neighbors(node))

    def addresses_for(self, node: str) -> tuple[NodeAddress, dict[str, NodeAddress]]:
        """Where ``node`` listens and where each of its neighbours does, for running it
        on its own host. Raises ``ValueError`` naming the node that is not in this
        topology or the node(s) with no ``address``."""
        if node not in self.nodes:
            raise ValueError(f"node {node!r} is not in topology {self.name!r} "
                             f"(nodes: {', '.join(sorted(self.nodes))})")
        me = self.nodes[node].address
        if me is None:
            raise ValueError(f"node {node!r} has no address in topology {self.name!r}; "
                             "give it address: {host: ..., http_port: ..., stream_port: ...}")
        neighbours = {n: self.nodes[n].address for n in self.neighbours(node)}
        missing = [n for n, address in neighbours.items() if address is None]
        if missing:
            raise ValueError(f"neighbour(s) {', '.join(missing)} of {node!r} have no address in "
                             f"topology {self.name!r}; {node} could not reach them")
        return me, {n: a for n, a in neighbours.items() if a is not None}

    def ancestors(self, node: str) -> Iterator[str]:
        """The parent, its parent, ... up to a root (``node`` itself excluded)."""
        parent = self.parent[node]
        while parent is not None:
            yield parent
            parent = self.parent[parent]

    def subtree(self, node: str) -> list[str]:
        """``node`` and every node below it in the hierarchy."""
        out, stack = [], [node]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(self.children[n])
        return out

    # ------------------------------------------------------------------ paths
    def paths_from(self, source: str) -> dict[str, Path_]:
        """Lowest-latency path from ``source`` to every reachable node (cached). O(N log N)."""
        cached = self._paths.get(source)
        if cached is not None:
            return cached
        _, routes = nx.single_source_dijkstra(self.graph, source, weight="latency_ms")
        out: dict[str, Path_] = {}
        for target, hops in routes.items():
            out[target] = self._walk(tuple(hops))
        self._paths[source] = out
        return out

    def _walk(self, hops: tuple[str, ...]) -> Path_:
        latency, bottleneck, delivered = 0.0, math.inf, 1.0
        for a, b in zip(hops, hops[1:], strict=False):
            edge = self.graph.edges[a, b]
            latency += edge["latency_ms"]
            bottleneck = min(bottleneck, edge["bandwidth_mbps"])
            delivered *= 1.0 - edge["loss"]
        return Path_(hops, latency, bottleneck, 1.0 - delivered)

    def path(self, source: str, target: str) -> Path_ | None:
        """The path from ``source`` to ``target``, or None when they are not connected."""
        if not self.is_tree:
            return self.paths_from(source).get(target)
        up, down = self._tree_route(source, target)
        if up is None or down is None:
            return None
        return self._walk(tuple(up + down[::-1][1:]))

    def _tree_route(self, a: str, b: str) -> tuple[list[str] | None, list[str] | None]:
        """Nodes from ``a`` up to the common ancestor, and from ``b`` up to it."""
        up, down = [a], [b]
        while self.depth[up[-1]] > self.depth[down[-1]]:
            up.append(self.parent[up[-1]])  # type: ignore[arg-type]
        while self.depth[down[-1]] > self.depth[up[-1]]:
            down.append(self.parent[down[-1]])  # type: ignore[arg-type]
        while up[-1] != down[-1]:
            pa, pb = self.parent[up[-1]], self.parent[down[-1]]
            if pa is None or pb is None:
                return None, None  # different trees: not connected
            up.append(pa)
            down.append(pb)
        return up, down

    def up_link(self, node: str) -> tuple[float, float, float] | None:
        """(latency_ms, bandwidth_mbps, loss) of the link to the parent; None for a root."""
        return self._up.get(node)

    def next_hop(self, source: str, target: str) -> str | None:
        if source == target:
            return None
        if not self.is_tree:
            path = self.path(source, target)
            return path.hops[1] if path is not None and len(path.hops) > 1 else None
        up, down = self._tree_route(source, target)
        if up is None or down is None:
            return None
        return up[1] if len(up) > 1 else down[-2]

    def behind(self, source: str, hop: str) -> list[str]:
        """Every node ``source`` reaches through its neighbour ``hop`` (``hop`` included)."""
        if not self.is_tree:
            return [n for n, p in self.paths_from(source).items()
                    if len(p.hops) > 1 and p.hops[1] == hop]
        if self.parent.get(hop) == source:
            return self.subtree(hop)
        mine = set(self.subtree(source))
        return [n for n in self.nodes if n not in mine]

    # ------------------------------------------------------------------ health of the file
    def unreachable(self) -> list[str]:
        """Nodes not connected to the largest component of the mesh."""
        if not self.nodes:
            return []
        main = max(nx.connected_components(self.graph), key=len)
        return sorted(set(self.nodes) - main)

    def summary(self) -> dict[str, Any]:
        """What ``mesh topology check`` prints (:func:`mesh.topology.summary.summarise`)."""
        return summarise(self)

    def nodes_in_tier(self, tier: str) -> list[str]:
        return sorted(n for n, spec in self.nodes.items() if spec.tier == tier)

