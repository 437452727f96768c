"""The msgpack envelope and tensor codec: round trips and every kind of bad input."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from mesh.errors import InvalidInput, PayloadTooLarge
from mesh.plan import Detour, Plan
from mesh.wire import (
    SLO,
    InferRequest,
    InferResponse,
    Route,
    ServedBy,
    decode_request,
    decode_response,
    decode_tensor,
    encode_request,
    encode_response,
    encode_tensor,
)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int8", "uint8", "int64", "bool", "float16"])
def test_tensor_round_trip_keeps_values_dtype_and_shape(dtype: str) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 2)) * 10).astype(dtype)
    back = decode_tensor(encode_tensor(array))
    assert back.dtype == array.dtype
    assert back.shape == (3, 4, 2)
    np.testing.assert_array_equal(back, array)


def test_non_contiguous_and_big_endian_arrays_are_sent_correctly() -> None:
    array = np.arange(24, dtype=">i4").reshape(4, 6)[:, ::2]
    back = decode_tensor(encode_tensor(array))
    np.testing.assert_array_equal(back, array)


def test_byte_count_must_match_shape() -> None:
    obj = encode_tensor(np.zeros((2, 64), np.float32))
    obj["data"] = obj["data"][:-4]
    with pytest.raises(InvalidInput, match=r"tensors\[0\].data: 508 bytes, but shape \[2, 64\]"):
        decode_tensor(obj, where="tensors[0]")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.update(dtype="object"), "dtype"),
        (lambda t: t.update(dtype="complex128"), "dtype"),
        (lambda t: t.update(shape=[-1, 64]), "shape"),
        (lambda t: t.update(shape="2x64"), "shape"),
        (lambda t: t.update(data="text"), "data"),
        (lambda t: t.pop("shape"), "missing shape"),
    ],
)
def test_malformed_tensors_are_refused_with_the_field_named(mutate, message: str) -> None:
    obj = encode_tensor(np.zeros((2, 64), np.float32))
    mutate(obj)
    with pytest.raises(InvalidInput, match=message):
        decode_tensor(obj)


def test_element_cap_is_enforced_before_allocation() -> None:
    obj = {"dtype": "float32", "shape": [100000, 100000], "data": b""}
    with pytest.raises(PayloadTooLarge, match="exceeds this node's cap"):
        decode_tensor(obj, max_elements=1_000_000)


def test_request_round_trip() -> None:
    req = InferRequest(
        task="digits",
        tensors=[np.ones((2, 64), np.float32)],
        slo=SLO(latency_ms=20, min_accuracy=0.95, policy="fastest"),
        budget_ms=18.5,
        hops=2,
        route=Route("core-1", "digits-cnn"),
    )
    back = decode_request(encode_request(req))
    assert back.task == "digits"
    assert back.slo == req.slo
    assert back.request_id == req.request_id
    assert back.hops == 2 and back.budget_ms == 18.5
    assert back.route == Route("core-1", "digits-cnn")
    np.testing.assert_array_equal(back.tensors[0], req.tensors[0])


def test_response_round_trip() -> None:
    plan = Plan("edge-1", "edge", "digits-mlp", 0.97, True, predicted={"total_ms": 1.5},
                handed_back=Detour("core-1", "digits-cnn", "no answer within 500 ms"))
    resp = InferResponse("r1", [np.eye(3, dtype=np.float32)], ServedBy("edge-1", "edge", "digits-mlp"),
                         timing={"compute_ms": 0.5}, plan=plan, loads={"edge-1": 3})
    back = decode_response(encode_response(resp))
    assert back.served_by == resp.served_by
    assert back.timing == {"compute_ms": 0.5}
    assert back.loads == {"edge-1": 3.0}
    assert back.plan == plan
    np.testing.assert_array_equal(back.outputs[0], np.eye(3))


def test_a_forwarded_answer_passes_its_tensor_bytes_through_untouched() -> None:
    """A node that passes an answer on re-packs its envelope, not its tensors."""
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    body = encode_response(InferResponse("r1", [data], ServedBy("core-1", "core", "m")))
    passing = decode_response(body)
    passing.timing["network_ms"] = 2.0  # what a forwarding node patches
    assert passing.wire_outputs is not None and passing.wire_outputs[0]["data"] == data.tobytes()
    again = decode_response(encode_response(passing))
    assert passing.wire_outputs is not None  # never decoded on the way
    np.testing.assert_array_equal(again.outputs[0], data)
    assert again.timing == {"network_ms": 2.0}


def test_a_forwarded_query_keeps_the_tensor_maps_it_arrived_with() -> None:
    x = np.ones((2, 64), np.float32)
    req = decode_request(encode_request(InferRequest("digits", [x])))
    assert req.wire_tensors is not None and req.wire_tensors[0]["data"] == x.tobytes()
    req.hops, req.budget_ms = 1, 12.5  # the envelope changes, the tensors do not
    back = decode_request(encode_request(req))
    assert back.hops == 1 and back.budget_ms == 12.5
    np.testing.assert_array_equal(back.tensors[0], x)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xc1\xc1\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (msgpack.packb({"tensors": []}), "task: required"),
        (msgpack.packb({"task": "digits", "tensors": []}), "tensors: required"),
        (msgpack.packb({"task": "digits", "tensors": [{"dtype": "float32"}]}), r"tensors\[0\]: missing"),
        (msgpack.packb({"task": "d", "tensors": [{"dtype": "float32", "shape": [1], "data": b"\0" * 4}],
                        "slo": {"latency_ms": -5}}), "slo.latency_ms: must be between"),
        (msgpack.packb({"task": "d", "tensors": [{"dtype": "float32", "shape": [1], "data": b"\0" * 4}],
                        "slo": {"policy": "random"}}), "slo.policy"),
        (msgpack.packb({"task": "d", "tensors": [{"dtype": "float32", "shape": [1], "data": b"\0" * 4}],
                        "slo": {"latency": 5}}), "unknown field"),
        (msgpack.packb({"task": "d", "tensors": [{"dtype": "float32", "shape": [1], "data": b"\0" * 4}],
                        "hops": 99}), "hops"),
    ],
)
def test_malformed_requests_name_the_problem(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_request(body)


def test_slo_validates_its_fields() -> None:
    assert SLO.from_wire(None) == SLO()
    assert SLO.from_wire({"min_accuracy": 1}).min_accuracy == 1.0
    with pytest.raises(InvalidInput, match="min_accuracy"):
        SLO.from_wire({"min_accuracy": 1.5})
    with pytest.raises(InvalidInput, match="offline"):
        SLO.from_wire({"offline": "yes"})


def test_a_registered_policy_is_a_valid_slo_policy_and_a_non_string_is_refused() -> None:
    from mesh.planner.policies import Cheapest
    from mesh.planner.policy import register_policy, unregister_policy

    @register_policy
    class Frugal(Cheapest):
        name = "frugal-test"

    try:
        assert SLO.from_wire({"policy": "frugal-test"}).policy == "frugal-test"
    finally:
        unregister_policy("frugal-test")
    with pytest.raises(InvalidInput, match="slo.policy"):
        SLO.from_wire({"policy": "frugal-test"})
    with pytest.raises(InvalidInput, match="slo.policy"):
        SLO.from_wire({"policy": ["cheapest"]})
