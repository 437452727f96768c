"""How a node reaches its neighbours: one :class:`~mesh.transport.Transport` each.

A neighbour with a stream address (``AgentConfig.stream_neighbours``, in the
testbed a link-emulator port in front of the neighbour's stream port) is
reached over one persistent msgpack stream, opened with the node's HELLO
(:mod:`nodes.peers`) and made again after it is lost; every query forwarded
to it shares that stream. A neighbour without one is reached by ``POST
/v1/infer`` carrying the node's peer token. With TLS (``ssl``, the node's
client context from :class:`mesh.certs.TlsFiles`) both go over mutual TLS
and the node's certificate proves who it is: no token, no HELLO. A TLS stream
is opened ahead of the first query and again soon after it is lost
(``warm_interval_s``), so that queries do not wait for a handshake. Tests hand in their own
transports (:class:`~mesh.transport.MemoryTransport` wired to another agent),
with no sockets at all.

:meth:`Neighbours.post` returns the answer as (status, body) for
:func:`mesh.wire.decode_answer`, and raises :class:`HopFailed` when the
neighbour itself could not carry the query (so the agent marks it down),
never for an error the neighbour answered with.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import Mapping

from mesh.errors import MeshConnectionError, MeshTimeout
from mesh.transport import HttpTransport, StreamTransport, Transport
from nodes.tasks import cancel_all

__all__ = ["HopFailed", "Neighbours"]


class HopFailed(Exception):
    """The next hop could not be reached, or dropped the query without answering.

    ``timed_out``: it did not answer within the time the query could give it (it may be
    frozen, or only busy: a load signal as much as a failure)."""

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


class Neighbours:
    """The ways to a node's neighbours. An async context manager that closes them."""

    #: With TLS, how often streams to neighbours that are not open are opened, ahead of
    #: queries: a handshake costs round trips a query's latency budget may not have.
    warm_interval_s: float = 1.0

    def __init__(self, urls: Mapping[str, str], stream_urls: Mapping[str, str], *,
                 timeout_s: float, headers: Mapping[str, str] | None = None,
                 hello: bytes | None = None,
                 transports: Mapping[str, Transport] | None = None,
                 ssl: _ssl.SSLContext | None = None) -> None:
        self.urls = dict(urls)
        self.timeout_s = timeout_s
        self._warm: asyncio.Task[None] | None = None
        self._streams: list[StreamTransport] = []
        given = dict(transports or {})
        #: neighbour -> its transport; a ValueError here is a bad run file, found at start
        self.transports: dict[str, Transport] = {}
        self.kinds: dict[str, str] = {}
        for name in sorted(set(urls) | set(given)):
            if name in given:
                self.transports[name], self.kinds[name] = given[name], "memory"
            elif name in stream_urls:
                stream = StreamTransport(stream_urls[name], hello=hello, ssl=ssl,
                                         connect_timeout_s=min(timeout_s, 1.0))
                self.transports[name], self.kinds[name] = stream, "stream"
                if ssl is not None:
                    self._streams.append(stream)
            else:
                self.transports[name] = HttpTransport(urls[name], headers=headers, ssl=ssl)
                self.kinds[name] = "http"

    def transport(self, hop: str) -> str:
        """``"stream"``, ``"http"`` or ``"memory"``: how queries to ``hop`` travel."""
        return self.kinds.get(hop, "http")

    async def __aenter__(self) -> Neighbours:
        if self._streams:
            self._warm = asyncio.create_task(self._keep_open(), name="neighbour streams")
        return self

    async def _keep_open(self) -> None:
        while True:
            # a neighbour not up yet (or gone) is simply tried again; queries decide it is down
            await asyncio.gather(*(s.connect() for s in self._streams if not s.connections),
                                 return_exceptions=True)
            await asyncio.sleep(self.warm_interval_s)

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every transport; queries still in flight on them fail. Idempotent."""
        await cancel_all([self._warm])
        self._warm = None
        await asyncio.gather(*(t.aclose() for t in self.transports.values()))

    async def post(self, hop: str, body: bytes, timeout_s: float | None = None
                   ) -> tuple[int, bytes]:
        """Send an encoded ``InferRequest`` to ``hop``; raises :class:`HopFailed`.

        ``timeout_s`` (default: the configured one) bounds the whole exchange: a
        neighbour that does not answer in time (frozen, overloaded) counts as failed.
        The reason travels back to clients in the plan: no addresses, no OS text.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        transport = self.transports.get(hop)
        if transport is None:
            raise HopFailed("it is not a neighbour of this node")
        try:
            return await transport.send(body, timeout_s=timeout_s,
                                        connect_timeout_s=min(timeout_s, 1.0))
        except MeshTimeout:
            raise HopFailed(f"no answer within {timeout_s * 1000:.0f} ms",
                            timed_out=True) from None
        except MeshConnectionError:
            raise HopFailed(f"it could not be reached over {self.transport(hop)}") from None
