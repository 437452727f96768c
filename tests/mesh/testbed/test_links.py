"""LinkEmulator and the links CLI against real TCP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
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
          **kwargs: float) -> LinkEmulator:
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


@contextlib.asynccontextmanager
async def _emulator(spec: Path, *args: str) -> AsyncIterator[asyncio.StreamReader]:
    """``python -m mesh.testbed.links SPEC ARGS`` as its own process, yielding its stdout;
    afterwards it must stop cleanly on SIGTERM (exit status 0). Killed if the test failed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh.testbed.links", str(spec), *args, cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        yield proc.stdout
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 5.0)
        assert proc.returncode == 0, stderr.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_runs_a_spec_until_sigterm(tmp_path: Path) -> None:
    async with _TcpServer(_echo) as server:
        listen_port = _free_port()
        spec = tmp_path / "links.json"
        spec.write_text(json.dumps([{
            "name": "edge-1--mid-1", "listen_port": listen_port, "target_host": "127.0.0.1",
            "target_port": server.port, "latency_ms": 10, "bandwidth_mbps": 100,
        }]))
        async with _emulator(spec) as stdout:
            first_line = await asyncio.wait_for(stdout.readline(), 10.0)
            assert first_line == b"ready\n"
            assert await _round_trip_s(listen_port) >= 0.020


def test_cli_rejects_an_invalid_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mesh.testbed.links import main

    spec = tmp_path / "links.json"
    spec.write_text(json.dumps([{"name": "a", "listen_port": 0, "target_host": "127.0.0.1",
                                 "target_port": 9, "latency_ms": -1, "bandwidth_mbps": 10}]))
    assert main([str(spec)]) == 2
    assert "[0].latency_ms" in capsys.readouterr().err


# --------------------------------------------------------------------------- loss and jitter


def test_loss_delays_a_chunk_by_one_retransmission_timeout_and_is_seeded() -> None:
    from mesh.testbed.links import RTO_MIN_S, _Pipe

    def run(seed: str, loss: float) -> tuple[list[float], int]:
        pipe = _Pipe(latency_ms=5, bandwidth_mbps=1e6, loss=loss, rng=random.Random(seed))
        dues = [pipe.schedule(100, now=float(i)) - i for i in range(2000)]
        return dues, pipe.lost_chunks

    clean, none_lost = run("a", 0.0)
    lossy, lost = run("a", 0.25)
    again, lost_again = run("a", 0.25)
    assert none_lost == 0 and set(round(d, 6) for d in clean) == {0.005}
    assert (lossy, lost) == (again, lost_again)  # same seed, same draws
    assert 400 <= lost <= 600  # a quarter of 2000, with a wide margin
    late = [d for d in lossy if d > 0.1]
    assert len(late) == lost
    # 5 ms each way: two round trips are 20 ms, so the 200 ms floor applies
    assert {round(d - 0.005, 6) for d in late} == {RTO_MIN_S}
    slow = _Pipe(latency_ms=100, bandwidth_mbps=1e6, loss=1.0)
    assert slow.schedule(100, now=0.0) == pytest.approx(0.1 + 0.4, abs=1e-6)  # 2 x RTT


def test_jitter_adds_a_bounded_seeded_delay_per_chunk() -> None:
    from mesh.testbed.links import _Pipe

    def dues(seed: str) -> list[float]:
        pipe = _Pipe(latency_ms=10, bandwidth_mbps=1e6, jitter_ms=20, rng=random.Random(seed))
        return [pipe.schedule(100, now=float(i)) - i for i in range(500)]

    first = dues("x")
    assert first == dues("x")
    assert first != dues("y")
    assert all(0.010 <= d <= 0.030 + 1e-9 for d in first)
    assert max(first) - min(first) > 0.015  # spread over most of the range


async def test_jitter_never_reorders_bytes_within_a_connection() -> None:
    messages = [f"{i:04d}".encode() for i in range(100)]
    async with _TcpServer(_echo) as server, \
            _link(server.port, latency_ms=1, jitter_ms=15) as link, \
            _client(link.port) as (reader, writer):
        for message in messages:  # one small write at a time: many chunks, many draws
            writer.write(message)
            await writer.drain()
            await asyncio.sleep(0.001)
        echoed = await asyncio.wait_for(reader.readexactly(400), 10.0)
    assert echoed == b"".join(messages)


async def test_a_lossy_link_is_slower_than_a_clean_one() -> None:
    async with _TcpServer(_echo) as server:
        async with _link(server.port, latency_ms=2, loss=1.0) as link:
            lossy_s = await _round_trip_s(link.port)
            lost = link.stats()["to_target"]["lost_chunks"] + \
                link.stats()["to_client"]["lost_chunks"]
        async with _link(server.port, latency_ms=2) as link:
            clean_s = await _round_trip_s(link.port)
    assert lost == 2  # the ping and its echo
    assert lossy_s >= 0.4  # one 200 ms retransmission timeout each way
    assert clean_s < lossy_s - 0.3


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="loss must be between 0 and 1, got 1.5"):
        _link(9, loss=1.5)
    with pytest.raises(ValueError, match="jitter_ms must be >= 0"):
        _link(9, jitter_ms=-1)
    link = _link(9, latency_ms=5)
    with pytest.raises(ValueError, match="bandwidth_mbps must be > 0"):
        link.configure(latency_ms=50, bandwidth_mbps=0)
    assert link.latency_ms == 5  # nothing changed
    link.configure(latency_ms=50, loss=0.1)
    assert (link.latency_ms, link.loss, link.jitter_ms) == (50, 0.1, 0)


# --------------------------------------------------------------------------- cut, heal, set


