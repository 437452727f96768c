"""The device SDK: send a task and its inputs; the mesh picks model, variant and node.

::

    from mesh import Client
    with Client("http://127.0.0.1:7101") as mesh:
        r = mesh.infer("digits", images, latency_ms=20, min_accuracy=0.95)
    r.outputs[0], r.served_by, r.latency_ms, r.slo_met

:class:`AsyncClient` is the same API for asyncio code. An entry URL is either
``http://HOST:PORT`` (``POST /v1/infer``, the default) or ``tcp://HOST:PORT``,
the node's msgpack stream port (:mod:`mesh.stream`: one persistent connection,
no HTTP, the same answers and errors). Both accept several entry URLs, of
either kind: when one cannot be reached the next is tried. Errors the mesh
sends come back as the matching :mod:`mesh.errors` class; a node that cannot
be reached raises :class:`~mesh.errors.MeshConnectionError` (also a
``ConnectionError``), a slow one :class:`~mesh.errors.MeshTimeout` (also a
``TimeoutError``).
"""

from __future__ import annotations

import asyncio
import http.client
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from mesh.errors import (
    ClientError,
    InvalidInput,
    MeshConnectionError,
    MeshError,
    MeshTimeout,
)
from mesh.stream import SCHEME as STREAM_SCHEME
from mesh.stream import BlockingStream, StreamClient
from mesh.wire import SLO, InferRequest, ServedBy, decode_answer, encode_request

__all__ = ["Result", "Client", "AsyncClient"]

MSGPACK = "application/msgpack"


@dataclass(frozen=True)
class Result:
    """One answer. ``latency_ms`` is measured here, at the client."""

    outputs: list[np.ndarray]
    served_by: ServedBy
    latency_ms: float
    slo_met: bool
    slo: SLO
    request_id: str
    #: Where the time went, as measured by the nodes: network_ms, queue_ms, compute_ms.
    timing: dict[str, float] = field(default_factory=dict)
    #: The entry node's decision: predicted latency split, accuracy, feasibility, reason.
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> np.ndarray:
        return self.outputs[0]

    @property
    def breakdown(self) -> dict[str, dict[str, float]]:
        """The entry node's predicted latency split next to the measured one.

        ``measured.total_ms`` is this client's clock; the other measured parts are the
        nodes' own account (network, queue, compute).
        """
        predicted = {k: float(v) for k, v in (self.plan.get("predicted") or {}).items()}
        measured = {"total_ms": round(self.latency_ms, 3),
                    **{k: round(v, 3) for k, v in self.timing.items()}}
        return {"predicted": predicted, "measured": measured}

    @property
    def accuracy(self) -> float | None:
        """Measured held-out accuracy of the variant that answered."""
        value = self.plan.get("accuracy")
        return float(value) if isinstance(value, (int, float)) else None


def _slo(latency_ms: float | None, min_accuracy: float | None, max_cost_per_1k: float | None,
         offline: bool, policy: str, min_confidence: float | None = None) -> SLO:
    # Validate here too, so a bad SLO fails before anything is sent.
    return SLO.from_wire(SLO(latency_ms, min_accuracy, max_cost_per_1k, offline, policy,
                             min_confidence).to_wire())


def _request(task: str, inputs: Sequence[Any], slo: SLO, request_id: str | None) -> InferRequest:
    if not inputs:
        raise InvalidInput("infer() needs at least one input tensor")
    tensors = [np.asarray(x) for x in inputs]
    req = InferRequest(task=task, tensors=tensors, slo=slo)
    if request_id is not None:
        req.request_id = request_id
    return req


def _result(status: int, body: bytes, slo: SLO, latency_ms: float) -> Result:
    resp = decode_answer(status, body)
    met = True
    if slo.latency_ms is not None and not slo.offline:
        met = latency_ms <= slo.latency_ms
    accuracy = resp.plan.get("accuracy")
    if slo.min_accuracy is not None and isinstance(accuracy, (int, float)):
        met = met and accuracy >= slo.min_accuracy
    timing = {k: v for k, v in resp.timing.items() if k in ("network_ms", "queue_ms", "compute_ms")}
    return Result(resp.outputs, resp.served_by, latency_ms, met, slo, resp.request_id, timing,
                  resp.plan)


