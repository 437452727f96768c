"""The scaling ladder of one round: what a hot, cold, idle or too slow (node, variant) gets.

For a **hot** variant (utilisation above ``scale_up_util`` now, or at the
forecast's peak within the preload horizon), in this order, stopping at
the first step that absorbs the load:

1. more compute workers on its node, up to what the node's cores (or its
   real CPUs, when fewer), the CPU time its other variants use, the CPUs
   its machine has left beside the other nodes on it
   (:class:`~mesh.placement.machines.CpuBudget`), and its memory allow,
   aiming at ``target_util``;
2. a replica on a nearby node with room, on another machine: first the
   children whose subtree sends this task the most (closer to the load),
   then the parent, then the siblings, least busy first; a copy already on
   one of them that is not overloaded takes the overflow as it is;
3. a faster variant of the same task beside it on its node (the most
   accurate one with more throughput, meeting the queries' ``min_accuracy``
   when they said it), evicting cold variants of other tasks there if
   memory is short; when a faster one is there already and not overloaded,
   nothing is added: the planner's accuracy scaling sends queries to it.

When none can, a ``blocked`` decision says why (once per hold time).

A variant whose queries **miss their latency target** while its compute
alone takes most of that target cannot be helped by replicas: it is
placed on faster hardware on the path towards the root, or a faster
variant that fits the target joins it.

A variant **cold** for ``scale_down_after_s`` gets back to the workers its
load needs (at least one); a replica or preloaded variant **idle** for
``idle_evict_s`` is evicted; base variants evicted for memory are
**restored** once their node's memory use is back within its base share.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from mesh.placement.base import BasePlan
from mesh.placement.catalogue import Catalogue, Option
from mesh.placement.inputs import LoadSnapshot, VariantLoad
from mesh.placement.machines import CpuBudget
from mesh.placement.model import Cause, DecisionKind, Pair, PlacementDecision
from mesh.placement.resources import MIB, hosted_bytes

__all__ = ["Measured", "Ladder", "need_workers"]


@dataclass(slots=True)
class Measured:
    """One hosted (node, variant) as this round sees it."""

    option: Option
    load: VariantLoad
    workers: int
    #: busy worker-time per second, now and at the forecast's peak within the horizon
    busy: float
    busy_soon: float
    #: the forecast behind ``busy_soon`` ("" when it foresees no rise)
    outlook: str

    @property
    def util(self) -> float:
        return self.busy / self.workers

    @property
    def util_soon(self) -> float:
        return self.busy_soon / self.workers


def need_workers(busy: float, target_util: float) -> int:
    """Workers that carry ``busy`` worker-seconds per second at ``target_util``."""
    return max(1, math.ceil(busy / target_util - 1e-9))


class Ladder:
    """One round's scaling actions; appends its decisions to ``out``.

    ``scaler`` is the :class:`~mesh.placement.scaling.Autoscaler` whose round this is
    (its tuning, topology and hysteresis clocks); typed loosely so that this module does
    not import the one that imports it.
    """

    def __init__(self, scaler: Any, catalogue: Catalogue, base: BasePlan,
                 measured: dict[Pair, Measured], load: LoadSnapshot, now: float,
                 out: list[PlacementDecision]) -> None:
        self.s = scaler
        self.t = scaler.tuning
        self.topology = scaler.topology
        self.catalogue = catalogue
        self.base = base
        self.measured = measured
        self.load = load
        self.failed = load.failed
        self.now = now
        self.out = out
        self.touched: set[Pair] = set()
        self.node_busy: dict[str, float] = defaultdict(float)
        for (node, _), m in measured.items():
            self.node_busy[node] += max(m.busy, m.busy_soon)
        self.cpu = CpuBudget(scaler.resources, load.machines,
                             {n: scaler.hosted(n) for n in load.machines},
                             [p for p, m in measured.items() if max(m.busy, m.busy_soon) > 0])

    # ------------------------------------------------------------------ the round
    def run(self) -> None:
        t, items = self.t, sorted(self.measured.items())
        slow = [(p, m) for p, m in items if self._too_slow(p, m)]
        for pair, m in sorted(slow, key=lambda pm: (-pm[1].load.slo_miss_frac, pm[0])):
            if self._free_to_act(pair):
                self._speed_up(pair, m)
        for pair, m in sorted(items, key=lambda pm: (-pm[1].util, pm[0])):
            if m.util > t.scale_up_util and self._free_to_act(pair):
                self._scale_up(pair, m, m.busy, Cause.LOAD, "")
        for pair, m in sorted(items, key=lambda pm: (-pm[1].util_soon, pm[0])):
            if m.util <= t.scale_up_util < m.util_soon and self._free_to_act(pair):
                self._scale_up(pair, m, m.busy_soon, Cause.FORECAST, m.outlook)
        for pair, m in items:
            if (m.workers > 1 and self.s.cold_for(pair, self.now) >= t.scale_down_after_s
                    and self._free_to_act(pair)):
                self._scale_down(pair, m)
        for pair, m in items:
            if (not self.s.is_base(pair) and self.s.idle_for(pair, self.now) >= t.idle_evict_s
                    and self._free_to_act(pair)):
                self._evict(pair, m, Cause.IDLE, f"{pair[1]} on {pair[0]} served nothing for "
                            f"{self.s.idle_for(pair, self.now):.0f} s (it is not part of the "
                            "base placement)")
        self._restore()

    def _measured(self, node: str, variant: str) -> Measured | None:
        pair = (node, variant)
        m = self.measured.get(pair)
        if m is None:
            m = self.s.measure(pair, self.catalogue, self.load, self.now)
        return m

    def _free_to_act(self, pair: Pair) -> bool:
        return pair not in self.touched and not self.s.held(pair, self.now)

    def _decide(self, kind: DecisionKind, pair: Pair, workers: int, cause: Cause,
                reason: str) -> None:
        if kind not in (DecisionKind.BLOCKED, DecisionKind.UNCOVERED):
            self.cpu.set(pair, workers)
            self.s.set_workers(pair, workers, self.now)
            self.touched.add(pair)
        self.out.append(PlacementDecision(kind, pair[0], pair[1], workers, cause, reason,
                                          self.now))

    def _may_host(self, node: str, option_of: str) -> Option | None:
        """``option_of``'s option on ``node`` when the node may run it there."""
        res = self.s.resources[node]
        o = self.catalogue.option(option_of, res.profile_key)
        if (o is None or node in self.load.down or not res.can_run(o.variant)
                or not self.s.constraints.permits(node, option_of, o.variant.base)
                or option_of in self.failed.get(node, ())):
            return None
        return o

    # ------------------------------------------------------------------ hot
    def _scale_up(self, pair: Pair, m: Measured, busy: float, cause: Cause, prefix: str) -> None:
        node, variant = pair
        o, w, t = m.option, m.workers, self.t
        need = need_workers(busy, t.target_util)
        other = self.node_busy[node] - max(m.busy, m.busy_soon)
        slots = self.cpu.slots(node)
        real = slots < self.s.resources[node].slots  # its real CPUs are fewer than declared
        limits = [f"{slots} worker slot(s)" + (
            f" (its {self.cpu.machines[node].cpus:g} real CPUs)" if real else "")]
        most = slots
        cpu = round(slots - other)  # worker slots its other variants leave, to the nearest
        if cpu < most:
            most, limits, real = max(w, cpu), [f"its other variants busy on {other:.1f} of "
                                               f"its {slots} worker slot(s)"], False
        by_host = self.cpu.most(pair)
        # (a machine shared with other nodes is named even when it allows what the node does)
        by_machine = by_host is not None and (by_host < most
                                              or by_host == most and self.cpu.shared(node))
        if by_machine:
            # Nodes sharing a machine share its CPUs: workers beyond them only take turns.
            most, limits, real = max(w, by_host or 0), [""], True  # said once decided
        slow = m.load.slowdown >= t.contended_slowdown
        starved = m.load.cpu_share < t.contended_cpu_share
        contended = slow or starved
        why = (f"its compute running {m.load.slowdown:.1f}x slower than profiled" if slow
               else f"its compute thread getting a CPU {m.load.cpu_share:.0%} of the time")
        if contended and w < most:
            # The CPU is shared with something else and spent: more workers here would add
            # no capacity, only more to share it.
            most, limits, real, by_machine = w, [
                f"{why} (the CPU is contended; more workers would add no capacity)"], False, False
        extra = o.memory_bytes * t.worker_memory_frac
        if extra > 0:
            by_memory = w + max(0, math.floor(self.s.free_bytes(node, o, self.catalogue) / extra))
            if by_memory < most:
                most, limits = max(w, by_memory), [f"memory for {by_memory} worker(s)"]
                real = by_machine = False
        new = max(w, min(need, most))
        verb = "will be" if cause is Cause.FORECAST else "is"
        state = f"{prefix}{variant} on {node} {verb} {busy / w:.0%} busy over {w} worker(s)"
        if contended:
            state += f", {why} (the CPU is contended)"

        def limit() -> str:  # the host's CPUs as they are once this pair has its workers
            return self.cpu.describe(node) if by_machine else limits[0]

        if new > w:
            self.cpu.set(pair, new)
            short = f" (it needs {need}; {node} has {limit()})" if new < need else ""
            self._decide(DecisionKind.ADD_WORKERS, pair, new, cause,
                         f"{state}; {new} worker(s) bring it to about {busy / new:.0%}{short}")
        excess = busy - t.target_util * new
        if excess <= 1e-9:
            return
        # what stopped it adding workers, when that is the machine's real CPUs
        capped = f" ({node} has {limit()})" if new < need and real else ""
        if self._replicate(pair, m, excess, cause, state + capped, need, new):
            return
        if new > w:
            return  # it grew here; the next round looks again
        if self._faster_variant(pair, m, excess, cause, state + capped):
            return
        self._blocked(pair, w, cause, f"{state} and nothing can take more: {node} has "
                      f"{limit()}, no node near it has room for a replica on another machine, "
                      f"and no faster variant of {o.variant.task} fits here")

    def _replicate(self, pair: Pair, m: Measured, excess: float, cause: Cause, state: str,
                   need: int, here: int) -> bool:
        """A replica near ``pair`` for ``excess`` busy worker-seconds per second (of its node)."""
        node, variant = pair
        # Queries per busy second as observed, else as the profile says.
        per_busy = (m.load.rate_qps / m.busy if m.busy > 0 and m.load.rate_qps > 0
                    else 1000.0 / max(m.option.service_ms, 1e-9))
        excess_qps = excess * per_busy
        task = m.option.variant.task
        topo, fc, now = self.topology, self.s.forecaster, self.now
        demand = {c: fc.rate((task, c), now) for c in topo.children[node]}
        candidates = [(c, f"below it, {demand[c]:.1f} q/s of {task} enter there")
                      for c in sorted(demand, key=lambda c: (-demand[c], c)) if demand[c] > 0]
        parent = topo.parent.get(node)
        if parent is not None:
            candidates.append((parent, "its parent"))
            siblings = [s for s in topo.children[parent] if s != node]
            siblings.sort(key=lambda s: (self.node_busy[s] / self.cpu.slots(s), s))
            candidates += [(s, "a sibling") for s in siblings]
        for target, where in candidates:
            slots = self.cpu.slots(target)
            if target in self.load.down or self.cpu.same_host(node, target):
                continue  # a replica on the same machine would share the same CPUs
            if self.s.workers(target, variant):
                if self.node_busy[target] / slots <= self.t.scale_up_util:
                    return True  # a copy nearby with room takes the overflow (and scales itself)
                continue
            if not self._free_to_act((target, variant)):
                continue
            o = self._may_host(target, variant)
            if o is None or self.node_busy[target] / slots > self.t.scale_up_util:
                continue
            by_host = self.cpu.most((target, variant))
            if by_host is not None and by_host < 1:
                continue  # its machine's CPUs are all in use
            busy = excess * o.service_ms / max(m.option.service_ms, 1e-9)  # on its hardware
            workers = min(need_workers(busy, self.t.target_util), slots,
                          by_host if by_host is not None else slots)
            free = self.s.free_bytes(target, o, self.catalogue)
            while workers > 1 and hosted_bytes(o.memory_bytes, workers,
                                               self.t.worker_memory_frac) > free:
                workers -= 1
            if hosted_bytes(o.memory_bytes, workers, self.t.worker_memory_frac) > free:
                continue
            self.node_busy[target] += busy
            self.touched.add(pair)
            self.s.touch(pair, self.now)  # let the replica take its share before more changes
            self._decide(DecisionKind.REPLICATE, (target, variant), workers, cause, (
                f"{state}, needs {need} worker(s) and can have {here} there: a replica on "
                f"{target} ({where}) takes about {excess_qps:.1f} q/s with {workers} worker(s)"))
            return True
        return False

    def _faster_variant(self, pair: Pair, m: Measured, excess: float, cause: Cause,
                        state: str) -> bool:
        node, variant = pair
        o, res = m.option, self.s.resources[node]
        floor = m.load.min_accuracy
        faster = [u for u in self.catalogue.front(o.variant.task, res.profile_key)
                  if u.service_ms < o.service_ms and u.name != variant
                  and (floor is None or u.accuracy >= floor)]
        here = [u.name for u in faster if self.s.workers(node, u.name)]
        for name in here:
            mu = self._measured(node, name)
            if mu is None or mu.util <= self.t.scale_up_util:
                return True  # a faster variant here has room: accuracy scaling uses it
        options = [u for u in faster if u.name not in here and self._may_host(node, u.name)
                   and self._free_to_act((node, u.name))]
        for u in sorted(options, key=lambda u: (-u.accuracy, u.service_ms, u.name)):
            by_host = self.cpu.most((node, u.name))  # what the host's CPUs leave it
            # Its first worker even on a full machine: each of its queries takes less CPU
            # than the hot variant's, so the queries it takes over free CPU time.
            workers = min(need_workers(excess * u.service_ms / o.service_ms, self.t.target_util),
                          self.cpu.slots(node), max(1, by_host if by_host is not None
                                                    else self.cpu.slots(node)))
            # Never make room by evicting a faster variant of the same task: that is churn.
            if not self._make_room(node, u, hosted_bytes(u.memory_bytes, 1,
                                                         self.t.worker_memory_frac),
                                   {variant, *here}):
                continue
            free = self.s.free_bytes(node, u, self.catalogue)
            while workers > 1 and hosted_bytes(u.memory_bytes, workers,
                                               self.t.worker_memory_frac) > free:
                workers -= 1
            gain = o.service_ms / u.service_ms
            self.touched.add(pair)
            self.s.touch(pair, self.now)
            self._decide(DecisionKind.SWITCH, (node, u.name), workers, cause, (
                f"{state}, and neither more workers nor a replica nearby can hold it: the faster "
                f"{u.name} ({u.describe()}, {gain:.1f}x the throughput) joins it on {node}; "
                "queries whose min_accuracy allows take it"))
            return True
        return False

    # ------------------------------------------------------------------ too slow for the SLO
    def _too_slow(self, pair: Pair, m: Measured) -> bool:
        target = m.load.latency_target_ms
        return (target is not None and m.load.slo_miss_frac > self.t.slo_miss_frac
                and m.option.latency_ms + self.t.batch_overhead_ms
                > target * self.t.slo_compute_frac)

    def _speed_up(self, pair: Pair, m: Measured) -> None:
        node, variant = pair
        o, lv = m.option, m.load
        target = lv.latency_target_ms or 0.0
        fits = target * self.t.slo_fit_frac
        state = (f"{lv.slo_miss_frac:.0%} of the queries {variant} served on {node} missed their "
                 f"{target:g} ms target, and its compute alone takes {o.latency_ms:.2f} ms there, "
                 "so replicas cannot help")
        for up in self.topology.ancestors(node):
            u = self._may_host(up, variant)
            if (u is None or self.s.workers(up, variant)
                    or u.latency_ms + self.t.batch_overhead_ms > fits
                    or not self._free_to_act((up, variant))
                    or hosted_bytes(u.memory_bytes, 1, self.t.worker_memory_frac)
                    > self.s.free_bytes(up, u, self.catalogue)):
                continue
            self.touched.add(pair)
            self.s.touch(pair, self.now)
            self._decide(DecisionKind.SWITCH, (up, variant), 1, Cause.SLO, (
                f"{state}: {up}'s hardware runs it in {u.latency_ms:.2f} ms"))
            return
        res = self.s.resources[node]
        options = [u for u in self.catalogue.front(o.variant.task, res.profile_key)
                   if u.latency_ms + self.t.batch_overhead_ms <= fits and u.name != variant
                   and (lv.min_accuracy is None or u.accuracy >= lv.min_accuracy)
                   and not self.s.workers(node, u.name) and self._may_host(node, u.name)
                   and self._free_to_act((node, u.name))]
        for u in sorted(options, key=lambda u: (-u.accuracy, u.latency_ms, u.name)):
            if self._make_room(node, u, hosted_bytes(u.memory_bytes, 1, self.t.worker_memory_frac),
                               {variant}):
                self.touched.add(pair)
                self.s.touch(pair, self.now)
                self._decide(DecisionKind.SWITCH, (node, u.name), 1, Cause.SLO, (
                    f"{state}: the faster {u.name} ({u.describe()}) joins it"))
                return
        self._blocked(pair, m.workers, Cause.SLO, (
            f"{state}, and no node on its path runs it within {fits:g} ms, nor does a variant of "
            f"{o.variant.task} that meets min_accuracy {lv.min_accuracy} fit here"))

    # ------------------------------------------------------------------ cold, idle, memory
    def _scale_down(self, pair: Pair, m: Measured) -> None:
        new = min(m.workers, need_workers(max(m.busy, m.busy_soon), self.t.target_util))
        if new < m.workers:
            self._decide(DecisionKind.REMOVE_WORKERS, pair, new, Cause.LOAD, (
                f"{pair[1]} on {pair[0]} has been under {self.t.scale_down_util:.0%} busy for "
                f"{self.s.cold_for(pair, self.now):.0f} s ({m.util:.0%} over {m.workers} "
                f"worker(s)); {new} worker(s) carry its load"))

    def _evict(self, pair: Pair, m: Measured, cause: Cause, reason: str) -> None:
        if self.s.is_base(pair):
            self.s.note_evicted_base(pair, self.now)
        self._decide(DecisionKind.EVICT, pair, 0, cause, reason)

    def _make_room(self, node: str, option: Option, need: int, protect: set[str]) -> bool:
        """Evict cold variants on ``node`` until ``need`` bytes are free; False when they cannot."""
        free = self.s.free_bytes(node, option, self.catalogue)
        if free >= need:
            return True
        res = self.s.resources[node]
        hosted = sorted(self.s.hosted(node).items())
        here = {v: self._measured(node, v) for v, _ in hosted}
        base_tasks = Counter(m.option.variant.task for v, m in here.items()
                             if m is not None and self.s.is_base((node, v)))
        evictable = []
        for variant, workers in hosted:
            pair = (node, variant)
            m = here[variant]
            if (variant in protect or m is None or not self._free_to_act(pair)
                    or max(m.util, m.util_soon) >= self.t.scale_down_util
                    or res.on_accelerator(m.option.variant) != res.on_accelerator(option.variant)):
                continue
            if self.s.is_base(pair) and base_tasks[m.option.variant.task] <= 1:
                continue  # a node's last base variant of a task keeps the task reachable
            size = hosted_bytes(m.option.memory_bytes, workers, self.t.worker_memory_frac)
            evictable.append((m.busy, -size, variant, size, m))
        if free + sum(e[3] for e in evictable) < need:
            return False
        for _, _, variant, size, m in sorted(evictable):
            if free >= need:
                break
            if self.s.is_base((node, variant)):
                if base_tasks[m.option.variant.task] <= 1:
                    continue
                base_tasks[m.option.variant.task] -= 1
            self._evict((node, variant), m, Cause.PRESSURE, (
                f"{variant} on {node} was {m.util:.0%} busy; its {size / MIB:.1f} MB are needed "
                f"for {option.name}"))
            free += size
        return free >= need

    def _restore(self) -> None:
        for pair, since in sorted(self.s.evicted_base().items()):
            node, variant = pair
            if self.now - since < self.t.hold_s:
                continue
            res = self.s.resources[node]
            o = self.catalogue.option(variant, res.profile_key)
            if o is None or variant not in self.base.hosts.get(node, {}) or self.s.workers(*pair):
                del self.s.evicted_base()[pair]
                continue
            total = res.accelerator_bytes if res.on_accelerator(o.variant) else res.memory_bytes
            used = total - self.s.free_bytes(node, o, self.catalogue)
            if used + o.memory_bytes > total * self.t.base_memory_frac:
                continue  # scaling still uses the room it was evicted for
            del self.s.evicted_base()[pair]
            _, reason = self.base.hosts[node][variant]
            self._decide(DecisionKind.PLACE, pair, 1, Cause.RESTORE,
                         f"back in the base placement now that {node} has room again: {reason}")

    def _blocked(self, pair: Pair, workers: int, cause: Cause, reason: str) -> None:
        if not self.s.blocked_recently(pair, self.now):
            self._decide(DecisionKind.BLOCKED, pair, workers, cause, reason)
