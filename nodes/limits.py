"""How much a caller may make a node hold: body caps, the large-body budget, read deadlines.

A node must never buffer more than a valid query needs, nor let a few
callers hold its memory. Three limits, shared by the HTTP and stream ports:

* **Body cap** (:class:`BodyCaps`): the largest valid query of the tasks the
  mesh serves (each input's spec at ``max_rows`` rows, plus the envelope),
  never more than the configured ceiling. It is checked against
  ``Content-Length`` or the stream frame header *before* any of the body is
  read; a body without a length is cut off at the cap. An OIP body may spell
  its numbers in JSON, so its cap allows :data:`JSON_BYTES_PER_ELEMENT` bytes
  of text per element.
* **Large-body budget** (:class:`BodyBudget`): bodies over ``large_bytes``
  reserve their size from one budget while they are read and decoded; when
  the budget is spent the query is refused at once with
  :class:`~mesh.errors.Overloaded` (429, ``Retry-After``) instead of being
  buffered. Small bodies never wait on it.
* **Read deadline** (:func:`read_body`): a body must arrive within
  ``read_timeout_s`` of its handler starting; otherwise :class:`BodyTimeout`
  (answered 408 and the connection closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mesh.errors import InvalidInput, Overloaded, PayloadTooLarge
from mesh.registry import Registry, TensorSpec
from mesh.topology import Topology
from mesh.wire import unpack

if TYPE_CHECKING:
    from nodes.agent import NodeAgent

__all__ = ["NodeLimits", "BodyCaps", "BodyBudget", "Reservation", "BodyTimeout", "body_caps",
           "read_body", "read_feedback", "MSGPACK_TYPES", "ENVELOPE_BYTES",
           "JSON_BYTES_PER_ELEMENT"]

#: Room for everything in a query but its tensor bytes: task, request id, SLO, route and
#: the per-tensor keys (msgpack), or names, shapes and parameters (OIP JSON).
ENVELOPE_BYTES = 64 * 1024
#: The longest JSON spelling of one number with its separator ("-1.2345678901234567e-308, ").
JSON_BYTES_PER_ELEMENT = 32
_ITEMSIZE = {"bool": 1, "int8": 1, "uint8": 1, "int16": 2, "float16": 2, "int32": 4,
             "float32": 4, "int64": 8, "float64": 8}


class BodyTimeout(TimeoutError):
    """A request body did not arrive within the node's read deadline (answered 408)."""


@dataclass(frozen=True, slots=True)
class BodyCaps:
    """The largest body this node reads, per encoding."""

    #: ``POST /v1/infer`` bodies and stream INFER frames (msgpack, raw tensor bytes).
    msgpack_bytes: int
    #: OIP ``/v2/models/{task}/infer`` bodies (JSON numbers, or JSON + binary tensors).
    json_bytes: int


def _task_elements(inputs: Iterable[TensorSpec], max_rows: int) -> tuple[int, int] | None:
    """(elements, bytes) of one task's largest valid query; None when a dimension is unbounded."""
    elements = nbytes = 0
    for spec in inputs:
        dims = list(spec.shape)
        if not dims:
            count = 1
        else:
            dims[0] = max_rows if dims[0] == -1 else dims[0]
            if any(d < 0 for d in dims):
                return None
            count = math.prod(dims)
        elements += count
        nbytes += count * _ITEMSIZE.get(spec.dtype, 8)
    return elements, nbytes


def body_caps(registry: Registry, topology: Topology, *, max_rows: int, ceiling_bytes: int
              ) -> BodyCaps:
    """Caps from the largest valid query of every task some node of ``topology`` hosts.

    An entry node takes queries for tasks it forwards as well as those it
    serves, so every task the mesh serves counts. A task with an unbounded
    non-batch dimension gets the ceiling.
    """
    msgpack_bytes = json_bytes = ENVELOPE_BYTES
    seen: set[str] = set()
    for variant in registry.variants.values():
        # placement may put a variant on any node whose allow/deny lists let it in
        if variant.task in seen or not any(n.allows(variant.name, variant.base)
                                           for n in topology.nodes.values()):
            continue
        seen.add(variant.task)
        largest = _task_elements(variant.inputs, max_rows)
        if largest is None:
            return BodyCaps(ceiling_bytes, ceiling_bytes)
        elements, nbytes = largest
        msgpack_bytes = max(msgpack_bytes, ENVELOPE_BYTES + nbytes)
        json_bytes = max(json_bytes, ENVELOPE_BYTES + elements * JSON_BYTES_PER_ELEMENT, nbytes)
    return BodyCaps(min(msgpack_bytes, ceiling_bytes), min(json_bytes, ceiling_bytes))


class Reservation:
    """Bytes held from a :class:`BodyBudget`; :meth:`release` gives them back (idempotent)."""

    __slots__ = ("_budget", "size")

    def __init__(self, budget: BodyBudget | None, size: int) -> None:
        self._budget = budget
        self.size = size

    def release(self) -> None:
        if self._budget is not None:
            self._budget.held_bytes -= self.size
            self._budget = None


