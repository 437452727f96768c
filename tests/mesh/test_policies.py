"""Policies are objects registered by name: adding one, asking for one, and what they may read."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mesh.errors import InvalidInput, NoRoute
from mesh.planner import (
    POLICIES,
    Decision,
    Planner,
    PlanView,
    Query,
    Rank,
    policy_named,
    register_policy,
    unregister_policy,
    walk,
    why_not,
)
from mesh.planner.tables import SUBSET_LIMIT, CandidateTable
from mesh.registry import Profile, Registry, TensorSpec, Variant
from mesh.state import MeshView
from mesh.topology import parse_topology
from mesh.wire import SLO

ROOT = Path(__file__).resolve().parents[2]


def _variant(name: str, accuracy: float, b1_ms: float) -> Variant:
    profile = Profile({1: b1_ms, 8: b1_ms * 3, 32: b1_ms * 8}, cold_start_ms=50.0)
    return Variant(
        name=name, task="digits", family="digits", arch=name.split("-")[1], format="onnx",
        precision="fp32", sha256="0" * 64, size_bytes=1000, accuracy=accuracy,
        accuracy_metric="top1", macs=1000, inputs=(TensorSpec("input", "float32", (-1, 64)),),
        outputs=(TensorSpec("probs", "float32", (-1, 10)),),
        profiles={"cpu-1t": profile, "cpu-2t": profile})


REGISTRY = Registry({v.name: v for v in (
    _variant("digits-linear", 0.95, 0.02),
    _variant("digits-mlp", 0.97, 0.05),
    _variant("digits-cnn", 0.985, 0.6),
)})


def _planner() -> Planner:
    data = yaml.safe_load((ROOT / "topologies" / "local.yaml").read_text())
    return Planner(parse_topology(data), REGISTRY, margin_ms=1.0)


class LocalOnly:
    """Never leaves the entry node: its cheapest feasible variant, else its closest miss."""

    name = "test-local-only"
    rank = Rank.COST

    def choose(self, table: CandidateTable, query: Query, view: PlanView) -> Decision:
        picked = walk.select(table.local_by_cost, Rank.COST, query, view)
        if picked is None:
            return walk.closest(table, table.local_by_cost, query, view, policy=self.name)
        return walk.decision(picked, query, view, policy=self.name, rank=Rank.COST)


class RandomHost:
    """A simulator-style baseline: any host that can serve, drawn from the view's rng."""

    name = "test-random"
    rank = Rank.LATENCY

    def choose(self, table: CandidateTable, query: Query, view: PlanView) -> Decision:
        usable = [p for r in table.rows if (p := walk.pooled(r, query, view)) is not None]
        if not usable:
            raise NoRoute("nothing can serve")
        row, total, queue, cold = usable[int(view.rng.random() * len(usable))]
        target = query.slo.latency_ms
        fits = target is None or total * (1 + view.tuning.margin_frac) + row.margin_ms <= target
        return walk.decision(((row, total, queue, cold), None, 1), query, view,
                             policy=self.name, rank=self.rank, why="drawn at random",
                             feasible=fits)


@pytest.fixture()
def registered() -> Iterator[None]:
    register_policy(LocalOnly)
    register_policy(RandomHost)
    yield
    unregister_policy(LocalOnly.name)
    unregister_policy(RandomHost.name)


def test_the_built_in_policies_are_registered_in_order() -> None:
    assert list(POLICIES)[:4] == ["cheapest", "most-accurate", "fastest", "cascade"]
    assert policy_named("fastest").rank is Rank.LATENCY


@pytest.mark.usefixtures("registered")
def test_a_registered_policy_is_what_an_slo_naming_it_gets() -> None:
    planner = _planner()
    slo = SLO(min_accuracy=0.98)
    assert planner.plan("digits", slo, "edge-1", MeshView(), now=0).node == "mid-1"
    # the edge hosts nothing that accurate: staying there misses the SLO, and says so
    d = planner.plan("digits", SLO(min_accuracy=0.98, policy="test-local-only"), "edge-1",
                     MeshView(), now=0)
    assert (d.node, d.feasible, d.policy) == ("edge-1", False, "test-local-only")
    assert "accuracy" in d.reason
    d = planner.plan("digits", SLO(policy="test-local-only"), "edge-1", MeshView(), now=0)
    assert (d.node, d.variant, d.feasible) == ("edge-1", "digits-linear", True)


