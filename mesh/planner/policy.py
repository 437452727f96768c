"""The :class:`Policy` protocol and the registry of policies by name.

A policy chooses where one query runs::

    @register_policy
    class Nearest:
        name = "nearest"
        rank = Rank.LATENCY                     # how `mesh plan` lists the candidates

        def choose(self, table, query, view):   # -> Decision
            ...

``table`` is the :class:`~mesh.planner.tables.CandidateTable` of the
query's (entry, task, tenant); ``query`` a :class:`~mesh.planner.query.Query`;
``view`` a :class:`~mesh.planner.query.PlanView`: the mesh view, the clock
reading ``now``, the random source ``rng`` and the planner's tunables. A
policy reads time and randomness from the view only, so a seeded ``rng``
replays its decisions; it keeps no state between queries (one instance
serves every planner). The walks in :mod:`mesh.planner.walk` are the
building blocks.

Registering makes the name valid in ``SLO.policy``: :data:`POLICIES` is the
source of truth that ``mesh.wire`` checks SLOs against and that the
``mesh plan --policy`` choices list. This module imports nothing of the
planner at run time, so the wire codec can import it without pulling in the
planner's tables (or an import circle).
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

from mesh.errors import InvalidInput

if TYPE_CHECKING:
    from mesh.planner.model import Decision, Rank
    from mesh.planner.query import PlanView, Query
    from mesh.planner.tables import CandidateTable

__all__ = ["POLICIES", "Policy", "policy_named", "register_policy", "unregister_policy"]


class Policy(Protocol):
    """Chooses the (node, variant) that serves a query; registered by :attr:`name`."""

    #: The name an SLO asks for it by (``slo.policy``).
    name: ClassVar[str]
    #: The order ``mesh plan`` lists candidates in (and ``why_not`` explains losers by).
    rank: ClassVar[Rank]

    def choose(self, table: CandidateTable, query: Query, view: PlanView) -> Decision:
        """The decision for ``query``; raises NoRoute when no candidate can serve at all.

        When nothing meets the SLO it answers with the closest candidate and
        ``feasible=False`` (the agent refuses or serves it, as the SLO says).
        """
        ...


_REGISTRY: dict[str, Policy] = {}

#: Registered policies by name, in registration order (a live, read-only view).
POLICIES: Mapping[str, Policy] = MappingProxyType(_REGISTRY)

P = TypeVar("P", bound=type)


def register_policy(cls: P) -> P:
    """Class decorator: register ``cls()`` under ``cls.name``; returns ``cls`` unchanged.

    Raises ``ValueError`` when the name is empty or taken by another class
    (:func:`unregister_policy` first to replace one).
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__}: set a class attribute `name` (the SLO's "
                         "policy string) before registering it")
    held = _REGISTRY.get(name)
    if held is not None and type(held) is not cls:
        raise ValueError(f"policy {name!r} is already registered by "
                         f"{type(held).__qualname__}; unregister it first")
    _REGISTRY[name] = cls()
    return cls


def unregister_policy(name: str) -> None:
    """Forget the policy called ``name`` (a no-op when there is none)."""
    _REGISTRY.pop(name, None)


def policy_named(name: str) -> Policy:
    """The registered policy called ``name``; raises InvalidInput naming the known ones."""
    policy = _REGISTRY.get(name)
    if policy is None:
        raise InvalidInput(f"slo.policy: {reprlib.repr(name)} is not one of {list(_REGISTRY)}")
    return policy
