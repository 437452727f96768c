"""The mesh view a node holds, and the pure logic of membership.

Pure: time comes in as an argument (seconds on any monotonic clock), so the
simulator and the live agents share this code; ``nodes/membership.py`` does
the I/O.

* :class:`MeshView` -- the latest load report per node. A report older than
  ``stale_after_s`` no longer counts (the node's queue is assumed empty, its
  loaded set unknown). A node can be down two ways: a fresh report says so
  (it ages out like any report), or failure detection marked it down
  (:meth:`MeshView.set_down`), which lasts until a newer healthy report.
* :class:`LoadEntry` -- one node's load as it travels between nodes. Ages
  travel instead of timestamps, so clocks never need to agree.
* :class:`FailureDetector` -- a peer is down after ``down_after_s`` without
  a heartbeat (or an answer).
* :class:`Subtree` -- a parent's side: the heartbeats of its children, what
  it reports up (its own load plus its subtree, aggregated) and the
  versioned summary it pushes down (itself, its other children, and what it
  inherited from above). The version moves when something material changes
  (health, loaded or failed variants, queue depth by a power of two) or
  when the last summary is half as old as ``stale_after_s``, so a child
  that holds the current version is sent nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from mesh.errors import InvalidInput

__all__ = ["NodeLoad", "MeshView", "LoadEntry", "FailureDetector", "Subtree", "RateMeter",
           "apply_entries"]


@dataclass(frozen=True, slots=True)
class NodeLoad:
    queue_depth: int
    reported_at: float
    loaded: frozenset[str] | None = None
    healthy: bool = True
    #: variants the node hosts but cannot run (failed to load); never routed to.
    failed: frozenset[str] = frozenset()
    #: queries per second arriving at the node (smoothed).
    arrival_rate: float = 0.0


class MeshView:
    """Latest load report per node, with ageing, plus nodes known to be down.

    The planner reads ``loads``, ``down`` and ``stale_after_s`` directly on its
    hot path; everything else should use the methods.
    """

    #: Reports older than this many seconds are ignored.
    stale_after_s: float = 5.0

    def __init__(self, *, stale_after_s: float | None = None) -> None:
        if stale_after_s is not None:
            self.stale_after_s = stale_after_s
        self.loads: dict[str, NodeLoad] = {}
        #: node -> when failure detection marked it down.
        self.down: dict[str, float] = {}
        #: node -> until when it is ejected for failing queries (mesh.health); heartbeats
        #: from it do not end an ejection, only time does
        self.ejected: dict[str, float] = {}
        self.version = 0

    def report(self, node: str, queue_depth: int, now: float, *,
               loaded: frozenset[str] | None = None, healthy: bool = True,
               failed: frozenset[str] | None = None, arrival_rate: float | None = None) -> None:
        previous = self.loads.get(node)
        if previous is not None and previous.reported_at > now:
            return  # an older report arriving late must not overwrite a newer one
        if previous is not None:
            loaded = previous.loaded if loaded is None else loaded
            failed = previous.failed if failed is None else failed
            arrival_rate = previous.arrival_rate if arrival_rate is None else arrival_rate
        self.loads[node] = NodeLoad(max(int(queue_depth), 0), now, loaded, healthy,
                                    failed or frozenset(), arrival_rate or 0.0)
        if healthy and node in self.down and now > self.down[node] \
                and node not in self.ejected:
            del self.down[node]
        self.version += 1

    def mark_down(self, node: str, now: float) -> None:
        """A report that ``node`` is down (it ages out like any report)."""
        self.report(node, 0, now, healthy=False)

    def set_down(self, nodes: Iterable[str], now: float) -> None:
        """Failure detection: these nodes are down until a newer healthy report."""
        for node in nodes:
            self.down.setdefault(node, now)
        self.version += 1

    def eject(self, node: str, until: float, now: float) -> None:
        """``node`` fails the queries sent to it: count it down until ``until`` (a healthy
        heartbeat does not end it; :meth:`expire_ejections` does, once the time is up)."""
        self.ejected[node] = until
        self.down.setdefault(node, now)
        self.version += 1

    def expire_ejections(self, now: float) -> list[str]:
        """End the ejections whose time is up (the peers go on probation); returns them."""
        over = [n for n, until in self.ejected.items() if until <= now]
        for node in over:
            del self.ejected[node]
            self.down.pop(node, None)
        if over:
            self.version += 1
        return over

    def clear_down(self, nodes: Iterable[str]) -> None:
        for node in nodes:
            if node not in self.ejected:
                self.down.pop(node, None)
        self.version += 1

    def _fresh(self, node: str, now: float) -> NodeLoad | None:
        load = self.loads.get(node)
        if load is None or now - load.reported_at > self.stale_after_s:
            return None
        return load

    def queue_depth(self, node: str, now: float) -> int:
        load = self._fresh(node, now)
        return load.queue_depth if load is not None else 0

    def arrival_rate(self, node: str, now: float) -> float:
        load = self._fresh(node, now)
        return load.arrival_rate if load is not None else 0.0

    def is_down(self, node: str, now: float) -> bool:
        if node in self.down:
            return True
        load = self._fresh(node, now)
        return load is not None and not load.healthy

    def down_now(self, now: float) -> list[str]:
        """Every node counted down now: by failure detection, ejection or a fresh report that
        it is unhealthy (a failed hop). O(nodes reported); for the rare path, not per query."""
        out = set(self.down)
        out.update(n for n, load in self.loads.items()
                   if not load.healthy and now - load.reported_at <= self.stale_after_s)
        return sorted(out)

    def has_failed(self, node: str, variant: str) -> bool:
        """True when ``node`` said it cannot run ``variant`` (this does not age out)."""
        load = self.loads.get(node)
        return load is not None and variant in load.failed

    def usable(self, node: str, variant: str, now: float) -> bool:
        return not self.is_down(node, now) and not self.has_failed(node, variant)

    def is_loaded(self, node: str, variant: str, now: float) -> bool:
        """Unknown counts as loaded: agents preload what they host."""
        load = self._fresh(node, now)
        if load is None or load.loaded is None:
            return True
        return variant in load.loaded

    def snapshot(self, now: float) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {
            node: {"queue_depth": load.queue_depth, "age_s": round(now - load.reported_at, 3),
                   "healthy": load.healthy and node not in self.down,
                   "arrival_rate": round(load.arrival_rate, 3),
                   "stale": now - load.reported_at > self.stale_after_s,
                   "loaded": sorted(load.loaded) if load.loaded is not None else None}
            for node, load in sorted(self.loads.items())
        }
        for node, since in self.down.items():
            out.setdefault(node, {"queue_depth": 0, "age_s": None, "stale": True})
            out[node]["healthy"] = False
            out[node]["down_for_s"] = round(now - since, 3)
            if node in self.ejected:
                out[node]["ejected_for_s"] = round(max(self.ejected[node] - now, 0.0), 3)
        return dict(sorted(out.items()))


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True, slots=True)
class LoadEntry:
    """One node's load as it travels in heartbeats and summaries."""

    node: str
    queue_depth: int
    #: How old the information is, in seconds, when it is sent.
    age_s: float = 0.0
    healthy: bool = True
    arrival_rate: float = 0.0
    loaded: frozenset[str] | None = None
    failed: frozenset[str] = frozenset()
    #: For a node speaking for its subtree: nodes in it (itself included), how many are down,
    #: and their total queue depth.
    subtree_nodes: int = 1
    subtree_down: int = 0
    subtree_queue: int = 0

    def aged(self, seconds: float) -> LoadEntry:
        return replace(self, age_s=self.age_s + max(seconds, 0.0))

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.node, "q": self.queue_depth,
                               "age": round(self.age_s, 4), "ok": self.healthy}
        if self.arrival_rate:
            out["rate"] = round(self.arrival_rate, 3)
        if self.loaded is not None:
            out["loaded"] = sorted(self.loaded)
        if self.failed:
            out["failed"] = sorted(self.failed)
        if self.subtree_nodes != 1 or self.subtree_down or self.subtree_queue:
            out["sub"] = [self.subtree_nodes, self.subtree_down, self.subtree_queue]
        return out

    @classmethod
    def from_wire(cls, obj: Any, *, where: str = "entry") -> LoadEntry:
        """Validate one entry from the network; raises :class:`InvalidInput`."""
        if not isinstance(obj, dict):
            raise InvalidInput(f"{where}: must be a map")
        node, q, age, ok = obj.get("node"), obj.get("q", 0), obj.get("age", 0.0), obj.get("ok", True)
        if not isinstance(node, str) or not node:
            raise InvalidInput(f"{where}.node: required, a node name")
        if not isinstance(q, int) or isinstance(q, bool) or q < 0:
            raise InvalidInput(f"{where}.q: must be a non-negative integer")
        if not _number(age) or age < 0:
            raise InvalidInput(f"{where}.age: must be a non-negative number")
        if not isinstance(ok, bool):
            raise InvalidInput(f"{where}.ok: must be true or false")
        rate = obj.get("rate", 0.0)
        if not _number(rate) or rate < 0:
            raise InvalidInput(f"{where}.rate: must be a non-negative number")
        loaded = obj.get("loaded")
        failed = obj.get("failed", [])
        for key, value in (("loaded", loaded), ("failed", failed)):
            if value is not None and not (isinstance(value, list)
                                          and all(isinstance(v, str) for v in value)):
                raise InvalidInput(f"{where}.{key}: must be a list of variant names")
        sub = obj.get("sub", [1, 0, 0])
        if not (isinstance(sub, list) and len(sub) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sub)):
            raise InvalidInput(f"{where}.sub: must be [nodes, down, queue] integers")
        return cls(node, q, float(age), ok, float(rate),
                   frozenset(loaded) if loaded is not None else None, frozenset(failed),
                   sub[0], sub[1], sub[2])


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def apply_entries(view: MeshView, entries: Iterable[LoadEntry], now: float, *,
                  skip: frozenset[str] = frozenset()) -> int:
    """Record entries in ``view`` (their age is subtracted from ``now``); returns how many."""
    n = 0
    for e in entries:
        if e.node in skip:
            continue
        view.report(e.node, e.queue_depth, now - e.age_s, loaded=e.loaded, healthy=e.healthy,
                    failed=e.failed, arrival_rate=e.arrival_rate)
        n += 1
    return n


