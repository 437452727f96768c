"""The CPUs nodes really have, and which machine they share: what caps compute workers.

A hardware class declares ``cores``; the node measures what its process may
really use (its CPU affinity, capped by a cgroup quota) and an identity of
the machine (kernel) it runs on, and reports both in its part of the
:class:`~mesh.placement.inputs.LoadReport` (:class:`Machine`). Nodes that
report one ``host`` share its CPUs: several local nodes on one laptop, or
containers on one server.

:class:`CpuBudget` is one round's account of them:

* a node runs at most ``min(cores, cpus) // threads`` workers at once
  (:meth:`CpuBudget.slots`);
* the workers that scaling places on all the nodes of one host together stay
  within the host's CPUs: a worker beyond a variant's first counts always, a
  variant's first worker only while the variant carries load (an idle
  variant's one worker is a parked session, not a CPU). Every hosted variant
  keeps its one worker whatever the budget (it cannot be served with none),
  so a host whose busy variants outnumber its CPUs is *over* it: scaling adds
  no worker there, and a replica goes to another host.

A node that reported no machine (an older node, or none yet) is unknown: its
declared class is trusted, as before. Pure: the numbers come in; the
measuring is the node's (:mod:`nodes.machine`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mesh.placement.resources import NodeResources

__all__ = ["Machine", "CpuBudget", "node_slots"]


def node_slots(res: NodeResources, machine: Machine | None) -> int:
    """Compute workers a node runs at once: its class's ``cores // threads``, capped by the
    CPUs it really has (``machine``; None: the class is trusted). At least one."""
    if machine is None:
        return res.slots
    return max(1, min(res.slots, math.floor(machine.cpus / res.threads + 1e-9)))


@dataclass(frozen=True, slots=True)
class Machine:
    """What a node measured about the machine it runs on.

    ``cpus``: the CPUs its process may use (fractional under a cgroup quota);
    ``host``: equal for every node process on one machine, different between
    machines (a hash, never the hostname itself).
    """

    cpus: float
    host: str

    def __post_init__(self) -> None:
        if not math.isfinite(self.cpus) or self.cpus <= 0:
            raise ValueError(f"Machine.cpus: must be a finite number > 0, got {self.cpus!r}")
        if not isinstance(self.host, str) or not 0 < len(self.host) <= 64:
            raise ValueError("Machine.host: must be a non-empty string of at most 64 characters")

    def to_wire(self) -> list[float | str]:
        return [round(self.cpus, 3), self.host]

    @classmethod
    def from_wire(cls, obj: object, *, where: str) -> Machine:
        """From :meth:`to_wire`'s ``[cpus, host]``; raises ``ValueError`` naming ``where``."""
        if (not isinstance(obj, list) or len(obj) != 2 or isinstance(obj[0], bool)
                or not isinstance(obj[0], int | float) or not isinstance(obj[1], str)):
            raise ValueError(f"{where}: must be [cpus, host]")
        try:
            return cls(float(obj[0]), obj[1])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None


class CpuBudget:
    """One round's CPU account per host. Pure; built by the ladder each round.

    ``hosted``: node -> {variant: workers} as the round starts; ``busy``: the
    (node, variant) pairs that carry load now or soon.
    """

    def __init__(self, resources: Mapping[str, NodeResources],
                 machines: Mapping[str, Machine], hosted: Mapping[str, Mapping[str, int]],
                 busy: Iterable[tuple[str, str]]) -> None:
        self.resources, self.machines = resources, machines
        self._busy = set(busy)
        self.nodes_of: dict[str, list[str]] = defaultdict(list)
        for node, machine in sorted(machines.items()):
            if node in resources:
                self.nodes_of[machine.host].append(node)
        #: host -> its CPUs: the most any of its nodes may use (nodes confined to parts of
        #: a machine cannot tell how their parts overlap; the largest is the safe guess)
        self.cpus = {h: max(machines[n].cpus for n in ns) for h, ns in self.nodes_of.items()}
        #: (node, variant) -> workers, for the nodes of known hosts
        self._workers: dict[tuple[str, str], int] = {}
        #: host -> CPUs held by its workers (those that count, see the module docstring)
        self.used: dict[str, float] = defaultdict(float)
        for host, nodes in self.nodes_of.items():
            for node in nodes:
                for variant, workers in hosted.get(node, {}).items():
                    self._workers[(node, variant)] = workers
                    self.used[host] += (self._counted((node, variant), workers)
                                        * resources[node].threads)

    def _counted(self, pair: tuple[str, str], workers: int) -> int:
        return workers if pair in self._busy else max(workers - 1, 0)

    def host_of(self, node: str) -> str | None:
        machine = self.machines.get(node)
        return machine.host if machine is not None and node in self.resources else None

    def slots(self, node: str) -> int:
        """Workers ``node`` may run at once: its class's slots, capped by its real CPUs."""
        return node_slots(self.resources[node], self.machines.get(node))

    def most(self, pair: tuple[str, str]) -> int | None:
        """The most workers ``pair`` (hosted or not) may have, carrying load, within its
        host's CPUs; None when its node's host is unknown."""
        node = pair[0]
        host = self.host_of(node)
        if host is None:
            return None
        threads = self.resources[node].threads
        own = self._counted(pair, self._workers.get(pair, 0))
        return math.floor((self.cpus[host] - self.used[host]) / threads + own + 1e-9)

    def set(self, pair: tuple[str, str], workers: int) -> None:
        """Account a decision: ``pair`` has ``workers`` workers (0: no longer hosted); one
        that gained workers carries load from now on. Setting the same count again changes
        nothing."""
        host = self.host_of(pair[0])
        if host is None:
            return
        had = self._workers.get(pair, 0)
        before = self._counted(pair, had)
        if workers > had:
            self._busy.add(pair)  # workers are added for load
        self._workers[pair] = workers
        self.used[host] += (self._counted(pair, workers) - before) * self.resources[pair[0]].threads

    def shared(self, node: str) -> bool:
        """Whether other nodes report ``node``'s host too."""
        host = self.host_of(node)
        return host is not None and len(self.nodes_of[host]) > 1

    def same_host(self, a: str, b: str) -> bool:
        host = self.host_of(a)
        return host is not None and host == self.host_of(b)

    def describe(self, node: str) -> str:
        """``2 CPUs on host 3f2a9c1b (shared with core-1), all in use``: what ``node`` has,
        for decisions (after "edge-1 has")."""
        host = self.host_of(node)
        if host is None:
            return "an unknown host"
        others = [n for n in self.nodes_of[host] if n != node]
        shared = f" (shared with {', '.join(others)})" if others else ""
        cpus, used = self.cpus[host], self.used[host]
        busy = "all in use" if used >= cpus - 1e-9 else f"{used:g} in use"
        return f"{cpus:g} CPUs on host {host[:8]}{shared}, {busy}"
