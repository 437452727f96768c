"""Reading a topology file: validate, expand groups, resolve defaults and parents.

Every problem is reported by key path (``links[2].latency_ms: must be >= 0``)
and all of them at once, in one :class:`~mesh.errors.TopologyError`.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mesh.errors import TopologyError
from mesh.topology.model import Topology
from mesh.topology.schema import (
    TIER_RANK,
    Group,
    Link,
    Node,
    Spread,
    TopologyFile,
)

__all__ = ["parse_topology", "load_topology", "without_variants"]

DEFAULT_MAX_QUEUE = 256


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


#: The glob-list keys (allow and deny lists) and what an entry of one must be.
_GLOB_LISTS = ("variants", "deny_variants")


def _glob_message(loc: tuple[Any, ...], kind: str) -> str | None:
    """A plain message for a bad ``variants`` / ``deny_variants`` value or entry."""
    if loc and loc[-1] in _GLOB_LISTS and kind == "tuple_type":
        return (f"must be a list of variant names or globs, e.g. {loc[-1]}: [\"digits-*\"] "
                "(a single glob needs brackets too)")
    if len(loc) >= 2 and loc[-2] in _GLOB_LISTS and isinstance(loc[-1], int) and kind in (
            "string_type", "string_too_short"):
        return "must be a variant name or glob (a non-empty string)"
    return None


def _message(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    kind = err["type"]
    glob = _glob_message(tuple(err["loc"]), kind)
    if glob is not None:
        return glob
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key (check the spelling)"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}"
    if kind == "less_than":
        return f"must be < {ctx['lt']}"
    if kind in ("literal_error", "enum"):
        return f"must be one of {ctx.get('expected')}, got {err.get('input')!r}"
    if kind == "string_pattern_mismatch":
        return "must be lower-case letters, digits and '-' (a DNS label)"
    msg = str(err["msg"])
    return msg[0].lower() + msg[1:]


def _is_union_member(part: Any) -> bool:
    return isinstance(part, str) and (part == "float" or part.startswith("tuple["))


def _pydantic_errors(exc: ValidationError) -> list[str]:
    out: list[str] = []
    unions: set[str] = set()
    for err in exc.errors():
        loc = tuple(err["loc"])
        if any(_is_union_member(p) for p in loc):
            # A number-or-[low, high] field fails once per member; say it once, plainly.
            cut = next(i for i, p in enumerate(loc) if _is_union_member(p))
            where = _key_path(loc[:cut])
            if where not in unions:
                unions.add(where)
                out.append(f"{where}: must be a number or a [low, high] pair")
            continue
        out.append(f"{_key_path(loc)}: {_message(dict(err))}")
    return out


def _spread(value: Spread, index: int, size: int) -> float:
    if isinstance(value, tuple):
        low, high = value
        return low if size <= 1 else low + (high - low) * index / (size - 1)
    return float(value)


def _check_spread(value: Spread, where: str, *, low: float, high: float | None,
                  strict_low: bool = False, strict_high: bool = False) -> list[str]:
    errors = []
    for v in value if isinstance(value, tuple) else (value,):
        if v < low or (strict_low and v == low):
            errors.append(f"{where}: must be {'>' if strict_low else '>='} {low:g}, got {v:g}")
        if high is not None and (v > high or (strict_high and v == high)):
            errors.append(f"{where}: must be {'<' if strict_high else '<='} {high:g}, got {v:g}")
    return errors


def _expand_group(i: int, group: Group, known: list[str], taken: dict[str, str]
                  ) -> tuple[list[Node], list[Link], list[str]]:
    where = f"groups[{i}]"
    errors: list[str] = []
    parents: list[str] = []
    for j, pattern in enumerate(group.parents):
        matched = [n for n in known if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            errors.append(f"{where}.parents[{j}]: {pattern!r} matches no node defined before "
                          "this group")
        parents.extend(m for m in matched if m not in parents)
    if (group.count is None) == (group.per_parent is None):
        errors.append(f"{where}: give exactly one of count or per_parent")
    link = group.link
    errors += _check_spread(link.latency_ms, f"{where}.link.latency_ms", low=0, high=60_000)
    errors += _check_spread(link.bandwidth_mbps, f"{where}.link.bandwidth_mbps", low=0, high=None,
                            strict_low=True)
    errors += _check_spread(link.loss, f"{where}.link.loss", low=0, high=1, strict_high=True)
    if errors or not parents:
        return [], [], errors
    total = group.count if group.count is not None else group.per_parent * len(parents)  # type: ignore[operator]
    last = f"{group.name}-{group.start + total - 1}"
    if len(last) > 63:
        return [], [], [f"{where}.name: {last!r} would be longer than 63 characters"]
    # Replicas are shared out over the parents in contiguous blocks, in order.
    blocks = [total * k // len(parents) for k in range(len(parents) + 1)]
    nodes: list[Node] = []
    links: list[Link] = []
    for k, parent in enumerate(parents):
        size = blocks[k + 1] - blocks[k]
        for j in range(size):
            name = f"{group.name}-{group.start + blocks[k] + j}"
            if name in taken:
                errors.append(f"{where}: replica name {name!r} is already used by {taken[name]}")
                continue
            taken[name] = where
            nodes.append(Node.model_construct(
                name=name, tier=group.tier, hardware=group.hardware, variants=group.variants,
                deny_variants=group.deny_variants, max_queue=group.max_queue, parent=parent))
            links.append(Link.model_construct(
                between=(name, parent), latency_ms=_spread(link.latency_ms, j, size),
                bandwidth_mbps=_spread(link.bandwidth_mbps, j, size),
                loss=_spread(link.loss, j, size)))
    return nodes, links, errors


def _derive_parents(nodes: list[Node], links: list[Link], where_of: dict[str, str],
                    errors: list[str]) -> dict[str, str | None]:
    tier = {n.name: n.tier for n in nodes}
    adjacent: dict[str, list[tuple[float, str]]] = {n.name: [] for n in nodes}
    for link in links:
        a, b = link.between
        if a in adjacent and b in adjacent:
            adjacent[a].append((link.latency_ms, b))
            adjacent[b].append((link.latency_ms, a))
    parent: dict[str, str | None] = {}
    for node in nodes:
        if node.parent is not None:
            where = f"{where_of[node.name]}.parent"
            if node.parent not in tier:
                errors.append(f"{where}: unknown node {node.parent!r}")
            elif all(other != node.parent for _, other in adjacent[node.name]):
                errors.append(f"{where}: {node.parent!r} is not linked to {node.name!r}; "
                              "add a link or drop parent")
            elif TIER_RANK[tier[node.parent]] < TIER_RANK[node.tier]:
                errors.append(f"{where}: {node.parent!r} is in a lower tier "
                              f"({tier[node.parent]}) than {node.name!r} ({node.tier})")
            parent[node.name] = node.parent
            continue
        upstream = sorted((lat, other) for lat, other in adjacent[node.name]
                          if TIER_RANK[tier[other]] > TIER_RANK[node.tier])
        parent[node.name] = upstream[0][1] if upstream else None
    # Explicit parents in the same tier could loop.
    for start in parent:
        seen = {start}
        p = parent[start]
        while p is not None and p in parent:
            if p in seen:
                errors.append(f"{where_of[start]}.parent: the parents of {start!r} form a loop")
                break
            seen.add(p)
            p = parent[p]
    return parent


def without_variants(doc: dict[str, Any], *, deny: bool = False) -> dict[str, Any]:
    """``doc`` (a parsed topology document, changed in place) with every ``variants``
    allow list removed from tiers, nodes and groups: the same mesh, placed by the mesh
    within its deny lists only.

    Deny lists are kept: they say what a node must never host (a runtime it lacks, a
    model it may not run), which stays true whatever placement decides. ``deny=True``
    removes them too: the mesh with no globs at all.
    """
    keys = ("variants", "deny_variants") if deny else ("variants",)
    specs = [*(doc.get("tiers") or {}).values(), *(doc.get("nodes") or ()),
             *(doc.get("groups") or ())]
    for spec in specs:
        for key in keys:
            spec.pop(key, None)
    return doc


def parse_topology(data: Any, *, source: str = "topology") -> Topology:
    """Validate a parsed YAML document; raise :class:`TopologyError` listing every problem."""
    if not isinstance(data, dict):
        raise TopologyError(source, ["(top level): must be a mapping with name, hardware, nodes"])
    try:
        spec = TopologyFile.model_validate(data)
    except ValidationError as exc:
        raise TopologyError(source, _pydantic_errors(exc)) from None

    errors: list[str] = []
    if not spec.nodes and not spec.groups:
        errors.append("nodes: required, at least one node (or a group)")
    where_of: dict[str, str] = {}
    for i, node in enumerate(spec.nodes):
        if node.name in where_of:
            errors.append(f"nodes[{i}].name: {node.name!r} is already used by {where_of[node.name]}")
            continue
        where_of[node.name] = f"nodes[{i}]"
    listening: dict[tuple[str, int], str] = {}
    for i, node in enumerate(spec.nodes):
        a = node.address
        if a is None:
            continue
        if a.http_port == a.stream_port:
            errors.append(f"nodes[{i}].address: http_port and stream_port are both {a.http_port}")
        for key, port in (("http_port", a.http_port), ("stream_port", a.stream_port)):
            taken = listening.setdefault((a.host.lower(), port), f"nodes[{i}] ({node.name})")
            if taken != f"nodes[{i}] ({node.name})":
                errors.append(f"nodes[{i}].address.{key}: {a.host}:{port} is already used by "
                              f"{taken}")
    nodes = list(spec.nodes)
    links = list(spec.links)
    group_sizes: dict[str, int] = {}
    for i, group in enumerate(spec.groups):
        if group.hardware not in spec.hardware:
            errors.append(f"groups[{i}].hardware: {group.hardware!r} is not defined under hardware "
                          f"(known: {sorted(spec.hardware)})")
        g_nodes, g_links, g_errors = _expand_group(i, group, [n.name for n in nodes], where_of)
        errors += g_errors
        nodes += g_nodes
        links += g_links
        group_sizes[group.name] = len(g_nodes)
    for i, node in enumerate(spec.nodes):
        if node.hardware not in spec.hardware:
            errors.append(
                f"nodes[{i}].hardware: {node.hardware!r} is not defined under hardware "
                f"(known: {sorted(spec.hardware)})"
            )
    pairs: dict[frozenset[str], int] = {}
    for i, link in enumerate(spec.links):
        a, b = link.between
        for j, end in enumerate((a, b)):
            if end not in where_of:
                errors.append(f"links[{i}].between[{j}]: unknown node {end!r}")
        if a == b:
            errors.append(f"links[{i}].between: a link cannot join {a!r} to itself")
        key = frozenset((a, b))
        if key in pairs:
            errors.append(f"links[{i}].between: duplicates links[{pairs[key]}]")
        pairs.setdefault(key, i)
    for link in links[len(spec.links):]:
        key = frozenset(link.between)
        if key in pairs:
            a, b = link.between
            errors.append(f"{where_of[a]}: its link to {b!r} duplicates links[{pairs[key]}]")
    tenant_names: dict[str, int] = {}
    for i, tenant in enumerate(spec.tenants):
        if tenant.name in tenant_names:
            errors.append(f"tenants[{i}].name: {tenant.name!r} is already used by "
                          f"tenants[{tenant_names[tenant.name]}]")
        tenant_names.setdefault(tenant.name, i)
        for j, pattern in enumerate(tenant.nodes):
            if not any(fnmatch.fnmatchcase(n.name, pattern) for n in nodes):
                errors.append(f"tenants[{i}].nodes[{j}]: {pattern!r} matches no node")
    if errors:
        raise TopologyError(source, errors)
    parent = _derive_parents(nodes, links, where_of, errors)
    if errors:
        raise TopologyError(source, errors)
    resolved = []
    for node in nodes:
        defaults = spec.tiers.get(node.tier)
        # A node's allow and deny lists: its own (or its group's), else its tier's. None
        # (no list anywhere): no constraint of that kind. Either way placement decides.
        variants = node.variants
        if variants is None and defaults is not None and defaults.variants:
            variants = defaults.variants
        deny = node.deny_variants
        if deny is None and defaults is not None:
            deny = defaults.deny_variants
        max_queue = node.max_queue
        if max_queue is None:
            max_queue = (defaults.max_queue if defaults is not None and defaults.max_queue
                         else DEFAULT_MAX_QUEUE)
        resolved.append(Node.model_construct(name=node.name, tier=node.tier,
                                             hardware=node.hardware,
                                             variants=tuple(variants) if variants is not None
                                             else None,
                                             deny_variants=tuple(deny) if deny else None,
                                             max_queue=max_queue, parent=parent[node.name],
                                             address=node.address))
    return Topology(spec.name, dict(spec.hardware), resolved, links, tenants=list(spec.tenants),
                    membership=spec.membership, energy_cost_per_kwh=spec.energy_cost_per_kwh,
                    groups=group_sizes, placement=spec.placement,
                    operator_keys=spec.operators.keys)


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file. Raises :class:`TopologyError` on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(str(path), [f"cannot read file: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise TopologyError(str(path), [f"(YAML) {where}: {problem}"]) from None
    return parse_topology(data, source=str(path))

