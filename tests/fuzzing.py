"""Hostile inputs for a node's three request surfaces, and a harness that sends them.

Shared by ``tests/nodes/test_fuzz.py`` (a bounded run in ``make test``) and
``benchmarks/fuzz.py`` (10,000+ cases against a node process). Hypothesis
draws the inputs: random bytes, well-formed envelopes holding wrong values,
deep nesting, numbers no float holds, unhashable values where names go,
frames of every kind, oversized frame headers and frames cut short. The
harness sends each to a live node on loopback and records the status; a 5xx
is a defect (bad input must get a 4xx naming the problem). Between cases it
checks that valid queries are still answered.
"""

from __future__ import annotations

import collections
import copy
import http.client
import json
import socket
import struct
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mesh.stream import ANSWER, ERROR, HELLO, INFER, FrameReader, frame, frame_answer
from mesh.wire import ALLOWED_DTYPES, InferRequest, encode_request

__all__ = ["Target", "Tally", "SURFACES", "run_surface", "valid_queries_answered", "rss_bytes"]

HOST = "127.0.0.1"
OIP_TYPES = ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
SLO_KEYS = ["latency_ms", "min_accuracy", "max_cost_per_1k", "offline", "policy",
            "min_confidence", "allow_degraded"]
HEADER = struct.Struct(">IIB")

# --------------------------------------------------------------------------- values

_HUGE = st.sampled_from([10**400, -(10**400), 2**63, 2**64, -(2**63) - 1, 10**4000])
_FLOATS = st.floats() | st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -0.0])
_JSON_SCALARS = (st.none() | st.booleans() | st.integers() | _HUGE | _FLOATS
                 | st.text(max_size=12))
#: anything json.dumps writes (NaN and Infinity too, which Python's json reads)
JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=12)
_PACK_SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | _FLOATS
                 | st.text(max_size=12) | st.binary(max_size=24))
#: anything msgpack packs, maps keyed by str or bytes
PACK_VALUES = st.recursive(
    _PACK_SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), inner, max_size=4),
    max_leaves=12)


