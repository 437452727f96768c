"""Open Inference Protocol v2 (KServe / Triton) over HTTP, on the same agent.

Routes::

    GET  /v2/health/live             200 while the process runs
    GET  /v2/health/ready            200 once the agent serves, else 503
    GET  /v2                         server metadata
    GET  /v2/models/{task}           model metadata: the task's inputs and outputs
    GET  /v2/models/{task}/ready     200 when a route to a variant of the task exists from here
    POST /v2/models/{task}/infer     inference, JSON or with the binary tensor data extension

The task name stands where the model name goes; the mesh picks the variant.
SLO fields travel in the request's ``parameters`` under our own keys
(:data:`SLO_PARAMETERS`: ``tiermesh_latency_ms``, ``tiermesh_min_accuracy``,
``tiermesh_max_cost_per_1k``, ``tiermesh_offline``, ``tiermesh_policy``,
``tiermesh_min_confidence``); other parameters are ignored, as the protocol
allows. The response's ``model_version`` and ``parameters`` say which
variant, node and tier served it (``tiermesh_variant``, ``tiermesh_node``,
``tiermesh_tier``) and where the time went.

Binary tensor data: a request whose ``Inference-Header-Content-Length``
header is N carries its JSON in the first N bytes and, after it, the raw
little-endian bytes of each input whose parameters give ``binary_data_size``,
in input order. Outputs come back the same way when an output asks for
``binary_data`` or the request sets ``binary_data_output``. Errors are
``{"error": "..."}`` with the status of the :mod:`mesh.errors` class (the
app's middleware writes them).

The conversions are plain functions (:func:`parse_infer`,
:func:`encode_infer`); the handlers only read the body, call the agent and
write the answer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from mesh import __version__
from mesh.errors import InvalidInput, NoRoute, PayloadTooLarge, Unavailable, UnknownTask
from mesh.registry import TensorSpec
from mesh.wire import SLO, InferRequest, InferResponse, brief
from nodes.agent import NodeAgent
from nodes.limits import NodeLimits, read_body, read_feedback

__all__ = ["OipAdapter", "SLO_PARAMETERS", "OutputChoice", "parse_infer", "encode_infer",
           "HEADER_LENGTH"]

HEADER_LENGTH = "Inference-Header-Content-Length"
PREFIX = "tiermesh_"
#: request parameter -> SLO field
SLO_PARAMETERS: dict[str, str] = {
    f"{PREFIX}{field}": field
    for field in ("latency_ms", "min_accuracy", "max_cost_per_1k", "offline", "policy",
                  "min_confidence")
}

_TO_NUMPY: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT16": "int16", "INT32": "int32",
    "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
_FROM_NUMPY: dict[str, str] = {v: k for k, v in _TO_NUMPY.items()}
# dtype objects resolved once: dtype.name and newbyteorder() cost microseconds per call
_LE_DTYPES: dict[str, np.dtype[Any]] = {k: np.dtype(v).newbyteorder("<") for k, v in _TO_NUMPY.items()}
_DATATYPE_OF: dict[np.dtype[Any], str] = {np.dtype(v): k for k, v in _TO_NUMPY.items()}


def oip_datatype(dtype: str) -> str:
    return _FROM_NUMPY.get(dtype, dtype.upper())


@dataclass(frozen=True, slots=True)
class OutputChoice:
    """Which outputs the client asked for (None: all) and which come back as binary."""

    names: tuple[str, ...] | None
    binary: frozenset[str]
    binary_default: bool


# --------------------------------------------------------------------------- requests


def _json_object(raw: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput(f"{where}: not valid JSON") from None
    except RecursionError:  # json's C scanner refuses nesting deeper than the recursion limit
        raise InvalidInput(f"{where}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"{where}: must be a JSON object")
    return obj


_NO_SLO = SLO()


def _slo(parameters: dict[str, Any]) -> SLO:
    wire = {field: parameters[key] for key, field in SLO_PARAMETERS.items() if key in parameters}
    if not wire:
        return _NO_SLO
    try:
        return SLO.from_wire(wire)
    except InvalidInput as exc:
        raise InvalidInput(exc.message.replace("slo.", f"parameters.{PREFIX}")) from None


def _tensor(obj: Any, i: int, spec_by_name: dict[str, TensorSpec], binary: memoryview,
            offset: int, max_elements: int) -> tuple[str, np.ndarray, int]:
    where = f"inputs[{i}]"
    if not isinstance(obj, dict):
        raise InvalidInput(f"{where}: must be an object with name, shape, datatype and data")
    name = obj.get("name")
    if not isinstance(name, str) or name not in spec_by_name:
        raise InvalidInput(f"{where}.name: {brief(name)} is not an input of this model; "
                           f"inputs: {', '.join(spec_by_name)}")
    datatype = obj.get("datatype")
    dtype = _TO_NUMPY.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidInput(f"{where}.datatype: {brief(datatype)} is not supported; use one of "
                           f"{', '.join(_TO_NUMPY)}")
    shape = obj.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"{where}.shape: must be a list of at most 8 non-negative integers")
    count = math.prod(shape)
    if count > max_elements:
        raise PayloadTooLarge(f"{where}: {count} elements exceeds this node's cap of {max_elements}")
    np_dtype = _LE_DTYPES[datatype]
    parameters = obj.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != count * np_dtype.itemsize:
            raise InvalidInput(f"{where}.parameters.binary_data_size: {brief(size)} bytes, but shape "
                               f"{shape} of {datatype} needs {count * np_dtype.itemsize}")
        if offset + size > len(binary):
            raise InvalidInput(f"{where}: the body ends before its {size} bytes of binary data")
        array = np.frombuffer(binary[offset:offset + size], dtype=np_dtype).reshape(shape)
        return name, array, offset + size
    if "data" not in obj:
        raise InvalidInput(f"{where}: needs data, or parameters.binary_data_size with binary data")
    try:
        parsed = np.array(obj["data"])
    except (ValueError, TypeError, RecursionError):
        raise InvalidInput(f"{where}.data: must be a flat or nested list of numbers, "
                           "not ragged or nested deeper than 64 levels") from None
    if parsed.dtype.kind not in _KINDS[np_dtype.kind] or parsed.size != count:
        raise InvalidInput(f"{where}.data: expected {count} {datatype} values for shape {shape}, "
                           f"got {parsed.size} of kind {parsed.dtype.name}")
    return name, _cast(parsed, np_dtype, f"{where}.data", datatype).reshape(shape), offset


#: numpy kinds of parsed JSON data each datatype's kind takes (no float -> int truncation)
_KINDS = {"b": "b", "i": "biu", "u": "biu", "f": "biuf"}


def _cast(parsed: np.ndarray, dtype: np.dtype[Any], where: str, datatype: str) -> np.ndarray:
    """``parsed`` as ``dtype``; a value the datatype cannot hold is refused, not wrapped."""
    if dtype.kind in "iu" and parsed.size and parsed.dtype != dtype:
        info = np.iinfo(dtype)
        if parsed.min() < info.min or parsed.max() > info.max:
            raise InvalidInput(f"{where}: values outside {datatype}'s range "
                               f"[{info.min}, {info.max}]")
    try:
        with np.errstate(over="raise"):
            return parsed.astype(dtype, copy=False)
    except FloatingPointError:
        raise InvalidInput(f"{where}: values outside {datatype}'s range") from None


def parse_infer(task: str, body: bytes, header_length: int | None, inputs: tuple[TensorSpec, ...],
                outputs: tuple[TensorSpec, ...], *, max_elements: int
                ) -> tuple[InferRequest, OutputChoice]:
    """An OIP inference request (JSON, or JSON + binary tensors) -> a mesh query.

    Raises :class:`InvalidInput` naming the offending field.
    """
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH}: {header_length} is not within the body's "
                               f"{len(body)} bytes")
        obj = _json_object(body[:header_length], "inference header")
        binary = memoryview(body)[header_length:]
    else:
        obj = _json_object(body, "body")
        binary = memoryview(b"")
    parameters = obj.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("parameters: must be an object")
    raw_inputs = obj.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("inputs: required, a non-empty list of tensors")
    spec_by_name = {s.name: s for s in inputs}
    given: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(raw_inputs):
        name, array, offset = _tensor(item, i, spec_by_name, binary, offset, max_elements)
        if name in given:
            raise InvalidInput(f"inputs[{i}].name: {name!r} is given twice")
        given[name] = array
    if offset != len(binary):
        raise InvalidInput(f"body: {len(binary) - offset} bytes of binary data belong to no input")
    missing = [s.name for s in inputs if s.name not in given]
    if missing:
        raise InvalidInput(f"inputs: missing {', '.join(missing)}")
    request_id = obj.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 128):
        raise InvalidInput("id: must be a string of at most 128 characters")
    tensors = [given[s.name] for s in inputs]
    req = (InferRequest(task, tensors, _slo(parameters), request_id) if request_id
           else InferRequest(task, tensors, _slo(parameters)))
    binary_default = parameters.get("binary_data_output") is True
    known = {s.name for s in outputs}
    raw_outputs = obj.get("outputs")
    if raw_outputs is None:
        return req, OutputChoice(None, frozenset(), binary_default)
    if not isinstance(raw_outputs, list):
        raise InvalidInput("outputs: must be a list of {name, parameters}")
    names, binary_names = [], set()
    for i, item in enumerate(raw_outputs):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or name not in known:
            raise InvalidInput(f"outputs[{i}].name: {brief(name)} is not an output of this model; "
                               f"outputs: {', '.join(s.name for s in outputs)}")
        names.append(name)
        out_params = item.get("parameters") or {}
        if not isinstance(out_params, dict):
            raise InvalidInput(f"outputs[{i}].parameters: must be an object")
        if out_params.get("binary_data", binary_default) is True:
            binary_names.add(name)
    return req, OutputChoice(tuple(names), frozenset(binary_names), binary_default)


# --------------------------------------------------------------------------- responses


def encode_infer(task: str, resp: InferResponse, outputs: tuple[TensorSpec, ...],
                 choice: OutputChoice) -> tuple[bytes, int | None]:
    """The OIP response body, and the JSON header's length when binary data follows."""
    parameters: dict[str, Any] = {
        f"{PREFIX}node": resp.served_by.node,
        f"{PREFIX}tier": resp.served_by.tier,
        f"{PREFIX}variant": resp.served_by.variant,
    }
    for key in ("queue_ms", "compute_ms", "network_ms"):
        if key in resp.timing:
            parameters[f"{PREFIX}{key}"] = round(resp.timing[key], 4)
    if resp.plan is not None:
        parameters[f"{PREFIX}feasible"] = resp.plan.feasible
    by_name = {spec.name: (spec, array) for spec, array in zip(outputs, resp.outputs, strict=False)}
    wanted = choice.names if choice.names is not None else tuple(by_name)
    body_outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in wanted:
        spec, array = by_name[name]
        if not array.flags.c_contiguous or array.dtype.byteorder == ">":
            array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        datatype = _DATATYPE_OF.get(array.dtype) or oip_datatype(array.dtype.name)
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in choice.binary or (choice.names is None and choice.binary_default):
            blob = array.tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = array.ravel().tolist()
        body_outputs.append(out)
    header = json.dumps({"model_name": task, "model_version": resp.served_by.variant,
                         "id": resp.request_id, "parameters": parameters,
                         "outputs": body_outputs}, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


# --------------------------------------------------------------------------- handlers


class OipAdapter:
    """The OIP v2 REST surface of one agent."""

    def __init__(self, agent: NodeAgent, limits: NodeLimits | None = None) -> None:
        self.agent = agent
        self.limits = limits or NodeLimits.for_agent(agent)
        self._specs_by_task: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] = {}

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v2/health/live", self.live),
            web.get("/v2/health/ready", self.ready),
            web.get("/v2", self.server_metadata),
            web.get("/v2/models/{task}", self.model_metadata),
            web.get("/v2/models/{task}/ready", self.model_ready),
            web.post("/v2/models/{task}/infer", self.infer),
            # an extension of OIP: ground truth for an answer ({"id": ..., "label": ...})
            web.post("/v2/models/{task}/feedback", self.feedback),
        ]

    async def feedback(self, request: web.Request) -> web.Response:
        """``client.feedback`` for OIP clients: the ``id`` an infer answer carried and the
        true class per row; the answer must be to this model (task)."""
        tenant = self.agent.tenancy.authenticate(request.headers.get("Authorization"))
        request_id, label = await read_feedback(request, id_key="id")
        return web.json_response(self.agent.feedback(request_id, label, tenant=tenant,
                                                     task=request.match_info["task"]))

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        """Ready as ``/healthz`` is: started, and what it hosts loaded (or loadable at once)."""
        waiting = self.agent.waiting_for()
        if waiting:
            raise Unavailable(f"this node is not ready yet: waiting for {', '.join(waiting)}",
                              retry_after_s=1.0)
        return web.json_response({"ready": True})

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "tiermesh", "version": __version__,
                                  "extensions": ["binary_tensor_data"]})

    def _visible(self, request: web.Request) -> str:
        """The model (task) named in the path, as this caller may see it: on a mesh with
        tenants, a key is needed, and another tenant's private task does not exist (404)."""
        task = request.match_info["task"]
        agent = self.agent
        tenant = agent.tenancy.authenticate(request.headers.get("Authorization"))
        agent.check_visible(task, tenant)
        return task

    def _specs(self, task: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        specs = self._specs_by_task.get(task)
        if specs is None:
            first = self.agent.registry.for_task(task)[0]  # raises UnknownTask (404)
            specs = self._specs_by_task[task] = (first.inputs, first.outputs)
        return specs

    async def model_metadata(self, request: web.Request) -> web.Response:
        task = self._visible(request)
        inputs, outputs = self._specs(task)
        return web.json_response({
            "name": task,
            "versions": [v.name for v in self.agent.registry.for_task(task)],
            "platform": "tiermesh",
            "inputs": [{"name": s.name, "datatype": oip_datatype(s.dtype), "shape": list(s.shape)}
                       for s in inputs],
            "outputs": [{"name": s.name, "datatype": oip_datatype(s.dtype), "shape": list(s.shape)}
                        for s in outputs],
        })

    async def model_ready(self, request: web.Request) -> web.Response:
        task = self._visible(request)
        self._specs(task)
        try:
            self.agent.planner.plan(task, SLO(), self.agent.name, self.agent.view,
                                    now=self.agent.clock())
        except (NoRoute, UnknownTask) as exc:
            raise Unavailable(f"model {task!r} is not ready here: {exc.message}",
                              retry_after_s=1.0) from None
        if not self.agent.ready:
            raise Unavailable("this node is starting or stopping", retry_after_s=1.0)
        return web.json_response({"name": task, "ready": True})

    async def infer(self, request: web.Request) -> web.Response:
        task = self._visible(request) if self.agent.tenancy.private \
            else request.match_info["task"]
        inputs, outputs = self._specs(task)
        header = request.headers.get(HEADER_LENGTH)
        try:
            header_length = None if header is None else int(header)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH}: {header[:40]!r} is not an integer") from None
        limits = self.limits
        async with read_body(request, cap=limits.caps.json_bytes, budget=limits.budget,
                             timeout_s=limits.read_timeout_s) as body:
            req, choice = parse_infer(task, body, header_length, inputs, outputs,
                                      max_elements=self.agent.config.max_elements)
        resp = await self.agent.infer(req, from_client=True,
                                      authorization=request.headers.get("Authorization"))
        served = self.agent.registry.variants.get(resp.served_by.variant)
        payload, json_length = encode_infer(task, resp, served.outputs if served else outputs,
                                            choice)
        if json_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload, content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(json_length)})
