"""The :class:`Planner`: (query, entry node, mesh view) -> which (node, variant) serves it.

The planner owns the candidate tables and the tunables; the policy the
query's SLO names (:mod:`mesh.planner.policy`) makes the choice.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import TYPE_CHECKING

from mesh.errors import InvalidInput, NoRoute
from mesh.placement.hosting import Hosting
from mesh.planner.margins import CALIBRATED_MARGIN_MS
from mesh.planner.model import Candidate, Decision, Prediction, Rank, Scored
from mesh.planner.policy import POLICIES, policy_named
from mesh.planner.query import Objectives, PlanView, Query, Tuning
from mesh.planner.tables import CandidateTable, HostIndex, build_table, hosts_by_node

if TYPE_CHECKING:
    from mesh.registry import Registry, Variant
    from mesh.state import MeshView
    from mesh.topology import Topology

__all__ = ["Planner"]

_DEFAULT = Tuning()  # where the policy tunables' defaults (and their meaning) are written
_new = tuple.__new__  # builds a named tuple from its fields, as NamedTuple._make does


class Planner:
    """Decides where each query runs. Build one per (topology, registry) snapshot.

    Tables are built on first use per (entry, task, tenant); call
    :meth:`table` ahead of time to keep that work off the first query. The
    tunables below are read once, when the planner is built (pass them to
    the constructor, or set them on a subclass); :attr:`tuning` is what the
    policies see.
    """

    # What policies read (:class:`~mesh.planner.query.Tuning` documents each one):
    margin_frac: float = _DEFAULT.margin_frac
    dispatch_ms: float = _DEFAULT.dispatch_ms
    tie_cost_frac: float = _DEFAULT.tie_cost_frac
    tie_accuracy: float = _DEFAULT.tie_accuracy
    tie_latency_ms: float = _DEFAULT.tie_latency_ms
    tie_latency_frac: float = _DEFAULT.tie_latency_frac
    pool_size: int = _DEFAULT.pool_size
    cascade_threshold: float = _DEFAULT.cascade_threshold
    # What only the planner reads (tables and predictions):
    #: Milliseconds added to every prediction for a tier without a calibrated margin.
    margin_ms: float = 1.0
    #: Per-tier margin (ms), from the measured prediction error (see mesh.planner.margins).
    margin_ms_by_tier: Mapping[str, float] = CALIBRATED_MARGIN_MS
    #: Cost of one forwarding hop beyond the wire (msgpack stream, link emulator), each way.
    #: Fitted on the local mesh by benchmarks/prediction.py (suggested_per_hop_ms: 1.56 and
    #: 1.59 over the stream; 1.95 with nodes forwarding over HTTP, the same session).
    per_hop_ms: float = 1.6
    #: What mutual TLS adds to a node-to-node hop on a kept connection: benchmarks/overhead.py
    #: (a TLS forward against a plain one, less the client leg's TLS) measured 110-151 us in
    #: two runs on this machine; an isolated stream round trip measured 11 us (22 over HTTP).
    #: The larger figure is used. Added to per_hop_ms when the mesh runs on TLS; handshakes
    #: are not per query, since nodes keep their connections open.
    tls_hop_ms: float = 0.11
    #: What a mesh with tenants adds per hop: benchmarks/security.py measured +38.5 us p50
    #: end to end for the entry's key check plus one signed and checked hop (in-process the
    #: HMAC sign and check are 3.2 and 2.0 us; the rest is carrying the identity). The whole
    #: figure is charged per hop. Added to per_hop_ms on a mesh with tenants.
    identity_hop_ms: float = 0.04
    #: Hosts kept per (variant, hardware class, tier) in a table: the nearest ones.
    per_group: int = 4

    def __init__(self, topology: Topology, registry: Registry, *,
                 margin_frac: float | None = None, margin_ms: float | None = None,
                 margin_ms_by_tier: Mapping[str, float] | None = None,
                 per_group: int | None = None, seed: int = 0, tls: bool = False,
                 signed_hops: bool = False, hosting: Hosting | None = None) -> None:
        """``tls``: hops run over mutual TLS, which costs ``tls_hop_ms`` more each.
        ``signed_hops``: the mesh has tenants, whose identity every hop signs and checks
        (``identity_hop_ms`` more each).
        ``hosting``: what each node hosts (default: the computed placement, within each
        node's allow/deny globs)."""
        self.topology = topology
        self.registry = registry
        self.hosting = hosting if hosting is not None else Hosting(topology, registry)
        if tls:
            self.per_hop_ms = self.per_hop_ms + self.tls_hop_ms
        if signed_hops:
            self.per_hop_ms = self.per_hop_ms + self.identity_hop_ms
        if margin_frac is not None:
            self.margin_frac = margin_frac
        if margin_ms is not None:  # one flat margin replaces the calibrated ones
            self.margin_ms = margin_ms
            self.margin_ms_by_tier = {}
        if margin_ms_by_tier is not None:
            self.margin_ms_by_tier = dict(margin_ms_by_tier)
        if per_group is not None:
            self.per_group = per_group
        #: Used when plan() is not given a random source.
        self.rng = random.Random(seed)
        #: The tunables as every policy reads them (a snapshot of the attributes above).
        self.tuning = Tuning(**{f.name: getattr(self, f.name) for f in fields(Tuning)})
        # Bounded although clients name the task and tenant: both are checked against the
        # registry and the topology before anything is stored (entries are this mesh's nodes).
        self._tables: dict[tuple[str, str, str | None], CandidateTable] = {}
        self._indexes: dict[tuple[str, str | None], HostIndex] = {}

    # ------------------------------------------------------------------ tables
    def hosted(self, node: str) -> list[Variant]:
        """Registered variants this node may host and has a profile for."""
        key = self.topology.hardware_of(node).profile_key
        return [v for v in self.registry.variants.values()
                if self.hosting.allows(node, v.name) and v.profile_for(key) is not None]

    def margin_for(self, tier: str) -> float:
        return self.margin_ms_by_tier.get(tier, self.margin_ms)

    def _index(self, task: str, tenant: str | None) -> HostIndex:
        index = self._indexes.get((task, tenant))
        if index is None:
            variants = self.registry.for_task(task)  # raises UnknownTask with the known tasks
            allowed = None
            if tenant is not None:
                spec = self.topology.tenants.get(tenant)
                if spec is None:
                    raise InvalidInput(f"tenant {tenant!r} is not defined in topology "
                                       f"{self.topology.name!r}")
                if not spec.may_run(task):
                    raise NoRoute(f"tenant {tenant!r} may not run task {task!r}")
                allowed = [n for n in self.topology.nodes if spec.may_use(n)]
            hosts = hosts_by_node(self.topology, variants, allowed_nodes=allowed,
                                  hosting=self.hosting)
            index = HostIndex(self.topology, hosts, per_group=self.per_group,
                              per_hop_ms=self.per_hop_ms)
            self._indexes[(task, tenant)] = index
        return index

    def table(self, entry: str, task: str, tenant: str | None = None) -> CandidateTable:
        """The precomputed candidates of ``task`` for queries entering at ``entry``."""
        table = self._tables.get((entry, task, tenant))
        if table is not None:
            return table
        if entry not in self.topology.nodes:
            raise NoRoute(f"entry node {entry!r} is not in topology {self.topology.name!r}")
        index = self._index(task, tenant)
        table = build_table(entry, task, tenant, index, self.registry.variants,
                            energy_cost_per_kwh=self.topology.energy_cost_per_kwh,
                            per_hop_ms=self.per_hop_ms, dispatch_ms=self.tuning.dispatch_ms,
                            margin_ms=self.margin_ms_by_tier, default_margin_ms=self.margin_ms)
        self._tables[(entry, task, tenant)] = table
        return table

    def candidates(self, entry: str, task: str, tenant: str | None = None) -> tuple[Candidate, ...]:
        return self.table(entry, task, tenant).candidates()

    # ------------------------------------------------------------------ prediction (explain)
    def predict(self, c: Candidate, *, rows: int, payload_bytes: int, view: MeshView,
                now: float) -> Prediction:
        """The latency split of one candidate; the same numbers the fast path computes."""
        network = 0.0
        if c.hops:
            bits = (payload_bytes + c.out_bytes_per_row * rows) * 8
            transfer = 0.0 if c.bottleneck_mbps == float("inf") else bits / (
                c.bottleneck_mbps * 1000.0)
            retransmit = 2.0 * c.loss * (2.0 * c.path_latency_ms)
            network = 2 * (c.path_latency_ms + c.hops * self.per_hop_ms) + retransmit + transfer
        depth = view.queue_depth(c.node, now)
        queue = 0.0
        if depth > 0:
            full, rest = divmod(depth, c.max_batch)
            queue = full * c.profile.latency_ms(c.max_batch) + (
                c.profile.latency_ms(rest) if rest else 0.0)
        compute = c.profile.latency_ms(rows) + self.tuning.dispatch_ms
        load = 0.0 if view.is_loaded(c.node, c.variant, now) else c.profile.cold_start_ms
        return Prediction(network, queue, compute, load)

    def score(self, c: Candidate, slo: Objectives, *, rows: int, payload_bytes: int, view: MeshView,
              now: float) -> Scored:
        """One candidate's prediction, cost and the SLO's targets it misses (if any)."""
        p = self.predict(c, rows=rows, payload_bytes=payload_bytes, view=view, now=now)
        return self._judge(c, p, slo.latency_ms if not slo.offline else None, slo.min_accuracy,
                           slo.max_cost_per_1k, rows)

    def _judge(self, c: Candidate, p: Prediction, target: float | None, min_acc: float | None,
               max_cost: float | None, rows: int) -> Scored:
        cost = c.cost_per_1k(rows)
        problems: list[str] = []
        violation = 0.0
        if target is not None:
            padded = p.total_ms * (1 + self.tuning.margin_frac) + self.margin_for(c.tier)
            if padded > target:
                problems.append(f"predicted {padded:.1f} ms (with margin) > {target:g} ms")
                violation += (padded - target) / max(target, 1e-3)
        if min_acc is not None and c.accuracy < min_acc:
            problems.append(f"accuracy {c.accuracy:.4f} < {min_acc:g}")
            # relative growth of the error rate over what was asked for
            violation += (min_acc - c.accuracy) / max(1 - min_acc, 0.01)
        if max_cost is not None and cost > max_cost:
            problems.append(f"cost ${cost:.6f}/1k > ${max_cost:g}/1k")
            violation += (cost - max_cost) / max(max_cost, 1e-9)
        return Scored(c, p, cost, tuple(problems), violation, c.energy_j(rows) * 1000.0)

    # ------------------------------------------------------------------ decide
    def plan(self, task: str, slo: Objectives, entry: str, view: MeshView, *, now: float,
             rows: int = 1, payload_bytes: int = 0, explain: bool = False,
             rng: random.Random | None = None, tenant: str | None = None) -> Decision:
        """Choose a (node, variant): :meth:`plan_query` for a :class:`Query` of these fields."""
        # plan_query's body, not a call to it, and the named tuples made by tuple.__new__, not
        # by their keyword-handling constructors: each saves a few percent of a decision.
        query = _new(Query, (task, slo, rows, payload_bytes, tenant))
        table = self._tables.get((entry, task, tenant)) or self.table(entry, task, tenant)
        policy = POLICIES.get(slo.policy) or policy_named(slo.policy)
        decision = policy.choose(table, query,
                                 _new(PlanView, (view, now, rng or self.rng, self.tuning)))
        if explain:
            decision = replace(decision, candidates=self._explain(table, query, policy.rank,
                                                                  view, now))
        return decision

    def plan_query(self, query: Query, entry: str, view: MeshView, *, now: float,
                   explain: bool = False, rng: random.Random | None = None) -> Decision:
        """Where ``query``, entering at ``entry``, runs: its SLO's policy decides.

        ``now`` ages the load reports in ``view``; ``rng`` draws the power-of-two
        choices (the planner's own seeded one by default). With ``explain``, the
        decision lists every usable candidate with its prediction and problems.
        Raises UnknownTask, NoRoute (no candidate can serve at all) and
        InvalidInput (an unknown tenant or policy).
        """
        task, slo, _, _, tenant = query
        table = self._tables.get((entry, task, tenant)) or self.table(entry, task, tenant)
        policy = POLICIES.get(slo.policy) or policy_named(slo.policy)
        decision = policy.choose(table, query,
                                 _new(PlanView, (view, now, rng or self.rng, self.tuning)))
        if explain:
            decision = replace(decision, candidates=self._explain(table, query, policy.rank,
                                                                  view, now))
        return decision

    # ------------------------------------------------------------------ explain
    def _explain(self, table: CandidateTable, query: Query, rank: Rank, view: MeshView,
                 now: float) -> tuple[Scored, ...]:
        scored = [self.score(r.candidate, query.slo, rows=query.rows,
                             payload_bytes=query.payload_bytes, view=view, now=now)
                  for r in table.rows if view.usable(r.node, r.variant, now)]
        key = _EXPLAIN_KEYS[rank]
        return tuple(sorted(scored, key=lambda s: (not s.feasible, key(s))))


_EXPLAIN_KEYS = {
    Rank.COST: lambda s: (s.cost_per_1k, s.prediction.total_ms),
    Rank.ACCURACY: lambda s: (-s.candidate.accuracy, s.cost_per_1k, s.prediction.total_ms),
    Rank.LATENCY: lambda s: (s.prediction.total_ms, s.cost_per_1k),
}
