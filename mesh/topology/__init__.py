"""Topology files -> a validated, immutable :class:`Topology`.

A topology file (YAML; the full schema is in ``docs/topology.md``) describes
tiers, hardware classes, nodes (or ``groups`` of identical nodes expanded at
load time), links, tenants and membership timing::

    name: local
    hardware:
      edge-cpu: {kind: cpu, threads: 1, memory_mb: 1024, cost_per_hour: 0.02, power_w: 8}
    nodes:
      - {name: edge-1, tier: edge, hardware: edge-cpu, variants: ["digits-linear"]}
    links:
      - {between: [edge-1, mid-1], latency_ms: 2, bandwidth_mbps: 100}

Loading validates every field and every cross-reference and reports each
problem by key path (``links[2].latency_ms: must be >= 0``) in one
:class:`~mesh.errors.TopologyError`. Nothing here does I/O except
:func:`load_topology`, which reads the file.
"""

from mesh.topology.load import load_topology, parse_topology, without_variants
from mesh.topology.model import Path_, Topology
from mesh.topology.schema import (
    TIER_RANK,
    TIERS,
    Accelerator,
    Group,
    HardwareClass,
    Link,
    MembershipSpec,
    Node,
    NodeAddress,
    PlacementSpec,
    Tenant,
    TierSpec,
)

__all__ = [
    "TIERS",
    "TIER_RANK",
    "Accelerator",
    "Group",
    "HardwareClass",
    "Link",
    "MembershipSpec",
    "PlacementSpec",
    "Node",
    "NodeAddress",
    "Path_",
    "Tenant",
    "TierSpec",
    "Topology",
    "load_topology",
    "parse_topology",
    "without_variants",
]
