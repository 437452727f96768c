"""Prometheus metrics of one node agent (``GET /metrics``).

Each agent has its own :class:`~prometheus_client.CollectorRegistry`, so
several agents in one process (tests, benchmarks) never mix their series::

    tiermesh_requests_total{task,variant,tier,outcome}          counter
    tiermesh_request_latency_seconds{task,variant,tier,outcome} histogram (time on this node)
    tiermesh_batch_size_rows{variant}                           histogram
    tiermesh_batch_compute_seconds{variant}                     histogram
    tiermesh_forwarded_requests_total{destination,next_hop}     counter
    tiermesh_variant_loads_total{variant,outcome}               counter (loaded / failed)
    tiermesh_variant_evictions_total{variant}                   counter
    tiermesh_artifact_fetches_total{outcome}                    counter (ok / corrupt / failed)
    tiermesh_queue_depth{variant}                               gauge
    tiermesh_variant_loaded{variant}                            gauge (1 loaded, 0 not)
    tiermesh_variant_memory_bytes{variant}                      gauge (estimated, loaded only)
    tiermesh_model_memory_budget_bytes                          gauge
    tiermesh_tenant_queries_total{tenant}                       counter (admitted at this entry)
    tiermesh_tenant_refused_total{tenant}                       counter (over quota)
    tiermesh_tenant_compute_seconds_total{tenant}               counter (its rows' share, here)
    tiermesh_tenant_bytes_total{tenant,direction}               counter (in / out, at the entry)
    tiermesh_tenant_cost_total{tenant}                          counter (the plans' price)

``variant`` and ``tier`` name what served the query (empty when it failed
before a variant was chosen); ``outcome`` is ``ok`` or the error class in
snake case (``overloaded``, ``cannot_meet_deadline``, ``invalid_input``...).

Why a collector and not ``Counter``/``Histogram`` objects: those take a lock
per increment (a histogram observation is two), about 10 us per query on the
hot path. Everything here is updated from the agent's event loop thread
only, so plain integers suffice; :class:`_Collector` turns them into metric
families when scraped, and reads the gauges from the agent's state then.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "NodeMetrics", "VariantGauge", "outcome_of"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


def outcome_of(error: BaseException | None) -> str:
    """``ok``, or the error's class name in snake case."""
    return "ok" if error is None else _SNAKE.sub("_", type(error).__name__).lower()


@dataclass(frozen=True, slots=True)
class VariantGauge:
    """What the scrape reads about one variant hosted here."""

    queue_depth: int
    loaded: bool
    memory_bytes: int


