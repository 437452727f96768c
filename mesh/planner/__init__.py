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
policy picks among the feasible: ``cheapest`` (the default),
``most-accurate`` or ``fastest``; candidates that tie with the winner (cost
within ``tie_cost_frac``, latency within ``tie_latency_*``) share the load
by power of two choices: two are drawn at random and the less loaded one
wins. ``cascade`` answers with the cheapest variant at the entry and names
a more accurate one upstream for the rows the first is unsure about. When
nothing is feasible the planner still answers with the closest candidate and
says so (``feasible=False``).

Speed: everything static is in a :class:`~mesh.planner.tables.CandidateTable`
per (entry, task, tenant), pruned to a bounded number of rows however large
the mesh, and sorted per policy; a query walks the rows in order and stops
as soon as nothing later can win, so a decision costs microseconds at 10,000
nodes as at 100 (``benchmarks/planner.py``). A topology or placement change
means building a new :class:`Planner`.
"""

from mesh.planner.core import Planner
from mesh.planner.explain import why_not
from mesh.planner.margins import CALIBRATED_MARGIN_MS, load_margins
from mesh.planner.model import Candidate, Decision, Escalation, Prediction, Scored
from mesh.planner.tables import CandidateTable

__all__ = [
    "CALIBRATED_MARGIN_MS",
    "Candidate",
    "CandidateTable",
    "Decision",
    "Escalation",
    "Planner",
    "Prediction",
    "Scored",
    "load_margins",
    "why_not",
]
