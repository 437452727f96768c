"""The base placement: what each node hosts before any load is seen.

Three rules, in this order, each within the node's allow/deny lists (its
constraints, :mod:`mesh.placement.constraints`), what its hardware can run
and has a profile for, and its memory:

1. **Tiers.** A node chooses from *its* front: the variants of a task it may
   host, less those dominated by another it may host
   (:meth:`~mesh.placement.catalogue.Catalogue.front_among`; a variant
   dominated only by one the node may not host is worth hosting there). Its
   tier's share is a band of accuracy on the task's whole front on its
   hardware: an *edge* node takes the lighter half, smallest first (int8,
   TFLite, students and small models: tight latency next to the devices);
   an *intermediate* node the more accurate two thirds, most accurate first;
   a *core* node all of it, most accurate first, and a core node with an
   accelerator the largest first, plus the dominated variants (the torch
   originals) that nothing else hosts. The band does not depend on the
   lists, so a constraint narrows a node's share and never shifts it. A
   node whose allow list leaves none of its tier's share of a task takes the
   allowed variant nearest to that share instead. A root (no parent) takes
   a core's share whatever its tier: nothing inward of it could serve the
   accurate variants. Tasks take turns, so one large family cannot crowd out
   the others. This fills at most ``base_memory_frac`` of the node's memory;
   the rest is left for scaling.
2. **Coverage.** Every task must have a host on the path from every edge
   node up to its root (the hierarchy of parents), so that a query entering
   anywhere can be served. One pass down finds the entry nodes whose path
   lacks a task; one pass up gives it to the lowest node of that path that
   can hold its smallest allowed variant in its whole memory. A task no node
   of some path can host is reported as uncovered.
3. **Tenants.** The same coverage holds within each tenant's nodes, for the
   tasks it may run.

Nodes that share a tier, a hardware class, a rule and being a root share one
computation of rule 1, and each distinct rule's front is computed once per
task, so a mesh of 10,000 nodes in a few groups costs little more than one
of ten; coverage is two passes per scope: O(nodes x tasks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mesh.placement.catalogue import Catalogue, Option
from mesh.placement.constraints import Constraints, HostRule
from mesh.placement.model import Cause
from mesh.placement.resources import MIB, NodeResources
from mesh.placement.tuning import Tuning
from mesh.topology import Topology

__all__ = ["BasePlan", "base_placement", "entry_nodes"]

#: node -> variant -> (cause, reason)
Hosts = dict[str, dict[str, tuple[Cause, str]]]


@dataclass(frozen=True)
class BasePlan:
    """The base placement (one worker per hosted variant) and what it could not do."""

    hosts: Hosts
    #: (entry node, task, reason): a task some entry nodes cannot reach, once per (root, task)
    uncovered: tuple[tuple[str, str, str], ...] = ()
    #: variant -> why no node hosts it
    unplaced: dict[str, str] = field(default_factory=dict)


def entry_nodes(topology: Topology) -> list[str]:
    """Where queries enter: the edge tier, or the leaves of the hierarchy when it has none."""
    edge = topology.nodes_in_tier("edge")
    return edge or sorted(n for n, kids in topology.children.items() if not kids)


@dataclass(slots=True)
class _Fill:
    """Memory left on one node while it is being filled. A base instance that private heads
    (and the base's own task) share is counted once (:meth:`Catalogue.shared_part`)."""

    host: float
    accel: float
    catalogue: Catalogue
    shared: set[str] = field(default_factory=set)

    def take(self, o: Option, res: NodeResources, *, hosted: bool = False) -> bool:
        """Take ``o``'s memory if it fits (``hosted``: it is on the node already; take it
        whether it fits or not)."""
        name, shared_bytes = self.catalogue.shared_part(o)
        need = o.memory_bytes - (shared_bytes if name and name in self.shared else 0)
        if res.on_accelerator(o.variant):
            if need > self.accel and not hosted:
                return False
            self.accel -= need
        else:
            if need > self.host and not hosted:
                return False
            self.host -= need
        if name:
            self.shared.add(name)
        return True


def _usable(task: str, key: str, res: NodeResources, rule: HostRule, failed: frozenset[str],
            catalogue: Catalogue) -> frozenset[str]:
    """The variants of ``task`` a node may host: its rule permits them, its hardware runs
    them and it has not failed to load them."""
    return frozenset(o.name for o in catalogue.options(task, key)
                     if rule.permits(o.name, o.variant.base) and res.can_run(o.variant)
                     and o.name not in failed)


def _accuracy_levels(options: Sequence[Option], tie: float) -> list[tuple[float, float]]:
    """The distinct accuracies of ``options`` (sorted by accuracy), those within ``tie`` of
    a level's lowest counting as that level: (lowest, highest) of each level."""
    levels: list[tuple[float, float]] = []
    for o in options:
        if levels and o.accuracy <= levels[-1][0] + tie:
            levels[-1] = (levels[-1][0], max(levels[-1][1], o.accuracy))
        else:
            levels.append((o.accuracy, o.accuracy))
    return levels


def _dominator_barred(o: Option, in_front: set[str]) -> str:
    """A note for a variant placed because what dominates it may not be placed here."""
    if o.dominated_by and o.name in in_front:
        return f"; {o.dominated_by} dominates it but may not be placed here"
    return ""


def _tier_choices(tier: str, root: bool, res: NodeResources, rule: HostRule,
                  failed: frozenset[str], catalogue: Catalogue, tuning: Tuning
                  ) -> dict[str, tuple[Cause, str]]:
    """Rule 1 for one kind of node: variant -> (cause, reason).

    The tier's share is an accuracy band of the task's whole front on this hardware; the
    node takes the variants of *its* front (within its constraints) that fall in it, so a
    constraint narrows what a node may take and never shifts its share.
    """
    key = res.profile_key
    tie = tuning.accuracy_tie
    role = "core" if root else tier  # nothing above a root: it is the core of its tree
    ranked: list[list[tuple[Option, str]]] = []
    for task in catalogue.tasks:
        whole = catalogue.front(task, key)
        usable = _usable(task, key, res, rule, failed, catalogue)
        front = catalogue.front_among(task, key, usable)
        in_front = {o.name for o in front}
        k = len(whole)
        # the bands are by accuracy level: variants as accurate within the tie (an fp32
        # ONNX and an fp32 TFLite export of one model) are one level, not two halves
        levels = _accuracy_levels(whole, tie)
        where = f"{task}'s {k} useful variants on {key}"
        if role == "edge":
            ceiling = levels[math.ceil(len(levels) / 2) - 1][1] + tie if k else -math.inf
            window = sorted((o for o in front if o.accuracy <= ceiling),
                            key=lambda o: (o.memory_bytes, o.latency_ms, o.name))
            why = f"edge: in the lighter half of {where}, smallest first"
        elif role == "intermediate":
            floor = levels[len(levels) // 3][0] - tie if k else math.inf
            window = sorted((o for o in front if o.accuracy >= floor),
                            key=lambda o: (-o.accuracy, o.latency_ms, o.name))
            why = f"intermediate: in the more accurate two thirds of {where}"
        elif res.accelerated:
            dominated = [o for o in catalogue.options(task, key)
                         if o.name in usable and o.name not in in_front]
            window = sorted([*front, *dominated], key=lambda o: (-o.memory_bytes, o.name))
            why = f"core with an accelerator: {task}'s variants, largest first"
        else:
            window = sorted(front, key=lambda o: (-o.accuracy, o.latency_ms, o.name))
            why = f"core: every useful variant of {task}, most accurate first"
        if root and tier != "core":
            why = f"a root {tier} node (nothing above it) takes a core's share; {why}"
        if not window and front and rule.allow is not None:
            # The node's allow list leaves none of its tier's share: take the allowed variant
            # nearest to that share rather than none (the list says the node is meant for it).
            window = [front[0] if role == "edge" else front[-1]]
            why = (f"{tier}: the allow list leaves none of its tier's share of {task}; "
                   f"the {'lightest' if role == 'edge' else 'most accurate'} it allows")
        ranked.append([(o, f"{why} ({o.describe()}{_dominator_barred(o, in_front)})")
                       for o in window])
    fill = _Fill(res.memory_bytes * tuning.base_memory_frac,
                 res.accelerator_bytes * tuning.base_memory_frac, catalogue)
    chosen: dict[str, tuple[Cause, str]] = {}
    for rank in range(max((len(r) for r in ranked), default=0)):
        for options in ranked:  # tasks take turns
            if rank < len(options):
                o, reason = options[rank]
                if fill.take(o, res):
                    chosen[o.name] = (Cause.BASE, reason)
    return chosen


def base_placement(topology: Topology, catalogue: Catalogue, constraints: Constraints,
                   tuning: Tuning | None = None, *,
                   failed: Mapping[str, frozenset[str]] | None = None) -> BasePlan:
    """The base placement of ``catalogue`` on ``topology``. Deterministic.

    ``failed``: node -> variants it could not load (never placed there).
    """
    tuning = tuning or Tuning()
    failed = failed or {}
    resources = {name: NodeResources.of(hw) for name, hw in topology.hardware.items()}
    memo: dict[tuple[object, ...], dict[str, tuple[Cause, str]]] = {}
    hosts: Hosts = {}
    for name, spec in topology.nodes.items():
        rule = constraints.rule(name)
        bad = failed.get(name, frozenset())
        root = topology.parent.get(name) is None
        key = (spec.tier, root, spec.hardware, rule.key, bad)
        chosen = memo.get(key)
        if chosen is None:
            chosen = memo[key] = _tier_choices(spec.tier, root, resources[spec.hardware], rule,
                                               bad, catalogue, tuning)
        hosts[name] = chosen  # shared until coverage adds to it (copied then)
    cover = _Coverage(topology, catalogue, constraints, tuning, resources, hosts, failed)
    uncovered = cover.run(None, catalogue.tasks)
    for tenant in sorted(topology.tenants.values(), key=lambda t: t.name):
        if tenant.nodes == ("*",):
            continue  # the whole mesh: covered above
        tasks = tuple(t for t in catalogue.tasks if tenant.may_run(t))
        scope = frozenset(n for n in topology.nodes if tenant.may_use(n))
        uncovered += cover.run(scope, tasks, tenant=tenant.name)
    return BasePlan(hosts, tuple(uncovered),
                    _unplaced(topology, catalogue, constraints, resources, hosts))


class _Coverage:
    """Rules 2 and 3: a host of every task on every entry node's path, bottom-up."""

    def __init__(self, topology: Topology, catalogue: Catalogue, constraints: Constraints,
                 tuning: Tuning, resources: dict[str, NodeResources], hosts: Hosts,
                 failed: Mapping[str, frozenset[str]]) -> None:
        self.topology = topology
        self.catalogue = catalogue
        self.constraints = constraints
        self.tuning = tuning
        self.resources = resources
        self.hosts = hosts
        self.failed = failed
        self.owned: set[str] = set()  # nodes whose hosts dict is their own (copied on write)
        self.order = sorted(topology.nodes, key=lambda n: (-topology.depth.get(n, 0), n))
        self.entries = frozenset(entry_nodes(topology))
        self._tasks_of: dict[int, frozenset[str]] = {}

    def _tasks_hosted(self, node: str) -> frozenset[str]:
        chosen = self.hosts[node]
        found = self._tasks_of.get(id(chosen)) if node not in self.owned else None
        if found is None:
            variants = self.catalogue.variants
            found = frozenset(variants[v].task for v in chosen if v in variants)
            if node not in self.owned:
                self._tasks_of[id(chosen)] = found
        return found

    def _free(self, node: str) -> _Fill:
        res = self.resources[self.topology.nodes[node].hardware]
        fill = _Fill(float(res.memory_bytes), float(res.accelerator_bytes), self.catalogue)
        for name in sorted(self.hosts[node]):
            o = self.catalogue.option(name, res.profile_key)
            if o is not None:
                fill.take(o, res, hosted=True)
        return fill

    def _smallest(self, node: str, task: str) -> Option | None:
        res = self.resources[self.topology.nodes[node].hardware]
        key = res.profile_key
        usable = _usable(task, key, res, self.constraints.rule(node),
                         self.failed.get(node, frozenset()), self.catalogue)
        in_front = {o.name for o in self.catalogue.front_among(task, key, usable)}
        fill = self._free(node)
        # The node's front first (a dominated variant only when nothing better fits), then
        # smallest.
        for o in sorted((o for o in self.catalogue.options(task, key) if o.name in usable),
                        key=lambda o: (o.name not in in_front, o.memory_bytes, o.name)):
            if fill.take(o, res):
                return o
        return None

    def run(self, scope: frozenset[str] | None, tasks: tuple[str, ...], *,
            tenant: str | None = None) -> list[tuple[str, str, str]]:
        """Place what is missing; return (entry, task, reason) for what cannot be placed."""
        if not tasks:
            return []
        children, parent = self.topology.children, self.topology.parent
        # Top-down first: the tasks hosted on each node or above it (in scope).
        above: dict[str, frozenset[str]] = {}
        for node in reversed(self.order):
            up = parent.get(node)
            have = above[up] if up is not None else frozenset()
            if scope is None or node in scope:
                mine = self._tasks_hosted(node)
                if not mine <= have:
                    have = have | mine
            above[node] = have
        # node -> task -> (an entry below still missing it, how many such entries)
        carried: dict[str, dict[str, tuple[str, int]]] = {}
        uncovered: list[tuple[str, str, str]] = []
        for node in self.order:
            inside = scope is None or node in scope
            needs: dict[str, tuple[str, int]] = {}
            if node in self.entries and inside:
                needs = {t: (node, 1) for t in tasks if t not in above[node]}
            for child in children[node]:
                for task, (entry, count) in carried.pop(child, {}).items():
                    was = needs.get(task)
                    needs[task] = (entry, count) if was is None else (min(was[0], entry),
                                                                      was[1] + count)
            if needs and inside:
                for task in self._tasks_hosted(node):
                    needs.pop(task, None)
                for task in sorted(needs):
                    o = self._smallest(node, task)
                    if o is None:
                        continue
                    if node not in self.owned:
                        self.hosts[node] = dict(self.hosts[node])
                        self.owned.add(node)
                    who = f" for tenant {tenant}" if tenant else ""
                    self.hosts[node][o.name] = (Cause.COVERAGE, (
                        f"coverage{who}: {task} had no host on the path from "
                        f"{_entries(*needs[task])} up; {node} is the lowest node on it with room "
                        f"({o.describe()})"))
                    del needs[task]
            if parent.get(node) is None:
                for task, (entry, count) in sorted(needs.items()):
                    who = f" within tenant {tenant}'s nodes" if tenant else ""
                    uncovered.append((entry, task, (
                        f"no node on the path from {_entries(entry, count)} to {node}{who} may "
                        f"host a variant of {task} and has memory for one")))
            elif needs:
                carried[node] = needs
        return uncovered


def _entries(entry: str, count: int) -> str:
    return entry if count == 1 else f"{entry} (and {count - 1} other entry node(s))"


def _unplaced(topology: Topology, catalogue: Catalogue, constraints: Constraints,
              resources: dict[str, NodeResources], hosts: Hosts) -> dict[str, str]:
    placed = {v for chosen in hosts.values() for v in chosen}
    missing = sorted(set(catalogue.variants) - placed)
    if not missing:
        return {}
    keys = sorted({r.profile_key for r in resources.values()})
    rules = {id(r): r for r in constraints.rules.values()}.values()
    biggest = max(r.memory_bytes for r in resources.values())
    out: dict[str, str] = {}
    for name in missing:
        keyed = [(k, o) for k in keys if (o := catalogue.option(name, k)) is not None]
        options = [o for _, o in keyed]
        if not options:
            out[name] = f"no latency profile for this mesh's hardware ({', '.join(keys)})"
        elif not any(r.permits(name, options[0].variant.base) for r in rules):
            out[name] = "no node's allow/deny lists let it in"
        elif all(o.dominated_by for o in options):
            key, o = keyed[0]
            out[name] = (f"dominated by {o.dominated_by} on {key} (as accurate, as fast and as "
                         "small or better), and the core has no accelerator to keep it")
        elif min(o.memory_bytes for o in options) > biggest:
            out[name] = (f"needs {min(o.memory_bytes for o in options) / MIB:.0f} MB, more than "
                         f"any node's {biggest / MIB:.0f} MB for models")
        else:
            out[name] = "no node it may run on has room for it in its base share of memory"
    return out
