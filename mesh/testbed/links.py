"""Emulated network links: TCP proxies that add a link's latency and bandwidth.

Linux ``tc netem`` is not available where the testbed runs, so each topology
link is emulated in user space. A :class:`LinkEmulator` listens on one port and
forwards every connection it accepts to one target, delaying and pacing the
bytes in each direction as the link would::

    client ──► LinkEmulator(listen) ──► target      direction "to_target"
           ◄──                      ◄──             direction "to_client"

One emulator covers the connections *opened* one way over a link (their bytes
still flow both ways); a link whose two ends both accept connections needs two.

Timing, per direction: a chunk of ``n`` bytes read at time ``t`` finishes
serialisation at ``max(t, previous_finish) + n * 8 / (bandwidth_mbps * 1e6)``
seconds and is delivered at ``finish + latency_ms / 1000`` plus, when set:

* ``jitter_ms``: a random extra delay, uniform in ``[0, jitter_ms]``, per chunk;
* ``loss``: the probability that a chunk is lost. Over TCP a lost segment is
  not missing data but a retransmission: the receiver gets it one
  retransmission timeout late, and everything behind it on that connection
  waits. So a lost chunk is delivered :data:`RTO_MIN_S` (200 ms, Linux's
  minimum RTO) or two round trips (``4 * latency_ms``) later, whichever is
  more. A chunk is up to :data:`CHUNK_BYTES` (a read), not one packet.

Both draw from a random generator seeded from the link's ``seed`` and name
and the direction, so a run with the same traffic draws the same delays.
Bytes are never reordered: a connection direction delivers its chunks in the
order they were read, so a late chunk holds back the ones behind it (as TCP's
in-order delivery does), while other connections over the link go on.

``previous_finish`` belongs to the link direction, not to a connection: a
link is one pipe, so concurrent transfers share its bandwidth. Half-close
(EOF) and resets cross the link with the same one-way latency, after the
bytes read before them. Reading stops while more than
``max_in_flight_bytes`` of a connection wait in the emulator, so a slow link
pushes back on the sender.

A link can be **cut** and **healed** while it runs (:meth:`LinkEmulator.cut`,
:meth:`LinkEmulator.heal`), as a cable pulled and plugged back: nothing is
refused or reset, nothing crosses. Open connections stall (bytes sent into
the link wait, then the sender is pushed back); new connections are accepted
(the emulator's listen socket is on this side of the cut) but never reach the
target, and a client that gives up on one before the heal is forgotten
without the target hearing of it. So a node notices a cut only through its
own timeouts and missed heartbeats, as it would on a real network. On heal,
what waited is delivered one latency later and held connections are opened
to the target: a cut shorter than TCP's own give-up time (minutes) is survived
by the connections that wait it out. Latency, bandwidth, loss and jitter can
be changed while running (:meth:`LinkEmulator.configure`); a chunk already
scheduled keeps its time.

A connection to a target that refuses it is reset one round trip after it
was accepted (the SYN goes out, the refusal comes back).

:class:`LinkSet` runs many emulators from a JSON spec (see
:func:`parse_link_specs`), and ``python -m mesh.testbed.links SPEC.json`` runs
one as a process: it prints ``ready`` once every link listens and exits 0 on
SIGTERM or SIGINT after closing every connection. With ``--control-port`` it
also answers cut, heal and set commands on a loopback port
(:mod:`mesh.testbed.control`). Emulators that make up one topology link (both
directions, both ports) share its ``link`` name, the name commands address.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import logging
import random
import signal
import socket
import struct
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mesh.errors import TopologyError

__all__ = [
    "CHUNK_BYTES",
    "MAX_IN_FLIGHT_BYTES",
    "LinkEmulator",
    "RTO_MIN_S",
    "LinkSet",
    "LinkSettings",
    "LinkSpec",
    "UnknownLink",
    "load_link_specs",
    "main",
    "parse_link_specs",
]

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
"""Largest chunk read from a socket at once; the unit of pacing."""

MAX_IN_FLIGHT_BYTES = 4 * 1024 * 1024
"""Default cap on the bytes of one connection direction held inside the emulator."""

RTO_MIN_S = 0.2
"""The least delay a lost chunk pays: Linux's minimum TCP retransmission timeout."""


