"""Forwarding to a neighbour over its msgpack stream: one connection, typed failures, reconnect."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mesh import AsyncClient, MeshError
from mesh.topology import parse_topology
from mesh.wire import SLO, InferRequest
from nodes.agent import AgentConfig, NodeAgent
from nodes.stream import StreamServer


def _accurate(images: Any, i: int = 0) -> InferRequest:
    return InferRequest("digits", [images[i:i + 1]], slo=SLO(min_accuracy=0.99))


@contextlib.asynccontextmanager
async def _edge(home: Path, serving: Any, topology: Any, core_url: str, stream_url: str,
                **options: Any
                ) -> AsyncIterator[tuple[NodeAgent, str]]:
    config = AgentConfig(node="edge-1", topology=topology, home=home,
                         neighbours={"core-1": core_url},
                         stream_neighbours={"core-1": stream_url}, **options)
    async with serving(config) as (edge, server):
        yield edge, str(server.make_url("")).rstrip("/")


async def test_forwarded_queries_share_one_stream_and_survive_the_neighbour_restarting(
        digits_home: Path, serving: Any, heldout: Any, edge_and_core: Any) -> None:
    images, _ = heldout
    topology = edge_and_core
    async with serving(AgentConfig(node="core-1", topology=topology, home=digits_home)
                       ) as (core, core_server):
        core_url = str(core_server.make_url("")).rstrip("/")
        stream = StreamServer(core, "127.0.0.1", 0)
        async with stream:
            port = stream.port
            async with _edge(digits_home, serving, topology, core_url, f"tcp://127.0.0.1:{port}"
                             ) as (edge, url):
                async with AsyncClient(url) as client:
                    far = await asyncio.gather(*(client.infer(
                        "digits", images[i:i + 1], min_accuracy=0.99) for i in range(12)))
                assert {r.served_by.node for r in far} == {"core-1"}
                assert all(r.timing["network_ms"] > 0 for r in far)
                assert all(r.plan.node == "core-1" for r in far)
                assert len(stream.connections) == 1  # one persistent stream, many queries
                status = edge.status()
                assert status["forwarded_via"] == {"stream": 12}
                assert status["neighbour_transports"] == {"core-1": "stream"}
                assert status["forwarded"] == {"core-1": 12}
                assert "core-1" in edge.view.snapshot(edge.clock())  # piggybacked load

                await stream.__aexit__(None, None, None)  # the neighbour's stream goes away
                # the query that found it gone is planned again and served here, flagged
                moved = await edge.infer(_accurate(images))
                assert moved.served_by.node == "edge-1"
                assert moved.plan.handed_back.node == "core-1"
                assert moved.plan.handed_back.reason.startswith("forwarding to core-1 failed")
                assert moved.plan.feasible is False  # nothing left here reaches 0.99
                assert edge.view.is_down("core-1", edge.clock())

                # back on the same port: a healthy report clears the mark, the stream reconnects
                async with StreamServer(core, "127.0.0.1", port) as again:
                    edge.view.report("core-1", 0, edge.clock())
                    answer = await edge.infer(_accurate(images, 1))
                    assert answer.served_by.node == "core-1"
                    assert len(again.connections) == 1
                assert edge.status()["forwarded_via"] == {"stream": 13}


async def test_a_silent_stream_neighbour_times_out_is_marked_down_and_the_query_moves(
        digits_home: Path, serving: Any, heldout: Any, edge_and_core: Any) -> None:
    """A neighbour that accepts the stream but never answers costs forward_timeout_s, no more."""
    images, _ = heldout
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with _edge(digits_home, serving, edge_and_core, "http://127.0.0.1:9",
                         f"tcp://127.0.0.1:{port}", forward_timeout_s=0.5) as (edge, _):
            loop = asyncio.get_running_loop()
            started = loop.time()
            moved = await asyncio.wait_for(edge.infer(_accurate(images)), 10)
            assert loop.time() - started < 10
            assert moved.served_by.node == "edge-1"
            assert moved.plan.handed_back.reason == (
                "forwarding to core-1 failed: no answer within 500 ms")
            assert edge.view.is_down("core-1", edge.clock())
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def test_stream_neighbours_must_also_have_an_http_url(digits_home: Path, edge_and_core: Any) -> None:
    with pytest.raises(ValueError, match="stream_neighbours: core-1 have no HTTP URL"):
        AgentConfig(node="edge-1", topology=edge_and_core, home=digits_home,
                    stream_neighbours={"core-1": "tcp://127.0.0.1:1"})


async def test_a_dead_hop_with_nothing_behind_it_is_a_clear_5xx(
        digits_home: Path, serving: Any, heldout: Any) -> None:
    """Only the (dead) core hosts the task: the entry answers at once, naming the problem."""
    images, _ = heldout
    lonely = parse_topology({
        "name": "lonely",
        "hardware": {"box": {"kind": "cpu", "threads": 1, "memory_mb": 256}},
        "nodes": [{"name": "core-1", "tier": "core", "hardware": "box", "variants": ["digits-*"]},
                  {"name": "edge-1", "tier": "edge", "hardware": "box", "variants": []}],
        "links": [{"between": ["edge-1", "core-1"], "latency_ms": 1, "bandwidth_mbps": 1000}],
    })
    async with _edge(digits_home, serving, lonely, "http://127.0.0.1:9", "tcp://127.0.0.1:9"
                     ) as (edge, _):
        with pytest.raises(MeshError) as info:
            await asyncio.wait_for(edge.infer(_accurate(images)), 10)
    assert info.value.status in (502, 503)
    assert "down" in info.value.message or "failed" in info.value.message
    assert edge.view.is_down("core-1", edge.clock())
