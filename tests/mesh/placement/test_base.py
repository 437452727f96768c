"""The base placement: every shipped topology without globs and with its globs as
constraints, deny over allow, dominance within a node's constraints, memory, coverage,
tenants."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mesh.placement import (
    Autoscaler,
    Catalogue,
    Cause,
    Constraints,
    DecisionKind,
    Placement,
    base_placement,
)
from mesh.placement.resources import MIB
from mesh.registry import Profile
from mesh.topology import parse_topology, without_variants
from mesh.topology.synthetic import synthetic_topology
from tests.mesh.placement.helpers import (
    DIGITS,
    MINILM,
    assert_every_task_reachable,
    assert_within_memory,
    bundled,
    make_variant,
    registry_of,
    shipped,
)

LIGHT = {"digits-linear", "digits-mlp", "digits-cnn-student", "digits-cnn-tflite-int8",
         "minilm-tflite-int8", "minilm-onnx-int8-dynamic"}
MOST_ACCURATE = {"digits": "digits-cnn-onnx-fp32", "sentence-embedding": "minilm-onnx-fp32"}


def _first_round(topology, registry=None, **kw):
    registry = registry or bundled()
    return Autoscaler(topology, **kw).step(registry, None, 0.0), registry


@pytest.mark.parametrize("name", ["local", "campus", "metro"])
def test_each_shipped_topology_without_globs_gets_a_sensible_placement(name: str) -> None:
    topology = shipped(name)
    round_, registry = _first_round(topology)
    placement = round_.placement

    assert_every_task_reachable(topology, registry, placement)
    assert_within_memory(topology, registry, placement)
    for edge in topology.nodes_in_tier("edge"):
        hosted = set(placement.variants(edge))
        # small, int8 and TFLite variants at the edge, nothing heavy
        assert hosted and hosted <= LIGHT, (edge, hosted)
        assert {"digits-linear", "minilm-tflite-int8"} <= hosted
    for node in topology.nodes_in_tier("intermediate") + topology.nodes_in_tier("core"):
        hosted = set(placement.variants(node))
        # the accurate ones inward
        assert set(MOST_ACCURATE.values()) <= hosted, (node, hosted)
        assert "digits-linear" not in hosted or topology.nodes[node].tier == "core"
    # every placement decision says why
    assert all(d.reason and d.kind is DecisionKind.PLACE for d in round_.decisions)
    assert len(round_.decisions) == len(placement)


def test_dominated_variants_go_only_to_an_accelerator_in_the_core() -> None:
    campus, registry = _first_round(shipped("campus"))
    metro, _ = _first_round(shipped("metro"))

    # campus has a GPU box in its data centre: the largest variants are there, and only there
    for largest in ("digits-cnn-torch", "minilm-torch-fp32"):
        assert campus.placement.hosts(largest) == ["dc-gpu-1"]
    reasons = [d.reason for d in campus.decisions
               if d.node == "dc-gpu-1" and d.variant == "minilm-torch-fp32"]
    assert "accelerator" in reasons[0] and "largest first" in reasons[0]
    # metro has none: they are placed nowhere, and the round says why
    assert metro.placement.hosts("digits-cnn-torch") == []
    assert "dominated by digits-cnn-onnx-fp32" in metro.unplaced["digits-cnn-torch"]
    assert "dominated by minilm-onnx-fp32" in metro.unplaced["minilm-torch-fp32"]
    assert "digits-cnn-tflite-fp32" in metro.unplaced


@pytest.mark.parametrize("name", ["local", "campus", "metro"])
def test_each_shipped_topology_places_within_its_globs_as_constraints(name: str) -> None:
    topology = shipped(name, strip=False)
    round_, registry = _first_round(topology)
    placement = round_.placement

    assert_every_task_reachable(topology, registry, placement)
    assert_within_memory(topology, registry, placement)
    assert not [d for d in round_.decisions if d.kind is DecisionKind.UNCOVERED]
    for node, hosted in placement:
        spec = topology.nodes[node]
        assert all(spec.allows(v) for v in hosted), (node, dict(hosted))  # never outside them
    for edge in topology.nodes_in_tier("edge"):
        hosted = set(placement.variants(edge))
        assert hosted and hosted <= LIGHT, (edge, hosted)  # small and int8 at the edge
        assert "digits-linear" in hosted
    for node in topology.nodes_in_tier("intermediate") + topology.nodes_in_tier("core"):
        spec, hosted = topology.nodes[node], placement.variants(node)
        for task in registry.tasks():
            served = [registry.get(v).accuracy for v in hosted if registry.get(v).task == task]
            if served:
                # the accurate ones inward: the most accurate the node's lists let in
                best = max(v.accuracy for v in registry.for_task(task) if spec.allows(v.name))
                assert max(served) >= best - 1e-6, (node, task)
    in_core = {v for n in topology.nodes_in_tier("core") for v in placement.variants(n)}
    assert set(MOST_ACCURATE.values()) <= in_core  # the core serves the most accurate


def test_local_with_its_globs_keeps_the_demo_meaningful() -> None:
    # local.yaml as the demo runs it: edges deny torch and full-precision MiniLM, mid-1 may
    # host only its validated ONNX models, the core anything
    topology = shipped("local", strip=False)
    placement = _first_round(topology)[0].placement

    edge = set(placement.variants("edge-1"))
    assert edge == set(placement.variants("edge-2"))
    assert {"digits-linear", "digits-mlp"} <= edge  # cheap queries answered at the edge
    assert not any(v.startswith("digits-cnn-onnx") or "fp32" in v for v in edge)
    assert set(placement.variants("mid-1")) == {
        "digits-mlp", "minilm-onnx-fp32", "minilm-onnx-int8-dynamic"}
    assert {"digits-cnn-onnx-fp32", "minilm-onnx-fp32"} <= set(placement.variants("core-1"))


def test_dominance_is_judged_within_a_nodes_constraints() -> None:
    # "digits-cnn" as the build makes it: as accurate as the TFLite int8 CNN but slower and
    # larger, so dominated by it wherever both may be hosted
    cnn = make_variant("digits-cnn", "digits", 0.994, 0.019, 10.0)
    registry = registry_of(*DIGITS, cnn, *MINILM)
    catalogue = Catalogue(registry.variants.values())
    assert catalogue.option("digits-cnn", "cpu-1t").dominated_by == "digits-cnn-tflite-int8"

    # mid-1 allows digits-mlp and digits-cnn, not the int8 CNN that dominates it: within its
    # list nothing dominates digits-cnn, so mid-1 hosts it (a global front left it no CNN)
    round_, _ = _first_round(shipped("local", strip=False), registry)
    assert "digits-cnn" in round_.placement.variants("mid-1")
    reason = next(d.reason for d in round_.decisions
                  if d.node == "mid-1" and d.variant == "digits-cnn")
    assert "digits-cnn-tflite-int8 dominates it but may not be placed here" in reason
    # without the list, mid-1 hosts the int8 CNN and digits-cnn is placed nowhere
    free, _ = _first_round(shipped("local"), registry)
    assert "digits-cnn-tflite-int8" in free.placement.variants("mid-1")
    assert free.placement.hosts("digits-cnn") == []
    assert "dominated by digits-cnn-tflite-int8" in free.unplaced["digits-cnn"]

    # each node's front is computed once per distinct rule and hardware, not per node
    metro = shipped("metro", strip=False)
    catalogue = Catalogue(registry.variants.values())
    constraints = Constraints(metro)
    base_placement(metro, catalogue, constraints)
    kinds = {(constraints.rule(n).key, metro.nodes[n].hardware) for n in metro.nodes}
    assert len(catalogue._fronts) <= len(kinds) * len(catalogue.tasks)


def test_an_allow_list_narrows_a_nodes_share_and_never_shifts_it() -> None:
    def edge_allows(*globs):
        def edit(doc):
            doc["nodes"][2]["variants"] = list(globs)  # edge-1
        return set(_first_round(shipped("local", edit=edit))[0].placement.variants("edge-1"))

    # the edge's share is the lighter half of what the registry offers on its hardware:
    # allowing two light variants keeps both, allowing a heavy one as well adds nothing
    assert edge_allows("digits-linear", "digits-mlp") == {"digits-linear", "digits-mlp"}
    assert edge_allows("digits-linear", "digits-mlp", "digits-cnn-onnx-fp32") == {
        "digits-linear", "digits-mlp"}
    # an allow list that leaves none of the share: the lightest it allows, rather than none
    assert edge_allows("digits-cnn-onnx-*") == {"digits-cnn-onnx-int8"}
    # an empty allow list: nothing (the node forwards every query)
    assert edge_allows() == set()


def test_deny_lists_win_over_allow_lists_and_the_task_stays_reachable_from_upstream() -> None:
    def deny_on_edge_1(doc):
        doc["nodes"][2]["variants"] = ["digits-*", "minilm-*"]
        doc["nodes"][2]["deny_variants"] = ["minilm-*", "digits-mlp"]

    topology = shipped("local", edit=deny_on_edge_1)
    round_, registry = _first_round(topology)

    edge_1 = set(round_.placement.variants("edge-1"))
    assert edge_1 and not any(v.startswith("minilm-") or v == "digits-mlp" for v in edge_1)
    assert "digits-mlp" in round_.placement.variants("edge-2")
    assert any(v.startswith("minilm-") for v in round_.placement.variants("edge-2"))
    assert_every_task_reachable(topology, registry, round_.placement)
    rule = Constraints(topology).rule("edge-1")
    assert rule.refusal("digits-mlp") == "denied by 'digits-mlp'"
    assert rule.refusal("minilm-tflite-int8") == "denied by 'minilm-*'"
    # denied on every node (tier defaults): placed nowhere, and the round says why
    everywhere = shipped("local", edit=lambda doc: doc.update(tiers={
        t: {"deny_variants": ["digits-cnn-student"]} for t in ("edge", "intermediate", "core")}))
    round_, _ = _first_round(everywhere)
    assert round_.placement.hosts("digits-cnn-student") == []
    assert round_.unplaced["digits-cnn-student"] == "no node's allow/deny lists let it in"


def test_a_variant_denied_later_is_dropped_where_it_is_hosted() -> None:
    topology, registry = shipped("local"), bundled()
    scaler = Autoscaler(topology)
    first = scaler.step(registry, None, 0.0)
    assert "digits-mlp" in first.placement.variants("edge-1")

    denied = shipped("local", edit=lambda doc: doc["nodes"][2].update(
        deny_variants=["digits-mlp"]))
    scaler.use_constraints(Constraints(denied))
    later = scaler.step(registry, None, 10.0)

    assert "digits-mlp" not in later.placement.variants("edge-1")
    drops = [d for d in later.decisions if d.kind is DecisionKind.DROP]
    assert [(d.node, d.variant, d.cause) for d in drops] == [
        ("edge-1", "digits-mlp", Cause.TOPOLOGY)]
    assert "allow/deny lists no longer let digits-mlp in" in drops[0].reason
    assert "digits-mlp" in later.placement.variants("edge-2")  # only where it is denied
    with pytest.raises(ValueError, match="not for topology 'local'"):
        scaler.use_constraints(Constraints(shipped("campus")))


def test_small_edges_get_what_fits_and_coverage_moves_a_task_up() -> None:
    def small_edges(doc):
        doc["hardware"]["edge-cpu"]["memory_mb"] = 64

    topology = shipped("local", edit=small_edges)
    round_, registry = _first_round(topology)

    assert_within_memory(topology, registry, round_.placement)
    assert not any(v.startswith("minilm-") for v in round_.placement.variants("edge-1"))
    assert "digits-linear" in round_.placement.variants("edge-1")
    assert_every_task_reachable(topology, registry, round_.placement)


def test_a_task_no_node_on_a_path_can_hold_is_reported_uncovered() -> None:
    def tiny(doc):
        for hw in doc["hardware"].values():
            hw["memory_mb"] = 90  # every MiniLM variant needs 100 MB or more

    topology = shipped("local", edit=tiny)
    round_, registry = _first_round(topology)

    uncovered = [d for d in round_.decisions if d.kind is DecisionKind.UNCOVERED]
    assert [(d.node, d.variant) for d in uncovered] == [("edge-1", "sentence-embedding")]
    assert ("no node on the path from edge-1 (and 1 other entry node(s)) to core-1"
            in uncovered[0].reason)
    assert "needs 100 MB" in round_.unplaced["minilm-tflite-int8"]
    assert round_.placement.hosts("digits-linear")  # the rest is placed as usual


def test_coverage_puts_a_task_on_the_lowest_node_of_a_path_with_room() -> None:
    def one_small_edge(doc):
        # 150 MB: no MiniLM in its base share (75 MB), but room for the smallest in all of it
        doc["hardware"]["small"] = {"kind": "cpu", "threads": 1, "memory_mb": 150}
        doc["nodes"][2]["hardware"] = "small"  # edge-1
        doc["tenants"] = [{"name": "kiosk", "nodes": ["edge-1"], "tasks": ["sentence-embedding"]}]

    topology = shipped("local", edit=one_small_edge)
    round_, registry = _first_round(topology)

    # the whole mesh reaches MiniLM from edge-1 through mid-1, but the tenant may use edge-1
    # only: its own path needs a host, and edge-1 has room for the smallest
    placed = [d for d in round_.decisions if d.node == "edge-1" and d.cause is Cause.COVERAGE]
    assert [d.variant for d in placed] == ["minilm-tflite-int8"]
    assert "coverage for tenant kiosk" in placed[0].reason
    assert_within_memory(topology, registry, round_.placement)
    without_tenant, _ = _first_round(shipped("local", edit=lambda doc: (
        one_small_edge(doc), doc.pop("tenants"))))
    assert not any(v.startswith("minilm") for v in without_tenant.placement.variants("edge-1"))


def test_the_base_placement_is_deterministic_and_shared_by_like_nodes() -> None:
    topology = shipped("metro")
    a, _ = _first_round(topology)
    b, _ = _first_round(topology)
    assert a.placement == b.placement
    assert [d.to_json() for d in a.decisions] == [d.to_json() for d in b.decisions]
    cabinets = {frozenset(a.placement.variants(n)) for n in topology.nodes_in_tier("edge")}
    assert len(cabinets) == 1


def test_a_large_generated_mesh_is_covered_everywhere() -> None:
    doc = synthetic_topology(3000)
    topology = parse_topology(without_variants(doc))
    registry = bundled()
    catalogue = Catalogue(registry.variants.values())
    plan = base_placement(topology, catalogue, Constraints(topology))
    placement = Placement({n: dict.fromkeys(chosen, 1) for n, chosen in plan.hosts.items()})
    assert not plan.uncovered
    assert_every_task_reachable(topology, registry, placement)
    assert_within_memory(topology, registry, placement)


def test_memory_is_the_profiled_peak_else_size_times_three() -> None:
    unprofiled = replace(DIGITS[0], name="digits-tiny", size_bytes=10 * MIB, profiles={
        k: Profile(p.batch_ms, p.cold_start_ms) for k, p in DIGITS[0].profiles.items()})
    catalogue = Catalogue([unprofiled])
    assert catalogue.option("digits-tiny", "cpu-1t").memory_bytes == 30 * MIB


def test_private_heads_count_their_shared_base_once() -> None:
    """Three tenants' heads on one 200 MB encoder: each head's own profile says base + head
    (what a node without the encoder would need), but a node holds the encoder once for all
    of them, and placement counts it so: all three fit where one full copy each would not."""
    encoder = make_variant("enc-onnx-fp32", "sentence-embedding", 0.999, 8.0, 200.0)
    heads = [replace(make_variant(f"t{i}-topics-onnx-fp32", f"t{i}-topics", 0.95, 8.1, 205.0),
                     base=encoder.name, tenant=f"t{i}",
                     head_profile=Profile({1: 0.1}, peak_memory_bytes=5 * MIB))
             for i in range(3)]
    registry = registry_of(encoder, *heads)
    topology = parse_topology({
        "name": "one", "hardware": {"box": {"kind": "cpu", "threads": 1, "memory_mb": 600}},
        "nodes": [{"name": "core-1", "tier": "core", "hardware": "box"}]})
    round_, _ = _first_round(topology, registry)
    hosted = set(round_.placement.variants("core-1"))
    assert hosted == {encoder.name, *(h.name for h in heads)}, round_.decisions
    # a fourth head would need only its own 5 MB on a node that holds the encoder
    scaler = Autoscaler(topology)
    scaler.step(registry, None, 0.0)
    catalogue = Catalogue(registry.variants.values())
    fourth = replace(heads[0], name="t3-topics-onnx-fp32", task="t3-topics", tenant="t3")
    more = Catalogue([*registry.variants.values(), fourth])
    option = more.option(fourth.name, "cpu-1t")
    free = scaler.free_bytes("core-1", option, more)
    assert free == 600 * MIB - 200 * MIB - 3 * 5 * MIB + 200 * MIB  # the encoder is there
    assert catalogue.shared_part(catalogue.option(encoder.name, "cpu-1t")) == (
        encoder.name, 200 * MIB)


def test_exports_as_accurate_as_each_other_are_one_level_and_stay_off_the_edge() -> None:
    """Two fp32 exports of one encoder, accurate to 1e-13 of each other and neither
    dominating (one faster, one smaller), beside an int8 one: the edge's lighter half is the
    int8 level, not 'int8 and the first fp32 export' (measured profiles put them either way)."""
    variants = [
        make_variant("enc-int8", "sentence-embedding", 0.993, 3.3, 107.0, precision="int8"),
        make_variant("enc-tflite-fp32", "sentence-embedding", 1.0 - 4e-13, 8.8, 124.0,
                     fmt="tflite"),
        make_variant("enc-onnx-fp32", "sentence-embedding", 1.0 - 2e-13, 8.4, 207.0),
    ]
    topology = parse_topology({
        "name": "two",
        "hardware": {"small": {"kind": "cpu", "threads": 1, "memory_mb": 2048},
                     "big": {"kind": "cpu", "threads": 1, "memory_mb": 8192}},
        "nodes": [{"name": "core-1", "tier": "core", "hardware": "big"},
                  {"name": "edge-1", "tier": "edge", "hardware": "small"}],
        "links": [{"between": ["edge-1", "core-1"], "latency_ms": 5, "bandwidth_mbps": 100}]})
    round_, _ = _first_round(topology, registry_of(*variants))
    assert set(round_.placement.variants("edge-1")) == {"enc-int8"}
    assert {"enc-tflite-fp32", "enc-onnx-fp32"} <= set(round_.placement.variants("core-1"))
