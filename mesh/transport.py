"""One seam for "send an encoded query, get (status, body) back", as ``POST /v1/infer`` answers.

The SDK sends to its entry nodes and every node forwards to its neighbours
through a :class:`Transport` (asyncio) or a :class:`BlockingTransport`; which
one carries the bytes is decided once, from the URL, by
:func:`transport_for`::

    http://HOST:PORT    HttpTransport       POST /v1/infer (aiohttp / http.client)
    https://HOST:PORT   HttpTransport       the same over TLS
    tcp://HOST:PORT     StreamTransport     the msgpack stream (mesh.stream)
    (tests)             MemoryTransport     an async function, in this process

Every socket transport takes ``ssl=`` (an :class:`ssl.SSLContext`): then it
speaks TLS whatever the URL's scheme says (``http://`` becomes ``https://``),
which is how nodes reach each other off loopback (:mod:`mesh.certs`, mutual
TLS) and how a client reaches a node that serves TLS. Without it, ``https://``
URLs use the system's trust store and everything else is plain TCP.

Every implementation answers the same way: ``(status, body)`` where a 200
body is an encoded ``InferResponse`` and any other body the error's wire form
(:func:`mesh.wire.decode_answer` turns both back into objects). Failures of
the transport itself raise :class:`~mesh.errors.MeshConnectionError` (could
not connect, connection lost: the query may not have arrived) or
:class:`~mesh.errors.MeshTimeout` (no answer within ``timeout_s`` of sending).
``connect_timeout_s`` bounds opening a connection, where there is one to open.

A transport holds at most one connection (a kept-alive HTTP connection, one
multiplexed stream) and is closed with ``aclose()`` / ``close()``.
"""

from __future__ import annotations

import asyncio
import http.client
import ssl as _ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

from mesh.errors import ClientError, MeshConnectionError, MeshTimeout
from mesh.stream import SCHEME as STREAM_SCHEME
from mesh.stream import BlockingStream, StreamClient

__all__ = ["Transport", "BlockingTransport", "HttpTransport", "StreamTransport",
           "MemoryTransport", "BlockingHttpTransport", "BlockingStreamTransport",
           "BlockingMemoryTransport", "transport_for", "blocking_transport_for", "parse_url",
           "MSGPACK"]

MSGPACK = "application/msgpack"
INFER_PATH = "/v1/infer"

Answer = tuple[int, bytes]
Handler = Callable[[bytes], Awaitable[Answer]]


class Transport(Protocol):
    """Carries encoded queries to one node (asyncio)."""

    async def send(self, body: bytes, *, timeout_s: float,
                   connect_timeout_s: float | None = None) -> Answer: ...

    async def aclose(self) -> None: ...


class BlockingTransport(Protocol):
    """Carries encoded queries to one node, one at a time (blocking)."""

    def send(self, body: bytes, *, timeout_s: float,
             connect_timeout_s: float | None = None) -> Answer: ...

    def close(self) -> None: ...