class _Mark(enum.Enum):
    EOF = "eof"
    RESET = "reset"


class _Outcome(enum.Enum):
    EOF = "eof"  # the source half-closed and the sink was told
    RESET = "reset"  # the source was reset and the delay has passed
    SINK_FAILED = "sink_failed"  # the sink went away while bytes were due to it


class _Pipe:
    """One direction of one link: pacing, loss and jitter, cut state and counters, shared by
    all connections."""

    def __init__(self, latency_ms: float, bandwidth_mbps: float, *, loss: float = 0.0,
                 jitter_ms: float = 0.0, rng: random.Random | None = None) -> None:
        self.latency_s = latency_ms / 1000.0
        self.bits_per_s = bandwidth_mbps * 1e6
        self.loss = loss
        self.jitter_s = jitter_ms / 1000.0
        self._rng = rng if rng is not None else random.Random(0)
        self.busy_until = float("-inf")
        self.bytes = 0
        self.connections = 0
        self.in_flight_bytes = 0
        self.lost_chunks = 0
        #: set while the link is up; cleared by a cut
        self.up = asyncio.Event()
        self.up.set()
        #: when the last cut healed (loop time)
        self.healed_at = float("-inf")

    def retransmit_timeout_s(self) -> float:
        """What a lost chunk adds: the larger of :data:`RTO_MIN_S` and two round trips."""
        return max(RTO_MIN_S, 4 * self.latency_s)

    def schedule(self, size_bytes: int, now: float) -> float:
        """Reserve the pipe for a chunk read at ``now``; return when it is delivered."""
        finish = max(now, self.busy_until) + size_bytes * 8 / self.bits_per_s
        self.busy_until = finish
        due = finish + self.latency_s
        if self.jitter_s > 0:
            due += self._rng.uniform(0.0, self.jitter_s)
        if self.loss > 0 and self._rng.random() < self.loss:
            self.lost_chunks += 1
            due += self.retransmit_timeout_s()
        return due

    def stats(self) -> dict[str, int]:
        return {
            "bytes": self.bytes,
            "connections": self.connections,
            "in_flight_bytes": self.in_flight_bytes,
            "lost_chunks": self.lost_chunks,
        }


class _Pump:
    """Moves one connection's bytes through one pipe: read, hold until due, write."""

    def __init__(self, pipe: _Pipe, source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                 max_in_flight_bytes: int, initial: bytes = b"") -> None:
        self._pipe = pipe
        self._initial = initial
        self._source = source
        self._sink = sink
        self._max_in_flight = max_in_flight_bytes
        self._queue: asyncio.Queue[tuple[float, bytes | _Mark]] = asyncio.Queue()
        self._in_flight = 0
        self._room = asyncio.Event()
        self._room.set()

    async def run(self) -> _Outcome:
        pipe = self._pipe
        pipe.connections += 1
        reader = asyncio.create_task(self._read_loop())
        try:
            return await self._write_loop()
        finally:
            await _cancel_and_wait([reader])
            pipe.in_flight_bytes -= self._in_flight

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        pipe = self._pipe
        if self._initial:  # read while the link was cut, before the target was reached
            self._in_flight += len(self._initial)
            pipe.in_flight_bytes += len(self._initial)
            self._queue.put_nowait((pipe.schedule(len(self._initial), loop.time()),
                                    self._initial))
        while True:
            while self._in_flight >= self._max_in_flight:
                self._room.clear()
                await self._room.wait()
            try:
                data = await self._source.read(CHUNK_BYTES)
            except OSError:
                self._queue.put_nowait((loop.time() + pipe.latency_s, _Mark.RESET))
                return
            if not data:
                self._queue.put_nowait((loop.time() + pipe.latency_s, _Mark.EOF))
                return
            self._in_flight += len(data)
            pipe.in_flight_bytes += len(data)
            self._queue.put_nowait((pipe.schedule(len(data), loop.time()), data))

    async def _write_loop(self) -> _Outcome:
        loop = asyncio.get_running_loop()
        sink = self._sink
        pipe = self._pipe
        while True:
            due, item = await self._queue.get()
            while True:
                # A timer may fire a clock tick early; never deliver before the due time.
                while (delay := due - loop.time()) > 0:
                    await asyncio.sleep(delay)
                if pipe.up.is_set():
                    break
                await pipe.up.wait()  # cut: nothing crosses until the heal, then one latency
                due = max(due, pipe.healed_at + pipe.latency_s)
            if item is _Mark.RESET:
                return _Outcome.RESET
            try:
                if item is _Mark.EOF:
                    if sink.can_write_eof():
                        sink.write_eof()
                    return _Outcome.EOF
                sink.write(item)
                await sink.drain()
            except OSError:
                return _Outcome.SINK_FAILED
            self._in_flight -= len(item)
            self._pipe.in_flight_bytes -= len(item)
            self._pipe.bytes += len(item)
            if self._in_flight < self._max_in_flight:
                self._room.set()


