"""Topology-aware planning on the live local mesh: failures, cascades, predictions."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from mesh import Client, MeshError
from mesh.testbed.local import LocalMesh

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "topologies" / "local.yaml"

pytestmark = pytest.mark.integration


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def test_queries_route_around_a_killed_node(built_home: Path, tmp_path: Path, heldout) -> None:
    """core-1 is the cheapest CNN host until its process dies; then mid-1 takes over."""
    data = yaml.safe_load(LOCAL.read_text())
    data["hardware"]["core-cpu"].update(cost_per_hour=0.001, power_w=5)
    data["membership"] = {"heartbeat_interval_s": 0.2, "missed_heartbeats": 3,
                          "stale_after_s": 3.0}
    topo = tmp_path / "cheap-core.yaml"
    topo.write_text(yaml.safe_dump(data))
    down_after_s = 0.2 * 3
    images, _ = heldout
    with LocalMesh(topo, home=built_home, run_dir=tmp_path / "run",
                   use_addresses=False) as m:
        with Client(m.url("edge-1"), timeout_s=10) as client:
            before = [client.infer("digits", images[i:i + 1], min_accuracy=0.99, latency_ms=500)
                      for i in range(5)]
            assert {r.served_by.node for r in before} == {"core-1"}
            m.kill("core-1")
            killed = time.monotonic()
            served: list[str] = []
            errors = 0
            # Generous bound: detection (0.6 s) plus propagation and a loaded 2-core machine.
            while time.monotonic() - killed < down_after_s + 20:
                try:
                    r = client.infer("digits", images[:1], min_accuracy=0.99, latency_ms=500)
                except MeshError:
                    errors += 1
                    continue
                served.append(r.served_by.node)
                if served[-5:] == ["mid-1"] * 5:
                    break
            rerouted_after_s = time.monotonic() - killed
        assert served[-5:] == ["mid-1"] * 5, (served, errors)
        # mid-1's own hop to core-1 failed, so mid-1 placed those queries again itself
        assert errors == 0, served
        assert rerouted_after_s < down_after_s + 20
        # the membership layer agrees: mid-1 lost its parent, edge-1 sees core-1 down
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            mid = _get(m.url("mid-1") + "/v1/membership")
            edge_view = _get(m.url("edge-1") + "/v1/status")["view"]
            if mid["parent_down"] and edge_view.get("core-1", {}).get("healthy") is False:
                break
            time.sleep(0.1)
        assert mid["parent_down"]
        assert edge_view["core-1"]["healthy"] is False


def test_cascade_escalates_unsure_images_and_buys_accuracy(mesh: LocalMesh, heldout) -> None:
    images, labels = heldout
    batch, truth = images[:300], labels[:300]
    before = _get(mesh.url("edge-1") + "/v1/status")["requests"]
    with Client(mesh.url("edge-1")) as client:
        cascade = client.infer("digits", batch, policy="cascade", min_confidence=0.9)
        edge_only = client.infer("digits", batch, policy="cascade", min_confidence=0.0)
    # two queries, counted as two at the entry however many stages each ran
    assert _get(mesh.url("edge-1") + "/v1/status")["requests"] - before == 2
    stats = cascade.plan.cascade
    assert cascade.served_by.node == "edge-1" and cascade.served_by.variant == "digits-linear"
    assert stats["to"] == "mid-1/digits-cnn"
    assert 0 < stats["escalated"] < 300
    assert stats["escalation_rate"] == pytest.approx(stats["escalated"] / 300, abs=1e-3)
    assert edge_only.plan.cascade["escalated"] == 0
    acc_cascade = float(np.mean(cascade.output.argmax(1) == truth))
    acc_edge = float(np.mean(edge_only.output.argmax(1) == truth))
    assert acc_cascade > acc_edge
    np.testing.assert_allclose(cascade.output.sum(1), 1.0, rtol=1e-4)


def test_results_carry_the_predicted_split_next_to_the_measured(mesh: LocalMesh, heldout) -> None:
    images, _ = heldout
    with Client(mesh.url("edge-1")) as client:
        client.infer("digits", images[:1])
        r = client.infer("digits", images[:1], min_accuracy=0.99, latency_ms=200)
    b = r.breakdown
    assert set(b["predicted"]) >= {"network_ms", "queue_ms", "compute_ms", "load_ms", "total_ms"}
    assert b["measured"]["total_ms"] == pytest.approx(r.latency_ms, abs=0.01)
    assert b["measured"]["network_ms"] >= 4.0 and b["predicted"]["network_ms"] >= 4.0
    assert r.plan.margin_ms > 0 and r.plan.feasible


def test_mesh_plan_explains_every_candidate_as_json(built_home: Path) -> None:
    from click.testing import CliRunner

    from mesh.cli import cli

    result = CliRunner().invoke(cli, ["--home", str(built_home), "plan", "--task", "digits",
                                      "--from", "edge-1", "--topology", str(LOCAL),
                                      "--min-accuracy", "0.99", "--load", "edge-2=3", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["decision"]["node"] == "mid-1" and out["decision"]["feasible"]
    assert {c["node"] for c in out["candidates"]} == {"edge-1", "edge-2", "mid-1", "core-1"}
    by_key = {(c["node"], c["variant"]): c for c in out["candidates"]}
    # the core's CNNs (the placement gives it the most accurate of the family) meet 0.99 too,
    # but cost more than mid-1's
    core_cnns = [c for c in out["candidates"] if c["node"] == "core-1" and c["accuracy"] >= 0.99]
    assert core_cnns and all("costs" in c["why_not"] for c in core_cnns)
    assert "accuracy" in by_key[("edge-1", "digits-linear")]["why_not"]
    assert by_key[("mid-1", "digits-cnn")]["why_not"] == ""
    assert by_key[("edge-2", "digits-mlp")]["predicted"]["queue_ms"] > 0
    table = CliRunner().invoke(cli, ["--home", str(built_home), "plan", "--task", "digits",
                                     "--from", "cab-7", "--topology",
                                     str(ROOT / "topologies" / "metro.yaml"),
                                     "--policy", "cascade"])
    assert table.exit_code == 0, table.output
    assert "escalates rows below 0.9 confidence" in table.output
