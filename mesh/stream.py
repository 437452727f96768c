"""The msgpack stream: persistent, multiplexed, length-prefixed frames over one TCP connection.

The hot hops without HTTP: the SDK to its entry node (``tcp://HOST:PORT``
entry URLs) and every node to its neighbours. On this kind of machine an HTTP
round trip through aiohttp costs ~150-200 us before any work is done, a
framed stream on an asyncio Protocol ~100 us. Every frame is::

    u32 payload length | u32 request id | u8 kind | payload

big-endian. ``kind`` is :data:`INFER` (payload: an ``InferRequest`` exactly
as ``POST /v1/infer`` takes it), :data:`ANSWER` (an ``InferResponse``),
:data:`ERROR` (``u16 status`` then the body ``POST /v1/infer`` would answer
with that status: msgpack ``{"error": {...}}``) or :data:`HELLO` (a node
proving itself, :mod:`nodes.peers`). Answers carry their request's id and may come back in any
order, so one connection carries many queries at once.

:class:`FrameReader` is the pure decoder both ends share. :class:`StreamClient`
is the asyncio client (``async with StreamClient(host, port) as c: await
c.infer(request)``); with ``reconnect=True`` it connects on first use and again
after the connection is lost, which is how nodes keep one stream per
neighbour. :class:`BlockingStream` is the blocking client the SDK's
:class:`~mesh.client.Client` uses. Both take ``ssl=`` (an
:class:`ssl.SSLContext`) to speak the same frames over TLS, as nodes do to
each other off loopback (:mod:`mesh.certs`). Transport failures raise
:class:`~mesh.errors.MeshConnectionError`; answers that are errors raise the
:mod:`mesh.errors` class the node sent.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl as _ssl
import struct
import time
from typing import Any
from urllib.parse import urlsplit

from mesh.errors import InvalidInput, MeshConnectionError, MeshTimeout, PayloadTooLarge
from mesh.wire import InferRequest, InferResponse, decode_answer, encode_request, pack

__all__ = ["INFER", "ANSWER", "ERROR", "HELLO", "HEADER", "SCHEME", "client_hello", "frame",
           "error_payload", "frame_answer",
           "parse_stream_url",
           "FrameReader", "StreamClient", "BlockingStream"]

INFER, ANSWER, ERROR = 1, 2, 3
#: Sent once by a node on a connection it opens to a neighbour: proves it is a mesh node
#: (see :mod:`nodes.peers`); queries on that connection may then carry a route.
HELLO = 4
HEADER = struct.Struct(">IIB")
#: An ERROR frame's payload starts with its status (u16, big-endian).
STATUS = struct.Struct(">H")
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
#: URL scheme of a stream address: ``tcp://HOST:PORT``.
SCHEME = "tcp"


def frame(request_id: int, kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), request_id, kind) + payload


def parse_stream_url(url: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` -> (host, port); raises :class:`ValueError` naming the fix."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != SCHEME or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ValueError(f"stream address {url!r}: expected {SCHEME}://HOST:PORT")
    return parts.hostname, port


def error_payload(status: int, body: bytes) -> bytes:
    """The payload of an ERROR frame: the HTTP-like status, then the error's wire form."""
    return STATUS.pack(status) + body


def frame_answer(kind: int, payload: bytes) -> tuple[int, bytes]:
    """An ANSWER or ERROR frame as (HTTP-like status, body) for :func:`mesh.wire.decode_answer`.

    Nothing is unpacked here: the status of an error travels in front of its body.
    """
    if kind == ANSWER:
        return 200, payload
    if len(payload) < STATUS.size:
        return 500, payload
    (status,) = STATUS.unpack_from(payload)
    return (status if 400 <= status < 600 else 500), payload[STATUS.size:]


