"""Mesh state as pure logic: ageing, failure detection, aggregation and versioned summaries."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.errors import InvalidInput
from mesh.planner import Planner
from mesh.state import (
    FailureDetector,
    LoadEntry,
    MeshView,
    RateMeter,
    Subtree,
    apply_entries,
)
from mesh.topology import load_topology
from mesh.wire import SLO

ROOT = Path(__file__).resolve().parents[2]


def _entry(node: str, q: int = 0, **kw) -> LoadEntry:
    return LoadEntry(node, q, **kw)


# ---------------------------------------------------------------------- the view


def test_reports_age_out_and_late_reports_do_not_overwrite_newer_ones() -> None:
    view = MeshView(stale_after_s=2.0)
    view.report("a", 7, now=10.0, arrival_rate=3.5)
    assert view.queue_depth("a", 11.0) == 7 and view.arrival_rate("a", 11.0) == 3.5
    assert view.queue_depth("a", 12.5) == 0  # stale: assumed idle
    view.report("a", 1, now=9.0)  # older than what we hold
    assert view.queue_depth("a", 11.0) == 7


def test_detected_failures_last_until_a_newer_healthy_report() -> None:
    view = MeshView(stale_after_s=1.0)
    view.set_down(["a", "b"], now=5.0)
    assert view.is_down("a", 500.0) and not view.usable("a", "v", 500.0)
    view.report("a", 0, now=4.0)
    assert view.is_down("a", 500.0)
    view.report("a", 0, now=6.0)
    assert not view.is_down("a", 6.0)
    view.clear_down(["b"])
    assert not view.is_down("b", 6.0)
    assert view.snapshot(6.0)["a"]["healthy"] is True


# ---------------------------------------------------------------------- entries on the wire


def test_entries_round_trip_and_bad_ones_are_refused_by_field() -> None:
    e = LoadEntry("mid-1", 4, 0.25, True, 12.5, frozenset({"x"}), frozenset({"y"}), 3, 1, 9)
    assert LoadEntry.from_wire(e.to_wire()) == e
    assert LoadEntry.from_wire(_entry("a").to_wire()) == _entry("a")
    for bad, field in (({"node": "a", "q": -1}, "q"), ({"node": "a", "age": "old"}, "age"),
                       ({"q": 1}, "node"), ({"node": "a", "loaded": "x"}, "loaded"),
                       ({"node": "a", "sub": [1, 2]}, "sub"), ("nope", "must be a map")):
        with pytest.raises(InvalidInput, match=field):
            LoadEntry.from_wire(bad, where="entries[0]")


def test_applied_entries_keep_their_age() -> None:
    view = MeshView(stale_after_s=2.0)
    apply_entries(view, [_entry("a", 3, age_s=1.5), _entry("me", 9)], now=100.0,
                  skip=frozenset({"me"}))
    assert view.queue_depth("a", 100.0) == 3
    assert view.queue_depth("a", 100.6) == 0  # 1.5 s old on arrival: stale 0.5 s later
    assert "me" not in view.loads


# ---------------------------------------------------------------------- failure detection


def test_a_silent_peer_is_down_within_the_bound_and_back_when_heard() -> None:
    d = FailureDetector(["a", "b"], down_after_s=1.5, now=0.0)
    d.heard("a", 1.0)
    d.heard("b", 1.0)
    d.heard("a", 2.0)
    assert d.check(2.5) == []
    assert d.check(2.6) == ["b"]  # 1.6 s since b was heard
    assert d.check(3.0) == []  # reported once
    assert d.check(3.6) == ["a"]
    assert d.heard("b", 4.0) is True and "b" not in d.down


def test_peers_never_heard_from_get_a_start_up_grace() -> None:
    d = FailureDetector(["late"], down_after_s=1.0, now=0.0, startup_grace_s=5.0)
    assert d.check(5.5) == []
    assert d.check(6.1) == ["late"]


def test_rate_meter_follows_the_request_counter() -> None:
    meter = RateMeter(half_life_s=1.0)
    meter.update(0, 0.0)
    for t in range(1, 20):
        rate = meter.update(t * 50, float(t))
    assert rate == pytest.approx(50.0, rel=0.01)


# ---------------------------------------------------------------------- a parent's subtree


def _mid(now: float = 0.0) -> Subtree:
    return Subtree("mid-1", ["edge-1", "edge-2"], down_after_s=1.5, stale_after_s=4.0, now=now)


def test_heartbeats_aggregate_the_subtree_and_go_up() -> None:
    mid = _mid()
    mid.heartbeat("edge-1", [_entry("edge-1", 3)], now=0.2)
    mid.heartbeat("edge-2", [_entry("edge-2", 5, loaded=frozenset({"m"}))], now=0.3)
    up = mid.report_up(_entry("mid-1", 1), now=0.5)
    assert [e.node for e in up] == ["mid-1", "edge-1", "edge-2"]
    head = up[0]
    assert (head.subtree_nodes, head.subtree_down, head.subtree_queue) == (3, 0, 9)
    assert up[1].age_s == pytest.approx(0.3)  # aged while held here
    with pytest.raises(InvalidInput, match="not a child"):
        mid.heartbeat("core-1", [_entry("core-1")], now=0.5)
    with pytest.raises(InvalidInput, match="first entry"):
        mid.heartbeat("edge-1", [_entry("edge-2")], now=0.5)


def test_summaries_are_versioned_and_sent_only_when_stale() -> None:
    mid = _mid()
    mid.inherit([_entry("core-1", 2)], now=0.0)
    own = _entry("mid-1")
    mid.heartbeat("edge-1", [_entry("edge-1", 1)], now=0.1)
    mid.heartbeat("edge-2", [_entry("edge-2", 1)], now=0.1)
    version, entries = mid.summary_for("edge-1", own, -1, now=0.2)
    assert entries is not None
    # everything edge-1 cannot see from below: its parent, its sibling, what came from above
    assert [e.node for e in entries] == ["mid-1", "edge-2", "core-1"]
    # same material state: nothing to send
    mid.heartbeat("edge-2", [_entry("edge-2", 1)], now=0.4)
    assert mid.summary_for("edge-1", own, version, now=0.5) == (version, None)
    # a queue that doubles is material
    mid.heartbeat("edge-2", [_entry("edge-2", 9)], now=0.6)
    newer, entries = mid.summary_for("edge-1", own, version, now=0.7)
    assert newer > version and entries is not None
    # and without any change, the summary is refreshed before it would go stale downstream
    again, entries = mid.summary_for("edge-1", own, newer, now=0.7 + mid.refresh_s)
    assert again > newer and entries is not None


def test_a_child_that_misses_heartbeats_is_reported_down_with_its_subtree() -> None:
    mid = _mid()
    mid.heartbeat("edge-1", [_entry("edge-1", 3, subtree_nodes=2, subtree_queue=4),
                             _entry("cam-1", 1)], now=0.0)
    mid.heartbeat("edge-2", [_entry("edge-2")], now=0.0)
    mid.heartbeat("edge-2", [_entry("edge-2")], now=1.0)
    assert mid.check(1.4) == []
    assert mid.check(1.6) == ["edge-1"]
    assert sorted(mid.down_below()) == ["cam-1", "edge-1"]
    up = mid.report_up(_entry("mid-1"), now=1.6)
    by_node = {e.node: e for e in up}
    assert not by_node["edge-1"].healthy and not by_node["cam-1"].healthy
    assert by_node["mid-1"].subtree_down == 2 and by_node["mid-1"].subtree_nodes == 4
    _, entries = mid.summary_for("edge-2", _entry("mid-1"), -1, now=1.6)
    assert entries is not None and not {e.node: e for e in entries}["edge-1"].healthy
    assert mid.heartbeat("edge-1", [_entry("edge-1")], now=2.0) is True  # back


def _registry():
    from mesh.registry import Profile, Registry, TensorSpec, Variant

    def variant(name: str, accuracy: float, b1_ms: float) -> Variant:
        profile = Profile({1: b1_ms, 32: b1_ms * 8}, cold_start_ms=50.0)
        return Variant(name=name, task="digits", family="digits", arch=name, format="onnx",
                       precision="fp32", sha256="0" * 64, size_bytes=1, accuracy=accuracy,
                       accuracy_metric="top1", macs=1,
                       inputs=(TensorSpec("input", "float32", (-1, 64)),),
                       outputs=(TensorSpec("probs", "float32", (-1, 10)),),
                       profiles={"cpu-1t": profile, "cpu-2t": profile})

    return Registry({v.name: v for v in (variant("digits-linear", 0.95, 0.02),
                                         variant("digits-mlp", 0.97, 0.05),
                                         variant("digits-cnn", 0.985, 0.6))})


def test_an_edge_decides_locally_from_the_summary_it_holds() -> None:
    """Three levels wired by hand: what edge-2 reports reaches edge-1 through mid-1."""
    topo = load_topology(ROOT / "topologies" / "local.yaml")
    planner = Planner(topo, _registry())
    core = Subtree("core-1", ["mid-1"], down_after_s=1.5, stale_after_s=5.0, now=0.0)
    mid = Subtree("mid-1", ["edge-1", "edge-2"], down_after_s=1.5, stale_after_s=5.0, now=0.0)
    mid.heartbeat("edge-2", [_entry("edge-2", 5000)], now=1.0)  # edge-2 is swamped
    mid.heartbeat("edge-1", [_entry("edge-1", 3000)], now=1.0)
    core.heartbeat("mid-1", mid.report_up(_entry("mid-1"), now=1.0), now=1.0)
    _, from_core = core.summary_for("mid-1", _entry("core-1", 3000), -1, now=1.1)
    assert from_core is not None
    mid.inherit(from_core, now=1.2)
    _, from_mid = mid.summary_for("edge-1", _entry("mid-1"), -1, now=1.3)
    assert from_mid is not None
    slo = SLO(latency_ms=30, min_accuracy=0.97)
    # edge-1 is busy itself; knowing nothing else, it would send work to its cheap sibling
    blind = MeshView()
    blind.report("edge-1", 3000, now=1.4)
    assert planner.plan("digits", slo, "edge-1", blind, now=1.5).node == "edge-2"
    # with the summary it knows the sibling is swamped and the intermediate site is idle
    view = MeshView()
    view.report("edge-1", 3000, now=1.4)
    apply_entries(view, from_mid, now=1.4, skip=frozenset({"edge-1"}))
    assert view.queue_depth("edge-2", 1.4) == 5000 and view.queue_depth("core-1", 1.4) == 3000
    d = planner.plan("digits", slo, "edge-1", view, now=1.5)
    assert d.node == "mid-1" and d.feasible


def test_what_a_node_cannot_reach_is_passed_down_as_down() -> None:
    mid = _mid()
    mid.inherit([_entry("core-1", 2), _entry("mid-2", 1)], now=0.0)
    own = _entry("mid-1")
    version, _ = mid.summary_for("edge-1", own, -1, now=0.1)
    mid.cut_off(["core-1", "mid-2"])  # mid-1's parent stopped answering
    newer, entries = mid.summary_for("edge-1", own, version, now=0.2)
    assert newer > version and entries is not None
    by_node = {e.node: e for e in entries}
    assert not by_node["core-1"].healthy and not by_node["mid-2"].healthy
    assert by_node["core-1"].age_s == 0.0
    mid.cut_off(())
    _, entries = mid.summary_for("edge-1", own, newer, now=0.3)
    assert entries is not None and all(e.healthy for e in entries)
