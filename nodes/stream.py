"""The agent's msgpack stream port: the framed protocol of :mod:`mesh.stream`, served.

A thin adapter like the HTTP handlers: each INFER frame is decoded, handed to
:meth:`NodeAgent.infer` in its own task (so one connection carries many
queries at once) and answered with an ANSWER or ERROR frame carrying the same
request id. Every task is tracked, and cancelled and awaited when the server
stops.

Who is on the other end (:mod:`nodes.identity`): with TLS (``ssl=``, the
node's server context) the node named by the connection's verified
certificate, known once the handshake is done; a certificate of the mesh CA
for a name outside the topology is answered 403 and the connection closed. A
connection without a certificate is a client's. Without TLS, a HELLO frame
with the mesh-key token makes the connection a node's.

What one connection can make the node hold is bounded (:mod:`nodes.limits`):

* **Backpressure.** The node stops reading a connection's socket while it has
  ``stream_max_in_flight`` queries open, or while more than
  ``stream_max_unread_bytes`` of its answers wait unread in the transport
  (``pause_writing``), and reads again once they drain; what the caller sends
  meanwhile waits in its own socket buffers, not in the node.
* **Frame size.** A frame header over the body cap (the largest valid query)
  closes the connection before its payload is read; a frame over the
  large-body threshold that the node-wide budget cannot take now is answered
  :class:`~mesh.errors.Overloaded` and its bytes are discarded as they come.
* **Timeouts.** A frame begun must end within ``read_timeout_s`` of reading
  (counted only while the node reads), or the connection is answered 408 and
  closed. A client connection with nothing in flight for ``idle_timeout_s``
  is closed; a proven neighbour's (HELLO) stays open, since it is reused. A
  caller that leaves its answers unread for ``idle_timeout_s`` is closed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl as _ssl
from dataclasses import dataclass
from typing import Any

from mesh.errors import Forbidden, InvalidInput, MeshError, Overloaded
from mesh.stream import ANSWER, ERROR, HELLO, INFER, FrameReader, error_payload, frame
from mesh.wire import decode_request, encode_response, pack, unpack
from nodes.agent import NodeAgent
from nodes.answers import as_mesh_error, error_to_wire
from nodes.identity import Callers
from nodes.limits import NodeLimits, Reservation

__all__ = ["StreamServer"]

log = logging.getLogger("tiermesh.stream")


def _error_frame(request_id: int, error: MeshError, status: int | None = None) -> bytes:
    return frame(request_id, ERROR, error_payload(status or error.status,
                                                  pack(error_to_wire(error))))


@dataclass(slots=True)
class _Held:
    """A read query's payload until it is decoded: its size and its share of the body budget."""

    size: int
    reservation: Reservation
    released: bool = False


