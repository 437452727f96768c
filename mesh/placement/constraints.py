"""Where each variant may be placed: a node's allow and deny globs.

A node's ``variants`` (its own, else its group's, else its tier's) are its
*allow list*: placement chooses only among the variants they match; a node
with no allow list anywhere may host any variant, and an empty one none.
``deny_variants`` (resolved the same way) are never hosted there, whatever
the allow list says: deny wins. Both are constraints, not the placement:
what a node hosts is what placement computes within them
(:mod:`mesh.placement.base`). A tenant's private head on a shared base
(:mod:`mesh.variants.heads`) may go wherever its own name or its base's is
let in, and nowhere either is denied.

Nodes of one group share one :class:`HostRule`, and each rule remembers its
answers, so checking every variant on every node of a 10,000-node mesh
costs one glob match per (distinct rule, variant).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.topology import Topology
from mesh.topology.schema import host_refusal

__all__ = ["HostRule", "Constraints"]


@dataclass(frozen=True, slots=True)
class HostRule:
    """Allow globs (None: everything) and deny globs (they win) of one or more nodes."""

    allow: tuple[str, ...] | None = None
    deny: tuple[str, ...] = ()
    _memo: dict[tuple[str, str], bool] = field(default_factory=dict, compare=False, hash=False,
                                               repr=False)

    def permits(self, variant: str, base: str = "") -> bool:
        """``base``: a private head's base variant (its globs decide for the head too)."""
        answer = self._memo.get((variant, base))
        if answer is None:
            answer = self.refusal(variant, base) is None
            self._memo[(variant, base)] = answer
        return answer

    def refusal(self, variant: str, base: str = "") -> str | None:
        """Why ``variant`` may not be hosted under this rule; None when it may."""
        return host_refusal(self.allow, self.deny, variant, base)

    @property
    def key(self) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
        return (self.allow, self.deny)

    def describe(self) -> dict[str, list[str]]:
        """The globs, for status pages: ``allow`` (when there is an allow list), ``deny``."""
        out: dict[str, list[str]] = {}
        if self.allow is not None:
            out["allow"] = list(self.allow)
        if self.deny:
            out["deny"] = list(self.deny)
        return out


class Constraints:
    """Each node's :class:`HostRule`, read from a topology's ``variants`` and ``deny_variants``."""

    def __init__(self, topology: Topology) -> None:
        interned: dict[tuple[tuple[str, ...] | None, tuple[str, ...]], HostRule] = {}
        self.rules: dict[str, HostRule] = {}
        for name, spec in topology.nodes.items():
            key = (tuple(spec.variants) if spec.variants is not None else None,
                   tuple(spec.deny_variants or ()))
            rule = interned.get(key)
            if rule is None:
                rule = interned[key] = HostRule(*key)
            self.rules[name] = rule

    def rule(self, node: str) -> HostRule:
        return self.rules[node]

    def permits(self, node: str, variant: str, base: str = "") -> bool:
        return self.rules[node].permits(variant, base)
