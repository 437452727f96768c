"""What a caller can make a node hold: body caps, the large-body budget, timeouts, backpressure.

Real agents on loopback, raw sockets where the point is what happens before
a request is complete (a refusal must come before the body is sent; a
half-open connection must be closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from aiohttp.test_utils import TestServer

from mesh.registry import Registry
from mesh.stream import ANSWER, ERROR, HEADER, HELLO, INFER, FrameReader, frame, frame_answer
from mesh.topology import parse_topology
from mesh.wire import InferRequest, encode_request
from nodes.agent import AgentConfig, NodeAgent
from nodes.app import make_app, runner_options
from nodes.batching import BatchSettings
from nodes.limits import ENVELOPE_BYTES, NodeLimits, body_caps
from nodes.stream import StreamServer

WAIT_S = 20.0  # far past every shortened timeout: only a node that never acts reaches it


@contextlib.asynccontextmanager
async def node(config: AgentConfig, **options: Any
               ) -> AsyncIterator[tuple[NodeAgent, StreamServer, int]]:
    """An agent on both ports with one set of limits: (agent, stream server, HTTP port)."""
    async with NodeAgent(config, **options) as agent:
        limits = NodeLimits.for_agent(agent)
        async with StreamServer(agent, "127.0.0.1", 0, limits=limits) as stream:
            server = TestServer(make_app(agent, limits=limits))
            await server.start_server(**runner_options(config))
            try:
                yield agent, stream, server.port
            finally:
                await server.close()


def query(rows: int) -> bytes:
    rng = np.random.default_rng(rows)
    return encode_request(InferRequest("digits", [rng.random((rows, 64), dtype=np.float32)]))


def http_head(path: str, length: int, content_type: str = "application/msgpack") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: node\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def until_closed(sock: socket.socket) -> bytes:
    """Everything the node sends until it closes the connection (fails if it never does)."""
    sock.settimeout(WAIT_S)
    out = b""
    try:
        while data := sock.recv(65536):
            out += data
    except ConnectionResetError:
        pass
    return out


def exchange(port: int, data: bytes, *, then: bytes = b"") -> tuple[bytes, socket.socket]:
    """Send ``data``, read the node's first reply, send ``then``; the socket stays open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.sendall(data)
    reply = sock.recv(65536)
    if then:
        sock.sendall(then)
    return reply, sock


def stream_frames(sock: socket.socket, count: int) -> list[tuple[int, int, bytes]]:
    reader, frames = FrameReader(1 << 30), []
    sock.settimeout(WAIT_S)
    while len(frames) < count:
        data = sock.recv(1 << 20)
        assert data, f"the node closed the stream after {len(frames)} of {count} answers"
        frames += reader.feed(data)
    return frames


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


async def test_the_body_cap_is_the_largest_valid_query_and_is_refused_before_the_body(
        solo_config: Callable[..., AgentConfig], digits_home: Any) -> None:
    config = solo_config(["digits-linear"])
    caps = body_caps(Registry.load(digits_home), config.topology, max_rows=4096,
                     ceiling_bytes=config.max_body_bytes)
    largest = query(4096)
    assert len(largest) <= caps.msgpack_bytes <= len(largest) + ENVELOPE_BYTES  # ~1 MiB, not 64
    async with node(config) as (_, stream, port):
        def over_caps() -> list[bytes]:
            replies = []
            ok, sock = exchange(port, http_head("/v1/infer", len(largest)) + largest)
            sock.close()
            assert b" 200 " in ok.split(b"\r\n")[0]
            # Only the headers are sent: the answer must not wait for the body.
            for path, length in (("/v1/infer", 2 * len(largest)),
                                 ("/v2/models/digits/infer", caps.json_bytes + 1)):
                reply, sock = exchange(port, http_head(path, length, "application/json"
                                                       if "v2" in path else "application/msgpack"))
                replies.append(reply + until_closed(sock))
                sock.close()
            head, sock = exchange(stream.port, HEADER.pack(2 * len(largest), 1, INFER))
            replies.append(head + until_closed(sock))
            sock.close()
            return replies

        v1, v2, framed = await asyncio.to_thread(over_caps)
    assert status_of(v1) == 413 and b"accepts at most" in v1
    assert status_of(v2) == 413 and b"accepts at most" in v2
    ((_, kind, payload),) = FrameReader(1 << 20).feed(framed)
    assert kind == ERROR and frame_answer(kind, payload)[0] == 413


