"""LinkEmulator and the links CLI against real TCP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from mesh.testbed.links import CHUNK_BYTES, LinkEmulator

REPO_ROOT = Path(__file__).resolve().parents[3]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class _TcpServer:
    """A real TCP server on 127.0.0.1:0 that owns its handler tasks and ends them on exit."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._tasks: list[asyncio.Task[None]] = []
        self.port = 0

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self._run(reader, writer)))

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handler(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK_BYTES):
        writer.write(data)
        await writer.drain()


async def _count_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    while data := await reader.read(CHUNK_BYTES):
        total += len(data)
    writer.write(str(total).encode())
    await writer.drain()


@contextlib.asynccontextmanager
async def _client(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _link(target_port: int, *, latency_ms: float = 0, bandwidth_mbps: float = 1000,
          **kwargs: int) -> LinkEmulator:
    return LinkEmulator("127.0.0.1", 0, "127.0.0.1", target_port, latency_ms=latency_ms,
                        bandwidth_mbps=bandwidth_mbps, name="test", **kwargs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    yield
    leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert leaked == []


async def _round_trip_s(port: int) -> float:
    loop = asyncio.get_running_loop()
    async with _client(port) as (reader, writer):
        start = loop.time()
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 2.0) == b"ping"
        return loop.time() - start


async def test_round_trip_pays_the_latency_once_each_way() -> None:
    async with _TcpServer(_echo) as server:
        async with _link(server.port, latency_ms=20) as link:
            slow_s = await _round_trip_s(link.port)
        async with _link(server.port, latency_ms=0) as link:
            fast_s = await _round_trip_s(link.port)
    assert 0.040 <= slow_s < 0.040 + 0.150
    assert fast_s < 0.020


async def test_one_megabyte_over_8_mbps_takes_a_second() -> None:
    loop = asyncio.get_running_loop()
    async with _TcpServer(_count_then_reply) as server, \
            _link(server.port, bandwidth_mbps=8) as link, \
            _client(link.port) as (reader, writer):
        start = loop.time()
        writer.write(bytes(1_000_000))
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 5.0)
        elapsed_s = loop.time() - start
        stats = link.stats()
    assert reply == b"1000000"
    assert elapsed_s >= 0.9
    assert stats["to_target"]["bytes"] == 1_000_000
    assert stats["to_client"]["bytes"] == len(reply)
    assert stats["connections"] == 1


async def test_concurrent_transfers_share_the_bandwidth() -> None:
    loop = asyncio.get_running_loop()

    async def send_half_megabyte(port: int) -> bytes:
        async with _client(port) as (reader, writer):
            writer.write(bytes(500_000))
            writer.write_eof()
            return await asyncio.wait_for(reader.read(), 5.0)

    async with _TcpServer(_count_then_reply) as server, \
            _link(server.port, bandwidth_mbps=8) as link:
        start = loop.time()
        replies = await asyncio.gather(send_half_megabyte(link.port),
                                       send_half_megabyte(link.port))
        elapsed_s = loop.time() - start
    assert list(replies) == [b"500000", b"500000"]
    # Alone, each would take 0.5 s; together they fill one 8 Mbps pipe for 1 s.
    assert elapsed_s >= 0.9


async def test_three_megabytes_come_back_intact() -> None:
    payload = os.urandom(3_000_000)
    async with _TcpServer(_echo) as server, \
            _link(server.port, latency_ms=5, bandwidth_mbps=500) as link, \
            _client(link.port) as (reader, writer):

        async def send() -> None:
            # Uneven pieces so that chunk boundaries differ between the two directions.
            for start in range(0, len(payload), 100_003):
                writer.write(payload[start:start + 100_003])
                await writer.drain()
            writer.write_eof()

        _, echoed = await asyncio.wait_for(asyncio.gather(send(), reader.read()), 10.0)
        stats = link.stats()
    assert echoed == payload
    assert stats["to_target"]["bytes"] == stats["to_client"]["bytes"] == len(payload)


