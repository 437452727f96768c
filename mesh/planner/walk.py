"""Walks over a candidate table: the building blocks policies are made of.

A table's rows are sorted once per :class:`~mesh.planner.model.Rank` by
their static key; a query walks them in that order, adds the terms that
change per query (payload transfer, queue, cold start) and stops as soon as
nothing later can win. The functions here are pure: what they need comes in
as a :class:`~mesh.planner.query.Query`, a :class:`~mesh.planner.query.PlanView`
and, where a policy narrows the SLO's targets, :class:`~mesh.planner.query.Limits`.

* :func:`select` -- the best feasible row for a rank, or None;
* :func:`closest` -- nothing is feasible: the row that misses the targets by least;
* :func:`best` -- both, as a ranked policy uses them;
* :func:`decision` / :func:`prediction` -- a selected row as a :class:`Decision`;
* :func:`load_terms` / :func:`pooled` -- a row's queue and cold-start time from its
  node's last report, and its predicted total (for policies that do not walk in order);
* :func:`rows_for` -- the rows a rank walks, without those below ``min_accuracy``.

Raises :class:`~mesh.errors.NoRoute` (from :func:`closest`) when no row can
serve at all. These run on every query: locals over attributes, and no
allocation per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mesh.errors import NoRoute
from mesh.planner.model import Decision, Escalation, Prediction, Rank
from mesh.planner.query import Limits, PlanView, Query, Tuning

if TYPE_CHECKING:
    import random

    from mesh.planner.tables import CandidateTable, Picked, Row
    from mesh.state import NodeLoad

__all__ = ["best", "choose_among", "closest", "decision", "load_terms", "order_of", "pooled",
           "prediction", "rows_for", "select"]

_COST, _ACCURACY, _LATENCY = Rank.COST, Rank.ACCURACY, Rank.LATENCY

#: What :func:`select` collects per feasible row: (row, predicted total, queue ms, cold ms).
Pooled = tuple["Row", float, float, float]


def order_of(table: CandidateTable, rank: Rank) -> tuple[Row, ...]:
    """Every row of ``table`` in ``rank``'s static order."""
    if rank is _COST:
        return table.by_cost
    if rank is _ACCURACY:
        return table.by_accuracy
    return table.by_latency


def rows_for(table: CandidateTable, rank: Rank, min_accuracy: float | None) -> tuple[Row, ...]:
    """``rank``'s order without the rows below ``min_accuracy`` (derived once per threshold)."""
    order = order_of(table, rank)
    if min_accuracy is None:
        return order
    return table.subset((rank, min_accuracy),
                        lambda: tuple(r for r in order if r.accuracy >= min_accuracy))