def _split(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of an entry URL; raises :class:`ClientError`."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme == STREAM_SCHEME and parts.hostname and port and parts.path in ("", "/"):
        return STREAM_SCHEME, parts.hostname, port, ""
    if parts.scheme != "http" or not parts.hostname:
        raise ClientError(f"entry URL {url!r}: expected http://HOST:PORT, or "
                          f"{STREAM_SCHEME}://HOST:PORT for a node's stream port")
    return "http", parts.hostname, port or 80, parts.path.rstrip("/")


class Client:
    """Blocking client over a kept-alive HTTP connection, or a stream. Not thread-safe."""

    def __init__(self, url: str | Sequence[str], *, timeout_s: float = 30.0) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ClientError("Client needs at least one entry URL")
        self._entries = [_split(u) for u in urls]
        self._urls = urls
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None
        self._stream: BlockingStream | None = None
        self._current = 0

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def infer(self, task: str, *inputs: Any, latency_ms: float | None = None,
              min_accuracy: float | None = None, max_cost_per_1k: float | None = None,
              offline: bool = False, policy: str = "cheapest",
              request_id: str | None = None, min_confidence: float | None = None) -> Result:
        slo = _slo(latency_ms, min_accuracy, max_cost_per_1k, offline, policy, min_confidence)
        body = encode_request(_request(task, inputs, slo, request_id))
        last: MeshError | None = None
        for _ in range(len(self._entries)):
            started = time.perf_counter()
            try:
                status, data = self._post(body)
            except MeshConnectionError as exc:
                last = exc
                self._current = (self._current + 1) % len(self._entries)
                continue
            return _result(status, data, slo, (time.perf_counter() - started) * 1000)
        assert last is not None
        raise last

    def _post(self, body: bytes) -> tuple[int, bytes]:
        scheme, host, port, prefix = self._entries[self._current]
        if scheme == STREAM_SCHEME:
            if self._conn is not None:  # one open connection at a time, to the current entry
                self.close()
            if self._stream is None:
                self._stream = BlockingStream(host, port, timeout_s=self.timeout_s)
            try:
                return self._stream.send(body)
            except MeshConnectionError as exc:
                self.close()
                raise MeshConnectionError(f"cannot reach entry node {self._urls[self._current]}: "
                                          f"{exc.message}") from None
            except MeshTimeout:
                self.close()
                raise MeshTimeout(f"no answer from {self._urls[self._current]} within "
                                  f"{self.timeout_s} s") from None
        if self._stream is not None:
            self.close()
        for attempt in range(2):  # a kept-alive socket the server closed is retried once
            if self._conn is None:
                self._conn = http.client.HTTPConnection(host, port, timeout=self.timeout_s)
            try:
                self._conn.request("POST", prefix + "/v1/infer", body=body,
                                   headers={"Content-Type": MSGPACK, "Accept": MSGPACK})
                resp = self._conn.getresponse()
                return resp.status, resp.read()
            except TimeoutError:
                self.close()
                raise MeshTimeout(
                    f"no answer from {self._urls[self._current]} within {self.timeout_s} s") from None
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.close()
                if attempt == 1 or isinstance(exc, ConnectionRefusedError):
                    raise MeshConnectionError(
                        f"cannot reach entry node {self._urls[self._current]}: {exc}") from None
        raise AssertionError("unreachable")


class AsyncClient:
    """asyncio client; use as ``async with AsyncClient(url) as mesh``."""

    def __init__(self, url: str | Sequence[str], *, timeout_s: float = 30.0) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ClientError("AsyncClient needs at least one entry URL")
        self._streaming = [_split(u)[0] == STREAM_SCHEME for u in urls]
        self._urls = [u if "://" in u else f"http://{u}" for u in urls]
        self.timeout_s = timeout_s
        self._session: Any = None
        #: entry index -> its stream, connected on first use and again after it is lost
        self._streams: dict[int, StreamClient] = {}
        self._state = "unopened"
        self._current = 0

    async def __aenter__(self) -> AsyncClient:
        import aiohttp  # the sync client must not need aiohttp's import cost

        if self._state != "unopened":
            raise ClientError(f"AsyncClient cannot be opened twice (it is {self._state})")
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self._state = "opened"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        streams, self._streams = list(self._streams.values()), {}
        await asyncio.gather(*(stream.aclose() for stream in streams))
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._state = "closed"

    async def _stream_post(self, index: int, body: bytes) -> tuple[int, bytes]:
        stream = self._streams.get(index)
        if stream is None:
            stream = await StreamClient.from_url(self._urls[index], reconnect=True).__aenter__()
            self._streams[index] = stream
        async with asyncio.timeout(self.timeout_s):
            return await stream.send(body)

    async def infer(self, task: str, *inputs: Any, latency_ms: float | None = None,
                    min_accuracy: float | None = None, max_cost_per_1k: float | None = None,
                    offline: bool = False, policy: str = "cheapest",
                    request_id: str | None = None, min_confidence: float | None = None) -> Result:
        import aiohttp

        if self._state != "opened":
            raise ClientError(f"AsyncClient is {self._state}; use 'async with AsyncClient(...)'")
        slo = _slo(latency_ms, min_accuracy, max_cost_per_1k, offline, policy, min_confidence)
        body = encode_request(_request(task, inputs, slo, request_id))
        last: MeshError | None = None
        start = self._current
        for step in range(len(self._urls)):
            index = (start + step) % len(self._urls)
            url = self._urls[index]
            started = time.perf_counter()
            try:
                if self._streaming[index]:
                    status, data = await self._stream_post(index, body)
                else:
                    async with self._session.post(url + "/v1/infer", data=body,
                                                  headers={"Content-Type": MSGPACK}) as resp:
                        data = await resp.read()
                        status = resp.status
            except TimeoutError:
                raise MeshTimeout(f"no answer from {url} within {self.timeout_s} s") from None
            except (aiohttp.ClientError, MeshConnectionError) as exc:
                reason = exc.message if isinstance(exc, MeshConnectionError) else exc
                last = MeshConnectionError(f"cannot reach entry node {url}: {reason}")
                if self._current == index:  # later queries start from the next entry
                    self._current = (index + 1) % len(self._urls)
                continue
            return _result(status, data, slo, (time.perf_counter() - started) * 1000)
        assert last is not None
        raise last
