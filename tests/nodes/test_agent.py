"""One node agent in-process over real ONNX models and a real aiohttp server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp.test_utils import TestServer

from mesh import AsyncClient, InvalidInput
from mesh.registry import Registry
from mesh.topology import parse_topology
from nodes.agent import AgentConfig, NodeAgent
from nodes.app import make_app

SOLO = {
    "name": "solo",
    "hardware": {"box": {"kind": "cpu", "threads": 1}},
    "nodes": [{"name": "solo-1", "tier": "edge", "hardware": "box",
               "variants": ["digits-linear", "digits-mlp", "digits-cnn"]}],
}


@pytest.fixture
def home(built_home: Path, tmp_path: Path) -> Path:
    """A private copy of the built home, safe to damage."""
    copy = tmp_path / "home"
    shutil.copytree(built_home / "store", copy / "store")
    shutil.copy(built_home / "registry.json", copy / "registry.json")
    return copy


async def _serve(home: Path):
    agent = NodeAgent(AgentConfig(node="solo-1", topology=parse_topology(SOLO), home=home))
    await agent.__aenter__()
    server = TestServer(make_app(agent, address="test"))
    await server.start_server()
    return agent, server


async def test_a_corrupt_artifact_makes_one_variant_unavailable_and_the_rest_serve(
        home: Path, heldout) -> None:
    cnn = Registry.load(home).get("digits-cnn")
    artifact = home / "store" / cnn.sha256[:2] / cnn.sha256
    artifact.chmod(0o644)
    artifact.write_bytes(artifact.read_bytes()[:1000])  # truncated copy
    agent, server = await _serve(home)
    try:
        status = agent.status()
        by_name = {v["name"]: v for v in status["variants"]}
        assert by_name["digits-cnn"]["loaded"] is False
        assert "missing or corrupt" in by_name["digits-cnn"]["error"]
        assert by_name["digits-mlp"]["loaded"] and by_name["digits-linear"]["loaded"]
        images, _ = heldout
        async with AsyncClient(str(server.make_url(""))) as client:
            r = await client.infer("digits", images[:4], min_accuracy=0.99)
        # nothing meets 0.99 without the CNN: the closest is served and flagged
        assert r.served_by.variant == "digits-mlp"
        assert r.plan.feasible is False
        assert not r.slo_met
    finally:
        await server.close()
        await agent.__aexit__(None, None, None)


async def test_http_errors_are_json_or_msgpack_never_tracebacks(home: Path, heldout) -> None:
    agent, server = await _serve(home)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(server.make_url("/v1/nothing")) as resp:
                assert resp.status == 404
                assert "error" in await resp.json()
            async with session.post(server.make_url("/v1/infer"), data=msgpack.packb({"task": 5}),
                                    headers={"Content-Type": "application/msgpack"}) as resp:
                assert resp.status == 400
                body = msgpack.unpackb(await resp.read())
                assert body["error"]["type"] == "InvalidInput"
                assert "task: required" in body["error"]["message"]
            async with session.get(server.make_url("/v1/status")) as resp:
                status = json.loads(await resp.text())
                assert status["errors"] == {}  # decode errors never reach the agent
                assert status["address"] == "test"
        images, _ = heldout
        async with AsyncClient(str(server.make_url(""))) as client:
            with pytest.raises(InvalidInput, match="shape"):
                await client.infer("digits", images[:2].reshape(2, 8, 8))
            ok = await client.infer("digits", images[:3])
        assert ok.output.shape == (3, 10)
        assert agent.status()["errors"] == {"invalid_input": 1}
    finally:
        await server.close()
        await agent.__aexit__(None, None, None)


async def test_a_query_that_waits_for_its_variant_to_load_is_counted_as_a_cold_start(
        solo_config: Any, heldout: Any) -> None:
    from mesh.wire import InferRequest, Route

    images, _ = heldout
    async with NodeAgent(solo_config(["digits-linear", "digits-mlp"])) as agent:
        warm = await agent.infer(InferRequest("digits", [images[:1]],
                                              route=Route("solo-1", "digits-mlp")))
        assert "cold_start_ms" not in warm.timing
        assert await agent.models.unload("digits-mlp")  # idle: evicted
        cold = await agent.infer(InferRequest("digits", [images[:1]],
                                              route=Route("solo-1", "digits-mlp")))
        assert cold.timing["cold_start_ms"] > 0
        assert agent.status()["cold_starts"] == {"digits-mlp": 1}
        assert b'tiermesh_cold_starts_total{variant="digits-mlp"} 1.0' in agent.metrics.render()


async def test_a_cold_start_is_hidden_behind_a_warm_variant_that_meets_the_slo(
        solo_config: Any, digits_home: Path, heldout: Any) -> None:
    """The CNN would serve best but takes 500 ms to load: the MLP answers meanwhile."""
    import asyncio
    import dataclasses

    from mesh.wire import SLO, InferRequest

    registry = Registry.load(digits_home)
    cnn = registry.get("digits-cnn")
    profile = dataclasses.replace(cnn.profiles["cpu-1t"], cold_start_ms=500.0)
    registry.add(dataclasses.replace(cnn, profiles={**cnn.profiles, "cpu-1t": profile}))
    registry.save(digits_home)
    images, _ = heldout
    slo = SLO(latency_ms=50, min_accuracy=0.97, policy="most-accurate")
    async with NodeAgent(solo_config(["digits-linear", "digits-mlp", "digits-cnn"])) as agent:
        assert await agent.models.unload("digits-cnn")
        first = await agent.infer(InferRequest("digits", [images[:1]], slo=slo),
                                  from_client=True)
        assert first.served_by.variant == "digits-mlp"  # warm, and it meets the SLO
        for _ in range(200):  # the CNN loads behind it
            if "digits-cnn" in agent.loaded:
                break
            await asyncio.sleep(0.02)
        later = await agent.infer(InferRequest("digits", [images[:1]], slo=slo),
                                  from_client=True)
        assert later.served_by.variant == "digits-cnn"
        status = agent.status()
        assert status["cold_starts"] == {}  # no query waited for a load
        assert status["cold_starts_hidden"] == {"digits-cnn": 1}


async def test_a_node_whose_hardware_allows_runs_batches_of_two_variants_side_by_side(
        solo_config: Any, digits_home: Path, heldout: Any, onnx_probe: Any) -> None:
    """Four cores at one thread each: the MLP answers while a CNN batch holds a worker."""
    import asyncio

    from mesh.store import ArtifactStore
    from mesh.wire import InferRequest, Route
    from nodes.batching import BatchSettings

    images, _ = heldout
    cnn = Registry.load(digits_home).get("digits-cnn")
    config = solo_config(["digits-mlp", "digits-cnn"], hardware={"cores": 4},
                         options={"batching": BatchSettings(inline_max_ms=0.0)})
    from mesh.placement.machines import Machine

    # a machine with the 4 CPUs the class declares (a node runs no more workers than it has)
    async with NodeAgent(config, runtimes=onnx_probe.lookup,
                         machine=Machine(4.0, "four-cpus")) as agent:
        assert agent.compute_workers == 4
        onnx_probe.only = {str(ArtifactStore(digits_home / "store").path(cnn.sha256))}
        onnx_probe.gate.clear()  # every CNN run now waits, holding its worker
        held = asyncio.create_task(agent.infer(
            InferRequest("digits", [images[:1]], route=Route("solo-1", "digits-cnn"))))
        await asyncio.sleep(0.05)
        answer = await asyncio.wait_for(agent.infer(
            InferRequest("digits", [images[:1]], route=Route("solo-1", "digits-mlp"))), 5)
        assert answer.served_by.variant == "digits-mlp"
        onnx_probe.gate.set()
        assert (await held).served_by.variant == "digits-cnn"


async def test_a_variant_a_new_registry_no_longer_places_here_is_unloaded(
        solo_config: Any, digits_home: Path) -> None:
    async with NodeAgent(solo_config(["digits-*"])) as agent:
        assert "digits-mlp" in agent.loaded
        newer = Registry.load(digits_home)
        del newer.variants["digits-mlp"]  # removed from the mesh's registry
        newer.version += 1
        await agent.adopt_registry(newer)
        assert "digits-mlp" not in agent.loaded
        assert "digits-mlp" not in {v["name"] for v in agent.status()["variants"]}
        assert {"digits-linear", "digits-cnn"} <= set(agent.loaded)


async def test_a_node_runs_no_more_compute_workers_than_the_cpus_it_really_has(
        solo_config: Any) -> None:
    from mesh.placement.machines import Machine

    config = solo_config(["digits-mlp"], hardware={"cores": 8})
    async with NodeAgent(config, machine=Machine(2.0, "two-cpus")) as agent:
        assert agent.compute_workers == 2  # the class says 8; the machine has 2
        assert agent.status()["machine"] == {"declared_cores": 8, "cpus": 2.0,
                                             "host": "two-cpus"}
    async with NodeAgent(config, machine=Machine(1.5, "a-quota")) as agent:
        assert agent.compute_workers == 1  # a container quota of 1.5 CPUs: one worker