def _nested(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


_DEPTHS = st.integers(1, 3000)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a nest of dicts and lists, the root included."""
    out = [prefix]
    if len(prefix) > 6:  # a nest drawn deep on purpose is replaced whole, not walked
        return out
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, prefix + (key,))
    elif isinstance(obj, list) and len(obj) <= 8:
        for i, value in enumerate(obj):
            out += _paths(value, prefix + (i,))
    return out


@st.composite
def _mutated(draw: Callable[[st.SearchStrategy[Any]], Any], valid: st.SearchStrategy[Any],
             values: st.SearchStrategy[Any]) -> Any:
    """A valid request with one to three of its parts replaced, removed or added to."""
    def value() -> Any:  # a copy: sampled values are shared between examples
        return copy.deepcopy(draw(values))

    obj = copy.deepcopy(draw(valid))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(obj)))
        if not path:
            return value()
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "remove", "add"]))
        if action == "remove":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = value()
        else:
            parent[path[-1]] = value()
    return obj


def _slo_values(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    numbers = values | st.integers(-5, 5000) | st.sampled_from(["cheapest", "cascade", "fastest"])
    return st.fixed_dictionaries({}, optional={k: numbers for k in SLO_KEYS}) | values


# --------------------------------------------------------------------------- /v1/infer (msgpack)

def _rows_tensor(rows: int) -> dict[str, Any]:
    return {"dtype": "float32", "shape": [rows, 64], "data": bytes(rows * 256)}


_TENSORS = st.one_of(
    st.integers(1, 4).map(_rows_tensor),
    st.fixed_dictionaries({}, optional={
        "dtype": st.sampled_from(sorted(ALLOWED_DTYPES) + ["float128", "object", "<f4", ""])
        | PACK_VALUES | _DEPTHS.map(lambda d: _nested(d % 400, "float32")),
        "shape": st.lists(st.integers(-2, 70), max_size=9) | PACK_VALUES
        | st.sampled_from([[1, 64], [0, 64], [2**40, 2**40], [4097, 64], [1, 64, 1]]),
        "data": st.binary(max_size=600) | PACK_VALUES,
    }),
    PACK_VALUES)

_REQUESTS = st.fixed_dictionaries({}, optional={
    "task": st.sampled_from(["digits", "", "sentence-embedding", "nope"]) | PACK_VALUES,
    "tensors": st.lists(_TENSORS, max_size=3) | PACK_VALUES,
    "slo": _slo_values(PACK_VALUES),
    "request_id": st.text(max_size=140) | PACK_VALUES,
    "hops": st.integers(-1, 10) | PACK_VALUES,
    "budget_ms": _FLOATS | st.integers(-(2**63), 2**63 - 1) | PACK_VALUES,
    "timeout_ms": _FLOATS | st.integers(-5, 4_000_000) | PACK_VALUES,
    "route": st.fixed_dictionaries({"node": st.sampled_from(["solo-1", "ghost", "edge-1"]),
                                    "variant": st.sampled_from(["digits-linear", "minilm-x"])})
    | PACK_VALUES,
})

_VALID_REQUESTS = st.builds(
    lambda rows, slo: {"task": "digits", "tensors": [_rows_tensor(rows)], "slo": slo,
                       "request_id": "fuzz", "hops": 0},
    st.integers(1, 4), st.sampled_from([{}, {"latency_ms": 50}, {"min_accuracy": 0.9,
                                                                  "policy": "fastest"}]))
_MUTATED_REQUESTS = _mutated(_VALID_REQUESTS, PACK_VALUES | _DEPTHS.map(lambda d: _nested(d % 400))
                             | st.sampled_from(
    [[], {}, "", 2**64 - 1, -(2**63), float("nan"), b"", [1, 64], "float32", "digits"]))

MSGPACK_BODIES: st.SearchStrategy[bytes] = st.one_of(
    _MUTATED_REQUESTS.map(lambda obj: msgpack.packb(obj, use_bin_type=True)),
    _MUTATED_REQUESTS.map(lambda obj: msgpack.packb(obj, use_bin_type=True)),
    _REQUESTS.map(lambda obj: msgpack.packb(obj, use_bin_type=True)),
    PACK_VALUES.map(lambda obj: msgpack.packb(obj, use_bin_type=True)),
    st.binary(max_size=300),
    st.integers(1, 200_000).map(lambda d: b"\x91" * d + b"\xc0"),  # arrays nested d deep
)

# --------------------------------------------------------------------------- OIP (JSON, binary)

_OIP_INPUT = st.one_of(
    st.integers(1, 3).map(lambda n: {"name": "input", "datatype": "FP32", "shape": [n, 64],
                                     "data": [0.5] * (n * 64)}),
    st.fixed_dictionaries({}, optional={
        "name": st.just("input") | JSON_VALUES,
        "datatype": st.sampled_from(OIP_TYPES + ["FP8", "STRING", "fp32"]) | JSON_VALUES,
        "shape": st.lists(st.integers(-1, 70), max_size=9) | JSON_VALUES
        | st.sampled_from([[1, 64], [2, 64], [1, 1], [10**30, 64]]),
        "data": JSON_VALUES | st.lists(_FLOATS | st.integers() | _HUGE, max_size=70)
        | _DEPTHS.map(lambda d: _nested(d % 950)),
        "parameters": JSON_VALUES | st.fixed_dictionaries(
            {"binary_data_size": st.integers(-1, 600) | JSON_VALUES}),
    }),
    JSON_VALUES)

_OIP_OUTPUT = st.fixed_dictionaries({}, optional={
    "name": st.just("probs") | JSON_VALUES,
    "parameters": JSON_VALUES | st.fixed_dictionaries({"binary_data": st.booleans() | JSON_VALUES}),
}) | JSON_VALUES

_OIP_OBJECTS = st.fixed_dictionaries({}, optional={
    "inputs": st.lists(_OIP_INPUT, max_size=3) | JSON_VALUES,
    "outputs": st.lists(_OIP_OUTPUT, max_size=3) | JSON_VALUES,
    "parameters": st.dictionaries(
        st.sampled_from([f"tiermesh_{k}" for k in SLO_KEYS] + ["binary_data_output", "x"]),
        JSON_VALUES | _HUGE | st.integers(-5, 5000), max_size=4) | JSON_VALUES,
    "id": st.text(max_size=140) | JSON_VALUES,
})

#: mostly the task the node serves (hypothesis draws the first value of a range most), so
#: that most cases get past the task lookup
_TASKS = st.integers(0, 7).flatmap(lambda i: st.just("digits") if i < 6 else st.text(max_size=12)
                                   | st.sampled_from(["nope", "digits/../x", "%00", ""]))
_VALID_OIP = st.builds(
    lambda rows, params, outputs: {"inputs": [{"name": "input", "datatype": "FP32",
                                               "shape": [rows, 64], "data": [0.25] * (rows * 64)}],
                                   "parameters": params, "outputs": outputs, "id": "fuzz"},
    st.integers(1, 2),
    st.sampled_from([{}, {"tiermesh_latency_ms": 50}, {"binary_data_output": True}]),
    st.sampled_from([[{"name": "probs"}], [{"name": "probs", "parameters": {"binary_data": True}}]]))
_MUTATED_OIP = _mutated(_VALID_OIP, JSON_VALUES | _HUGE | _DEPTHS.map(lambda d: _nested(d % 300))
                        | st.sampled_from([[], {}, "", "FP32", "input", "probs", [1, 64], 0]))


def _oip_path(task: str) -> str:
    return f"/v2/models/{urllib.parse.quote(task, safe='') or 'x'}/infer"


def _deep_json(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


def _deep_data(depth: int) -> bytes:
    head = '{"inputs":[{"name":"input","datatype":"FP32","shape":[1,64],"data":'
    return (head + "[" * depth + "1" + "]" * depth + "}]}").encode()


OIP_JSON_REQUESTS: st.SearchStrategy[tuple[str, dict[str, str], bytes]] = st.tuples(
    _TASKS.map(_oip_path),
    st.just({"Content-Type": "application/json"}),
    st.one_of(_MUTATED_OIP.map(lambda o: json.dumps(o).encode()),
              _MUTATED_OIP.map(lambda o: json.dumps(o).encode()),
              _OIP_OBJECTS.map(lambda o: json.dumps(o).encode()),
              JSON_VALUES.map(lambda o: json.dumps(o).encode()),
              st.binary(max_size=200),
              st.integers(1, 300_000).map(_deep_json),
              st.integers(1, 100_000).map(_deep_data)))


@st.composite
def _oip_binary(draw: Callable[[st.SearchStrategy[Any]], Any]) -> tuple[str, dict[str, str], bytes]:
    rows = draw(st.integers(1, 2))
    valid = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 64],
                         "parameters": {"binary_data_size": rows * 256}}],
             "outputs": [{"name": "probs", "parameters": {"binary_data": True}}],
             "parameters": {"tiermesh_latency_ms": 100}}
    header = json.dumps(draw(_mutated(st.just(valid), JSON_VALUES | _HUGE) | st.just(valid)
                             | _OIP_OBJECTS)).encode()
    tail = draw(st.just(bytes(rows * 256)) | st.binary(max_size=600))
    length = draw(st.just(str(len(header))) | st.integers(-3, len(header) + 700).map(str)
                  | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=6)
                  | st.sampled_from(["1" * 5000, "0x10", " 7 ", "1_0", "-0"]))
    task = draw(_TASKS)
    headers = {"Content-Type": "application/octet-stream",
               "Inference-Header-Content-Length": length}
    return _oip_path(task), headers, header + tail


OIP_BINARY_REQUESTS = _oip_binary()

# --------------------------------------------------------------------------- stream frames


@dataclass(frozen=True)
class StreamCase:
    """Bytes for one fresh connection; ``partial``: the last frame is cut short."""

    data: bytes
    frames: int
    partial: bool


@st.composite
def _stream_case(draw: Callable[[st.SearchStrategy[Any]], Any]) -> StreamCase:
    chunks = []
    specs = draw(st.lists(st.tuples(
        st.integers(0, 2**32 - 1),
        st.sampled_from([INFER, INFER, INFER, ANSWER, ERROR, HELLO]) | st.integers(0, 255),
        MSGPACK_BODIES), min_size=1, max_size=4))
    for request_id, kind, payload in specs:
        chunks.append(frame(request_id, kind, payload))
    oversize = draw(st.booleans()) and draw(st.booleans())
    if oversize:  # a header announcing more than any node reads; its payload never comes
        chunks.append(HEADER.pack(draw(st.integers(2**26, 2**32 - 1)), 7, INFER))
    partial = not oversize and draw(st.booleans())
    if partial:
        whole = frame(draw(st.integers(0, 2**32 - 1)), INFER, draw(MSGPACK_BODIES))
        chunks.append(whole[:draw(st.integers(1, len(whole) - 1))])
    return StreamCase(b"".join(chunks), len(specs), partial)


STREAM_CASES = _stream_case()

# --------------------------------------------------------------------------- harness


@dataclass(frozen=True)
class Target:
    """A node on loopback: its HTTP port and its stream port."""

    http_port: int
    stream_port: int
    host: str = HOST


@dataclass
class Tally:
    """What one surface answered: statuses by count, and the first 5xx inputs (shortened).

    A 503 that says when to retry (``Retry-After``; on the stream ``retry_after_s``) is the
    node refusing what it cannot do now, such as a latency target nothing meets (issue 8,
    item 3): it is counted in ``refusals``, not as a defect. Every other 5xx is one.
    """

    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    cases: int = 0
    server_errors: list[str] = field(default_factory=list)
    #: stream connections the node neither answered nor closed in time
    hung: int = 0
    #: checks that valid queries on every surface were still answered, and how many failed
    valid_checks: int = 0
    valid_failures: int = 0

    #: 503s that said when to retry
    refusals: int = 0

    def record(self, status: int, example: bytes | str, *, retry_after: bool = False) -> None:
        self.statuses[status] += 1
        if status == 503 and retry_after:
            self.refusals += 1
        elif status >= 500 and len(self.server_errors) < 5:
            self.server_errors.append(repr(example[:300]))

    @property
    def five_xx(self) -> int:
        """5xx answers other than refusals that say when to retry."""
        return sum(n for status, n in self.statuses.items() if status >= 500) - self.refusals


class _Http:
    """One kept-alive HTTP connection, opened again when the node closes it."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._conn: http.client.HTTPConnection | None = None

    def post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bool]:
        """(status, whether it carries Retry-After)."""
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.target.host, self.target.http_port,
                                                        timeout=30)
            try:
                self._conn.request("POST", path, body=body, headers=headers)
                response = self._conn.getresponse()
                response.read()
            except (ConnectionError, http.client.BadStatusLine):
                self.close()  # a kept connection the node had closed: once more on a new one
                if attempt:
                    raise
                continue
            except BaseException:
                self.close()
                raise
            if response.will_close:
                self.close()
            return response.status, response.getheader("Retry-After") is not None
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _Stream:
    """Sends stream cases on fresh connections; checks their answers a batch at a time.

    Connections whose last frame is cut short must be closed by the node (its
    read timeout); they are drained together so that those waits overlap.
    """

    def __init__(self, target: Target, tally: Tally, *, wait_s: float, batch: int = 32,
                 strict: bool = True) -> None:
        self.target, self.tally, self.wait_s, self.batch = target, tally, wait_s, batch
        self.strict = strict  # a connection left hanging fails at once (else it is counted)
        self.pending: list[tuple[socket.socket, StreamCase]] = []

    def send(self, case: StreamCase) -> None:
        sock = socket.create_connection((self.target.host, self.target.stream_port), timeout=5)
        try:
            sock.sendall(case.data)
        except ConnectionError:  # closed by the node mid-send (a frame over the cap)
            pass
        self.pending.append((sock, case))
        if len(self.pending) >= self.batch:
            self.drain()

    def drain(self) -> None:
        pending, self.pending = self.pending, []
        for sock, case in pending:
            try:
                self._answers(sock, case)
            finally:
                sock.close()

    def _answers(self, sock: socket.socket, case: StreamCase) -> None:
        """Read until the node has answered every whole frame, or closed the connection."""
        reader = FrameReader(1 << 30)
        got = 0
        sock.settimeout(self.wait_s)
        while True:
            if got >= case.frames and not case.partial:
                return
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return
            except TimeoutError:
                self.tally.hung += 1
                if not self.strict:
                    return
                raise AssertionError(f"the node neither answered nor closed within "
                                     f"{self.wait_s} s: {case.data[:200]!r}") from None
            if not data:
                return
            for _, kind, payload in reader.feed(data):
                got += 1
                status, body = frame_answer(kind, payload)
                retry = False
                if kind == ERROR:
                    error = msgpack.unpackb(body, raw=False).get("error", {})
                    retry = error.get("retry_after_s") is not None
                self.tally.record(status, case.data, retry_after=retry)


