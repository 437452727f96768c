"""The planner: (query, entry node, mesh view) -> which (node, variant) serves it.

Pure and explainable. For each candidate (node n, variant v) reachable from
the entry node e it predicts::

    network  = 2 x (path latency(e, n) + hops x per-hop cost)
               + 2 x loss(e, n) x round trip          (a lost packet costs a round trip)
               + bytes in / bottleneck + bytes out / bottleneck
    queue    = batches ahead of us at n (reported queue depth, batch model of v)
    compute  = profiled latency of v on n's hardware class for this many rows
               + the cost of dispatching to the runtime
    load     = 0 if v is loaded on n, else v's profiled cold start

A candidate is *feasible* when ``total x (1 + margin_frac) + margin(tier)``
fits the latency target (if any), v's measured accuracy meets the minimum
(if any) and its cost fits the ceiling (if any). Cost is machine time plus
energy, both in USD per 1,000 inferences (see :class:`Candidate`). The
SLO's policy picks among the feasible: ``cheapest`` (the default),
``most-accurate`` or ``fastest``; candidates that tie with the winner (cost
within ``tie_cost_frac``, latency within ``tie_latency_*``) share the load
by power of two choices: two are drawn at random and the less loaded one
wins. ``cascade`` answers with the cheapest variant at the entry and names
a more accurate one upstream for the rows the first is unsure about. When
nothing is feasible the planner still answers with the closest candidate and
says so (``feasible=False``).

A policy is an object with one method, ``choose(table, query, view) ->
Decision``, registered by name (:mod:`mesh.planner.policy`; the built-in
ones are in :mod:`mesh.planner.policies` and :mod:`mesh.planner.cascade`),
made of the walks in :mod:`mesh.planner.walk`. Registering one makes its
name valid in ``SLO.policy``.

Speed: everything static is in a :class:`~mesh.planner.tables.CandidateTable`
per (entry, task, tenant), pruned to a bounded number of rows however large
the mesh, and sorted per policy; a query walks the rows in order and stops
as soon as nothing later can win, so a decision costs microseconds at 10,000
nodes as at 100 (``benchmarks/planner.py``). A topology or placement change
means building a new :class:`Planner`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Light modules only: ``mesh.wire`` imports the policy registry, and the SDK must not pay
# for the topology code (networkx, pydantic) that the tables need. Importing
# mesh.planner.policies registers the built-in policies.
from mesh.planner.explain import why_not
from mesh.planner.margins import CALIBRATED_MARGIN_MS, load_margins
from mesh.planner.model import Candidate, Decision, Escalation, Prediction, Rank, Scored
from mesh.planner.policies import Cascade, Cheapest, Fastest, MostAccurate
from mesh.planner.policy import (
    POLICIES,
    Policy,
    policy_named,
    register_policy,
    unregister_policy,
)
from mesh.planner.query import Limits, Objectives, PlanView, Query, Tuning

if TYPE_CHECKING:
    from mesh.planner.core import Planner
    from mesh.planner.tables import CandidateTable

__all__ = [
    "CALIBRATED_MARGIN_MS",
    "POLICIES",
    "Candidate",
    "CandidateTable",
    "Cascade",
    "Cheapest",
    "Decision",
    "Escalation",
    "Fastest",
    "Limits",
    "MostAccurate",
    "Objectives",
    "PlanView",
    "Planner",
    "Policy",
    "Prediction",
    "Query",
    "Rank",
    "Scored",
    "Tuning",
    "load_margins",
    "policy_named",
    "register_policy",
    "unregister_policy",
    "why_not",
]


def __getattr__(name: str) -> Any:
    # The planner and its tables load on first use (see the imports above).
    if name == "Planner":
        from mesh.planner.core import Planner

        return Planner
    if name == "CandidateTable":
        from mesh.planner.tables import CandidateTable

        return CandidateTable
    raise AttributeError(f"module 'mesh.planner' has no attribute {name!r}")