class _Connection(asyncio.Protocol):
    def __init__(self, server: StreamServer) -> None:
        self.server = server
        self.limits = server.limits
        self.reader = FrameReader(server.limits.caps.msgpack_bytes)
        self.open: set[asyncio.Task[None]] = set()
        self.transport: asyncio.Transport | None = None
        #: the mesh node this connection proved to come from (certificate or HELLO); None: a
        #: client
        self.peer: str | None = None
        #: a client's Authorization, from its HELLO (tenants: its API key)
        self.authorization: str | None = None
        #: bytes of queries read and not decoded yet
        self.undecoded_bytes = 0
        self.reading_paused = False
        self.writing_paused = False  # the caller is not reading its answers
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._last_active = now  # last byte read or answer written
        self._frame_since: float | None = None  # when the frame being read began
        self._unread_since = now  # when writing was paused
        self._front: Reservation | None = None  # budget held by the frame being read
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        limit = self.server.max_unread_bytes
        transport.set_write_buffer_limits(high=limit, low=limit // 4)
        self.server.connections.add(self)
        self._arm(self._loop.time() + min(self.limits.idle_timeout_s, self.limits.read_timeout_s))
        try:  # with TLS the handshake is done by now: the certificate says who this is
            self.peer = self.server.callers.of_connection(transport)
        except Forbidden as exc:
            self._close_with(_error_frame(0, exc))

    def data_received(self, data: bytes) -> None:
        self._last_active = self._loop.time()
        self.reader.push(data)
        self._drain()

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._unread_since = self._loop.time()
        self._pause()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._last_active = self._loop.time()
        self._drain()

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self.open:
            task.cancel()
        if self._front is not None:
            self._front.release()
            self._front = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport = None
        self.server.connections.discard(self)

    # ------------------------------------------------------------------ reading, metered
    def _drain(self) -> None:
        """Serve the complete frames held, as far as the limits allow, then read on or pause."""
        transport, reader = self.transport, self.reader
        while transport is not None and not transport.is_closing():
            if len(self.open) >= self.server.max_in_flight or self.writing_paused:
                self._pause()
                return
            try:
                head = reader.peek()
            except MeshError as exc:  # a frame over the cap: its bytes are never read
                self._close_with(_error_frame(0, exc))
                return
            if head is None:
                break
            length, request_id, kind = head
            if self._front is None:
                reservation = self.limits.budget.try_reserve(length)
                if reservation is None:
                    reader.drop()
                    self._write(_error_frame(request_id, Overloaded(
                        f"this node is already reading {self.limits.budget.held_bytes} bytes of "
                        "large queries; retry shortly or send fewer rows per query",
                        retry_after_s=self.limits.budget.retry_after_s)))
                    continue
                self._front = reservation
            got = reader.pop()
            if got is None:
                break
            reservation, self._front = self._front, None
            self._frame(*got, reservation)
        if self.reading_paused and transport is not None:
            self.reading_paused = False
            transport.resume_reading()
        if not reader.partial:
            self._frame_since = None
        elif self._frame_since is None:  # a frame has begun: it has read_timeout_s to end
            self._frame_since = self._loop.time()
            self._arm(self._frame_since + self.limits.read_timeout_s)

    def _pause(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.server.pauses += 1
            self.transport.pause_reading()
            self._frame_since = None  # the node, not the caller, holds the frame up now

    def _frame(self, request_id: int, kind: int, payload: bytes, reservation: Reservation) -> None:
        assert self.transport is not None
        if kind == INFER:
            now = self._loop.time()
            if self.peer is None and self.server.saturated(now):
                # The loop is so far behind that a query read now would start late anyway:
                # refuse it before decoding it (what keeps refusals fast under a flood).
                reservation.release()
                self.server.shed += 1
                self._write(_error_frame(request_id, Overloaded(
                    f"this node is saturated (its queries wait {self.server.lag_ms(now):.0f} "
                    "ms to start); retry shortly or at another entry",
                    retry_after_s=self.server.retry_after_s)))
                return
            held = _Held(len(payload), reservation)
            self.undecoded_bytes += held.size
            task = self._loop.create_task(self._serve(request_id, payload, held, now))
            self.open.add(task)
            self.server.tasks.add(task)
            task.add_done_callback(functools.partial(self._done, held))
            return
        reservation.release()
        if kind == HELLO:
            authorization = _client_hello(payload)
            if authorization is not None:  # a client's: its API key, for every query after it
                self.authorization = authorization
                return
            if self.server.callers.tls:  # the certificate said who this is; tokens prove less
                return
            self.peer = self.server.callers.of_hello(payload)
            if self.peer is None:
                self._close_with(_error_frame(request_id, Forbidden(
                    "HELLO: not a node of this mesh (bad token); clients send INFER only")))
        else:
            self._write(_error_frame(request_id, InvalidInput(
                f"frame kind {kind}: a node accepts only INFER ({INFER}) frames")))

    # ------------------------------------------------------------------ serving
    def _release(self, held: _Held) -> None:
        if not held.released:
            held.released = True
            held.reservation.release()
            self.undecoded_bytes -= held.size

    def _done(self, held: _Held, task: asyncio.Task[None]) -> None:
        self._release(held)  # a task cancelled before it ran never released its payload
        self.open.discard(task)
        self.server.tasks.discard(task)
        if self.reading_paused and not self.writing_paused:
            self._drain()

    async def _serve(self, request_id: int, payload: bytes, held: _Held, read_at: float
                     ) -> None:
        self.server.started(read_at, self._loop.time())
        agent = self.server.agent
        try:
            try:
                req = decode_request(payload, max_elements=agent.config.max_elements)
            finally:
                del payload
                self._release(held)
            out = frame(request_id, ANSWER, encode_response(
                await agent.infer(req, from_client=self.peer is None,
                                  authorization=self.authorization)))
        except Exception as exc:  # the connection and the node keep serving
            out = _error_frame(request_id, as_mesh_error(exc, "a stream query"))
        self._write(out)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self._last_active = self._loop.time()

    def _close_with(self, data: bytes) -> None:
        if self.transport is not None:
            self._write(data)
            self.transport.close()

    # ------------------------------------------------------------------ timeouts
    def _arm(self, at: float) -> None:
        """Make sure the watchdog runs by ``at``."""
        if self._timer is None or at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = self._loop.call_at(at, self._watchdog)

    def _watchdog(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        now = self._loop.time()
        limits = self.limits
        if self._frame_since is not None and now >= self._frame_since + limits.read_timeout_s:
            self.server.closed_slow += 1
            self._close_with(_error_frame(0, InvalidInput(
                f"frame not complete within {limits.read_timeout_s:g} s of its first byte; "
                "closing the connection"), status=408))
            return
        if self.writing_paused and now >= self._unread_since + limits.idle_timeout_s:
            self.server.closed_unread += 1
            self.transport.abort()  # it does not read: nothing more is worth sending
            return
        idle = not self.open and not self.reader.partial and not self.writing_paused
        if idle and self.peer is None and now >= self._last_active + limits.idle_timeout_s:
            self.server.closed_idle += 1
            self.transport.close()
            return
        candidates = [now + min(limits.idle_timeout_s, limits.read_timeout_s)]
        if self._frame_since is not None:
            candidates.append(self._frame_since + limits.read_timeout_s)
        if self.writing_paused:
            candidates.append(self._unread_since + limits.idle_timeout_s)
        elif idle and self.peer is None:
            candidates.append(self._last_active + limits.idle_timeout_s)
        self._arm(min(candidates))

    @property
    def buffered_bytes(self) -> int:
        """What this connection makes the node hold: unparsed input, undecoded queries, unread answers."""
        unread = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self.reader.buffered + self.undecoded_bytes + unread


class StreamServer:
    """Serves one agent on a stream port. An async context manager; ``port`` is set once open.

    ``limits`` defaults to the agent's (:meth:`NodeLimits.for_agent`); pass the
    HTTP app's to share one large-body budget. ``ssl``: serve TLS with this
    context (the node's :meth:`~mesh.certs.TlsFiles.server_context`).
    """

    def __init__(self, agent: NodeAgent, host: str, port: int, *,
                 limits: NodeLimits | None = None, ssl: _ssl.SSLContext | None = None) -> None:
        self.agent = agent
        self.ssl = ssl
        # a TLS port knows nodes by certificate only; a plain one by the mesh-key HELLO
        self.callers = Callers(agent.config.topology.nodes, tls=ssl is not None, key=agent.peers)
        self.host = host
        self.port = port
        self.limits = limits or NodeLimits.for_agent(agent)
        #: queries one connection may have open; at the limit its socket is not read
        self.max_in_flight = agent.config.stream_max_in_flight
        #: unread answer bytes on one connection over which its socket is not read
        self.max_unread_bytes = agent.config.stream_max_unread_bytes
        self.tasks: set[asyncio.Task[None]] = set()
        self.connections: set[_Connection] = set()
        #: how often a connection's reading was paused, and connections closed for being
        #: idle, for a frame not completed in time, or for leaving answers unread
        self.pauses = self.closed_idle = self.closed_slow = self.closed_unread = 0
        #: client queries refused before decoding because the node was saturated
        self.shed = 0
        self._lag_s = 0.0  # how long queries wait for the loop before they start (estimate)
        self._lag_at = 0.0
        self._server: asyncio.Server | None = None

    #: Load shedding: when client queries wait longer than this for the event loop before
    #: they even start, new ones are refused at once, undecoded (429, ``retry_after_s``).
    shed_after_ms: float = 5.0
    retry_after_s: float = 0.05
    #: the wait estimate relaxes with this half-life while nothing starts (shedding)
    lag_half_life_s: float = 0.05

    def lag_ms(self, now: float) -> float:
        age = max(now - self._lag_at, 0.0)
        return self._lag_s * 0.5 ** (age / self.lag_half_life_s) * 1000.0

    def saturated(self, now: float) -> bool:
        return self._lag_s > 0 and self.lag_ms(now) > self.shed_after_ms

    def started(self, read_at: float, now: float) -> None:
        """A query read at ``read_at`` started now: learn how long queries wait to start."""
        waited = max(now - read_at, 0.0)
        relaxed = self.lag_ms(now) / 1000.0
        self._lag_s, self._lag_at = relaxed + 0.3 * (waited - relaxed), now

    @property
    def buffered_bytes(self) -> int:
        """Bytes the port holds for its connections now (input, undecoded queries, answers)."""
        return sum(c.buffered_bytes for c in self.connections)

    async def __aenter__(self) -> StreamServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), self.host, self.port,
                                                reuse_address=True, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


def _client_hello(payload: bytes) -> str | None:
    """A client's HELLO (``{"authorization": "Bearer <key>"}``): the authorization it
    carries; None for a node's HELLO (or anything else)."""
    try:
        obj = unpack(payload)
    except InvalidInput:
        return None
    if not isinstance(obj, dict) or "node" in obj:
        return None
    value = obj.get("authorization")
    return value[:600] if isinstance(value, str) else None
