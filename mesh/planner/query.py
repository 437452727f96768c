"""What a policy decides from: the :class:`Query`, and the :class:`PlanView` it is judged against.

A policy is a pure function of (candidate table, query, view); everything
that changes from one decision to the next comes in through these two
values, so the simulator, the tests and the live agents run the very same
decisions:

* :class:`Query` -- what was asked: task, SLO, rows, payload size, tenant;
* :class:`PlanView` -- what the deciding node knows and how its planner is
  tuned: the :class:`~mesh.state.MeshView`, the clock reading ``now``, the
  random source ``rng`` (power of two choices draw from it) and the
  planner's :class:`Tuning`.

Both are named tuples: immutable, and cheap enough to build on every query
(a frozen dataclass costs a few hundred nanoseconds more, a tenth of a
decision; ``benchmarks/planner.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from mesh.state import MeshView

__all__ = ["Limits", "Objectives", "PlanView", "Query", "Tuning"]


class Objectives(Protocol):
    """What the planner reads of an SLO (:class:`mesh.wire.SLO` is one).

    The planner depends on these fields, not on the wire format, so that
    ``mesh.wire`` may import the policy registry (:mod:`mesh.planner.policy`)
    to validate ``slo.policy`` without an import circle.
    """

    @property
    def latency_ms(self) -> float | None: ...
    @property
    def min_accuracy(self) -> float | None: ...
    @property
    def max_cost_per_1k(self) -> float | None: ...
    @property
    def offline(self) -> bool: ...
    @property
    def policy(self) -> str: ...
    @property
    def min_confidence(self) -> float | None: ...


class Query(NamedTuple):
    """One query as the planner sees it. The caller has validated it (``mesh.wire``)."""

    task: str
    slo: Objectives
    #: Rows in the batch (the first dimension of the inputs).
    rows: int = 1
    #: Size of the request's tensors in bytes (what crosses the links on the way in).
    payload_bytes: int = 0
    #: The tenant whose nodes and tasks the query is limited to (None: no limits).
    tenant: str | None = None


@dataclass(frozen=True, slots=True)
class Tuning:
    """A planner's tunables, as a policy reads them (see :class:`~mesh.planner.Planner`)."""

    #: Predictions are inflated by this fraction before checking the latency target
    #: (each row's own margin in milliseconds is then added: ``Row.margin_ms``).
    margin_frac: float = 0.10
    #: Cost of handing a query to the local runtime (queueing, thread hand-off).
    dispatch_ms: float = 0.3
    #: Costs within this fraction of the cheapest count as equal (power of two choices).
    tie_cost_frac: float = 0.10
    #: Accuracies within this much of the best count as equal when ranking by accuracy.
    tie_accuracy: float = 0.001
    #: Predicted latencies within max(tie_latency_ms, tie_latency_frac x best) count as equal.
    tie_latency_ms: float = 0.5
    tie_latency_frac: float = 0.10
    #: At most this many feasible candidates are examined per walk.
    pool_size: int = 8
    #: A cascade escalates rows whose top probability is below this (unless the SLO says).
    cascade_threshold: float = 0.9


class PlanView(NamedTuple):
    """Everything a policy may read besides the table and the query.

    ``now`` is the clock reading the load reports are aged against (seconds,
    any monotonic clock); ``rng`` is the only source of randomness a policy
    may use, so that a seeded one replays the same decisions.
    """

    mesh: MeshView
    now: float
    rng: random.Random
    tuning: Tuning


class Limits(NamedTuple):
    """The targets a walk checks a row against (None: no such target).

    By default a walk takes them from the query's SLO (the latency target
    dropped for offline work); a cascade narrows them for its second stage.
    """

    latency_ms: float | None = None
    min_accuracy: float | None = None
    max_cost_per_1k: float | None = None

    @classmethod
    def of(cls, slo: Objectives) -> Limits:
        return cls(None if slo.offline else slo.latency_ms, slo.min_accuracy, slo.max_cost_per_1k)
