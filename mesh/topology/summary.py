"""What ``mesh topology check`` prints: counts, path latency ranges, unreachable nodes.

All-pairs shortest paths cost O(N^2 log N), far too much for metro-sized
meshes, so the range of path latencies is computed the cheap exact way when
there is one and labelled when it is a bound:

* the minimum over all connected pairs is the lightest link (exact, any mesh);
* the maximum is the weighted diameter: exact by two sweeps on a tree, exact
  by all pairs on a small mesh (<= ``EXACT_PAIRS_LIMIT`` nodes), otherwise the
  double-sweep value, which is a lower bound (``method`` says which).

It also gives the latency from each edge node to its nearest core node (one
multi-source Dijkstra), the figure that decides what the core can serve.

It reads a topology through :class:`Summarised`, the part of
:class:`~mesh.topology.Topology` a summary needs, so that this module does
not import the model (the model's ``summary()`` imports this one).
"""

from __future__ import annotations

import statistics
from typing import Any, Protocol

import networkx as nx

from mesh.topology.schema import TIERS, HardwareClass, Link, MembershipSpec, Node, Tenant

__all__ = ["EXACT_PAIRS_LIMIT", "Summarised", "summarise"]


class Summarised(Protocol):
    """What :func:`summarise` reads of a topology (:class:`mesh.topology.Topology` is one)."""

    name: str
    nodes: dict[str, Node]
    links: tuple[Link, ...]
    hardware: dict[str, HardwareClass]
    tenants: dict[str, Tenant]
    membership: MembershipSpec
    groups: dict[str, int]
    graph: nx.Graph
    roots: tuple[str, ...]
    is_tree: bool
    depth: dict[str, int]

    def nodes_in_tier(self, tier: str) -> list[str]: ...

    def unreachable(self) -> list[str]: ...

EXACT_PAIRS_LIMIT = 400


def _farthest(graph: nx.Graph, source: str) -> tuple[str, float]:
    lengths = nx.single_source_dijkstra_path_length(graph, source, weight="latency_ms")
    node = max(lengths, key=lambda n: (lengths[n], n))
    return node, float(lengths[node])


def _diameter(topo: Summarised) -> tuple[float, str]:
    graph = topo.graph
    components = [c for c in nx.connected_components(graph) if len(c) > 1]
    if not components:
        return 0.0, "exact (no links)"
    if len(topo.nodes) <= EXACT_PAIRS_LIMIT:
        best = 0.0
        for _source, lengths in nx.all_pairs_dijkstra_path_length(graph, weight="latency_ms"):
            best = max(best, max(lengths.values()))
        return best, "exact (all pairs)"
    best = 0.0
    for component in components:
        start = min(component)
        far, _ = _farthest(graph, start)
        _, length = _farthest(graph, far)
        best = max(best, length)
    if topo.is_tree:
        return best, "exact (two sweeps on a tree)"
    return best, "at least (two sweeps; the mesh has cross links)"


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}


def summarise(topo: Summarised) -> dict[str, Any]:
    """The counts, ranges and problems ``mesh topology check`` prints (module docstring)."""
    per_tier = {t: sum(1 for n in topo.nodes.values() if n.tier == t) for t in TIERS}
    latencies = [link.latency_ms for link in topo.links]
    longest, method = _diameter(topo)
    cores = topo.nodes_in_tier("core")
    edge_to_core: dict[str, Any] = {}
    if cores:
        reach = nx.multi_source_dijkstra_path_length(topo.graph, set(cores), weight="latency_ms")
        edges = topo.nodes_in_tier("edge")
        edge_to_core = _stats([float(reach[n]) for n in edges if n in reach])
        cut_off = [n for n in edges if n not in reach]
        if cut_off:
            edge_to_core["edges_without_a_core"] = len(cut_off)
    hosts: dict[str, int] = {}
    denied: dict[str, int] = {}
    for spec in topo.nodes.values():
        for pattern in spec.variants or ():
            hosts[pattern] = hosts.get(pattern, 0) + 1
        for pattern in spec.deny_variants or ():
            denied[pattern] = denied.get(pattern, 0) + 1
    m = topo.membership
    return {
        "name": topo.name,
        "nodes": len(topo.nodes),
        "links": len(topo.links),
        "nodes_per_tier": per_tier,
        "groups": topo.groups,
        "hardware": sorted(topo.hardware),
        "tenants": sorted(topo.tenants),
        "hierarchy": {"roots": list(topo.roots), "is_tree": topo.is_tree,
                      "max_depth": max(topo.depth.values(), default=0)},
        "path_latency_ms": {"min": min(latencies, default=0.0), "max": longest,
                            "method": f"min: lightest link (exact); max: {method}"},
        "edge_to_nearest_core_ms": edge_to_core,
        # allow / deny globs -> how many nodes carry them (placement chooses within them)
        "variant_patterns": dict(sorted(hosts.items())),
        "deny_patterns": dict(sorted(denied.items())),
        "membership": {"heartbeat_interval_s": m.heartbeat_interval_s,
                       "down_after_s": m.down_after_s, "stale_after_s": m.stale_after_s},
        "unreachable": topo.unreachable(),
    }
