"""The node's aiohttp application: thin handlers over :class:`NodeAgent`.

Routes::

    POST /v1/infer                msgpack InferRequest -> msgpack InferResponse
    GET  /v1/status               JSON status (queues, variants, memory, latencies, mesh view)
    GET  /v1/artifacts/{sha256}   a variant's artifact from this node's store (pulled through
                                  its parent when missing); children fetch from here
    GET  /metrics                 Prometheus text format
    GET  /healthz                 200 "ok" once the agent is serving
    /v2/...                       Open Inference Protocol v2 (:mod:`nodes.oip`)

The error middleware is the only place where errors become responses: a
:class:`~mesh.errors.MeshError` keeps its status (and ``Retry-After`` when it
says when to retry); anything unexpected is logged and answered 500 without
internals, and the node keeps serving. Errors are msgpack for msgpack
requests, ``{"error": "..."}`` under ``/v2`` as the protocol wants, JSON
otherwise.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable

from aiohttp import web

from mesh.errors import InvalidInput, MeshError, PayloadTooLarge
from mesh.wire import decode_request, encode_response, pack
from nodes.agent import NodeAgent
from nodes.artifacts import check_sha256
from nodes.metrics import CONTENT_TYPE
from nodes.oip import OipAdapter

__all__ = ["AGENT", "make_app"]

log = logging.getLogger("tiermesh.app")

AGENT = web.AppKey("agent", NodeAgent)
ADDRESS = web.AppKey("address", str)
STREAM_ADDRESS = web.AppKey("stream_address", str)
MSGPACK = "application/msgpack"
_MSGPACK_TYPES = {MSGPACK, "application/x-msgpack", "application/vnd.msgpack"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(request: web.Request, error: MeshError, status: int | None = None
                    ) -> web.Response:
    status = status or error.status
    headers = {}
    if error.retry_after_s is not None:
        # delay-seconds is a whole number; round up so that a client never retries too early
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    if request.path.startswith("/v2"):
        return web.json_response({"error": error.message}, status=status, headers=headers)
    payload = {"error": error.to_payload()}
    if request.content_type in _MSGPACK_TYPES:
        return web.Response(body=pack(payload), status=status, content_type=MSGPACK,
                            headers=headers)
    return web.json_response(payload, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except MeshError as exc:
        return _error_response(request, exc)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[AGENT].config.max_body_bytes
        return _error_response(request, PayloadTooLarge(
            f"body too large: this node accepts at most {limit} bytes; send fewer rows per query"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_response(request, MeshError(exc.reason), exc.status)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(request, MeshError("internal error on this node; it has been logged"))


async def infer(request: web.Request) -> web.Response:
    if request.content_type not in _MSGPACK_TYPES:
        raise InvalidInput(f"Content-Type: send {MSGPACK}, got {request.content_type!r}")
    agent = request.app[AGENT]
    body = await request.read()
    req = decode_request(body, max_elements=agent.config.max_elements)
    response = await agent.infer(req)
    return web.Response(body=encode_response(response), content_type=MSGPACK)


async def status(request: web.Request) -> web.Response:
    body = request.app[AGENT].status(request.app[ADDRESS], request.app[STREAM_ADDRESS] or None)
    return web.Response(text=json.dumps(body), content_type="application/json")


async def artifact(request: web.Request) -> web.StreamResponse:
    """A child node's pull (nodes.artifacts.PullPolicy); clients and strangers get a 403."""
    sha256 = check_sha256(request.match_info["sha256"])
    agent = request.app[AGENT]
    path = await agent.artifacts.serve(sha256, requester=agent.peers.peer_of(request.headers),
                                       remote=request.remote)
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[AGENT].metrics.render(),
                        headers={"Content-Type": CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app(agent: NodeAgent, *, address: str = "", stream_address: str | None = None
             ) -> web.Application:
    app = web.Application(middlewares=[error_middleware],
                          client_max_size=agent.config.max_body_bytes)
    app[AGENT] = agent
    app[ADDRESS] = address
    app[STREAM_ADDRESS] = stream_address or ""
    app.router.add_post("/v1/infer", infer)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/artifacts/{sha256}", artifact)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_routes(OipAdapter(agent).routes())
    return app
