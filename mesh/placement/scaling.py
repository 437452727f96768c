"""The :class:`Autoscaler`: one decision round at a time, from the base placement and the load.

Each :meth:`Autoscaler.step` (registry, load snapshot, now) does, in order:

1. **Reconcile.** Drops what may no longer run where it is (a variant
   unregistered, or reported failed on its node), and places what the base
   placement (:mod:`mesh.placement.base`) wants and is missing: on the first
   round everything, later the variants of a new model. New models and drops
   ignore the hold time.
2. **Measure.** Learns the arrival forecasts from ``load.demand`` and
   reckons each hosted (node, variant)'s utilisation: its busy compute time
   over its workers (``busy``, measured by the node or ``rate x service
   time`` from the profile), now and at the forecast's peak within the
   preload horizon.
3. **Scale** (:mod:`mesh.placement.ladder`): a variant whose queries miss
   their latency target because its compute alone is too slow moves to
   faster hardware or gets a faster variant beside it; a hot one (now, or
   soon by the forecast) gets workers, then a replica on a node near its
   load, then a faster variant; one cold for ``scale_down_after_s`` gives
   workers back; a replica idle for ``idle_evict_s`` is evicted; base
   variants evicted for memory come back when there is room again.

Hysteresis: scaling aims at ``target_util``, between the scale-down and
scale-up thresholds, so one step settles a variant instead of bouncing it;
no (node, variant) changes twice within ``hold_s``; scale-down waits for a
sustained cold spell. The base placement is never evicted for being idle,
only for memory, and never a node's last variant of a task (so every task
stays reachable from every entry node).

Cost per round: O(pairs that carried load + replicas + demand keys +
nodes whose hosts changed), plus, for each hot pair, a look at its node's
children, parent and siblings, and for each measured pair a walk up to the
nearest subtree with a forecast (O(depth)); idle base variants are not
visited. The base placement (O(nodes x tasks), groups of like nodes
computed once) is recomputed only when the registry or the failed set
changes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from types import MappingProxyType

from mesh.placement.base import BasePlan, base_placement
from mesh.placement.catalogue import Catalogue, Option
from mesh.placement.constraints import Constraints
from mesh.placement.forecast import Forecaster
from mesh.placement.inputs import LoadSnapshot, VariantLoad
from mesh.placement.ladder import Ladder, Measured
from mesh.placement.model import Cause, DecisionKind, Pair, Placement, PlacementDecision, Round
from mesh.placement.resources import NodeResources, hosted_bytes
from mesh.placement.tuning import Tuning
from mesh.registry import Registry, Variant
from mesh.topology import Topology

__all__ = ["Autoscaler", "Pair"]

_IDLE = VariantLoad()


class Autoscaler:
    """Keeps one mesh's placement, round after round. Not thread-safe; pure (no clock, no I/O).

    Call :meth:`step` every few seconds (the same period as the load
    reports) with the registry and what was observed; apply the returned
    :class:`~mesh.placement.model.Round`'s placement.
    """

    #: decisions kept for status pages
    history_size = 200

    def __init__(self, topology: Topology, *, tuning: Tuning | None = None,
                 constraints: Constraints | None = None,
                 forecaster: Forecaster[tuple[str, str]] | None = None) -> None:
        """Defaults: the tuning and the forecasts' day length of the topology's
        ``placement`` section."""
        self.topology = topology
        self.tuning = tuning or Tuning(**topology.placement.tuning)
        self.constraints = constraints or Constraints(topology)
        #: per (task, subtree root node): learned from each round's ``load.demand``
        day_s = topology.placement.day_s
        self.forecaster: Forecaster[tuple[str, str]] = forecaster or Forecaster(
            period_s=day_s, half_life_s=min(300.0, day_s / 96))  # a compressed day, faster
        by_class = {name: NodeResources.of(hw) for name, hw in topology.hardware.items()}
        self.resources = {n: by_class[spec.hardware] for n, spec in topology.nodes.items()}
        self.history: deque[PlacementDecision] = deque(maxlen=self.history_size)
        self.placement = Placement()
        self.catalogue: Catalogue | None = None
        self.base: BasePlan | None = None
        self._hosts: dict[str, dict[str, int]] = {}
        self._base_pairs: set[Pair] = set()
        self._base_key: object = None
        self._changed: dict[Pair, float] = {}
        self._cold_since: dict[Pair, float] = {}
        self._idle_since: dict[Pair, float] = {}
        self._evicted_base: dict[Pair, float] = {}
        self._blocked: dict[Pair, float] = {}
        #: hosted pairs measured every round even without load: replicas, and more than 1 worker
        self._watch: set[Pair] = set()
        #: read-only copies of each node's hosts, remade only for the nodes a round changed
        self._frozen: dict[str, MappingProxyType[str, int]] = {}
        self._dirty: set[str] = set()
        self._order = sorted(topology.nodes)

    # ------------------------------------------------------------------ the round
    def step(self, registry: Registry | Iterable[Variant], load: LoadSnapshot | None,
             now: float) -> Round:
        """One decision round at ``now``: the new placement and why it changed.

        ``registry``: a :class:`~mesh.registry.Registry` or its variants.
        """
        load = load or LoadSnapshot()
        variants = registry.variants.values() if isinstance(registry, Registry) else registry
        out: list[PlacementDecision] = []
        catalogue, base = self._reconcile(list(variants), load, now, out)
        for (task, node), rate in sorted(load.demand.items()):
            if node in self.topology.nodes:  # a stale name must not grow the forecaster
                self.forecaster.observe((task, node), rate, now)
        measured = self._measure(catalogue, load, now)
        Ladder(self, catalogue, base, measured, load, now, out).run()
        for node in self._dirty:
            hosted = self._hosts.get(node)
            if hosted:
                self._frozen[node] = MappingProxyType(dict(hosted))
            else:
                self._frozen.pop(node, None)
        self._dirty.clear()
        self.placement = Placement._trusted(dict(self._frozen))
        self.history.extend(out)
        return Round(self.placement, tuple(out), now, dict(base.unplaced))

    def use_constraints(self, constraints: Constraints) -> None:
        """New allow/deny lists (the topology's globs changed): the next round recomputes
        the base placement within them and drops, with cause ``topology``, what they no
        longer let in. Raises ``ValueError`` when they are not for this topology's nodes."""
        if set(constraints.rules) != set(self.topology.nodes):
            raise ValueError(f"these allow/deny lists are not for topology "
                             f"{self.topology.name!r} (other nodes)")
        self.constraints = constraints
        self._base_key = None  # the base placement is stale

    # ------------------------------------------------------------------ helpers the ladder uses
    def held(self, pair: Pair, now: float) -> bool:
        """Whether ``pair`` changed less than ``hold_s`` ago."""
        last = self._changed.get(pair)
        return last is not None and now - last < self.tuning.hold_s

    def set_workers(self, pair: Pair, workers: int, now: float, *, hold: bool = True) -> None:
        """Host ``pair`` with ``workers`` workers (0: not at all); ``hold`` starts its hold time."""
        node, variant = pair
        if workers <= 0:
            self._hosts.get(node, {}).pop(variant, None)
            if not self._hosts.get(node):
                self._hosts.pop(node, None)
            self._cold_since.pop(pair, None)
            self._idle_since.pop(pair, None)
        else:
            self._hosts.setdefault(node, {})[variant] = workers
        if hold:
            self._changed[pair] = now
        self._dirty.add(node)
        self._rewatch(pair, workers)

    def _rewatch(self, pair: Pair, workers: int) -> None:
        if workers > 1 or (workers == 1 and pair not in self._base_pairs):
            self._watch.add(pair)
        else:
            self._watch.discard(pair)

    def touch(self, pair: Pair, now: float) -> None:
        """Count ``pair`` as changed now (its hold time starts again)."""
        self._changed[pair] = now

    def workers(self, node: str, variant: str) -> int:
        return self._hosts.get(node, {}).get(variant, 0)

    def hosted(self, node: str) -> dict[str, int]:
        return self._hosts.get(node, {})

    def free_bytes(self, node: str, option: Option, catalogue: Catalogue) -> int:
        """Memory left on ``node`` for ``option``, in the pool its variant would use: a base
        instance that private heads and their base share counts once, and is not needed
        again for another variant on it (:meth:`Catalogue.shared_part`)."""
        res = self.resources[node]
        accel = res.on_accelerator(option.variant)
        used = 0
        shared: set[str] = set()  # base instances counted (heads and their base share one)
        hosted = self.hosted(node)
        for name, workers in sorted(hosted.items()):
            o = catalogue.option(name, res.profile_key)
            if o is not None and res.on_accelerator(o.variant) == accel:
                used += hosted_bytes(o.memory_bytes, workers, self.tuning.worker_memory_frac)
                base, base_bytes = catalogue.shared_part(o)
                if base in shared:
                    used -= base_bytes
                if base:
                    shared.add(base)
        free = (res.accelerator_bytes if accel else res.memory_bytes) - used
        base, base_bytes = catalogue.shared_part(option)
        if base in shared and option.name not in hosted:
            free += base_bytes  # ``option`` would run on the base instance already there
        return free

    def is_base(self, pair: Pair) -> bool:
        return pair in self._base_pairs

    # ------------------------------------------------------------------ 1. reconcile
    def _reconcile(self, variants: list[Variant], load: LoadSnapshot, now: float,
                   out: list[PlacementDecision]) -> tuple[Catalogue, BasePlan]:
        previous = self.catalogue
        catalogue = Catalogue(variants, self.tuning)
        if previous is not None and previous.fingerprint == catalogue.fingerprint:
            catalogue = previous  # keep its memoised options
        failed = {n: frozenset(vs) for n, vs in load.failed.items()
                  if n in self.topology.nodes and vs}
        key = (catalogue.fingerprint, tuple(sorted(failed.items())))
        fresh = key != self._base_key
        if fresh:
            self.base = base_placement(self.topology, catalogue, self.constraints, self.tuning,
                                       failed=failed)
            self._base_key = key
            self._base_pairs = {(n, v) for n, chosen in self.base.hosts.items() for v in chosen}
            self._watch.clear()
            for node, hosted in self._hosts.items():
                for variant, workers in hosted.items():
                    self._rewatch((node, variant), workers)
        self.catalogue = catalogue
        base = self.base
        assert base is not None
        # What may run where changes only with the registry or the failed set.
        for node in list(self._hosts) if fresh else ():
            res = self.resources[node]
            for variant in sorted(self._hosts[node]):
                why = None
                if variant not in catalogue.variants:
                    why = (Cause.REGISTRY, f"{variant} is no longer registered")
                elif variant in failed.get(node, ()):
                    why = (Cause.FAILED, f"{node} reported it cannot load {variant}")
                elif not self.constraints.permits(node, variant,
                                                  catalogue.variants[variant].base):
                    why = (Cause.TOPOLOGY, f"{node}'s allow/deny lists no longer let "
                           f"{variant} in")
                elif catalogue.option(variant, res.profile_key) is None:
                    why = (Cause.REGISTRY, f"{variant} has no latency profile for "
                           f"{res.profile_key} any more")
                if why is not None:
                    self.set_workers((node, variant), 0, now, hold=False)
                    self._evicted_base.pop((node, variant), None)
                    out.append(PlacementDecision(DecisionKind.DROP, node, variant, 0, why[0],
                                                 why[1], now))
        if fresh:
            for node in self._order:
                for variant, (cause, reason) in sorted(base.hosts.get(node, {}).items()):
                    pair = (node, variant)
                    if self.workers(node, variant) or pair in self._evicted_base:
                        continue
                    if previous is not None and variant not in previous.variants:
                        cause, reason = Cause.REGISTRY, f"new variant {variant}: {reason}"
                    # No hold: what the base places may scale as soon as load arrives.
                    self.set_workers(pair, 1, now, hold=False)
                    out.append(PlacementDecision(DecisionKind.PLACE, node, variant, 1, cause,
                                                 reason, now))
            for entry, task, reason in base.uncovered:
                out.append(PlacementDecision(DecisionKind.UNCOVERED, entry, task, 0,
                                             Cause.COVERAGE, reason, now))
        return catalogue, base

    # ------------------------------------------------------------------ 2. measure
    def _measure(self, catalogue: Catalogue, load: LoadSnapshot,
                 now: float) -> dict[Pair, Measured]:
        """The pairs that carried load or are watched; the rest are idle base variants."""
        t = self.tuning
        measured: dict[Pair, Measured] = {}
        pairs = self._watch.union(p for p in load.served if self.workers(*p))
        for pair in sorted(pairs):
            m = self.measure(pair, catalogue, load, now)
            if m is None:
                continue
            measured[pair] = m
            if max(m.util, m.util_soon) < t.scale_down_util:
                self._cold_since.setdefault(pair, now)
            else:
                self._cold_since.pop(pair, None)
            if m.load.rate_qps <= t.idle_rate_qps and (m.load.busy or 0.0) <= 0.0:
                self._idle_since.setdefault(pair, now)
            else:
                self._idle_since.pop(pair, None)
        return measured

    def measure(self, pair: Pair, catalogue: Catalogue, load: LoadSnapshot,
                now: float) -> Measured | None:
        """``pair``'s load this round (None when it is not hosted or has no profile)."""
        node, variant = pair
        workers = self.workers(node, variant)
        option = catalogue.option(variant, self.resources[node].profile_key)
        if not workers or option is None:
            return None
        vl = load.served.get(pair, _IDLE)
        busy = (vl.busy if vl.busy is not None
                else vl.rate_qps * option.service_ms * vl.rows_per_query / 1000.0)
        if busy <= 0:
            return Measured(option, vl, workers, 0.0, 0.0, "")
        horizon = self.tuning.preload_horizon_s + option.profile.cold_start_ms / 1000.0
        growth, outlook = self._growth(option.variant.task, node, now, horizon)
        return Measured(option, vl, workers, busy, busy * growth, outlook)

    def _growth(self, task: str, node: str, now: float, horizon_s: float) -> tuple[float, str]:
        """How much the demand for ``task`` around ``node`` will grow within the horizon."""
        where: str | None = node
        while where is not None and (task, where) not in self.forecaster:
            where = self.topology.parent.get(where)  # the nearest subtree with a forecast
        if where is None:
            return 1.0, ""
        key = (task, where)
        current = self.forecaster.rate(key, now)
        peak = self.forecaster.peak(key, now, horizon_s)
        if current <= self.tuning.idle_rate_qps or peak <= current:
            return 1.0, ""
        growth = min(peak / current, self.tuning.max_forecast_growth)
        return growth, (f"forecast: {task} entering below {where} rises to {peak:.1f} q/s "
                        f"within {horizon_s:.0f} s (now {current:.1f} q/s); ")

    def cold_for(self, pair: Pair, now: float) -> float:
        since = self._cold_since.get(pair)
        return 0.0 if since is None else now - since

    def idle_for(self, pair: Pair, now: float) -> float:
        since = self._idle_since.get(pair)
        return 0.0 if since is None else now - since

    def blocked_recently(self, pair: Pair, now: float) -> bool:
        last = self._blocked.get(pair)
        if last is not None and now - last < self.tuning.hold_s:
            return True
        self._blocked[pair] = now
        return False

    def note_evicted_base(self, pair: Pair, now: float) -> None:
        self._evicted_base[pair] = now

    def evicted_base(self) -> dict[Pair, float]:
        return self._evicted_base
