"""Artifacts pulled from the parent by sha256: verified, refused when damaged, fetched again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mesh import AsyncClient
from mesh.errors import ArtifactNotFound, Forbidden, InvalidInput, Unavailable
from mesh.registry import Registry, Variant
from mesh.store import ArtifactStore, sha256_bytes
from mesh.topology import parse_topology
from nodes.agent import AgentConfig
from nodes.artifacts import ArtifactSource, PullPolicy, parent_of
from nodes.peers import PeerKey

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
        with pytest.raises(ArtifactNotFound, match="no variant this node hosts"):
            await source.ensure("0" * 64)
        with pytest.raises(InvalidInput, match="64 lower-case hex"):
            await source.ensure("../etc/passwd")
    finally:
        await source.aclose()
        await session.close()
        await server.close()


KEY = b"k" * 32  # one mesh key for every node of a test (nodes.peers)
#: a neighbour's address, for nodes that only need to know where its pulls come from
LOOPBACK = "http://127.0.0.1:9"


def _homes(digits_home: Path, tmp_path: Path, *empty: str) -> dict[str, Path]:
    """core-1 uses the built home; every node in ``empty`` gets a registry and no artifacts."""
    homes = {"core-1": digits_home}
    for node in empty:
        homes[node] = tmp_path / node
        homes[node].mkdir()
        shutil.copy(digits_home / "registry.json", homes[node] / "registry.json")
    return homes


def _stored(home: Path) -> set[str]:
    return {p.name for p in (home / "store").glob("*/*")}


async def _get(url: str, sha: str, as_node: str | None = None) -> tuple[int, Any]:
    headers = PeerKey(KEY).headers(as_node) if as_node else {}
    async with aiohttp.ClientSession() as session, \
            session.get(f"{url}/v1/artifacts/{sha}", headers=headers) as resp:
        body = await resp.read()
        return resp.status, (body if resp.status == 200 else json.loads(body)["error"])


def _url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_a_child_pulls_through_its_parents_and_serves(
        digits_home: Path, tmp_path: Path, serving: Any, heldout: Any) -> None:
    """core-1 has the artifacts; mid-1 and edge-1 start with empty stores."""
    topology = parse_topology(TWO_TIERS)
    homes = _homes(digits_home, tmp_path, "mid-1", "edge-1")
    images, _ = heldout
    linear = Registry.load(digits_home).get("digits-linear")
    async with serving(AgentConfig(node="core-1", topology=topology, home=homes["core-1"],
                                   neighbours={"mid-1": LOOPBACK}, mesh_key=KEY)
                       ) as (core, core_server):
        core_url = _url(core_server)
        async with serving(AgentConfig(node="mid-1", topology=topology, home=homes["mid-1"],
                                       neighbours={"core-1": core_url, "edge-1": LOOPBACK},
                                       mesh_key=KEY)) as (mid, mid_server):
            async with serving(AgentConfig(node="edge-1", topology=topology, home=homes["edge-1"],
                                           neighbours={"mid-1": _url(mid_server)},
                                           mesh_key=KEY)) as (edge, edge_server):
                assert set(edge.loaded) == {"digits-linear", "digits-mlp"}
                assert edge.status()["artifacts"] == {"parent": "mid-1",
                                                      "fetches": {"ok": 2, "corrupt": 0, "failed": 0}}
                # mid-1 pulled the linear model through for its child without hosting it
                assert ArtifactStore(homes["mid-1"] / "store").verify(linear.sha256)
                assert "digits-linear" not in mid.loaded
                async with AsyncClient(str(edge_server.make_url(""))) as client:
                    r = await client.infer("digits", images[:2], latency_ms=50)
                assert r.served_by.node == "edge-1"
        status, body = await _get(core_url, linear.sha256, as_node="mid-1")
        assert status == 200 and sha256_bytes(body) == linear.sha256
        status, body = await _get(core_url, "ab" * 32, as_node="mid-1")
        assert (status, body["type"]) == (404, "ArtifactNotFound")
        status, body = await _get(core_url, "nothex", as_node="mid-1")
        assert status == 400
    assert core.status()["artifacts"]["fetches"] == {"ok": 0, "corrupt": 0, "failed": 0}


async def test_strangers_get_no_artifact_and_make_no_node_pull_one(
        digits_home: Path, tmp_path: Path, serving: Any) -> None:
    """A spare edge hosting only the linear model, under mid-1: the asks of the probe."""
    doc = dict(TWO_TIERS, nodes=[*TWO_TIERS["nodes"], {
        "name": "edge-2", "tier": "edge", "hardware": "small", "variants": ["digits-linear"]}],
        links=[*TWO_TIERS["links"],
               {"between": ["edge-2", "mid-1"], "latency_ms": 1, "bandwidth_mbps": 1000}])
    topology = parse_topology(doc)
    homes = _homes(digits_home, tmp_path, "mid-1", "edge-1", "edge-2")
    sha = {n: v.sha256 for n, v in Registry.load(digits_home).variants.items()}
    async with serving(AgentConfig(node="core-1", topology=topology, home=homes["core-1"],
                                   neighbours={"mid-1": LOOPBACK}, mesh_key=KEY)) as (_, core):
        # mid-1 believes edge-1 lives on another address: pulls naming edge-1 from here are not its
        async with serving(AgentConfig(
                node="mid-1", topology=topology, home=homes["mid-1"], mesh_key=KEY,
                neighbours={"core-1": _url(core), "edge-1": "http://127.0.0.2:9",
                            "edge-2": LOOPBACK})) as (_, mid):
            async with serving(AgentConfig(node="edge-2", topology=topology, home=homes["edge-2"],
                                           neighbours={"mid-1": _url(mid)}, mesh_key=KEY)
                               ) as (spare, edge2):
                assert set(spare.loaded) == {"digits-linear"}
                before = {node: _stored(home) for node, home in homes.items()}
                asks = [  # (node asked, artifact, as which node, the reason it must give)
                    (edge2, "digits-cnn", None, "name themselves"),
                    (edge2, "digits-mlp", None, "name themselves"),
                    (edge2, "digits-linear", None, "name themselves"),
                    (edge2, "digits-cnn", "mid-1", "pulls its artifacts from core-1"),
                    (edge2, "digits-mlp", "edge-1", "not a neighbour"),
                    (mid, "digits-cnn", "edge-2", "edge-2 hosts no variant"),
                    (mid, "digits-linear", "edge-1", "does not come from its address"),
                    (mid, "digits-mlp", None, "name themselves"),
                    (core, "digits-cnn", None, "name themselves"),
                ]
                for server, variant, as_node, reason in asks:
                    status, body = await _get(_url(server), sha[variant], as_node)
                    assert status == 403, (variant, as_node)
                    assert body["type"] == "Forbidden" and reason in body["message"]
                assert {node: _stored(home) for node, home in homes.items()} == before
                assert before["edge-2"] == {sha["digits-linear"]}  # only what it hosts
                assert before["mid-1"] == {sha["digits-mlp"], sha["digits-linear"]}
                assert spare.status()["artifacts"]["fetches"]["ok"] == 1
                # its own child's pull is served, pulled through once
                status, _ = await _get(_url(mid), sha["digits-linear"], "edge-2")
                assert status == 200


def test_the_pull_policy_follows_the_pull_tree() -> None:
    """Who may pull what, without agents: mid-1 pulls through for edge-1, never for itself."""
    variants = {n: _fake(n) for n in ("digits-linear", "digits-mlp", "digits-cnn")}
    topology = parse_topology(TWO_TIERS)
    core = PullPolicy(topology, "core-1", variants.values())
    mid = PullPolicy(topology, "mid-1", variants.values())
    assert mid.hosted() == {variants["digits-mlp"].sha256}
    assert core.pullers("mid-1") == {"mid-1", "edge-1"} and mid.pullers("edge-1") == {"edge-1"}
    core.check("mid-1", variants["digits-linear"].sha256)  # edge-1 hosts it, below mid-1
    with pytest.raises(Forbidden, match="mid-1 hosts no variant"):
        core.check("mid-1", variants["digits-cnn"].sha256)
    with pytest.raises(Forbidden, match="not a neighbour of core-1"):
        core.check("edge-1", variants["digits-linear"].sha256)
    with pytest.raises(Forbidden, match="not a neighbour"):
        core.check("nobody", variants["digits-linear"].sha256)
    with pytest.raises(ArtifactNotFound):
        mid.check("edge-1", "cd" * 32)


def _fake(name: str) -> Variant:
    return Variant(name=name, task="digits", family="digits", arch="x", format="onnx",
                   precision="fp32", sha256=sha256_bytes(name.encode()), size_bytes=1, accuracy=0.9,
                   accuracy_metric="top1", macs=0, inputs=(), outputs=())
