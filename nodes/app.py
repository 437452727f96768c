"""The node's aiohttp application: thin handlers over :class:`NodeAgent`.

Routes::

    POST /v1/infer                msgpack InferRequest -> msgpack InferResponse
    GET  /v1/status               JSON status (queues, variants, memory, latencies, mesh view)
    GET  /v1/artifacts/{sha256}   a variant's artifact from this node's store (pulled through
                                  its parent when missing); children fetch from here
    GET  /metrics                 Prometheus text format
    GET  /healthz                 readiness: 200 "ok" once the variants the node hosts are
                                  loaded (:func:`waiting_for`), else 503 with what it waits for
    GET  /livez                   liveness: 200 "ok" while the process serves
    /v2/...                       Open Inference Protocol v2 (:mod:`nodes.oip`)

Limits (:mod:`nodes.limits`): a query body over the node's cap (its largest
valid query) is refused 413 from ``Content-Length`` before it is read, a
large body when the node already reads too many is refused 429 with
``Retry-After``, a body must arrive within ``read_timeout_s`` (408), and a
connection idle for ``idle_timeout_s`` (also: one whose request headers have
not come by then) is closed (:func:`runner_options`). A body answered
before it was read is never buffered: what still comes is dropped for at
most a second (so that its sender reads the answer), then the connection
closes.

Who may do what (:mod:`nodes.identity`): a query's ``route`` is honoured and
an artifact served only for a node of the mesh: with TLS, one whose verified
certificate names it (a certificate of the mesh CA naming anything else gets
403 on every route); without TLS, one that sends the mesh-key token.
Everyone else is a client: on a mesh with tenants, one that names itself with
an API key (``Authorization: Bearer``; :mod:`mesh.tenants`, checked by the
agent), and status and metrics are then for operators and nodes only.

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
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mesh.errors import Forbidden, InvalidInput, MeshError, PayloadTooLarge
from mesh.wire import decode_request, encode_response, pack
from nodes.agent import AgentConfig, NodeAgent
from nodes.answers import as_mesh_error, error_to_wire, retry_after
from nodes.artifacts import check_sha256
from nodes.identity import Callers
from nodes.limits import MSGPACK_TYPES, BodyTimeout, NodeLimits, read_body, read_feedback
from nodes.metrics import CONTENT_TYPE
from nodes.oip import OipAdapter
from nodes.registry_sync import routes as registry_routes

__all__ = ["AGENT", "CALLERS", "LIMITS", "caller", "make_app", "runner_options"]

log = logging.getLogger("tiermesh.app")

AGENT = web.AppKey("agent", NodeAgent)
ADDRESS = web.AppKey("address", str)
STREAM_ADDRESS = web.AppKey("stream_address", str)
LIMITS = web.AppKey("limits", NodeLimits)
CALLERS = web.AppKey("callers", Callers)
MSGPACK = "application/msgpack"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(request: web.Request, error: MeshError, status: int | None = None
                    ) -> web.Response:
    status = status or error.status
    headers = retry_after(error)
    if request.path.startswith("/v2"):  # the protocol's own error shape
        return web.json_response({"error": error.message}, status=status, headers=headers)
    payload = error_to_wire(error)
    if request.content_type in MSGPACK_TYPES:
        return web.Response(body=pack(payload), status=status, content_type=MSGPACK,
                            headers=headers)
    return web.json_response(payload, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _http_error(request, exc)
    except MeshError as exc:
        response = _error_response(request, exc)
    except BodyTimeout as exc:
        response = _error_response(request, InvalidInput(str(exc)), 408)
        return await _answer_and_close(request, response)
    except Exception as exc:
        response = _error_response(request, as_mesh_error(exc, f"{request.method} {request.path}"))
    # A body answered before it was read (413 from its Content-Length, 429 over the body
    # budget, a wrong Content-Type) is never buffered: aiohttp reads and drops what comes
    # for at most lingering_time (runner_options), so that a caller still sending it gets
    # to read this answer instead of a reset, and then closes the connection.
    return response


async def _answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response``, then close the connection without reading what else comes."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # the transport sends what it holds, then closes
    return response


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[LIMITS].largest_body_bytes
        return _error_response(request, PayloadTooLarge(
            f"body too large: this node accepts at most {limit} bytes; send fewer rows per query"))
    return _error_response(request, MeshError(exc.reason), exc.status)


def caller(request: web.Request) -> str | None:
    """The mesh node ``request`` comes from, or None for a client. Raises Forbidden."""
    return request.app[CALLERS].of_request(request.transport, request.headers)


@web.middleware
async def certificate_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With TLS: a mesh certificate for a name outside the topology is refused everywhere."""
    request.app[CALLERS].of_connection(request.transport)
    return await handler(request)