class LinkEmulator:
    """A TCP proxy that behaves like one topology link; an async context manager.

    ``async with`` starts listening on ``listen_host:listen_port`` (port 0 picks
    a free one; see :attr:`port`); leaving it stops accepting, cancels and awaits
    every task the emulator started, and closes every socket it opened. Each
    accepted connection is forwarded to ``target_host:target_port``. An emulator
    runs once: it cannot be re-entered after it closes. :meth:`cut`, :meth:`heal`
    and :meth:`configure` change the link while it runs.

    ``seed`` (with ``name``) seeds the loss and jitter draws of each direction.

    Raises :class:`ValueError` for a negative latency or jitter, a bandwidth that
    is not positive, a loss outside 0..1 or an in-flight cap under
    :data:`CHUNK_BYTES`, and :class:`OSError` from ``__aenter__`` when the listen
    address cannot be bound.
    """

    def __init__(self, listen_host: str, listen_port: int, target_host: str, target_port: int, *,
                 latency_ms: float, bandwidth_mbps: float, loss: float = 0.0,
                 jitter_ms: float = 0.0, seed: int = 0, name: str = "",
                 max_in_flight_bytes: int = MAX_IN_FLIGHT_BYTES) -> None:
        label = f"link {name!r}" if name else "link"
        _check_settings(label, latency_ms=latency_ms, bandwidth_mbps=bandwidth_mbps, loss=loss,
                        jitter_ms=jitter_ms)
        if max_in_flight_bytes < CHUNK_BYTES:
            raise ValueError(f"{label}: max_in_flight_bytes must be >= {CHUNK_BYTES}, "
                             f"got {max_in_flight_bytes!r}")
        self.name = name
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        self.latency_ms = latency_ms
        self.bandwidth_mbps = bandwidth_mbps
        self.loss = loss
        self.jitter_ms = jitter_ms
        self.max_in_flight_bytes = max_in_flight_bytes
        self._to_target, self._to_client = (
            _Pipe(latency_ms, bandwidth_mbps, loss=loss, jitter_ms=jitter_ms,
                  rng=random.Random(f"{seed}/{name}/{direction}"))
            for direction in ("to_target", "to_client"))
        self._server: asyncio.Server | None = None
        self._closed = False
        self._port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepted = 0
        self._connect_failures = 0
        self._abandoned = 0
        self._cuts = 0

    def __repr__(self) -> str:
        extra = (f", loss {self.loss}" if self.loss else "") + (
            f", jitter {self.jitter_ms} ms" if self.jitter_ms else "") + (
            ", cut" if self.is_cut else "")
        return (f"LinkEmulator({self.name!r}, {self.listen_host}:{self._port or self.listen_port}"
                f" -> {self.target_host}:{self.target_port}, {self.latency_ms} ms,"
                f" {self.bandwidth_mbps} Mbps{extra})")

    @property
    def port(self) -> int:
        """The bound listen port (of the first socket when the host resolves to several)."""
        if self._server is None:
            raise RuntimeError(f"{self!r} is not listening; enter it with `async with` first")
        return self._port

    @property
    def is_cut(self) -> bool:
        return not self._to_target.up.is_set()

    async def __aenter__(self) -> Self:
        if self._server is not None or self._closed:
            raise RuntimeError(f"{self!r} was already started; create a new LinkEmulator")
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.listen_port)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop accepting and close every connection at once (resets them). Idempotent."""
        server, self._server = self._server, None
        self._closed = True
        if server is None:
            return
        server.close()
        await _cancel_and_wait(list(self._tasks))
        await server.wait_closed()

    # ------------------------------------------------------------------ faults

    def cut(self) -> None:
        """Stop carrying anything, both ways, until :meth:`heal` (see the module doc).
        Idempotent."""
        if not self.is_cut:
            self._cuts += 1
        for pipe in (self._to_target, self._to_client):
            pipe.up.clear()

    def heal(self, now: float | None = None) -> None:
        """Carry again: what waited is delivered one latency from ``now`` (the loop's time by
        default), held connections reach the target. Idempotent."""
        if not self.is_cut:
            return
        now = asyncio.get_running_loop().time() if now is None else now
        for pipe in (self._to_target, self._to_client):
            pipe.healed_at = now
            pipe.up.set()

    def configure(self, *, latency_ms: float | None = None, bandwidth_mbps: float | None = None,
                  loss: float | None = None, jitter_ms: float | None = None) -> None:
        """Change the link while it runs (None: keep). Applies to chunks read from now on.

        Raises :class:`ValueError` (and changes nothing) for a value out of range.
        """
        label = f"link {self.name!r}" if self.name else "link"
        _check_settings(label, latency_ms=latency_ms, bandwidth_mbps=bandwidth_mbps, loss=loss,
                        jitter_ms=jitter_ms)
        for pipe in (self._to_target, self._to_client):
            if latency_ms is not None:
                pipe.latency_s = latency_ms / 1000.0
            if bandwidth_mbps is not None:
                pipe.bits_per_s = bandwidth_mbps * 1e6
            if loss is not None:
                pipe.loss = loss
            if jitter_ms is not None:
                pipe.jitter_s = jitter_ms / 1000.0
        self.latency_ms = self.latency_ms if latency_ms is None else latency_ms
        self.bandwidth_mbps = self.bandwidth_mbps if bandwidth_mbps is None else bandwidth_mbps
        self.loss = self.loss if loss is None else loss
        self.jitter_ms = self.jitter_ms if jitter_ms is None else jitter_ms

    def stats(self) -> dict[str, Any]:
        """Settings and counters: connections accepted, open, refused by the target and given
        up while the link was cut; bytes and lost chunks per direction."""
        return {
            "name": self.name,
            "listen": f"{self.listen_host}:{self._port or self.listen_port}",
            "target": f"{self.target_host}:{self.target_port}",
            "latency_ms": self.latency_ms,
            "bandwidth_mbps": self.bandwidth_mbps,
            "loss": self.loss,
            "jitter_ms": self.jitter_ms,
            "cut": self.is_cut,
            "cuts": self._cuts,
            "connections": self._accepted,
            "active_connections": len(self._tasks),
            "connect_failures": self._connect_failures,
            "abandoned_connections": self._abandoned,
            "to_target": self._to_target.stats(),
            "to_client": self._to_client.stats(),
        }

    # ------------------------------------------------------------------ connections

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, so that the emulator owns (and can cancel) each connection's task.
        self._accepted += 1
        task = asyncio.get_running_loop().create_task(
            self._serve(reader, writer), name=f"link {self.name or self._port} #{self._accepted}")
        self._tasks.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%r: connection handler failed", self, exc_info=task.exception())

    async def _serve(self, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        writers = [client_writer]
        clean = False
        initial = b""
        try:
            if self.is_cut:
                held = await self._hold_while_cut(client_reader)
                if held is None:  # the client gave up before the link came back
                    self._abandoned += 1
                    return
                initial = held
            latency_s = self.latency_ms / 1000.0
            try:
                target_reader, target_writer = await asyncio.open_connection(
                    self.target_host, self.target_port)
            except OSError:
                self._connect_failures += 1
                await asyncio.sleep(2 * latency_s)
                return
            writers.append(target_writer)
            pumps = [
                asyncio.create_task(_Pump(self._to_target, client_reader, target_writer,
                                          self.max_in_flight_bytes, initial).run()),
                asyncio.create_task(_Pump(self._to_client, target_reader, client_writer,
                                          self.max_in_flight_bytes).run()),
            ]
            try:
                clean = await _until_closed(pumps, latency_s)
            finally:
                await _cancel_and_wait(pumps)
        finally:
            await _close_all(writers, reset=not clean)

    async def _hold_while_cut(self, reader: asyncio.StreamReader) -> bytes | None:
        """Hold a connection accepted during a cut until the heal; return what the client
        sent meanwhile, or None when it closed or reset first (its SYN never crossed)."""
        held = bytearray()
        up: asyncio.Task[Any] = asyncio.ensure_future(self._to_target.up.wait())
        read: asyncio.Task[bytes] | None = None
        try:
            while not up.done():
                if read is None and len(held) < self.max_in_flight_bytes:
                    read = asyncio.ensure_future(reader.read(CHUNK_BYTES))
                await asyncio.wait([t for t in (up, read) if t is not None],
                                   return_when=asyncio.FIRST_COMPLETED)
                if read is not None and read.done():
                    done, read = read, None
                    try:
                        data = done.result()
                    except OSError:
                        return None
                    if not data:
                        return None
                    held += data
            return bytes(held)
        finally:
            await _cancel_and_wait([t for t in (up, read) if t is not None])


def _check_settings(label: str, *, latency_ms: float | None, bandwidth_mbps: float | None,
                    loss: float | None, jitter_ms: float | None) -> None:
    if latency_ms is not None and not latency_ms >= 0:
        raise ValueError(f"{label}: latency_ms must be >= 0, got {latency_ms!r}")
    if bandwidth_mbps is not None and not bandwidth_mbps > 0:
        raise ValueError(f"{label}: bandwidth_mbps must be > 0, got {bandwidth_mbps!r}")
    if loss is not None and not 0 <= loss <= 1:
        raise ValueError(f"{label}: loss must be between 0 and 1, got {loss!r}")
    if jitter_ms is not None and not jitter_ms >= 0:
        raise ValueError(f"{label}: jitter_ms must be >= 0, got {jitter_ms!r}")


async def _until_closed(pumps: list[asyncio.Task[_Outcome]], latency_s: float) -> bool:
    """Wait for both directions; True when both ended in EOF, False on a reset."""
    pending: set[asyncio.Task[_Outcome]] = set(pumps)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            outcome = task.result()
            if outcome is _Outcome.SINK_FAILED:
                # The receiver is gone; its reset reaches the sender one latency later.
                await asyncio.sleep(latency_s)
                return False
            if outcome is _Outcome.RESET:
                return False
    return True


async def _close_all(writers: Sequence[asyncio.StreamWriter], *, reset: bool) -> None:
    """Close sockets: FIN after buffered bytes, or RST at once; never wait on a stuck peer
    once cancelled."""
    for writer in writers:
        if reset:
            _abort(writer)
        else:
            writer.close()
    try:
        for writer in writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    except asyncio.CancelledError:
        for writer in writers:
            _abort(writer)
        raise


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) so the peer sees a reset, not an orderly EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("link task %s failed", task.get_name(), exc_info=task.exception())


# --------------------------------------------------------------------------- link sets


LatencyMs = Annotated[float, Field(ge=0, le=60_000)]
BandwidthMbps = Annotated[float, Field(gt=0)]
Loss = Annotated[float, Field(ge=0, le=1)]
JitterMs = Annotated[float, Field(ge=0, le=60_000)]


class LinkSpec(BaseModel):
    """One emulated link direction in a spec file; keys equal the field names.

    ``link``: the topology link this emulator is part of, the name that control
    commands address (default: ``name``). ``seed``: with ``name``, seeds the loss
    and jitter draws.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    link: str | None = Field(default=None, min_length=1)
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(ge=0, le=65535)
    target_host: str = Field(min_length=1)
    target_port: int = Field(ge=1, le=65535)
    latency_ms: LatencyMs
    bandwidth_mbps: BandwidthMbps
    loss: Loss = 0.0
    jitter_ms: JitterMs = 0.0
    seed: int = 0


