"""The cascade policy's data plane: answer small, escalate the unsure rows.

The entry node's planner names a first stage (the cheapest variant at the
entry) and an escalation target (a more accurate variant upstream, see
:class:`~mesh.planner.Escalation`). :func:`run_cascade` sends the query to
the first stage, takes each row's confidence as its top probability (the
digits variants output softmax probabilities), sends the rows below the
threshold to the escalation target, and puts their answers in place. If the
escalation fails, the first stage's answers stand and the plan says so.

It only needs the agent's public ``infer`` (a query with its route set is
served or forwarded as routed), so it does not depend on how the data plane
queues, batches or forwards.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from mesh.errors import MeshError
from mesh.plan import Plan
from mesh.planner import Decision
from mesh.wire import InferRequest, InferResponse, Route

__all__ = ["run_cascade", "confidence"]

log = logging.getLogger("tiermesh.cascade")

Infer = Callable[[InferRequest], Awaitable[InferResponse]]


def confidence(outputs: list[np.ndarray]) -> np.ndarray | None:
    """Top probability per row, or None when the first output is not a probability matrix."""
    if not outputs:
        return None
    probs = outputs[0]
    if probs.ndim != 2 or probs.shape[1] < 2 or not np.issubdtype(probs.dtype, np.floating):
        return None
    sums = probs.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-3) or (probs < -1e-6).any():
        return None
    return probs.max(axis=1)


async def run_cascade(infer: Infer, req: InferRequest, decision: Decision,
                      plan: Plan) -> InferResponse:
    """Serve ``req`` as ``decision`` (a cascade with an escalation) says."""
    escalation = decision.escalation
    assert escalation is not None
    first_req = InferRequest(task=req.task, tensors=req.tensors, slo=req.slo,
                             request_id=req.request_id, budget_ms=req.budget_ms, hops=req.hops,
                             route=Route(decision.node, decision.variant),
                             timeout_ms=req.timeout_ms)
    first = await infer(first_req)
    rows = int(req.tensors[0].shape[0])
    stats: dict[str, Any] = {"threshold": escalation.threshold, "rows": rows, "escalated": 0,
                             "escalation_rate": 0.0, "to": f"{escalation.node}/{escalation.variant}"}
    conf = confidence(first.outputs)
    if conf is None:
        stats["note"] = "outputs are not probabilities; nothing escalated"
    else:
        unsure = np.flatnonzero(conf < escalation.threshold)
        if unsure.size:
            second_req = InferRequest(
                task=req.task, tensors=[t[unsure] for t in req.tensors], slo=req.slo,
                request_id=f"{req.request_id}.esc", budget_ms=req.budget_ms, hops=req.hops,
                route=Route(escalation.node, escalation.variant), timeout_ms=req.timeout_ms)
            try:
                second = await infer(second_req)
            except MeshError as exc:
                log.warning("escalation of %d row(s) to %s failed: %s", unsure.size,
                            stats["to"], exc.message)
                stats["failed"] = f"{type(exc).__name__}: {exc.message}"
            else:
                outputs = [np.array(o, copy=True) for o in first.outputs]
                for mine, theirs in zip(outputs, second.outputs, strict=False):
                    mine[unsure] = theirs
                first.outputs = outputs
                stats["escalated"] = int(unsure.size)
                stats["escalation_rate"] = round(unsure.size / rows, 4)
                for key, value in second.timing.items():
                    first.timing[f"escalation_{key}"] = value
    first.plan = plan.amended(cascade=stats)
    return first