async def test_a_cut_stalls_an_open_connection_and_the_heal_delivers() -> None:
    async with _TcpServer(_echo) as server, _link(server.port, latency_ms=2) as link, \
            _client(link.port) as (reader, writer):
        writer.write(b"one")
        assert await asyncio.wait_for(reader.readexactly(3), 2.0) == b"one"
        link.cut()
        writer.write(b"two")
        await writer.drain()
        # no answer and no reset: a cut is silence, noticed only by the client's timeout
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(3), 0.5)
        assert not reader.at_eof() and link.stats()["cut"] is True
        link.heal()
        assert await asyncio.wait_for(reader.readexactly(3), 2.0) == b"two"
        assert link.stats()["cuts"] == 1


async def test_a_new_connection_during_a_cut_waits_and_crosses_after_the_heal() -> None:
    accepted = 0

    async def count_and_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await _echo(reader, writer)

    async with _TcpServer(count_and_echo) as server, _link(server.port, latency_ms=2) as link:
        link.cut()
        async with _client(link.port) as (reader, writer):  # not refused: the SYN is in flight
            writer.write(b"hello")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.readexactly(5), 0.5)
            assert accepted == 0
            link.heal()
            assert await asyncio.wait_for(reader.readexactly(5), 2.0) == b"hello"
        assert accepted == 1


async def test_a_client_that_gives_up_during_a_cut_never_reaches_the_target() -> None:
    accepted = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1

    async with _TcpServer(count) as server, _link(server.port) as link:
        link.cut()
        async with _client(link.port) as (_, writer):
            writer.write(b"anyone?")
            await asyncio.sleep(0.1)
        for _ in range(100):
            if link.stats()["abandoned_connections"]:
                break
            await asyncio.sleep(0.01)
        link.heal()
        await asyncio.sleep(0.1)
        stats = link.stats()
    assert stats["abandoned_connections"] == 1 and stats["active_connections"] == 0
    assert accepted == 0


async def test_configure_changes_the_latency_of_a_running_link() -> None:
    async with _TcpServer(_echo) as server, _link(server.port, latency_ms=0) as link:
        fast_s = await _round_trip_s(link.port)
        link.configure(latency_ms=60)
        slow_s = await _round_trip_s(link.port)
    assert slow_s >= 0.120
    assert fast_s < slow_s - 0.080


# --------------------------------------------------------------------------- control channel


async def test_control_channel_cuts_heals_and_sets_a_topology_link(tmp_path: Path) -> None:
    from mesh.testbed.control import LinkControlError, request

    async with _TcpServer(_echo) as server:
        listen = [_free_port(), _free_port()]
        control_port = _free_port()
        spec = tmp_path / "links.json"
        spec.write_text(json.dumps([
            {"name": f"edge-1->mid-1{suffix}", "link": "edge-1--mid-1", "listen_port": port,
             "target_host": "127.0.0.1", "target_port": server.port, "latency_ms": 1,
             "bandwidth_mbps": 100} for suffix, port in (("", listen[0]), (" stream", listen[1]))]
            + [{"name": "other", "listen_port": 0, "target_host": "127.0.0.1",
                "target_port": server.port, "latency_ms": 1, "bandwidth_mbps": 100}]))
        address = f"127.0.0.1:{control_port}"

        def ask(**body: object) -> dict:
            return request(address, dict(body))

        async with _emulator(spec, "--control-port", str(control_port)) as stdout:
            assert await asyncio.wait_for(stdout.readline(), 10.0) == \
                f"control {address}\n".encode()
            assert await asyncio.wait_for(stdout.readline(), 10.0) == b"ready\n"
            listed = await asyncio.to_thread(ask, op="list")
            assert [link["name"] for link in listed["links"]] == ["edge-1--mid-1", "other"]
            cut = await asyncio.to_thread(ask, op="cut", link="edge-1--mid-1")
            assert cut["link"]["state"] == "cut"
            async with _client(listen[1]) as (reader, writer):
                writer.write(b"ping")
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(reader.readexactly(4), 0.5)
                await asyncio.to_thread(ask, op="heal", link="edge-1--mid-1")
                assert await asyncio.wait_for(reader.readexactly(4), 2.0) == b"ping"
            changed = await asyncio.to_thread(
                ask, op="set", link="edge-1--mid-1", settings={"latency_ms": 40, "loss": 0})
            assert changed["link"]["latency_ms"] == 40 and changed["link"]["state"] == "up"
            assert await _round_trip_s(listen[0]) >= 0.080
            with pytest.raises(LinkControlError,
                               match="no link 'mid-1--core-1'; the links are: edge-1--mid-1, other"):
                await asyncio.to_thread(ask, op="cut", link="mid-1--core-1")
            with pytest.raises(LinkControlError, match="loss: Input should be less than or equal"):
                await asyncio.to_thread(ask, op="set", link="other", settings={"loss": 2})
            with pytest.raises(LinkControlError, match="give at least one of"):
                await asyncio.to_thread(ask, op="set", link="other", settings={})
            with pytest.raises(LinkControlError, match="op: expected one of"):
                await asyncio.to_thread(ask, op="explode")
    with pytest.raises(LinkControlError, match="does not answer"):
        request(address, {"op": "list"}, timeout_s=1.0)


def test_a_spec_with_loss_out_of_range_is_rejected(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from mesh.testbed.links import main

    spec = tmp_path / "links.json"
    spec.write_text(json.dumps([{"name": "a", "listen_port": 0, "target_host": "127.0.0.1",
                                 "target_port": 9, "latency_ms": 1, "bandwidth_mbps": 10,
                                 "loss": 1.5, "jitter_ms": -2}]))
    assert main([str(spec)]) == 2
    err = capsys.readouterr().err
    assert "[0].loss" in err and "[0].jitter_ms" in err
