"""Readiness (``/healthz``) and liveness (``/livez``): what Kubernetes and the testbed wait on."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from mesh.registry import Registry
from mesh.store import ArtifactStore
from mesh.topology import parse_topology
from nodes.agent import AgentConfig, NodeAgent
from nodes.app import make_app

PAIR = {
    "name": "pair",
    "hardware": {"box": {"kind": "cpu", "threads": 1, "memory_mb": 256}},
    "nodes": [{"name": "core-1", "tier": "core", "hardware": "box", "variants": ["digits-*"]},
              {"name": "edge-1", "tier": "edge", "hardware": "box",
               "variants": ["digits-linear", "digits-mlp"]}],
    "links": [{"between": ["edge-1", "core-1"], "latency_ms": 1, "bandwidth_mbps": 1000}],
}
#: nothing listens there: a parent that cannot be reached
UNREACHABLE = "http://127.0.0.1:9"


async def _get(server: TestServer, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(server.make_url(path)) as resp:
        return resp.status, await resp.text()


async def test_a_node_is_ready_only_once_the_variants_it_hosts_are_loaded(
        digits_home: Path, tmp_path: Path, serving: Callable[..., Any]) -> None:
    """edge-1 starts with the registry but no artifacts, and its parent cannot be reached."""
    home = tmp_path / "edge-1"
    home.mkdir()
    shutil.copy(digits_home / "registry.json", home / "registry.json")
    config = AgentConfig(node="edge-1", topology=parse_topology(PAIR), home=home,
                         neighbours={"core-1": UNREACHABLE})
    async with serving(config) as (agent, server):
        assert not agent.loaded
        assert await _get(server, "/livez") == (200, "ok")  # alive, so not restarted
        status, body = await _get(server, "/healthz")
        assert status == 503
        assert json.loads(body) == {"ready": False,
                                    "waiting_for": ["digits-linear", "digits-mlp"]}
        # the artifacts arrive and the variants load (as a pull and a query would do)
        registry, source = Registry.load(digits_home), ArtifactStore(digits_home / "store")
        store = ArtifactStore(home / "store")
        store.put_bytes(source.read(registry.get("digits-linear").sha256))
        await agent.models.acquire("digits-linear")
        status, body = await _get(server, "/healthz")
        assert (status, json.loads(body)["waiting_for"]) == (503, ["digits-mlp"])
        status, body = await _get(server, "/v2/health/ready")  # OIP says the same
        assert status == 503 and "waiting for digits-mlp" in body
        store.put_bytes(source.read(registry.get("digits-mlp").sha256))
        await agent.models.acquire("digits-mlp")
        assert await _get(server, "/healthz") == (200, "ok")
        assert (await _get(server, "/v2/health/ready"))[0] == 200


async def test_a_variant_unavailable_for_good_does_not_hold_readiness_back(
        digits_home: Path, solo_config: Callable[..., AgentConfig],
        serving: Callable[..., Any]) -> None:
    cnn = Registry.load(digits_home).get("digits-cnn")
    artifact = ArtifactStore(digits_home / "store").path(cnn.sha256)
    artifact.chmod(0o644)
    artifact.write_bytes(artifact.read_bytes()[:1000])  # truncated: can never load here
    async with serving(solo_config(["digits-*"])) as (agent, server):
        assert "digits-cnn" in agent.unavailable and "digits-linear" in agent.loaded
        assert await _get(server, "/healthz") == (200, "ok")


async def test_before_the_agent_has_started_it_is_alive_but_not_ready(
        solo_config: Callable[..., AgentConfig]) -> None:
    agent = NodeAgent(solo_config(["digits-linear"]))
    server = TestServer(make_app(agent, address="test"))
    await server.start_server()
    try:
        assert await _get(server, "/livez") == (200, "ok")
        status, body = await _get(server, "/healthz")
        assert (status, json.loads(body)) == (503, {"ready": False,
                                                    "waiting_for": ["the agent to start"]})
    finally:
        await server.close()