class LinkSettings(BaseModel):
    """A change to a running link: each field given is set, the others are kept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_ms: LatencyMs | None = None
    bandwidth_mbps: BandwidthMbps | None = None
    loss: Loss | None = None
    jitter_ms: JitterMs | None = None

    @classmethod
    def parse(cls, data: Any) -> LinkSettings:
        """Validate a JSON object; raises :class:`ValueError` naming each bad field."""
        if not isinstance(data, dict):
            raise ValueError("settings: must be an object with latency_ms, bandwidth_mbps, loss "
                             "and/or jitter_ms")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError("; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
            ) from None

    def given(self) -> dict[str, float]:
        return self.model_dump(exclude_none=True)


class UnknownLink(KeyError):
    """A command named a link that is not in the set; the message lists those that are."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        super().__init__(name)
        self.message = (f"no link {name!r}; the links are: {', '.join(sorted(known)) or '(none)'}")

    def __str__(self) -> str:
        return self.message


def parse_link_specs(data: Any, *, source: str = "link spec") -> tuple[LinkSpec, ...]:
    """Validate a parsed JSON spec: a list of link objects with unique names.

    Raises :class:`~mesh.errors.TopologyError` listing every problem by key
    path (``[2].latency_ms: Input should be greater than or equal to 0``).
    """
    if not isinstance(data, list):
        fields = "{name, listen_port, target_host, target_port, latency_ms, bandwidth_mbps}"
        raise TopologyError(source, [f"(top level): must be a list of links, each {fields}"])
    specs: list[LinkSpec] = []
    errors: list[str] = []
    first_use: dict[str, int] = {}
    for i, item in enumerate(data):
        try:
            spec = LinkSpec.model_validate(item)
        except ValidationError as exc:
            for err in exc.errors():
                where = "".join(f".{part}" for part in err["loc"])
                errors.append(f"[{i}]{where}: {err['msg']}")
            continue
        if spec.name in first_use:
            errors.append(f"[{i}].name: {spec.name!r} is already used by [{first_use[spec.name]}]")
        first_use.setdefault(spec.name, i)
        specs.append(spec)
    if errors:
        raise TopologyError(source, errors)
    return tuple(specs)


