"""Where each variant may be placed: a node's allow and deny globs.

A node's ``variants`` (its own, else its tier's) are an *allow list* when
given: placement chooses only among the variants they match. A node that
lists none may host any variant. ``deny_variants`` (the node's, else its
tier's) are never hosted there, whatever the allow list says. Until the
topology schema carries ``deny_variants``, deny lists can be passed in by
node name.

Nodes of one group share one :class:`HostRule`, and each rule remembers its
answers, so checking every variant on every node of a 10,000-node mesh
costs one glob match per (distinct rule, variant).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mesh.topology import Topology

__all__ = ["HostRule", "Constraints"]


@dataclass(frozen=True, slots=True)
class HostRule:
    """Allow globs (empty: everything) and deny globs (they win) of one or more nodes."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    _memo: dict[str, bool] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def permits(self, variant: str) -> bool:
        answer = self._memo.get(variant)
        if answer is None:
            answer = self.refusal(variant) is None
            self._memo[variant] = answer
        return answer

    def refusal(self, variant: str) -> str | None:
        """Why ``variant`` may not be hosted under this rule; None when it may."""
        denied = next((p for p in self.deny if fnmatch.fnmatchcase(variant, p)), None)
        if denied is not None:
            return f"denied by {denied!r}"
        if self.allow and not any(fnmatch.fnmatchcase(variant, p) for p in self.allow):
            return f"not in the allow list {list(self.allow)}"
        return None

    @property
    def key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (self.allow, self.deny)


class Constraints:
    """Each node's :class:`HostRule`, read from a topology (plus deny lists passed in)."""

    def __init__(self, topology: Topology, *,
                 deny: Mapping[str, Iterable[str]] | None = None) -> None:
        """``deny``: node name -> extra deny globs. Raises ``ValueError`` for an unknown node."""
        extra = {n: tuple(globs) for n, globs in (deny or {}).items()}
        unknown = sorted(set(extra) - set(topology.nodes))
        if unknown:
            raise ValueError(f"deny lists name nodes not in topology {topology.name!r}: {unknown}")
        interned: dict[tuple[tuple[str, ...], tuple[str, ...]], HostRule] = {}
        self.rules: dict[str, HostRule] = {}
        for name, spec in topology.nodes.items():
            # deny_variants: the schema field proposed for the topology file; read when present.
            has_field = "deny_variants" in type(spec).model_fields
            own = getattr(spec, "deny_variants", None) if has_field else None
            denied = tuple(own or ()) + extra.get(name, ())
            key = (tuple(spec.variants or ()), denied)
            rule = interned.get(key)
            if rule is None:
                rule = interned[key] = HostRule(*key)
            self.rules[name] = rule

    def rule(self, node: str) -> HostRule:
        return self.rules[node]

    def permits(self, node: str, variant: str) -> bool:
        return self.rules[node].permits(variant)