@pytest.mark.usefixtures("registered")
def test_randomness_comes_from_the_rng_passed_in() -> None:
    planner = _planner()
    slo = SLO(policy="test-random")

    def draws(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [planner.plan("digits", slo, "edge-1", MeshView(), now=0, rng=rng).node
                for _ in range(40)]

    assert draws(3) == draws(3)
    assert len(set(draws(3))) > 1
    down = MeshView()
    down.set_down(["mid-1", "core-1", "edge-2"], now=0.0)
    assert {planner.plan("digits", slo, "edge-1", down, now=0, rng=random.Random(s)).node
            for s in range(20)} == {"edge-1"}


@pytest.mark.usefixtures("registered")
def test_explain_orders_and_judges_candidates_by_the_policys_rank() -> None:
    d = _planner().plan("digits", SLO(policy="test-random"), "edge-1", MeshView(), now=0,
                        explain=True, rng=random.Random(1))
    totals = [s.prediction.total_ms for s in d.candidates]
    assert totals == sorted(totals)  # latency order, as the policy's rank says
    losers = [why_not(d, s) for s in d.candidates
              if (s.candidate.node, s.candidate.variant) != (d.node, d.variant)]
    assert any(w.startswith("slower by") for w in losers)


def test_an_unknown_policy_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(InvalidInput, match=r"slo.policy: 'nope' is not one of \['cheapest'"):
        _planner().plan("digits", SLO(policy="nope"), "edge-1", MeshView(), now=0)
    register_policy(LocalOnly)
    unregister_policy(LocalOnly.name)
    with pytest.raises(InvalidInput, match="test-local-only"):
        _planner().plan("digits", SLO(policy=LocalOnly.name), "edge-1", MeshView(), now=0)


def test_registering_needs_a_name_and_does_not_replace_another_policy() -> None:
    class Nameless:
        rank = Rank.COST

    with pytest.raises(ValueError, match="class attribute `name`"):
        register_policy(Nameless)

    class Impostor(LocalOnly):
        name = "cheapest"

    with pytest.raises(ValueError, match="'cheapest' is already registered by Cheapest"):
        register_policy(Impostor)
    assert type(POLICIES["cheapest"]).__name__ == "Cheapest"


def test_plan_query_decides_as_plan_does() -> None:
    planner = _planner()
    view = MeshView()
    view.report("mid-1", 30, now=0.0)
    for slo in (SLO(), SLO(latency_ms=20, min_accuracy=0.97), SLO(policy="cascade"),
                SLO(policy="fastest", latency_ms=3)):
        a = planner.plan("digits", slo, "edge-1", view, now=0.5, rows=4, payload_bytes=1024,
                         rng=random.Random(2))
        b = planner.plan_query(Query("digits", slo, rows=4, payload_bytes=1024), "edge-1", view,
                               now=0.5, rng=random.Random(2))
        assert a.to_dict() == b.to_dict()


def test_thresholds_chosen_by_clients_do_not_grow_the_tables() -> None:
    planner = _planner()
    fresh = _planner()
    for i in range(1000):
        threshold = 0.9 + i * 1e-5
        for policy in ("cheapest", "most-accurate", "cascade"):
            slo = SLO(min_accuracy=threshold, policy=policy)
            d = planner.plan("digits", slo, "edge-1", MeshView(), now=0)
            if i % 250 == 0:  # remembering fewer subsets changes no decision
                assert d == fresh.plan("digits", slo, "edge-1", MeshView(), now=0)
    assert len(planner.table("edge-1", "digits").cache) <= SUBSET_LIMIT


def test_the_policy_registry_loads_without_the_planners_tables() -> None:
    # mesh.wire checks SLO.policy against it; the SDK must not pay for networkx and pydantic.
    code = ("import sys, mesh.planner.policy as p; "
            "assert list(p.POLICIES)[:4] == ['cheapest', 'most-accurate', 'fastest', 'cascade']; "
            "heavy = {'networkx', 'pydantic', 'mesh.planner.core', 'mesh.topology'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
