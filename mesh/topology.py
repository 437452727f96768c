"""Topology files -> a validated, immutable :class:`Topology`.

A topology file (YAML) describes hardware classes, nodes and links::

    name: local
    hardware:
      edge-cpu: {kind: cpu, threads: 1, memory_mb: 1024, cost_per_hour: 0.02}
    nodes:
      - {name: edge-1, tier: edge, hardware: edge-cpu, variants: ["digits-linear"]}
    links:
      - {between: [edge-1, mid-1], latency_ms: 2, bandwidth_mbps: 100}

Loading validates every field and every cross-reference and reports each
problem by key path (``links[2].latency_ms: must be >= 0``) in one
:class:`~mesh.errors.TopologyError`. Nothing here does I/O except
:func:`load_topology`, which reads the file.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mesh.errors import TopologyError

__all__ = [
    "TIERS",
    "HardwareClass",
    "Node",
    "Link",
    "Path_",
    "Topology",
    "load_topology",
    "parse_topology",
]

TIERS: tuple[str, ...] = ("edge", "intermediate", "core")
Tier = Literal["edge", "intermediate", "core"]

# --------------------------------------------------------------------------- schema


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HardwareClass(_Schema):
    """A kind of machine. ``threads`` is what one node agent may use for compute."""

    kind: Literal["cpu", "cuda"] = "cpu"
    threads: int = Field(1, ge=1, le=256)
    memory_mb: int = Field(1024, ge=64)
    cost_per_hour: float = Field(0.0, ge=0)

    @property
    def profile_key(self) -> str:
        """The key under which variant latencies for this class are stored."""
        return f"{self.kind}-{self.threads}t"


class Node(_Schema):
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    tier: Tier
    hardware: str
    variants: tuple[str, ...] = ()
    max_queue: int = Field(256, ge=1)

    def allows(self, variant: str) -> bool:
        """Whether this node may host ``variant`` (entries may be glob patterns)."""
        return any(fnmatch.fnmatchcase(variant, pattern) for pattern in self.variants)


class Link(_Schema):
    between: tuple[str, str]
    latency_ms: float = Field(ge=0, le=60_000)
    bandwidth_mbps: float = Field(gt=0)
    loss: float = Field(0.0, ge=0, le=1)


class _TopologyFile(_Schema):
    name: str = Field(min_length=1)
    hardware: dict[str, HardwareClass] = Field(min_length=1)
    nodes: list[Node] = Field(min_length=1)
    links: list[Link] = []


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class Path_:
    """The cost of a path between two nodes (one way)."""

    hops: tuple[str, ...]
    latency_ms: float
    bottleneck_mbps: float

    def transfer_ms(self, payload_bytes: int) -> float:
        """Serialisation time of ``payload_bytes`` over the bottleneck link."""
        if payload_bytes <= 0 or math.isinf(self.bottleneck_mbps):
            return 0.0
        return payload_bytes * 8 / (self.bottleneck_mbps * 1000.0)


class Topology:
    """A validated mesh description with path costs. Immutable after construction."""

    def __init__(self, name: str, hardware: dict[str, HardwareClass], nodes: list[Node],
                 links: list[Link]) -> None:
        self.name = name
        self.hardware = dict(hardware)
        self.nodes: dict[str, Node] = {n.name: n for n in nodes}
        self.links = tuple(links)
        graph = nx.Graph()
        graph.add_nodes_from(self.nodes)
        for link in links:
            a, b = link.between
            graph.add_edge(a, b, latency_ms=link.latency_ms, bandwidth_mbps=link.bandwidth_mbps,
                           link=link)
        self.graph = graph
        self._paths: dict[str, dict[str, Path_]] = {}

    def hardware_of(self, node: str) -> HardwareClass:
        return self.hardware[self.nodes[node].hardware]

    def link(self, a: str, b: str) -> Link:
        return self.graph.edges[a, b]["link"]

    def neighbours(self, node: str) -> list[str]:
        return sorted(self.graph.neighbors(node))

    def paths_from(self, source: str) -> dict[str, Path_]:
        """Lowest-latency path from ``source`` to every reachable node (cached)."""
        cached = self._paths.get(source)
        if cached is not None:
            return cached
        _, routes = nx.single_source_dijkstra(self.graph, source, weight="latency_ms")
        out: dict[str, Path_] = {}
        for target, hops in routes.items():
            latency = 0.0
            bottleneck = math.inf
            for a, b in zip(hops, hops[1:], strict=False):
                edge = self.graph.edges[a, b]
                latency += edge["latency_ms"]
                bottleneck = min(bottleneck, edge["bandwidth_mbps"])
            out[target] = Path_(tuple(hops), latency, bottleneck)
        self._paths[source] = out
        return out

    def path(self, source: str, target: str) -> Path_ | None:
        return self.paths_from(source).get(target)

    def next_hop(self, source: str, target: str) -> str | None:
        path = self.path(source, target)
        return path.hops[1] if path is not None and len(path.hops) > 1 else None

    def unreachable(self) -> list[str]:
        """Nodes not connected to the largest component of the mesh."""
        if not self.nodes:
            return []
        main = max(nx.connected_components(self.graph), key=len)
        return sorted(set(self.nodes) - main)

    def summary(self) -> dict[str, Any]:
        per_tier = {t: sum(1 for n in self.nodes.values() if n.tier == t) for t in TIERS}
        latencies = [
            p.latency_ms
            for src in self.nodes
            for dst, p in self.paths_from(src).items()
            if dst != src
        ]
        return {
            "name": self.name,
            "nodes": len(self.nodes),
            "links": len(self.links),
            "nodes_per_tier": per_tier,
            "path_latency_ms": {"min": min(latencies, default=0.0),
                                "max": max(latencies, default=0.0)},
            "unreachable": self.unreachable(),
        }


# --------------------------------------------------------------------------- loading


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _message(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    kind = err["type"]
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
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {err.get('input')!r}"
    if kind == "string_pattern_mismatch":
        return "must be lower-case letters, digits and '-' (a DNS label)"
    msg = str(err["msg"])
    return msg[0].lower() + msg[1:]


def parse_topology(data: Any, *, source: str = "topology") -> Topology:
    """Validate a parsed YAML document; raise :class:`TopologyError` listing every problem."""
    if not isinstance(data, dict):
        raise TopologyError(source, ["(top level): must be a mapping with name, hardware, nodes"])
    try:
        spec = _TopologyFile.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = err["loc"]
            # pydantic reports dict keys of `hardware` as part of the path; keep them.
            errors.append(f"{_key_path(loc)}: {_message(dict(err))}")
        raise TopologyError(source, errors) from None

    errors: list[str] = []
    seen: dict[str, int] = {}
    for i, node in enumerate(spec.nodes):
        if node.name in seen:
            errors.append(f"nodes[{i}].name: {node.name!r} is already used by nodes[{seen[node.name]}]")
        seen.setdefault(node.name, i)
        if node.hardware not in spec.hardware:
            errors.append(
                f"nodes[{i}].hardware: {node.hardware!r} is not defined under hardware "
                f"(known: {sorted(spec.hardware)})"
            )
    pairs: dict[frozenset[str], int] = {}
    for i, link in enumerate(spec.links):
        a, b = link.between
        for j, end in enumerate((a, b)):
            if end not in seen:
                errors.append(f"links[{i}].between[{j}]: unknown node {end!r}")
        if a == b:
            errors.append(f"links[{i}].between: a link cannot join {a!r} to itself")
        key = frozenset((a, b))
        if key in pairs:
            errors.append(f"links[{i}].between: duplicates links[{pairs[key]}]")
        pairs.setdefault(key, i)
    if errors:
        raise TopologyError(source, errors)
    return Topology(spec.name, spec.hardware, spec.nodes, spec.links)


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
