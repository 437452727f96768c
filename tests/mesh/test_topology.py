"""Topology files: the shipped ones load, broken ones are reported by key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mesh.errors import TopologyError
from mesh.topology import load_topology, parse_topology, without_variants

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


def test_nodes_allow_and_deny_variants_by_glob() -> None:
    topo = load_topology(ROOT / "topologies" / "local.yaml")
    # core-1 lists nothing: it may host anything
    assert topo.nodes["core-1"].allows("digits-cnn")
    assert topo.nodes["core-1"].allows("minilm-torch-fp32")
    # the edge tier's deny list: no torch, no full-precision MiniLM
    assert topo.nodes["edge-1"].allows("digits-mlp")
    assert not topo.nodes["edge-1"].allows("digits-cnn-torch-fp32")
    assert not topo.nodes["edge-1"].allows("minilm-onnx-fp32")
    assert topo.nodes["edge-1"].allows("minilm-onnx-int8-dynamic")
    # mid-1's allow list
    assert topo.nodes["mid-1"].allows("digits-cnn")
    assert not topo.nodes["mid-1"].allows("digits-cnn-tflite-int8")
    # deny wins over allow
    data = _local()
    data["nodes"][1].update(variants=["digits-*"], deny_variants=["digits-cnn*"])
    mid = parse_topology(data).nodes["mid-1"]
    assert mid.allows("digits-mlp") and not mid.allows("digits-cnn")


def test_deny_variants_are_inherited_node_over_group_over_tier() -> None:
    data = _grouped(deny_variants=["digits-cnn*"])
    data["tiers"] = {"edge": {"deny_variants": ["*torch*"]}}
    data["nodes"][3]["deny_variants"] = []  # edge-2: an empty list of its own wins too
    topo = parse_topology(data)
    assert topo.nodes["edge-1"].deny_variants == ("*torch*",)  # the tier's
    assert topo.nodes["edge-2"].deny_variants is None
    assert topo.nodes["cam-3"].deny_variants == ("digits-cnn*",)  # the group's
    assert topo.nodes["mid-1"].deny_variants is None  # another tier
    assert topo.summary()["deny_patterns"] == {"*torch*": 1, "digits-cnn*": 5}


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
        (lambda d: d["nodes"][2].update(parent="edge-2"),
         "nodes[2].parent: 'edge-2' is not linked to 'edge-1'"),
        (lambda d: d["nodes"][1].update(parent="edge-1"),
         "nodes[1].parent: 'edge-1' is in a lower tier (edge) than 'mid-1' (intermediate)"),
        (lambda d: d["nodes"][0].update(parent="nowhere"), "nodes[0].parent: unknown node 'nowhere'"),
        (lambda d: d["links"][0].update(loss=1), "links[0].loss: must be < 1"),
        (lambda d: d.update(membership={"heartbeat_interval_s": 0}),
         "membership.heartbeat_interval_s: must be > 0"),
        (lambda d: d.update(tenants=[{"name": "a", "nodes": ["zz-*"]}]),
         "tenants[0].nodes[0]: 'zz-*' matches no node"),
        (lambda d: d.update(tenants=[{"name": "a"}, {"name": "a"}]),
         "tenants[1].name: 'a' is already used by tenants[0]"),
        (lambda d: d.update(tiers={"fog": {}}), "tiers.fog"),
        (lambda d: d["hardware"]["core-cpu"].update(accelerators=[{"type": "a10", "count": 0}]),
         "hardware.core-cpu.accelerators[0].count: must be >= 1"),
        (lambda d: d["hardware"]["core-cpu"].update(power_w=-5), "hardware.core-cpu.power_w: must be >= 0"),
        (lambda d: d["nodes"][1]["address"].update(http_port=d["nodes"][0]["address"]["http_port"]),
         "nodes[1].address.http_port: 127.0.0.1:7107 is already used by nodes[0] (core-1)"),
        (lambda d: d["nodes"][2]["address"].update(stream_port=70000),
         "nodes[2].address.stream_port: must be <= 65535"),
        (lambda d: d["nodes"][3]["address"].update(stream_port=7103),
         "nodes[3].address: http_port and stream_port are both 7103"),
        (lambda d: d["nodes"][0]["address"].pop("host"), "nodes[0].address.host: required"),
        (lambda d: d["nodes"][2].update(deny_variants="digits-*"),
         "nodes[2].deny_variants: must be a list of variant names or globs, "
         'e.g. deny_variants: ["digits-*"]'),
        (lambda d: d["nodes"][2].update(deny_variants=["digits-cnn", 7]),
         "nodes[2].deny_variants[1]: must be a variant name or glob (a non-empty string)"),
        (lambda d: d["nodes"][2].update(deny_variants=[""]),
         "nodes[2].deny_variants[0]: must be a variant name or glob"),
        (lambda d: d.update(tiers={"edge": {"deny_variants": {"digits": True}}}),
         "tiers.edge.deny_variants: must be a list of variant names or globs"),
        (lambda d: d["nodes"][1].update(variants="digits-*"),
         "nodes[1].variants: must be a list of variant names or globs"),
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


# ---------------------------------------------------------------------- shipped topologies


def test_shipped_campus_and_metro_load_and_are_connected() -> None:
    campus = load_topology(ROOT / "topologies" / "campus.yaml")
    metro = load_topology(ROOT / "topologies" / "metro.yaml")
    assert campus.summary()["nodes_per_tier"]["intermediate"] >= 3
    assert metro.summary()["nodes_per_tier"]["edge"] >= 300
    for topo in (campus, metro):
        assert topo.unreachable() == []
        assert topo.is_tree
        # every edge node reports to an intermediate site
        assert all(topo.nodes[topo.parent[n]].tier == "intermediate"
                   for n in topo.nodes_in_tier("edge"))
    # tier defaults reach nodes that do not list variants: the edge tier's deny list
    assert metro.nodes["cab-17"].deny_variants == ("*torch*", "minilm-*fp32")
    assert metro.nodes["cab-17"].variants is None  # no allow list: placement chooses
    assert campus.nodes["gym-gate"].deny_variants == ("*torch*",)
    assert campus.nodes["med-ward-3"].deny_variants == ("*torch*", "minilm-*")  # its group's
    assert campus.nodes["sports"].variants == ("digits-mlp",)  # its own allow list
    assert campus.tenants["hospital"].may_use("med-ward-3")
    assert not campus.tenants["hospital"].may_use("science")


def test_local_parents_follow_the_tiers() -> None:
    topo = load_topology(ROOT / "topologies" / "local.yaml")
    assert topo.parent == {"edge-1": "mid-1", "edge-2": "mid-1", "mid-1": "core-1",
                           "core-1": None}
    assert topo.children["mid-1"] == ("edge-1", "edge-2")
    assert topo.membership.down_after_s == 1.5


# ---------------------------------------------------------------------- groups


def _grouped(**group_overrides) -> dict:
    data = _local()
    group = {"name": "cam", "tier": "edge", "hardware": "edge-cpu", "parents": ["mid-1"],
             "count": 5, "variants": ["digits-linear"],
             "link": {"latency_ms": [1, 5], "bandwidth_mbps": 50, "loss": 0.01}}
    group.update(group_overrides)
    data["groups"] = [group]
    return data


def test_groups_expand_into_nodes_and_links_with_spread_values() -> None:
    topo = parse_topology(_grouped())
    cams = sorted((n for n in topo.nodes if n.startswith("cam-")), key=lambda n: int(n[4:]))
    assert cams == ["cam-1", "cam-2", "cam-3", "cam-4", "cam-5"]
    assert [topo.link(c, "mid-1").latency_ms for c in cams] == [1, 2, 3, 4, 5]
    assert topo.link("cam-3", "mid-1").loss == 0.01
    assert all(topo.parent[c] == "mid-1" for c in cams)
    assert topo.groups == {"cam": 5}
    path = topo.path("cam-5", "core-1")
    assert path is not None and path.latency_ms == 30 and path.bottleneck_mbps == 50
    assert path.loss == pytest.approx(0.01)


def test_per_parent_groups_share_out_in_blocks() -> None:
    data = _grouped(parents=["edge-*"], per_parent=3, count=None, tier="edge")
    topo = parse_topology(data)
    assert [n for n in topo.nodes if topo.parent[n] == "edge-1"] == ["cam-1", "cam-2", "cam-3"]
    assert [n for n in topo.nodes if topo.parent[n] == "edge-2"] == ["cam-4", "cam-5", "cam-6"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"parents": ["site-*"]}, "groups[0].parents[0]: 'site-*' matches no node"),
        ({"per_parent": 2}, "groups[0]: give exactly one of count or per_parent"),
        ({"link": {"latency_ms": [-1, 3], "bandwidth_mbps": 10}},
         "groups[0].link.latency_ms: must be >= 0, got -1"),
        ({"link": {"latency_ms": 1, "bandwidth_mbps": [0, 10]}},
         "groups[0].link.bandwidth_mbps: must be > 0, got 0"),
        ({"link": {"latency_ms": "fast", "bandwidth_mbps": 10}},
         "groups[0].link.latency_ms: must be a number or a [low, high] pair"),
        ({"hardware": "tpu"}, "groups[0].hardware: 'tpu' is not defined"),
        ({"name": "edge", "start": 2}, "groups[0]: replica name 'edge-2' is already used by nodes[3]"),
        ({"count": 0}, "groups[0].count: must be >= 1"),
        ({"tier": "fog"}, "groups[0].tier: must be one of"),
    ],
)
def test_group_errors_name_the_key_path(overrides: dict, expected: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse_topology(_grouped(**overrides), source="g.yaml")
    assert any(expected in e for e in info.value.errors), info.value.errors


def test_explicit_same_tier_parents_cannot_loop() -> None:
    data = _local()
    data["nodes"].append({"name": "core-2", "tier": "core", "hardware": "core-cpu",
                          "parent": "core-1"})
    data["nodes"][0]["parent"] = "core-2"
    data["links"].append({"between": ["core-1", "core-2"], "latency_ms": 1, "bandwidth_mbps": 10})
    with pytest.raises(TopologyError, match="form a loop"):
        parse_topology(data)


# ---------------------------------------------------------------------- paths at scale


def test_tree_paths_agree_with_dijkstra_on_a_synthetic_mesh() -> None:
    import random

    from mesh.topology.synthetic import synthetic_topology

    topo = parse_topology(synthetic_topology(600, cores=3))
    assert topo.is_tree and len(topo.nodes) == 600
    rng = random.Random(3)
    names = sorted(topo.nodes)
    for _ in range(200):
        a, b = rng.choice(names), rng.choice(names)
        tree = topo.path(a, b)
        exact = topo.paths_from(a)[b]
        assert tree is not None
        assert tree.latency_ms == pytest.approx(exact.latency_ms)
        assert tree.bottleneck_mbps == exact.bottleneck_mbps
        assert tree.hops == exact.hops
        assert topo.next_hop(a, b) == (exact.hops[1] if a != b else None)


def test_cross_links_fall_back_on_dijkstra() -> None:
    data = _local()
    data["links"].append({"between": ["edge-1", "core-1"], "latency_ms": 5, "bandwidth_mbps": 10})
    topo = parse_topology(data)
    assert not topo.is_tree
    path = topo.path("edge-1", "core-1")
    assert path is not None and path.hops == ("edge-1", "core-1") and path.latency_ms == 5
    assert topo.next_hop("edge-2", "core-1") == "mid-1"


def test_summary_says_how_it_got_the_longest_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh.topology import summary as summary_module

    metro = load_topology(ROOT / "topologies" / "metro.yaml")
    exact = metro.summary()
    assert "exact (all pairs)" in exact["path_latency_ms"]["method"]
    assert exact["path_latency_ms"]["min"] == 1.0
    monkeypatch.setattr(summary_module, "EXACT_PAIRS_LIMIT", 2)
    swept = metro.summary()
    assert "two sweeps on a tree" in swept["path_latency_ms"]["method"]
    assert swept["path_latency_ms"]["max"] == exact["path_latency_ms"]["max"]
    assert swept["edge_to_nearest_core_ms"]["max"] >= swept["edge_to_nearest_core_ms"]["min"] > 0
    data = _local()
    data["links"].append({"between": ["edge-1", "edge-2"], "latency_ms": 1, "bandwidth_mbps": 10})
    assert "at least" in parse_topology(data).summary()["path_latency_ms"]["method"]


def test_topology_check_cli_summarises_metro_quickly() -> None:
    from click.testing import CliRunner

    from mesh.cli import cli

    result = CliRunner().invoke(cli, ["topology", "check", str(ROOT / "topologies" / "metro.yaml")])
    assert result.exit_code == 0, result.output
    assert "edge 360" in result.output
    assert "exact (all pairs)" in result.output
    assert "unreachable: none" in result.output
    as_json = CliRunner().invoke(cli, ["topology", "check", "--json",
                                       str(ROOT / "topologies" / "campus.yaml")])
    assert as_json.exit_code == 0
    import json
    assert json.loads(as_json.output)["groups"] == {"science-lab": 12, "med-ward": 10}


def test_behind_lists_what_a_neighbour_leads_to() -> None:
    topo = load_topology(ROOT / "topologies" / "local.yaml")
    assert sorted(topo.behind("edge-1", "mid-1")) == ["core-1", "edge-2", "mid-1"]
    assert sorted(topo.behind("mid-1", "core-1")) == ["core-1"]
    assert sorted(topo.behind("mid-1", "edge-2")) == ["edge-2"]
    assert sorted(topo.behind("core-1", "mid-1")) == ["edge-1", "edge-2", "mid-1"]


def test_node_addresses_give_the_urls_nodes_and_clients_use() -> None:
    topology = parse_topology(_local())
    edge = topology.nodes["edge-1"].address
    assert edge is not None and edge.http_url == "http://127.0.0.1:7101"
    assert edge.stream_url == "tcp://127.0.0.1:7102" and edge.bind_host == "127.0.0.1"


@pytest.mark.parametrize("name", ["local", "campus", "metro"])
def test_without_variants_drops_the_allow_lists_and_keeps_the_deny_lists(name: str) -> None:
    doc = yaml.safe_load((ROOT / "topologies" / f"{name}.yaml").read_text())
    shipped = parse_topology(doc)
    assert any(node.deny_variants for node in shipped.nodes.values())
    allowed_only = parse_topology(without_variants(doc))
    assert set(allowed_only.nodes) == set(shipped.nodes)
    assert all(node.variants is None for node in allowed_only.nodes.values())
    assert {n: s.deny_variants for n, s in allowed_only.nodes.items()} == {
        n: s.deny_variants for n, s in shipped.nodes.items()}
    bare = parse_topology(without_variants(doc, deny=True))
    assert all(node.variants is None and node.deny_variants is None
               for node in bare.nodes.values())