def _valid_request(rows: int = 1) -> InferRequest:
    rng = np.random.default_rng(rows)
    return InferRequest("digits", [rng.random((rows, 64), dtype=np.float32) * 16])


def valid_queries_answered(target: Target) -> None:
    """A valid query over each surface is answered 200 with a ``[1, 10]`` output."""
    body = encode_request(_valid_request())
    conn = http.client.HTTPConnection(target.host, target.http_port, timeout=30)
    try:
        conn.request("POST", "/v1/infer", body=body,
                     headers={"Content-Type": "application/msgpack"})
        response = conn.getresponse()
        answer = msgpack.unpackb(response.read(), raw=False)
        assert response.status == 200, answer
        assert answer["outputs"][0]["shape"] == [1, 10]
        oip = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                           "data": [1.0] * 64}]}
        conn.request("POST", "/v2/models/digits/infer", body=json.dumps(oip).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        reply = json.loads(response.read())
        assert response.status == 200, reply
        assert reply["outputs"][0]["shape"] == [1, 10]
    finally:
        conn.close()
    with socket.create_connection((target.host, target.stream_port), timeout=30) as sock:
        sock.sendall(frame(9, INFER, body))
        reader = FrameReader(1 << 30)
        frames: list[tuple[int, int, bytes]] = []
        while not frames:
            data = sock.recv(65536)
            assert data, "the node closed the stream instead of answering a valid query"
            frames = reader.feed(data)
        assert frames[0][:2] == (9, ANSWER), msgpack.unpackb(frames[0][2], raw=False)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


#: surface name -> strategy of its cases
SURFACES: dict[str, st.SearchStrategy[Any]] = {
    "msgpack": MSGPACK_BODIES,
    "oip_json": OIP_JSON_REQUESTS,
    "oip_binary": OIP_BINARY_REQUESTS,
    "stream": STREAM_CASES,
}


def run_surface(surface: str, target: Target, tally: Tally, *, cases: int,
                stream_wait_s: float, check_every: int = 50, raise_on_5xx: bool = True,
                derandomize: bool = True) -> None:
    """Send ``cases`` drawn inputs of one surface to ``target``, recording every status.

    ``raise_on_5xx``: fail at the first 5xx (hypothesis then shrinks the
    input); otherwise count them. Every ``check_every`` cases a valid query
    on each surface must still be answered. ``derandomize``: the same cases
    every run (for tests); otherwise new ones each time.
    """
    http = _Http(target)
    stream = _Stream(target, tally, wait_s=stream_wait_s, strict=raise_on_5xx)

    def send(case: Any) -> None:
        tally.cases += 1
        seen = tally.five_xx
        if surface == "stream":
            stream.send(case)
            if raise_on_5xx:
                stream.drain()
        else:
            path, headers, body = (("/v1/infer", {"Content-Type": "application/msgpack"}, case)
                                   if surface == "msgpack" else case)
            status, retry = http.post(path, headers, body)
            tally.record(status, body, retry_after=retry)
        if raise_on_5xx:
            assert tally.five_xx == seen, f"{surface}: 5xx for {tally.server_errors[-1]}"
        if tally.cases % check_every == 0:
            stream.drain()
            tally.valid_checks += 1
            try:
                valid_queries_answered(target)
            except (AssertionError, OSError):
                tally.valid_failures += 1
                if raise_on_5xx:
                    raise

    phases = [p for p in Phase if raise_on_5xx or p is not Phase.shrink]
    runner = settings(max_examples=cases, deadline=None, database=None, derandomize=derandomize,
                      phases=phases, suppress_health_check=list(HealthCheck)
                      )(given(SURFACES[surface])(send))
    try:
        runner()
    finally:
        stream.drain()
        http.close()
