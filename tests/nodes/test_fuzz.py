"""Hostile input never gets a 5xx: the inputs that used to, and a bounded hypothesis run.

The node is a real agent on loopback (HTTP and stream ports, one set of
limits). ``benchmarks/fuzz.py`` runs the same surfaces 10,000+ times against
a node process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from mesh.stream import ERROR, INFER, FrameReader, frame, frame_answer
from nodes.agent import AgentConfig, NodeAgent
from nodes.app import make_app, runner_options
from nodes.limits import NodeLimits
from nodes.stream import StreamServer
from tests.fuzzing import SURFACES, Tally, Target, rss_bytes, run_surface, valid_queries_answered

#: hypothesis cases per surface in `make test` (benchmarks/fuzz.py runs thousands)
CASES = 120
#: shortened so that frames cut short are closed quickly
READ_TIMEOUT_S = 0.1


@contextlib.asynccontextmanager
async def node(config: AgentConfig) -> AsyncIterator[tuple[NodeAgent, StreamServer, Target]]:
    async with NodeAgent(config) as agent:
        limits = NodeLimits.for_agent(agent)
        async with StreamServer(agent, "127.0.0.1", 0, limits=limits) as stream:
            server = TestServer(make_app(agent, limits=limits))
            await server.start_server(**runner_options(config))
            try:
                yield agent, stream, Target(server.port, stream.port)
            finally:
                await server.close()


@pytest.fixture
def fuzz_config(solo_config: Callable[..., AgentConfig]) -> AgentConfig:
    return solo_config(["digits-linear"], options={"read_timeout_s": READ_TIMEOUT_S})


def _input(**fields: Any) -> dict[str, Any]:
    return {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64} | fields


KNOWN_OIP = [
    ("deeply nested JSON", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("deeply nested data", b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,64],"data":'
     + b"[" * 5000 + b"1" + b"]" * 5000 + b"}]}", "nested too deeply"),
    ("outputs[].parameters not an object",
     json.dumps({"inputs": [_input()], "outputs": [{"name": "probs", "parameters": [1]}]}).encode(),
     "outputs[0].parameters: must be an object"),
    ("10**400 in an SLO parameter",
     json.dumps({"inputs": [_input()], "parameters": {"tiermesh_latency_ms": 10**400}}).encode(),
     "parameters.tiermesh_latency_ms: must be between"),
    ("a list as an input name", json.dumps({"inputs": [_input(name=["input"])]}).encode(),
     "inputs[0].name"),
    ("a list as an output name",
     json.dumps({"inputs": [_input()], "outputs": [{"name": {"a": 1}}]}).encode(),
     "outputs[0].name"),
    ("a fraction for an INT8 input", json.dumps({"inputs": [_input(datatype="INT8",
                                                                   data=[0.5] * 64)]}).encode(),
     "expected 64 INT8 values"),
    ("a value FP16 cannot hold", json.dumps({"inputs": [_input(datatype="FP16", data=[1e300] * 64)]})
     .encode(), "outside FP16's range"),
]

_TENSOR = {"dtype": "float32", "shape": [1, 64], "data": bytes(256)}
KNOWN_MSGPACK = [
    ("a list as dtype", {"task": "digits", "tensors": [_TENSOR | {"dtype": ["float32"]}]},
     "tensors[0].dtype"),
    ("a map as dtype", {"task": "digits", "tensors": [_TENSOR | {"dtype": {"f": 1}}]},
     "tensors[0].dtype"),
    ("str and bytes SLO keys", {"task": "digits", "tensors": [_TENSOR],
                                "slo": {"x": 1, b"y": 2}}, "slo: unknown field"),
]


async def test_inputs_that_used_to_get_500_get_a_4xx_naming_the_field(
        fuzz_config: AgentConfig) -> None:
    async with node(fuzz_config) as (_, _, target), ClientSession() as http:
        base = f"http://127.0.0.1:{target.http_port}"
        for what, body, message in KNOWN_OIP:
            async with http.post(f"{base}/v2/models/digits/infer", data=body,
                                 headers={"Content-Type": "application/json"}) as r:
                error = (await r.json())["error"]
                assert r.status == 400, (what, r.status, error)
                assert message in error, (what, error)
        for what, obj, message in KNOWN_MSGPACK:
            async with http.post(f"{base}/v1/infer", data=msgpack.packb(obj),
                                 headers={"Content-Type": "application/msgpack"}) as r:
                error = msgpack.unpackb(await r.read())["error"]
                assert r.status == 400, (what, r.status, error)
                assert message in error["message"], (what, error)


async def test_a_stream_frame_cut_short_is_answered_408_and_closed(fuzz_config: AgentConfig) -> None:
    body = msgpack.packb({"task": "digits", "tensors": [_TENSOR]})
    async with node(fuzz_config) as (_, stream, target):
        def partial() -> list[tuple[int, int, bytes]]:
            with socket.create_connection(("127.0.0.1", target.stream_port), timeout=30) as s:
                s.sendall(frame(1, INFER, body) + frame(2, INFER, body)[:40])
                reader, frames = FrameReader(1 << 20), []
                while data := s.recv(65536):  # until the node closes: never waits forever
                    frames += reader.feed(data)
                return frames

        (first, second) = await asyncio.to_thread(partial)
        assert first[:2] == (1, 2)  # the whole frame was answered
        assert second[1] == ERROR and frame_answer(second[1], second[2])[0] == 408
        assert stream.closed_slow == 1


@pytest.mark.parametrize("surface", sorted(SURFACES))
async def test_fuzzed_requests_never_get_5xx_and_valid_ones_keep_being_answered(
        fuzz_config: AgentConfig, surface: str, capsys: pytest.CaptureFixture[str]) -> None:
    async with node(fuzz_config) as (_, stream, target):
        await asyncio.to_thread(valid_queries_answered, target)  # warm: variant loaded
        before = rss_bytes()
        tally = Tally()
        await asyncio.to_thread(run_surface, surface, target, tally, cases=CASES,
                                stream_wait_s=READ_TIMEOUT_S + 20, check_every=40)
        await asyncio.to_thread(valid_queries_answered, target)
        grown = rss_bytes() - before
        # Everything the cases made the node hold is given back.
        assert stream.limits.budget.held_bytes == 0
        for _ in range(100):  # the stream port lets go of closed connections on its next turns
            if not stream.connections:
                break
            await asyncio.sleep(0.05)
        assert stream.buffered_bytes == 0
    assert tally.cases >= CASES and tally.five_xx == 0, tally.server_errors
    assert sum(tally.statuses.values()) > 0
    with capsys.disabled():
        print(f"\nfuzz {surface}: {tally.cases} cases, statuses {dict(sorted(tally.statuses.items()))}"
              f", 5xx {tally.five_xx}, test process RSS {grown / 2**20:+.1f} MiB")