# --------------------------------------------------------------------------- failure detection


class FailureDetector:
    """A peer counts as down after ``down_after_s`` without being heard from.

    A peer never heard from at all gets ``startup_grace_s`` more (peers start
    one after another); once heard, the bound is ``down_after_s``.
    """

    def __init__(self, peers: Iterable[str], *, down_after_s: float, now: float,
                 startup_grace_s: float = 0.0) -> None:
        if down_after_s <= 0:
            raise ValueError("down_after_s must be > 0")
        self.down_after_s = down_after_s
        #: peer -> when it was last heard from (start-up counts as heard).
        self.last_heard: dict[str, float] = {p: now for p in peers}
        self._never_heard = set(self.last_heard)
        self.startup_grace_s = startup_grace_s
        self.down: set[str] = set()

    def heard(self, peer: str, now: float) -> bool:
        """Record a heartbeat; True when the peer was down and is back."""
        if peer not in self.last_heard:
            raise KeyError(peer)
        self.last_heard[peer] = max(self.last_heard[peer], now)
        self._never_heard.discard(peer)
        if peer in self.down:
            self.down.discard(peer)
            return True
        return False

    def check(self, now: float) -> list[str]:
        """Peers that went down since the last check."""
        grace = self.startup_grace_s
        went = [p for p, t in self.last_heard.items()
                if p not in self.down
                and now - t > self.down_after_s + (grace if p in self._never_heard else 0.0)]
        self.down.update(went)
        return sorted(went)


