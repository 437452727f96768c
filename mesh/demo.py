"""``mesh demo``: build, start a local mesh, send real digit images, show where they went.

Every image comes from the digits family's held-out split, so the accuracy
printed is measured against true labels, not assumed.
"""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from mesh.client import Client, Result
from mesh.registry import Registry

__all__ = ["SLO_CLASSES", "SloClass", "run_demo", "send_class"]


@dataclass(frozen=True)
class SloClass:
    name: str
    slo: dict[str, Any]
    expect: str  # what a reader should see


SLO_CLASSES: tuple[SloClass, ...] = (
    SloClass("tight latency", {"latency_ms": 10.0}, "served at the edge"),
    SloClass("balanced", {"latency_ms": 10.0, "min_accuracy": 0.97}, "a better edge variant"),
    SloClass("high accuracy", {"latency_ms": 250.0, "min_accuracy": 0.98}, "served upstream"),
    SloClass("relaxed", {}, "cheapest anywhere"),
)


def send_class(client: Client, slo_class: SloClass, images: np.ndarray, labels: np.ndarray
               ) -> dict[str, Any]:
    """Send each image as its own query; summarise placement, latency and accuracy."""
    results: list[Result] = [client.infer("digits", images[i:i + 1], **slo_class.slo)
                             for i in range(len(images))]
    predicted = np.array([int(np.argmax(r.output[0])) for r in results])
    latencies = sorted(r.latency_ms for r in results)
    placements = collections.Counter(
        f"{r.served_by.tier}/{r.served_by.node}/{r.served_by.variant}" for r in results)
    tiers = collections.Counter(r.served_by.tier for r in results)
    return {
        "class": slo_class.name,
        "slo": slo_class.slo,
        "queries": len(results),
        "placements": dict(placements.most_common()),
        "tiers": dict(tiers),
        "p50_ms": statistics.median(latencies),
        "p95_ms": latencies[min(int(0.95 * len(latencies)), len(latencies) - 1)],
        "slo_met": sum(r.slo_met for r in results) / len(results),
        "accuracy": float(np.mean(predicted == labels)),
        "predicted_ms": statistics.median(
            (r.plan.predicted.get("total_ms", 0.0) if r.plan else 0.0) for r in results),
    }


EMBEDDING_CLASSES: tuple[SloClass, ...] = (
    SloClass("tight latency", {"latency_ms": 40.0}, "int8 at the edge"),
    SloClass("exact", {"latency_ms": 1000.0, "min_accuracy": 0.999}, "fp32 upstream"),
)


def send_embeddings(client: Client, slo_class: SloClass, ids: np.ndarray, mask: np.ndarray,
                    reference: np.ndarray) -> dict[str, Any]:
    """One sentence per query; agreement is cosine similarity with the torch original's output."""
    results = [client.infer("sentence-embedding", ids[i:i + 1], mask[i:i + 1], **slo_class.slo)
               for i in range(len(ids))]
    cosines = [float(np.dot(r.output[0], reference[i])) for i, r in enumerate(results)]
    latencies = sorted(r.latency_ms for r in results)
    placements = collections.Counter(
        f"{r.served_by.tier}/{r.served_by.node}/{r.served_by.variant}" for r in results)
    return {
        "class": slo_class.name,
        "slo": slo_class.slo,
        "queries": len(results),
        "placements": dict(placements.most_common()),
        "p50_ms": statistics.median(latencies),
        "p95_ms": latencies[min(int(0.95 * len(latencies)), len(latencies) - 1)],
        "slo_met": sum(r.slo_met for r in results) / len(results),
        "mean_cosine": float(np.mean(cosines)),
    }


def run_demo(home: Path, topology: Path, *, queries_per_class: int = 100,
             console: Console | None = None, entry: str = "edge-1") -> list[dict[str, Any]]:
    from mesh.status import decisions_table, mesh_status, status_table
    from mesh.testbed.local import LocalMesh
    from mesh.variants import build_bundled
    from mesh.variants.digits import load_heldout

    console = console or Console()
    console.rule("1. build the bundled variants (cached)")
    build_bundled(home)
    images, labels = load_heldout()
    rng = np.random.default_rng(7)

    console.rule(f"2. start the mesh from {topology}")
    with LocalMesh(topology, home=home) as mesh:
        if entry not in mesh.topology.nodes:
            entry = sorted(n for n, s in mesh.topology.nodes.items() if s.tier == "edge")[0]
        console.print(f"{len(mesh.topology.nodes)} nodes up; queries enter at {entry} "
                      f"({mesh.url(entry)})")
        console.rule(f"3. send the same {queries_per_class} held-out images under each SLO class")
        # one sample for every class, so their accuracies compare like for like
        pick = rng.choice(len(images), size=min(queries_per_class, len(images)), replace=False)
        summaries = []
        with Client(mesh.url(entry)) as client:
            client.infer("digits", images[:1])  # first query opens the connection
            for slo_class in SLO_CLASSES:
                summaries.append(send_class(client, slo_class, images[pick], labels[pick]))
        table = Table(title="where each kind of query was served")
        for col in ("SLO class", "SLO", "served by (tier/node/variant)", "p50 ms", "p95 ms",
                    "predicted ms", "SLO met", "accuracy on true labels"):
            table.add_column(col)
        for s in summaries:
            slo_text = ", ".join(f"{k}={v:g}" for k, v in s["slo"].items()) or "none"
            placed = "\n".join(f"{n}x {where}" for where, n in s["placements"].items())
            table.add_row(s["class"], slo_text, placed, f"{s['p50_ms']:.1f}", f"{s['p95_ms']:.1f}",
                          f"{s['predicted_ms']:.1f}", f"{s['slo_met']:.0%}", f"{s['accuracy']:.3f}")
        console.print(table)
        if "sentence-embedding" in Registry.load(home).tasks():
            console.rule("4. sentence embeddings: the MiniLM family")
            summaries += _embedding_demo(home, mesh.url(entry), console)
        console.rule("5. mesh status")
        rows = mesh_status(home)
        console.print(status_table(rows))
        decisions = decisions_table(rows, last=6)  # what the mesh placed, and why
        if decisions is not None:
            console.print(decisions)
        console.rule("6. shut down")
    console.print("mesh stopped; no process left behind")
    return summaries


def _embedding_demo(home: Path, url: str, console: Console) -> list[dict[str, Any]]:
    from mesh.variants.sentences import SentenceTokenizer, load_sentences

    sentences = load_sentences()[:40]
    ids, mask = SentenceTokenizer.from_home(home).encode(sentences)
    with Client(url) as client:
        # the reference: the torch original, wherever the planner keeps it
        reference = np.concatenate([
            client.infer("sentence-embedding", ids[i:i + 1], mask[i:i + 1],
                         policy="most-accurate", min_accuracy=1.0).output
            for i in range(len(ids))])
        rows = [send_embeddings(client, c, ids, mask, reference) for c in EMBEDDING_CLASSES]
    table = Table(title=f"{len(sentences)} shipped sentences, one per query")
    for col in ("SLO class", "SLO", "served by (tier/node/variant)", "p50 ms", "p95 ms", "SLO met",
                "mean cosine vs torch original"):
        table.add_column(col)
    for r in rows:
        slo_text = ", ".join(f"{k}={v:g}" for k, v in r["slo"].items())
        placed = "\n".join(f"{n}x {where}" for where, n in r["placements"].items())
        table.add_row(r["class"], slo_text, placed, f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}",
                      f"{r['slo_met']:.0%}", f"{r['mean_cosine']:.4f}")
    console.print(table)
    return rows
