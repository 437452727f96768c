"""Topology file -> deployment files: Kubernetes manifests and systemd units.

Pure rendering: a validated :class:`~mesh.topology.Topology` goes in, a
:class:`Rendering` (file name -> text, plus warnings) comes out; only the CLI
(``mesh deploy render``) writes files::

    from mesh.deploy import KubernetesOptions, render_kubernetes
    rendering = render_kubernetes(topology, KubernetesOptions(source="campus.yaml"))
    rendering.files["dc-1.yaml"]        # Service, StatefulSet and NetworkPolicy of dc-1

- :mod:`mesh.deploy.kubernetes`: one file per node (Service, StatefulSet for
  core and intermediate nodes, a pinned Deployment for edge nodes,
  NetworkPolicy), the topology ConfigMap and the core's PodDisruptionBudget.
- :mod:`mesh.deploy.systemd`: a unit and an environment file per node, for
  bare machines.
- :mod:`mesh.deploy.resources`: a hardware class as Kubernetes resources.
- :mod:`mesh.deploy.cluster`: the topology as the cluster runs it (every
  node's address is its Service).

A topology that cannot be expressed for the target (a node name that is not
a valid Kubernetes name, an accelerator with no known device-plugin resource)
raises :class:`~mesh.errors.TopologyError` listing every problem; nothing is
rendered.
"""

from __future__ import annotations

from mesh.deploy.cluster import cluster_document, cluster_topology
from mesh.deploy.kubernetes import KUBERNETES_VERSION, KubernetesOptions, render_kubernetes
from mesh.deploy.rendering import Rendering
from mesh.deploy.systemd import SystemdOptions, render_systemd

__all__ = [
    "KUBERNETES_VERSION",
    "KubernetesOptions",
    "Rendering",
    "SystemdOptions",
    "cluster_document",
    "cluster_topology",
    "render_kubernetes",
    "render_systemd",
]