class FrameReader:
    """Accumulates bytes and cuts them into frames; the pure decoder both ends share.

    :meth:`feed` takes bytes and returns every complete frame as (id, kind,
    payload). A server that meters what it reads uses the parts instead:
    :meth:`push` bytes, :meth:`peek` at the next frame's header, :meth:`pop`
    one complete frame, or :meth:`drop` it (its bytes are discarded as they
    come, never buffered). ``buffered`` is how many bytes it holds and
    ``partial`` whether a frame has begun and not ended. A frame header over
    ``max_frame`` raises :class:`PayloadTooLarge` before its payload is read
    (the stream cannot be resynchronised: close it).
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # bytes at the front of _buf already cut into frames
        self._skip = 0  # bytes of a dropped frame still to come, to discard

    @property
    def buffered(self) -> int:
        """Bytes held and not yet returned as frames."""
        return len(self._buf) - self._pos

    @property
    def partial(self) -> bool:
        """Whether a frame has begun and not ended (bytes held, or a dropped frame's to come)."""
        return self._skip > 0 or len(self._buf) > self._pos

    def push(self, data: bytes) -> None:
        """Take bytes off the socket; nothing is parsed until :meth:`peek` or :meth:`pop`."""
        start = 0
        if self._skip:
            start = min(self._skip, len(data))
            self._skip -= start
            if start == len(data):
                return
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += memoryview(data)[start:] if start else data

    def peek(self) -> tuple[int, int, int] | None:
        """(length, request id, kind) of the next frame once its header is here, else None.

        Raises :class:`PayloadTooLarge` for a frame over ``max_frame``.
        """
        if self._skip or len(self._buf) - self._pos < HEADER.size:
            return None
        length, request_id, kind = HEADER.unpack_from(self._buf, self._pos)
        if length > self.max_frame:
            raise PayloadTooLarge(f"frame of {length} bytes; this end accepts at most "
                                  f"{self.max_frame}")
        return length, request_id, kind

    def pop(self) -> tuple[int, int, bytes] | None:
        """The next complete frame as (request id, kind, payload), or None until it is here."""
        head = self.peek()
        if head is None:
            return None
        length, request_id, kind = head
        start = self._pos + HEADER.size
        end = start + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[start:end])
        self._consumed(end)
        return request_id, kind, payload

    def drop(self) -> None:
        """Discard the next frame, whose header :meth:`peek` returned: what is here and what is to come."""
        head = self.peek()
        if head is None:
            raise ValueError("drop(): no frame header to drop")
        end = self._pos + HEADER.size + head[0]
        if len(self._buf) >= end:
            self._consumed(end)
        else:
            self._skip = end - len(self._buf)
            self._consumed(len(self._buf))

    def _consumed(self, end: int) -> None:
        if end == len(self._buf):  # the usual case: every byte here was whole frames
            self._buf.clear()
            self._pos = 0
        else:
            self._pos = end

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """:meth:`push` and :meth:`pop` every complete frame. Raises :class:`PayloadTooLarge`."""
        self.push(data)
        out = []
        while (got := self.pop()) is not None:
            out.append(got)
        return out


