"""Following the load with a controllable clock: scale up, scale down, no flapping, replicas
near the load, faster variants and hardware, forecasts, new models, failures, memory."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import pytest

from mesh.placement import (
    Autoscaler,
    Cause,
    DecisionKind,
    Forecaster,
    LoadSnapshot,
    PlacementDecision,
    Round,
    Tuning,
    VariantLoad,
)
from mesh.registry import Profile, Registry
from mesh.topology import parse_topology
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

TUNING = Tuning()  # hold 60 s, cold 120 s before scale-down, idle 300 s before eviction


def _load(busy: float) -> VariantLoad:
    return VariantLoad(rate_qps=busy * 1000, busy=busy)


def _run(scaler: Autoscaler, registry: Registry, until: float,
         snapshot: Callable[[float, Autoscaler], LoadSnapshot], *, step: float = 10.0,
         start: float = 10.0) -> list[Round]:
    """Rounds every ``step`` seconds; checks memory budgets after each."""
    rounds = []
    t = start
    while t <= until:
        rounds.append(scaler.step(registry, snapshot(t, scaler), t))
        assert_within_memory(scaler.topology, registry, scaler.placement)
        t += step
    return rounds


def _changes(rounds: list[Round], pair: tuple[str, str] | None = None) -> list[PlacementDecision]:
    return [d for r in rounds for d in r.decisions
            if d.kind not in (DecisionKind.BLOCKED, DecisionKind.UNCOVERED)
            and (pair is None or (d.node, d.variant) == pair)]


def _assert_held(rounds: list[Round], hold_s: float) -> None:
    last: dict[tuple[str, str], float] = {}
    for d in _changes(rounds):
        pair = (d.node, d.variant)
        if pair in last and d.cause is not Cause.BASE:
            assert d.at - last[pair] >= hold_s, f"{pair} changed twice within {hold_s} s"
        last[pair] = d.at


def test_rising_load_adds_workers_then_a_replica_and_falling_load_gives_them_back() -> None:
    topology, registry = shipped("local"), bundled()
    scaler = Autoscaler(topology)
    initial = scaler.step(registry, None, 0.0).placement
    edge, mid = ("edge-1", "digits-linear"), ("mid-1", "digits-linear")

    def demand(t: float) -> float:  # worker-seconds per second: up to 6 by t=600, then 0.1
        return min(t / 100.0, 6.0) if t < 1200 else 0.1

    def snapshot(t: float, s: Autoscaler) -> LoadSnapshot:
        # the edge copy takes what its workers can (each busy at most all the time), the
        # replica upstream the rest
        here = min(demand(t), 1.0 * s.placement.workers(*edge))
        served = {edge: _load(here)}
        if s.placement.workers(*mid):
            served[mid] = _load(max(demand(t) - here, 0.0))
        return LoadSnapshot(demand={("digits", "edge-1"): demand(t) * 1000}, served=served)

    rounds = _run(scaler, registry, 2400.0, snapshot)

    grew = [d for d in _changes(rounds, edge) if d.kind is DecisionKind.ADD_WORKERS]
    assert [d.workers for d in grew] == sorted(d.workers for d in grew)
    assert grew[-1].workers == 4  # edge-cpu: 4 cores, 1 thread each
    assert "busy over" in grew[0].reason and grew[0].cause is Cause.LOAD
    replica = [d for d in _changes(rounds) if d.kind is DecisionKind.REPLICATE]
    assert [(d.node, d.variant) for d in replica] == [mid]
    assert "a replica on mid-1 (its parent)" in replica[0].reason
    assert replica[0].at >= grew[-1].at  # workers first, then more nodes
    shrank = [d for d in _changes(rounds, edge) if d.kind is DecisionKind.REMOVE_WORKERS]
    assert shrank and shrank[-1].workers == 1 and shrank[0].at >= 1200 + TUNING.scale_down_after_s
    evicted = _changes(rounds, mid)[-1]
    assert evicted.kind is DecisionKind.EVICT and evicted.cause is Cause.IDLE
    assert evicted.at >= 1200 + TUNING.idle_evict_s
    assert scaler.placement == initial  # back to the base placement
    _assert_held(rounds, TUNING.hold_s)


def test_load_hovering_at_the_threshold_changes_the_workers_once() -> None:
    topology, registry = shipped("local"), bundled()
    scaler = Autoscaler(topology)
    scaler.step(registry, None, 0.0)
    pair = ("edge-1", "digits-mlp")

    def hovering(t: float, s: Autoscaler) -> LoadSnapshot:
        return LoadSnapshot(served={pair: _load(0.72 if int(t / 5) % 2 else 0.78)})

    rounds = _run(scaler, registry, 3600.0, hovering, step=5.0)
    assert [(d.kind, d.workers) for d in _changes(rounds)] == [(DecisionKind.ADD_WORKERS, 2)]


def test_load_swinging_faster_than_the_cool_down_keeps_its_workers() -> None:
    topology, registry = shipped("local"), bundled()
    scaler = Autoscaler(topology)
    scaler.step(registry, None, 0.0)
    pair = ("edge-1", "digits-mlp")

    def swinging(t: float, s: Autoscaler) -> LoadSnapshot:
        return LoadSnapshot(served={pair: _load(1.4 if int(t / 30) % 2 else 0.2)})

    rounds = _run(scaler, registry, 3600.0, swinging)
    assert [(d.kind, d.workers) for d in _changes(rounds)] == [(DecisionKind.ADD_WORKERS, 3)]


def _square(**hardware) -> dict:
    """A core, one site and two edge nodes under it."""
    hw = {"one": {"kind": "cpu", "threads": 1, "cores": 1, "memory_mb": 2048},
          "big": {"kind": "cpu", "threads": 1, "cores": 8, "memory_mb": 8192}}
    hw.update(hardware)
    return {
        "name": "square", "hardware": hw,
        "nodes": [{"name": "core", "tier": "core", "hardware": "big"},
                  {"name": "site", "tier": "intermediate", "hardware": "one"},
                  {"name": "e1", "tier": "edge", "hardware": "one"},
                  {"name": "e2", "tier": "edge", "hardware": "one"}],
        "links": [{"between": ["site", "core"], "latency_ms": 5, "bandwidth_mbps": 1000},
                  {"between": ["e1", "site"], "latency_ms": 1, "bandwidth_mbps": 100},
                  {"between": ["e2", "site"], "latency_ms": 1, "bandwidth_mbps": 100}]}


def test_a_hot_variant_on_a_full_node_is_replicated_where_its_load_comes_from() -> None:
    topology, registry = parse_topology(_square()), bundled()
    scaler = Autoscaler(topology)
    scaler.step(registry, None, 0.0)
    hot = ("site", "digits-cnn-onnx-fp32")
    load = LoadSnapshot(demand={("digits", "e1"): 5.0, ("digits", "e2"): 50.0,
                                ("digits", "site"): 55.0},
                        served={hot: _load(0.95)})

    decisions = scaler.step(registry, load, 10.0).decisions

    assert [(d.kind, d.node, d.variant) for d in decisions] == [
        (DecisionKind.REPLICATE, "e2", "digits-cnn-onnx-fp32")]
    assert "site has 1 worker slot(s)" not in decisions[0].reason  # no workers were added
    assert "below it, 50.0 q/s of digits enter there" in decisions[0].reason

    # a node known to be down gets nothing: the next nearest load does
    scaler = Autoscaler(topology)
    scaler.step(registry, None, 0.0)
    decisions = scaler.step(registry, replace(load, down=frozenset({"e2"})), 10.0).decisions
    assert [(d.kind, d.node) for d in decisions] == [(DecisionKind.REPLICATE, "e1")]


def test_when_no_replica_can_help_a_faster_variant_joins_or_it_says_why() -> None:
    topology, registry = parse_topology(_square(big={"kind": "cpu", "cores": 1})), bundled()
    busy_elsewhere = {("e1", "digits-linear"): _load(0.9), ("e2", "digits-linear"): _load(0.9),
                      ("core", "digits-linear"): _load(0.9)}
    hot = ("site", "digits-cnn-onnx-fp32")
    # the site hosts the more accurate two thirds of digits: these three are faster than it
    siblings = ("digits-cnn-student", "digits-cnn-tflite-int8", "digits-cnn-onnx-int8")

    def scale(min_accuracy: float, siblings_busy: float) -> list[PlacementDecision]:
        scaler = Autoscaler(topology)
        assert set(siblings) < set(scaler.step(registry, None, 0.0).placement.variants("site"))
        served = {**busy_elsewhere,
                  hot: VariantLoad(rate_qps=900, busy=0.95, min_accuracy=min_accuracy),
                  **{("site", s): _load(siblings_busy) for s in siblings}}
        return [d for d in scaler.step(registry, LoadSnapshot(served=served), 10.0).decisions
                if d.node == "site"]

    # a faster variant with room is there: the planner's accuracy scaling uses it, nothing to add
    assert scale(0.97, 0.1) == []
    # all of them overloaded too: the best faster one the site lacks joins (the MLP)
    switched = scale(0.97, 0.9)
    assert [(d.kind, d.variant) for d in switched][:1] == [(DecisionKind.SWITCH, "digits-mlp")]
    assert "queries whose min_accuracy allows take it" in switched[0].reason
    # unless the queries need more accuracy than it has: then it says why nothing was done
    blocked = [d for d in scale(0.99, 0.9) if d.variant == hot[1]]
    assert [d.kind for d in blocked] == [DecisionKind.BLOCKED]
    assert "nothing can take more" in blocked[0].reason


def test_queries_missing_their_target_on_slow_hardware_move_to_faster_hardware() -> None:
    fast_site = {"kind": "cpu", "threads": 4, "cores": 16, "memory_mb": 8192}
    topology = parse_topology(_square(four=fast_site) | {"nodes": [
        {"name": "core", "tier": "core", "hardware": "big"},
        {"name": "site", "tier": "intermediate", "hardware": "four"},
        {"name": "e1", "tier": "edge", "hardware": "one"},
        {"name": "e2", "tier": "edge", "hardware": "one"}]})
    tflite = MINILM[0]
    quick = replace(tflite, profiles={**tflite.profiles, "cpu-4t": Profile(
        {1: 1.5, 8: 6.0, 32: 21.0}, cold_start_ms=50, peak_memory_bytes=100 * 2**20)})
    registry = registry_of(*DIGITS, quick, *MINILM[1:])
    scaler = Autoscaler(topology)
    scaler.step(registry, None, 0.0)
    slow = ("e1", "minilm-tflite-int8")
    missing = VariantLoad(rate_qps=20, busy=0.1, slo_miss_frac=0.3, latency_target_ms=5.0)

    decisions = scaler.step(registry, LoadSnapshot(served={slow: missing}), 10.0).decisions

    assert [(d.kind, d.node, d.variant, d.cause) for d in decisions] == [
        (DecisionKind.SWITCH, "site", "minilm-tflite-int8", Cause.SLO)]
    assert "replicas cannot help" in decisions[0].reason
    assert "site's hardware runs it in 1.50 ms" in decisions[0].reason


DAY = 2400.0


def _daily(t: float) -> float:
    return 180.0 - 150.0 * math.cos(2 * math.pi * t / DAY)  # q/s: 30 at night, 330 at noon


def test_a_learned_daily_rise_is_met_ahead_of_time() -> None:
    topology, registry = shipped("local"), bundled()
    tuning = Tuning(preload_horizon_s=300.0)
    scaler = Autoscaler(topology, tuning=tuning,
                        forecaster=Forecaster(period_s=DAY, buckets=24, half_life_s=60.0))
    scaler.step(registry, None, 0.0)
    pair = ("edge-1", "digits-mlp")
    over: dict[int, int] = {}

    def snapshot(t: float, s: Autoscaler) -> LoadSnapshot:
        busy = _daily(t) / 150.0  # 0.2 to 2.2 worker-seconds per second
        if busy / s.placement.workers(*pair) > tuning.scale_up_util:
            over[int(t // DAY)] = over.get(int(t // DAY), 0) + 1
        return LoadSnapshot(demand={("digits", "edge-1"): _daily(t)},
                            served={pair: VariantLoad(rate_qps=_daily(t), busy=busy)})

    rounds = _run(scaler, registry, 4 * DAY, snapshot)

    ahead = [d for d in _changes(rounds, pair) if d.cause is Cause.FORECAST]
    assert ahead and all(d.kind is DecisionKind.ADD_WORKERS for d in ahead)
    assert ahead[0].at > DAY  # only once a day's shape was learned
    assert ahead[0].reason.startswith("forecast: digits entering below edge-1 rises to")
    # the first day the rise outran the workers now and then; once learned, never
    assert over[0] > 0 and over.get(2, 0) == over.get(3, 0) == 0
    _assert_held(rounds, tuning.hold_s)


def test_a_new_model_is_placed_on_the_next_round_and_a_removed_one_dropped() -> None:
    topology = shipped("campus")
    scaler = Autoscaler(topology)
    scaler.step(bundled(), None, 0.0)
    speech = (make_variant("speech-small-int8", "speech", 0.90, 2.0, 30.0, precision="int8"),
              make_variant("speech-large", "speech", 0.95, 20.0, 300.0))
    registry = registry_of(*DIGITS, *MINILM, *speech)

    added = scaler.step(registry, LoadSnapshot(), 5.0)

    assert {d.kind for d in added.decisions} == {DecisionKind.PLACE}
    assert {d.variant for d in added.decisions} == {v.name for v in speech}
    assert all(d.cause is Cause.REGISTRY and d.reason.startswith("new variant ")
               for d in added.decisions)
    assert_every_task_reachable(topology, registry, added.placement)
    assert set(added.placement.variants("gym-gate")) >= {"speech-small-int8"}

    removed = scaler.step(registry_of(*DIGITS[1:], *MINILM, *speech), LoadSnapshot(), 10.0)

    dropped = [d for d in removed.decisions if d.kind is DecisionKind.DROP]
    assert {d.variant for d in dropped} == {"digits-linear"}
    assert "no longer registered" in dropped[0].reason
    assert removed.placement.hosts("digits-linear") == []
    assert "digits-mlp" in removed.placement.variants("gym-gate")


def test_a_variant_a_node_cannot_load_is_dropped_there_and_the_task_stays_reachable() -> None:
    topology, registry = shipped("local"), bundled()
    scaler = Autoscaler(topology)
    scaler.step(registry, None, 0.0)
    failed = LoadSnapshot(failed={"edge-1": frozenset({"minilm-tflite-int8",
                                                       "minilm-onnx-int8-dynamic"})})

    round_ = scaler.step(registry, failed, 5.0)

    assert {(d.kind, d.node, d.cause) for d in round_.decisions} == {
        (DecisionKind.DROP, "edge-1", Cause.FAILED)}
    assert not any(v.startswith("minilm") for v in round_.placement.variants("edge-1"))
    assert_every_task_reachable(topology, registry, round_.placement)


def test_workers_stop_where_memory_ends() -> None:
    def tight(doc):
        doc["hardware"]["edge-cpu"]["memory_mb"] = 400

    topology, registry = shipped("local", edit=tight), bundled()
    scaler = Autoscaler(topology)
    scaler.step(registry, None, 0.0)
    pair = ("edge-1", "minilm-tflite-int8")  # 100 MB a worker; the base uses ~130 MB

    decisions = scaler.step(registry, LoadSnapshot(served={pair: _load(3.0)}), 10.0).decisions

    grew = [d for d in decisions if (d.node, d.variant) == pair]
    assert [(d.kind, d.workers) for d in grew] == [(DecisionKind.ADD_WORKERS, 3)]
    assert "edge-1 has memory for 3 worker(s)" in grew[0].reason
    assert_within_memory(topology, registry, scaler.placement)


def test_a_round_and_its_placement_serialise_for_status() -> None:
    from mesh.placement import Placement

    topology, registry = shipped("local"), bundled()
    round_ = Autoscaler(topology).step(registry, None, 0.0)
    doc = round_.to_json()
    assert doc["placement"]["edge-1"]["digits-linear"] == 1
    assert doc["decisions"][0]["kind"] == "place" and doc["decisions"][0]["reason"]
    assert "minilm-torch-fp32" in doc["unplaced"]
    assert Placement.from_json(doc["placement"]) == round_.placement
    try:
        Placement({"edge-1": {"digits-linear": 0}})
    except ValueError as exc:
        assert "placement['edge-1']['digits-linear']: workers must be an integer >= 1" in str(exc)
    else:
        raise AssertionError("a worker count of 0 was accepted")


def test_memory_for_a_faster_variant_comes_from_a_cold_one_which_returns_later() -> None:
    vision = [make_variant(f"vision-{name}", "vision", acc, ms, 50.0)
              for name, acc, ms in (("a", 0.90, 1.0), ("b", 0.95, 2.0), ("c", 0.97, 4.0),
                                    ("d", 0.99, 8.0))]
    text = [make_variant("text-x1", "text", 0.90, 1.0, 25.0),
            make_variant("text-x2", "text", 0.95, 2.0, 25.0)]
    registry = registry_of(*vision, *text)
    doc = _square(one={"kind": "cpu", "threads": 1, "cores": 1, "memory_mb": 180},
                  big={"kind": "cpu", "cores": 1})
    topology = parse_topology(doc)
    scaler = Autoscaler(topology, tuning=Tuning(base_memory_frac=1.0))
    base = scaler.step(registry, None, 0.0).placement
    assert set(base.variants("site")) == {"vision-c", "vision-d", "text-x1", "text-x2"}  # 150 MB
    neighbours_busy = {("e1", "vision-a"): _load(0.9), ("e2", "vision-a"): _load(0.9),
                       ("core", "vision-a"): _load(0.9)}

    def snapshot(t: float, s: Autoscaler) -> LoadSnapshot:
        if t < 100:  # both vision variants on the site are hot, and nothing near it has room
            return LoadSnapshot(served={**neighbours_busy, ("site", "vision-d"): _load(0.95),
                                        ("site", "vision-c"): _load(0.9)})
        return LoadSnapshot(served={("site", "vision-d"): _load(0.1)})

    rounds = _run(scaler, registry, 900.0, snapshot)

    first = [(d.kind, d.variant, d.cause) for d in rounds[0].decisions if d.node == "site"]
    assert first == [(DecisionKind.EVICT, "text-x1", Cause.PRESSURE),
                     (DecisionKind.SWITCH, "vision-b", Cause.LOAD)]
    assert "its 25.0 MB are needed for vision-b" in rounds[0].decisions[0].reason
    later = [(d.kind, d.variant, d.cause) for r in rounds[1:] for d in r.decisions
             if d.node == "site"]
    assert later == [(DecisionKind.EVICT, "vision-b", Cause.IDLE),
                     (DecisionKind.PLACE, "text-x1", Cause.RESTORE)]
    assert scaler.placement == base


@pytest.mark.parametrize("measured, said", [
    # its batches run 2.5x slower than profiled
    ({"slowdown": 2.5}, "2.5x slower than profiled"),
    # its batches run as profiled, but its compute thread had a CPU only 40% of the time
    ({"cpu_share": 0.4}, "getting a CPU 40% of the time"),
])
def test_a_hot_variant_on_a_contended_cpu_gets_a_replica_not_more_workers(
        measured: dict[str, float], said: str) -> None:
    # The node's CPU is shared and spent: more workers there would only share the same
    # cores, so the load goes to a replica near it instead.
    topology, registry = shipped("local"), bundled()
    scaler = Autoscaler(topology)
    scaler.step(registry, None, 0.0)
    edge = ("edge-1", "digits-linear")
    hot = replace(_load(0.95), **measured)
    r = scaler.step(registry, LoadSnapshot(demand={("digits", "edge-1"): 950.0},
                                           served={edge: hot}), 10.0)
    assert not [d for d in r.decisions if d.kind is DecisionKind.ADD_WORKERS]
    assert scaler.placement.workers(*edge) == 1
    replica = [d for d in r.decisions if d.kind is DecisionKind.REPLICATE]
    assert replica and replica[0].node == "mid-1"
    assert said in replica[0].reason
    # The same load on a CPU of its own gets workers first.
    fresh = Autoscaler(topology)
    fresh.step(registry, None, 0.0)
    r = fresh.step(registry, LoadSnapshot(demand={("digits", "edge-1"): 950.0},
                                          served={edge: _load(0.95)}), 10.0)
    assert [d.kind for d in r.decisions if d.node == "edge-1"] == [DecisionKind.ADD_WORKERS]
