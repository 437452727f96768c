"""Topology files: the shipped ones load, broken ones are reported by key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mesh.errors import TopologyError
from mesh.topology import load_topology, parse_topology

ROOT = Path(__file__).resolve().parents[2]


def _local() -> dict:
    return yaml.safe_load((ROOT / "topologies" / "local.yaml").read_text())


def test_local_topology_has_three_tiers_and_path_costs() -> None:
    topo = load_topology(ROOT / "topologies" / "local.yaml")
    summary = topo.summary()
    assert summary["nodes_per_tier"] == {"edge": 2, "intermediate": 1, "core": 1}
    path = topo.path("edge-1", "core-1")
    assert path is not None
    assert path.hops == ("edge-1", "mid-1", "core-1")
    assert path.latency_ms == 27
    assert path.bottleneck_mbps == 100  # the edge link is the thin one
    assert topo.next_hop("edge-1", "core-1") == "mid-1"
    assert topo.next_hop("core-1", "edge-2") == "mid-1"
    # 1 MB over 100 Mbps is 80 ms of serialisation
    assert path.transfer_ms(1_000_000) == pytest.approx(80.0)


def test_nodes_allow_variants_by_glob() -> None:
    topo = load_topology(ROOT / "topologies" / "local.yaml")
    assert topo.nodes["core-1"].allows("digits-cnn")
    assert not topo.nodes["edge-1"].allows("digits-cnn")
    assert topo.nodes["edge-1"].allows("digits-mlp")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["links"][2].update(latency_ms=-1), "links[2].latency_ms: must be >= 0"),
        (lambda d: d["links"][0].update(bandwidth_mbps=0), "links[0].bandwidth_mbps: must be > 0"),
        (lambda d: d["links"][1].update(between=["edge-2", "nowhere"]),
         "links[1].between[1]: unknown node 'nowhere'"),
        (lambda d: d["nodes"][1].update(tier="fog"), "nodes[1].tier: must be one of"),
        (lambda d: d["nodes"][2].update(hardware="tpu"), "nodes[2].hardware: 'tpu' is not defined"),
        (lambda d: d["nodes"][3].update(name="edge-1"), "nodes[3].name: 'edge-1' is already used"),
        (lambda d: d["nodes"][0].pop("tier"), "nodes[0].tier: required"),
        (lambda d: d["nodes"][0].update(cores=4), "nodes[0].cores: unknown key"),
        (lambda d: d["hardware"]["edge-cpu"].update(threads=0),
         "hardware.edge-cpu.threads: must be >= 1"),
        (lambda d: d["links"].append(dict(d["links"][0])), "links[3].between: duplicates links[0]"),
        (lambda d: d["links"][0].update(between=["mid-1", "mid-1"]), "cannot join 'mid-1' to itself"),
    ],
)
def test_errors_name_the_key_path(mutate, expected: str) -> None:
    data = _local()
    mutate(data)
    with pytest.raises(TopologyError) as info:
        parse_topology(data, source="t.yaml")
    assert any(expected in e for e in info.value.errors), info.value.errors


def test_every_error_is_reported_at_once() -> None:
    data = _local()
    data["links"][0]["latency_ms"] = -3
    data["links"][1]["bandwidth_mbps"] = -1
    with pytest.raises(TopologyError) as info:
        parse_topology(data)
    assert len(info.value.errors) == 2


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read file"):
        load_topology(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nnodes: [\n")
    with pytest.raises(TopologyError, match=r"\(YAML\) line"):
        load_topology(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(TopologyError, match="must be a mapping"):
        load_topology(scalar)


def test_unreachable_nodes_are_listed() -> None:
    data = _local()
    data["links"].pop(1)  # edge-2 loses its only link
    topo = parse_topology(data)
    assert topo.unreachable() == ["edge-2"]
    assert topo.path("edge-1", "edge-2") is None
