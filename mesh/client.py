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
before the client gives up on them. When no attempt is left the client
raises the last error the mesh answered with (``Overloaded``, ``Unavailable``,
... with its ``retry_after_s``) if one did, else
:class:`~mesh.errors.MeshTimeout` (also a ``TimeoutError``) if an entry was
too slow, else :class:`~mesh.errors.MeshConnectionError` (also a
``ConnectionError``); the message names every attempt and why none followed.

Retries (the rules in :mod:`mesh.failover`, :class:`~mesh.failover.RetryPolicy`).
A query whose attempt fails in a way the error calls retryable (unreachable,
no answer in time, 429 ``Overloaded``, 503 ``Unavailable``/``NoRoute``/
``CannotMeetDeadline``, 502) is tried again, on the next entry first, at most
3 attempts in all, after exponential backoff with full jitter (up to 50 ms,
100 ms, ... 1 s), never sooner than the mesh's ``Retry-After`` and never past
the deadline; 4xx errors (bad input, unknown task) are raised at once. Every
attempt carries the same ``request_id`` (pass your own to make it an
idempotency key). Each client keeps a retry budget: retries stay below 20% of
its queries over 10 s, plus 3, so clients cannot multiply the load of a mesh
that is already failing.

On-device answers (:mod:`mesh.device`; off by default). ``on_device=["digits"]``
(or ``True`` for every task) makes the client fetch the task's small device
variant from an entry node while the mesh is reachable (at ``with``/``async
with`` for named tasks, else at a task's first query), verify its sha256, keep
it under ``device_cache_dir`` and load it here. A query for such a task gives
the mesh its budget (``latency_ms``, else ``timeout_s``) less the time the
device needs; when no entry answered by then, or every entry failed, the
device answers: ``served_by`` is ``ServedBy("device", "device", variant)``,
``plan.reason`` says why, and ``slo_met`` weighs the device variant's accuracy.

``Result.slo_met`` is True only when the whole SLO was met by what actually
served the query: the latency measured here, from the first attempt to the
answer (unless ``offline``), the measured accuracy of the variant named in
``served_by`` (unknown counts as not met when ``min_accuracy`` was asked), and
a mesh that did not say it answered outside the SLO (``plan["feasible"]``).
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl as _ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from mesh.device import DeviceVariant, OnDevice
from mesh.errors import (
    AnswerNotFound,
    ClientError,
    InvalidInput,
    MeshConnectionError,
    MeshError,
    MeshTimeout,
    error_from_payload,
)
from mesh.failover import Attempt, Failover, RetryPolicy, Timeouts, rotate_past
from mesh.jobs import AsyncJob, Job
from mesh.plan import Plan
from mesh.stream import client_hello
from mesh.transport import (
    BlockingTransport,
    Transport,
    blocking_transport_for,
    parse_url,
    transport_for,
)
from mesh.wire import SLO, InferRequest, ServedBy, decode_answer, encode_request, encode_tensor

__all__ = ["Result", "Client", "AsyncClient", "Timeouts", "RetryPolicy", "slo_met",
           "served_accuracy", "DEVICE"]

MSGPACK = "application/msgpack"
T = TypeVar("T")
#: ``served_by.node`` and ``.tier`` of an answer computed on this device.
DEVICE = "device"


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
    plan: Plan | None = None

    @property
    def output(self) -> np.ndarray:
        return self.outputs[0]

    @property
    def breakdown(self) -> dict[str, dict[str, float]]:
        """The predicted latency split next to the measured one.

        ``measured.total_ms`` is this client's clock; the other measured parts are the
        nodes' own account (network, queue, compute).
        """
        predicted = dict(self.plan.predicted) if self.plan is not None else {}
        measured = {"total_ms": round(self.latency_ms, 3),
                    **{k: round(v, 3) for k, v in self.timing.items()}}
        return {"predicted": predicted, "measured": measured}

    @property
    def accuracy(self) -> float | None:
        """Measured held-out accuracy of the variant that answered (``served_by.variant``);
        None when the answer does not say."""
        return served_accuracy(self.served_by, self.plan)


def served_accuracy(served_by: ServedBy, plan: Plan | None) -> float | None:
    """The accuracy in ``plan`` if it is the served variant's, else None (unknown)."""
    if plan is None or plan.variant != served_by.variant:
        return None  # a plan for another variant says nothing about this one
    return plan.accuracy


def slo_met(slo: SLO, latency_ms: float, served_by: ServedBy, plan: Plan | None) -> bool:
    """Whether an answer met ``slo``: latency here, accuracy of what served, the mesh's word."""
    if plan is not None and not plan.feasible:  # the mesh knowingly answered outside the SLO
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
    # encoded once: a retry on another entry re-packs only the envelope
    req.wire_tensors = [encode_tensor(t) for t in tensors]
    return req


def _result(status: int, body: bytes, slo: SLO, latency_ms: float) -> Result:
    resp = decode_answer(status, body)
    met = slo_met(slo, latency_ms, resp.served_by, resp.plan)
    timing = {k: v for k, v in resp.timing.items() if k in ("network_ms", "queue_ms", "compute_ms")}
    return Result(resp.outputs, resp.served_by, latency_ms, met, slo, resp.request_id, timing,
                  resp.plan)


def _entry_urls(url: str | Sequence[str], kind: str) -> list[str]:
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise ClientError(f"{kind} needs at least one entry URL")
    for u in urls:
        parse_url(u)  # a bad URL fails here, naming it
    return [u if "://" in u else f"http://{u}" for u in urls]


def _feedback_body(request_id: str, label: Any) -> bytes:
    labels = np.asarray(label)
    if labels.dtype.kind not in "iu":
        raise InvalidInput("feedback: label must be an integer class (or one per row)")
    return json.dumps({"request_id": request_id, "label": labels.tolist()}).encode()


def _feedback_answer(status: int, data: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(data)
    except ValueError:
        payload = data[:200].decode(errors="replace")
    if status != 200:
        raise error_from_payload(status, payload)
    return payload if isinstance(payload, dict) else {}


def _http_entries(urls: Sequence[str], what: str = "feedback goes") -> list[str]:
    found = [u for u in urls if parse_url(u)[0] in ("http", "https")]
    if not found:
        raise ClientError(f"{what} over HTTP: give the client an http:// entry URL too")
    return found


class _Entries(Generic[T]):
    """What both clients hold: the entry URLs, their transports, the timeouts, TLS, the
    retry policy and budget, the device variants; and the one failover core they share."""

    def __init__(self, url: str | Sequence[str], timeout_s: float, connect_timeout_s: float,
                 attempt_timeout_s: float, transports: Mapping[str, T] | None,
                 ssl: _ssl.SSLContext | None, retry: RetryPolicy | None,
                 on_device: bool | str | Sequence[str], device_cache_dir: str | Path | None,
                 api_key: str | None = None) -> None:
        self._urls = _entry_urls(url, type(self).__name__)
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()
                                    or any(c in api_key for c in "\r\n ")):
            raise ClientError("api_key: the key your mesh's operator gave you, a string "
                              "without spaces")
        #: what every request to an entry node carries: the API key (on a mesh with tenants)
        self._auth: dict[str, str] = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._hello = client_hello(self._auth["Authorization"]) if api_key else None
        self._ssl = ssl
        self.timeouts = Timeouts(timeout_s, connect_timeout_s, attempt_timeout_s)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ClientError(f"retry: a mesh.RetryPolicy, got {retry!r}")
        self.retry = retry or RetryPolicy()
        self._budget = self.retry.budget()
        self._rng = random.Random()
        self.device: OnDevice | None = None
        if on_device is not False:
            self.device = OnDevice(on_device, cache_dir=device_cache_dir, headers=self._auth)
            self._device_urls = _http_entries(self._urls, "on_device fetches its variants")
        given = dict(transports or {})
        #: per entry, its transport (given, or made from the URL on first use)
        self._transports: list[T | None] = [
            given.get(u) for u in (url if not isinstance(url, str) else [url])]
        self._current = 0  # the entry the next query tries first

    @property
    def timeout_s(self) -> float:
        return self.timeouts.total_s

    def _begin(self, req: InferRequest, slo: SLO) -> tuple[Failover, float]:
        """A query's failover plan and its start time (latency is measured from here)."""
        return (Failover(len(self._urls), self._current, slo, self.timeouts, time.monotonic(),
                         self.retry, self._budget, self._rng, self._mesh_share_s(req, slo)),
                time.perf_counter())

    def _mesh_share_s(self, req: InferRequest, slo: SLO) -> float | None:
        """With a device variant held: the query's budget less what answering here takes."""
        if self.device is None or self.device.held(req.task) is None:
            return None
        budget = slo.latency_ms / 1000.0 if slo.latency_ms is not None and not slo.offline \
            else self.timeouts.total_s
        return max(budget - self.device.reserve_s(req.task, req.rows), 0.0)

    def _failed(self, failover: Failover, attempt: Attempt, exc: MeshError) -> None:
        failover.failed(exc, time.monotonic())
        if isinstance(exc, ClientError):  # unreachable or frozen: later queries start past it
            self._current = rotate_past(self._current, attempt.index, len(self._urls))

    def _ensure_device(self, task: str, *, force: bool = False) -> None:
        """Hold ``task``'s device variant if on_device wants it (blocking: fetches)."""
        if self.device is not None and (force or self.device.wants(task)):
            self.device.ensure(task, self._device_urls, ssl=self._ssl,
                               timeout_s=self.timeouts.attempt_s, force=force)

    def _on_device(self, error: MeshError, req: InferRequest, started: float) -> Result:
        """The answer when the mesh gave none: the device's, or ``error`` raised (blocking)."""
        device = self.device
        if device is None or not error.retryable or not device.wants(req.task):
            raise error
        if device.held(req.task) is None:
            raise type(error)(f"{error.message}; and no device variant of {req.task!r} to "
                              f"answer with: {device.why_not(req.task)}",
                              retry_after_s=error.retry_after_s)
        return self._run_on_device(req, started, f"the mesh did not answer in time "
                                                 f"({error.message})")

    def _run_on_device(self, req: InferRequest, started: float, why: str) -> Result:
        assert self.device is not None
        ran = time.perf_counter()
        outputs, variant = self.device.run(req.task, req.tensors)
        done = time.perf_counter()
        return _device_result(outputs, variant, why, req, (done - started) * 1000,
                              (done - ran) * 1000)

    def _device_meets_what_the_mesh_did_not(self, result: Result, req: InferRequest) -> bool:
        """The mesh answered degraded (cut off from the nodes that meet ``min_accuracy``)
        and the device variant meets it: the device's answer is the better one."""
        plan, device, floor = result.plan, self.device, req.slo.min_accuracy
        if device is None or plan is None or plan.degraded is None or floor is None \
                or (plan.accuracy is not None and plan.accuracy >= floor):
            return False
        held = device.held(req.task)
        return held is not None and held.accuracy is not None and held.accuracy >= floor

    def _from_mesh(self, result: Result, req: InferRequest, started: float) -> Result:
        """The mesh's answer, or the device's when it meets what a degraded answer did not."""
        if not self._device_meets_what_the_mesh_did_not(result, req):
            return result
        return self._run_on_device(req, started, "the mesh answered degraded "
                                   f"({result.plan.degraded if result.plan else ''}); this "
                                   "device's variant meets min_accuracy")


def _device_result(outputs: list[np.ndarray], variant: DeviceVariant, why: str,
                   req: InferRequest, latency_ms: float, compute_ms: float) -> Result:
    served_by = ServedBy(DEVICE, DEVICE, variant.name)
    plan = Plan(DEVICE, DEVICE, variant.name, variant.accuracy, True, req.slo.policy,
                f"answered on this device: {why}")
    return Result(outputs, served_by, latency_ms, slo_met(req.slo, latency_ms, served_by, plan),
                  req.slo, req.request_id, {"compute_ms": round(compute_ms, 3)}, plan)


class Client(_Entries[BlockingTransport]):
    """Blocking client over a kept-alive HTTP connection, or a stream. Not thread-safe.

    Raises :class:`ClientError` at once for a bad URL or timeout; see the module
    docstring for how the timeouts and failover work. ``transports`` maps an entry
    URL to the :class:`~mesh.transport.BlockingTransport` that carries its queries
    (tests pass in-memory ones); the others are made from their URLs. ``ssl``: reach
    the entry nodes over TLS with this context (nodes that serve TLS, ``mesh.certs``).
    ``retry``: how queries are retried (:class:`~mesh.failover.RetryPolicy`; 3
    attempts). ``on_device``: task names (or True: every task) to answer on this
    device when the mesh does not (:mod:`mesh.device`; off by default), its
    variants kept under ``device_cache_dir`` (default ``~/.cache/tiermesh/device``).
    ``api_key``: on a mesh with tenants, the key that says who you are (sent as
    ``Authorization: Bearer``; on the stream, in the HELLO that opens each connection).
    """

    def __init__(self, url: str | Sequence[str], *, timeout_s: float = 30.0,
                 connect_timeout_s: float = 1.0, attempt_timeout_s: float = 5.0,
                 transports: Mapping[str, BlockingTransport] | None = None,
                 ssl: _ssl.SSLContext | None = None, retry: RetryPolicy | None = None,
                 on_device: bool | str | Sequence[str] = False,
                 device_cache_dir: str | Path | None = None,
                 api_key: str | None = None) -> None:
        super().__init__(url, timeout_s, connect_timeout_s, attempt_timeout_s, transports, ssl,
                         retry, on_device, device_cache_dir, api_key)
        self._open = -1  # the entry whose transport holds an open connection

    def __enter__(self) -> Client:
        if self.device is not None and self.device.tasks is not None:
            for task in sorted(self.device.tasks):  # ahead, while the mesh is reachable
                self._ensure_device(task)
        return self

    def fetch_device(self, task: str) -> DeviceVariant:
        """Fetch (or load from the cache) ``task``'s device variant now, and return it.
        Raises what stopped it: :class:`~mesh.device.DeviceVariantRefused` for a download
        that does not hash to its sha256, :class:`MeshConnectionError` when no entry
        gives it, :class:`ClientError` without ``on_device``."""
        if self.device is None:
            raise ClientError("fetch_device needs a client made with on_device=...")
        self._ensure_device(task, force=True)
        variant = self.device.held(task)
        assert variant is not None
        return variant

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for transport in self._transports:
            if transport is not None:
                transport.close()
        self._open = -1

    def infer(self, task: str, *inputs: Any, latency_ms: float | None = None,
              min_accuracy: float | None = None, max_cost_per_1k: float | None = None,
              offline: bool = False, policy: str = "cheapest",
              request_id: str | None = None, min_confidence: float | None = None,
              allow_degraded: bool = False) -> Result:
        slo = _slo(latency_ms, min_accuracy, max_cost_per_1k, offline, policy, min_confidence,
                   allow_degraded)
        req = _request(task, inputs, slo, request_id)
        self._ensure_device(task)
        failover, started = self._begin(req, slo)
        while (attempt := failover.next(time.monotonic())) is not None:
            if attempt.delay_s > 0:
                time.sleep(attempt.delay_s)
            req.timeout_ms = attempt.timeout_ms
            try:
                status, data = self._send(attempt, encode_request(req))
                return self._from_mesh(_result(status, data, slo,
                                               (time.perf_counter() - started) * 1000),
                                       req, started)
            except MeshError as exc:
                self._failed(failover, attempt, exc)
        return self._on_device(failover.error(), req, started)

    def submit(self, task: str, *inputs: Any, deadline_s: float | None = None,
               chunk_rows: int = 256, min_accuracy: float | None = None,
               max_cost_per_1k: float | None = None) -> Job:
        """Run a large batch as an offline job (:mod:`mesh.jobs`) on idle capacity, at the
        lowest cost: returns at once; ``job.progress``, ``job.result()``. The job uses its own
        connection (a Client is not thread-safe), to the same entry nodes."""
        worker = Client(self._urls, timeout_s=self.timeouts.total_s,
                        connect_timeout_s=self.timeouts.connect_s,
                        attempt_timeout_s=self.timeouts.attempt_s, ssl=self._ssl,
                        retry=self.retry)
        return Job(worker, task, inputs, deadline_s=deadline_s, chunk_rows=chunk_rows,
                   slo={"min_accuracy": min_accuracy, "max_cost_per_1k": max_cost_per_1k,
                        "policy": "cheapest"})

    def feedback(self, request_id: str, label: Any) -> dict[str, Any]:
        """Report the true class of an answered query (one per row): the entry node that
        answered counts it toward the serving variant's live accuracy, which planning uses
        once there is enough of it. Raises :class:`~mesh.errors.AnswerNotFound` when no
        entry holds that answer (too old), :class:`InvalidInput` for bad labels."""
        import http.client
        from urllib.parse import urlsplit

        body = _feedback_body(request_id, label)
        last: MeshError | None = None
        for url in _http_entries(self._urls):
            parts = urlsplit(url)
            conn: http.client.HTTPConnection = (
                http.client.HTTPSConnection(parts.hostname or "", parts.port or 443,
                                            timeout=self.timeouts.attempt_s, context=self._ssl)
                if parts.scheme == "https" or self._ssl is not None else
                http.client.HTTPConnection(parts.hostname or "", parts.port or 80,
                                           timeout=self.timeouts.attempt_s))
            try:
                conn.request("POST", parts.path.rstrip("/") + "/v1/feedback", body=body,
                             headers={"Content-Type": "application/json", **self._auth})
                resp = conn.getresponse()
                status, data = resp.status, resp.read()
            except OSError as exc:
                last = MeshConnectionError(f"cannot reach entry node {url}: {exc}")
                continue
            finally:
                conn.close()
            try:
                return _feedback_answer(status, data)
            except AnswerNotFound as exc:  # another entry may have answered it
                last = exc
        assert last is not None
        raise last

    def _transport(self, index: int) -> BlockingTransport:
        transport = self._transports[index]
        if transport is None:
            transport = self._transports[index] = blocking_transport_for(
                self._urls[index], ssl=self._ssl, headers=self._auth, hello=self._hello)
        return transport

    def _send(self, attempt: Attempt, body: bytes) -> tuple[int, bytes]:
        """One attempt at one entry; raises MeshConnectionError or MeshTimeout naming it."""
        url = self._urls[attempt.index]
        if self._open not in (-1, attempt.index):  # one open connection, to the entry in use
            self.close()
        self._open = attempt.index
        transport = self._transport(attempt.index)
        wait = attempt.answer_timeout(time.monotonic())
        try:
            return transport.send(body, timeout_s=wait, connect_timeout_s=attempt.connect_s)
        except MeshConnectionError as exc:
            transport.close()
            raise MeshConnectionError(f"cannot reach entry node {url}: {exc.message}") from None
        except MeshTimeout:
            transport.close()
            raise MeshTimeout(f"no answer from {url} within {wait:.3g} s") from None


class AsyncClient(_Entries[Transport]):
    """asyncio client; use as ``async with AsyncClient(url) as mesh``.

    Same timeouts and failover as :class:`Client` (the module docstring); queries
    may run concurrently. ``transports`` maps an entry URL to the
    :class:`~mesh.transport.Transport` that carries its queries (tests pass
    :class:`~mesh.transport.MemoryTransport`); the others are made from their URLs.
    ``ssl``: reach the entry nodes over TLS with this context. ``retry``, ``on_device``,
    ``device_cache_dir`` and ``api_key`` as for :class:`Client` (fetching and device runs
    go to a worker thread).
    """

    def __init__(self, url: str | Sequence[str], *, timeout_s: float = 30.0,
                 connect_timeout_s: float = 1.0, attempt_timeout_s: float = 5.0,
                 transports: Mapping[str, Transport] | None = None,
                 ssl: _ssl.SSLContext | None = None, retry: RetryPolicy | None = None,
                 on_device: bool | str | Sequence[str] = False,
                 device_cache_dir: str | Path | None = None,
                 api_key: str | None = None) -> None:
        super().__init__(url, timeout_s, connect_timeout_s, attempt_timeout_s, transports, ssl,
                         retry, on_device, device_cache_dir, api_key)
        self._state = "unopened"
        self._current = 0

    async def __aenter__(self) -> AsyncClient:
        if self._state != "unopened":
            raise ClientError(f"AsyncClient cannot be opened twice (it is {self._state})")
        self._state = "opened"
        if self.device is not None and self.device.tasks is not None:
            for task in sorted(self.device.tasks):  # ahead, while the mesh is reachable
                await asyncio.to_thread(self._ensure_device, task)
        return self

    async def fetch_device(self, task: str) -> DeviceVariant:
        """As :meth:`Client.fetch_device`."""
        if self.device is None:
            raise ClientError("fetch_device needs a client made with on_device=...")
        await asyncio.to_thread(self._ensure_device, task, force=True)
        variant = self.device.held(task)
        assert variant is not None
        return variant

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        transports = [t for t in self._transports if t is not None]
        await asyncio.gather(*(t.aclose() for t in transports))
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
        if self.device is not None and self.device.wants(task) and self.device.held(task) is None:
            await asyncio.to_thread(self._ensure_device, task)
        failover, started = self._begin(req, slo)
        while (attempt := failover.next(time.monotonic())) is not None:
            if attempt.delay_s > 0:
                await asyncio.sleep(attempt.delay_s)
            req.timeout_ms = attempt.timeout_ms
            try:
                status, data = await self._send(attempt, encode_request(req))
                result = _result(status, data, slo, (time.perf_counter() - started) * 1000)
                if self._device_meets_what_the_mesh_did_not(result, req):
                    return await asyncio.to_thread(self._from_mesh, result, req, started)
                return result
            except MeshError as exc:
                self._failed(failover, attempt, exc)
        error = failover.error()
        if self.device is None:
            raise error
        return await asyncio.to_thread(self._on_device, error, req, started)

    def submit(self, task: str, *inputs: Any, deadline_s: float | None = None,
               chunk_rows: int = 256, concurrency: int = 2, min_accuracy: float | None = None,
               max_cost_per_1k: float | None = None) -> AsyncJob:
        """As :meth:`Client.submit`; ``concurrency`` chunks in flight at once."""
        if self._state != "opened":
            raise ClientError(f"AsyncClient is {self._state}; use 'async with AsyncClient(...)'")
        return AsyncJob(self, task, inputs, deadline_s=deadline_s, chunk_rows=chunk_rows,
                        concurrency=concurrency,
                        slo={"min_accuracy": min_accuracy, "max_cost_per_1k": max_cost_per_1k,
                             "policy": "cheapest"})

    async def feedback(self, request_id: str, label: Any) -> dict[str, Any]:
        """As :meth:`Client.feedback`."""
        import aiohttp

        body = _feedback_body(request_id, label)
        last: MeshError | None = None
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeouts.attempt_s)) as session:
            for url in _http_entries(self._urls):
                target = url.replace("http://", "https://", 1) if self._ssl is not None else url
                try:
                    async with session.post(target + "/v1/feedback", data=body,
                                            headers={"Content-Type": "application/json",
                                                     **self._auth},
                                            ssl=self._ssl if self._ssl is not None else True
                                            ) as resp:
                        status, data = resp.status, await resp.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last = MeshConnectionError(f"cannot reach entry node {url}: {exc}")
                    continue
                try:
                    return _feedback_answer(status, data)
                except AnswerNotFound as exc:
                    last = exc
        assert last is not None
        raise last

    async def _send(self, attempt: Attempt, body: bytes) -> tuple[int, bytes]:
        """One attempt at one entry; raises MeshConnectionError or MeshTimeout naming it."""
        url = self._urls[attempt.index]
        transport = self._transports[attempt.index]
        if transport is None:
            transport = self._transports[attempt.index] = transport_for(
                url, connect_timeout_s=self.timeouts.connect_s, ssl=self._ssl,
                headers=self._auth, hello=self._hello)
        wait = attempt.answer_timeout(time.monotonic())
        try:
            return await transport.send(body, timeout_s=wait, connect_timeout_s=attempt.connect_s)
        except MeshConnectionError as exc:
            raise MeshConnectionError(f"cannot reach entry node {url}: {exc.message}") from None
        except MeshTimeout:
            raise MeshTimeout(f"no answer from {url} within {wait:.3g} s") from None
