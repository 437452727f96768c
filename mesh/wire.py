"""The wire format: msgpack envelopes and the tensor codec. No I/O here.

A tensor travels as ``{"dtype": name, "shape": [ints], "data": bytes}``
(little-endian, C order). Decoding checks the dtype against an allowlist,
the byte count against shape x itemsize, and the element count against the
node's cap, then wraps the bytes with :func:`numpy.frombuffer`. Nothing is
ever unpickled.

An inference request::

    {"task": "digits", "tensors": [tensor, ...], "request_id": "...",
     "slo": {"latency_ms": 20, "min_accuracy": 0.95, "policy": "cheapest"},
     "budget_ms": 19.2,           # what is left of the latency target (set by nodes)
     "timeout_ms": 250.0,         # how long the sender waits for this answer (SDK and nodes)
     "hops": 1,                   # how many nodes the query has crossed
     "route": {"node": "core-1", "variant": "digits-cnn"}}   # set by the entry node

An answer::

    {"request_id": "...", "outputs": [tensor, ...],
     "served_by": {"node": ..., "tier": ..., "variant": ...},
     "timing": {"queue_ms": .., "compute_ms": .., "node_ms": .., "network_ms": ..},
     "plan": {...},               # what served it and what was predicted (mesh.plan.Plan)
     "loads": {node: queue_depth}}   # piggybacked load reports
"""

from __future__ import annotations

import math
import reprlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from mesh.errors import InvalidInput, PayloadTooLarge, error_from_payload
from mesh.plan import Plan
from mesh.planner.policy import POLICIES
from mesh.tenants import Identity

__all__ = [
    "ALLOWED_DTYPES",
    "POLICIES",
    "SLO",
    "Route",
    "ServedBy",
    "InferRequest",
    "InferResponse",
    "encode_tensor",
    "decode_tensor",
    "encode_request",
    "decode_request",
    "encode_response",
    "decode_response",
    "decode_answer",
    "pack",
    "unpack",
]

