"""Placement, live: the root of the hierarchy decides, every node carries it out. The I/O half.

The pure half is :mod:`mesh.placement`. Here:

* **Load goes up.** Every heartbeat carries the sender's subtree
  :class:`~mesh.placement.inputs.LoadReport` (what each variant served on
  each node, and the demand per task entering each subtree), measured by each
  node's :class:`~mesh.placement.meter.LoadMeter` (:mod:`nodes.membership`).
* **The root decides.** The node without a parent runs an
  :class:`~mesh.placement.Autoscaler` round when it starts, then every
  ``placement.interval_s`` (the topology's), and at once when its registry
  changes (a model added),
  from the whole tree's report and what its view says is down or failed.
* **Decisions go down.** A round that changes the placement gives it a new
  version; heartbeat answers carry it to every child whose copy is older,
  and each child hands it on to its own children. A node adopts it
  (:meth:`nodes.agent.NodeAgent.adopt_placement`): it plans with it, loads
  what it now hosts in the background (warm variants serve meanwhile),
  unloads what it no longer hosts once idle, and runs each variant with the
  compute workers the placement gives it.

Until a node has heard a placement, it serves by the base placement, which it
computes itself exactly as the root does (the same registry gives the same
answer), so a mesh serves from its first second. A node cut off from its
parent keeps the placement it has.

A placement decided at the root reaches a node within one heartbeat interval
per level of the hierarchy; a new model registered at the core is placed on
the round it triggers, so it is served everywhere within
``placement.interval_s`` plus that (README: "Managed placement").
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from mesh.errors import InvalidInput
from mesh.placement import Autoscaler, LoadReport, Placement, PlacementDecision, Round
from nodes.tasks import cancel_all

#: the node agent (nodes.agent.NodeAgent), typed loosely: it imports this module
NodeAgent = Any

__all__ = ["PlacementControl"]

log = logging.getLogger("tiermesh.placement")


class PlacementControl:
    """One node's side of live placement. An async context manager (the root runs a task)."""

    #: decisions kept for status pages
    history_size: int = 100

    def __init__(self, agent: NodeAgent, *, clock: Callable[[], float] = time.time) -> None:
        """``clock``: the time rounds are decided at (wall clock: the forecasts' daily
        shape lines up with the day)."""
        self.agent = agent
        topology = agent.config.topology
        self.spec = topology.placement
        self.is_root = topology.parent.get(agent.name) is None
        self.autoscaler = Autoscaler(topology) if self.is_root and self.spec.managed else None
        self.clock = clock
        self._epoch = uuid.uuid4().hex[:8]
        self._count = 0
        #: the placement this node serves by ("": none heard yet, the base placement)
        self.version = ""
        self.placement: Placement | None = None
        self._wire: dict[str, Any] | None = None
        self.rounds = 0
        self.last_round_at: float | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=self.history_size)
        #: what the whole subtree reported (membership fills it in); the root's round input
        self.load: Callable[[], LoadReport] = LoadReport
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PlacementControl:
        if self.autoscaler is not None:
            self._task = asyncio.create_task(self._run(), name=f"placement:{self.agent.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_all([self._task])
        self._task = None

    def kick(self) -> None:
        """Run a round now (the registry changed)."""
        self._kick.set()

    async def _run(self) -> None:
        while True:  # a round at once (the placement is published from the start), then
            try:      # one every interval, or sooner when the registry changes
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad round must not end placement
                log.exception("%s: placement round failed", self.agent.name)
            kicked = asyncio.ensure_future(self._kick.wait())
            try:
                await asyncio.wait([kicked], timeout=self.spec.interval_s)
            finally:
                kicked.cancel()
            self._kick.clear()

    # ------------------------------------------------------------------ the root
    async def step(self, now: float | None = None) -> Round:
        """One round (the root only): decide from the reported load, adopt a changed
        placement here and hand it down. Tests call it with their own ``now``."""
        if self.autoscaler is None:
            raise RuntimeError(f"{self.agent.name} does not run placement rounds (not the "
                               "root, or placement.managed is false)")
        now = self.clock() if now is None else now
        agent = self.agent
        nodes = agent.config.topology.nodes
        seen = agent.clock()
        view = agent.view
        failed = {n: load.failed for n, load in view.loads.items() if n in nodes and load.failed}
        down = frozenset(n for n in nodes if view.is_down(n, seen))
        snapshot = self.load().snapshot(failed=failed, down=down)
        round_ = self.autoscaler.step(agent.registry, snapshot, now)
        self.rounds += 1
        self.last_round_at = now
        if round_.changed or self.placement is None:
            for d in round_.decisions:
                self.history.append(d.to_json())
            self._count += 1
            self._publish(f"{self._epoch}.{self._count}", round_.placement, round_.decisions)
            await agent.adopt_placement(round_.placement, round_.decisions)
        return round_

    def _publish(self, version: str, placement: Placement,
                 decisions: tuple[PlacementDecision, ...]) -> None:
        self.version, self.placement = version, placement
        self._wire = {"version": version, "hosts": placement.to_json(),
                      "decisions": [d.to_json() for d in decisions][-self.history_size:]}

    # ------------------------------------------------------------------ every other node
    def for_child(self, held: Any) -> dict[str, Any] | None:
        """What a heartbeat answer carries: the placement, when the child's is older."""
        if self._wire is None or held == self.version:
            return None
        return self._wire

    async def receive(self, obj: Any) -> None:
        """A placement from the parent's heartbeat answer: adopt it when it is new.
        Raises :class:`InvalidInput` naming what is malformed (nothing changes then)."""
        if obj is None or self.is_root:
            return
        if not isinstance(obj, dict) or not isinstance(obj.get("version"), str):
            raise InvalidInput("placement: must be a map with a version and hosts")
        if obj["version"] == self.version:
            return
        try:
            placement = Placement.from_json(obj.get("hosts"))
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        decisions = obj.get("decisions")
        if isinstance(decisions, list):
            self.history.extend(d for d in decisions[-self.history_size:] if isinstance(d, dict))
        self.version, self.placement, self._wire = obj["version"], placement, obj
        await self.agent.adopt_placement(placement, ())

    def status(self) -> dict[str, Any]:
        node = self.agent.name
        placement = self.placement
        return {
            "version": self.version or None,
            "root": self.is_root,
            "rounds": self.rounds,
            "interval_s": self.spec.interval_s,
            "last_round_at": self.last_round_at,
            "hosts": dict(placement.variants(node)) if placement is not None else None,
            "mesh": placement.to_json() if placement is not None else None,
            "decisions": list(self.history)[-20:],
        }
