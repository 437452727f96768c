"""The device SDK: send a task and its inputs; the mesh picks model, variant and node.

::

    from mesh import Client
    with Client("http://127.0.0.1:7101") as mesh:
        r = mesh.infer("digits", images, latency_ms=20, min_accuracy=0.95)
    r.outputs[0], r.served_by, r.latency_ms, r.slo_met

:class:`AsyncClient` is the same API for asyncio code. An entry URL is either
``http://HOST:PORT`` (``POST /v1/infer``, the default) or ``tcp://HOST:PORT``,
the node's msgpack stream port (:mod:`mesh.stream`: one persistent connection,
no HTTP, the same answers and errors). Errors the mesh sends come back as the
matching :mod:`mesh.errors` class.

Timeouts and failover (both clients, one rule set in :mod:`mesh.failover`).
Pass several entry URLs, of either kind, to survive an entry node that is
down or frozen. Each query has an overall deadline, ``timeout_s`` (30 s).
Each entry gets ``connect_timeout_s`` (1 s) to accept a connection and then,
while other entries are left to try, a first-answer timeout: what is left of
the query's ``latency_ms`` (at least 0.5 s), or ``attempt_timeout_s`` (5 s)
for a query without one; the last entry left may use whatever remains of the
deadline. An entry that cannot be reached or does not answer in time is
skipped for the next one, and later queries start past it. The query carries
its attempt's timeout as ``timeout_ms``, so nodes give up on their own hops
before the client gives up on them. When every entry failed or the deadline
passed the client raises :class:`~mesh.errors.MeshTimeout` (also a
``TimeoutError``) if an entry was too slow, else
:class:`~mesh.errors.MeshConnectionError` (also a ``ConnectionError``); the
message names every entry tried.

``Result.slo_met`` is True only when the whole SLO was met by what actually
served the query: the latency measured here, from the first attempt to the
answer (unless ``offline``), the measured accuracy of the variant named in
``served_by`` (unknown counts as not met when ``min_accuracy`` was asked), and
a mesh that did not say it answered outside the SLO (``plan["feasible"]``).
"""

from __future__ import annotations

import asyncio
import http.client
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from mesh.errors import ClientError, InvalidInput, MeshConnectionError, MeshTimeout
from mesh.failover import Attempt, Failover, Timeouts, rotate_past
from mesh.stream import SCHEME as STREAM_SCHEME
from mesh.stream import BlockingStream, StreamClient
from mesh.wire import SLO, InferRequest, ServedBy, decode_answer, encode_request

__all__ = ["Result", "Client", "AsyncClient", "Timeouts", "slo_met", "served_accuracy"]

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
    #: What served the query and why: node, tier, variant, its accuracy, the predicted
    #: latency split, feasibility (False: knowingly answered outside the SLO), reason.
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
        """Measured held-out accuracy of the variant that answered (``served_by.variant``);
        None when the answer does not say."""
        return served_accuracy(self.served_by, self.plan)


def served_accuracy(served_by: ServedBy, plan: Mapping[str, Any]) -> float | None:
    """The accuracy in ``plan`` if it is the served variant's, else None (unknown)."""
    value = plan.get("accuracy")
    if plan.get("variant") != served_by.variant:
        return None  # a plan for another variant says nothing about this one
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def slo_met(slo: SLO, latency_ms: float, served_by: ServedBy, plan: Mapping[str, Any]) -> bool:
    """Whether an answer met ``slo``: latency here, accuracy of what served, the mesh's word."""
    if plan.get("feasible") is False:  # the mesh knowingly answered outside the SLO
        return False
    if slo.latency_ms is not None and not slo.offline and latency_ms > slo.latency_ms:
        return False
    if slo.min_accuracy is not None:
        accuracy = served_accuracy(served_by, plan)
        if accuracy is None or accuracy < slo.min_accuracy:
            return False
    return True