def load_terms(r: Row, ld: NodeLoad | None, now: float, stale: float
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


def pooled(r: Row, query: Query, view: PlanView) -> Pooled | None:
    """(row, predicted total ms, queue ms, cold-start ms) for ``r``; None when it cannot serve.

    The same numbers :func:`select` computes on its way (it inlines them); for
    policies that look at rows in their own order (a random or round-robin
    baseline). The total has no safety margin added.
    """
    mesh, now = view.mesh, view.now
    if r.node in mesh.down:
        return None
    terms = load_terms(r, mesh.loads.get(r.node), now, mesh.stale_after_s)
    if terms is None:
        return None
    queue, cold = terms
    rows, payload = query.rows, query.payload_bytes
    if rows == 1:
        return r, r.fixed_ms + payload * r.ms_per_byte + queue + cold, queue, cold
    return r, _static_ms(r, rows, payload, view.tuning) + queue + cold, queue, cold


def select(order: Sequence[Row], rank: Rank, query: Query, view: PlanView,
           limits: Limits | None = None) -> Picked | None:
    """The best feasible row of ``order`` by ``rank`` (power of two choices among ties).

    ``order`` must be sorted by ``rank``'s static key (:func:`order_of`), or a
    subsequence of it. ``limits`` defaults to the query's SLO. None when no
    row is feasible.
    """
    # The hot path: walk the rows in the rank's static order, add the dynamic terms
    # (payload, queue, cold start), stop once nothing later can be better.
    _, slo, rows, payload, _ = query
    if limits is None:
        target = None if slo.offline else slo.latency_ms
        min_acc, max_cost = slo.min_accuracy, slo.max_cost_per_1k
    else:
        target, min_acc, max_cost = limits
    mesh, now, rng, tuning = view
    loads = mesh.loads
    down = mesh.down
    stale = mesh.stale_after_s
    frac = 1.0 + tuning.margin_frac
    cheapest, fastest = rank is _COST, rank is _LATENCY
    pool: list[Pooled] = []
    bound = cost_bound = -1.0
    # by cost / by accuracy: a row slower than this even with no load can be neither
    # the best nor tie with it (the best's total only falls as the walk goes on)
    too_slow = float("inf")
    lat_ms, lat_frac = tuning.tie_latency_ms, tuning.tie_latency_frac
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
        terms = load_terms(r, loads.get(r.node), now, stale)
        if terms is None:
            continue
        queue, cold = terms
        if rows == 1:
            total = r.fixed_ms + payload * r.ms_per_byte + queue + cold
        else:
            total = _static_ms(r, rows, payload, tuning) + queue + cold
        if target is not None and total * frac + r.margin_ms > target:
            continue
        pool.append((r, total, queue, cold))
        if len(pool) == 1:
            first = r
            if cheapest:
                bound = r.cost * (1.0 + tuning.tie_cost_frac)
            elif fastest:
                bound = total + max(lat_ms, lat_frac * total)
            else:
                bound = r.accuracy - tuning.tie_accuracy
                cost_bound = r.cost * (1.0 + tuning.tie_cost_frac)
            if not fastest:
                too_slow = total + max(lat_ms, lat_frac * total)
        elif fastest:
            bound = min(bound, total + max(lat_ms, lat_frac * total))
        elif r.cost == first.cost and r.accuracy == first.accuracy:  # could be the best
            too_slow = min(too_slow, total + max(lat_ms, lat_frac * total))
        if len(pool) >= tuning.pool_size:
            break
    if not pool:
        return None
    if len(pool) == 1:
        return pool[0], None, 1
    return choose_among(pool, rank, tuning, rng)


def choose_among(pool: list[Pooled], rank: Rank, tuning: Tuning, rng: random.Random) -> Picked:
    """The rank's best of ``pool``, or power of two choices among the rows that tie with it."""
    if rank is _COST:
        best_ = min(pool, key=lambda p: (p[0].cost, p[1]))
    elif rank is _LATENCY:
        best_ = min(pool, key=lambda p: (p[1], p[0].cost))
    else:
        best_ = min(pool, key=lambda p: (-p[0].accuracy, p[0].cost, p[1]))
    b_row, b_total = best_[0], best_[1]
    slack = b_total + max(tuning.tie_latency_ms, tuning.tie_latency_frac * b_total)
    max_cost = b_row.cost * (1.0 + tuning.tie_cost_frac)
    if rank is _LATENCY:
        ties = [p for p in pool if p[1] <= slack]
    else:
        min_acc = b_row.accuracy - tuning.tie_accuracy if rank is _ACCURACY else -1.0
        ties = [p for p in pool if p[1] <= slack and p[0].cost <= max_cost
                and p[0].accuracy >= min_acc]
    n = len(ties)
    if n < 2:
        return best_, None, 1
    i = int(rng.random() * n)
    j = int(rng.random() * (n - 1))
    if j >= i:
        j += 1
    a, b = ties[i], ties[j]
    # The less loaded of the two (queue + cold start); on a tie, the nearer.
    if (a[2] + a[3], a[1]) <= (b[2] + b[3], b[1]):
        return a, b[0], n
    return b, a[0], n


def _static_ms(r: Row, rows: int, payload: int, tuning: Tuning) -> float:
    return _network_ms(r, rows, payload) + r.candidate.profile.latency_ms(rows) + (
        tuning.dispatch_ms)


def _network_ms(r: Row, rows: int, payload: int) -> float:
    if not r.candidate.hops:
        return 0.0
    extra_rows = rows - 1
    return r.network_ms + (payload + r.candidate.out_bytes_per_row * extra_rows) * (
        r.ms_per_byte)


def prediction(picked: Picked, query: Query, tuning: Tuning) -> tuple[Prediction, float]:
    """The latency split and the cost per 1,000 inferences of a selected row."""
    (r, _, queue, cold), _, _ = picked
    rows, payload = query.rows, query.payload_bytes
    if rows == 1:
        return Prediction(r.network_ms + payload * r.ms_per_byte, queue, r.compute_ms,
                          cold), r.cost
    return (Prediction(_network_ms(r, rows, payload), queue,
                       r.candidate.profile.latency_ms(rows) + tuning.dispatch_ms, cold),
            r.candidate.cost_per_1k(rows))


def decision(picked: Picked, query: Query, view: PlanView, *, policy: str, rank: Rank,
             escalation: Escalation | None = None, why: str | tuple[object, ...] | None = None,
             feasible: bool = True) -> Decision:
    """A selected row as the ``policy``'s :class:`Decision`.

    ``why`` defaults to "best by ``rank``" (with the power-of-two draw when
    there was one); a policy that picks by other means says why itself, and
    whether the row meets the SLO (``feasible``).
    """
    (r, total, queue, cold), runner_up, equivalents = picked
    if query.rows == 1:  # prediction(), inline: this runs on every query
        predicted = Prediction(r.network_ms + query.payload_bytes * r.ms_per_byte, queue,
                               r.compute_ms, cold)
        cost = r.cost
    else:
        predicted, cost = prediction(picked, query, view.tuning)
    other = None if runner_up is None else runner_up.node + "/" + runner_up.variant
    if why is None:
        why = ("chosen", rank, r.accuracy, total, cost, equivalents, other)
    return Decision(r.node, r.tier, r.variant, r.accuracy, predicted, feasible, policy, why,
                    (), cost, r.margin_ms, equivalents, other, escalation)


def closest(table: CandidateTable, order: Sequence[Row], query: Query, view: PlanView, *,
            policy: str, limits: Limits | None = None, by_latency: bool = False) -> Decision:
    """Nothing is feasible: the row of ``order`` that misses the targets by least.

    The miss is the relative overshoot of each target, summed (as
    :meth:`Planner.score` measures it); equal misses go to the faster row.
    With ``by_latency`` (``order`` sorted by load-free latency) the walk stops
    once the latency miss alone exceeds the best miss found. Raises
    :class:`NoRoute` when no row of ``order`` can serve at all.
    """
    _, slo, rows, payload, _ = query
    if limits is None:
        target = None if slo.offline else slo.latency_ms
        min_acc, max_cost = slo.min_accuracy, slo.max_cost_per_1k
    else:
        target, min_acc, max_cost = limits
    mesh, now, _, tuning = view
    frac = 1.0 + tuning.margin_frac
    loads, down, stale = mesh.loads, mesh.down, mesh.stale_after_s
    t_norm = max(target, 1e-3) if target is not None else 1.0
    a_norm = max(1 - min_acc, 0.01) if min_acc is not None else 1.0
    c_norm = max(max_cost, 1e-9) if max_cost is not None else 1.0
    best_: tuple[float, float, Row, float, float] | None = None
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
        terms = load_terms(r, loads.get(r.node), now, stale)
        if terms is None:
            continue
        queue, cold = terms
        if rows == 1:
            total = r.fixed_ms + payload * r.ms_per_byte + queue + cold
        else:
            total = _static_ms(r, rows, payload, tuning) + queue + cold
        violation = static_v
        if target is not None:
            padded = total * frac + r.margin_ms
            if padded > target:
                violation += (padded - target) / t_norm
        if violation < best_v or (violation == best_v and total < best_t):
            best_v, best_t = violation, total
            best_ = (violation, total, r, queue, cold)
    if best_ is None:
        if not order:
            raise NoRoute(f"no node reachable from {table.entry!r} hosts a variant of task "
                          f"{table.task!r}")
        raise NoRoute(f"every node hosting task {table.task!r} is down")
    _, total, r, queue, cold = best_
    c = r.candidate
    if rows == 1:
        p = Prediction(r.network_ms + payload * r.ms_per_byte, queue, r.compute_ms, cold)
    else:
        p = Prediction(_network_ms(r, rows, payload), queue,
                       c.profile.latency_ms(rows) + tuning.dispatch_ms, cold)
    cost = r.cost if rows == 1 else c.cost_per_1k(rows)
    padded = total * frac + r.margin_ms
    feasible = best_v == 0.0  # only when the walk stopped early: keep the answer honest
    return Decision(c.node, c.tier, c.variant, c.accuracy, p, feasible, policy,
                    ("closest", padded, target, c.accuracy, min_acc, cost, max_cost), (),
                    cost, r.margin_ms, 1, None)


def best(table: CandidateTable, rank: Rank, query: Query, view: PlanView, *,
         policy: str) -> Decision:
    """The best feasible row by ``rank``, else the closest miss in the whole table."""
    min_acc = query.slo.min_accuracy
    order = (table.by_cost if rank is _COST else table.by_accuracy if rank is _ACCURACY
             else table.by_latency)
    if min_acc is not None:  # rows_for(), inline: this runs on every query
        order = table.cache.get((rank, min_acc)) or rows_for(table, rank, min_acc)
    picked = select(order, rank, query, view)
    if picked is None:
        # Nearest first: a small miss found early lets the rest be skipped.
        return closest(table, table.by_latency, query, view, policy=policy, by_latency=True)
    return decision(picked, query, view, policy=policy, rank=rank)