class RateMeter:
    """Arrival rate from a growing request counter, smoothed exponentially."""

    def __init__(self, *, half_life_s: float = 2.0) -> None:
        self.half_life_s = half_life_s
        self.rate = 0.0
        self._last: tuple[float, int] | None = None

    def update(self, count: int, now: float) -> float:
        if self._last is not None:
            then, before = self._last
            dt = now - then
            if dt > 0:
                instant = max(count - before, 0) / dt
                weight = 1.0 - 0.5 ** (dt / self.half_life_s)
                self.rate += weight * (instant - self.rate)
        self._last = (now, count)
        return self.rate


# --------------------------------------------------------------------------- a parent's side


def _bucket(depth: int) -> int:
    return depth.bit_length()  # 0, 1, 2-3, 4-7, ...


class Subtree:
    """What a node knows of its children's subtrees, and the summaries it pushes down."""

    def __init__(self, node: str, children: Iterable[str], *, down_after_s: float,
                 stale_after_s: float, now: float, startup_grace_s: float = 0.0) -> None:
        self.node = node
        self.children = tuple(children)
        self.detector = FailureDetector(self.children, down_after_s=down_after_s, now=now,
                                        startup_grace_s=startup_grace_s)
        self.refresh_s = stale_after_s / 2.0
        #: child -> (when received, its entries: itself first, then what it knows below)
        self._reports: dict[str, tuple[float, tuple[LoadEntry, ...]]] = {}
        self._inherited: tuple[float, tuple[LoadEntry, ...]] | None = None
        #: Nodes above this one that it cannot reach (its parent is down): said so downwards.
        self.unreachable: frozenset[str] = frozenset()
        self.version = 0
        self._fingerprint: Any = None
        self._bumped_at = now

    # ---------------------------------------------------------------- inputs
    def heartbeat(self, child: str, entries: list[LoadEntry], now: float) -> bool:
        """Record a child's report; True when the child was down and is back."""
        if child not in self.detector.last_heard:
            raise InvalidInput(f"node: {child!r} is not a child of {self.node!r}")
        if not entries or entries[0].node != child:
            raise InvalidInput(f"entries: the first entry must be {child!r} itself")
        self._reports[child] = (now, tuple(entries))
        return self.detector.heard(child, now)

    def inherit(self, entries: list[LoadEntry], now: float) -> None:
        """The summary this node's own parent sent down."""
        self._inherited = (now, tuple(entries))

    def cut_off(self, nodes: Iterable[str]) -> None:
        """Nodes above that this one cannot reach now (empty when its parent is back)."""
        self.unreachable = frozenset(nodes)

    def check(self, now: float) -> list[str]:
        """Children that went down since the last check."""
        return self.detector.check(now)

    # ---------------------------------------------------------------- knowledge
    def _child_entries(self, child: str, now: float) -> tuple[LoadEntry, ...]:
        """A child's report, aged to ``now``; all unhealthy when the child is down."""
        received = self._reports.get(child)
        if child in self.detector.down:
            if received is None:
                return (LoadEntry(child, 0, 0.0, healthy=False),)
            head, *rest = received[1]
            return (replace(head, age_s=0.0, healthy=False, queue_depth=0,
                            subtree_down=head.subtree_nodes, subtree_queue=0),
                    *(replace(e, age_s=0.0, healthy=False, queue_depth=0) for e in rest))
        if received is None:
            return ()
        at, entries = received
        return tuple(e.aged(now - at) for e in entries)

    def below(self, now: float) -> list[LoadEntry]:
        """Every node this one knows of in its subtree (itself excluded)."""
        out: list[LoadEntry] = []
        for child in self.children:
            out.extend(self._child_entries(child, now))
        return out

    def down_below(self) -> list[str]:
        """Nodes below that are unreachable because a child is down."""
        out: list[str] = []
        for child in self.detector.down:
            received = self._reports.get(child)
            out.append(child)
            if received is not None:
                out.extend(e.node for e in received[1][1:])
        return out

    def aggregate(self, own: LoadEntry, now: float) -> LoadEntry:
        """``own`` with the totals of the subtree below it filled in."""
        nodes, down, queue = 1, 0 if own.healthy else 1, own.queue_depth
        for child in self.children:
            entries = self._child_entries(child, now)
            if entries:
                head = entries[0]
                nodes += head.subtree_nodes
                down += head.subtree_down if head.healthy else head.subtree_nodes
                # a leaf's own queue is its subtree's
                queue += head.subtree_queue if head.subtree_nodes > 1 else head.queue_depth
        return replace(own, subtree_nodes=nodes, subtree_down=down, subtree_queue=queue)

    def report_up(self, own: LoadEntry, now: float) -> list[LoadEntry]:
        """A heartbeat for this node's parent: itself (aggregated), then its subtree."""
        return [self.aggregate(own, now), *self.below(now)]

    # ---------------------------------------------------------------- summaries down
    def _content(self, own: LoadEntry, now: float) -> list[LoadEntry]:
        heads = [entries[0] for c in self.children if (entries := self._child_entries(c, now))]
        inherited: list[LoadEntry] = []
        if self._inherited is not None:
            at, entries = self._inherited
            cut = self.unreachable
            inherited = [replace(e, age_s=0.0, healthy=False, queue_depth=0) if e.node in cut
                         else e.aged(now - at) for e in entries]
        return [self.aggregate(own, now), *heads, *inherited]

    def current_version(self, own: LoadEntry, now: float) -> int:
        """The summary version, moved on by material change or by the refresh period."""
        content = self._content(own, now)
        fingerprint = tuple((e.node, e.healthy, e.loaded, e.failed, _bucket(e.queue_depth))
                            for e in content)
        if fingerprint != self._fingerprint or now - self._bumped_at >= self.refresh_s:
            self._fingerprint = fingerprint
            self._bumped_at = now
            self.version += 1
        return self.version

    def summary_for(self, child: str, own: LoadEntry, known_version: int, now: float
                    ) -> tuple[int, list[LoadEntry] | None]:
        """(version, entries) for ``child``; entries is None when its version is current.

        The entries are this node, its other children, and what it inherited:
        everything the child cannot see from below, bounded by depth x fan-out.
        """
        version = self.current_version(own, now)
        if known_version == version:
            return version, None
        content = self._content(own, now)
        return version, [e for e in content if e.node != child]
