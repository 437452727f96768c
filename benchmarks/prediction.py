"""How well the planner predicts latency, per tier, on the live local mesh.

::

    python benchmarks/prediction.py [--home DIR] [--queries 200] [--hop-transport stream|http]

Starts ``topologies/local.yaml`` (every node its own process, links
emulated) and sends held-out digit images from ``edge-1`` with SLOs that put
them on each tier: a tight latency target (served at the edge), an accuracy
target the intermediate site meets, and, on a copy of the topology whose
intermediate site does not host the CNN, the same accuracy target (served by
the core). A last class sends 16 queries at a time at the edge, so queues
form and the queue term is exercised. The client reaches ``edge-1`` over
HTTP; nodes forward to each other over ``--hop-transport`` (the msgpack
stream by default, as the mesh runs). For every answer it compares the entry
node's predicted total (``Result.plan.predicted``) with the latency the
client measured, and the predicted split with the nodes' own account.

Per class: median absolute error, 90th percentile, median signed error
(measured - predicted: positive means the planner was optimistic). Two
things are derived. The per-hop forwarding cost the network term should
use: for each forwarded class, the value that would have made its median
prediction exact, averaged over the classes (a systematic error belongs in
the model, not in the margin). And the suggested margin per tier:
the 90th percentile of the planner's optimism (measured - predicted, when
positive), rounded up to 0.5 ms. ``mesh/planner/margins.py`` and
``Planner.per_hop_ms`` hold the values in use. Results go to
``benchmarks/results/prediction.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mesh.client import AsyncClient, Client, Result  # noqa: E402
from mesh.planner import CALIBRATED_MARGIN_MS, Planner  # noqa: E402
from mesh.testbed.local import LocalMesh  # noqa: E402
from mesh.topology import Topology  # noqa: E402

LOCAL = ROOT / "topologies" / "local.yaml"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def _summarise(results: list[Result], topology: Topology) -> dict[str, Any]:
    errors = [r.latency_ms - float(r.plan.predicted["total_ms"]) for r in results]
    absolute = [abs(e) for e in errors]
    parts: dict[str, dict[str, float]] = {}
    for part in ("network_ms", "queue_ms", "compute_ms"):
        measured = [r.timing.get(part, 0.0) for r in results]
        predicted = [float(r.plan.predicted[part]) for r in results]
        parts[part] = {"measured_median": round(statistics.median(measured), 3),
                       "predicted_median": round(statistics.median(predicted), 3)}
    return {
        "n": len(results),
        "served_by": sorted({f"{r.served_by.node}/{r.served_by.variant}" for r in results}),
        "measured_ms": {"median": round(statistics.median(r.latency_ms for r in results), 3),
                        "p90": round(_pct([r.latency_ms for r in results], 0.9), 3)},
        "predicted_ms": {"median": round(statistics.median(
            float(r.plan.predicted["total_ms"]) for r in results), 3)},
        "abs_error_ms": {"median": round(statistics.median(absolute), 3),
                         "p90": round(_pct(absolute, 0.9), 3), "max": round(max(absolute), 3)},
        "signed_error_ms_median": round(statistics.median(errors), 3),
        "optimism_ms_p90": round(max(_pct(errors, 0.9), 0.0), 3),
        "per_hop_fit_ms": _per_hop(results, topology),
        "split": parts,
        "slo_met": round(sum(r.slo_met for r in results) / len(results), 4),
    }


def _per_hop(results: list[Result], topology: Topology) -> float | None:
    """The per-hop cost that would have made the median prediction exact (client's clock)."""
    fits = []
    for r in results:
        path = topology.path("edge-1", r.served_by.node)
        if path is not None and len(path.hops) > 1:
            error = r.latency_ms - float(r.plan.predicted["total_ms"])
            fits.append(Planner.per_hop_ms + error / (2 * (len(path.hops) - 1)))
    return round(statistics.median(fits), 3) if fits else None


def _sequential(url: str, images: Any, slo: dict[str, Any], n: int) -> list[Result]:
    with Client(url) as client:
        for i in range(20):  # warm the connection and the path
            client.infer("digits", images[i:i + 1], **slo)
        return [client.infer("digits", images[i % len(images):i % len(images) + 1], **slo)
                for i in range(n)]


async def _concurrent(url: str, images: Any, slo: dict[str, Any], n: int, width: int
                      ) -> list[Result]:
    async with AsyncClient(url) as client:
        out: list[Result] = []
        for start in range(0, n, width):
            out += await asyncio.gather(*(
                client.infer("digits", images[(start + k) % len(images):][:1], **slo)
                for k in range(width)))
        return out


def run(home: Path, queries: int, hop_transport: str = "stream") -> dict[str, Any]:
    from mesh.variants.digits import load_heldout

    images, _ = load_heldout()
    classes: dict[str, dict[str, Any]] = {}
    with LocalMesh(LOCAL, home=home, run_dir=Path(tempfile.mkdtemp(prefix="pred-")),
                   hop_transport=hop_transport, use_addresses=False) as mesh:
        url = mesh.url("edge-1")
        topo = mesh.topology
        classes["edge"] = _summarise(_sequential(url, images, {"latency_ms": 10.0}, queries), topo)
        classes["intermediate"] = _summarise(_sequential(
            url, images, {"latency_ms": 250.0, "min_accuracy": 0.99}, queries), topo)
        classes["edge-16-concurrent"] = _summarise(asyncio.run(_concurrent(
            url, images, {"latency_ms": 50.0}, queries, 16)), topo)
    data = yaml.safe_load(LOCAL.read_text())
    for node in data["nodes"]:
        if node["name"] == "mid-1":
            node["variants"] = ["digits-mlp"]
    with tempfile.TemporaryDirectory(prefix="pred-") as tmp:
        topo = Path(tmp) / "core-serves-cnn.yaml"
        topo.write_text(yaml.safe_dump(data))
        with LocalMesh(topo, home=home, run_dir=Path(tmp) / "run",
                       hop_transport=hop_transport, use_addresses=False) as mesh:
            classes["core"] = _summarise(_sequential(
                mesh.url("edge-1"), images, {"latency_ms": 500.0, "min_accuracy": 0.99}, queries),
                mesh.topology)
    return classes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path,
                        default=Path(os.environ.get("TIERMESH_HOME", ROOT / ".tiermesh")))
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--hop-transport", choices=("stream", "http"), default="stream",
                        help="how nodes forward to each other (the SDK always uses HTTP here)")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "prediction.json")
    args = parser.parse_args(argv)
    classes = run(args.home, args.queries, args.hop_transport)
    tiers = {"edge": ["edge"], "intermediate": ["intermediate"], "core": ["core"]}
    suggested = {tier: max(0.5, math.ceil(max(classes[c]["optimism_ms_p90"] for c in names) * 2) / 2)
                 for tier, names in tiers.items()}
    fits = [c["per_hop_fit_ms"] for c in classes.values() if c["per_hop_fit_ms"] is not None]
    out = {
        "benchmark": "predicted vs measured latency on the live local mesh",
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "note": "every node, the link emulator and the client share these cores"},
        "method": __doc__.strip().split("\n\n", 2)[2],
        "transport": {"client_to_entry": "http", "node_to_node": args.hop_transport,
                      "links": "user-space link emulator per port and direction"},
        "queries_per_class": args.queries,
        "planner": {"per_hop_ms": Planner.per_hop_ms, "dispatch_ms": Planner.dispatch_ms,
                    "margin_frac": Planner.margin_frac,
                    "margin_ms_in_use": dict(CALIBRATED_MARGIN_MS)},
        "classes": classes,
        "median_abs_error_ms_by_tier": {tier: classes[names[0]]["abs_error_ms"]["median"]
                                        for tier, names in tiers.items()},
        "suggested_margin_ms": suggested,
        "suggested_per_hop_ms": round(statistics.fmean(fits), 2) if fits else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for name, c in classes.items():
        print(f"{name:>20}: measured {c['measured_ms']['median']:7.2f} ms, predicted "
              f"{c['predicted_ms']['median']:7.2f} ms, |error| median {c['abs_error_ms']['median']:.2f}"
              f" p90 {c['abs_error_ms']['p90']:.2f}, bias {c['signed_error_ms_median']:+.2f} "
              f"({', '.join(c['served_by'])})")
    print(f"suggested margins (ms): {suggested}; in use: {dict(CALIBRATED_MARGIN_MS)}")
    print(f"suggested per_hop_ms: {out['suggested_per_hop_ms']}; in use: {Planner.per_hop_ms}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