class _Series:
    """One histogram series: bucket counts (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


class NodeMetrics:
    """The metrics of one agent, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests: dict[tuple[str, str, str, str], _Series] = {}
        self.batch_rows: dict[str, _Series] = {}
        self.batch_compute: dict[str, _Series] = {}
        #: (destination, next hop, transport) -> queries forwarded and answered
        self.forwards: dict[tuple[str, str, str], int] = {}
        self.served_here = 0
        #: variant -> queries that waited for it to load (a cold start they paid for)
        self.cold_starts: dict[str, int] = {}
        #: variant -> loads made ahead of queries (a cold start no query paid for)
        self.warmed_ahead: dict[str, int] = {}
        self.loads: dict[tuple[str, str], int] = {}
        self.evictions: dict[str, int] = {}
        self.artifact_fetches: dict[str, int] = {}
        self._snapshot: Callable[[], Mapping[str, VariantGauge]] = dict
        self._budget: Callable[[], int] = lambda: 0
        #: tenant -> its usage on this node (mesh.tenants.Usage), read at every scrape
        self.tenant_usage: Callable[[], Mapping[str, Any]] = dict
        self.registry.register(_Collector(self))

    def watch(self, snapshot: Callable[[], Mapping[str, VariantGauge]],
              budget_bytes: Callable[[], int]) -> None:
        """Read variant gauges from ``snapshot`` at every scrape."""
        self._snapshot = snapshot
        self._budget = budget_bytes

    # ------------------------------------------------------------------ recording (event loop)
    def request(self, task: str, variant: str, tier: str, outcome: str, seconds: float) -> None:
        """Count one answered query; ``task`` must be a registered task (bounded labels)."""
        key = (task, variant, tier, outcome)
        series = self.requests.get(key)
        if series is None:
            series = self.requests[key] = _Series(LATENCY_BUCKETS_S)
        series.observe(seconds)

    def batch(self, variant: str, rows: int, compute_ms: float) -> None:
        """One batch of ``variant`` (or a private head's share of a shared batch)."""
        series = self.batch_rows.get(variant)
        if series is None:
            self.batch_observer(variant)(rows, compute_ms)  # its first: make its series
            return
        series.observe(rows)
        self.batch_compute[variant].observe(compute_ms / 1000.0)

    def batch_observer(self, variant: str) -> Callable[[int, float], None]:
        """What a batcher calls after each batch of ``variant``: its series looked up once."""
        rows = self.batch_rows.setdefault(variant, _Series(BATCH_BUCKETS))
        compute = self.batch_compute.setdefault(variant, _Series(LATENCY_BUCKETS_S))

        def observe(batch_rows: int, compute_ms: float) -> None:
            rows.observe(batch_rows)
            compute.observe(compute_ms / 1000.0)

        return observe

    def forwarded(self, destination: str, next_hop: str, transport: str) -> None:
        """One query forwarded to ``next_hop`` (on its way to ``destination``) came back."""
        key = (destination, next_hop, transport)
        self.forwards[key] = self.forwards.get(key, 0) + 1

    def served(self) -> None:
        """One query ran on this node's own runtimes."""
        self.served_here += 1

    def warmed(self, variant: str) -> None:
        """``variant`` was loaded in the background, ahead of the queries that want it."""
        self.warmed_ahead[variant] = self.warmed_ahead.get(variant, 0) + 1

    def cold_start(self, variant: str) -> None:
        """One query waited for ``variant`` to load."""
        self.cold_starts[variant] = self.cold_starts.get(variant, 0) + 1

    # ------------------------------------------------------------------ reading (status)
    def totals(self) -> dict[str, Any]:
        """The counters ``status()`` shows, read from the same series the scrape exports."""
        requests = errors = 0
        by_outcome: dict[str, int] = {}
        for (_, _, _, outcome), series in self.requests.items():
            n = series.count
            requests += n
            if outcome != "ok":
                errors += n
                by_outcome[outcome] = by_outcome.get(outcome, 0) + n
        forwarded: dict[str, int] = {}
        via: dict[str, int] = {}
        for (_, hop, transport), n in self.forwards.items():
            forwarded[hop] = forwarded.get(hop, 0) + n
            via[transport] = via.get(transport, 0) + n
        return {"requests": requests, "served_local": self.served_here, "forwarded": forwarded,
                "forwarded_via": via, "errors": by_outcome,
                "cold_starts": dict(sorted(self.cold_starts.items())),
                "cold_starts_hidden": dict(sorted(self.warmed_ahead.items()))}

    def loaded(self, variant: str, outcome: str) -> None:
        self.loads[(variant, outcome)] = self.loads.get((variant, outcome), 0) + 1

    def evicted(self, variant: str) -> None:
        self.evictions[variant] = self.evictions.get(variant, 0) + 1

    def fetched(self, outcome: str) -> None:
        self.artifact_fetches[outcome] = self.artifact_fetches.get(outcome, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector(Collector):
    def __init__(self, metrics: NodeMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        labels = ["task", "variant", "tier", "outcome"]
        count = CounterMetricFamily("tiermesh_requests", "Queries answered by this node.",
                                    labels=labels)
        latency = HistogramMetricFamily("tiermesh_request_latency_seconds",
                                        "Time from arrival at this node to its answer.",
                                        labels=labels)
        for key, series in sorted(m.requests.items()):
            count.add_metric(list(key), series.count)
            latency.add_metric(list(key), series.buckets(), series.total)
        yield count
        yield latency
        rows = HistogramMetricFamily("tiermesh_batch_size_rows", "Rows per batch run.",
                                     labels=["variant"])
        for name, series in sorted(m.batch_rows.items()):
            rows.add_metric([name], series.buckets(), series.total)
        yield rows
        compute = HistogramMetricFamily("tiermesh_batch_compute_seconds", "Runtime time per batch.",
                                        labels=["variant"])
        for name, series in sorted(m.batch_compute.items()):
            compute.add_metric([name], series.buckets(), series.total)
        yield compute
        yield _counter("tiermesh_forwarded_requests",
                       "Queries forwarded and answered, by serving node, next hop and transport.",
                       ["destination", "next_hop", "transport"], m.forwards)
        yield CounterMetricFamily("tiermesh_served_local_requests",
                                  "Queries run on this node's own runtimes.", value=m.served_here)
        yield _counter("tiermesh_cold_starts", "Queries that waited for their variant to load.",
                       ["variant"], {(k,): v for k, v in m.cold_starts.items()})
        yield _counter("tiermesh_cold_starts_hidden",
                       "Variants loaded in the background while queries went to warm ones.",
                       ["variant"], {(k,): v for k, v in m.warmed_ahead.items()})
        yield _counter("tiermesh_variant_loads", "Variant loads, by outcome (loaded / failed).",
                       ["variant", "outcome"], m.loads)
        yield _counter("tiermesh_variant_evictions", "Variants unloaded to make room for others.",
                       ["variant"], {(k,): v for k, v in m.evictions.items()})
        yield _counter("tiermesh_artifact_fetches",
                       "Artifact pulls from the parent (ok / corrupt / failed).",
                       ["outcome"], {(k,): v for k, v in m.artifact_fetches.items()})
        depth = GaugeMetricFamily("tiermesh_queue_depth", "Requests waiting or running per variant.",
                                  labels=["variant"])
        loaded = GaugeMetricFamily("tiermesh_variant_loaded", "1 when the variant is loaded here.",
                                   labels=["variant"])
        memory = GaugeMetricFamily("tiermesh_variant_memory_bytes",
                                   "Estimated memory of each loaded variant.", labels=["variant"])
        for name, g in sorted(m._snapshot().items()):
            depth.add_metric([name], g.queue_depth)
            loaded.add_metric([name], 1.0 if g.loaded else 0.0)
            if g.loaded:
                memory.add_metric([name], g.memory_bytes)
        yield depth
        yield loaded
        yield memory
        yield GaugeMetricFamily("tiermesh_model_memory_budget_bytes",
                                "Memory this node may spend on loaded variants.", value=m._budget())
        usage = sorted(m.tenant_usage().items())
        for field, doc in (("queries", "Queries a tenant sent that this entry admitted."),
                           ("refused", "Queries of a tenant refused over its quota here."),
                           ("compute_seconds", "Compute time spent here on a tenant's rows."),
                           ("cost", "What a tenant's answers cost, by the plans' price.")):
            family = CounterMetricFamily(f"tiermesh_tenant_{field}", doc, labels=["tenant"])
            for tenant, u in usage:
                family.add_metric([tenant], getattr(u, "compute_s" if field ==
                                                    "compute_seconds" else field))
            yield family
        sent = CounterMetricFamily("tiermesh_tenant_bytes", "Tensor bytes of a tenant's "
                                   "queries (in) and answers (out) at this entry.",
                                   labels=["tenant", "direction"])
        for tenant, u in usage:
            sent.add_metric([tenant, "in"], u.bytes_in)
            sent.add_metric([tenant, "out"], u.bytes_out)
        yield sent


def _counter(name: str, doc: str, labels: list[str], values: Mapping[tuple[str, ...], int]
             ) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family
