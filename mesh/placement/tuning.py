"""The placement's tunables, in one frozen object validated when it is made."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["Tuning"]


@dataclass(frozen=True, slots=True)
class Tuning:
    """Thresholds and budgets of placement and scaling.

    Utilisation is busy compute time over the time of the workers a
    variant has on a node (1.0: every worker busy all the time). The gap
    between ``scale_up_util`` and ``scale_down_util``, the ``hold_s`` between
    two changes of one (node, variant) and the ``scale_down_after_s`` a
    variant must stay cold are what keep the placement from flapping.
    """

    #: a hosted variant busier than this gets more workers, a replica or a faster variant
    scale_up_util: float = 0.75
    #: ...and one less busy than this (for ``scale_down_after_s``) gives workers back
    scale_down_util: float = 0.30
    #: scaling aims at this utilisation (between the two thresholds, so one step settles it)
    target_util: float = 0.55
    #: no two changes of one (node, variant) closer than this (new models and drops excepted)
    hold_s: float = 60.0
    #: a variant must be cold this long before its workers are taken back
    scale_down_after_s: float = 120.0
    #: below this many queries per second a hosted variant counts as idle...
    idle_rate_qps: float = 0.01
    #: ...and a replica or preloaded variant idle this long is evicted
    idle_evict_s: float = 300.0
    #: how far ahead forecasts are read, beyond the variant's cold start
    preload_horizon_s: float = 120.0
    #: a forecast counts for at most this many times the current rate
    max_forecast_growth: float = 10.0
    #: accuracies this close count as equal when deciding which variants are worth hosting:
    #: float noise (a torch original's 1.0, its ONNX export's 0.9999999999998), no more, since
    #: clients' min_accuracy thresholds are strict
    accuracy_tie: float = 1e-6
    #: the base placement fills at most this fraction of a node's memory; the rest is for scaling
    base_memory_frac: float = 0.5
    #: memory of each worker beyond the first, as a fraction of the variant's (1.0: a session each)
    worker_memory_frac: float = 1.0
    #: a variant without a measured peak memory takes its file size times this (as nodes assume)
    size_factor: float = 3.0
    #: throughput is reckoned at this batch size (or the variant's max_batch when smaller)
    capacity_batch: int = 8
    #: fixed cost of running one batch (dispatch, hand-off), milliseconds
    batch_overhead_ms: float = 0.3
    #: a (node, variant) whose queries miss their latency target this often is looked at for speed
    slo_miss_frac: float = 0.05
    #: ...and its compute alone above this fraction of the target means replicas cannot help
    slo_compute_frac: float = 0.8
    #: ...and the faster host or variant it gets must compute within this fraction of the target
    slo_fit_frac: float = 0.5
    #: a variant whose batches run this many times slower than profiled shares a CPU that is
    #: already spent: more workers on that node would add no capacity, so it gets none
    #: (replicas elsewhere, or a faster variant, instead)
    contended_slowdown: float = 1.5
    #: ...and so does one whose compute thread had a CPU for less than this share of its runs
    #: (the machine's CPUs were busy elsewhere: nodes sharing a machine, a noisy neighbour)
    contended_cpu_share: float = 0.7

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0:
                problems.append(f"{f.name} must be >= 0, got {value!r}")
        if not 0 < self.scale_down_util < self.target_util < self.scale_up_util <= 1:
            problems.append("need 0 < scale_down_util < target_util < scale_up_util <= 1, got "
                            f"{self.scale_down_util}, {self.target_util}, {self.scale_up_util}")
        if not 0 < self.base_memory_frac <= 1:
            problems.append(f"base_memory_frac must be in (0, 1], got {self.base_memory_frac}")
        if self.capacity_batch < 1:
            problems.append(f"capacity_batch must be >= 1, got {self.capacity_batch}")
        if self.max_forecast_growth < 1:
            problems.append(f"max_forecast_growth must be >= 1, got {self.max_forecast_growth}")
        if self.size_factor <= 0:
            problems.append(f"size_factor must be > 0, got {self.size_factor}")
        if problems:
            raise ValueError("placement tuning: " + "; ".join(problems))
