"""What a decision round is told about the load: a snapshot, taken by whoever runs the round.

* :class:`VariantLoad` -- what one hosted (node, variant) served since the last round.
* :class:`LoadSnapshot` -- those, the arrivals per (task, subtree), and what failed where.

Agents (or the simulator) fill these from heartbeats; nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["VariantLoad", "LoadSnapshot"]


@dataclass(frozen=True, slots=True)
class VariantLoad:
    """The load one (node, variant) carried, smoothed over the last round or so.

    ``busy`` is the measured compute time per second summed over its
    workers (2.0: two workers busy all the time); when the node does not
    measure it, it is reckoned from ``rate_qps`` and the profile.
    ``latency_target_ms`` and ``min_accuracy`` are the tightest targets of
    the queries it served (None: none set); ``slo_miss_frac`` the fraction
    of them that missed their latency target.
    """

    rate_qps: float = 0.0
    busy: float | None = None
    rows_per_query: float = 1.0
    queue_depth: int = 0
    slo_miss_frac: float = 0.0
    latency_target_ms: float | None = None
    min_accuracy: float | None = None

    def __post_init__(self) -> None:
        for name in ("rate_qps", "rows_per_query", "slo_miss_frac"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"VariantLoad.{name}: must be a finite number >= 0, got {value!r}")
        if self.busy is not None and (not math.isfinite(self.busy) or self.busy < 0):
            raise ValueError(f"VariantLoad.busy: must be a finite number >= 0, got {self.busy!r}")
        if self.rows_per_query < 1:
            raise ValueError(f"VariantLoad.rows_per_query: must be >= 1, got {self.rows_per_query}")


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """Everything observed since the last round.

    ``demand`` maps (task, node) to the queries per second of that task
    entering the mesh anywhere in the node's subtree (the node included);
    the rounds learn their forecasts from it. ``served`` maps (node,
    variant) to what that host carried; hosts missing from it carried
    nothing. ``failed`` maps a node to the variants it could not load; they
    are dropped there and not placed there again while reported. Nodes in
    ``down`` keep what they host (for when they come back) but receive no
    replica or faster variant meanwhile.
    """

    demand: Mapping[tuple[str, str], float] = field(default_factory=dict)
    served: Mapping[tuple[str, str], VariantLoad] = field(default_factory=dict)
    failed: Mapping[str, frozenset[str]] = field(default_factory=dict)
    down: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for key, rate in self.demand.items():
            if not math.isfinite(rate) or rate < 0:
                raise ValueError(f"LoadSnapshot.demand[{key!r}]: must be a finite rate >= 0, "
                                 f"got {rate!r}")
