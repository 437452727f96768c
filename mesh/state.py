"""The mesh view a node holds: what it last heard about every node's load.

Pure: time comes in as an argument (seconds on any monotonic clock), so the
simulator and the live agents share this code. A report older than
``stale_after_s`` no longer counts (the node's queue is assumed empty, its
loaded set unknown); a node marked down stays excluded until a fresh report.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NodeLoad", "MeshView"]


@dataclass(frozen=True, slots=True)
class NodeLoad:
    queue_depth: int
    reported_at: float
    loaded: frozenset[str] | None = None
    healthy: bool = True
    #: variants the node hosts but cannot run (failed to load); never routed to.
    failed: frozenset[str] = frozenset()


class MeshView:
    """Latest load report per node, with ageing."""

    #: Reports older than this many seconds are ignored.
    stale_after_s: float = 5.0

    def __init__(self, *, stale_after_s: float | None = None) -> None:
        if stale_after_s is not None:
            self.stale_after_s = stale_after_s
        self._loads: dict[str, NodeLoad] = {}
        self.version = 0

    def report(self, node: str, queue_depth: int, now: float, *,
               loaded: frozenset[str] | None = None, healthy: bool = True,
               failed: frozenset[str] | None = None) -> None:
        previous = self._loads.get(node)
        if previous is not None and previous.reported_at > now:
            return  # an older report arriving late must not overwrite a newer one
        if previous is not None:
            loaded = previous.loaded if loaded is None else loaded
            failed = previous.failed if failed is None else failed
        self._loads[node] = NodeLoad(max(int(queue_depth), 0), now, loaded, healthy,
                                     failed or frozenset())
        self.version += 1

    def mark_down(self, node: str, now: float) -> None:
        self.report(node, 0, now, healthy=False)

    def _fresh(self, node: str, now: float) -> NodeLoad | None:
        load = self._loads.get(node)
        if load is None or now - load.reported_at > self.stale_after_s:
            return None
        return load

    def queue_depth(self, node: str, now: float) -> int:
        load = self._fresh(node, now)
        return load.queue_depth if load is not None else 0

    def is_down(self, node: str, now: float) -> bool:
        load = self._fresh(node, now)
        return load is not None and not load.healthy

    def has_failed(self, node: str, variant: str) -> bool:
        """True when ``node`` said it cannot run ``variant`` (this does not age out)."""
        load = self._loads.get(node)
        return load is not None and variant in load.failed

    def is_loaded(self, node: str, variant: str, now: float) -> bool:
        """Unknown counts as loaded: agents preload what they host."""
        load = self._fresh(node, now)
        if load is None or load.loaded is None:
            return True
        return variant in load.loaded

    def snapshot(self, now: float) -> dict[str, dict[str, object]]:
        return {
            node: {"queue_depth": load.queue_depth, "age_s": round(now - load.reported_at, 3),
                   "healthy": load.healthy, "stale": now - load.reported_at > self.stale_after_s}
            for node, load in sorted(self._loads.items())
        }