def parse_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of a node URL; raises :class:`ClientError`.

    The scheme is ``http``, ``https`` or ``tcp`` (the stream).
    """
    parts = urlsplit(url if "://" in url else f"http://{url}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme == STREAM_SCHEME and parts.hostname and port and parts.path in ("", "/"):
        return STREAM_SCHEME, parts.hostname, port, ""
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientError(f"URL {url!r}: expected http://HOST:PORT (or https://), or "
                          f"{STREAM_SCHEME}://HOST:PORT for a node's stream port")
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, parts.hostname, port or default, parts.path.rstrip("/")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --------------------------------------------------------------------------- asyncio


class HttpTransport:
    """``POST /v1/infer`` with aiohttp. Uses ``session`` when given (not closed here).

    ``ssl``: speak TLS with this context (an ``http://`` URL is reached as ``https://``).
    """

    def __init__(self, url: str, *, headers: Mapping[str, str] | None = None,
                 session: Any = None, ssl: _ssl.SSLContext | None = None) -> None:
        scheme, host, port, prefix = parse_url(url)
        scheme = "https" if ssl is not None else scheme
        self.url = f"{scheme}://{_host(host)}:{port}{prefix}{INFER_PATH}"
        self._headers = {"Content-Type": MSGPACK, **(headers or {})}
        self._session = session
        self._own = session is None
        self._ssl: _ssl.SSLContext | bool = ssl if ssl is not None else True

    async def send(self, body: bytes, *, timeout_s: float,
                   connect_timeout_s: float | None = None) -> Answer:
        import aiohttp  # the blocking SDK must not pay aiohttp's import

        if self._session is None:
            self._session = aiohttp.ClientSession()
        # connecting has its own bound; the answer must start within timeout_s of sending
        # (sock_read), and the backstop covers a body that trickles in
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s,
                                        sock_read=timeout_s)
        try:
            async with asyncio.timeout(timeout_s + (connect_timeout_s or 0.0)):
                async with self._session.post(self.url, data=body, headers=self._headers,
                                              timeout=timeout, ssl=self._ssl) as resp:
                    return resp.status, await resp.read()
        except aiohttp.ConnectionTimeoutError:  # before TimeoutError: it is one too
            raise MeshConnectionError(f"no connection within {connect_timeout_s:.3g} s"
                                      ) from None
        except TimeoutError:
            raise MeshTimeout(f"no answer within {timeout_s:.3g} s") from None
        except aiohttp.ClientError as exc:
            raise MeshConnectionError(_reason(exc)) from None

    async def aclose(self) -> None:
        if self._own and self._session is not None:
            await self._session.close()
        self._session = None


class StreamTransport:
    """The msgpack stream: one persistent connection, made again after it is lost."""

    def __init__(self, url: str, *, hello: bytes | None = None,
                 connect_timeout_s: float | None = None,
                 ssl: _ssl.SSLContext | None = None) -> None:
        self.client = StreamClient.from_url(url, reconnect=True, hello=hello,
                                            connect_timeout_s=connect_timeout_s, ssl=ssl)
        self._opened = False

    async def connect(self) -> None:
        """Open the stream now unless it is open (ahead of queries: a TLS handshake costs
        round trips). Raises :class:`MeshConnectionError`."""
        if not self._opened:
            await self.client.__aenter__()
            self._opened = True
        await self.client.connect()

    async def send(self, body: bytes, *, timeout_s: float,
                   connect_timeout_s: float | None = None) -> Answer:
        if not self._opened:
            await self.client.__aenter__()  # with reconnect set this connects nothing yet
            self._opened = True
        if connect_timeout_s is not None:
            self.client.connect_timeout_s = connect_timeout_s
        return await self.client.send(body, timeout_s=timeout_s)

    async def aclose(self) -> None:
        await self.client.aclose()

    @property
    def connections(self) -> int:
        """1 while the stream is connected, else 0."""
        return 1 if self.client.connected else 0


class MemoryTransport:
    """Calls ``handler(body) -> (status, body)`` in this process: no socket, no process.

    ``handler`` may raise :class:`MeshConnectionError` or sleep, to stand for a node
    that cannot be reached or does not answer; ``timeout_s`` is enforced as on a socket.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.sent = 0

    async def send(self, body: bytes, *, timeout_s: float,
                   connect_timeout_s: float | None = None) -> Answer:
        self.sent += 1
        try:
            async with asyncio.timeout(timeout_s):
                return await self.handler(body)
        except TimeoutError:
            raise MeshTimeout(f"no answer within {timeout_s:.3g} s") from None

    async def aclose(self) -> None:
        return None


def transport_for(url: str, *, headers: Mapping[str, str] | None = None,
                  hello: bytes | None = None, session: Any = None,
                  connect_timeout_s: float | None = None,
                  ssl: _ssl.SSLContext | None = None) -> Transport:
    """The transport a URL names: ``tcp://`` the stream (``hello`` opens it), else HTTP.

    ``ssl``: both over TLS with this context.
    """
    if parse_url(url)[0] == STREAM_SCHEME:
        return StreamTransport(url, hello=hello, connect_timeout_s=connect_timeout_s, ssl=ssl)
    return HttpTransport(url, headers=headers, session=session, ssl=ssl)


# --------------------------------------------------------------------------- blocking


class BlockingHttpTransport:
    """``POST /v1/infer`` on one kept-alive ``http.client`` connection. Not thread-safe.

    ``ssl``: over TLS with this context (an ``https://`` URL without one: the system's CAs).
    """

    def __init__(self, url: str, *, headers: Mapping[str, str] | None = None,
                 ssl: _ssl.SSLContext | None = None) -> None:
        scheme, self.host, self.port, prefix = parse_url(url)
        self.ssl = ssl if ssl is not None or scheme != "https" else \
            _ssl.create_default_context()
        self.path = prefix + INFER_PATH
        self._headers = {"Content-Type": MSGPACK, "Accept": MSGPACK, **(headers or {})}
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def send(self, body: bytes, *, timeout_s: float,
             connect_timeout_s: float | None = None) -> Answer:
        deadline = time.monotonic() + timeout_s
        for retry in range(2):  # a kept-alive socket the server closed is retried once
            fresh = self._conn is None
            if self._conn is None:
                wait = connect_timeout_s or timeout_s
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=wait) \
                    if self.ssl is None else \
                    http.client.HTTPSConnection(self.host, self.port, timeout=wait,
                                                context=self.ssl)
            try:
                if self._conn.sock is None:
                    self._conn.connect()
            except TimeoutError:
                self.close()
                raise MeshConnectionError(f"no connection within {connect_timeout_s:.3g} s"
                                          ) from None
            except OSError as exc:
                self.close()
                raise MeshConnectionError(_reason(exc)) from None
            assert self._conn.sock is not None
            self._conn.sock.settimeout(max(deadline - time.monotonic(), 1e-6))
            try:
                self._conn.request("POST", self.path, body=body, headers=self._headers)
                resp = self._conn.getresponse()
                return resp.status, resp.read()
            except TimeoutError:
                self.close()
                raise MeshTimeout(f"no answer within {timeout_s:.3g} s") from None
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.close()
                if fresh or retry == 1:
                    raise MeshConnectionError(_reason(exc)) from None
        raise AssertionError("unreachable")


