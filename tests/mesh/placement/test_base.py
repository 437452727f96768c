"""The base placement: every shipped topology without globs, globs as constraints, memory,
coverage, tenants."""

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
    assert_every_task_reachable,
    assert_within_memory,
    bundled,
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


def test_allow_globs_are_constraints_not_the_placement() -> None:
    topology = shipped("local", strip=False)
    round_, registry = _first_round(topology)

    for node, hosted in round_.placement:
        spec = topology.nodes[node]
        assert all(spec.allows(v) for v in hosted), (node, dict(hosted))
    # the edge's allow list names three variants; all three are light, so all are placed
    assert set(round_.placement.variants("edge-1")) == {
        "digits-linear", "digits-mlp", "minilm-onnx-int8-dynamic"}
    # mid-1 allows digits-mlp, digits-cnn (no such variant here) and minilm-onnx-*
    assert set(round_.placement.variants("mid-1")) == {
        "digits-mlp", "minilm-onnx-fp32", "minilm-onnx-int8-dynamic"}
    assert_every_task_reachable(topology, registry, round_.placement)


def test_deny_lists_win_and_the_task_stays_reachable_from_upstream() -> None:
    topology = shipped("local")
    constraints = Constraints(topology, deny={"edge-1": ["minilm-*"]})
    round_, registry = _first_round(topology, constraints=constraints)

    assert not any(v.startswith("minilm-") for v in round_.placement.variants("edge-1"))
    assert any(v.startswith("minilm-") for v in round_.placement.variants("edge-2"))
    assert_every_task_reachable(topology, registry, round_.placement)
    with pytest.raises(ValueError, match="not in topology 'local'.*'edge-9'"):
        Constraints(topology, deny={"edge-9": ["*"]})


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