def _slo(latency_ms: float | None, min_accuracy: float | None, max_cost_per_1k: float | None,
         offline: bool, policy: str, min_confidence: float | None, allow_degraded: bool) -> SLO:
    # One validating path, the node's own (values as given, so offline="yes" is refused
    # here rather than sent as true): a bad SLO fails before anything is sent.
    return SLO.from_wire({"latency_ms": latency_ms, "min_accuracy": min_accuracy,
                          "max_cost_per_1k": max_cost_per_1k, "offline": offline,
                          "policy": policy, "min_confidence": min_confidence,
                          "allow_degraded": allow_degraded})


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
    met = slo_met(slo, latency_ms, resp.served_by, resp.plan)
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
    """Blocking client over a kept-alive HTTP connection, or a stream. Not thread-safe.

    Raises :class:`ClientError` at once for a bad URL or timeout; see the module
    docstring for how the timeouts and failover work.
    """

    def __init__(self, url: str | Sequence[str], *, timeout_s: float = 30.0,
                 connect_timeout_s: float = 1.0, attempt_timeout_s: float = 5.0) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ClientError("Client needs at least one entry URL")
        self._entries = [_split(u) for u in urls]
        self._urls = urls
        self.timeouts = Timeouts(timeout_s, connect_timeout_s, attempt_timeout_s)
        self._conn: http.client.HTTPConnection | None = None
        self._stream: BlockingStream | None = None
        self._open = -1  # the entry self._conn or self._stream is connected to
        self._current = 0  # the entry the next query tries first

    @property
    def timeout_s(self) -> float:
        return self.timeouts.total_s

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
        self._open = -1

    def infer(self, task: str, *inputs: Any, latency_ms: float | None = None,
              min_accuracy: float | None = None, max_cost_per_1k: float | None = None,
              offline: bool = False, policy: str = "cheapest",
              request_id: str | None = None, min_confidence: float | None = None,
              allow_degraded: bool = False) -> Result:
        slo = _slo(latency_ms, min_accuracy, max_cost_per_1k, offline, policy, min_confidence,
                   allow_degraded)
        req = _request(task, inputs, slo, request_id)
        started = time.perf_counter()
        failover = Failover(len(self._entries), self._current, slo, self.timeouts,
                            time.monotonic())
        while (attempt := failover.next(time.monotonic())) is not None:
            req.timeout_ms = attempt.timeout_ms
            try:
                status, data = self._send(attempt, encode_request(req))
            except ClientError as exc:
                failover.failed(exc)
                self._current = rotate_past(self._current, attempt.index, len(self._entries))
                continue
            return _result(status, data, slo, (time.perf_counter() - started) * 1000)
        raise failover.error()

    def _send(self, attempt: Attempt, body: bytes) -> tuple[int, bytes]:
        """One attempt at one entry; raises MeshConnectionError or MeshTimeout naming it."""
        scheme, host, port, prefix = self._entries[attempt.index]
        url = self._urls[attempt.index]
        if self._open != attempt.index:  # one open connection at a time, to the entry in use
            self.close()
        self._open = attempt.index
        if scheme == STREAM_SCHEME:
            if self._stream is None:
                self._stream = BlockingStream(host, port, timeout_s=self.timeouts.total_s,
                                              connect_timeout_s=self.timeouts.connect_s)
            wait = attempt.timeout_s
            try:
                self._stream.connect(attempt.connect_s)
                wait = attempt.answer_timeout(time.monotonic())
                return self._stream.send(body, timeout_s=wait)
            except MeshConnectionError as exc:
                self.close()
                raise MeshConnectionError(f"cannot reach entry node {url}: {exc.message}"
                                          ) from None
            except MeshTimeout:
                self.close()
                raise MeshTimeout(f"no answer from {url} within {wait:.3g} s") from None
        for retry in range(2):  # a kept-alive socket the server closed is retried once
            fresh = self._conn is None
            if self._conn is None:
                self._conn = http.client.HTTPConnection(host, port, timeout=attempt.connect_s)
            try:
                if self._conn.sock is None:
                    self._conn.connect()
            except TimeoutError:
                self.close()
                raise MeshConnectionError(f"cannot reach entry node {url}: no connection within "
                                          f"{attempt.connect_s:.3g} s") from None
            except OSError as exc:
                self.close()
                raise MeshConnectionError(f"cannot reach entry node {url}: {exc}") from None
            wait = attempt.answer_timeout(time.monotonic())
            self._conn.sock.settimeout(wait)
            try:
                self._conn.request("POST", prefix + "/v1/infer", body=body,
                                   headers={"Content-Type": MSGPACK, "Accept": MSGPACK})
                resp = self._conn.getresponse()
                return resp.status, resp.read()
            except TimeoutError:
                self.close()
                raise MeshTimeout(f"no answer from {url} within {wait:.3g} s") from None
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.close()
                if fresh or retry == 1:
                    raise MeshConnectionError(f"cannot reach entry node {url}: {exc}") from None
        raise AssertionError("unreachable")