def load_link_specs(path: str | Path) -> tuple[LinkSpec, ...]:
    """Read and validate a JSON spec file; raises :class:`~mesh.errors.TopologyError`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise TopologyError(str(path), [f"cannot read file: {exc.strerror}"]) from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise TopologyError(str(path), [f"(JSON) {where}: {exc.msg}"]) from None
    return parse_link_specs(data, source=str(path))


class LinkSet:
    """Many :class:`LinkEmulator` s in one process; an async context manager.

    Entering starts every emulator (if one cannot listen, those already started
    are closed and the error propagates); leaving closes them all. Emulators are
    grouped by their spec's ``link`` (a topology link: its two directions and two
    ports); :meth:`cut`, :meth:`heal` and :meth:`configure` act on a whole group.
    """

    def __init__(self, specs: Iterable[LinkSpec], *,
                 max_in_flight_bytes: int = MAX_IN_FLIGHT_BYTES) -> None:
        self.emulators: dict[str, LinkEmulator] = {}
        #: topology link -> the names of its emulators
        self.links: dict[str, list[str]] = {}
        for spec in specs:
            if spec.name in self.emulators:
                raise ValueError(f"link name {spec.name!r} is used twice; names must be unique")
            self.emulators[spec.name] = LinkEmulator(
                spec.listen_host, spec.listen_port, spec.target_host, spec.target_port,
                latency_ms=spec.latency_ms, bandwidth_mbps=spec.bandwidth_mbps, loss=spec.loss,
                jitter_ms=spec.jitter_ms, seed=spec.seed, name=spec.name,
                max_in_flight_bytes=max_in_flight_bytes)
            self.links.setdefault(spec.link or spec.name, []).append(spec.name)
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            for emulator in self.emulators.values():
                await stack.enter_async_context(emulator)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    def stats(self) -> dict[str, dict[str, Any]]:
        """:meth:`LinkEmulator.stats` of every emulator, by name."""
        return {name: emulator.stats() for name, emulator in self.emulators.items()}

    def group(self, link: str) -> list[LinkEmulator]:
        """The emulators of one link; raises :class:`UnknownLink` listing the known ones."""
        names = self.links.get(link)
        if names is None:
            raise UnknownLink(link, self.links)
        return [self.emulators[n] for n in names]

    def cut(self, link: str) -> None:
        for emulator in self.group(link):
            emulator.cut()

    def heal(self, link: str) -> None:
        for emulator in self.group(link):
            emulator.heal()

    def configure(self, link: str, settings: LinkSettings) -> None:
        """Set what ``settings`` gives on every emulator of ``link``."""
        emulators = self.group(link)
        for emulator in emulators:
            emulator.configure(**settings.given())

    def configure_from(self, link: str, raw: Any) -> None:
        """:meth:`configure` from a command's ``settings`` object; raises ``ValueError``
        naming what is wrong (nothing changes then) and :class:`UnknownLink`."""
        settings = LinkSettings.parse(raw)
        if not settings.given():
            raise ValueError("settings: give at least one of latency_ms, bandwidth_mbps, "
                             "loss, jitter_ms")
        self.configure(link, settings)

    def describe(self, link: str) -> dict[str, Any]:
        """One link as its emulators share it: settings, cut or not, and summed counters."""
        emulators = self.group(link)
        first = emulators[0]
        return {
            "name": link,
            "latency_ms": first.latency_ms,
            "bandwidth_mbps": first.bandwidth_mbps,
            "loss": first.loss,
            "jitter_ms": first.jitter_ms,
            "state": "cut" if first.is_cut else "up",
            "emulators": [e.name for e in emulators],
            "connections": sum(e.stats()["connections"] for e in emulators),
            "active_connections": sum(e.stats()["active_connections"] for e in emulators),
            "bytes": sum(e.stats()[d]["bytes"] for e in emulators
                         for d in ("to_target", "to_client")),
            "lost_chunks": sum(e.stats()[d]["lost_chunks"] for e in emulators
                               for d in ("to_target", "to_client")),
        }


# --------------------------------------------------------------------------- CLI


async def _run_until_signalled(specs: Sequence[LinkSpec], control_host: str,
                               control_port: int | None) -> None:
    from mesh.testbed.control import LinkControlServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with LinkSet(specs) as links, contextlib.AsyncExitStack() as stack:
            if control_port is not None:
                control = await stack.enter_async_context(
                    LinkControlServer(links, control_host, control_port))
                print(f"control {control_host}:{control.port}", flush=True)
            print("ready", flush=True)
            await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the links of a JSON spec until SIGTERM or SIGINT; return the exit status.

    Exit status: 0 after a signal and a clean shutdown, 2 for an invalid spec,
    1 when a link or the control port cannot listen.
    """
    parser = argparse.ArgumentParser(
        prog="python -m mesh.testbed.links",
        description="Emulate topology links as TCP proxies. Prints 'ready' once every "
                    "link listens; stops cleanly on SIGTERM or SIGINT.")
    parser.add_argument("spec", type=Path,
                        help="JSON list of {name, listen_port, target_host, target_port, "
                             "latency_ms, bandwidth_mbps[, listen_host, link, loss, jitter_ms, "
                             "seed]}")
    parser.add_argument("--control-port", type=int, default=None,
                        help="Answer cut/heal/set/list commands (JSON lines) on this port of "
                             "--control-host (0: any free port, printed as 'control HOST:PORT').")
    parser.add_argument("--control-host", default="127.0.0.1",
                        help="Where the control port listens (default: loopback only).")
    args = parser.parse_args(argv)
    try:
        specs = load_link_specs(args.spec)
    except TopologyError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    try:
        asyncio.run(_run_until_signalled(specs, args.control_host, args.control_port))
    except OSError as exc:
        print(f"{args.spec}: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's, so that the control server and
    # the links share one set of classes (UnknownLink above all).
    from mesh.testbed.links import main as _main

    sys.exit(_main())