class BlockingStreamTransport:
    """The msgpack stream, blocking: one query at a time on one kept connection."""

    def __init__(self, url: str, *, ssl: _ssl.SSLContext | None = None,
                 hello: bytes | None = None) -> None:
        _, host, port, _ = parse_url(url)
        self.stream = BlockingStream(host, port, timeout_s=30.0, ssl=ssl, hello=hello)

    def close(self) -> None:
        self.stream.close()

    def send(self, body: bytes, *, timeout_s: float,
             connect_timeout_s: float | None = None) -> Answer:
        try:
            self.stream.connect(connect_timeout_s)
            return self.stream.send(body, timeout_s=timeout_s)
        except MeshTimeout:
            raise MeshTimeout(f"no answer within {timeout_s:.3g} s") from None


class BlockingMemoryTransport:
    """Calls ``handler(body) -> (status, body)`` in this thread (tests)."""

    def __init__(self, handler: Callable[[bytes], Answer]) -> None:
        self.handler = handler
        self.sent = 0

    def send(self, body: bytes, *, timeout_s: float,
             connect_timeout_s: float | None = None) -> Answer:
        self.sent += 1
        return self.handler(body)

    def close(self) -> None:
        return None


def blocking_transport_for(url: str, *, headers: Mapping[str, str] | None = None,
                           hello: bytes | None = None,
                           ssl: _ssl.SSLContext | None = None) -> BlockingTransport:
    """The blocking transport a URL names; ``ssl``: over TLS with this context."""
    if parse_url(url)[0] == STREAM_SCHEME:
        return BlockingStreamTransport(url, ssl=ssl, hello=hello)
    return BlockingHttpTransport(url, headers=headers, ssl=ssl)


def _reason(exc: BaseException) -> str:
    """What went wrong with a connection, in words (no exception class names)."""
    return str(exc).strip() or "the connection failed"
