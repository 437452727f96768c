"""The agent's msgpack stream port: the framed protocol of :mod:`mesh.stream`, served.

A thin adapter like the HTTP handlers: each INFER frame is decoded, handed to
:meth:`NodeAgent.infer` in its own task (so one connection carries many
queries at once) and answered with an ANSWER or ERROR frame carrying the same
request id. A connection may have ``max_in_flight`` queries open; more are
answered :class:`~mesh.errors.Overloaded` at once. A frame larger than the
node's body limit closes the connection. Every task is tracked, and cancelled
and awaited when the server stops.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mesh.errors import Forbidden, InvalidInput, MeshError, Overloaded
from mesh.stream import ANSWER, ERROR, HELLO, INFER, FrameReader, frame
from mesh.wire import decode_request, encode_response, pack
from nodes.agent import NodeAgent

__all__ = ["StreamServer"]

log = logging.getLogger("tiermesh.stream")


def _error_frame(request_id: int, error: MeshError) -> bytes:
    body: dict[str, Any] = {"status": error.status, "error": error.to_payload()}
    return frame(request_id, ERROR, pack(body))


class _Connection(asyncio.Protocol):
    def __init__(self, server: StreamServer) -> None:
        self.server = server
        self.reader = FrameReader(server.agent.config.max_body_bytes)
        self.open: set[asyncio.Task[None]] = set()
        self.transport: asyncio.Transport | None = None
        #: the mesh node this connection proved to come from (a HELLO frame); None: a client
        self.peer: str | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            frames = self.reader.feed(data)
        except MeshError as exc:
            self.transport.write(_error_frame(0, exc))
            self.transport.close()
            return
        for request_id, kind, payload in frames:
            if kind == HELLO:
                self.peer = self.server.agent.peers.peer_of_hello(payload)
                if self.peer is None:
                    self.transport.write(_error_frame(request_id, Forbidden(
                        "HELLO: not a node of this mesh (bad token); clients send INFER only")))
                    self.transport.close()
                    return
            elif kind != INFER:
                self.transport.write(_error_frame(request_id, InvalidInput(
                    f"frame kind {kind}: a node accepts only INFER ({INFER}) frames")))
            elif len(self.open) >= self.server.max_in_flight:
                self.transport.write(_error_frame(request_id, Overloaded(
                    f"{len(self.open)} queries already open on this connection; retry shortly",
                    retry_after_s=0.05)))
            else:
                task = asyncio.get_running_loop().create_task(self._serve(request_id, payload))
                self.open.add(task)
                self.server.tasks.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.open.discard(task)
        self.server.tasks.discard(task)

    async def _serve(self, request_id: int, payload: bytes) -> None:
        agent = self.server.agent
        try:
            req = decode_request(payload, max_elements=agent.config.max_elements)
            out = frame(request_id, ANSWER, encode_response(
                await agent.infer(req, from_client=self.peer is None)))
        except MeshError as exc:
            out = _error_frame(request_id, exc)
        except Exception:  # the connection and the node keep serving
            log.exception("unhandled error serving a stream query")
            out = _error_frame(request_id, MeshError("internal error on this node; it has been logged"))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self.open:
            task.cancel()
        self.transport = None
        self.server.connections.discard(self)


class StreamServer:
    """Serves one agent on a stream port. An async context manager; ``port`` is set once open."""

    #: Queries one connection may have open at once.
    max_in_flight: int = 1024

    def __init__(self, agent: NodeAgent, host: str, port: int) -> None:
        self.agent = agent
        self.host = host
        self.port = port
        self.tasks: set[asyncio.Task[None]] = set()
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> StreamServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), self.host, self.port,
                                                reuse_address=True)
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