_FREE = Reservation(None, 0)


class BodyBudget:
    """Bytes of large request bodies a node holds at once, across all its connections.

    Not thread-safe: used from the event loop only.
    """

    #: Seconds a refused caller is told to wait: a large body takes about this long to go.
    retry_after_s: float = 1.0

    def __init__(self, limit_bytes: int, *, large_bytes: int) -> None:
        if limit_bytes < large_bytes:
            raise ValueError(f"body budget of {limit_bytes} bytes is below the large-body "
                             f"threshold of {large_bytes}; raise max_buffered_body_bytes")
        self.limit_bytes = limit_bytes
        self.large_bytes = large_bytes
        self.held_bytes = 0
        #: large bodies refused because the budget was spent
        self.refused = 0

    def try_reserve(self, size: int) -> Reservation | None:
        """A reservation of ``size`` bytes, or None when it does not fit now."""
        if size <= self.large_bytes:
            return _FREE
        if self.held_bytes + size > self.limit_bytes:
            self.refused += 1
            return None
        self.held_bytes += size
        return Reservation(self, size)

    def reserve(self, size: int) -> Reservation:
        """Like :meth:`try_reserve`; raises :class:`Overloaded` (429) when it does not fit."""
        reservation = self.try_reserve(size)
        if reservation is None:
            raise Overloaded(f"this node is already reading {self.held_bytes} bytes of large "
                             f"queries; retry shortly or send fewer rows per query",
                             retry_after_s=self.retry_after_s)
        return reservation


@dataclass(frozen=True)
class NodeLimits:
    """The limits one node applies on all its ports; share one so they share the budget."""

    caps: BodyCaps
    budget: BodyBudget
    #: a connection with nothing in flight is closed after this long (HTTP: also headers)
    idle_timeout_s: float
    #: a body, or a stream frame once begun, must arrive within this
    read_timeout_s: float

    @classmethod
    def for_agent(cls, agent: NodeAgent) -> NodeLimits:
        """The limits an :class:`~nodes.agent.AgentConfig` asks for, over its registry."""
        config = agent.config
        return cls(body_caps(agent.registry, config.topology, max_rows=config.max_rows,
                             ceiling_bytes=config.max_body_bytes),
                   BodyBudget(config.max_buffered_body_bytes, large_bytes=config.large_body_bytes),
                   idle_timeout_s=config.idle_timeout_s, read_timeout_s=config.read_timeout_s)

    @property
    def largest_body_bytes(self) -> int:
        return max(self.caps.msgpack_bytes, self.caps.json_bytes)


def too_large(size: int, cap: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"body too large: {size} bytes; this node accepts at most {cap} bytes "
                           "(its largest valid query); send fewer rows per query")


@contextlib.asynccontextmanager
async def read_body(request: web.Request, *, cap: int, budget: BodyBudget, timeout_s: float
                    ) -> AsyncIterator[bytes]:
    """The request's body, read within the limits; the reservation lasts while the block runs.

    Raises :class:`PayloadTooLarge` (from ``Content-Length`` before reading, or
    once a body without one passes the cap), :class:`Overloaded` when the
    large-body budget is spent, and :class:`BodyTimeout`.
    """
    length = request.content_length
    if length is not None and length > cap:
        raise too_large(length, cap)
    reservation = budget.reserve(length if length is not None else cap)
    try:
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(timeout_s):
                while chunk := await request.content.readany():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > cap:
                        raise too_large(size, cap)
        except TimeoutError:
            raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s "
                              f"({size} of {length if length is not None else '?'} bytes came)"
                              ) from None
        body = b"".join(chunks)
        chunks.clear()
        yield body
    finally:
        reservation.release()


#: the content types a msgpack body may be sent with
MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack",
                           "application/vnd.msgpack"})


async def read_feedback(request: web.Request, *, id_key: str) -> tuple[str, Any]:
    """(request id, label) from a feedback body (JSON, or msgpack); raises InvalidInput.
    ``id_key``: ``request_id`` here, ``id`` on OIP (the id its infer answers carry)."""
    too_big = PayloadTooLarge(f"body: feedback is at most {MAX_FEEDBACK_BYTES} bytes")
    if request.content_length is not None and request.content_length > MAX_FEEDBACK_BYTES:
        raise too_big
    raw = await request.read()  # the app's client_max_size bounds a body without a length
    if len(raw) > MAX_FEEDBACK_BYTES:
        raise too_big
    try:
        body = unpack(raw) if request.content_type in MSGPACK_TYPES else json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidInput(f"body: a JSON (or msgpack) object with {id_key} and label") from None
    if not isinstance(body, dict) or not isinstance(body.get(id_key), str) or "label" not in body:
        raise InvalidInput(f"body: {id_key} (a string) and label (a class, or one per row)")
    return body[id_key], body["label"]


#: a feedback body: a request id and a label per row (rows are capped by max_rows)
MAX_FEEDBACK_BYTES = 1 << 20
