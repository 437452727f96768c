"""What a node measures for placement, and how a subtree's report travels up and is checked."""

from __future__ import annotations

import pytest

from mesh.placement import LoadMeter, LoadReport, VariantLoad


def test_counts_become_smoothed_rates_busy_time_and_misses() -> None:
    meter = LoadMeter(half_life_s=1.0)
    meter.report(0.0)
    now = 0.0
    for _ in range(20):  # 10 s at 50 q/s of 2-row queries, 4 ms of compute each, 1 in 5 late
        for i in range(50):
            meter.arrived("digits")
            meter.served("digits-mlp", 2, budget_ms=20.0 if i % 2 else 8.0,
                         spent_ms=25.0 if i % 5 == 0 else 5.0, min_accuracy=0.95)
            meter.computed("digits-mlp", 0.004)
        now += 1.0
        served, demand = meter.report(now, {"digits-mlp": 3}, {"digits-mlp": 1.8},
                                      {"digits-mlp": 0.6})
    load = served["digits-mlp"]
    assert load.rate_qps == pytest.approx(50, rel=0.01)
    assert load.busy == pytest.approx(0.2, rel=0.01)  # 50 q/s x 4 ms
    assert load.rows_per_query == pytest.approx(2.0)
    assert load.slo_miss_frac == pytest.approx(0.2, rel=0.02)
    assert load.latency_target_ms == 8.0  # the tightest budget seen
    assert load.min_accuracy == 0.95
    assert load.queue_depth == 3
    assert load.slowdown == 1.8  # its batches run 1.8x slower than profiled
    assert load.cpu_share == 0.6  # ... and its thread had a CPU 60% of the time
    assert demand["digits"] == pytest.approx(50, rel=0.01)


def test_a_stopped_load_decays_with_the_half_life_and_then_drops_out() -> None:
    meter = LoadMeter(half_life_s=2.0)
    meter.report(0.0)
    for _ in range(100):
        meter.served("digits-linear", 1)
        meter.arrived("digits")
    served, demand = meter.report(10.0)  # 10 q/s for 10 s (a first sample, weighted in part)
    before = served["digits-linear"].rate_qps
    served, demand = meter.report(12.0)  # nothing for one half-life
    assert served["digits-linear"].rate_qps == pytest.approx(before / 2)
    assert demand["digits"] == pytest.approx(before / 2)
    served, demand = meter.report(200.0)  # long quiet: nothing left to report
    assert served == {} and demand == {}


def test_a_subtree_report_sums_demand_upwards_and_keeps_each_nodes_served_load() -> None:
    edge1 = LoadReport.of_subtree("edge-1", {"digits-linear": VariantLoad(rate_qps=30)},
                                  {"digits": 40.0}, [], [])
    edge2 = LoadReport.of_subtree("edge-2", {}, {"digits": 10.0, "text": 5.0}, [], [])
    mid = LoadReport.of_subtree("mid-1", {"digits-cnn": VariantLoad(rate_qps=12)},
                                {"digits": 1.0}, [edge1, edge2], ["edge-1", "edge-2"])
    assert mid.demand["mid-1"] == {"digits": 51.0, "text": 5.0}
    assert mid.demand["edge-1"] == {"digits": 40.0}
    assert set(mid.served) == {"edge-1", "mid-1"}
    snapshot = mid.snapshot(down=frozenset({"edge-2"}))
    assert snapshot.demand[("digits", "mid-1")] == 51.0
    assert snapshot.served[("edge-1", "digits-linear")].rate_qps == 30
    assert snapshot.down == {"edge-2"}


def test_a_report_survives_the_wire_and_a_child_speaks_only_for_its_subtree() -> None:
    report = LoadReport.of_subtree("edge-1", {"digits-mlp": VariantLoad(
        rate_qps=12.5, busy=0.3, rows_per_query=2, queue_depth=4, slo_miss_frac=0.1,
        latency_target_ms=15.0, min_accuracy=0.97, slowdown=2.0, cpu_share=0.5)}, {"digits": 12.5}, [], [])
    back = LoadReport.from_wire(report.to_wire(), nodes={"edge-1"})
    assert back == report
    with pytest.raises(ValueError, match="not a node of the sender's subtree"):
        LoadReport.from_wire(report.to_wire(), nodes={"edge-2"})


@pytest.mark.parametrize("bad, match", [
    ([1, 2], "must be a map"),
    ({"served": []}, "must be maps"),
    ({"served": {"edge-1": {"digits-mlp": [1, 2]}}}, "list of 7 to 9 numbers"),
    ({"served": {"edge-1": {"digits-mlp": [-1, 0, 1, 0, 0, None, None]}}}, "rate_qps"),
    ({"served": {"edge-1": {"digits-mlp": ["x", 0, 1, 0, 0, None, None]}}}, "digits-mlp"),
    ({"demand": {"edge-1": {"digits": float("nan")}}}, "finite rate"),
    ({"demand": {"edge-1": {"digits": True}}}, "finite rate"),
])
def test_a_malformed_report_is_refused_naming_the_field(bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoadReport.from_wire(bad, nodes={"edge-1"}, where="heartbeat.load")
