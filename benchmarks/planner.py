"""How long one planning decision takes, on generated meshes of 100 to 10,000 nodes.

::

    python benchmarks/planner.py [--sizes 100 1000 10000] [--queries 20000] [--rounds 5]

For each size it generates a three-tier topology (``mesh.topology.synthetic``:
cores, intermediate sites, edge nodes; loaded through the same ``groups``
expansion as a topology file), builds a planner, precomputes the candidate
tables of the sampled entry nodes (timed separately: that is the
"topology or placement changed" cost), fills a mesh view with a load report
for every node, then times single decisions with ``time.perf_counter_ns``
over a fixed mix of queries (tight latency, accuracy, relaxed, fastest,
most accurate, cascade, and some no candidate can meet). Sizes are
interleaved round by round so that noise from other work on the machine
falls on every size alike; the ratio between sizes is the robust figure.

``gc.freeze()`` runs after setup, as a node agent would after start-up, so
the collector does not rescan the topology on every young-generation pass;
the run without it is reported too. The registry is the three digits
variants with latencies measured on this kind of machine (or ``--home``).
Results go to ``benchmarks/results/planner.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mesh.planner import Planner  # noqa: E402
from mesh.registry import Profile, Registry, TensorSpec, Variant  # noqa: E402
from mesh.state import MeshView  # noqa: E402
from mesh.topology import parse_topology  # noqa: E402
from mesh.topology.synthetic import synthetic_topology  # noqa: E402
from mesh.wire import SLO  # noqa: E402

GOAL_P99_US = 20.0
GOAL_RATIO = 2.0

#: (name, accuracy, {profile key: (batch -> ms, cold start ms)}) measured by `mesh build`.
MEASURED = (
    ("digits-linear", 0.9611, {1: 0.0061, 8: 0.0062, 32: 0.0071}, 0.90),
    ("digits-mlp", 0.9722, {1: 0.0074, 8: 0.0096, 32: 0.0180}, 0.81),
    ("digits-cnn", 0.9963, {1: 0.0361, 8: 0.1864, 32: 0.7217}, 1.73),
)

#: The query mix: (label, SLO, weight).
MIX: tuple[tuple[str, SLO, int], ...] = (
    ("tight-latency", SLO(latency_ms=10), 25),
    ("accurate", SLO(latency_ms=80, min_accuracy=0.99), 20),
    ("relaxed", SLO(), 20),
    ("fastest", SLO(policy="fastest"), 10),
    ("most-accurate", SLO(policy="most-accurate", latency_ms=60), 10),
    ("cascade", SLO(policy="cascade", latency_ms=80), 10),
    ("infeasible", SLO(latency_ms=2, min_accuracy=0.99), 5),
)


def measured_registry() -> Registry:
    variants = {}
    for name, accuracy, batch_ms, cold in MEASURED:
        profile = Profile(dict(batch_ms), cold_start_ms=cold)
        variants[name] = Variant(
            name=name, task="digits", family="digits", arch=name.split("-")[1], format="onnx",
            precision="fp32", sha256="0" * 64, size_bytes=1, accuracy=accuracy,
            accuracy_metric="top1", macs=1, inputs=(TensorSpec("input", "float32", (-1, 64)),),
            outputs=(TensorSpec("probs", "float32", (-1, 10)),),
            profiles={"cpu-1t": profile, "cpu-2t": profile})
    return Registry(variants)


def _pct(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(int(q * len(sorted_ns)), len(sorted_ns) - 1)] / 1000.0


def _summary(ns: list[int]) -> dict[str, float]:
    ordered = sorted(ns)
    return {"p50": round(_pct(ordered, 0.50), 2), "p90": round(_pct(ordered, 0.90), 2),
            "p99": round(_pct(ordered, 0.99), 2), "p999": round(_pct(ordered, 0.999), 2),
            "mean": round(statistics.fmean(ordered) / 1000.0, 2), "n": len(ordered)}


class Bench:
    """One generated mesh with its planner, view and query list."""

    def __init__(self, size: int, registry: Registry, *, entries: int, queries: int,
                 seed: int) -> None:
        rng = random.Random(seed)
        started = time.perf_counter()
        self.topology = parse_topology(synthetic_topology(size))
        self.parse_s = time.perf_counter() - started
        self.planner = Planner(self.topology, registry, seed=seed)
        edges = self.topology.nodes_in_tier("edge")
        sites = self.topology.nodes_in_tier("intermediate")
        self.entries = rng.sample(edges, min(entries, len(edges))) + sites[:5]
        build_ms = []
        for entry in self.entries:
            t0 = time.perf_counter()
            self.planner.table(entry, "digits")
            build_ms.append((time.perf_counter() - t0) * 1000)
        self.build_ms = build_ms
        self.rows = [len(self.planner.table(e, "digits").rows) for e in self.entries]
        self.view = MeshView(stale_after_s=10.0)
        for node in self.topology.nodes:
            self.view.report(node, rng.choice((0, 0, 0, 1, 2, 4, 9, 30, 200)), 0.0)
        for node in rng.sample(sorted(self.topology.nodes), max(1, size // 200)):
            self.view.set_down([node], 0.0)
        labels = [label for label, _, w in MIX for _ in range(w)]
        slos = {label: slo for label, slo, _ in MIX}
        self.queries = [(rng.choice(self.entries), label, slos[label])
                        for label in (rng.choice(labels) for _ in range(queries))]
        self.rng = random.Random(seed + 1)
        self.samples: dict[str, list[int]] = {label: [] for label, _, _ in MIX}

    def run(self) -> None:
        plan, view, rng = self.planner.plan, self.view, self.rng
        clock = time.perf_counter_ns
        samples = self.samples
        for entry, label, slo in self.queries:
            t0 = clock()
            plan("digits", slo, entry, view, now=1.0, payload_bytes=256, rng=rng)
            samples[label].append(clock() - t0)

    def explain_us(self, n: int = 300) -> dict[str, float]:
        ns = []
        for entry, _, slo in self.queries[:n]:
            t0 = time.perf_counter_ns()
            self.planner.plan("digits", slo, entry, self.view, now=1.0, payload_bytes=256,
                              explain=True, rng=self.rng)
            ns.append(time.perf_counter_ns() - t0)
        return _summary(ns)

    def report(self) -> dict[str, Any]:
        everything = [t for ts in self.samples.values() for t in ts]
        counts = {t: len(self.topology.nodes_in_tier(t)) for t in ("edge", "intermediate", "core")}
        return {
            "nodes": len(self.topology.nodes), "nodes_per_tier": counts,
            "parse_s": round(self.parse_s, 3),
            "table_build_ms": {"mean": round(statistics.fmean(self.build_ms), 3),
                               "max": round(max(self.build_ms), 3),
                               "entries": len(self.entries)},
            "rows_per_table": {"mean": round(statistics.fmean(self.rows), 1),
                               "max": max(self.rows)},
            "decision_us": _summary(everything),
            "by_query": {label: _summary(ts) for label, ts in self.samples.items()},
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--queries", type=int, default=20000, help="per size per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--entries", type=int, default=200)
    parser.add_argument("--home", default=None, help="use this mesh home's registry")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "planner.json")
    args = parser.parse_args(argv)
    registry = Registry.load(args.home) if args.home else measured_registry()

    benches = {}
    for size in args.sizes:
        print(f"setting up {size} nodes...", flush=True)
        benches[size] = Bench(size, registry, entries=args.entries, queries=args.queries,
                              seed=size)
    # Warm-up, then the same rounds without and with gc.freeze().
    for bench in benches.values():
        bench.queries, full = bench.queries[:2000], bench.queries
        bench.run()
        bench.queries = full
        bench.samples = {k: [] for k in bench.samples}
    gc.collect()
    for _ in range(max(1, args.rounds // 2)):
        for bench in benches.values():
            bench.run()
    unfrozen = {size: _summary([t for ts in b.samples.values() for t in ts])
                for size, b in benches.items()}
    for bench in benches.values():
        bench.samples = {k: [] for k in bench.samples}
    gc.collect()
    gc.freeze()
    for r in range(args.rounds):
        for bench in benches.values():
            bench.run()
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    results: dict[str, Any] = {}
    for size, bench in benches.items():
        results[str(size)] = bench.report()
        results[str(size)]["decision_us_without_gc_freeze"] = unfrozen[size]
        results[str(size)]["explain_us"] = bench.explain_us()
    small, large = str(min(args.sizes)), str(max(args.sizes))
    p99_large = results[large]["decision_us"]["p99"]
    ratio_p99 = p99_large / results[small]["decision_us"]["p99"]
    ratio_p50 = results[large]["decision_us"]["p50"] / results[small]["decision_us"]["p50"]
    out = {
        "benchmark": "planner decision time",
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "note": "2 shared cores: other work runs alongside; ratios are steadier "
                            "than absolute figures"},
        "method": __doc__.strip().split("\n\n", 2)[2],
        "query_mix": {label: {"slo": slo.to_wire(), "weight": w} for label, slo, w in MIX},
        "payload_bytes": 256,
        "sizes": results,
        "goal": {"p99_us_at_largest": GOAL_P99_US, "max_ratio_largest_vs_smallest": GOAL_RATIO},
        "outcome": {
            "p99_us_at_largest": p99_large,
            "p99_ratio_largest_vs_smallest": round(ratio_p99, 2),
            "p50_ratio_largest_vs_smallest": round(ratio_p50, 2),
            "p99_goal_met": p99_large < GOAL_P99_US,
            "ratio_goal_met": ratio_p99 <= GOAL_RATIO,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for size in args.sizes:
        r = results[str(size)]
        d = r["decision_us"]
        print(f"{size:>6} nodes: p50 {d['p50']:6.2f} us  p99 {d['p99']:6.2f} us  "
              f"(no gc.freeze: p99 {r['decision_us_without_gc_freeze']['p99']:.2f} us)  "
              f"table build {r['table_build_ms']['mean']:.2f} ms/entry, "
              f"{r['rows_per_table']['mean']:.0f} rows")
    print(f"p99 ratio {max(args.sizes)}/{min(args.sizes)} nodes: {ratio_p99:.2f}  -> "
          f"{json.dumps(out['outcome'])}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
