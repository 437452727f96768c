"""The topology as a deployment runs it: every node written out, with its address.

``mesh node run`` finds a node's neighbours at their topology ``address``, so
the topology a cluster runs must give one to every node, also to the nodes a
``groups`` entry expands into (a group cannot carry per-node addresses). In
Kubernetes a node is reached through its Service, which is named like the
node: the address host is the node's name (it resolves within the
namespace, and it is the DNS name in the node's certificate), the ports are
those the topology gives or the defaults, and the node binds ``0.0.0.0``
because a pod does not own its Service's address.

:func:`cluster_document` writes that topology as a document that
:func:`~mesh.topology.parse_topology` reads back to the same nodes, links,
hardware, tenants and membership (groups written out node by node, tier
defaults and derived parents resolved into each node).
"""

from __future__ import annotations

from typing import Any

from mesh.topology import NodeAddress, Topology, parse_topology

__all__ = ["DEFAULT_HTTP_PORT", "DEFAULT_STREAM_PORT", "cluster_addresses", "cluster_document",
           "cluster_topology", "ports_of"]

#: The ports a node without an ``address`` gets (those of topologies/local.yaml's first node).
DEFAULT_HTTP_PORT = 7101
DEFAULT_STREAM_PORT = 7102
#: Inside a pod the node listens on every interface: its Service's address is not the pod's.
POD_BIND = "0.0.0.0"


def ports_of(topology: Topology, node: str) -> tuple[int, int]:
    """(http_port, stream_port): the node's own, or the defaults when it gives no address."""
    address = topology.nodes[node].address
    if address is None:
        return DEFAULT_HTTP_PORT, DEFAULT_STREAM_PORT
    return address.http_port, address.stream_port


def cluster_addresses(topology: Topology) -> dict[str, NodeAddress]:
    """Per node: its Service (host = the node's name), its ports, bound on every interface."""
    out = {}
    for name in topology.nodes:
        http_port, stream_port = ports_of(topology, name)
        out[name] = NodeAddress(host=name, http_port=http_port, stream_port=stream_port,
                                bind=POD_BIND)
    return out


def _node(topology: Topology, name: str, address: NodeAddress) -> dict[str, Any]:
    node = topology.nodes[name]
    out: dict[str, Any] = {"name": name, "tier": node.tier, "hardware": node.hardware,
                           "max_queue": node.max_queue}
    if node.variants is not None:  # the allow list (none: every variant)
        out["variants"] = list(node.variants)
    if node.deny_variants:
        out["deny_variants"] = list(node.deny_variants)
    parent = topology.parent[name]
    if parent is not None:
        out["parent"] = parent
    out["address"] = address.model_dump(mode="json", exclude_none=True)
    return out


def cluster_document(topology: Topology, addresses: dict[str, NodeAddress] | None = None
                     ) -> dict[str, Any]:
    """``topology`` as a topology file's document, every node with its address.

    ``addresses``: per node (default: :func:`cluster_addresses`, the
    Kubernetes Services). Links, hardware, tenants and membership are written
    as loaded.
    """
    addresses = addresses if addresses is not None else cluster_addresses(topology)
    doc: dict[str, Any] = {
        "name": topology.name,
        "hardware": {name: hw.model_dump(mode="json", exclude_none=True)
                     for name, hw in topology.hardware.items()},
        "nodes": [_node(topology, name, addresses[name]) for name in topology.nodes],
        "links": [link.model_dump(mode="json") for link in topology.links],
    }
    if topology.tenants:
        doc["tenants"] = [t.model_dump(mode="json") for t in topology.tenants.values()]
    doc["membership"] = topology.membership.model_dump(mode="json")
    doc["energy_cost_per_kwh"] = topology.energy_cost_per_kwh
    return doc


def cluster_topology(topology: Topology) -> Topology:
    """The topology a cluster runs (:func:`cluster_document` parsed back)."""
    return parse_topology(cluster_document(topology), source=f"{topology.name} (cluster)")