async def infer(request: web.Request) -> web.Response:
    if request.content_type not in MSGPACK_TYPES:
        raise InvalidInput(f"Content-Type: send {MSGPACK}, got {request.content_type!r}")
    agent, limits = request.app[AGENT], request.app[LIMITS]
    async with read_body(request, cap=limits.caps.msgpack_bytes, budget=limits.budget,
                         timeout_s=limits.read_timeout_s) as body:
        req = decode_request(body, max_elements=agent.config.max_elements)
    # only a proven node may send a route (nodes.identity); everyone else is a client
    response = await agent.infer(req, from_client=caller(request) is None,
                                 authorization=request.headers.get("Authorization"))
    return web.Response(body=encode_response(response), content_type=MSGPACK)


async def feedback(request: web.Request) -> web.Response:
    """Ground truth for an answer this node gave: ``{"request_id": ..., "label": int | [int]}``
    (JSON or msgpack)."""
    agent = request.app[AGENT]
    tenant = agent.tenancy.authenticate(request.headers.get("Authorization"))
    request_id, label = await read_feedback(request, id_key="request_id")
    return web.json_response(agent.feedback(request_id, label, tenant=tenant))


def operators_only(request: web.Request) -> None:
    """Status and metrics on a mesh with tenants: for nodes (certificate or mesh-key token,
    the operator's ``mesh`` commands included) and operator keys only. A tenant's key gets
    403 (they hold every tenant's names and figures), no key or a bad one 401."""
    tenancy = request.app[AGENT].tenancy
    if not tenancy.enabled or caller(request) is not None:
        return
    authorization = request.headers.get("Authorization")
    if tenancy.is_operator(authorization):
        return
    tenancy.authenticate(authorization)  # 401 for a missing, unknown or revoked key
    raise Forbidden("status and metrics are for operators: use an operator key")



async def status(request: web.Request) -> web.Response:
    operators_only(request)
    body = request.app[AGENT].status(request.app[ADDRESS], request.app[STREAM_ADDRESS] or None)
    return web.Response(text=json.dumps(body), content_type="application/json")


async def artifact(request: web.Request) -> web.StreamResponse:
    """A child node's pull (nodes.artifacts.PullPolicy); clients and strangers get a 403."""
    sha256 = check_sha256(request.match_info["sha256"])
    agent, callers = request.app[AGENT], request.app[CALLERS]
    path = await agent.artifacts.serve(sha256, requester=caller(request), remote=request.remote,
                                       by_certificate=callers.tls)
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


async def metrics(request: web.Request) -> web.Response:
    operators_only(request)
    return web.Response(body=request.app[AGENT].metrics.render(),
                        headers={"Content-Type": CONTENT_TYPE})


def waiting_for(agent: NodeAgent) -> list[str] | None:
    """What keeps the node from being ready (:meth:`NodeAgent.waiting_for`); None: ready."""
    return agent.waiting_for()


async def healthz(request: web.Request) -> web.Response:
    """Readiness: 200 "ok" when the node serves what it hosts; 503 with what it waits for."""
    waiting = waiting_for(request.app[AGENT])
    if waiting is None:
        return web.Response(text="ok")
    return web.json_response({"ready": False, "waiting_for": waiting}, status=503)


async def livez(request: web.Request) -> web.Response:
    """Liveness: 200 "ok" while the process serves HTTP at all."""
    return web.Response(text="ok")


def runner_options(config: AgentConfig) -> dict[str, Any]:
    """``web.AppRunner`` (or ``TestServer``) options that apply the config's connection limits.

    aiohttp's keep-alive timer runs from the moment a connection opens, so it
    closes a connection idle between requests and one whose request headers
    have not all come within ``idle_timeout_s``.
    """
    # lingering: how long the rest of a body answered before it was read is drained (read
    # and dropped, never buffered) before the connection is closed
    return {"keepalive_timeout": config.idle_timeout_s,
            "lingering_time": min(1.0, config.read_timeout_s)}


def make_app(agent: NodeAgent, *, address: str = "", stream_address: str | None = None,
             limits: NodeLimits | None = None) -> web.Application:
    """The node's app. ``limits``: share the stream port's (one body budget); default: the agent's."""
    limits = limits or NodeLimits.for_agent(agent)
    callers = agent.callers
    # the certificate check costs a plain-HTTP node nothing: it is only there with TLS
    middlewares = [error_middleware, certificate_middleware] if callers.tls else [error_middleware]
    app = web.Application(middlewares=middlewares, client_max_size=limits.largest_body_bytes)
    app[AGENT] = agent
    app[CALLERS] = callers
    app[LIMITS] = limits
    app[ADDRESS] = address
    app[STREAM_ADDRESS] = stream_address or ""
    app.router.add_post("/v1/infer", infer)
    app.router.add_get("/v1/status", status)
    app.router.add_post("/v1/feedback", feedback)
    app.router.add_get("/v1/artifacts/{sha256}", artifact)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", livez)
    app.router.add_routes(OipAdapter(agent, limits).routes())
    app.router.add_routes(registry_routes(agent))
    app.router.add_routes(__import__("nodes.device", fromlist=["routes"]).routes(agent))
    return app
