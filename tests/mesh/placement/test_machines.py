"""Nodes that share a machine share its CPUs: the workers placement gives all of them stay
within what the machine really has, whatever their hardware classes declare. A node that
reported no machine is trusted as before."""

from __future__ import annotations

import pytest

from mesh.placement import (
    Autoscaler,
    DecisionKind,
    LoadReport,
    LoadSnapshot,
    Machine,
    Placement,
    VariantLoad,
)
from mesh.topology import Topology
from tests.mesh.placement.helpers import bundled, shipped

LAPTOP = "laptop-0123456789"  # one 2-CPU machine
SERVER = "server-abcdefabcd"  # another, with 8
EDGE = ("edge-1", "digits-linear")


def _load(busy: float) -> VariantLoad:
    return VariantLoad(rate_qps=busy * 1000, busy=busy)


def _busy_workers(topology: Topology, placement: Placement, machines: dict[str, Machine],
                  busy: set[tuple[str, str]], host: str) -> float:
    """CPUs the workers on ``host``'s nodes take: every worker of a busy variant, and every
    worker beyond the first of an idle one (its one worker is a parked session)."""
    total = 0.0
    for node, m in machines.items():
        if m.host != host:
            continue
        threads = topology.hardware_of(node).threads
        for variant, workers in placement.variants(node).items():
            total += (workers if (node, variant) in busy else workers - 1) * threads
    return total


def _scaler(topology: Topology) -> Autoscaler:
    scaler = Autoscaler(topology)
    scaler.step(bundled(), None, 0.0)
    return scaler


def test_nodes_on_one_machine_get_no_more_busy_workers_than_its_cpus() -> None:
    # local.yaml's classes declare 4 + 4 + 16 + 64 cores; the four nodes run on one laptop.
    topology, registry = shipped("local"), bundled()
    machines = {n: Machine(2.0, LAPTOP) for n in topology.nodes}
    served = {EDGE: _load(1.9), ("edge-2", "digits-linear"): _load(0.2)}
    scaler = _scaler(topology)
    r = scaler.step(registry, LoadSnapshot(demand={("digits", "edge-1"): 1900.0},
                                           served=served, machines=machines), 10.0)

    # edge-1's 4 declared cores would take 4 workers; the laptop has 2 CPUs, edge-2's busy
    # variant holds one, so edge-1 keeps its one and nothing is added anywhere.
    assert [d.kind for d in r.decisions] == [DecisionKind.BLOCKED]
    assert _busy_workers(topology, scaler.placement, machines, set(served), LAPTOP) <= 2
    reason = r.decisions[0].reason
    assert "edge-1 has 2 CPUs on host laptop-0 (shared with core-1, edge-2, mid-1), " \
           "all in use" in reason
    # no replica on mid-1 or edge-2: they run on the same two CPUs
    assert "no node near it has room for a replica on another machine" in reason

    # With edge-2 idle, edge-1 takes both CPUs and says why it stops there.
    scaler = _scaler(topology)
    r = scaler.step(registry, LoadSnapshot(demand={("digits", "edge-1"): 1900.0},
                                           served={EDGE: _load(1.9)}, machines=machines), 10.0)
    added = [d for d in r.decisions if d.kind is DecisionKind.ADD_WORKERS]
    assert [(d.node, d.workers) for d in added] == [("edge-1", 2)]
    assert "(it needs 4; edge-1 has 2 CPUs on host laptop-0" in added[0].reason
    assert "all in use" in added[0].reason
    assert not [d for d in r.decisions if d.kind is DecisionKind.REPLICATE]
    assert _busy_workers(topology, scaler.placement, machines, {EDGE}, LAPTOP) == 2


def test_a_full_machine_sends_the_overflow_to_a_replica_on_another_machine() -> None:
    # mid-1 and edge-1 share the laptop; edge-2 and core-1 run on a server.
    topology, registry = shipped("local"), bundled()
    machines = {"edge-1": Machine(2.0, LAPTOP), "mid-1": Machine(2.0, LAPTOP),
                "edge-2": Machine(8.0, SERVER), "core-1": Machine(8.0, SERVER)}
    hot = ("mid-1", "digits-cnn-onnx-fp32")
    scaler = _scaler(topology)
    r = scaler.step(registry, LoadSnapshot(
        demand={("digits", "edge-1"): 1500.0, ("digits", "edge-2"): 400.0,
                ("digits", "mid-1"): 1900.0},
        served={hot: _load(1.9)}, machines=machines), 10.0)
    # both of the laptop's CPUs, then a replica below it where the load enters: not on
    # edge-1, which sends the most but shares the laptop's CPUs, but on edge-2
    assert [(d.kind, d.node, d.workers) for d in r.decisions] == [
        (DecisionKind.ADD_WORKERS, "mid-1", 2), (DecisionKind.REPLICATE, "edge-2", 2)]
    assert "mid-1 has 2 CPUs on host laptop-0 (shared with edge-1), all in use" \
        in r.decisions[1].reason


