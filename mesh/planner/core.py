"""The :class:`Planner`: (query, entry node, mesh view) -> which (node, variant) serves it."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import replace

from mesh.errors import InvalidInput, NoRoute
from mesh.planner.cascade import plan_cascade
from mesh.planner.margins import CALIBRATED_MARGIN_MS
from mesh.planner.model import Candidate, Decision, Escalation, Prediction, Scored
from mesh.planner.tables import (
    CandidateTable,
    HostIndex,
    Picked,
    Row,
    build_table,
    hosts_by_node,
)
from mesh.registry import Registry, Variant
from mesh.state import MeshView, NodeLoad
from mesh.topology import Topology
from mesh.wire import SLO

__all__ = ["Planner"]

_CHEAPEST, _ACCURATE, _FASTEST = "cheapest", "most-accurate", "fastest"


class Planner:
    """Decides where each query runs. Build one per (topology, registry) snapshot.

    Tables are built on first use per (entry, task, tenant); call
    :meth:`table` ahead of time to keep that work off the first query.
    """

    #: Predictions are inflated by this fraction before checking the latency target...
    margin_frac: float = 0.10
    #: ...plus this many milliseconds for a tier without a calibrated margin.
    margin_ms: float = 1.0
    #: Per-tier margin (ms), from the measured prediction error (see mesh.planner.margins).
    margin_ms_by_tier: Mapping[str, float] = CALIBRATED_MARGIN_MS
    #: Cost of one forwarding hop beyond the wire (msgpack stream, link emulator), each way.
    #: Fitted on the local mesh by benchmarks/prediction.py (suggested_per_hop_ms: 1.56 and
    #: 1.59 over the stream; 1.95 with nodes forwarding over HTTP, the same session).
    per_hop_ms: float = 1.6
    #: Cost of handing a query to the local runtime (queueing, thread hand-off).
    dispatch_ms: float = 0.3
    #: Hosts kept per (variant, hardware class, tier) in a table: the nearest ones.
    per_group: int = 4
    #: Costs within this fraction of the cheapest count as equal (power of two choices).
    tie_cost_frac: float = 0.10
    #: Accuracies within this much of the best count as equal for ``most-accurate``.
    tie_accuracy: float = 0.001
    #: Predicted latencies within max(tie_latency_ms, tie_latency_frac x best) count as equal.
    tie_latency_ms: float = 0.5
    tie_latency_frac: float = 0.10
    #: At most this many feasible candidates are examined per query.
    pool_size: int = 8
    #: A cascade escalates rows whose top probability is below this (unless the SLO says).
    cascade_threshold: float = 0.9

    def __init__(self, topology: Topology, registry: Registry, *,
                 margin_frac: float | None = None, margin_ms: float | None = None,
                 margin_ms_by_tier: Mapping[str, float] | None = None,
                 per_group: int | None = None, seed: int = 0) -> None:
        self.topology = topology
        self.registry = registry
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
        self._tables: dict[tuple[str, str, str | None], CandidateTable] = {}
        self._indexes: dict[tuple[str, str | None], HostIndex] = {}

    # ------------------------------------------------------------------ tables
    def hosted(self, node: str) -> list[Variant]:
        """Registered variants this node may host and has a profile for."""
        spec = self.topology.nodes[node]
        key = self.topology.hardware_of(node).profile_key
        return [v for v in self.registry.variants.values()
                if spec.allows(v.name) and v.profile_for(key) is not None]

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
            hosts = hosts_by_node(self.topology, variants, allowed_nodes=allowed)
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
                            per_hop_ms=self.per_hop_ms, dispatch_ms=self.dispatch_ms,
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
        compute = c.profile.latency_ms(rows) + self.dispatch_ms
        load = 0.0 if view.is_loaded(c.node, c.variant, now) else c.profile.cold_start_ms
        return Prediction(network, queue, compute, load)

    def score(self, c: Candidate, slo: SLO, *, rows: int, payload_bytes: int, view: MeshView,
              now: float) -> Scored:
        p = self.predict(c, rows=rows, payload_bytes=payload_bytes, view=view, now=now)
        return self._judge(c, p, slo.latency_ms if not slo.offline else None, slo.min_accuracy,
                           slo.max_cost_per_1k, rows)

    def _judge(self, c: Candidate, p: Prediction, target: float | None, min_acc: float | None,
               max_cost: float | None, rows: int) -> Scored:
        cost = c.cost_per_1k(rows)
        problems: list[str] = []
        violation = 0.0
        if target is not None:
            padded = p.total_ms * (1 + self.margin_frac) + self.margin_for(c.tier)
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
    def plan(self, task: str, slo: SLO, entry: str, view: MeshView, *, now: float,
             rows: int = 1, payload_bytes: int = 0, explain: bool = False,
             rng: random.Random | None = None, tenant: str | None = None) -> Decision:
        """Choose a (node, variant). Raises UnknownTask / NoRoute when there is none at all.

        ``rng`` draws the power-of-two choices (the planner's own seeded one by default).
        """
        table = self._tables.get((entry, task, tenant)) or self.table(entry, task, tenant)
        target = None if slo.offline else slo.latency_ms
        rng = rng or self.rng
        if slo.policy == "cascade":
            decision = plan_cascade(self, table, slo, target, view, now, rows, payload_bytes,
                                    rng)
        else:
            everything = (table.by_cost if slo.policy == _CHEAPEST else
                          table.by_accuracy if slo.policy == _ACCURATE else table.by_latency)
            order = everything if slo.min_accuracy is None else _accurate_enough(
                table, slo.policy, everything, slo.min_accuracy)
            decision = self._decide(table, order, slo.policy, target, slo.min_accuracy,
                                    slo.max_cost_per_1k, view, now, rows, payload_bytes, rng,
                                    everything)
        if explain:
            decision = replace(decision, candidates=self._explain(table, slo, view, now, rows,
                                                                  payload_bytes))
        return decision

    def _decide(self, table: CandidateTable, order: Sequence[Row], policy: str,
                target: float | None, min_acc: float | None, max_cost: float | None,
                view: MeshView, now: float, rows: int, payload: int,
                rng: random.Random, everything: Sequence[Row] | None = None) -> Decision:
        """The policy's pick from ``order``, else the closest miss among ``everything``."""
        picked = self._select(order, policy, target, min_acc, max_cost, view, now, rows, payload,
                              rng)
        if picked is None:
            # Nearest first: a small miss found early lets the rest be skipped.
            if everything is None:
                return self._closest(table, order, target, min_acc, max_cost, view, now, rows,
                                     payload, policy)
            return self._closest(table, table.by_latency, target, min_acc, max_cost, view, now,
                                 rows, payload, policy, by_latency=True)
        return self._decision(picked, policy, rows, payload)

    def _select(self, order: Sequence[Row], policy: str, target: float | None,
                min_acc: float | None, max_cost: float | None, view: MeshView, now: float,
                rows: int, payload: int, rng: random.Random) -> Picked | None:
        # The hot path: walk the rows in the policy's static order, add the dynamic terms
        # (payload, queue, cold start), stop once nothing later can be better.
        loads = view.loads
        down = view.down
        stale = view.stale_after_s
        frac = 1.0 + self.margin_frac
        cheapest, fastest = policy == _CHEAPEST, policy == _FASTEST
        pool: list[tuple[Row, float, float, float]] = []  # row, total, queue, cold
        bound = cost_bound = -1.0
        # cheapest / most-accurate: a row slower than this even with no load can be neither
        # the best nor tie with it (the best's total only falls as the walk goes on)
        too_slow = float("inf")
        lat_ms, lat_frac = self.tie_latency_ms, self.tie_latency_frac
        for r in order:
            if pool:
                if cheapest:
                    if r.cost > bound:
                        break
                elif fastest:
                    if r.fixed_ms > bound:
                        break
                elif r.accuracy < bound or r.cost > cost_bound:
                    # sorted by accuracy, then cost: nothing later is as accurate and as cheap
                    break
            if min_acc is not None and r.accuracy < min_acc:
                continue
            if max_cost is not None and r.cost > max_cost:
                continue
            if rows == 1:
                floor = r.fixed_ms + payload * r.ms_per_byte
                if floor > too_slow:
                    continue
                if target is not None and floor * frac + r.margin_ms > target:
                    continue  # too slow even with no queue: no need to look at its load
            if down and r.node in down:
                continue
            terms = _load_terms(r, loads.get(r.node), now, stale)
            if terms is None:
                continue
            queue, cold = terms
            if rows == 1:
                total = r.fixed_ms + payload * r.ms_per_byte + queue + cold
            else:
                total = self._static_ms(r, rows, payload) + queue + cold
            if target is not None and total * frac + r.margin_ms > target:
                continue
            pool.append((r, total, queue, cold))
            if len(pool) == 1:
                first = r
                if cheapest:
                    bound = r.cost * (1.0 + self.tie_cost_frac)
                elif fastest:
                    bound = total + max(lat_ms, lat_frac * total)
                else:
                    bound = r.accuracy - self.tie_accuracy
                    cost_bound = r.cost * (1.0 + self.tie_cost_frac)
                if not fastest:
                    too_slow = total + max(lat_ms, lat_frac * total)
            elif fastest:
                bound = min(bound, total + max(lat_ms, lat_frac * total))
            elif r.cost == first.cost and r.accuracy == first.accuracy:  # could be the best
                too_slow = min(too_slow, total + max(lat_ms, lat_frac * total))
            if len(pool) >= self.pool_size:
                break
        if not pool:
            return None
        if len(pool) == 1:
            return pool[0], None, 1
        return self._choose(pool, policy, rng)

    def _prediction(self, picked: Picked, rows: int, payload: int) -> tuple[Prediction, float]:
        (r, total, queue, cold), _, _ = picked
        if rows == 1:
            return Prediction(r.network_ms + payload * r.ms_per_byte, queue, r.compute_ms,
                              cold), r.cost
        return (Prediction(self._network_ms(r, rows, payload), queue,
                           r.candidate.profile.latency_ms(rows) + self.dispatch_ms, cold),
                r.candidate.cost_per_1k(rows))

    def _decision(self, picked: Picked, policy: str, rows: int, payload: int,
                  escalation: Escalation | None = None,
                  why: tuple[object, ...] | None = None) -> Decision:
        (r, total, _, _), runner_up, equivalents = picked
        prediction, cost = self._prediction(picked, rows, payload)
        other = None if runner_up is None else runner_up.node + "/" + runner_up.variant
        if why is None:
            why = ("chosen", r.accuracy, total, cost, equivalents, other)
        return Decision(r.node, r.tier, r.variant, r.accuracy, prediction, True, policy, why,
                        (), cost, r.margin_ms, equivalents, other, escalation)

    def _choose(self, pool: list[tuple[Row, float, float, float]], policy: str,
                rng: random.Random) -> tuple[tuple[Row, float, float, float], Row | None, int]:
        """The policy's best, or power of two choices among the candidates that tie with it."""
        if policy == _CHEAPEST:
            best = min(pool, key=lambda p: (p[0].cost, p[1]))
        elif policy == _FASTEST:
            best = min(pool, key=lambda p: (p[1], p[0].cost))
        else:
            best = min(pool, key=lambda p: (-p[0].accuracy, p[0].cost, p[1]))
        b_row, b_total = best[0], best[1]
        slack = b_total + max(self.tie_latency_ms, self.tie_latency_frac * b_total)
        max_cost = b_row.cost * (1.0 + self.tie_cost_frac)
        if policy == _FASTEST:
            ties = [p for p in pool if p[1] <= slack]
        else:
            min_acc = b_row.accuracy - self.tie_accuracy if policy == _ACCURATE else -1.0
            ties = [p for p in pool if p[1] <= slack and p[0].cost <= max_cost
                    and p[0].accuracy >= min_acc]
        n = len(ties)
        if n < 2:
            return best, None, 1
        i = int(rng.random() * n)
        j = int(rng.random() * (n - 1))
        if j >= i:
            j += 1
        a, b = ties[i], ties[j]
        # The less loaded of the two (queue + cold start); on a tie, the nearer.
        if (a[2] + a[3], a[1]) <= (b[2] + b[3], b[1]):
            return a, b[0], n
        return b, a[0], n

    def _static_ms(self, r: Row, rows: int, payload: int) -> float:
        return self._network_ms(r, rows, payload) + r.candidate.profile.latency_ms(rows) + (
            self.dispatch_ms)

    def _network_ms(self, r: Row, rows: int, payload: int) -> float:
        if not r.candidate.hops:
            return 0.0
        extra_rows = rows - 1
        return r.network_ms + (payload + r.candidate.out_bytes_per_row * extra_rows) * (
            r.ms_per_byte)

    def _closest(self, table: CandidateTable, order: Sequence[Row], target: float | None,
                 min_acc: float | None, max_cost: float | None, view: MeshView, now: float,
                 rows: int, payload: int, policy: str, *, by_latency: bool = False) -> Decision:
        """Nothing is feasible: answer with the candidate that misses the SLO by least."""
        frac = 1.0 + self.margin_frac
        loads, down, stale = view.loads, view.down, view.stale_after_s
        # Violation as _judge measures it: relative overshoot of each target, summed.
        t_norm = max(target, 1e-3) if target is not None else 1.0
        a_norm = max(1 - min_acc, 0.01) if min_acc is not None else 1.0
        c_norm = max(max_cost, 1e-9) if max_cost is not None else 1.0
        best: tuple[float, float, Row, float, float] | None = None
        best_v = best_t = float("inf")
        # In latency order, once the latency miss alone exceeds the best miss, nothing later
        # can do better (queue, cold start, payload and other targets only add).
        can_stop = by_latency and target is not None
        least_margin = table.least_margin_ms
        for r in order:
            if can_stop and (r.fixed_ms * frac + least_margin - target) / t_norm > best_v:
                break
            cost = r.cost if rows == 1 else r.candidate.cost_per_1k(rows)
            static_v = 0.0  # the part that cannot change with load
            if min_acc is not None and r.accuracy < min_acc:
                static_v += (min_acc - r.accuracy) / a_norm
            if max_cost is not None and cost > max_cost:
                static_v += (cost - max_cost) / c_norm
            if static_v > best_v:
                continue
            if target is not None and rows == 1:
                # queue and cold start only add: the load-free latency bounds the miss below
                floor = (r.fixed_ms + payload * r.ms_per_byte) * frac + r.margin_ms
                if floor > target and static_v + (floor - target) / t_norm > best_v:
                    continue
            if down and r.node in down:
                continue
            terms = _load_terms(r, loads.get(r.node), now, stale)
            if terms is None:
                continue
            queue, cold = terms
            if rows == 1:
                total = r.fixed_ms + payload * r.ms_per_byte + queue + cold
            else:
                total = self._static_ms(r, rows, payload) + queue + cold
            violation = static_v
            if target is not None:
                padded = total * frac + r.margin_ms
                if padded > target:
                    violation += (padded - target) / t_norm
            if violation < best_v or (violation == best_v and total < best_t):
                best_v, best_t = violation, total
                best = (violation, total, r, queue, cold)
        if best is None:
            if not order:
                raise NoRoute(f"no node reachable from {table.entry!r} hosts a variant of task "
                              f"{table.task!r}")
            raise NoRoute(f"every node hosting task {table.task!r} is down")
        _, total, r, queue, cold = best
        c = r.candidate
        if rows == 1:
            p = Prediction(r.network_ms + payload * r.ms_per_byte, queue, r.compute_ms, cold)
        else:
            p = Prediction(self._network_ms(r, rows, payload), queue,
                           c.profile.latency_ms(rows) + self.dispatch_ms, cold)
        cost = r.cost if rows == 1 else c.cost_per_1k(rows)
        padded = total * frac + r.margin_ms
        feasible = best_v == 0.0  # only when the walk stopped early: keep the answer honest
        return Decision(c.node, c.tier, c.variant, c.accuracy, p, feasible, policy,
                        ("closest", padded, target, c.accuracy, min_acc, cost, max_cost), (),
                        cost, r.margin_ms, 1, None)

    # ------------------------------------------------------------------ explain
    def _explain(self, table: CandidateTable, slo: SLO, view: MeshView, now: float, rows: int,
                 payload: int) -> tuple[Scored, ...]:
        scored = [self.score(r.candidate, slo, rows=rows, payload_bytes=payload, view=view,
                             now=now)
                  for r in table.rows if view.usable(r.node, r.variant, now)]
        key = _EXPLAIN_KEYS.get(slo.policy, _EXPLAIN_KEYS[_CHEAPEST])
        return tuple(sorted(scored, key=lambda s: (not s.feasible, key(s))))


_EXPLAIN_KEYS = {
    _CHEAPEST: lambda s: (s.cost_per_1k, s.prediction.total_ms),
    _ACCURATE: lambda s: (-s.candidate.accuracy, s.cost_per_1k, s.prediction.total_ms),
    _FASTEST: lambda s: (s.prediction.total_ms, s.cost_per_1k),
}


_FILTER_CACHE_LIMIT = 64


def _accurate_enough(table: CandidateTable, policy: str, order: tuple[Row, ...],
                     min_accuracy: float) -> tuple[Row, ...]:
    """``order`` without the rows below ``min_accuracy`` (cached per table)."""
    key = (policy, min_accuracy)
    cached = table.cache.get(key)
    if cached is None:
        cached = tuple(r for r in order if r.accuracy >= min_accuracy)
        if len(table.cache) < _FILTER_CACHE_LIMIT:  # clients choose the thresholds
            table.cache[key] = cached
    return cached


def _load_terms(r: Row, ld: NodeLoad | None, now: float, stale: float
                ) -> tuple[float, float] | None:
    """(queue_ms, cold_ms) for row ``r`` from its node's last report; None when it cannot serve.

    A report older than ``stale`` seconds no longer counts (no queue, loaded assumed); a
    variant the node failed to load never serves, however old the report.
    """
    if ld is None:
        return 0.0, 0.0
    if ld.failed and r.variant in ld.failed:
        return None
    if now - ld.reported_at > stale:
        return 0.0, 0.0
    if not ld.healthy:
        return None
    queue = cold = 0.0
    depth = ld.queue_depth
    if depth:
        full, rest = divmod(depth, r.batch)
        queue = full * r.full_ms + r.rest_ms[rest]
    if ld.loaded is not None and r.variant not in ld.loaded:
        cold = r.cold_ms
    return queue, cold
