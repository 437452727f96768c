"""Kubernetes names and labels for a mesh's nodes.

Every object of a node is named exactly like the node (``dc-1``: its
Service, its StatefulSet or Deployment, its NetworkPolicy), because the
Service name is the host its neighbours dial and the DNS name in its
certificate. Names are never rewritten: a rewritten name would no longer
match the certificate, and two nodes could map to one name. A node whose
name Kubernetes cannot take is an error that names it and says what to
change.
"""

from __future__ import annotations

import re

from mesh.topology import Topology

__all__ = ["LABEL_MESH", "LABEL_NODE", "LABEL_TIER", "MAX_STATEFULSET_NAME", "labels", "problems",
           "secret_name"]

LABEL_MESH = "tiermesh.io/mesh"
LABEL_NODE = "tiermesh.io/node"
LABEL_TIER = "tiermesh.io/tier"

#: A Service name is a DNS-1035 label: it must start with a letter.
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
#: A StatefulSet's pods carry ``controller-revision-hash: <name>-<10 characters>``, a label
#: value of at most 63 characters, so a longer StatefulSet name never gets its pod.
MAX_STATEFULSET_NAME = 52


def secret_name(node: str) -> str:
    """The Secret holding ``node``'s TLS files (``ca.pem``, ``node.pem``, ``node-key.pem``)."""
    return f"tiermesh-certs-{node}"


def labels(mesh: str, node: str | None = None, tier: str | None = None) -> dict[str, str]:
    out = {"app.kubernetes.io/name": "tiermesh", LABEL_MESH: mesh}
    if tier is not None:
        out[LABEL_TIER] = tier
    if node is not None:
        out[LABEL_NODE] = node
    return out


def problems(topology: Topology, stateful_tiers: frozenset[str]) -> list[str]:
    """Why ``topology``'s names cannot be Kubernetes names (empty when they can)."""
    out = []
    if len(topology.name) > 63 or not _LABEL_VALUE.match(topology.name):
        out.append(f"name: {topology.name!r} cannot be a Kubernetes label value (at most 63 "
                   "letters, digits, '-', '_' or '.', starting and ending with a letter or digit)")
    for name, node in topology.nodes.items():
        if not _DNS_1035.match(name):
            out.append(f"nodes.{name}: a Kubernetes Service name must start with a letter; "
                       f"rename the node (for example 'n{name}')")
        if node.tier in stateful_tiers and len(name) > MAX_STATEFULSET_NAME:
            out.append(f"nodes.{name}: a {node.tier} node runs as a StatefulSet, whose name "
                       f"may have at most {MAX_STATEFULSET_NAME} characters ({len(name)} here); "
                       "shorten the node's name")
    return out
