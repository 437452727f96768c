"""What a node does when its view changes in flight: re-plan, and say what really served.

A middle node that knows the planned node is down plans the query again; the
answer must then describe the variant that ran, so that ``slo_met`` is true
only when it was. A hop that does not answer is given up at the query's
deadline, not after the node's fixed forward timeout.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mesh import AsyncClient
from mesh.registry import Registry
from mesh.topology import parse_topology
from mesh.transport import MemoryTransport
from mesh.wire import SLO, InferRequest
from nodes.answers import answer


@pytest.fixture
def chain() -> Any:
    """edge-1 -- mid-1 -- core-1: linear at the edge, the MLP in the middle, the CNN in the core."""
    box = {"kind": "cpu", "threads": 1, "memory_mb": 256}
    return parse_topology({
        "name": "chain", "hardware": {"box": box},
        "nodes": [{"name": "core-1", "tier": "core", "hardware": "box", "variants": ["digits-cnn"]},
                  {"name": "mid-1", "tier": "intermediate", "hardware": "box",
                   "variants": ["digits-mlp"]},
                  {"name": "edge-1", "tier": "edge", "hardware": "box",
                   "variants": ["digits-linear"]}],
        "links": [{"between": ["edge-1", "mid-1"], "latency_ms": 1, "bandwidth_mbps": 1000},
                  {"between": ["mid-1", "core-1"], "latency_ms": 1, "bandwidth_mbps": 1000}],
    })


async def test_a_middle_hop_that_replans_reports_what_served_and_slo_met_is_false(
        digits_home: Path, memory_mesh: Any, heldout: Any, chain: Any) -> None:
    images, _ = heldout
    mlp = Registry.load(digits_home).get("digits-mlp").accuracy
    async with memory_mesh(chain, digits_home) as agents:
        entry = MemoryTransport(lambda body: _client_answer(agents["edge-1"], body))
        async with AsyncClient("http://edge-1", transports={"http://edge-1": entry}) as client:
            planned = await client.infer("digits", images[:1], min_accuracy=0.99)
            assert planned.served_by.node == "core-1" and planned.slo_met

            # the middle node now believes the core is down (a forged heartbeat would do it)
            agents["mid-1"].view.mark_down("core-1", agents["mid-1"].clock())
            moved = await client.infer("digits", images[:1], min_accuracy=0.99)
        assert moved.served_by.node == "mid-1" and moved.served_by.variant == "digits-mlp"
        # the plan is the middle node's, which ran; the entry's choice is kept as history
        assert moved.plan is not None
        assert moved.plan.variant == "digits-mlp" and moved.plan.node == "mid-1"
        assert moved.plan.replanned_from is not None
        assert moved.plan.replanned_from.variant == "digits-cnn"
        assert moved.accuracy == pytest.approx(mlp)
        assert moved.plan.feasible is False
        assert not moved.slo_met  # 0.972 is below the 0.99 asked for


async def _client_answer(agent: Any, body: bytes) -> tuple[int, bytes]:
    reply = await answer(agent, body, from_client=True)
    return reply.status, reply.body


async def test_a_frozen_hop_is_given_up_at_the_query_deadline_and_planned_around(
        digits_home: Path, memory_mesh: Any, heldout: Any, chain: Any) -> None:
    """The core takes queries but never answers; the nodes' own hop timeout is 10 s."""
    images, _ = heldout
    async with memory_mesh(chain, digits_home, frozen={"core-1"}) as agents:
        mid = agents["mid-1"]
        assert mid.config.forward_timeout_s >= 10
        # the caller waits 1 s: the middle node waits half of that for the core, then
        # serves the query itself with what it has
        req = InferRequest("digits", [images[:1]], slo=SLO(min_accuracy=0.99), timeout_ms=1000)
        answer_ = await asyncio.wait_for(mid.infer(req), 5)
        assert answer_.served_by.node == "mid-1"
        assert answer_.plan is not None and answer_.plan.handed_back is not None
        assert answer_.plan.handed_back.reason == (
            "forwarding to core-1 failed: no answer within 500 ms")
        assert mid.view.is_down("core-1", mid.clock())