async def test_large_bodies_over_the_budget_are_refused_429_at_once(
        solo_config: Callable[..., AgentConfig]) -> None:
    body = query(4096)  # ~1 MiB: two of them do not fit a 1.5 MiB budget
    config = solo_config(["digits-linear"], options={
        "max_buffered_body_bytes": 3 * len(body) // 2, "large_body_bytes": 256 * 1024})
    async with node(config) as (agent, stream, port):
        budget = stream.limits.budget

        def crowd() -> tuple[bytes, bytes, list[tuple[int, int, bytes]]]:
            first = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
            first.sendall(http_head("/v1/infer", len(body)) + body[:len(body) // 2])
            deadline = time.monotonic() + WAIT_S
            while budget.held_bytes == 0:  # until the node reads the first body, holding budget
                assert time.monotonic() < deadline, "the node never started reading the body"
                time.sleep(0.01)
            refused, sock = exchange(port, http_head("/v1/infer", len(body)))
            refused += until_closed(sock)
            sock.close()
            # On the stream: the frame is refused on its header, its bytes skipped as they come,
            # and the connection goes on serving.
            small = query(1)
            with socket.create_connection(("127.0.0.1", stream.port), timeout=WAIT_S) as s:
                whole = frame(5, INFER, body)
                s.sendall(whole[:64])
                (overloaded,) = stream_frames(s, 1)
                s.sendall(whole[64:] + frame(6, INFER, small))
                frames = [overloaded, *stream_frames(s, 1)]
            first.sendall(body[len(body) // 2:])
            served = first.recv(65536)
            first.close()
            return refused, served, frames

        refused, served, frames = await asyncio.to_thread(crowd)
        held = budget.held_bytes
    assert status_of(refused) == 429 and b"Retry-After: 1" in refused
    assert status_of(served) == 200
    (rid, kind, payload), (rid2, kind2, _) = frames
    assert (rid, kind) == (5, ERROR) and frame_answer(kind, payload)[0] == 429
    assert (rid2, kind2) == (6, ANSWER)
    assert held == 0


async def test_idle_and_half_open_connections_are_closed(
        solo_config: Callable[..., AgentConfig]) -> None:
    config = solo_config(["digits-linear"], options={"idle_timeout_s": 0.3, "read_timeout_s": 0.3})
    body = query(1)
    async with node(config) as (agent, stream, port):
        hello = agent.peers.hello("a-neighbour")

        def probe() -> dict[str, bytes]:
            seen: dict[str, bytes] = {}
            opened = {
                "http silent": socket.create_connection(("127.0.0.1", port)),
                "http half a header": socket.create_connection(("127.0.0.1", port)),
                "http half a body": socket.create_connection(("127.0.0.1", port)),
                "http idle after a query": socket.create_connection(("127.0.0.1", port)),
                "stream silent": socket.create_connection(("127.0.0.1", stream.port)),
                "stream half a frame": socket.create_connection(("127.0.0.1", stream.port)),
                "stream idle after a query": socket.create_connection(("127.0.0.1", stream.port)),
            }
            opened["http half a header"].sendall(b"POST /v1/infer HTTP/1.1\r\nHost: n")
            opened["http half a body"].sendall(http_head("/v1/infer", len(body)) + body[:10])
            opened["http idle after a query"].sendall(http_head("/v1/infer", len(body)) + body)
            opened["stream half a frame"].sendall(frame(3, INFER, body)[:20])
            opened["stream idle after a query"].sendall(frame(4, INFER, body))
            with socket.create_connection(("127.0.0.1", stream.port)) as peer:
                peer.sendall(frame(0, HELLO, hello))
                for name, sock in opened.items():
                    seen[name] = until_closed(sock)
                    sock.close()
                # A proven neighbour's stream outlives the idle timeout: it is reused.
                peer.sendall(frame(8, INFER, body))
                seen["peer"] = b"".join(payload for _, _, payload in stream_frames(peer, 1))
            return seen

        seen = await asyncio.to_thread(probe)
        counts = (stream.closed_idle, stream.closed_slow)
    assert seen["http silent"] == b"" and seen["http half a header"] == b""
    assert status_of(seen["http half a body"]) == 408
    assert b"did not arrive within 0.3 s" in seen["http half a body"]
    assert status_of(seen["http idle after a query"]) == 200
    assert seen["stream silent"] == b""
    ((rid, kind, payload),) = FrameReader(1 << 20).feed(seen["stream half a frame"])
    assert kind == ERROR and frame_answer(kind, payload)[0] == 408
    assert [f[:2] for f in FrameReader(1 << 20).feed(seen["stream idle after a query"])] == [(4, ANSWER)]
    assert msgpack.unpackb(seen["peer"])["outputs"][0]["shape"] == [1, 10]
    assert counts == (2, 1)


async def _push_without_reading(port: int, frames: bytes) -> tuple[asyncio.StreamReader,
                                                                    asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # answers pile up at the node
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    # a small limit: this client's own reader stops taking bytes off the socket at once
    reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
    writer.write(frames)  # queued in this process; the node takes what it reads
    return reader, writer


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "the node never stopped reading"
        await asyncio.sleep(0.02)


async def _answers(reader: asyncio.StreamReader, count: int) -> list[tuple[int, int, bytes]]:
    frames: list[tuple[int, int, bytes]] = []
    decoder = FrameReader(1 << 30)
    while len(frames) < count:
        data = await asyncio.wait_for(reader.read(1 << 20), WAIT_S)
        assert data, f"the node closed the stream after {len(frames)} of {count} answers"
        frames += decoder.feed(data)
    return frames


async def test_a_stream_client_over_its_in_flight_limit_is_not_read_until_answers_drain(
        solo_config: Callable[..., AgentConfig], onnx_probe: Any) -> None:
    config = solo_config(["digits-linear"], options={
        "stream_max_in_flight": 4, "batching": BatchSettings(inline_max_ms=0.0)})
    one = query(64)  # 16 KiB
    count = 2000  # 32 MiB of queries sent at once, answers never read while they go
    async with node(config, runtimes=onnx_probe.lookup) as (agent, stream, _):
        await agent.infer(InferRequest("digits", [np.zeros((1, 64), np.float32)]))  # loaded
        onnx_probe.gate.clear()  # every batch now waits: queries stay in flight
        reader, writer = await _push_without_reading(
            stream.port, b"".join(frame(i, INFER, one) for i in range(count)))
        await _until(lambda: stream.pauses > 0)
        held = stream.buffered_bytes
        unsent = writer.transport.get_write_buffer_size()
        onnx_probe.gate.set()
        answers = await _answers(reader, count)
        writer.close()
        await writer.wait_closed()
    assert held < 1024 * 1024  # at most a read chunk and 4 queries, while 32 MiB was pushed
    assert unsent > 16 * 1024 * 1024  # the rest waited on the caller's side
    assert sorted(rid for rid, _, _ in answers) == list(range(count))
    assert {kind for _, kind, _ in answers} == {ANSWER}


async def test_a_stream_client_that_leaves_answers_unread_is_not_read_until_it_reads(
        solo_config: Callable[..., AgentConfig]) -> None:
    config = solo_config(["digits-linear"], options={
        "stream_max_unread_bytes": 256 * 1024, "stream_max_in_flight": 2})
    big = query(4096)  # 1 MiB in, ~160 KiB out: 64 of them outgrow every socket buffer
    count = 64
    async with node(config) as (_, stream, _):
        reader, writer = await _push_without_reading(
            stream.port, b"".join(frame(i, INFER, big) for i in range(count)))
        conn = await asyncio.wait_for(_first_connection(stream), WAIT_S)
        await _until(lambda: conn.writing_paused and conn.reading_paused)
        held = stream.buffered_bytes
        unsent = writer.transport.get_write_buffer_size()
        answers = await _answers(reader, count)
        writer.close()
        await writer.wait_closed()
    # the unread-answer mark, two answers in flight and a frame being read; not 64 answers
    assert held < 3 * 1024 * 1024
    assert unsent > 16 * 1024 * 1024
    assert sorted(rid for rid, _, _ in answers) == list(range(count))
    assert {kind for _, kind, _ in answers} == {ANSWER}


async def _first_connection(stream: StreamServer) -> Any:
    while not stream.connections:
        await asyncio.sleep(0.01)
    return next(iter(stream.connections))


def test_limits_are_checked_when_the_config_is_made() -> None:
    topology = parse_topology({"name": "solo", "hardware": {"box": {"kind": "cpu", "threads": 1,
                                                                     "memory_mb": 256}},
                               "nodes": [{"name": "solo-1", "tier": "edge", "hardware": "box"}]})
    for field, value in (("idle_timeout_s", 0), ("read_timeout_s", -1.0),
                         ("stream_max_in_flight", 0), ("max_buffered_body_bytes", 1024)):
        try:
            AgentConfig(node="solo-1", topology=topology, home=Path("."), **{field: value})
        except ValueError as exc:
            assert field in str(exc) or "max_buffered_body_bytes" in str(exc)
        else:
            raise AssertionError(f"{field}={value!r} was accepted")
