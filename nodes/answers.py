"""One query in, one answer out: what every adapter (HTTP, OIP, stream, in-memory) shares.

:func:`answer` takes an encoded ``InferRequest`` and returns what ``POST
/v1/infer`` answers, as a :class:`Reply`: 200 and the encoded response, or
the error's status and its wire form. :func:`error_to_wire` is the one place
an exception becomes that wire form: a :class:`~mesh.errors.MeshError` as it
is, anything else logged here and answered as a bare 500 that carries no
exception text, class name or path. :func:`retry_after` is the ``Retry-After``
header an error asks for.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

from mesh.errors import MeshError
from mesh.wire import decode_request, encode_response, pack
from nodes.agent import NodeAgent

__all__ = ["Reply", "answer", "error_to_wire", "as_mesh_error", "retry_after", "INTERNAL"]

log = logging.getLogger("tiermesh.answers")

INTERNAL = "internal error on this node; it has been logged"


class Reply(NamedTuple):
    status: int
    body: bytes
    #: the error answered with (None for a 200), for the adapter's headers
    error: MeshError | None = None


def as_mesh_error(exc: BaseException, where: str = "a query") -> MeshError:
    """``exc`` as the error a caller may see; an unexpected one is logged, never shown."""
    if isinstance(exc, MeshError):
        return exc
    log.error("unhandled error serving %s", where, exc_info=exc)
    return MeshError(INTERNAL)


def error_to_wire(error: MeshError) -> dict[str, Any]:
    """The body of an error answer (msgpack or JSON): ``{"error": {type, message, ...}}``."""
    return {"error": error.to_payload()}


def retry_after(error: MeshError | None) -> dict[str, str]:
    """``Retry-After`` for an error that says when to retry (whole seconds, rounded up)."""
    if error is None or error.retry_after_s is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}


def error_reply(error: MeshError, status: int | None = None) -> Reply:
    return Reply(status or error.status, pack(error_to_wire(error)), error)


async def answer(agent: NodeAgent, body: bytes, *, from_client: bool) -> Reply:
    """Decode, serve and encode one query; every failure becomes its error reply."""
    try:
        req = decode_request(body, max_elements=agent.config.max_elements)
        del body
        return Reply(200, encode_response(await agent.infer(req, from_client=from_client)))
    except Exception as exc:  # the node keeps serving whatever one query did
        return error_reply(as_mesh_error(exc))
