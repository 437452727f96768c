"""A frozen entry node (SIGSTOP) on the live local mesh: both SDK clients, over HTTP and the
stream, move on to the next entry URL instead of waiting out their whole timeout.

A stopped process still has its listening sockets: the kernel completes TCP
handshakes and buffers the query, so only the client's per-attempt answer
timeout can tell it is gone.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from mesh import AsyncClient, Client, Result
from mesh.testbed.local import LocalMesh

pytestmark = pytest.mark.integration


@contextmanager
def frozen(mesh: LocalMesh, node: str) -> Iterator[None]:
    """``node``'s process stopped (SIGSTOP) inside the block, always continued after it."""
    assert mesh.state is not None
    pid = next(int(p["pid"]) for p in mesh.state.processes
               if p["role"] == "node" and p["name"] == node)
    os.killpg(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(pid, signal.SIGCONT)


def _queries(urls: list[str], images) -> list[Result]:
    """With each client: a query with a latency target, and one without (fresh clients, so
    each starts at the frozen entry). The blocking client keeps its default per-attempt
    timeouts; the asyncio one gets a shorter one, to keep the test short."""
    results = []
    for options in ({"latency_ms": 10}, {}):
        with Client(urls, timeout_s=10) as client:
            results.append(client.infer("digits", images[:1], **options))

    async def go() -> list[Result]:
        out = []
        for options in ({"latency_ms": 10}, {}):
            async with AsyncClient(urls, timeout_s=10, attempt_timeout_s=1) as client:
                out.append(await client.infer("digits", images[:1], **options))
        return out

    return results + asyncio.run(go())


@pytest.mark.parametrize("address", [LocalMesh.url, LocalMesh.stream_url], ids=["http", "tcp"])
def test_a_frozen_entry_is_skipped_for_the_next_one(
        mesh: LocalMesh, heldout, address: Callable[[LocalMesh, str], str]) -> None:
    images, _ = heldout
    urls = [address(mesh, "edge-1"), address(mesh, "edge-2")]
    with Client(urls[1]) as client:  # edge-2 has answered once: only the freeze is slow
        assert client.infer("digits", images[:1], latency_ms=10).served_by.node == "edge-2"
    with frozen(mesh, "edge-1"):
        results = _queries(urls, images)
    assert [r.served_by.node for r in results] == ["edge-2"] * 4
    tight_sync, _, tight_async, _ = results
    # the time spent waiting on the frozen entry counts against the latency target
    assert tight_sync.slo_met is False and tight_async.slo_met is False
    with Client(urls) as client:  # continued, edge-1 answers again
        assert client.infer("digits", images[:1], latency_ms=10).served_by.node == "edge-1"
