"""Artifacts pulled from the parent by sha256: verified, refused when damaged, fetched again."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mesh import AsyncClient
from mesh.errors import ArtifactNotFound, InvalidInput, Unavailable
from mesh.registry import Registry
from mesh.store import ArtifactStore, sha256_bytes
from mesh.topology import parse_topology
from nodes.agent import AgentConfig
from nodes.artifacts import ArtifactSource, parent_of

TWO_TIERS = {
    "name": "two",
    "hardware": {"small": {"kind": "cpu", "threads": 1, "memory_mb": 512},
                 "big": {"kind": "cpu", "threads": 1, "memory_mb": 2048}},
    "nodes": [{"name": "core-1", "tier": "core", "hardware": "big", "variants": ["digits-*"]},
              {"name": "mid-1", "tier": "intermediate", "hardware": "big",
               "variants": ["digits-mlp"]},
              {"name": "edge-1", "tier": "edge", "hardware": "small",
               "variants": ["digits-linear", "digits-mlp"]}],
    "links": [{"between": ["edge-1", "mid-1"], "latency_ms": 1, "bandwidth_mbps": 1000},
              {"between": ["mid-1", "core-1"], "latency_ms": 1, "bandwidth_mbps": 1000}],
}


def test_the_parent_is_the_next_hop_towards_the_nearest_core() -> None:
    topology = parse_topology(TWO_TIERS)
    assert parent_of(topology, "edge-1") == "mid-1"
    assert parent_of(topology, "mid-1") == "core-1"
    assert parent_of(topology, "core-1") is None


class _Parent:
    """A parent that serves damaged copies first: ``plan`` lists what each request gets."""

    def __init__(self, data: bytes, plan: list[str]) -> None:
        self.data, self.plan, self.requests = data, plan, 0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        kind = self.plan[min(self.requests, len(self.plan) - 1)]
        self.requests += 1
        if kind == "missing":
            return web.json_response({"error": "no"}, status=404)
        if kind == "truncated":
            return web.Response(body=self.data[: len(self.data) // 2])
        if kind == "flipped":
            return web.Response(body=bytes([self.data[0] ^ 1]) + self.data[1:])
        return web.Response(body=self.data)


async def _source(tmp_path: Path, parent: _Parent, known: set[str]
                  ) -> tuple[ArtifactSource, TestServer, aiohttp.ClientSession]:
    app = web.Application()
    app.router.add_get("/v1/artifacts/{sha}", parent.handler)
    server = TestServer(app)
    await server.start_server()
    session = aiohttp.ClientSession()
    source = ArtifactSource(ArtifactStore(tmp_path / "store"), known=lambda: known,
                            parent="mid-1", parent_url=str(server.make_url("")).rstrip("/"),
                            http=lambda: session)
    source.backoff_s = 0.0
    return source, server, session


async def test_a_damaged_copy_is_refused_and_fetched_again(tmp_path: Path) -> None:
    data = b"model bytes " * 5000
    sha = sha256_bytes(data)
    parent = _Parent(data, ["truncated", "flipped", "ok"])
    source, server, session = await _source(tmp_path, parent, {sha})
    try:
        path = await source.ensure(sha)
        assert path.read_bytes() == data
        assert parent.requests == 3
        assert source.fetches == {"ok": 1, "corrupt": 2, "failed": 0}
        assert await source.ensure(sha) == path and parent.requests == 3  # verified, kept
    finally:
        await source.aclose()
        await session.close()
        await server.close()


async def test_a_parent_that_only_sends_damaged_copies_leaves_nothing_behind(
        tmp_path: Path) -> None:
    data = b"x" * 10_000
    sha = sha256_bytes(data)
    source, server, session = await _source(tmp_path, _Parent(data, ["truncated"]), {sha})
    try:
        with pytest.raises(Unavailable, match=r"could not be fetched intact .*\(corrupt or truncated\)"):
            await source.ensure(sha)
        assert not source.store.has(sha)
        assert not list((tmp_path / "store").rglob(".pull-*"))
        with pytest.raises(ArtifactNotFound, match="no registered variant"):
            await source.ensure("0" * 64)
        with pytest.raises(InvalidInput, match="64 lower-case hex"):
            await source.ensure("../etc/passwd")
    finally:
        await source.aclose()
        await session.close()
        await server.close()


async def test_a_child_pulls_through_its_parents_and_serves(
        digits_home: Path, tmp_path: Path, serving: Any, heldout: Any) -> None:
    """core-1 has the artifacts; mid-1 and edge-1 start with empty stores."""
    topology = parse_topology(TWO_TIERS)
    homes = {"core-1": digits_home}
    for node in ("mid-1", "edge-1"):
        homes[node] = tmp_path / node
        homes[node].mkdir()
        shutil.copy(digits_home / "registry.json", homes[node] / "registry.json")
    images, _ = heldout
    async with serving(AgentConfig(node="core-1", topology=topology, home=homes["core-1"])
                       ) as (core, core_server):
        core_url = str(core_server.make_url("")).rstrip("/")
        async with serving(AgentConfig(node="mid-1", topology=topology, home=homes["mid-1"],
                                       neighbours={"core-1": core_url})) as (mid, mid_server):
            mid_url = str(mid_server.make_url("")).rstrip("/")
            async with serving(AgentConfig(node="edge-1", topology=topology, home=homes["edge-1"],
                                           neighbours={"mid-1": mid_url})) as (edge, edge_server):
                assert set(edge.loaded) == {"digits-linear", "digits-mlp"}
                assert edge.status()["artifacts"] == {"parent": "mid-1",
                                                      "fetches": {"ok": 2, "corrupt": 0, "failed": 0}}
                # mid-1 pulled the linear model through for its child without hosting it
                linear = Registry.load(digits_home).get("digits-linear")
                assert ArtifactStore(homes["mid-1"] / "store").verify(linear.sha256)
                assert "digits-linear" not in mid.loaded
                async with AsyncClient(str(edge_server.make_url(""))) as client:
                    r = await client.infer("digits", images[:2], latency_ms=50)
                assert r.served_by.node == "edge-1"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{core_url}/v1/artifacts/{linear.sha256}") as resp:
                assert resp.status == 200 and sha256_bytes(await resp.read()) == linear.sha256
            async with session.get(f"{core_url}/v1/artifacts/{'ab' * 32}") as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["type"] == "ArtifactNotFound"
            async with session.get(f"{core_url}/v1/artifacts/nothex") as resp:
                assert resp.status == 400
    assert core.status()["artifacts"]["fetches"] == {"ok": 0, "corrupt": 0, "failed": 0}
