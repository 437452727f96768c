"""Failures as a normal case: a failing peer is ejected, retries stay within their budget,
a node cut off from upstream answers with what it has and says so, and heals by itself.
Real agents and real models, wired by in-memory transports (no sockets)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.errors import Unavailable
from mesh.health import RetryBudget
from mesh.runtimes import runtime_for
from mesh.runtimes.onnx import OnnxRuntime
from mesh.topology import parse_topology
from mesh.wire import SLO, InferRequest


class BrokenDisk(OnnxRuntime):
    """Every ONNX model this node opens fails to load (a bad disk, a broken runtime)."""

    def load(self, path: str, *, threads: int) -> Any:
        raise RuntimeError("I/O error reading the model")


def _chain() -> Any:
    """edge-1 -> mid-1 -> core-1; mid-1 and core-1 both host the CNN, mid-1 is nearer."""
    box = {"kind": "cpu", "threads": 1, "memory_mb": 512}
    return parse_topology({
        "name": "chain", "hardware": {"box": box},
        "nodes": [{"name": "core-1", "tier": "core", "hardware": "box",
                   "variants": ["digits-cnn"]},
                  {"name": "mid-1", "tier": "intermediate", "hardware": "box",
                   "variants": ["digits-cnn"]},
                  {"name": "edge-1", "tier": "edge", "hardware": "box",
                   "variants": ["digits-linear", "digits-mlp"]}],
        "links": [{"between": ["edge-1", "mid-1"], "latency_ms": 1, "bandwidth_mbps": 1000},
                  {"between": ["mid-1", "core-1"], "latency_ms": 5, "bandwidth_mbps": 1000}],
    })


def broken(*names: str) -> dict[str, Any]:
    """Runtime lookups for ``memory_mesh``: these nodes cannot open ONNX models."""
    disk = BrokenDisk()
    return {n: (lambda fmt: disk if fmt == "onnx" else runtime_for(fmt)) for n in names}


def _query(images: np.ndarray, i: int, **slo: Any) -> InferRequest:
    return InferRequest(task="digits", tensors=[images[i:i + 1].astype(np.float32)],
                        slo=SLO(**slo), request_id=f"q{i}")


async def test_a_peer_failing_its_queries_is_ejected_and_readmitted_after_probation(
        digits_home: Path, heldout: Any, memory_mesh: Any) -> None:
    images, labels = heldout
    async with memory_mesh(_chain(), digits_home, runtimes=broken("mid-1")) as agents:
        edge = agents["edge-1"]
        served = []
        for i in range(5):  # mid-1's CNN cannot load: each query is retried on core-1's
            r = await edge.infer(_query(images, i, min_accuracy=0.99), from_client=True)
            assert r.served_by.node == "core-1" and r.plan is not None
            assert r.plan.handed_back is not None and r.plan.handed_back.node == "mid-1"
            served.append(int(r.outputs[0].argmax()))
        assert np.mean(np.array(served) == labels[:5]) >= 0.8
        failures = edge.status()["failures"]
        assert failures["ejected"]["mid-1"]["ejected"]  # five failures in a row
        assert "failures in a row" in failures["ejected"]["mid-1"]["reason"]
        assert failures["retries"]["spent_total"] == 5
        # Ejected: the very next query goes straight to core-1, no retry spent.
        r = await edge.infer(_query(images, 5, min_accuracy=0.99), from_client=True)
        assert r.served_by.node == "core-1" and r.plan.handed_back is None
        assert edge.status()["failures"]["retries"]["spent_total"] == 5
        # After its ejection (2 s), mid-1 is on probation: one more failure ejects it again,
        # for twice as long.
        over = edge.view.ejected["mid-1"] + 0.01
        edge.clock = lambda: over  # the ejection's time is up
        r = await edge.infer(_query(images, 6, min_accuracy=0.99), from_client=True)
        assert r.served_by.node == "core-1" and r.plan.handed_back.node == "mid-1"
        again = edge.status()["failures"]["ejected"]["mid-1"]
        assert again["ejected"] and again["times"] == 2 and again["for_s"] > 3.0


async def test_retries_stop_when_the_budget_is_spent(digits_home: Path, heldout: Any,
                                                     memory_mesh: Any) -> None:
    images, _ = heldout
    async with memory_mesh(_chain(), digits_home, runtimes=broken("mid-1")) as agents:
        edge = agents["edge-1"]
        edge.retries = RetryBudget(ratio=0.0, min_retries=1, window_s=60.0)
        first = await edge.infer(_query(images, 0, min_accuracy=0.99), from_client=True)
        assert first.served_by.node == "core-1"  # the one retry the budget allows
        with pytest.raises(Unavailable, match="digits-cnn"):
            await edge.infer(_query(images, 1, min_accuracy=0.99), from_client=True)
        retries = edge.status()["failures"]["retries"]
        assert retries["spent_total"] == 1 and retries["refused_total"] == 1
        assert any(f["peer"] == "retry-budget" for f in edge.status()["failures"]["recent"])


async def test_cut_off_from_upstream_a_node_answers_degraded_and_heals_by_itself(
        digits_home: Path, heldout: Any, memory_mesh: Any) -> None:
    images, labels = heldout
    frozen = {"mid-1"}  # the link upstream is cut: nothing comes back from mid-1
    async with memory_mesh(_chain(), digits_home, frozen=frozen,
                           forward_timeout_s=0.3) as agents:
        edge = agents["edge-1"]
        edge.view.stale_after_s = 1.0
        r = await edge.infer(_query(images, 0, min_accuracy=0.99), from_client=True)
        # served below the cut, by the best variant there, and the answer says so
        assert r.served_by.node == "edge-1" and r.served_by.variant == "digits-mlp"
        assert r.plan is not None and r.plan.degraded is not None
        assert "mid-1" in r.plan.degraded and "accuracy 0.97" in r.plan.degraded
        assert r.plan.accuracy == pytest.approx(0.972, abs=0.01)
        # while cut off, queries are answered at once, degraded, without waiting on mid-1
        r = await edge.infer(_query(images, 1, min_accuracy=0.99), from_client=True)
        assert r.served_by.node == "edge-1" and r.plan.degraded is not None
        # a query the edge can meet on its own is not degraded
        r = await edge.infer(_query(images, 2, min_accuracy=0.95), from_client=True)
        assert r.plan.degraded is None
        assert edge.status()["failures"]["degraded_answers"] == 2
        # The link heals: once the stale report of mid-1 being down ages out, queries go
        # upstream again, with nobody doing anything.
        frozen.clear()
        await asyncio.sleep(1.2)
        r = await edge.infer(_query(images, 3, min_accuracy=0.99), from_client=True)
        assert r.served_by.variant == "digits-cnn" and r.plan.degraded is None
        assert int(r.outputs[0].argmax()) == labels[3]


async def test_a_repeated_request_id_is_answered_once(digits_home: Path, heldout: Any,
                                                      edge_and_core: Any,
                                                      memory_mesh: Any) -> None:
    images, _ = heldout
    async with memory_mesh(edge_and_core, digits_home) as agents:
        edge = agents["edge-1"]
        # two copies of one query at once (a client that retried), then a third later
        copies = [_query(images, 0, min_accuracy=0.99) for _ in range(3)]
        first, second = await asyncio.gather(*(edge.infer(c, from_client=True)
                                               for c in copies[:2]))
        third = await edge.infer(copies[2], from_client=True)
        assert first is second is third and edge.repeats_answered == 2
        core = agents["core-1"]
        assert core.models.loaded["digits-cnn"].batcher.served == 1  # computed once
        # another query that happens to reuse the id is not mistaken for a repeat
        reused = _query(images, 1, min_accuracy=0.99)
        reused.request_id = "q0"
        other = await edge.infer(reused, from_client=True)
        assert other is not first and core.models.loaded["digits-cnn"].batcher.served == 2
