"""The built-in policies: ``cheapest`` (the default), ``most-accurate``, ``fastest``, ``cascade``.

The first three pick the best feasible candidate by their
:class:`~mesh.planner.model.Rank` (power of two choices among the
near-equivalent ones) and, when nothing is feasible, the closest miss
(:func:`mesh.planner.walk.best`). ``cascade`` is in :mod:`mesh.planner.cascade`.
All four are registered here, in this order (the order error messages and
``mesh plan --policy`` list them in).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from mesh.planner.cascade import Cascade
from mesh.planner.model import Decision, Rank
from mesh.planner.policy import register_policy
from mesh.planner.walk import best

if TYPE_CHECKING:
    from mesh.planner.query import PlanView, Query
    from mesh.planner.tables import CandidateTable

__all__ = ["Cascade", "Cheapest", "Fastest", "MostAccurate", "Ranked"]


class Ranked:
    """The best feasible candidate by :attr:`rank`, else the closest miss."""

    name: ClassVar[str]
    rank: ClassVar[Rank]

    def choose(self, table: CandidateTable, query: Query, view: PlanView) -> Decision:
        return best(table, self.rank, query, view, policy=self.name)


class Cheapest(Ranked):
    """Lowest cost per inference (machine time and energy), then lowest latency."""

    name = "cheapest"
    rank = Rank.COST


class MostAccurate(Ranked):
    """Highest measured accuracy, then cheapest, then fastest."""

    name = "most-accurate"
    rank = Rank.ACCURACY


class Fastest(Ranked):
    """Lowest predicted latency, then cheapest."""

    name = "fastest"
    rank = Rank.LATENCY


for _builtin in (Cheapest, MostAccurate, Fastest, Cascade):
    register_policy(_builtin)
