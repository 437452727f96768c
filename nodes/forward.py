"""How a node reaches its neighbours: one persistent msgpack stream each, HTTP otherwise.

A neighbour with a stream address (``AgentConfig.stream_neighbours``, in the
testbed a link-emulator port in front of the neighbour's stream port) gets
one multiplexed :class:`~mesh.stream.StreamClient` that is connected on first
use and again after it is lost; every query forwarded to that neighbour
shares it. A neighbour without one is reached by ``POST /v1/infer`` on the
agent's aiohttp session. Either way :meth:`Neighbours.post` returns the
answer as (status, body) for :func:`mesh.wire.decode_answer`, and raises
:class:`HopFailed` when the neighbour itself could not carry the query (so
the agent marks it down), never for an error the neighbour answered with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import aiohttp

from mesh.errors import MeshConnectionError
from mesh.stream import StreamClient

__all__ = ["HopFailed", "Neighbours"]

MSGPACK = "application/msgpack"


class HopFailed(Exception):
    """The next hop could not be reached, or dropped the query without answering."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Neighbours:
    """The ways to a node's neighbours. An async context manager that closes its streams."""

    def __init__(self, urls: Mapping[str, str], stream_urls: Mapping[str, str], *,
                 http: Callable[[], aiohttp.ClientSession | None], timeout_s: float,
                 headers: Mapping[str, str] | None = None, hello: bytes | None = None) -> None:
        self.urls = dict(urls)
        self.timeout_s = timeout_s
        self._http = http
        #: sent with every HTTP query: the peer token that lets a neighbour honour its route
        self._headers = {"Content-Type": MSGPACK, **(headers or {})}
        #: neighbour -> its stream client; a ValueError here is a bad run file, found at start
        self.streams = {name: StreamClient.from_url(url, reconnect=True, hello=hello)
                        for name, url in stream_urls.items()}

    def transport(self, hop: str) -> str:
        """``"stream"`` or ``"http"``: how queries to ``hop`` travel."""
        return "stream" if hop in self.streams else "http"

    async def __aenter__(self) -> Neighbours:
        for client in self.streams.values():
            await client.__aenter__()  # with reconnect set this connects nothing yet
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every stream; queries still in flight on them fail. Idempotent."""
        await asyncio.gather(*(client.aclose() for client in self.streams.values()))

    async def post(self, hop: str, body: bytes, timeout_s: float | None = None
                   ) -> tuple[int, bytes]:
        """Send an encoded ``InferRequest`` to ``hop``; raises :class:`HopFailed`.

        ``timeout_s`` (default: the configured one) bounds the whole exchange: a
        neighbour that does not answer in time (frozen, overloaded) counts as failed.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        stream = self.streams.get(hop)
        if stream is not None:
            try:
                async with asyncio.timeout(timeout_s):
                    return await stream.send(body)
            except TimeoutError:
                raise HopFailed(f"no answer within {timeout_s * 1000:.0f} ms") from None
            except MeshConnectionError:
                # the reason travels back to clients in the plan: no addresses, no OS text
                raise HopFailed("the stream to it failed") from None
        session = self._http()
        if session is None:
            raise HopFailed("the node is shutting down")
        try:
            async with session.post(self.urls[hop] + "/v1/infer", data=body,
                                    headers=self._headers,
                                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return resp.status, await resp.read()
        except TimeoutError:
            raise HopFailed(f"no answer within {timeout_s * 1000:.0f} ms") from None
        except aiohttp.ClientError:
            raise HopFailed("it could not be reached over HTTP") from None
