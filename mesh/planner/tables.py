"""Candidate tables: everything about a (node, variant) that does not change per query.

A table belongs to one (entry node, task, tenant) and is built once, when a
query first needs it; a topology or placement change means a new planner.
Each row holds the static part of the prediction (network for one row,
compute, dispatch), the cost, and the batch model flattened into a list,
so a query only adds the dynamic terms: payload transfer, queue, cold start.

Tables are *pruned*: among hosts of the same (variant, hardware class,
tier) only the ``per_group`` nearest survive, plus twins exactly as near as
the last one kept. Any host that could win is among them, because a farther
twin has the same compute, cost and accuracy and only more network time;
the spares are where power-of-two choices spread load and where queries go
when the nearest twins are busy.

On a tree (the usual edge -> intermediate -> core shape) the nearest hosts
are found without visiting the whole mesh: each node keeps the
``per_group`` nearest hosts of its own subtree (computed bottom-up once per
task), and an entry merges those of its ancestors. A mesh with cross links
falls back on one Dijkstra from the entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh.planner.model import Candidate
from mesh.registry import Profile, Variant
from mesh.topology import Path_, Topology

__all__ = ["Row", "Picked", "BoundedCache", "CandidateTable", "HostIndex", "build_table",
           "hosts_by_node"]

GroupKey = tuple[str, str, str]  # (variant, hardware class, tier)


class Row:
    """One candidate with its static prediction terms. Read on every query: plain slots."""

    __slots__ = ("candidate", "node", "variant", "tier", "accuracy", "network_ms", "compute_ms",
                 "fixed_ms", "ms_per_byte", "cost", "energy_j", "cold_ms", "batch", "full_ms",
                 "rest_ms", "margin_ms")

    def __init__(self, c: Candidate, *, per_hop_ms: float, dispatch_ms: float,
                 margin_ms: float,
                 batch_model: tuple[float, float, float, tuple[float, ...]] | None = None) -> None:
        self.candidate = c
        self.node = c.node
        self.variant = c.variant
        self.tier = c.tier
        self.accuracy = c.accuracy
        self.ms_per_byte = 0.0
        self.network_ms = 0.0
        if c.hops:
            if not math.isinf(c.bottleneck_mbps):
                self.ms_per_byte = 8.0 / (c.bottleneck_mbps * 1000.0)
            one_way = c.path_latency_ms + c.hops * per_hop_ms
            # A lost packet costs about one more round trip; either message may lose one.
            retransmit = 2.0 * c.loss * (2.0 * c.path_latency_ms)
            self.network_ms = 2.0 * one_way + retransmit + c.out_bytes_per_row * self.ms_per_byte
        self.batch = max(c.max_batch, 1)
        one_ms, self.full_ms, self.cold_ms, self.rest_ms = batch_model or batch_model_of(c)
        self.compute_ms = one_ms + dispatch_ms
        self.fixed_ms = self.network_ms + self.compute_ms
        self.cost = c.cost_per_1k(1)
        self.energy_j = c.energy_j(1)
        self.margin_ms = margin_ms

    def queue_ms(self, depth: int) -> float:
        if depth <= 0:
            return 0.0
        full, rest = divmod(depth, self.batch)
        return full * self.full_ms + self.rest_ms[rest]

    def __repr__(self) -> str:
        return f"Row({self.node}/{self.variant}, fixed={self.fixed_ms:.3f} ms, cost={self.cost:.3g})"


def batch_model_of(c: Candidate) -> tuple[float, float, float, tuple[float, ...]]:
    """(latency of 1 row, of a full batch, cold start, latency of each partial batch)."""
    batch = max(c.max_batch, 1)
    # Queue model: the batches ahead of us, the last one partial.
    rest = tuple([0.0] + [c.profile.latency_ms(r) for r in range(1, batch)])
    return c.profile.latency_ms(1), c.profile.latency_ms(batch), c.profile.cold_start_ms, rest


class BoundedCache(dict[tuple[object, ...], tuple[Row, ...]]):
    """A dict that forgets its oldest entry once it holds ``limit`` (FIFO).

    For row subsets keyed by values a client chooses (``min_accuracy``
    thresholds): a client sending a new threshold with every query costs a
    re-filter of a few dozen rows each time, never memory. Reads are plain
    ``dict.get``; only a store pays for the bound.
    """

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: tuple[object, ...], rows: tuple[Row, ...]) -> None:
        if key not in self and len(self) >= self.limit:
            del self[next(iter(self))]  # dicts keep insertion order: the oldest
        super().__setitem__(key, rows)


#: Row subsets one table keeps at most (per rank and threshold).
SUBSET_LIMIT = 64


#: What a walk over a table picks: (row, predicted total, queue ms, cold-start ms), the
#: runner-up of a power-of-two draw, and how many near-equivalent candidates there were.
Picked = tuple[tuple[Row, float, float, float], Row | None, int]


@dataclass(frozen=True)
class CandidateTable:
    entry: str
    task: str
    tenant: str | None
    rows: tuple[Row, ...]
    #: The same rows, ordered for each policy by its static key.
    by_cost: tuple[Row, ...]
    by_accuracy: tuple[Row, ...]
    by_latency: tuple[Row, ...]
    #: Hosts of the task reachable from the entry, before pruning.
    reachable_hosts: int
    #: Rows on the entry node itself (a cascade's first stage), cheapest first.
    local_by_cost: tuple[Row, ...] = field(default=())
    #: The smallest safety margin of any row (bounds the closest-miss search).
    least_margin_ms: float = 0.0
    #: Row subsets derived on first use, keyed by the thresholds that made them (bounded:
    #: clients choose the thresholds).
    cache: BoundedCache = field(default_factory=lambda: BoundedCache(SUBSET_LIMIT), repr=False,
                                compare=False)

    def candidates(self) -> tuple[Candidate, ...]:
        return tuple(r.candidate for r in self.rows)

    def subset(self, key: tuple[object, ...], make: Callable[[], tuple[Row, ...]]
               ) -> tuple[Row, ...]:
        """The rows ``make()`` derives, remembered under ``key`` (the last ``SUBSET_LIMIT``)."""
        rows = self.cache.get(key)
        if rows is None:
            rows = self.cache[key] = make()
        return rows


def _itemsize(dtype: str) -> int:
    return {"float64": 8, "int64": 8, "float16": 2, "int16": 2, "int8": 1, "uint8": 1,
            "bool": 1}.get(dtype, 4)


def out_bytes_per_row(variant: Variant) -> int:
    return sum(math.prod(d for d in o.shape[1:] if d > 0) * _itemsize(o.dtype)
               for o in variant.outputs)


class HostIndex:
    """Which nodes host which variants of one task (for one tenant), and per-subtree bests."""

    def __init__(self, topology: Topology, hosts: Mapping[str, list[tuple[Variant, Profile]]],
                 *, per_group: int, per_hop_ms: float, tie_ms: float = 0.1) -> None:
        self.topology = topology
        self.hosts = hosts
        self.per_group = per_group
        self.per_hop_ms = per_hop_ms
        #: One-way network costs this close count as the same distance when pruning.
        self.tie_ms = tie_ms
        self._subtree_best: dict[str, dict[GroupKey, list[tuple[float, str, str]]]] | None = None
        #: node -> how many hosts of the task are in its subtree (filled with the bests).
        self.hosts_below: dict[str, int] = {}

    def group_of(self, node: str, variant: Variant) -> GroupKey:
        spec = self.topology.nodes[node]
        return (variant.name, spec.hardware, spec.tier)

    def _prune(self, entries: list[tuple[float, str, str]]) -> list[tuple[float, str, str]]:
        """The nearest ``per_group``, plus twins as near as the last kept (up to twice as many).

        Keeping the ties matters: five identical racks behind one switch must all stay
        candidates, or power-of-two choices could never send work to the fifth.
        """
        keep = self.per_group
        if len(entries) > keep:
            entries.sort()
            last = entries[keep - 1][0]
            while keep < len(entries) and keep < 2 * self.per_group and (
                    entries[keep][0] - last <= self.tie_ms):
                keep += 1
            del entries[keep:]
        return entries

    def subtree_best(self) -> dict[str, dict[GroupKey, list[tuple[float, str, str]]]]:
        """Per node, per group: the nearest hosts below it as (network cost, host, variant)."""
        if self._subtree_best is not None:
            return self._subtree_best
        topo = self.topology
        best: dict[str, dict[GroupKey, list[tuple[float, str, str]]]] = {}
        order: list[str] = []
        stack = list(topo.roots)
        while stack:  # pre-order; reversed it visits children before parents
            node = stack.pop()
            order.append(node)
            stack.extend(topo.children[node])
        for node in reversed(order):
            groups: dict[GroupKey, list[tuple[float, str, str]]] = {}
            self.hosts_below[node] = (node in self.hosts) + sum(
                self.hosts_below[c] for c in topo.children[node])
            for variant, _ in self.hosts.get(node, ()):
                groups.setdefault(self.group_of(node, variant), []).append(
                    (0.0, node, variant.name))
            for child in topo.children[node]:
                up = topo.up_link(child)
                assert up is not None
                step = up[0] + self.per_hop_ms
                for key, entries in best[child].items():
                    groups.setdefault(key, []).extend((cost + step, h, v) for cost, h, v in entries)
            best[node] = {k: self._prune(v) for k, v in groups.items()}
        self._subtree_best = best
        return best

    def nearest(self, entry: str) -> tuple[list[tuple[str, str]], int]:
        """The surviving (host, variant) pairs for ``entry`` and how many hosts it can reach."""
        topo = self.topology
        picked: dict[GroupKey, list[tuple[float, str, str]]] = {}
        if topo.is_tree:
            best = self.subtree_best()
            seen: set[tuple[str, str]] = set()
            node: str | None = entry
            up_cost = 0.0
            while node is not None:
                for key, entries in best[node].items():
                    for cost, host, variant in entries:
                        if (host, variant) not in seen:
                            seen.add((host, variant))
                            picked.setdefault(key, []).append((up_cost + cost, host, variant))
                up = topo.up_link(node)
                if up is None:
                    break
                up_cost += up[0] + self.per_hop_ms
                node = topo.parent[node]
            reachable = self.hosts_below[node if node is not None else entry]
        else:
            paths = topo.paths_from(entry)
            reachable = 0
            for host, hosted in self.hosts.items():
                path = paths.get(host)
                if path is None or not hosted:
                    continue
                reachable += 1
                cost = path.latency_ms + (len(path.hops) - 1) * self.per_hop_ms
                for variant, _ in hosted:
                    picked.setdefault(self.group_of(host, variant), []).append(
                        (cost, host, variant.name))
        pairs = [(h, v) for entries in picked.values() for _, h, v in self._prune(entries)]
        return pairs, reachable


def build_table(entry: str, task: str, tenant: str | None, index: HostIndex,
                variants: Mapping[str, Variant], *, energy_cost_per_kwh: float,
                per_hop_ms: float, dispatch_ms: float, margin_ms: Mapping[str, float],
                default_margin_ms: float) -> CandidateTable:
    topo = index.topology
    pairs, reachable = index.nearest(entry)
    rows: list[Row] = []
    models: dict[tuple[str, str], tuple[float, float, float, tuple[float, ...]]] = {}
    for host, name in pairs:
        variant = variants[name]
        profile = next(p for v, p in index.hosts[host] if v.name == name)
        path = topo.path(entry, host) if host != entry else Path_((entry,), 0.0, math.inf, 0.0)
        assert path is not None
        spec = topo.nodes[host]
        hw = topo.hardware[spec.hardware]
        c = Candidate(
            node=host, tier=spec.tier, variant=name, accuracy=variant.accuracy,
            path_latency_ms=path.latency_ms, hops=len(path.hops) - 1,
            bottleneck_mbps=path.bottleneck_mbps, profile=profile, max_batch=variant.max_batch,
            cost_per_hour=hw.cost_per_hour, out_bytes_per_row=out_bytes_per_row(variant),
            loss=path.loss, hardware=spec.hardware, power_w=hw.power_w,
            energy_per_inference_j=hw.energy_per_inference_j,
            energy_cost_per_kwh=energy_cost_per_kwh,
        )
        key = (name, topo.hardware[spec.hardware].profile_key)
        if key not in models:
            models[key] = batch_model_of(c)
        rows.append(Row(c, per_hop_ms=per_hop_ms, dispatch_ms=dispatch_ms,
                        margin_ms=margin_ms.get(spec.tier, default_margin_ms),
                        batch_model=models[key]))
    rows.sort(key=lambda r: (r.node, r.variant))
    by_cost = tuple(sorted(rows, key=lambda r: (r.cost, r.fixed_ms, r.node)))
    return CandidateTable(
        entry=entry, task=task, tenant=tenant, rows=tuple(rows), by_cost=by_cost,
        by_accuracy=tuple(sorted(rows, key=lambda r: (-r.accuracy, r.cost, r.fixed_ms, r.node))),
        by_latency=tuple(sorted(rows, key=lambda r: (r.fixed_ms, r.cost, r.node))),
        reachable_hosts=reachable,
        local_by_cost=tuple(r for r in by_cost if r.node == entry),
        least_margin_ms=min((r.margin_ms for r in rows), default=0.0),
    )


def hosts_by_node(topology: Topology, variants: Iterable[Variant], *,
                  allowed_nodes: Iterable[str] | None = None, hosting: Any = None
                  ) -> dict[str, list[tuple[Variant, Profile]]]:
    """For one task's variants: node -> the variants it hosts that have a profile there.

    ``hosting``: a :class:`mesh.placement.Hosting` (what each node hosts); default: what
    the nodes' allow/deny lists let in.
    """
    variants = sorted(variants, key=lambda v: v.name)
    memo: dict[tuple[Any, str], list[tuple[Variant, Profile]]] = {}
    out: dict[str, list[tuple[Variant, Profile]]] = {}
    for name in allowed_nodes if allowed_nodes is not None else topology.nodes:
        spec = topology.nodes[name]
        rule = hosting.key(name) if hosting is not None else (spec.variants, spec.deny_variants)
        key = (rule, topology.hardware[spec.hardware].profile_key)
        hosted = memo.get(key)
        if hosted is None:
            hosted = []
            for v in variants:
                profile = v.profile_for(key[1])
                allowed = hosting.allows(name, v.name) if hosting is not None \
                    else spec.allows(v.name)
                if profile is not None and allowed:
                    hosted.append((v, profile))
            memo[key] = hosted
        if hosted:
            out[name] = hosted
    return out
