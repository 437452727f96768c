"""On-device answers end to end: a real agent on loopback describes and serves the device
variant (nodes.device); the SDK fetches it while the node is up, refuses a tampered copy, and
answers real held-out digits on the device once the node is gone (mesh.device)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from mesh import AsyncClient, Client, DeviceVariantRefused, MeshConnectionError
from mesh.device import DeviceVariant
from mesh.registry import Registry
from mesh.wire import decode_request


async def _get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        body = await resp.read()
        return resp.status, (json.loads(body) if resp.content_type == "application/json"
                             else body)


async def test_a_node_describes_and_serves_only_device_variants(serving: Any, solo_config: Any,
                                                                digits_home: Path) -> None:
    registry = Registry.load(digits_home)
    async with serving(solo_config(["digits-*"])) as (_agent, server):
        base = str(server.make_url("/v1/device"))
        status, best = await _get(f"{base}/digits")
        # the most accurate variant a device can run (all three are small ONNX files)
        assert status == 200 and best["name"] == "digits-cnn"
        cnn = registry.get("digits-cnn")
        assert (best["sha256"], best["size_bytes"], best["accuracy"]) == (
            cnn.sha256, cnn.size_bytes, cnn.accuracy)
        assert best["inputs"] == [{"name": "input", "dtype": "float32", "shape": [-1, 64]}]
        # a tighter cap: the most accurate that fits
        status, small = await _get(f"{base}/digits?formats=onnx&max_bytes=100000")
        assert (status, small["name"]) == (200, "digits-mlp")

        status, body = await _get(base + best["artifact"].removeprefix("/v1/device"))
        assert status == 200 and hashlib.sha256(body).hexdigest() == cnn.sha256

        status, body = await _get(f"{base}/digitz")
        assert status == 404 and "task 'digitz' is not registered" in body["error"]["message"]
        status, body = await _get(f"{base}/digits?max_bytes=100")
        assert status == 404
        assert "task 'digits' has no variant a device can run" in body["error"]["message"]
        status, body = await _get(f"{base}/digits?formats=torch")
        assert status == 400 and "a device runs onnx, tflite" in body["error"]["message"]
        # never an arbitrary artifact: only a device variant's of that task
        status, body = await _get(f"{base}/digits/artifacts/{'0' * 64}")
        assert status == 404 and "no device variant of task 'digits'" in body["error"]["message"]


def _accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((outputs.argmax(1) == labels).mean())


async def test_the_device_answers_when_the_mesh_is_gone(serving: Any, solo_config: Any,
                                                        heldout: Any, tmp_path: Path) -> None:
    images, labels = heldout
    images, labels = images[:300], labels[:300]
    cache = tmp_path / "cache"
    async with serving(solo_config(["digits-*"])) as (_agent, server):
        url = str(server.make_url("")).rstrip("/")

        def fetch_while_up() -> Any:
            client = Client([url], on_device=["digits"], device_cache_dir=cache)
            client.__enter__()  # fetches ahead, while the mesh is reachable
            r = client.infer("digits", images)
            return client, r

        client, up = await asyncio.to_thread(fetch_while_up)
        assert up.served_by.node == "solo-1"  # the mesh answers while it is up
        assert client.device is not None and client.device.held("digits") is not None

    # the node is gone: the same client answers here, and says so
    def query(**slo: Any) -> Any:
        return client.infer("digits", images, **slo)

    r = await asyncio.to_thread(query, min_accuracy=0.99)
    assert (r.served_by.node, r.served_by.tier, r.served_by.variant) == \
        ("device", "device", "digits-cnn")
    assert _accuracy(r.outputs[0], labels) > 0.95
    assert r.plan is not None and r.plan.reason.startswith("answered on this device")
    assert "cannot reach entry node" in r.plan.reason
    assert r.slo_met is True and r.accuracy == pytest.approx(0.9963, abs=0.01)
    strict = await asyncio.to_thread(query, min_accuracy=0.999)
    assert strict.slo_met is False  # judged by the device variant's own accuracy
    await asyncio.to_thread(client.close)

    # a new process with the mesh still gone: the cache holds the verified variant
    async with AsyncClient([url], on_device=True, device_cache_dir=cache) as later:
        r = await later.infer("digits", images)
        assert r.served_by.node == "device" and _accuracy(r.outputs[0], labels) > 0.95

    # a frozen entry: the mesh gets the budget less the device's share, then the device answers
    release, seen = asyncio.Event(), []

    async def frozen(request: web.Request) -> web.Response:
        seen.append(decode_request(await request.read()))
        await release.wait()
        return web.Response(status=503)

    app = web.Application()
    app.router.add_post("/v1/infer", frozen)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with AsyncClient([f"http://127.0.0.1:{runner.addresses[0][1]}"],
                               on_device=["digits"], device_cache_dir=cache) as slow:
            r = await slow.infer("digits", images, latency_ms=400)
    finally:
        release.set()
        await runner.cleanup()
    assert r.served_by.node == "device" and _accuracy(r.outputs[0], labels) > 0.95
    assert r.plan is not None and "no answer from" in r.plan.reason
    assert len(seen) == 1 and seen[0].timeout_ms < 400  # it was told it had less than all

    # off by default: an unreachable mesh is the clear connection error
    def plain() -> Any:
        with Client([url]) as c:
            return c.infer("digits", images)

    with pytest.raises(MeshConnectionError, match=f"^cannot reach entry node {url}: "):
        await asyncio.to_thread(plain)


async def test_a_tampered_device_variant_is_refused(serving: Any, solo_config: Any,
                                                    tmp_path: Path, heldout: Any) -> None:
    async with serving(solo_config(["digits-*"])) as (_agent, server):
        status, real = await _get(str(server.make_url("/v1/device/digits")))
        assert status == 200
        good = await _get(str(server.make_url(real["artifact"])))

    # an entry that names the real sha256 but sends other bytes
    async def describe(request: web.Request) -> web.Response:
        return web.json_response(real)

    async def artifact(request: web.Request) -> web.Response:
        data = bytearray(good[1])
        data[len(data) // 2] ^= 0xFF
        return web.Response(body=bytes(data), content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/v1/device/{task}", describe)
    app.router.add_get("/v1/device/{task}/artifacts/{sha256}", artifact)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with AsyncClient([url], on_device=["digits"], device_cache_dir=tmp_path) as client:
        try:
            with pytest.raises(DeviceVariantRefused, match=(
                    r"device variant digits-cnn from http://127\.0\.0\.1:\d+: the \d+ bytes "
                    r"received hash to [0-9a-f]{12}, not to " + real["sha256"][:12])):
                await client.fetch_device("digits")
        finally:
            await runner.cleanup()
        assert client.device is not None
        assert not client.device.store.has(real["sha256"])  # nothing was kept
        assert client.device.held("digits") is None
        # with nothing held and the mesh gone, the query fails saying why the device cannot
        with pytest.raises(MeshConnectionError, match=(
                f"^cannot reach entry node {url}: .*; and no device variant of 'digits' to "
                "answer with: device variant digits-cnn from .* refused")):
            await client.infer("digits", heldout[0][:2])
    assert DeviceVariant.from_json(real).name == "digits-cnn"


async def test_the_device_answers_when_the_mesh_can_only_answer_degraded(
        serving: Any, digits_home: Path, heldout: Any, edge_and_core: Any,
        tmp_path: Path) -> None:
    # edge-1 hosts the linear and MLP digits models (0.961, 0.972); only core-1's CNN meets
    # min_accuracy 0.99, and core-1 is cut off: the edge can only answer degraded.
    from mesh.transport import MemoryTransport
    from nodes.agent import AgentConfig

    never = asyncio.Event()

    async def cut_off(body: bytes) -> tuple[int, bytes]:
        await never.wait()
        raise AssertionError("unreachable")

    images, labels = heldout
    config = AgentConfig(node="edge-1", topology=edge_and_core, home=digits_home,
                         forward_timeout_s=0.3)
    async with serving(config, transports={"core-1": MemoryTransport(cut_off)}) as (_, server):
        url = str(server.make_url("")).rstrip("/")
        async with AsyncClient(url) as plain:  # without a device variant: the degraded answer
            r = await plain.infer("digits", images[:1].astype(np.float32), min_accuracy=0.99)
            assert r.served_by.node == "edge-1" and r.plan.degraded and not r.slo_met
        async with AsyncClient(url, on_device=["digits"], device_cache_dir=tmp_path) as client:
            right = 0
            for i in range(5):
                r = await client.infer("digits", images[i:i + 1].astype(np.float32),
                                       min_accuracy=0.99)
                assert r.served_by.node == "device" and r.served_by.variant == "digits-cnn"
                assert "answered degraded" in r.plan.reason and r.slo_met
                right += int(r.outputs[0].argmax()) == labels[i]
            assert right >= 4
            # a query the edge meets on its own stays with the mesh
            r = await client.infer("digits", images[:1].astype(np.float32), min_accuracy=0.95)
            assert r.served_by.node == "edge-1"
