"""The registry as placement sees it: per (task, hardware profile), each variant's measured
accuracy, latency, memory and throughput, and which variants are worth hosting at all.

A variant is *dominated* on a hardware class when another variant of its
task is as accurate (within ``accuracy_tie``: float noise),
as fast at batch 1 and as small, and better in one of them: no policy
would ever prefer it there. The rest, ordered from the lightest (least
accurate, fastest) to the heaviest, is the task's *front*
(:meth:`Catalogue.front`): placement gives the edge its lighter half and
the inner tiers the more accurate part.

What a node hosts is judged within its constraints: among the variants its
allow/deny lists permit (and its hardware runs), a variant dominated only
by one the node may not host is worth hosting there
(:meth:`Catalogue.front_among`). The globally dominated ones (the torch
originals) go only to accelerators in the core.

Everything is computed once per (task, profile key), and each node's front
once per distinct set of permitted variants, and kept; a new registry (a new
model) means a new catalogue.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mesh.placement.resources import MIB, service_ms, variant_memory_bytes
from mesh.placement.tuning import Tuning
from mesh.registry import Profile, Variant

__all__ = ["Option", "Catalogue", "fingerprint"]


@dataclass(frozen=True, slots=True)
class Option:
    """One variant on one hardware profile, with what placement needs of it."""

    variant: Variant
    profile: Profile
    memory_bytes: int
    #: latency of one query alone (batch 1), milliseconds
    latency_ms: float
    #: worker time per query at the capacity batch size, milliseconds (busy = rate x this)
    service_ms: float
    #: the variant that dominates this one here ("" when none does)
    dominated_by: str = ""

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def accuracy(self) -> float:
        return self.variant.accuracy

    def describe(self) -> str:
        return (f"accuracy {self.accuracy:.3f}, {self.latency_ms:.2f} ms at batch 1, "
                f"{self.memory_bytes / MIB:.1f} MB")


def fingerprint(variants: Iterable[Variant]) -> tuple[tuple[str, str, float, int], ...]:
    """What a catalogue depends on: a registry with the same fingerprint places the same."""
    return tuple(sorted((v.name, v.sha256, v.accuracy, len(v.profiles)) for v in variants))


def _dominates(a: Option, b: Option, tie: float) -> bool:
    """``a`` is as accurate (within ``tie``), as fast and as small as ``b``, and better in one."""
    at_least = (a.accuracy >= b.accuracy - tie and a.latency_ms <= b.latency_ms
                and a.memory_bytes <= b.memory_bytes)
    better = (a.accuracy > b.accuracy + tie or a.latency_ms < b.latency_ms
              or a.memory_bytes < b.memory_bytes)
    return at_least and better


class Catalogue:
    """Options per (task, profile key), built lazily from one registry snapshot."""

    def __init__(self, variants: Iterable[Variant], tuning: Tuning | None = None) -> None:
        self.tuning = tuning or Tuning()
        self.variants: dict[str, Variant] = {v.name: v for v in variants}
        by_task: dict[str, list[Variant]] = {}
        for v in sorted(self.variants.values(), key=lambda v: v.name):
            by_task.setdefault(v.task, []).append(v)
        self.by_task = by_task
        self.tasks: tuple[str, ...] = tuple(sorted(by_task))
        self.fingerprint = fingerprint(self.variants.values())
        #: variants with private heads on them (mesh.variants.heads)
        self.bases: frozenset[str] = frozenset(v.base for v in self.variants.values() if v.base)
        self._options: dict[tuple[str, str], tuple[Option, ...]] = {}
        self._fronts: dict[tuple[str, str, frozenset[str]], tuple[Option, ...]] = {}
        self._by_name: dict[tuple[str, str], Option] = {}

    def options(self, task: str, profile_key: str) -> tuple[Option, ...]:
        """Every variant of ``task`` with a profile for ``profile_key``'s kind, lightest first.

        Order: accuracy, then batch-1 latency, then memory, then name
        (deterministic). Dominated ones carry ``dominated_by``.
        """
        key = (task, profile_key)
        found = self._options.get(key)
        if found is not None:
            return found
        t = self.tuning
        raw: list[Option] = []
        for v in self.by_task.get(task, ()):
            profile = v.profile_for(profile_key)
            if profile is None:
                continue  # the planner cannot predict it there, so it would never be routed to
            raw.append(Option(v, profile, variant_memory_bytes(v, profile, t.size_factor),
                              profile.latency_ms(1),
                              service_ms(v, profile, capacity_batch=t.capacity_batch,
                                         batch_overhead_ms=t.batch_overhead_ms)))
        out = []
        for o in raw:
            # The best dominating option names the reason (most accurate, then fastest).
            winners = sorted((w for w in raw if _dominates(w, o, t.accuracy_tie)),
                             key=lambda w: (-w.accuracy, w.latency_ms, w.memory_bytes, w.name))
            out.append(Option(o.variant, o.profile, o.memory_bytes, o.latency_ms, o.service_ms,
                              winners[0].name if winners else ""))
        out.sort(key=lambda o: (o.accuracy, o.latency_ms, o.memory_bytes, o.name))
        found = self._options[key] = tuple(out)
        for o in found:
            self._by_name[(o.name, profile_key)] = o
        return found

    def shared_part(self, o: Option) -> tuple[str, int]:
        """The base instance ``o`` runs on, shared with the other variants on it on one node,
        and the memory of that instance (counted once per node): for a private head, its
        base (its memory is the base's plus its own); for a base with heads, itself; else
        ("", 0)."""
        v = o.variant
        if v.base:
            own = variant_memory_bytes(v, v.head_profile, self.tuning.size_factor)
            return v.base, max(o.memory_bytes - own, 0)
        if v.name in self.bases:
            return v.name, o.memory_bytes
        return "", 0

    def front(self, task: str, profile_key: str) -> tuple[Option, ...]:
        """The options of ``task`` no other option dominates, lightest first."""
        return tuple(o for o in self.options(task, profile_key) if not o.dominated_by)

    def front_among(self, task: str, profile_key: str, names: frozenset[str]
                    ) -> tuple[Option, ...]:
        """The options of ``task`` named in ``names`` that no other option *among them*
        dominates, lightest first: the front a node sees within its constraints.

        Memoised per (task, profile key, names), so nodes that share a rule share the work.
        """
        key = (task, profile_key, names)
        found = self._fronts.get(key)
        if found is None:
            among = [o for o in self.options(task, profile_key) if o.name in names]
            tie = self.tuning.accuracy_tie
            found = tuple(o for o in among if not any(_dominates(w, o, tie) for w in among))
            self._fronts[key] = found
        return found

    def option(self, variant: str, profile_key: str) -> Option | None:
        """``variant`` on ``profile_key``; None when it is unknown or has no profile there."""
        found = self._by_name.get((variant, profile_key))
        if found is not None:
            return found
        v = self.variants.get(variant)
        if v is None:
            return None
        self.options(v.task, profile_key)
        return self._by_name.get((variant, profile_key))