class _ClientProtocol(asyncio.Protocol):
    """One connection; its own pending queries fail when it is lost (not a successor's)."""

    def __init__(self) -> None:
        self.reader = FrameReader()
        self.pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except InvalidInput as exc:
            self.fail_all(MeshConnectionError(f"stream broken: {exc.message}"))
            if self.transport is not None:
                self.transport.abort()
            return
        for request_id, kind, payload in frames:
            future = self.pending.get(request_id)
            if future is not None and not future.done():
                future.set_result((kind, payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.fail_all(MeshConnectionError("the node closed the stream"))

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def fail_all(self, exc: Exception) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(exc)
        self.pending.clear()


class StreamClient:
    """One persistent multiplexed connection to a node's stream port. An async context manager.

    States: unopened -> opened -> closed. Entering connects at once (and raises
    :class:`MeshConnectionError` when the port cannot be reached), unless
    ``reconnect`` is set: then the connection is made by the first query and
    made again by the first query after it is lost; queries in flight on a
    lost connection fail with :class:`MeshConnectionError` and are not re-sent.
    Leaving closes the connection and fails whatever is still in flight.
    """

    def __init__(self, host: str, port: int, *, reconnect: bool = False,
                 hello: bytes | None = None, connect_timeout_s: float | None = None,
                 ssl: _ssl.SSLContext | None = None) -> None:
        self.host, self.port = host, port
        #: TLS for every connection (None: plain TCP); the handshake counts as connecting
        self.ssl = ssl
        self.reconnect = reconnect
        #: how long opening a connection may take (None: as long as the OS allows)
        self.connect_timeout_s = connect_timeout_s
        #: payload of a HELLO frame sent first on every connection (nodes only)
        self.hello = hello
        self._conn: _ClientProtocol | None = None
        self._connecting = asyncio.Lock()
        self._ids = itertools.count(1)
        self._state = "unopened"

    @classmethod
    def from_url(cls, url: str, *, reconnect: bool = False, hello: bytes | None = None,
                 connect_timeout_s: float | None = None,
                 ssl: _ssl.SSLContext | None = None) -> StreamClient:
        """A client for ``tcp://HOST:PORT``; raises :class:`ValueError` for anything else."""
        host, port = parse_stream_url(url)
        return cls(host, port, reconnect=reconnect, hello=hello,
                   connect_timeout_s=connect_timeout_s, ssl=ssl)

    async def __aenter__(self) -> StreamClient:
        if self._state != "unopened":
            raise MeshConnectionError(f"stream client cannot be opened twice (it is {self._state})")
        if not self.reconnect:
            await self._connect()
        self._state = "opened"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection and fail the queries in flight. Idempotent."""
        self._state = "closed"
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.transport is not None:
                conn.transport.close()
            conn.fail_all(MeshConnectionError("stream closed"))

    async def _connect(self) -> _ClientProtocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(_ClientProtocol, self.host, self.port,
                                                       ssl=self.ssl)
        except TimeoutError:
            raise MeshConnectionError(f"cannot reach {self.host}:{self.port}: no connection "
                                      f"within {self.connect_timeout_s:g} s") from None
        except OSError as exc:
            raise MeshConnectionError(f"cannot reach {self.host}:{self.port}: {exc}") from None
        if self.hello is not None:
            assert conn.transport is not None
            conn.transport.write(frame(0, HELLO, self.hello))
        self._conn = conn
        return conn

    async def connect(self) -> None:
        """Make sure a connection is open (one connect however many wait for it); raises
        :class:`MeshConnectionError`."""
        await self._connection()

    @property
    def connected(self) -> bool:
        """Whether a connection is open now."""
        return self._conn is not None and self._conn.usable

    async def _connection(self) -> _ClientProtocol:
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        if self._state != "opened" or (not self.reconnect and conn is not None):
            raise MeshConnectionError(
                "stream is not open; use 'async with StreamClient(...)'" if self._state != "opened"
                else "the node closed the stream")
        async with self._connecting:  # one connect however many queries wait for it
            conn = self._conn
            if conn is None or not conn.usable:
                conn = await self._connect()
                if self._state != "opened":  # closed while connecting
                    assert conn.transport is not None
                    conn.transport.close()
                    raise MeshConnectionError("stream closed")
            return conn

    async def send(self, body: bytes, *, timeout_s: float | None = None) -> tuple[int, bytes]:
        """Send one encoded ``InferRequest``; returns (status, body) as ``POST /v1/infer`` would.

        Raises :class:`MeshConnectionError` when the stream cannot carry it, and
        :class:`~mesh.errors.MeshTimeout` (a ``TimeoutError``) when ``timeout_s`` is
        given and no answer came within it of sending. The connection stays open
        then: other queries share it, and a late answer is dropped by its id.
        """
        conn = await self._connection()
        request_id = next(self._ids) & 0xFFFFFFFF
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        conn.pending[request_id] = future
        assert conn.transport is not None
        conn.transport.write(frame(request_id, INFER, body))
        try:
            async with asyncio.timeout(timeout_s):
                kind, payload = await future
        except TimeoutError:
            raise MeshTimeout(f"no answer from {self.host}:{self.port} within {timeout_s:g} s"
                              ) from None
        finally:
            conn.pending.pop(request_id, None)
        return frame_answer(kind, payload)

    async def infer(self, req: InferRequest) -> InferResponse:
        """Send one query; raises the :mod:`mesh.errors` class the node answered with."""
        return decode_answer(*await self.send(encode_request(req)))


class BlockingStream:
    """A blocking stream client: one query at a time on one kept connection. Not thread-safe.

    A kept connection found closed when a query is sent is re-opened once, like
    a kept-alive HTTP connection. Raises :class:`MeshConnectionError` (also when
    no connection opens within ``connect_timeout_s``) and
    :class:`~mesh.errors.MeshTimeout` (no answer within the timeout, counted from
    sending; the connection is closed then, so that nothing waits on a frozen node).
    """

    def __init__(self, host: str, port: int, *, timeout_s: float,
                 connect_timeout_s: float | None = None,
                 ssl: _ssl.SSLContext | None = None, hello: bytes | None = None) -> None:
        """``hello``: the payload of a HELLO frame sent first on every connection (a
        client's API key, :func:`client_hello`)."""
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.ssl = ssl
        self.hello = hello
        self.connect_timeout_s = timeout_s if connect_timeout_s is None else connect_timeout_s
        self._sock: socket.socket | None = None
        self._reader = FrameReader()
        self._ids = itertools.count(1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def connect(self, timeout_s: float | None = None) -> None:
        """Open the connection unless it is open; raises :class:`MeshConnectionError`."""
        if self._sock is not None:
            return
        wait = self.connect_timeout_s if timeout_s is None else timeout_s
        try:
            sock = socket.create_connection((self.host, self.port), wait)
        except TimeoutError:
            raise MeshConnectionError(f"cannot reach {self.host}:{self.port}: no connection "
                                      f"within {wait:g} s") from None
        except OSError as exc:
            raise MeshConnectionError(f"cannot reach {self.host}:{self.port}: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl is not None:
            try:  # the handshake shares the connect timeout
                sock = self.ssl.wrap_socket(sock, server_hostname=self.host)
            except TimeoutError:
                sock.close()
                raise MeshConnectionError(f"cannot reach {self.host}:{self.port}: no TLS "
                                          f"handshake within {wait:g} s") from None
            except OSError as exc:
                sock.close()
                raise MeshConnectionError(f"cannot reach {self.host}:{self.port}: TLS: {exc}"
                                          ) from None
        self._sock, self._reader = sock, FrameReader()
        if self.hello is not None:
            sock.sendall(frame(0, HELLO, self.hello))

    def send(self, body: bytes, *, timeout_s: float | None = None) -> tuple[int, bytes]:
        """Send one encoded ``InferRequest``; returns (status, body) as ``POST /v1/infer`` would.

        ``timeout_s`` (default: the client's) bounds the wait for the answer, from sending.
        """
        wait = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait  # a re-sent query gets what is left, not more
        for attempt in range(2):
            fresh = self._sock is None
            self.connect()
            sock = self._sock
            assert sock is not None
            try:
                request_id = next(self._ids) & 0xFFFFFFFF
                sock.settimeout(max(deadline - time.monotonic(), 1e-6))
                sock.sendall(frame(request_id, INFER, body))
                return self._receive(sock, request_id, deadline)
            except TimeoutError:
                self.close()
                raise MeshTimeout(f"no answer from {self.host}:{self.port} within "
                                  f"{wait:g} s") from None
            except (OSError, MeshConnectionError) as exc:
                self.close()
                if fresh or attempt == 1:
                    raise MeshConnectionError(f"cannot reach {self.host}:{self.port}: {exc}"
                                              ) from None
        raise AssertionError("unreachable")

    def _receive(self, sock: socket.socket, request_id: int, deadline: float
                 ) -> tuple[int, bytes]:
        while True:
            # a node trickling bytes must not stretch the wait past the deadline
            sock.settimeout(max(deadline - time.monotonic(), 1e-6))
            data = sock.recv(256 * 1024)
            if not data:
                raise MeshConnectionError("the node closed the stream")
            try:
                frames = self._reader.feed(data)
            except InvalidInput as exc:
                raise MeshConnectionError(f"stream broken: {exc.message}") from None
            for got_id, kind, payload in frames:
                if got_id == request_id:
                    return frame_answer(kind, payload)


def client_hello(authorization: str) -> bytes:
    """The HELLO payload a client opens its streams with: its ``Authorization`` (on a mesh
    with tenants, ``Bearer <API key>``), for every query on the connection."""
    return pack({"authorization": authorization})