async def test_half_close_reaches_the_server_and_the_server_close_reaches_the_client() -> None:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def read_all_then_answer(reader: asyncio.StreamReader,
                                   writer: asyncio.StreamWriter) -> None:
        received.set_result(await reader.read())  # returns only at EOF
        writer.write(b"bye")

    async with _TcpServer(read_all_then_answer) as server, \
            _link(server.port, latency_ms=5) as link, \
            _client(link.port) as (reader, writer):
        writer.write(b"hello")
        writer.write_eof()
        assert await asyncio.wait_for(received, 2.0) == b"hello"
        # read() returns once the server's close arrives as EOF.
        assert await asyncio.wait_for(reader.read(), 2.0) == b"bye"


async def test_resets_propagate_both_ways() -> None:
    server_saw: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def reset_on_x_else_watch(reader: asyncio.StreamReader,
                                    writer: asyncio.StreamWriter) -> None:
        first = await reader.readexactly(1)
        if first == b"x":
            _reset(writer)
            return
        try:
            await reader.read()
        except ConnectionResetError:
            server_saw.set_result("reset")
        else:
            server_saw.set_result("eof")

    async with _TcpServer(reset_on_x_else_watch) as server, \
            _link(server.port, latency_ms=5) as link:
        async with _client(link.port) as (reader, writer):
            writer.write(b"x")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 2.0)
        async with _client(link.port) as (reader, writer):
            writer.write(b"y")
            await writer.drain()
            await asyncio.sleep(0.05)
            _reset(writer)
        assert await asyncio.wait_for(server_saw, 2.0) == "reset"


async def test_a_refused_target_closes_the_client_promptly() -> None:
    loop = asyncio.get_running_loop()
    async with _link(_free_port(), latency_ms=10) as link, \
            _client(link.port) as (reader, writer):
        start = loop.time()
        writer.write(b"anyone there?")
        try:
            data = await asyncio.wait_for(reader.read(), 2.0)
        except ConnectionResetError:
            data = b""
        elapsed_s = loop.time() - start
        stats = link.stats()
    assert data == b""
    assert elapsed_s < 1.0
    assert stats["connect_failures"] == 1


async def test_a_slow_target_pushes_back_instead_of_buffering_everything() -> None:
    target_may_read = asyncio.Event()

    async def read_late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await target_may_read.wait()
        while await reader.read(CHUNK_BYTES):
            pass

    cap = 256 * 1024
    async with _TcpServer(read_late) as server, \
            _link(server.port, max_in_flight_bytes=cap) as link, \
            _client(link.port) as (_, writer):
        # More than loopback socket buffers hold, so the emulator must stop reading.
        writer.write(bytes(16 * 1024 * 1024))
        await asyncio.sleep(0.3)
        held = link.stats()["to_target"]["in_flight_bytes"]
        client_backlog = writer.transport.get_write_buffer_size()
        target_may_read.set()
        await asyncio.wait_for(writer.drain(), 10.0)
    assert 0 < held <= cap + CHUNK_BYTES
    assert client_backlog > 0


async def test_cli_runs_a_spec_until_sigterm(tmp_path: Path) -> None:
    async with _TcpServer(_echo) as server:
        listen_port = _free_port()
        spec = tmp_path / "links.json"
        spec.write_text(json.dumps([{
            "name": "edge-1--mid-1", "listen_port": listen_port, "target_host": "127.0.0.1",
            "target_port": server.port, "latency_ms": 10, "bandwidth_mbps": 100,
        }]))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.testbed.links", str(spec), cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            first_line = await asyncio.wait_for(proc.stdout.readline(), 10.0)
            assert first_line == b"ready\n"
            assert await _round_trip_s(listen_port) >= 0.020
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 5.0)
            assert proc.returncode == 0, stderr.decode()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def test_cli_rejects_an_invalid_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mesh.testbed.links import main

    spec = tmp_path / "links.json"
    spec.write_text(json.dumps([{"name": "a", "listen_port": 0, "target_host": "127.0.0.1",
                                 "target_port": 9, "latency_ms": -1, "bandwidth_mbps": 10}]))
    assert main([str(spec)]) == 2
    assert "[0].latency_ms" in capsys.readouterr().err
