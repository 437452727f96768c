"""The cascade data plane against a fake ``infer``: which rows go up and how answers merge."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.errors import UpstreamError
from mesh.plan import Plan
from mesh.planner import Decision, Escalation, Prediction
from mesh.wire import InferRequest, InferResponse, ServedBy
from nodes.cascade import confidence, run_cascade

P = Prediction(1.0, 0.0, 0.1, 0.0)
PLAN = Plan("edge-1", "edge", "small", 0.9, True, "cascade")


def _decision(threshold: float = 0.9) -> Decision:
    esc = Escalation("mid-1", "intermediate", "big", 0.99, P, threshold, True)
    return Decision("edge-1", "edge", "small", 0.9, P, True, "cascade", "test", escalation=esc)


class _Mesh:
    """Answers like two variants: 'small' is unsure about odd rows, 'big' is always sure."""

    def __init__(self, fail_big: bool = False) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail_big = fail_big

    async def infer(self, req: InferRequest) -> InferResponse:
        assert req.route is not None
        rows = req.tensors[0].shape[0]
        self.calls.append((req.route.variant, rows))
        ids = req.tensors[0][:, 0].astype(int)
        probs = np.zeros((rows, 3), np.float32)
        if req.route.variant == "small":
            probs[:, 0] = np.where(ids % 2 == 0, 0.95, 0.5)
            probs[:, 1] = 1 - probs[:, 0]
        else:
            if self.fail_big:
                raise UpstreamError("forwarding to mid-1 failed")
            probs[:, 2] = 1.0
        return InferResponse(req.request_id, [probs], ServedBy(req.route.node, "t", req.route.variant),
                             timing={"network_ms": 4.0})


def _request(rows: int = 6) -> InferRequest:
    x = np.zeros((rows, 4), np.float32)
    x[:, 0] = np.arange(rows)
    return InferRequest(task="digits", tensors=[x])


async def test_unsure_rows_are_escalated_and_answers_put_back_in_place() -> None:
    mesh = _Mesh()
    r = await run_cascade(mesh.infer, _request(6), _decision(0.9), PLAN)
    assert mesh.calls == [("small", 6), ("big", 3)]
    top = r.outputs[0].argmax(1)
    assert list(top) == [0, 2, 0, 2, 0, 2]  # odd rows answered by the big variant
    assert r.served_by.variant == "small"
    assert r.plan is not None and r.plan.cascade == {
        "threshold": 0.9, "rows": 6, "escalated": 3, "escalation_rate": 0.5, "to": "mid-1/big"}
    assert r.plan.node == PLAN.node and r.timing["escalation_network_ms"] == 4.0


async def test_confident_answers_are_not_escalated() -> None:
    mesh = _Mesh()
    r = await run_cascade(mesh.infer, _request(6), _decision(0.4), PLAN)
    assert mesh.calls == [("small", 6)]
    assert r.plan is not None and r.plan.cascade["escalated"] == 0


async def test_a_failed_escalation_keeps_the_first_answers() -> None:
    mesh = _Mesh(fail_big=True)
    r = await run_cascade(mesh.infer, _request(4), _decision(), PLAN)
    assert r.outputs[0].argmax(1).tolist() == [0, 0, 0, 0]
    assert r.plan is not None and r.plan.cascade is not None
    assert r.plan.cascade["escalated"] == 0 and "UpstreamError" in r.plan.cascade["failed"]


@pytest.mark.parametrize("outputs", [
    [np.ones((3, 4), np.float32)],          # rows do not sum to 1
    [np.full((3,), 0.5, np.float32)],       # not a matrix
    [np.array([[0, 1]], np.int64)],         # not floating point
])
def test_only_probabilities_give_a_confidence(outputs) -> None:
    assert confidence(outputs) is None


def test_confidence_is_the_top_probability() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    np.testing.assert_allclose(confidence([probs]), [0.7, 0.8])