ALLOWED_DTYPES: frozenset[str] = frozenset(
    {"float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
)
DEFAULT_MAX_ELEMENTS = 16 * 1024 * 1024
MAX_TENSORS = 16
MAX_HOPS = 8


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(body: bytes) -> Any:
    """Decode msgpack, turning any decoder failure into :class:`InvalidInput`."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidInput(f"body is not valid msgpack: {exc.__class__.__name__}") from None


# --------------------------------------------------------------------------- tensors


#: dtype object -> its wire name, and wire name -> the little-endian dtype (looked up, not
#: derived: ``dtype.name`` and ``newbyteorder`` cost microseconds a call)
_NAME_OF: dict[np.dtype[Any], str] = {np.dtype(n): n for n in ALLOWED_DTYPES}
_LITTLE: dict[str, np.dtype[Any]] = {n: np.dtype(n).newbyteorder("<") for n in ALLOWED_DTYPES}


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    array = np.asarray(array)
    name = _NAME_OF.get(array.dtype)
    if name is None:
        name = array.dtype.name  # a big-endian or unsupported dtype: the slow path
        if name not in ALLOWED_DTYPES:
            raise InvalidInput(f"dtype {name!r} is not supported; use one of "
                               f"{sorted(ALLOWED_DTYPES)}")
    if not array.flags.c_contiguous or array.dtype.byteorder == ">":
        array = np.ascontiguousarray(array, dtype=_LITTLE[name])
    return {"dtype": name, "shape": list(array.shape), "data": array.tobytes()}


def decode_tensor(
    obj: Any, *, where: str = "tensor", max_elements: int = DEFAULT_MAX_ELEMENTS
) -> np.ndarray:
    """Decode one tensor map; every failure names ``where`` and the problem."""
    if not isinstance(obj, dict):
        raise InvalidInput(f"{where}: must be a map with dtype, shape and data")
    missing = [k for k in ("dtype", "shape", "data") if k not in obj]
    if missing:
        raise InvalidInput(f"{where}: missing {', '.join(missing)}")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:  # a list or map is unhashable
        raise InvalidInput(f"{where}.dtype: {brief(dtype)} is not one of {sorted(ALLOWED_DTYPES)}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(f"{where}.shape: must be a list of non-negative integers, got {brief(shape)}")
    if len(shape) > 8:
        raise InvalidInput(f"{where}.shape: at most 8 dimensions, got {len(shape)}")
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidInput(f"{where}.data: must be msgpack bin (raw bytes)")
    count = math.prod(shape)
    if count > max_elements:
        raise PayloadTooLarge(f"{where}: {count} elements exceeds this node's cap of {max_elements}")
    np_dtype = _LITTLE[dtype]
    expected = count * np_dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"{where}.data: {len(data)} bytes, but shape {shape} of {dtype} needs {expected}"
        )
    return np.frombuffer(data, dtype=np_dtype).reshape(shape)


# --------------------------------------------------------------------------- envelopes


@dataclass(frozen=True, slots=True)
class SLO:
    """What the application asks for. Every field is optional.

    ``latency_ms``: end-to-end target as seen by the client.
    ``min_accuracy``: minimum measured accuracy of the variant (0..1).
    ``max_cost_per_1k``: ceiling on hardware cost per 1,000 inferences (USD).
    ``offline``: throughput work; latency does not matter.
    ``policy``: how to choose among feasible candidates.
    ``min_confidence``: for ``cascade``, rows whose top probability is below this
    are escalated to a more accurate variant (the planner's default when unset).
    ``allow_degraded``: when no (node, variant) can meet ``latency_ms``, answer with
    the closest one anyway (marked ``slo_met=False``) instead of refusing at once.
    """

    latency_ms: float | None = None
    min_accuracy: float | None = None
    max_cost_per_1k: float | None = None
    offline: bool = False
    policy: str = "cheapest"
    min_confidence: float | None = None
    allow_degraded: bool = False

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": self.policy}
        if self.latency_ms is not None:
            out["latency_ms"] = self.latency_ms
        if self.min_accuracy is not None:
            out["min_accuracy"] = self.min_accuracy
        if self.max_cost_per_1k is not None:
            out["max_cost_per_1k"] = self.max_cost_per_1k
        if self.offline:
            out["offline"] = True
        if self.min_confidence is not None:
            out["min_confidence"] = self.min_confidence
        if self.allow_degraded:
            out["allow_degraded"] = True
        return out

    @classmethod
    def from_wire(cls, obj: Any) -> SLO:
        if obj is None:
            return cls()
        if isinstance(obj, dict):
            try:
                # types too: True == 1 == 1.0, but only True is a valid ``offline``
                key = tuple((k, type(v), v) for k, v in obj.items())
                cached = _SLO_CACHE.get(key)
            except TypeError:  # an unhashable value: validated (and refused) below
                key, cached = None, None
            if cached is not None and cached.policy in POLICIES:  # policies may be unregistered
                return cached
            slo = cls._parse(obj)
            if key is not None:
                if len(_SLO_CACHE) >= _SLO_CACHE_SIZE:  # clients choose these: bounded
                    _SLO_CACHE.clear()
                _SLO_CACHE[key] = slo
            return slo
        return cls._parse(obj)

    @classmethod
    def _parse(cls, obj: Any) -> SLO:
        if not isinstance(obj, dict):
            raise InvalidInput("slo: must be a map")
        unknown = set(obj) - {"latency_ms", "min_accuracy", "max_cost_per_1k", "offline", "policy",
                              "min_confidence", "allow_degraded"}
        if unknown:  # keys may be str or bytes, which do not sort together
            names = sorted(brief(k) for k in unknown)
            raise InvalidInput(f"slo: unknown field(s) {', '.join(names[:8])}; known: "
                               "latency_ms, min_accuracy, max_cost_per_1k, offline, policy, "
                               "min_confidence, allow_degraded")
        latency = _opt_number(obj, "latency_ms", lo=0.0, hi=3_600_000.0)
        accuracy = _opt_number(obj, "min_accuracy", lo=0.0, hi=1.0)
        cost = _opt_number(obj, "max_cost_per_1k", lo=0.0, hi=math.inf)
        offline = obj.get("offline", False)
        if not isinstance(offline, bool):
            raise InvalidInput("slo.offline: must be true or false")
        policy = obj.get("policy", "cheapest")
        if not isinstance(policy, str) or policy not in POLICIES:  # the planner's registry
            raise InvalidInput(f"slo.policy: {brief(policy)} is not one of {list(POLICIES)}")
        confidence = _opt_number(obj, "min_confidence", lo=0.0, hi=1.0)
        degraded = obj.get("allow_degraded", False)
        if not isinstance(degraded, bool):
            raise InvalidInput("slo.allow_degraded: must be true or false")
        return cls(latency, accuracy, cost, offline, policy, confidence, degraded)


def _opt_number(obj: dict[str, Any], key: str, *, lo: float, hi: float) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    # ints are compared exactly before any float(): 10**400 must be out of range, not overflow
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidInput(f"slo.{key}: must be a number, got {brief(value)}")
    if not lo <= value <= hi:
        raise InvalidInput(f"slo.{key}: must be between {lo:g} and {hi:g}, got {brief(value)}")
    return float(value)


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 3, 40, 40


def brief(value: Any) -> str:
    """``repr`` cut short (length and nesting): a bad value is quoted in errors, never whole."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return _BRIEF.repr(value)


#: SLOs seen recently, by their wire form: most clients send a handful of SLOs many times
_SLO_CACHE: dict[tuple[Any, ...], SLO] = {}
_SLO_CACHE_SIZE = 256


@dataclass(frozen=True, slots=True)
class Route:
    node: str
    variant: str


@dataclass(frozen=True, slots=True)
class ServedBy:
    node: str
    tier: str
    variant: str


@dataclass(slots=True)
class InferRequest:
    """One query. ``wire_tensors`` holds the tensor maps exactly as they arrived, so that a
    node forwarding the query re-packs only its envelope around the same bytes."""

    task: str
    tensors: list[np.ndarray]
    slo: SLO = SLO()
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    budget_ms: float | None = None
    hops: int = 0
    route: Route | None = None
    #: How long the sender waits for the answer, from when it sent the query. Each hop
    #: forwards what is left of it, so a node gives up on a hop before its caller gives up on it.
    timeout_ms: float | None = None
    #: The tenant the entry node established from the caller's API key (mesh.tenants); set
    #: by nodes only, like ``route`` (None: an open mesh).
    tenant: str | None = None
    #: How ``tenant`` travels between nodes: signed, with an expiry and a nonce
    #: (:class:`mesh.tenants.Identity`); the forwarding node signs it for each hop.
    identity: Any = None
    #: The decoded ``tensors`` as they came off the wire (None: encode ``tensors``).
    wire_tensors: list[dict[str, Any]] | None = None

    @property
    def payload_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def rows(self) -> int:
        return int(self.tensors[0].shape[0]) if self.tensors and self.tensors[0].ndim else 0


class InferResponse:
    """One answer. ``outputs`` are decoded from the wire when first read: a node that only
    passes an answer back never decodes (or re-encodes) its tensors."""

    __slots__ = ("request_id", "_outputs", "wire_outputs", "served_by", "timing", "plan", "loads")

    def __init__(self, request_id: str, outputs: list[np.ndarray] | None, served_by: ServedBy,
                 timing: dict[str, float] | None = None, plan: Plan | None = None,
                 loads: dict[str, float] | None = None, *,
                 wire_outputs: list[Any] | None = None) -> None:
        if outputs is None and wire_outputs is None:
            raise ValueError("an InferResponse needs outputs or wire_outputs")
        self.request_id = request_id
        self._outputs = outputs
        self.wire_outputs = wire_outputs if outputs is None else None
        self.served_by = served_by
        self.timing = timing if timing is not None else {}
        self.plan = plan
        self.loads = loads if loads is not None else {}

    @property
    def outputs(self) -> list[np.ndarray]:
        """The output tensors; raises :class:`InvalidInput` when the wire form is malformed."""
        if self._outputs is None:
            assert self.wire_outputs is not None
            self._outputs = [decode_tensor(o, where=f"outputs[{i}]", max_elements=1 << 30)
                             for i, o in enumerate(self.wire_outputs)]
        return self._outputs

    @outputs.setter
    def outputs(self, value: list[np.ndarray]) -> None:
        self._outputs, self.wire_outputs = value, None

    def __repr__(self) -> str:
        return (f"InferResponse({self.request_id!r}, served_by={self.served_by!r}, "
                f"timing={self.timing!r})")


def encode_request(req: InferRequest) -> bytes:
    obj: dict[str, Any] = {
        "task": req.task,
        "tensors": req.wire_tensors if req.wire_tensors is not None
        else [encode_tensor(t) for t in req.tensors],
        "slo": req.slo.to_wire(),
        "request_id": req.request_id,
        "hops": req.hops,
    }
    if req.budget_ms is not None:
        obj["budget_ms"] = req.budget_ms
    if req.timeout_ms is not None:
        obj["timeout_ms"] = req.timeout_ms
    if req.route is not None:
        obj["route"] = {"node": req.route.node, "variant": req.route.variant}
    if req.identity is not None:
        obj["identity"] = req.identity.to_wire()
    return pack(obj)


def decode_request(body: bytes, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> InferRequest:
    obj = unpack(body)
    if not isinstance(obj, dict):
        raise InvalidInput("body: must be a msgpack map")
    task = obj.get("task")
    if not isinstance(task, str) or not task:
        raise InvalidInput("task: required, a non-empty string such as 'digits'")
    tensors = obj.get("tensors")
    if not isinstance(tensors, list) or not tensors:
        raise InvalidInput("tensors: required, a non-empty list of tensors")
    if len(tensors) > MAX_TENSORS:
        raise InvalidInput(f"tensors: at most {MAX_TENSORS}, got {len(tensors)}")
    decoded = [
        decode_tensor(t, where=f"tensors[{i}]", max_elements=max_elements)
        for i, t in enumerate(tensors)
    ]
    request_id = obj.get("request_id") or uuid.uuid4().hex
    if not isinstance(request_id, str) or len(request_id) > 128:
        raise InvalidInput("request_id: must be a string of at most 128 characters")
    hops = obj.get("hops", 0)
    if not isinstance(hops, int) or isinstance(hops, bool) or not 0 <= hops <= MAX_HOPS:
        raise InvalidInput(f"hops: must be an integer between 0 and {MAX_HOPS}")
    budget = obj.get("budget_ms")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not math.isfinite(budget)):
        raise InvalidInput("budget_ms: must be a number")
    timeout = obj.get("timeout_ms")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= 3_600_000):
        raise InvalidInput("timeout_ms: must be a number of milliseconds between 0 and 3600000")
    route = obj.get("route")
    parsed_route = None
    if route is not None:
        if not (
            isinstance(route, dict)
            and isinstance(route.get("node"), str)
            and isinstance(route.get("variant"), str)
        ):
            raise InvalidInput("route: must be a map with string node and variant")
        parsed_route = Route(route["node"], route["variant"])
    identity = obj.get("identity")
    if identity is not None:
        identity = Identity.from_wire(identity)
    return InferRequest(
        task=task,
        tensors=decoded,
        slo=SLO.from_wire(obj.get("slo")),
        request_id=request_id,
        budget_ms=float(budget) if budget is not None else None,
        hops=hops,
        route=parsed_route,
        timeout_ms=float(timeout) if timeout is not None else None,
        tenant=identity.tenant if identity is not None else None,
        identity=identity,
        wire_tensors=tensors,
    )


def encode_response(resp: InferResponse) -> bytes:
    return pack(
        {
            "request_id": resp.request_id,
            "outputs": resp.wire_outputs if resp.wire_outputs is not None
            else [encode_tensor(o) for o in resp.outputs],
            "served_by": {
                "node": resp.served_by.node,
                "tier": resp.served_by.tier,
                "variant": resp.served_by.variant,
            },
            "timing": resp.timing,
            "plan": resp.plan.to_wire() if resp.plan is not None else None,
            "loads": resp.loads,
        }
    )


def decode_response(body: bytes) -> InferResponse:
    """An answer's envelope; its tensors stay as they came until ``outputs`` is read."""
    obj = unpack(body)
    if not isinstance(obj, dict) or not isinstance(obj.get("outputs"), list) \
            or not isinstance(obj.get("served_by"), dict):
        raise InvalidInput("response: not a Tiermesh inference answer")
    sb = obj["served_by"]
    try:
        timing = {str(k): float(v) for k, v in (obj.get("timing") or {}).items()}
        loads = {str(k): float(v) for k, v in (obj.get("loads") or {}).items()}
    except (TypeError, ValueError, AttributeError):
        raise InvalidInput("response: timing and loads must map names to numbers") from None
    return InferResponse(
        str(obj.get("request_id", "")), None,
        ServedBy(str(sb.get("node", "")), str(sb.get("tier", "")), str(sb.get("variant", ""))),
        timing, Plan.from_wire(obj.get("plan")), loads, wire_outputs=obj["outputs"],
    )


def decode_answer(status: int, body: bytes) -> InferResponse:
    """An HTTP answer to ``/v1/infer``: the response, or the error the node sent, raised."""
    if status != 200:
        try:
            payload = unpack(body)
        except InvalidInput:
            payload = body[:200].decode(errors="replace")
        raise error_from_payload(status, payload)
    return decode_response(body)
