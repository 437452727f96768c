"""A mesh whose topology says nothing about variants: the mesh places them itself."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh import Client
from mesh.placement import Hosting
from mesh.registry import Registry
from mesh.testbed.local import LocalMesh
from mesh.topology import parse_topology, without_variants

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _without_globs(name: str) -> dict[str, Any]:
    return without_variants(yaml.safe_load((ROOT / "topologies" / name).read_text()))


@pytest.mark.parametrize("name", ["local.yaml", "campus.yaml", "metro.yaml"])
def test_every_shipped_topology_without_globs_places_every_task_on_every_path(
        built_home: Path, name: str) -> None:
    topology = parse_topology(_without_globs(name))
    registry = Registry.load(built_home)
    hosting = Hosting(topology, registry)
    for entry in (n for n, spec in topology.nodes.items() if spec.tier == "edge"):
        path = [entry]
        while topology.parent[path[-1]] is not None:
            path.append(topology.parent[path[-1]])
        for task in registry.tasks():
            hosts = [n for n in path for v in registry.for_task(task)
                     if hosting.allows(n, v.name)]
            assert hosts, f"{task} has no host between {entry} and the core in {name}"
    edge = next(n for n, spec in topology.nodes.items() if spec.tier == "edge")
    core = next(n for n, spec in topology.nodes.items() if spec.tier == "core")
    def size(node: str) -> int:
        return max((v.size_bytes for v in registry.variants.values()
                    if hosting.allows(node, v.name)), default=0)
    assert size(edge) < size(core)  # small variants at the edge, the largest inward


def test_a_mesh_without_globs_serves_by_its_own_placement(
        built_home: Path, tmp_path: Path, heldout: Any) -> None:
    images, _ = heldout
    topology = tmp_path / "managed.yaml"
    topology.write_text(yaml.safe_dump(_without_globs("local.yaml")))
    with LocalMesh(topology, home=built_home, run_dir=tmp_path / "run",
                   use_addresses=False) as mesh, Client(mesh.url("edge-1")) as client:
        fast = client.infer("digits", images[:1], latency_ms=10)
        accurate = client.infer("digits", images[:1], min_accuracy=0.99, latency_ms=500)
        with urllib.request.urlopen(mesh.url("edge-1") + "/v1/status", timeout=5) as resp:
            placement = json.loads(resp.read())["placement"]
    # the node says what the mesh placed on it, and why
    assert placement["managed"] and fast.served_by.variant in placement["hosts"]
    assert all(d["reason"] for d in placement["decisions"])
    assert fast.served_by.tier == "edge" and fast.slo_met
    assert accurate.slo_met and accurate.plan is not None and accurate.plan.accuracy >= 0.99
