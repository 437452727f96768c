"""How long placement rounds take: metro.yaml and generated meshes up to 10,000 nodes.

::

    python benchmarks/placement.py [--home .tiermesh] [--sizes 1000 10000] [--rounds 3]

For each mesh (``topologies/metro.yaml`` and generated three-tier meshes,
all with their ``variants`` lists stripped so that placement decides
everything) it times, best of ``--rounds``: the first round (the base
placement), a round with no load, and a round with load on every edge
node's lightest variant and 5% of them hot (after one such round, which
also creates a forecast per demand key). The registry is the one built
in ``--home`` (``mesh build``). Results go to
``benchmarks/results/placement.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mesh.placement import Autoscaler, LoadSnapshot, VariantLoad  # noqa: E402
from mesh.registry import Registry  # noqa: E402
from mesh.topology import Topology, parse_topology, without_variants  # noqa: E402
from mesh.topology.synthetic import synthetic_topology  # noqa: E402


def _time(topology: Topology, registry: Registry, rounds: int) -> dict[str, Any]:
    edges = topology.nodes_in_tier("edge")
    first: list[float] = []
    idle: list[float] = []
    loaded: list[float] = []
    hot = len(edges) // 20
    for _ in range(rounds):
        t0 = time.perf_counter()
        scaler = Autoscaler(topology)
        base = scaler.step(registry, None, 0.0)
        first.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        scaler.step(registry, LoadSnapshot(), 1.0)
        idle.append(time.perf_counter() - t0)
        served = {}
        for i, node in enumerate(edges):
            light = min(base.placement.variants(node), default=None,
                        key=lambda v: registry.get(v).size_bytes)
            if light is not None:
                served[(node, light)] = VariantLoad(rate_qps=50.0,
                                                    busy=0.9 if i < hot else 0.05)
        demand = {(task, node): 50.0 for node in topology.nodes for task in registry.tasks()}
        load = LoadSnapshot(demand=demand, served=served)
        scaler.step(registry, load, 2.0)  # the first one also makes a forecast per demand key
        t0 = time.perf_counter()
        scaler.step(registry, load, 3.0)
        loaded.append(time.perf_counter() - t0)
    return {"nodes": len(topology.nodes), "hosted_pairs": len(base.placement),
            "first_round_ms": round(min(first) * 1e3, 2),
            "idle_round_ms": round(min(idle) * 1e3, 3),
            "loaded_round_ms": round(min(loaded) * 1e3, 2),
            "pairs_with_load": len(served), "hot_pairs": hot}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", default=os.environ.get("TIERMESH_HOME", str(ROOT / ".tiermesh")))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    registry = Registry.load(args.home)
    if not registry.variants:
        print(f"error: no variants in {args.home}; run `mesh build` first", file=sys.stderr)
        return 2
    meshes = {"metro": parse_topology(without_variants(yaml.safe_load(
        (ROOT / "topologies" / "metro.yaml").read_text())))}
    for size in args.sizes:
        meshes[f"generated-{size}"] = parse_topology(without_variants(synthetic_topology(size)))
    results = {name: _time(topo, registry, args.rounds) for name, topo in meshes.items()}
    for name, r in results.items():
        print(f"{name:>16}: {r['nodes']:>6} nodes, {r['hosted_pairs']:>6} hosted pairs; first "
              f"round {r['first_round_ms']} ms, idle {r['idle_round_ms']} ms, loaded "
              f"({r['pairs_with_load']} pairs with load, {r['hot_pairs']} hot) "
              f"{r['loaded_round_ms']} ms")
    out = ROOT / "benchmarks" / "results" / "placement.json"
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python":
                                           platform.python_version()},
                               "variants": sorted(registry.variants), "results": results},
                              indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
