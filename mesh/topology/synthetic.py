"""Synthetic three-tier topologies of any size, for benchmarks, tests and the simulator.

:func:`synthetic_topology` returns a topology *document* (what a YAML file
would hold) built with ``groups``, so loading it exercises the same
expansion a hand-written file does. The shape: ``cores`` data centres
(core-2.. report to core-1), ``sites`` intermediate sites shared out over
the cores, and every other node an edge node shared out over the sites.
Link latencies and bandwidths are spread evenly over each parent's
replicas, so paths differ without any randomness.
"""

from __future__ import annotations

from typing import Any

__all__ = ["synthetic_topology"]


def synthetic_topology(nodes: int, *, cores: int | None = None, sites: int | None = None,
                       name: str | None = None) -> dict[str, Any]:
    """A document with exactly ``nodes`` nodes (at least 3)."""
    if nodes < 3:
        raise ValueError("a three-tier topology needs at least 3 nodes")
    cores = cores if cores is not None else max(1, round(nodes / 2500))
    sites = sites if sites is not None else max(1, min(round(nodes / 100), nodes - cores - 1))
    edges = nodes - cores - sites
    if edges < 1:
        raise ValueError(f"{nodes} nodes leave no room for edge nodes after {cores} cores "
                         f"and {sites} sites")
    core_nodes = [{"name": "core-1", "tier": "core", "hardware": "dc"}] + [
        {"name": f"core-{i}", "tier": "core", "hardware": "dc", "parent": "core-1"}
        for i in range(2, cores + 1)]
    return {
        "name": name or f"synthetic-{nodes}",
        "tiers": {
            "edge": {"variants": ["digits-linear", "digits-mlp"], "max_queue": 64},
            "intermediate": {"variants": ["digits-mlp", "digits-cnn"]},
            "core": {"variants": ["digits-*"]},
        },
        "hardware": {
            "cabinet": {"kind": "cpu", "threads": 1, "cores": 4, "memory_mb": 2048,
                        "cost_per_hour": 0.03, "power_w": 10},
            "site": {"kind": "cpu", "threads": 1, "cores": 32, "memory_mb": 32768,
                     "cost_per_hour": 0.20, "power_w": 150},
            "dc": {"kind": "cpu", "threads": 2, "cores": 96, "memory_mb": 262144,
                   "cost_per_hour": 0.50, "power_w": 300},
        },
        "nodes": core_nodes,
        "groups": [
            {"name": "site", "tier": "intermediate", "hardware": "site", "parents": ["core-*"],
             "count": sites, "link": {"latency_ms": [2, 15], "bandwidth_mbps": [10000, 1000]}},
            {"name": "edge", "tier": "edge", "hardware": "cabinet", "parents": ["site-*"],
             "count": edges,
             "link": {"latency_ms": [1, 8], "bandwidth_mbps": [300, 10], "loss": [0, 0.001]}},
        ],
        "links": [{"between": ["core-1", f"core-{i}"], "latency_ms": 6, "bandwidth_mbps": 40000}
                  for i in range(2, cores + 1)],
    }
