"""The msgpack stream: persistent, multiplexed, length-prefixed frames over one TCP connection.

The hot hop (an SDK or a benchmark to its entry node) without HTTP: on this
kind of machine an HTTP round trip through aiohttp costs ~150-200 us before
any work is done, a framed stream on an asyncio Protocol ~100 us. Every
frame is::

    u32 payload length | u32 request id | u8 kind | payload

big-endian. ``kind`` is :data:`INFER` (payload: an ``InferRequest`` exactly
as ``POST /v1/infer`` takes it), :data:`ANSWER` (an ``InferResponse``) or
:data:`ERROR` (msgpack ``{"status": int, "error": {...}}``, the error's
wire form). Answers carry their request's id and may come back in any
order, so one connection carries many queries at once.

:class:`FrameReader` is the pure decoder both ends share; :class:`StreamClient`
is an asyncio client: ``async with StreamClient(host, port) as c: await
c.infer(request)``.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from typing import Any

from mesh.errors import InvalidInput, MeshConnectionError, PayloadTooLarge, error_from_payload
from mesh.wire import InferRequest, InferResponse, decode_response, encode_request, unpack

__all__ = ["INFER", "ANSWER", "ERROR", "HEADER", "frame", "FrameReader", "StreamClient"]

INFER, ANSWER, ERROR = 1, 2, 3
HEADER = struct.Struct(">IIB")
DEFAULT_MAX_FRAME = 64 * 1024 * 1024


def frame(request_id: int, kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), request_id, kind) + payload


class FrameReader:
    """Accumulates bytes; :meth:`feed` returns the complete frames as (id, kind, payload)."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Raises :class:`PayloadTooLarge` for a frame over ``max_frame`` (close the stream)."""
        buf = self._buf
        buf += data
        out = []
        offset = 0
        size = HEADER.size
        while len(buf) - offset >= size:
            length, request_id, kind = HEADER.unpack_from(buf, offset)
            if length > self.max_frame:
                raise PayloadTooLarge(f"frame of {length} bytes; this end accepts at most "
                                      f"{self.max_frame}")
            end = offset + size + length
            if len(buf) < end:
                break
            out.append((request_id, kind, bytes(buf[offset + size:end])))
            offset = end
        if offset:
            del buf[:offset]
        return out


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, client: StreamClient) -> None:
        self.client = client
        self.reader = FrameReader()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except InvalidInput as exc:
            self.client._fail_all(MeshConnectionError(f"stream broken: {exc.message}"))
            return
        for request_id, kind, payload in frames:
            self.client._resolve(request_id, kind, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._fail_all(MeshConnectionError("the node closed the stream"))


class StreamClient:
    """One persistent multiplexed connection to a node's stream port. An async context manager."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._ids = itertools.count(1)

    async def __aenter__(self) -> StreamClient:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(lambda: _ClientProtocol(self),
                                                        self.host, self.port)
        except OSError as exc:
            raise MeshConnectionError(f"cannot reach {self.host}:{self.port}: {exc}") from None
        self._transport = transport  # type: ignore[assignment]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._fail_all(MeshConnectionError("stream closed"))

    async def infer(self, req: InferRequest) -> InferResponse:
        """Send one query; raises the :mod:`mesh.errors` class the node answered with."""
        if self._transport is None or self._transport.is_closing():
            raise MeshConnectionError("stream is not open; use 'async with StreamClient(...)'")
        request_id = next(self._ids) & 0xFFFFFFFF
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._transport.write(frame(request_id, INFER, encode_request(req)))
        try:
            kind, payload = await future
        finally:
            self._pending.pop(request_id, None)
        if kind == ANSWER:
            return decode_response(payload)
        body: Any = unpack(payload)
        raise error_from_payload(int(body.get("status", 500)), body)

    def _resolve(self, request_id: int, kind: int, payload: bytes) -> None:
        future = self._pending.get(request_id)
        if future is not None and not future.done():
            future.set_result((kind, payload))

    def _fail_all(self, exc: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()
