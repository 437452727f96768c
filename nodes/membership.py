"""Membership: heartbeats up, versioned summaries down, failure detection. The I/O half.

Every ``heartbeat_interval_s`` (from the topology's ``membership`` section)
a node

1. records its own load in its :class:`~mesh.state.MeshView`;
2. counts as down every child it has not heard from for ``down_after_s``;
3. POSTs a heartbeat to its parent, through the emulated link
   (``AgentConfig.neighbours``): its own load with its subtree aggregated,
   then the nodes below it, and the summary version it holds. The answer
   carries the parent's summary (the parent, its other children and what it
   inherited from above) only when that version is stale, so an edge node
   knows its siblings and ancestors and decides locally, without a round
   trip per query. A parent that has not answered for ``down_after_s``
   counts as down, and on a tree so does everything beyond it.

A node that dies is therefore seen as down by its parent within
``down_after_s`` plus one interval, and by every node of the mesh within one
more interval per level of the hierarchy. The pure parts (aggregation,
versions, detection) are :class:`~mesh.state.Subtree` and friends.

A heartbeat (and the load reports in it) counts only when it comes from the
child it speaks for (:mod:`nodes.identity`): with TLS, the child's verified
certificate (heartbeats then travel over mutual TLS, ``ssl``); without, the
child's mesh-key token. Anything else is refused 403 and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl as _ssl
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from mesh.certs import with_tls
from mesh.errors import Forbidden, InvalidInput
from mesh.placement import LoadReport, Machine, VariantLoad
from mesh.state import FailureDetector, LoadEntry, MeshView, RateMeter, Subtree, apply_entries
from mesh.topology import Topology
from mesh.wire import pack, unpack
from nodes.identity import Callers
from nodes.peers import PeerKey
from nodes.placement import PlacementControl
from nodes.tasks import cancel_all

__all__ = ["LocalLoad", "Membership", "HEARTBEAT_PATH"]

log = logging.getLogger("tiermesh.membership")

HEARTBEAT_PATH = "/v1/membership/heartbeat"
STATUS_PATH = "/v1/membership"
MSGPACK = "application/msgpack"


@dataclass(frozen=True, slots=True)
class LocalLoad:
    """What a node says about itself on each heartbeat."""

    queue_depth: int
    loaded: frozenset[str]
    failed: frozenset[str]
    #: Requests received since start (the arrival rate is derived from it).
    requests: int


class Membership:
    """One node's membership. An async context manager that owns one task and one session."""

    def __init__(self, node: str, topology: Topology, view: MeshView, *,
                 neighbours: Mapping[str, str], local_load: Callable[[], LocalLoad],
                 clock: Callable[[], float] = time.monotonic,
                 peers: PeerKey | None = None,
                 registry_version: Callable[[], int] | None = None,
                 on_registry: Callable[[int], None] | None = None,
                 callers: Callers | None = None, ssl: _ssl.SSLContext | None = None,
                 own_load: Callable[[float], tuple[Mapping[str, VariantLoad],
                                                   Mapping[str, float]]] | None = None,
                 placement: PlacementControl | None = None,
                 machine: Machine | None = None) -> None:
        """``callers``: who a heartbeat comes from (certificates or tokens); ``peers``, a
        mesh key alone, stands for ``Callers`` without TLS. With either, only a child's own
        proven heartbeat counts. ``ssl``: heartbeats to the parent over TLS (the node's
        client context). ``own_load``: this node's measurements for placement (per variant
        served, per task entering) at each heartbeat; ``placement``: the node's
        :class:`~nodes.placement.PlacementControl`, whose placement heartbeat answers carry
        down (and, at the root, whose rounds read the tree's load from here); ``machine``:
        the CPUs and host this node reports with its load."""
        self.node = node
        self.own_load = own_load
        self.machine = machine
        self.placement = placement
        self._own_report: tuple[Mapping[str, VariantLoad], Mapping[str, float]] = ({}, {})
        #: child -> (when, its subtree's load report)
        self._child_loads: dict[str, tuple[float, LoadReport]] = {}
        #: the subtree's load goes up once per placement round (a report grows with the
        #: subtree; the root reads it once a round), and often enough to stay fresh
        self.load_every_s = min(topology.placement.interval_s, topology.membership.stale_after_s / 2)
        self._load_sent_at = -math.inf
        self.loads_sent = 0
        self._subtree_of = {c: frozenset(topology.subtree(c)) for c in topology.children[node]}
        if placement is not None:
            placement.load = self.subtree_load
        #: this node's registry version, told to children in every heartbeat answer
        self.registry_version = registry_version
        #: called with the parent's registry version from every heartbeat answer
        self.on_registry = on_registry
        #: who may heartbeat here: only a child, proven by certificate or token (None: anyone)
        self.callers = callers if callers is not None else \
            Callers(topology.nodes, tls=False, key=peers) if peers is not None else None
        self.ssl = ssl
        self.topology = topology
        self.view = view
        self.spec = topology.membership
        # Summaries are refreshed at half this age, so the view must age on the same scale.
        view.stale_after_s = self.spec.stale_after_s
        self.neighbours = dict(neighbours)
        self.local_load = local_load
        self.clock = clock
        self.parent = topology.parent.get(node)
        now = clock()
        grace = self.spec.startup_grace_s
        self.subtree = Subtree(node, topology.children[node], down_after_s=self.spec.down_after_s,
                               stale_after_s=self.spec.stale_after_s, now=now,
                               startup_grace_s=grace)
        self.upstream = FailureDetector([self.parent] if self.parent else [],
                                        down_after_s=self.spec.down_after_s, now=now,
                                        startup_grace_s=grace)
        self.epoch = uuid.uuid4().hex[:12]
        self._known: tuple[str, int] = ("", -1)  # the parent's (epoch, version) we hold
        self._rate = RateMeter()
        self._own = LoadEntry(node, 0)
        self._cut_off: list[str] = []  # what we marked down when the parent went
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self.heartbeats_sent = 0
        self.heartbeats_failed = 0

    @classmethod
    def for_agent(cls, agent: Any) -> Membership:
        """Membership for a :class:`~nodes.agent.NodeAgent` (its view, neighbours, status)."""
        config = agent.config
        return cls(config.node, config.topology, agent.view, neighbours=config.neighbours,
                   local_load=agent.local_load, clock=agent.clock,
                   registry_version=lambda: agent.registry.version,
                   on_registry=agent.registry_sync.parent_has,
                   callers=agent.callers, ssl=agent.tls_client,
                   own_load=agent.placement_load, placement=agent.placement,
                   machine=agent.machine)

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Membership:
        timeout = max(self.spec.heartbeat_interval_s, 0.05)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
        self._tick()  # our own entry is in the view before the first query
        self._task = asyncio.create_task(self._run(), name=f"membership:{self.node}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_all([self._task])
        self._task = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    def add_routes(self, app: web.Application) -> None:
        app[MEMBERSHIP] = self
        app.router.add_post(HEARTBEAT_PATH, _heartbeat_handler)
        app.router.add_get(STATUS_PATH, _status_handler)

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        interval = self.spec.heartbeat_interval_s
        while True:
            started = self.clock()
            try:
                self._tick()
                if self.parent is not None:
                    await self._heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad round must not end membership
                log.exception("membership round failed on %s", self.node)
            await asyncio.sleep(max(interval - (self.clock() - started), 0.0))

    def _tick(self) -> None:
        now = self.clock()
        load = self.local_load()
        rate = self._rate.update(load.requests, now)
        self._own = LoadEntry(self.node, load.queue_depth, 0.0, True, rate, load.loaded,
                              load.failed)
        if self.own_load is not None:
            self._own_report = self.own_load(now)
        self.view.report(self.node, load.queue_depth, now, loaded=load.loaded,
                         failed=load.failed, arrival_rate=rate)
        for child in self.subtree.check(now):
            unreachable = self._beyond(child)
            log.warning("%s: child %s missed heartbeats for %.1f s; %d node(s) down", self.node,
                        child, self.spec.down_after_s, len(unreachable))
            self.view.set_down(unreachable, now)

    def subtree_load(self) -> LoadReport:
        """This subtree's load for placement: this node's own and each child's latest
        report (a child not heard from for ``stale_after_s`` counts for nothing)."""
        now = self.clock()
        children = self.topology.children[self.node]
        reports = []
        for child in children:
            got = self._child_loads.get(child)
            fresh = got is not None and now - got[0] <= self.spec.stale_after_s
            reports.append(got[1] if fresh and got is not None else LoadReport())
        served, demand = self._own_report
        return LoadReport.of_subtree(self.node, served, demand, reports, list(children),
                                     own_machine=self.machine)

    def _beyond(self, child: str) -> list[str]:
        """What becomes unreachable from here when ``child`` is down."""
        return self.topology.subtree(child) if self.topology.is_tree else [child]

    async def _heartbeat(self) -> None:
        assert self.parent is not None and self._http is not None
        now = self.clock()
        url = self.neighbours.get(self.parent)
        body = {"node": self.node, "epoch": self._known[0], "version": self._known[1],
                "entries": [e.to_wire() for e in self.subtree.report_up(self._own, now)]}
        with_load = self.own_load is not None and now - self._load_sent_at >= self.load_every_s
        if with_load:
            body["load"] = self.subtree_load().to_wire()
        if self.placement is not None:
            body["placement"] = self.placement.version
        reply: Any = None
        if url is not None:
            self.heartbeats_sent += 1
            try:
                headers = {"Content-Type": MSGPACK,
                           **(self.callers.headers(self.node) if self.callers else {})}
                target = (with_tls(url) if self.ssl is not None else url) + HEARTBEAT_PATH
                async with self._http.post(target, data=pack(body), headers=headers,
                                           ssl=self.ssl if self.ssl is not None else True
                                           ) as resp:
                    data = await resp.read()
                    if resp.status == 200:
                        reply = unpack(data)
                    else:
                        log.warning("%s: heartbeat to %s answered %d", self.node, self.parent,
                                    resp.status)
            except (TimeoutError, aiohttp.ClientError, InvalidInput):
                pass
        if with_load and isinstance(reply, dict):
            self._load_sent_at, self.loads_sent = now, self.loads_sent + 1
        now = self.clock()
        if not isinstance(reply, dict):
            self.heartbeats_failed += 1
            if self.upstream.check(now):
                self._cut_off = self._outside() if self.topology.is_tree else [self.parent]
                log.warning("%s: parent %s has not answered for %.1f s; %d node(s) down",
                            self.node, self.parent, self.spec.down_after_s, len(self._cut_off))
                self.view.set_down(self._cut_off, now)
                self.subtree.cut_off(self._cut_off)  # and tell the children
            return
        registry = reply.get("registry")
        if self.on_registry is not None and isinstance(registry, int) \
                and not isinstance(registry, bool):
            self.on_registry(registry)
        if self.upstream.heard(self.parent, now):
            log.info("%s: parent %s is back", self.node, self.parent)
            self.view.clear_down(self._cut_off)
            self._cut_off = []
            self.subtree.cut_off(())
        if self.placement is not None:
            try:
                await self.placement.receive(reply.get("placement"))
            except InvalidInput as exc:
                log.warning("%s: the placement from %s is malformed: %s", self.node,
                            self.parent, exc.message)
        entries = reply.get("entries")
        if isinstance(entries, list):
            parsed = [LoadEntry.from_wire(e, where=f"entries[{i}]") for i, e in enumerate(entries)]
            self.subtree.inherit(parsed, now)
            apply_entries(self.view, parsed, now, skip=frozenset({self.node}))
            self._known = (str(reply.get("epoch", "")), int(reply.get("version", -1)))

    def _outside(self) -> list[str]:
        mine = set(self.topology.subtree(self.node))
        return [n for n in self.topology.nodes if n not in mine]

    # ------------------------------------------------------------------ the parent's side
    def on_heartbeat(self, body: Any, *, sender: str | None = None) -> dict[str, Any]:
        """A child's heartbeat: record it, answer with our summary if its copy is stale.

        ``sender``: the node the request proved it came from (:mod:`nodes.identity`); with
        callers to check, a heartbeat counts only from that node itself, and only if it is a
        child.
        """
        if not isinstance(body, dict):
            raise InvalidInput("heartbeat: must be a map with node, version and entries")
        child, entries = body.get("node"), body.get("entries")
        if not isinstance(child, str) or not isinstance(entries, list) or not entries:
            raise InvalidInput("heartbeat: node (a name) and entries (a non-empty list) required")
        if self.callers is not None and (sender != child
                                         or child not in self.topology.children[self.node]):
            proof = "its certificate" if self.callers.tls else "the mesh key's token"
            raise Forbidden(f"heartbeat: only a child node of {self.node} may send one, for "
                            f"itself, proven by {proof}")
        version = body.get("version", -1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise InvalidInput("heartbeat.version: must be an integer")
        parsed = [LoadEntry.from_wire(e, where=f"entries[{i}]") for i, e in enumerate(entries)]
        report = None
        if body.get("load") is not None:
            try:
                report = LoadReport.from_wire(body["load"], nodes=self._subtree_of.get(child, ()),
                                              where="heartbeat.load")
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None
        now = self.clock()
        if report is not None:
            self._child_loads[child] = (now, report)
        if self.subtree.heartbeat(child, parsed, now):
            log.info("%s: child %s is back", self.node, child)
            self.view.clear_down(self._beyond(child))
        apply_entries(self.view, parsed, now)
        known = version if body.get("epoch") == self.epoch else -1
        current, summary = self.subtree.summary_for(child, self._own, known, now)
        reply: dict[str, Any] = {"epoch": self.epoch, "version": current}
        if self.registry_version is not None:
            reply["registry"] = self.registry_version()
        if summary is not None:
            reply["entries"] = [e.to_wire() for e in summary]
        if self.placement is not None:
            placement = self.placement.for_child(body.get("placement"))
            if placement is not None:
                reply["placement"] = placement
        return reply

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "node": self.node,
            "parent": self.parent,
            "parent_down": bool(self.upstream.down),
            "children": {c: {"down": c in self.subtree.detector.down,
                             "last_heard_s": round(now - t, 3)}
                         for c, t in sorted(self.subtree.detector.last_heard.items())},
            "summary_version": self.subtree.version,
            "held_version": self._known[1],
            "subtree": self.subtree.aggregate(self._own, now).to_wire(),
            "heartbeats_sent": self.heartbeats_sent,
            "heartbeats_failed": self.heartbeats_failed,
            "heartbeat_interval_s": self.spec.heartbeat_interval_s,
            "down_after_s": self.spec.down_after_s,
        }


MEMBERSHIP = web.AppKey("membership", Membership)


async def _heartbeat_handler(request: web.Request) -> web.Response:
    membership = request.app[MEMBERSHIP]
    callers = membership.callers
    sender = callers.of_request(request.transport, request.headers) if callers else None
    reply = membership.on_heartbeat(unpack(await request.read()), sender=sender)
    return web.Response(body=pack(reply), content_type=MSGPACK)


async def _status_handler(request: web.Request) -> web.Response:
    membership = request.app[MEMBERSHIP]
    return web.json_response(membership.status())
