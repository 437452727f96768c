"""Kubernetes manifests for a mesh, rendered from its topology.

What each node gets (one file, ``<node>.yaml``; every object named like the node):

- a **Service** with the node's HTTP and stream ports (its ``address`` ports,
  or 7101/7102), Prometheus scrape annotations, and
  ``publishNotReadyAddresses``: the mesh's own membership decides whether a
  neighbour is up, and a core that reloads after a model was added must stay
  reachable for its children;
- core and intermediate nodes: a **StatefulSet** of one pod (stable name, a
  volume claim for the home at ``/var/lib/tiermesh``, which on the core holds
  the mesh's registry); edge nodes: a **Deployment** of one pod pinned by
  node affinity to the machine labelled ``tiermesh.io/node=<node>``,
  tolerating the taints of k3s/KubeEdge edge machines, with the home in an
  ``emptyDir`` (an edge home is a cache of what its parent serves; after a
  restart the node pulls and verifies it again). ``deploy/README.md`` says why;
- CPU, memory and ``nvidia.com/gpu`` from its hardware class
  (:mod:`mesh.deploy.resources`); the CUDA image for accelerator classes;
- its TLS files from the Secret ``tiermesh-certs-<node>``, which the user
  creates from ``mesh certs issue`` (``create-secrets.sh``; keys never go in
  a manifest);
- probes: readiness ``GET /healthz`` (200 only when the variants the node
  hosts are loaded), liveness ``GET /livez``, and a startup probe that gives
  a node time to load and profile before liveness counts; all over HTTPS
  (a caller without a certificate is a client, :mod:`mesh.certs`);
- a **NetworkPolicy**: only the node's topology neighbours reach its stream
  port; its HTTP port (clients, metrics, the node's own certificate checks)
  stays open.

Shared (``00-mesh.yaml``): the topology ConfigMap (:mod:`mesh.deploy.cluster`:
every node written out with its Service as address) and a
PodDisruptionBudget that lets voluntary disruptions (drains) take at most one
core node at a time.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from mesh.deploy.cluster import cluster_document, ports_of
from mesh.deploy.names import LABEL_MESH, LABEL_NODE, LABEL_TIER, labels, problems, secret_name
from mesh.deploy.rendering import Rendering, header, yaml_documents, yaml_text
from mesh.deploy.resources import GPU_RESOURCE, KubernetesResources, kubernetes_resources
from mesh.errors import TopologyError
from mesh.topology import Topology

__all__ = ["KUBERNETES_VERSION", "KubernetesOptions", "render_kubernetes"]

#: The Kubernetes version the manifests are written for and validated against (tests).
KUBERNETES_VERSION = "1.32"
#: Nodes of these tiers run as StatefulSets (a persistent home); edge nodes as pinned Deployments.
STATEFUL_TIERS = frozenset({"core", "intermediate"})
CONFIGMAP = "tiermesh-topology"
TOPOLOGY_KEY = "topology.yaml"
TOPOLOGY_PATH = "/etc/tiermesh/topology.yaml"
HOME = "/var/lib/tiermesh"
TLS_DIR = "/etc/tiermesh/tls"
#: The image's ``tiermesh`` user (deploy/Containerfile).
UID = 10001
#: Tolerated on edge machines: KubeEdge's edge role taint, and an edge machine losing its
#: link to the control plane (the pod is pinned there: evicting it cannot move it anywhere).
EDGE_TOLERATIONS: tuple[dict[str, str], ...] = (
    {"key": "node-role.kubernetes.io/edge", "operator": "Exists"},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
)
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


@dataclass(frozen=True)
class KubernetesOptions:
    """How to render. ``source``: what the header names as the topology file."""

    source: str = "topology"
    image: str = "tiermesh:0.1.0"
    #: The image for accelerator classes; default: ``image`` with ``-cuda`` after its tag.
    cuda_image: str | None = None
    #: Size of the home volume of core and intermediate nodes.
    home_size: str = "10Gi"
    #: StorageClass of the home volumes; None: the cluster's default.
    storage_class: str | None = None

    def __post_init__(self) -> None:
        if not _QUANTITY.match(self.home_size):
            raise ValueError(f"home size: {self.home_size!r} is not a Kubernetes quantity "
                             "(for example 10Gi or 500Mi)")
        for what, image in (("image", self.image), ("cuda image", self.cuda_image)):
            if image is not None and (not image or any(c.isspace() for c in image)):
                raise ValueError(f"{what}: {image!r} is not an image reference")

    @property
    def accelerated_image(self) -> str:
        if self.cuda_image is not None:
            return self.cuda_image
        name, _, tag = self.image.rpartition(":")
        if not name or "/" in tag:  # no tag given (a ':' of a registry port is not a tag)
            return f"{self.image}:latest-cuda"
        return f"{name}:{tag}-cuda"


def render_kubernetes(topology: Topology, options: KubernetesOptions | None = None) -> Rendering:
    """Every manifest of ``topology``; :class:`TopologyError` when Kubernetes cannot express it."""
    options = options or KubernetesOptions()
    errors = problems(topology, STATEFUL_TIERS)
    resources: dict[str, KubernetesResources] = {}
    for name in sorted({n.hardware for n in topology.nodes.values()}):
        found = kubernetes_resources(name, topology.hardware[name])
        if isinstance(found, list):
            errors += found
        else:
            resources[name] = found
    if errors:
        raise TopologyError(f"{options.source} (target kubernetes)", errors)

    topology_text = (
        header(options.source, topology.name,
               "The topology as the cluster runs it: every node written out, its address its "
               "Service.")
        + yaml_text(cluster_document(topology)))
    digest = hashlib.sha256(topology_text.encode()).hexdigest()[:16]
    mesh = topology.name
    files = {"00-mesh.yaml": header(options.source, topology.name) + yaml_documents(
        [_configmap(mesh, topology_text), *_core_budget(topology)])}
    for name, node in topology.nodes.items():
        res = resources[node.hardware]
        http_port, stream_port = ports_of(topology, name)
        note = (f"Node {name}: {node.tier} tier, hardware {node.hardware} "
                f"({res.cpu} CPU, {res.memory_mb} MiB"
                + (f", {res.gpus} GPU" if res.gpus else "") + ").")
        workload = (_statefulset if node.tier in STATEFUL_TIERS else _edge_deployment)(
            topology, name, res, options, digest)
        files[f"{name}.yaml"] = header(options.source, mesh, note) + yaml_documents([
            _service(mesh, name, node.tier, http_port, stream_port),
            workload,
            _network_policy(mesh, name, topology.neighbours(name), http_port, stream_port),
        ])
    files["create-secrets.sh"] = _secrets_script(topology, options.source)
    return Rendering(files=files, executable=frozenset({"create-secrets.sh"}))


# ---------------------------------------------------------------------- shared objects
def _configmap(mesh: str, topology_text: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": CONFIGMAP, "labels": labels(mesh)},
            "data": {TOPOLOGY_KEY: topology_text}}


def _core_budget(topology: Topology) -> list[dict[str, Any]]:
    if not topology.nodes_in_tier("core"):
        return []
    return [{"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
             "metadata": {"name": "tiermesh-core", "labels": labels(topology.name, tier="core")},
             "spec": {"maxUnavailable": 1,
                      "selector": {"matchLabels": {LABEL_MESH: topology.name,
                                                   LABEL_TIER: "core"}}}}]


# ---------------------------------------------------------------------- per node
def _selector(mesh: str, node: str) -> dict[str, str]:
    return {LABEL_MESH: mesh, LABEL_NODE: node}


def _service(mesh: str, node: str, tier: str, http_port: int, stream_port: int
             ) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": node, "labels": labels(mesh, node, tier),
            # Every port speaks TLS with a certificate of the mesh CA: a scraper trusts that CA.
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/scheme": "https",
                            "prometheus.io/port": str(http_port),
                            "prometheus.io/path": "/metrics"}},
        "spec": {
            "selector": _selector(mesh, node),
            "publishNotReadyAddresses": True,
            "ports": [{"name": "http", "port": http_port, "targetPort": "http", "protocol": "TCP"},
                      {"name": "stream", "port": stream_port, "targetPort": "stream",
                       "protocol": "TCP"}]},
    }


def _probe(path: str, *, period_s: int, failures: int) -> dict[str, Any]:
    # HTTPS without a client certificate: the node's ports take callers without one as
    # clients (mesh.certs), and kubelet does not verify the node's certificate.
    return {"httpGet": {"path": path, "port": "http", "scheme": "HTTPS"},
            "periodSeconds": period_s, "timeoutSeconds": 5, "failureThreshold": failures}


def _pod(topology: Topology, node: str, res: KubernetesResources, options: KubernetesOptions,
         digest: str, volumes: list[dict[str, Any]]) -> dict[str, Any]:
    spec = topology.nodes[node]
    http_port, stream_port = ports_of(topology, node)
    container = {
        "name": "node",
        "image": options.accelerated_image if res.accelerated else options.image,
        "command": ["mesh", "--home", HOME, "node", "run", TOPOLOGY_PATH, node,
                    "--tls-dir", TLS_DIR],
        "ports": [{"name": "http", "containerPort": http_port, "protocol": "TCP"},
                  {"name": "stream", "containerPort": stream_port, "protocol": "TCP"}],
        "resources": res.as_manifest(),
        # Loading and profiling the hosted variants comes before the node answers at all.
        "startupProbe": _probe("/livez", period_s=5, failures=120),
        "livenessProbe": _probe("/livez", period_s=10, failures=3),
        "readinessProbe": _probe("/healthz", period_s=5, failures=2),
        "volumeMounts": [
            {"name": "home", "mountPath": HOME},
            {"name": "topology", "mountPath": TOPOLOGY_PATH, "subPath": TOPOLOGY_KEY,
             "readOnly": True},
            {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}],
        "securityContext": {"allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
    }
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        # One Service per node would put ~7 variables per node of the mesh into every pod.
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "fsGroup": UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": [
            *volumes,
            {"name": "topology", "configMap": {"name": CONFIGMAP}},
            # group-readable: the files belong to root, the pod's fsGroup is the node's user
            {"name": "tls", "secret": {"secretName": secret_name(node), "defaultMode": 0o440}}],
    }
    tolerations = []
    if spec.tier not in STATEFUL_TIERS:
        pod["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": LABEL_NODE, "operator": "In", "values": [node]}]}]}}}
        tolerations += [dict(t) for t in EDGE_TOLERATIONS]
    if res.accelerated:
        tolerations.append(dict(GPU_TOLERATION))
    if tolerations:
        pod["tolerations"] = tolerations
    return {"metadata": {"labels": labels(topology.name, node, spec.tier),
                         # a changed topology restarts the pods on the next apply
                         "annotations": {"tiermesh.io/topology-sha256": digest}},
            "spec": pod}


def _statefulset(topology: Topology, node: str, res: KubernetesResources,
                 options: KubernetesOptions, digest: str) -> dict[str, Any]:
    claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                             "resources": {"requests": {"storage": options.home_size}}}
    if options.storage_class is not None:
        claim["storageClassName"] = options.storage_class
    tier = topology.nodes[node].tier
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": node, "labels": labels(topology.name, node, tier)},
        "spec": {
            "serviceName": node,
            "replicas": 1,
            "selector": {"matchLabels": _selector(topology.name, node)},
            "template": _pod(topology, node, res, options, digest, []),
            "volumeClaimTemplates": [{"metadata": {"name": "home"}, "spec": claim}],
            # The core's home is the mesh's registry: deleting the StatefulSet keeps it.
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain",
                                                     "whenScaled": "Retain"},
        },
    }


def _edge_deployment(topology: Topology, node: str, res: KubernetesResources,
                     options: KubernetesOptions, digest: str) -> dict[str, Any]:
    tier = topology.nodes[node].tier
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": node, "labels": labels(topology.name, node, tier)},
        "spec": {
            "replicas": 1,
            # never two pods of one node (one identity, one certificate) at a time
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": _selector(topology.name, node)},
            "template": _pod(topology, node, res, options, digest,
                             [{"name": "home", "emptyDir": {}}]),
        },
    }


def _network_policy(mesh: str, node: str, neighbours: list[str], http_port: int,
                    stream_port: int) -> dict[str, Any]:
    ingress: list[dict[str, Any]] = [{"ports": [{"protocol": "TCP", "port": http_port}]}]
    if neighbours:  # an isolated node's stream port takes nobody
        ingress.append({
            "from": [{"podSelector": {
                "matchLabels": {LABEL_MESH: mesh},
                "matchExpressions": [{"key": LABEL_NODE, "operator": "In",
                                      "values": list(neighbours)}]}}],
            "ports": [{"protocol": "TCP", "port": stream_port}]})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": node, "labels": labels(mesh, node)},
        "spec": {"podSelector": {"matchLabels": _selector(mesh, node)},
                 "policyTypes": ["Ingress"], "ingress": ingress},
    }


def _secrets_script(topology: Topology, source: str) -> str:
    nodes = " \\\n    ".join(topology.nodes)
    return f"""#!/bin/sh
{header(source, topology.name).rstrip()}
#
# Creates (or updates) the Secret tiermesh-certs-NODE that each node's pod mounts at
# {TLS_DIR}: ca.pem, node.pem, node-key.pem, as `mesh certs issue` writes them.
#
#   mesh certs init --dir certs          # once: the mesh CA
#   TOPOLOGY={source} NAMESPACE=tiermesh sh create-secrets.sh certs
#
# With TOPOLOGY set, a node's missing certificate is issued first (mesh certs issue).
# kubectl apply -f on this folder skips this file (not YAML); keys never go in a manifest.
set -eu
certs=${{1:-certs}}
for node in \\
    {nodes}
do
    if [ ! -f "$certs/$node/node.pem" ] && [ -n "${{TOPOLOGY:-}}" ]; then
        mesh certs issue "$node" --topology "$TOPOLOGY" --dir "$certs"
    fi
    for file in ca.pem node.pem node-key.pem; do
        [ -f "$certs/$node/$file" ] || {{
            echo "missing $certs/$node/$file: run mesh certs issue $node --topology {source} --dir $certs" >&2
            exit 1
        }}
    done
    kubectl ${{NAMESPACE:+--namespace "$NAMESPACE"}} create secret generic "tiermesh-certs-$node" \\
        --from-file=ca.pem="$certs/$node/ca.pem" \\
        --from-file=node.pem="$certs/$node/node.pem" \\
        --from-file=node-key.pem="$certs/$node/node-key.pem" \\
        --dry-run=client --output=yaml \\
        | kubectl ${{NAMESPACE:+--namespace "$NAMESPACE"}} apply -f -
done
"""