def test_a_node_runs_no_more_workers_than_its_real_cpus_alone_on_its_machine() -> None:
    topology, registry = shipped("local"), bundled()
    scaler = _scaler(topology)
    r = scaler.step(registry, LoadSnapshot(
        demand={("digits", "edge-1"): 1900.0}, served={EDGE: _load(1.9)},
        machines={"edge-1": Machine(3.0, LAPTOP)}), 10.0)
    added = [d for d in r.decisions if d.kind is DecisionKind.ADD_WORKERS]
    assert [(d.node, d.workers) for d in added] == [("edge-1", 3)]
    assert "(it needs 4; edge-1 has 3 worker slot(s) (its 3 real CPUs))" in added[0].reason


def test_a_node_that_reports_no_machine_is_trusted_with_its_declared_cores() -> None:
    # an older node (no machines in its report): its class's 4 cores, as before
    topology, registry = shipped("local"), bundled()
    for machines in ({}, {"mid-1": Machine(2.0, LAPTOP), "core-1": Machine(2.0, LAPTOP)}):
        scaler = _scaler(topology)
        r = scaler.step(registry, LoadSnapshot(demand={("digits", "edge-1"): 1900.0},
                                               served={EDGE: _load(1.9)}, machines=machines),
                        10.0)
        added = [d for d in r.decisions if d.kind is DecisionKind.ADD_WORKERS]
        assert [(d.node, d.workers) for d in added] == [("edge-1", 4)]
        assert "CPUs" not in added[0].reason


def test_a_full_machine_under_steady_load_changes_nothing_and_says_so_once_per_hold() -> None:
    topology, registry = shipped("local"), bundled()
    machines = {n: Machine(2.0, LAPTOP) for n in topology.nodes}
    served = {EDGE: _load(1.9), ("edge-2", "digits-linear"): _load(0.6)}
    scaler = _scaler(topology)
    before = scaler.placement
    decisions = []
    for t in range(10, 3600, 5):
        decisions += scaler.step(registry, LoadSnapshot(
            demand={("digits", "edge-1"): 1900.0, ("digits", "edge-2"): 600.0},
            served=served, machines=machines), float(t)).decisions
    assert scaler.placement == before  # no worker added, none taken back, nothing moved
    assert {d.kind for d in decisions} == {DecisionKind.BLOCKED}
    assert len(decisions) <= 3600 / scaler.tuning.hold_s + 1


def test_machines_travel_up_in_load_reports_and_older_reports_lack_them() -> None:
    child = LoadReport.of_subtree("edge-1", {"digits-linear": _load(0.5)}, {"digits": 500.0},
                                  [], [], own_machine=Machine(2.0, LAPTOP))
    report = LoadReport.of_subtree("mid-1", {}, {}, [child], ["edge-1"],
                                   own_machine=Machine(2.0, LAPTOP))
    wire = report.to_wire()
    back = LoadReport.from_wire(wire, nodes={"edge-1", "mid-1"})
    assert back.snapshot().machines == {"edge-1": Machine(2.0, LAPTOP),
                                        "mid-1": Machine(2.0, LAPTOP)}
    # a report from a node of an older version: nobody's machine is known
    old = {k: v for k, v in wire.items() if k != "machines"}
    assert LoadReport.from_wire(old, nodes={"edge-1", "mid-1"}).machines == {}
    # a child may speak only for its subtree, and only in the form [cpus, host]
    with pytest.raises(ValueError, match="machines: 'core-1' is not a node"):
        LoadReport.from_wire({**wire, "machines": {"core-1": [2, LAPTOP]}},
                             nodes={"edge-1", "mid-1"})
    with pytest.raises(ValueError, match=r"machines\['edge-1'\]"):
        LoadReport.from_wire({"machines": {"edge-1": [0, LAPTOP]}}, nodes={"edge-1"})
