"""The planner as a pure function: SLOs, links, load and failures steer each query."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mesh.errors import NoRoute, UnknownTask
from mesh.planner import Planner
from mesh.registry import Profile, Registry, TensorSpec, Variant
from mesh.state import MeshView
from mesh.topology import parse_topology
from mesh.wire import SLO

ROOT = Path(__file__).resolve().parents[2]


def _variant(name: str, accuracy: float, b1_ms: float, *, cold_ms: float = 50.0) -> Variant:
    profile = Profile({1: b1_ms, 8: b1_ms * 3, 32: b1_ms * 8}, cold_start_ms=cold_ms)
    return Variant(
        name=name, task="digits", family="digits", arch=name.split("-")[1], format="onnx",
        precision="fp32", sha256="0" * 64, size_bytes=1000, accuracy=accuracy,
        accuracy_metric="top1", macs=1000,
        inputs=(TensorSpec("input", "float32", (-1, 64)),),
        outputs=(TensorSpec("probs", "float32", (-1, 10)),),
        profiles={"cpu-1t": profile, "cpu-2t": profile},
    )


REGISTRY = Registry({v.name: v for v in (
    _variant("digits-linear", 0.95, 0.02),
    _variant("digits-mlp", 0.97, 0.05),
    _variant("digits-cnn", 0.985, 0.6),
)})


def _topology(**overrides):
    data = yaml.safe_load((ROOT / "topologies" / "local.yaml").read_text())
    for key, value in overrides.items():
        if key.startswith("link"):
            data["links"][int(key[4:])].update(value)
        elif key.startswith("hw_"):
            data["hardware"][key[3:].replace("_", "-")].update(value)
    return parse_topology(data)


def _plan(slo: SLO, *, topo=None, view=None, now=0.0, **kw):
    planner = Planner(topo or _topology(), REGISTRY)
    return planner.plan("digits", slo, "edge-1", view or MeshView(), now=now,
                        payload_bytes=256, **kw)


def test_tight_latency_is_served_at_the_edge() -> None:
    d = _plan(SLO(latency_ms=8))
    assert d.tier == "edge" and d.node == "edge-1" and d.feasible


def test_high_accuracy_goes_upstream_to_the_cheapest_host_of_a_good_variant() -> None:
    d = _plan(SLO(latency_ms=200, min_accuracy=0.98))
    assert d.variant == "digits-cnn"
    assert d.node == "mid-1"  # intermediate hardware is cheaper than core
    assert d.feasible
    # 2 x 2 ms of links plus compute
    assert d.prediction.network_ms == pytest.approx(4.0 + 2 * Planner.per_hop_ms, abs=0.1)


def test_relaxed_query_takes_the_cheapest_variant() -> None:
    d = _plan(SLO())
    assert (d.node, d.variant) == ("edge-1", "digits-linear")


def test_policies_change_the_winner() -> None:
    assert _plan(SLO(policy="most-accurate")).variant == "digits-cnn"
    assert _plan(SLO(policy="fastest")).node == "edge-1"


def test_accuracy_and_latency_that_cannot_both_be_met_give_the_closest_flagged() -> None:
    d = _plan(SLO(latency_ms=5, min_accuracy=0.98), explain=True)
    assert not d.feasible
    assert "no candidate meets the SLO" in d.reason
    assert all(not s.feasible for s in d.candidates)


def test_large_payload_is_not_sent_over_a_thin_link_when_the_edge_can_serve() -> None:
    # Make the intermediate site much cheaper than the edge, so it would win on cost...
    topo = _topology(hw_edge_cpu={"cost_per_hour": 5.0}, hw_intermediate_cpu={"cost_per_hour": 0.01},
                     link0={"bandwidth_mbps": 10})
    planner = Planner(topo, REGISTRY)
    small = planner.plan("digits", SLO(latency_ms=100), "edge-1", MeshView(), now=0,
                         payload_bytes=256)
    assert small.node == "mid-1"
    # ...but 1 MB over a 10 Mbps link is 800 ms, so the big query stays at the edge.
    big = planner.plan("digits", SLO(latency_ms=100), "edge-1", MeshView(), now=0,
                       payload_bytes=1_000_000)
    assert big.node == "edge-1"
    assert big.feasible


def test_a_loaded_core_pushes_queries_to_the_intermediate_tier() -> None:
    # Core is the cheapest host of the CNN here, so it wins while idle.
    topo = _topology(hw_core_cpu={"cost_per_hour": 0.01})
    planner = Planner(topo, REGISTRY)
    slo = SLO(latency_ms=80, min_accuracy=0.98)
    view = MeshView()
    assert planner.plan("digits", slo, "edge-1", view, now=10.0).node == "core-1"
    view.report("core-1", queue_depth=400, now=10.0)
    d = planner.plan("digits", slo, "edge-1", view, now=10.5)
    assert d.node == "mid-1" and d.feasible
    # Once the report is stale it no longer counts.
    assert planner.plan("digits", slo, "edge-1", view, now=10.0 + view.stale_after_s + 1).node == "core-1"


def test_a_node_marked_down_is_skipped_until_it_reports_again() -> None:
    planner = Planner(_topology(), REGISTRY)
    slo = SLO(min_accuracy=0.98)
    view = MeshView()
    view.mark_down("mid-1", now=1.0)
    assert planner.plan("digits", slo, "edge-1", view, now=1.0).node == "core-1"
    view.report("mid-1", 0, now=2.0)
    assert planner.plan("digits", slo, "edge-1", view, now=2.0).node == "mid-1"


def test_cold_start_counts_when_the_variant_is_not_loaded() -> None:
    view = MeshView()
    view.report("edge-1", 0, now=0.0, loaded=frozenset({"digits-mlp"}))
    d = _plan(SLO(policy="fastest"), view=view)
    assert d.variant == "digits-mlp"  # linear would need a 50 ms cold start


def test_unknown_task_and_no_route() -> None:
    planner = Planner(_topology(), REGISTRY)
    with pytest.raises(UnknownTask, match="known tasks: digits"):
        planner.plan("speech", SLO(), "edge-1", MeshView(), now=0)
    view = MeshView()
    for node in ("edge-1", "mid-1", "core-1", "edge-2"):
        view.mark_down(node, now=0)
    with pytest.raises(NoRoute, match="down"):
        planner.plan("digits", SLO(), "edge-1", view, now=0)


def test_explain_lists_every_candidate_with_its_split() -> None:
    d = _plan(SLO(latency_ms=10), explain=True)
    # edge-1: 2 variants, mid-1: 2, core-1: 3, edge-2: 2
    assert len(d.candidates) == 9
    first = d.candidates[0]
    assert (first.candidate.node, first.candidate.variant) == (d.node, d.variant)
    remote = [s for s in d.candidates if s.candidate.node == "core-1"]
    assert all(s.prediction.network_ms >= 54 for s in remote)
    assert all(not s.feasible for s in remote)
