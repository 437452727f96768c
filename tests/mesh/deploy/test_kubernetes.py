"""Kubernetes manifests rendered from topology files: valid, faithful to the topology, safe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mesh.deploy import KUBERNETES_VERSION, KubernetesOptions, render_kubernetes
from mesh.deploy.cluster import cluster_addresses
from mesh.errors import TopologyError
from mesh.topology import Topology, load_topology, parse_topology

ROOT = Path(__file__).resolve().parents[3]
CAMPUS = ROOT / "topologies" / "campus.yaml"
LOCAL = ROOT / "topologies" / "local.yaml"


def _objects(topology: Topology, **options: Any) -> list[dict[str, Any]]:
    rendering = render_kubernetes(topology, KubernetesOptions(**options))
    return [doc for name, text in rendering.files.items() if name.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc is not None]


def _find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def _gpu_mesh(accelerator: str = "t4", kind: str = "cpu") -> Topology:
    return parse_topology({
        "name": "lab",
        "hardware": {"cpu-box": {"threads": 2, "memory_mb": 2048},
                     "gpu-box": {"kind": kind, "threads": 4, "memory_mb": 8192,
                                 "accelerators": [{"type": accelerator, "count": 2}]}},
        "nodes": [{"name": "core-1", "tier": "core", "hardware": "gpu-box"},
                  {"name": "edge-1", "tier": "edge", "hardware": "cpu-box"}],
        "links": [{"between": ["edge-1", "core-1"], "latency_ms": 3, "bandwidth_mbps": 100}],
    })


@pytest.mark.parametrize("path", [CAMPUS, LOCAL])
def test_every_manifest_validates_strictly_against_the_pinned_kubernetes(path: Path) -> None:
    objects = _objects(load_topology(path))
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    kinds = [o["kind"] for o in objects]
    topology = load_topology(path)
    assert kinds.count("Service") == kinds.count("NetworkPolicy") == len(topology.nodes)
    assert kinds.count("ConfigMap") == kinds.count("PodDisruptionBudget") == 1


def test_the_gpu_class_manifests_validate_too() -> None:
    objects = _objects(_gpu_mesh())
    assert any("nvidia.com/gpu" in str(obj) for obj in objects)  # the GPU nodes are rendered
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_a_manifest_with_a_mistake_fails_the_validation_the_tests_rely_on() -> None:
    service = _find(_objects(load_topology(LOCAL)), "Service", "edge-1")
    service["spec"]["ports"][0]["port"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", [CAMPUS, LOCAL])
def test_the_topology_survives_the_round_trip_through_the_configmap(path: Path) -> None:
    original = load_topology(path)
    configmap = _find(_objects(original), "ConfigMap", "tiermesh-topology")
    back = parse_topology(yaml.safe_load(configmap["data"]["topology.yaml"]))
    assert back.name == original.name
    assert back.hardware == original.hardware
    assert back.links == original.links
    assert back.tenants == original.tenants
    assert back.membership == original.membership
    assert back.energy_cost_per_kwh == original.energy_cost_per_kwh
    assert back.parent == original.parent
    # every node as loaded (tier defaults and group members resolved), now with its Service
    addresses = cluster_addresses(original)
    assert list(back.nodes) == list(original.nodes)
    for name, node in original.nodes.items():
        assert back.nodes[name] == node.model_copy(update={"address": addresses[name]})
        assert back.nodes[name].address.host == name
        assert back.nodes[name].address.bind == "0.0.0.0"


def test_services_carry_the_topology_ports_or_the_defaults_and_scrape_annotations() -> None:
    local = _objects(load_topology(LOCAL))
    core = _find(local, "Service", "core-1")
    assert [(p["name"], p["port"]) for p in core["spec"]["ports"]] == [("http", 7107),
                                                                        ("stream", 7108)]
    assert core["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert core["metadata"]["annotations"]["prometheus.io/port"] == "7107"
    assert core["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    campus = _find(_objects(load_topology(CAMPUS)), "Service", "science-lab-7")  # no address
    assert [p["port"] for p in campus["spec"]["ports"]] == [7101, 7102]
    pod = _pod(_find(_objects(load_topology(LOCAL)), "StatefulSet", "core-1"))
    assert [p["containerPort"] for p in pod["containers"][0]["ports"]] == [7107, 7108]


def test_core_and_intermediate_nodes_are_statefulsets_with_a_home_volume() -> None:
    objects = _objects(load_topology(CAMPUS), home_size="20Gi", storage_class="fast")
    for name in ("dc-1", "dc-gpu-1", "science", "library", "sports", "medicine"):
        sts = _find(objects, "StatefulSet", name)
        assert sts["spec"]["serviceName"] == name and sts["spec"]["replicas"] == 1
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
        assert claim["spec"]["storageClassName"] == "fast"
        mounts = _pod(sts)["containers"][0]["volumeMounts"]
        assert {"name": "home", "mountPath": "/var/lib/tiermesh"} in mounts
    deployments = {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"}
    assert deployments == set(load_topology(CAMPUS).nodes_in_tier("edge"))


def test_edge_nodes_are_pinned_to_their_labelled_machine_and_tolerate_edge_taints() -> None:
    pod = _pod(_find(_objects(load_topology(CAMPUS)), "Deployment", "med-ward-3"))
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": "tiermesh.io/node", "operator": "In",
                                         "values": ["med-ward-3"]}]
    keys = {t["key"] for t in pod["tolerations"]}
    assert {"node-role.kubernetes.io/edge", "node.kubernetes.io/unreachable"} <= keys
    core = _pod(_find(_objects(load_topology(CAMPUS)), "StatefulSet", "dc-1"))
    assert "affinity" not in core and "tolerations" not in core


def test_resources_come_from_the_hardware_class() -> None:
    objects = _objects(load_topology(CAMPUS))
    kiosk = _pod(_find(objects, "Deployment", "lib-kiosk-1"))["containers"][0]["resources"]
    # kiosk: threads 1, memory_mb 512 (+256 MiB for the process itself)
    assert kiosk["requests"] == kiosk["limits"] == {"cpu": "1", "memory": "768Mi"}
    dc = _pod(_find(objects, "StatefulSet", "dc-1"))["containers"][0]["resources"]
    assert dc["limits"] == {"cpu": "2", "memory": f"{65536 + 256}Mi"}


def test_an_accelerator_class_asks_for_its_gpus_and_gets_the_cuda_image() -> None:
    objects = _objects(_gpu_mesh(), image="registry.example/tiermesh:1.2")
    core = _pod(_find(objects, "StatefulSet", "core-1"))
    container = core["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert container["image"] == "registry.example/tiermesh:1.2-cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        core["tolerations"]
    edge = _pod(_find(objects, "Deployment", "edge-1"))["containers"][0]
    assert "nvidia.com/gpu" not in edge["resources"]["limits"]
    assert edge["image"] == "registry.example/tiermesh:1.2"
    # campus's dc-gpu class lists an A10
    campus = _pod(_find(_objects(load_topology(CAMPUS)), "StatefulSet", "dc-gpu-1"))
    assert campus["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_a_cuda_class_without_listed_accelerators_asks_for_one_gpu() -> None:
    topology = parse_topology({
        "name": "one", "hardware": {"box": {"kind": "cuda", "threads": 1}},
        "nodes": [{"name": "core-1", "tier": "core", "hardware": "box"}]})
    pod = _pod(_find(_objects(topology), "StatefulSet", "core-1"))
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_an_accelerator_kubernetes_cannot_request_is_an_error_naming_the_class() -> None:
    with pytest.raises(TopologyError) as err:
        render_kubernetes(_gpu_mesh("hailo8"), KubernetesOptions(source="lab.yaml"))
    assert err.value.errors == [err.value.errors[0]]
    message = err.value.message
    assert "lab.yaml (target kubernetes)" in message
    assert "hardware.gpu-box.accelerators[0].type: 'hailo8'" in message
    assert "nvidia.com/gpu" in message and "--target systemd" in message


def test_node_names_kubernetes_cannot_take_are_errors_naming_each_node() -> None:
    long_name = "a" * 53
    topology = parse_topology({
        "name": "bad", "hardware": {"box": {}},
        "nodes": [{"name": "5g-gw", "tier": "edge", "hardware": "box"},
                  {"name": long_name, "tier": "core", "hardware": "box"}],
        "links": [{"between": ["5g-gw", long_name], "latency_ms": 1, "bandwidth_mbps": 10}]})
    with pytest.raises(TopologyError) as err:
        render_kubernetes(topology)
    assert len(err.value.errors) == 2
    assert "nodes.5g-gw: a Kubernetes Service name must start with a letter" in err.value.message
    assert f"nodes.{long_name}: a core node runs as a StatefulSet" in err.value.message


@pytest.mark.parametrize("path", [CAMPUS, LOCAL])
def test_a_nodes_stream_port_admits_exactly_its_topology_neighbours(path: Path) -> None:
    topology = load_topology(path)
    objects = _objects(topology)
    for name in topology.nodes:
        stream_port = _find(objects, "Service", name)["spec"]["ports"][1]["port"]
        http_port = _find(objects, "Service", name)["spec"]["ports"][0]["port"]
        policy = _find(objects, "NetworkPolicy", name)["spec"]
        assert policy["podSelector"]["matchLabels"]["tiermesh.io/node"] == name
        assert policy["policyTypes"] == ["Ingress"]
        stream_rules = [r for r in policy["ingress"]
                        if any(p["port"] == stream_port for p in r["ports"])]
        assert len(stream_rules) == 1
        (peer,) = stream_rules[0]["from"]
        (expr,) = peer["podSelector"]["matchExpressions"]
        assert (expr["key"], expr["operator"]) == ("tiermesh.io/node", "In")
        assert sorted(expr["values"]) == topology.neighbours(name)
        assert peer["podSelector"]["matchLabels"] == {"tiermesh.io/mesh": topology.name}
        # the HTTP port is open to clients and scrapers, and is the only other rule
        assert [r for r in policy["ingress"] if r is not stream_rules[0]] == [
            {"ports": [{"protocol": "TCP", "port": http_port}]}]


def test_every_pod_runs_its_node_with_certificates_and_both_probes() -> None:
    objects = _objects(load_topology(CAMPUS))
    for name in ("dc-1", "gym-gate"):
        kind = "StatefulSet" if name == "dc-1" else "Deployment"
        pod = _pod(_find(objects, kind, name))
        (container,) = pod["containers"]
        assert container["command"] == [
            "mesh", "--home", "/var/lib/tiermesh", "node", "run", "/etc/tiermesh/topology.yaml",
            name, "--tls-dir", "/etc/tiermesh/tls"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http",
                                                          "scheme": "HTTPS"}
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == f"tiermesh-certs-{name}"
        assert volumes["topology"]["configMap"]["name"] == "tiermesh-topology"
        assert pod["securityContext"]["runAsNonRoot"] is True
    assert not [o for o in objects if o["kind"] == "Secret"]  # keys never go in a manifest


def test_the_core_has_a_disruption_budget_of_one_node_at_a_time() -> None:
    budget = _find(_objects(load_topology(CAMPUS)), "PodDisruptionBudget", "tiermesh-core")
    assert budget["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": {
        "tiermesh.io/mesh": "campus", "tiermesh.io/tier": "core"}}}


def test_bad_options_name_the_option() -> None:
    with pytest.raises(ValueError, match="home size: '10 gigs'"):
        KubernetesOptions(home_size="10 gigs")
    assert KubernetesOptions(image="reg:5000/tm").accelerated_image == "reg:5000/tm:latest-cuda"
