"""The SDK against fake entry nodes on loopback (real sockets, canned answers).

A frozen entry here accepts connections and reads queries but never answers:
what a SIGSTOPped node looks like from outside, since the kernel still
completes the TCP handshake. ``tests/integration/test_frozen_entry.py`` does the
same with real node processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from mesh import (
    AsyncClient,
    Client,
    InvalidInput,
    MeshConnectionError,
    MeshError,
    MeshTimeout,
    Overloaded,
    RetryPolicy,
    ServedBy,
    UnknownTask,
)
from mesh.errors import CannotMeetDeadline
from mesh.plan import Plan
from mesh.stream import ANSWER, ERROR, INFER, FrameReader, error_payload, frame
from mesh.wire import (
    InferRequest,
    InferResponse,
    decode_request,
    encode_response,
    pack,
)

IMAGES = np.zeros((1, 64), np.float32)
#: an answer whose plan is the entry node's while another variant served (a re-plan)
REPLANNED: dict[str, Any] = {"node": "core-1", "tier": "core", "variant": "digits-cnn",
                             "accuracy": 0.995, "feasible": True}
SERVED = ServedBy("edge-2", "edge", "digits-linear")


def _answer(req: InferRequest, served_by: ServedBy, plan: dict[str, Any]) -> bytes:
    return encode_response(InferResponse(
        request_id=req.request_id, outputs=[np.full((1, 10), 0.1, np.float32)],
        served_by=served_by, timing={"network_ms": 0.0, "queue_ms": 0.1, "compute_ms": 0.1},
        plan=Plan.from_wire(plan)))


class FakeEntry:
    """One fake entry node serving HTTP and the stream. ``frozen``: it never answers.

    ``received`` holds every query that reached it, decoded.
    """

    def __init__(self, name: str, *, frozen: bool = False,
                 plan: Callable[[str], dict[str, Any]] | None = None,
                 errors: list[MeshError] | None = None) -> None:
        self.name, self.frozen = name, frozen
        #: answered, one per query, before any real answer
        self.errors = list(errors or [])
        self.served_by = ServedBy(name, "edge", "digits-linear")
        self.plan = plan or (lambda node: {"node": node, "tier": "edge",
                                           "variant": "digits-linear", "accuracy": 0.96,
                                           "feasible": True})
        self.received: list[InferRequest] = []
        self._release = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FakeEntry:
        app = web.Application()
        app.router.add_post("/v1/infer", self._http)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.http_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._stream = await asyncio.start_server(self._serve_stream, "127.0.0.1", 0)
        self.tcp_url = f"tcp://127.0.0.1:{self._stream.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()  # let the frozen handlers return so nothing is left running
        self._stream.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stream.wait_closed()
        await self._runner.cleanup()

    def url(self, transport: str) -> str:
        return self.http_url if transport == "http" else self.tcp_url

    async def _reply(self, body: bytes) -> tuple[int, bytes]:
        req = decode_request(body)
        self.received.append(req)
        if self.frozen:
            await self._release.wait()
        if self.errors:
            error = self.errors.pop(0)
            return error.status, pack({"error": error.to_payload()})
        return 200, _answer(req, self.served_by, self.plan(self.name))

    async def _http(self, request: web.Request) -> web.Response:
        status, body = await self._reply(await request.read())
        return web.Response(body=body, status=status, content_type="application/msgpack")

    async def _serve_stream(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        frames = FrameReader()
        try:
            while data := await reader.read(65536):
                for request_id, kind, payload in frames.feed(data):
                    assert kind == INFER
                    status, body = await self._reply(payload)
                    writer.write(frame(request_id, ANSWER, body) if status == 200 else
                                 frame(request_id, ERROR, error_payload(status, body)))
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


async def _query(kind: str, urls: list[str], n: int = 1, **options: Any) -> list[Any]:
    """``n`` queries, one after the other, through the blocking or the asyncio client."""
    timeouts = {k: options.pop(k) for k in ("timeout_s", "attempt_timeout_s", "retry")
                if k in options}
    if kind == "sync":
        def run() -> list[Any]:
            with Client(urls, **timeouts) as client:
                return [client.infer("digits", IMAGES, **options) for _ in range(n)]
        return await asyncio.to_thread(run)
    async with AsyncClient(urls, **timeouts) as client:
        return [await client.infer("digits", IMAGES, **options) for _ in range(n)]


CLIENTS = ["sync", "async"]
TRANSPORTS = ["http", "tcp"]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", CLIENTS)
async def test_an_entry_that_never_answers_is_skipped_for_the_next(kind: str, transport: str
                                                                    ) -> None:
    async with FakeEntry("edge-1", frozen=True) as frozen, FakeEntry("edge-2") as alive:
        results = await _query(kind, [frozen.url(transport), alive.url(transport)], n=3,
                               timeout_s=20, attempt_timeout_s=0.3)
        assert [r.served_by.node for r in results] == ["edge-2"] * 3
        # the frozen entry got the first query only, told it would wait 0.3 s; later queries
        # start at the entry that answered
        assert [r.timeout_ms for r in frozen.received] == [300.0]
        # the last entry left gets what remains of the 20 s
        assert all(0 < r.timeout_ms <= 20_000 for r in alive.received)
        assert alive.received[0].timeout_ms < 20_000


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", CLIENTS)
async def test_every_entry_frozen_raises_timeout_naming_each(kind: str, transport: str) -> None:
    async with FakeEntry("edge-1", frozen=True) as a, FakeEntry("edge-2", frozen=True) as b:
        urls = [a.url(transport), b.url(transport)]
        with pytest.raises(MeshTimeout) as caught:
            await _query(kind, urls, timeout_s=1, latency_ms=10)
        assert f"no answer from {urls[0]} within 0.5 s" in caught.value.message
        assert f"no answer from {urls[1]} within" in caught.value.message
        assert len(a.received) == len(b.received) == 1
        # a dead port then a frozen entry: both named, and a timeout since one was too slow
        dead = "http://127.0.0.1:9" if transport == "http" else "tcp://127.0.0.1:9"
        with pytest.raises(MeshTimeout, match=f"cannot reach entry node {dead}: .*; "
                                              f"no answer from {urls[0]} within"):
            await _query(kind, [dead, urls[0]], timeout_s=0.5)
        with pytest.raises(MeshConnectionError, match=f"^cannot reach entry node {dead}: "):
            await _query(kind, [dead])


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", CLIENTS)
async def test_slo_met_reflects_what_served_not_the_entry_plan(kind: str, transport: str
                                                               ) -> None:
    replanned = FakeEntry("edge-2", plan=lambda node: dict(REPLANNED))
    degraded = FakeEntry("edge-1", plan=lambda node: {
        "node": node, "tier": "edge", "variant": "digits-linear", "accuracy": 0.96,
        "feasible": False})
    async with replanned, degraded:
        # the plan names digits-cnn (0.995) but digits-linear answered: accuracy unknown
        (r,) = await _query(kind, [replanned.url(transport)], min_accuracy=0.98)
        assert r.served_by == SERVED
        assert r.accuracy is None
        assert r.slo_met is False
        (relaxed,) = await _query(kind, [replanned.url(transport)])
        assert relaxed.slo_met is True  # nothing asked about accuracy
        # the mesh said it answered outside the SLO (a degraded answer)
        (d,) = await _query(kind, [degraded.url(transport)], latency_ms=1000,
                            allow_degraded=True)
        assert degraded.received[-1].slo.allow_degraded is True
        assert d.accuracy == 0.96
        assert d.slo_met is False
        (below,) = await _query(kind, [degraded.url(transport)], min_accuracy=0.97)
        assert below.slo_met is False


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_bad_slo_is_refused_before_anything_is_sent(kind: str) -> None:
    async with FakeEntry("edge-1") as entry:
        for bad, match in (({"offline": "yes"}, "slo.offline: must be true or false"),
                           ({"allow_degraded": 1}, "slo.allow_degraded: must be true or false"),
                           ({"latency_ms": -5}, "slo.latency_ms: must be between 0 and"),
                           ({"policy": "fastest-ever"}, "slo.policy: 'fastest-ever' is not one")):
            with pytest.raises(InvalidInput, match=match):
                await _query(kind, [entry.http_url], **bad)
        assert entry.received == []


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", CLIENTS)
async def test_busy_answers_are_retried_with_one_request_id_as_the_idempotency_key(
        kind: str, transport: str) -> None:
    busy = FakeEntry("edge-1", errors=[Overloaded("edge-1: queue full", retry_after_s=0.01)])
    other = FakeEntry("edge-2", errors=[CannotMeetDeadline("nothing meets the target now")])
    async with busy, other:
        (r,) = await _query(kind, [busy.url(transport), other.url(transport)])
        # edge-1 said 429, edge-2 503; edge-1, alive, answered the third attempt
        assert r.served_by.node == "edge-1"
        ids = [q.request_id for q in (busy.received[0], other.received[0], busy.received[1])]
        assert ids == [r.request_id] * 3  # every attempt is the same query to the mesh
        assert len(busy.received) == 2 and len(other.received) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", CLIENTS)
async def test_errors_the_caller_must_fix_are_raised_without_a_retry(kind: str, transport: str
                                                                     ) -> None:
    wrong = FakeEntry("edge-1", errors=[UnknownTask("task 'digitz' is not registered")])
    async with wrong, FakeEntry("edge-2") as other:
        with pytest.raises(UnknownTask, match="^task 'digitz' is not registered$"):
            await _query(kind, [wrong.url(transport), other.url(transport)])
        assert (len(wrong.received), len(other.received)) == (1, 0)


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_retry_after_past_the_timeout_fails_at_once_saying_so(kind: str) -> None:
    async with FakeEntry("edge-1", errors=[Overloaded("queue full", retry_after_s=60)] * 2
                         ) as entry:
        with pytest.raises(Overloaded) as caught:
            await _query(kind, [entry.http_url], timeout_s=2)
        assert caught.value.retry_after_s == 60
        assert "queue full; not retried: the mesh asked to wait 60 s, longer than the" \
            in caught.value.message
        assert len(entry.received) == 1
        # retries off: the node's answer as it came
        with pytest.raises(Overloaded, match="^queue full$"):
            await _query(kind, [entry.http_url], retry=RetryPolicy(max_attempts=1))
        assert len(entry.received) == 2