class AsyncClient:
    """asyncio client; use as ``async with AsyncClient(url) as mesh``.

    Same timeouts and failover as :class:`Client` (the module docstring); queries
    may run concurrently.
    """

    def __init__(self, url: str | Sequence[str], *, timeout_s: float = 30.0,
                 connect_timeout_s: float = 1.0, attempt_timeout_s: float = 5.0) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ClientError("AsyncClient needs at least one entry URL")
        self._streaming = [_split(u)[0] == STREAM_SCHEME for u in urls]
        self._urls = [u if "://" in u else f"http://{u}" for u in urls]
        self.timeouts = Timeouts(timeout_s, connect_timeout_s, attempt_timeout_s)
        self._session: Any = None
        #: entry index -> its stream, connected on first use and again after it is lost
        self._streams: dict[int, StreamClient] = {}
        self._state = "unopened"
        self._current = 0

    @property
    def timeout_s(self) -> float:
        return self.timeouts.total_s

    async def __aenter__(self) -> AsyncClient:
        import aiohttp  # the sync client must not need aiohttp's import cost

        if self._state != "unopened":
            raise ClientError(f"AsyncClient cannot be opened twice (it is {self._state})")
        # each attempt sets its own timeouts; this is only the backstop
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeouts.total_s))
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

    async def infer(self, task: str, *inputs: Any, latency_ms: float | None = None,
                    min_accuracy: float | None = None, max_cost_per_1k: float | None = None,
                    offline: bool = False, policy: str = "cheapest",
                    request_id: str | None = None, min_confidence: float | None = None,
                    allow_degraded: bool = False) -> Result:
        if self._state != "opened":
            raise ClientError(f"AsyncClient is {self._state}; use 'async with AsyncClient(...)'")
        slo = _slo(latency_ms, min_accuracy, max_cost_per_1k, offline, policy, min_confidence,
                   allow_degraded)
        req = _request(task, inputs, slo, request_id)
        started = time.perf_counter()
        failover = Failover(len(self._urls), self._current, slo, self.timeouts,
                            time.monotonic())
        while (attempt := failover.next(time.monotonic())) is not None:
            req.timeout_ms = attempt.timeout_ms
            try:
                status, data = await self._send(attempt, encode_request(req))
            except ClientError as exc:
                failover.failed(exc)
                self._current = rotate_past(self._current, attempt.index, len(self._urls))
                continue
            return _result(status, data, slo, (time.perf_counter() - started) * 1000)
        raise failover.error()

    async def _send(self, attempt: Attempt, body: bytes) -> tuple[int, bytes]:
        """One attempt at one entry; raises MeshConnectionError or MeshTimeout naming it."""
        import aiohttp

        url = self._urls[attempt.index]
        # never past the attempt's connect + answer time, nor past the query's deadline
        limit = min(attempt.connect_s + attempt.timeout_s, attempt.deadline - time.monotonic())
        try:
            async with asyncio.timeout(limit):
                if self._streaming[attempt.index]:
                    return await self._stream_send(attempt, body)
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=attempt.connect_s,
                                                sock_read=attempt.timeout_s)
                async with self._session.post(url + "/v1/infer", data=body, timeout=timeout,
                                              headers={"Content-Type": MSGPACK}) as resp:
                    return resp.status, await resp.read()
        except aiohttp.ConnectionTimeoutError:  # before TimeoutError: it is one too
            raise MeshConnectionError(f"cannot reach entry node {url}: no connection within "
                                      f"{attempt.connect_s:.3g} s") from None
        except TimeoutError:
            raise MeshTimeout(f"no answer from {url} within {attempt.timeout_s:.3g} s") from None
        except (aiohttp.ClientError, MeshConnectionError) as exc:
            reason = exc.message if isinstance(exc, MeshConnectionError) else exc
            raise MeshConnectionError(f"cannot reach entry node {url}: {reason}") from None

    async def _stream_send(self, attempt: Attempt, body: bytes) -> tuple[int, bytes]:
        stream = self._streams.get(attempt.index)
        if stream is None:
            stream = await StreamClient.from_url(
                self._urls[attempt.index], reconnect=True,
                connect_timeout_s=self.timeouts.connect_s).__aenter__()
            self._streams[attempt.index] = stream
        return await stream.send(body, timeout_s=attempt.timeout_s)
