"""Admission control over HTTP: overload is answered at once, with a status and Retry-After.

The node's only compute thread is held by a gated runtime, so queues fill
deterministically; nothing here measures time.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np

from mesh import AsyncClient
from mesh.registry import Profile, Registry
from mesh.wire import SLO, InferRequest, encode_request
from nodes.batching import BatchSettings

X = np.zeros((1, 64), np.float32)
# every batch goes through the (held) compute thread
GATED = {"batching": BatchSettings(inline_max_ms=0.0)}


def _slow(home: Path, variant: str, ms: float) -> None:
    """Record in the home's registry that ``variant`` takes ``ms`` per batch on cpu-1t."""
    registry = Registry.load(home)
    v = registry.get(variant)
    profile = Profile(batch_ms={1: ms, v.max_batch: ms}, cold_start_ms=1.0)
    registry.add(dataclasses.replace(v, profiles={**v.profiles, "cpu-1t": profile}))
    registry.save(home)


async def _post(session: aiohttp.ClientSession, url: str, slo: SLO | None = None
                ) -> tuple[int, dict[str, str], Any]:
    body = encode_request(InferRequest("digits", [X], slo=slo or SLO()))
    async with session.post(url + "/v1/infer", data=body,
                            headers={"Content-Type": "application/msgpack"}) as resp:
        return resp.status, dict(resp.headers), msgpack.unpackb(await resp.read())


async def _until(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_a_full_queue_is_answered_429_with_retry_after(
        solo_config: Any, serving: Any, onnx_probe: Any) -> None:
    config = solo_config(["digits-mlp"], max_queue=2, options=GATED)
    async with serving(config) as (agent, server), aiohttp.ClientSession() as session:
        url = str(server.make_url("")).rstrip("/")
        onnx_probe.gate.clear()
        held = [asyncio.create_task(_post(session, url))]
        await _until(lambda: agent.queue_depth == 1)  # running, holding the compute thread
        held += [asyncio.create_task(_post(session, url)) for _ in range(2)]
        await _until(lambda: agent.queue_depth == 3)  # two waiting: the queue is full
        status, headers, body = await _post(session, url)
        assert status == 429
        assert int(headers["Retry-After"]) >= 1
        assert body["error"]["type"] == "Overloaded" and body["error"]["retryable"] is True
        async with session.post(url + "/v2/models/digits/infer", json={"inputs": [
                {"name": "input", "shape": [1, 64], "datatype": "FP32",
                 "data": [0.0] * 64}]}) as resp:
            assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
            assert "queue for digits-mlp is full" in (await resp.json())["error"]
        onnx_probe.gate.set()
        assert [s for s, _, _ in await asyncio.gather(*held)] == [200, 200, 200]
        assert agent.status()["errors"] == {"overloaded": 2}


async def test_a_query_that_would_miss_its_deadline_here_is_refused_503(
        digits_home: Path, solo_config: Any, serving: Any, onnx_probe: Any) -> None:
    _slow(digits_home, "digits-mlp", 200.0)  # one batch takes 200 ms, says the profile
    config = solo_config(["digits-mlp"], options=GATED)
    async with serving(config) as (agent, server), aiohttp.ClientSession() as session:
        url = str(server.make_url("")).rstrip("/")
        onnx_probe.gate.clear()
        held = asyncio.create_task(_post(session, url))
        await _until(lambda: agent.queue_depth == 1)
        # 200 ms would do (< 300 ms), but not behind the batch running now: the planner,
        # which sees this node's own queue, refuses it at once rather than serve it late
        status, headers, body = await _post(session, url, SLO(latency_ms=300))
        assert status == 503
        assert int(headers["Retry-After"]) >= 1
        assert body["error"]["type"] == "CannotMeetDeadline"
        assert "within 300 ms" in body["error"]["message"]
        onnx_probe.gate.set()
        assert (await held)[0] == 200


async def test_a_query_its_first_choice_cannot_take_in_time_goes_to_the_next_feasible_one(
        digits_home: Path, solo_config: Any, serving: Any, onnx_probe: Any) -> None:
    _slow(digits_home, "digits-mlp", 200.0)
    config = solo_config(["digits-mlp", "digits-linear"], options=GATED)
    async with serving(config) as (agent, server), aiohttp.ClientSession() as session:
        url = str(server.make_url("")).rstrip("/")
        onnx_probe.gate.clear()
        held = asyncio.create_task(_post(session, url, SLO(policy="most-accurate")))
        await _until(lambda: agent.queue_depth == 1)
        async with AsyncClient(url) as client:
            answer = asyncio.create_task(
                client.infer("digits", X, latency_ms=300, policy="most-accurate"))
            await _until(lambda: agent.queue_depth == 2)  # placed on the linear model
            onnx_probe.gate.set()
            result = await answer
        # the planner sees the MLP's queue and places it on the linear model at once
        assert result.served_by.variant == "digits-linear"
        assert result.plan.variant == "digits-linear" and result.plan.feasible is True
        assert result.slo_met
        assert (await held)[0] == 200


async def test_a_latency_target_nothing_can_meet_is_refused_unless_degraded_answers_are_allowed(
        digits_home: Path, solo_config: Any, serving: Any) -> None:
    _slow(digits_home, "digits-mlp", 200.0)  # the only variant takes 200 ms, says its profile
    config = solo_config(["digits-mlp"])
    async with serving(config) as (agent, server), aiohttp.ClientSession() as session:
        url = str(server.make_url("")).rstrip("/")
        status, headers, body = await _post(session, url, SLO(latency_ms=50))
        assert status == 503 and int(headers["Retry-After"]) >= 1
        assert body["error"]["type"] == "CannotMeetDeadline"
        assert "within 50 ms" in body["error"]["message"]
        assert "allow_degraded" in body["error"]["message"]  # says how to get an answer
        assert agent.models.get("digits-mlp").batcher.served == 0  # refused before queueing

        async with AsyncClient(url) as client:
            late = await client.infer("digits", X, latency_ms=50, allow_degraded=True)
        assert late.served_by.variant == "digits-mlp"
        assert late.plan.feasible is False and not late.slo_met
