"""Live placement: load measured on the nodes goes up in heartbeats, the root decides, the
nodes carry it out. Real agents and real membership over loopback HTTP; the placement's
clock is the test's, so an hour of cool-down takes no time."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.errors import CannotMeetDeadline, Overloaded
from mesh.placement import Machine
from mesh.topology import parse_topology
from mesh.wire import SLO, InferRequest
from nodes.agent import NodeAgent

#: thresholds low enough that a few hundred real digits queries a second make a variant hot
TUNING = {"scale_up_util": 0.004, "target_util": 0.002, "scale_down_util": 0.0005,
          "hold_s": 30.0, "scale_down_after_s": 60.0, "idle_evict_s": 600.0}


def _topology(tuning: dict[str, float] = TUNING, *, edge_cores: int = 4, core_cores: int = 8,
              **placement: float) -> Any:
    return parse_topology({
        "name": "pair",
        "hardware": {"edge-box": {"kind": "cpu", "threads": 1, "cores": edge_cores,
                                  "memory_mb": 512},
                     "core-box": {"kind": "cpu", "threads": 1, "cores": core_cores,
                                  "memory_mb": 2048}},
        # no variants: lists: the mesh decides what each node hosts
        "nodes": [{"name": "core-1", "tier": "core", "hardware": "core-box"},
                  {"name": "edge-1", "tier": "edge", "hardware": "edge-box"}],
        "links": [{"between": ["edge-1", "core-1"], "latency_ms": 1, "bandwidth_mbps": 1000}],
        "membership": {"heartbeat_interval_s": 0.05, "missed_heartbeats": 10,
                       "stale_after_s": 2.0, "startup_grace_s": 1.0},
        "placement": {"interval_s": 0.2, **placement, "tuning": tuning},
    })


class Clock:
    """The placement's time, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def until(predicate: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.02)


async def load(agent: NodeAgent, images: np.ndarray, seconds: float, slo: SLO) -> int:
    """Queries entering at ``agent`` as a client's would, 8 at a time, for ``seconds``;
    returns how many were answered (on a busy test machine admission may refuse a few:
    the load is what these tests are about, not its latency)."""
    sent = answered = 0
    stop = time.monotonic() + seconds

    async def one(i: int) -> int:
        req = InferRequest(task="digits", tensors=[images[i % len(images)][None]], slo=slo,
                           request_id=f"q{i}")
        try:
            await agent.infer(req, from_client=True)
        except (CannotMeetDeadline, Overloaded):
            return 0
        return 1

    while time.monotonic() < stop:
        answered += sum(await asyncio.gather(*(one(sent + k) for k in range(8))))
        sent += 8
    return answered


def decisions(agent: NodeAgent, kind: str, node: str | None = None) -> list[dict[str, Any]]:
    live = agent.status()["placement"]["live"]
    return [d for d in agent.placement.history if d["kind"] == kind
            and (node is None or d["node"] == node)] if live else []


async def test_rising_load_adds_workers_on_the_node_and_falling_load_takes_them_back(
        digits_home: Path, heldout: Any, live_mesh: Any) -> None:
    images = heldout[0].astype(np.float32)
    clock = Clock()
    async with live_mesh(_topology(), digits_home, clock) as mesh:
        core, edge = mesh.agents["core-1"], mesh.agents["edge-1"]
        # The root's first round publishes the base placement; the edge adopts it.
        await until(lambda: edge.placement.version and
                    edge.placement.version == core.placement.version, "the edge adopts a placement")
        hosted = dict(edge.placement.placement.variants("edge-1"))
        assert hosted and all(w == 1 for w in hosted.values())

        # Load: digits queries entering at the edge, served there.
        answered = await load(edge, images, 3.0, SLO(latency_ms=50))
        assert answered > 100
        served = core.placement.load().served.get("edge-1", {})
        hot = max(served, key=lambda v: served[v].busy or 0.0)
        assert served[hot].rate_qps > 10  # the edge's measurements reached the root
        added = await until(lambda: decisions(core, "add-workers", "edge-1"),
                            "the root adds workers on the edge")
        assert added[0]["variant"] == hot and added[0]["cause"] == "load"
        assert "busy" in added[0]["reason"] or "util" in added[0]["reason"]
        want = added[0]["workers"]
        assert want > 1
        await until(lambda: edge.models.workers(hot) == want, "the edge runs the new workers")
        row = next(v for v in edge.status()["variants"] if v["name"] == hot)
        assert row["workers"] == want
        # ... and still answers on every worker
        assert await load(edge, images, 0.5, SLO(latency_ms=50)) > 0

        # The load stops. Nothing changes before the cool-down has passed...
        await until(lambda: (core.placement.load().served.get("edge-1", {}).get(hot) is None
                             or core.placement.load().served["edge-1"][hot].rate_qps < 0.5),
                    "the edge reports its variant cold")
        rounds = core.placement.rounds
        await until(lambda: core.placement.rounds > rounds + 2, "a few more rounds")
        assert not decisions(core, "remove-workers", "edge-1")
        # ... and after it (the test's clock jumps), the workers go back.
        clock.now += 2 * TUNING["scale_down_after_s"]
        await until(lambda: decisions(core, "remove-workers", "edge-1"),
                    "the root takes the workers back")
        await until(lambda: edge.models.workers(hot) == 1, "the edge retires its extra workers")
        # No flapping: one step up, one step down.
        assert len(decisions(core, "add-workers", "edge-1")) == 1
        assert len(decisions(core, "remove-workers", "edge-1")) == 1
        status = edge.status()["placement"]["live"]
        assert status["version"] == core.placement.version
        assert status["hosts"][hot] == 1


async def test_a_restarted_node_rejoins_and_gets_its_live_placement_back(
        digits_home: Path, heldout: Any, live_mesh: Any) -> None:
    images = heldout[0].astype(np.float32)
    clock = Clock()
    async with live_mesh(_topology(), digits_home, clock) as mesh:
        core, edge = mesh.agents["core-1"], mesh.agents["edge-1"]
        await load(edge, images, 3.0, SLO(latency_ms=50))
        added = await until(lambda: decisions(core, "add-workers", "edge-1"),
                            "the root adds workers on the edge")
        hot, want = added[0]["variant"], added[0]["workers"]
        await until(lambda: edge.models.workers(hot) == want, "the edge runs the new workers")
        pulled = sum(edge.artifacts.fetches.values())
        assert pulled > 0  # it started empty and pulled what it hosts through its parent

        await mesh.stop("edge-1")  # a reboot: nothing kept but its home
        edge = await mesh.start("edge-1")
        # It serves at once from its own store (no pull again), under the base placement...
        assert hot in edge.loaded and sum(edge.artifacts.fetches.values()) == 0
        # ... heartbeats to its parent again, and is handed the live placement, workers too.
        await until(lambda: edge.placement.version == core.placement.version,
                    "the restarted edge adopts the root's placement")
        await until(lambda: edge.models.workers(hot) == want,
                    "the restarted edge runs the workers the placement gives it")
        r = await edge.infer(InferRequest(task="digits", tensors=[images[:1]],
                                          slo=SLO(latency_ms=50)), from_client=True)
        assert r.served_by.node == "edge-1"


async def test_nodes_on_one_machine_get_no_more_workers_together_than_its_cpus(
        digits_home: Path, heldout: Any, live_mesh: Any) -> None:
    # The edge's class declares 4 cores and the core's 8; both agents run in this process,
    # on this machine. Pinned to two of its CPUs, that is what they measure.
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs a machine with two CPUs to pin the nodes to")
    images = heldout[0].astype(np.float32)
    clock = Clock()
    os.sched_setaffinity(0, set(sorted(allowed)[:2]))
    try:
        async with live_mesh(_topology(), digits_home, clock) as mesh:
            core, edge = mesh.agents["core-1"], mesh.agents["edge-1"]
            machines = [a.status()["machine"] for a in (core, edge)]
            assert [(m["declared_cores"], m["cpus"]) for m in machines] == [(8, 2), (4, 2)]
            assert machines[0]["host"] == machines[1]["host"]  # one machine, one host
            await until(lambda: set(core.placement.load().machines) == {"core-1", "edge-1"},
                        "the root knows both nodes' machines from their reports")

            # Load far beyond what 4 workers carry: the edge gets the machine's 2 CPUs, and
            # the decision says why it stops there.
            assert await load(edge, images, 3.0, SLO(latency_ms=50)) > 100
            added = await until(lambda: decisions(core, "add-workers", "edge-1"),
                                "the root adds workers on the edge")
            hot = added[0]["variant"]
            assert added[0]["workers"] == 2
            assert "edge-1 has 2 CPUs on host" in added[0]["reason"]
            assert "(shared with core-1), all in use" in added[0]["reason"]
            await until(lambda: edge.models.workers(hot) == 2, "the edge runs 2 workers")

            # Still as much once the hold has passed: nothing more fits on this machine, and
            # a replica on the core would share its CPUs, so no worker is added anywhere.
            clock.now += TUNING["hold_s"] + 1
            rounds = core.placement.rounds
            assert await load(edge, images, 3.0, SLO(latency_ms=50)) > 100
            await until(lambda: core.placement.rounds > rounds + 3, "rounds under that load")
            assert [d["workers"] for d in decisions(core, "add-workers")] == [2]
            assert not decisions(core, "replicate")
            # Whatever the classes declare, the variants that served queries on the two
            # nodes together have no more workers than the machine has CPUs.
            busy = [(a.name, v["name"], v["workers"]) for a in (core, edge)
                    for v in a.status()["variants"] if v.get("served") and v.get("loaded")]
            assert busy and sum(w for _, _, w in busy) <= 2, busy
    finally:
        os.sched_setaffinity(0, allowed)


class Trace:
    """Queries entering at ``edge`` at the rates the test sets, paced in real time: cheap
    ones (any variant) and accurate ones (``min_accuracy`` 0.98: only the CNN)."""

    tick_s = 0.02

    def __init__(self, edge: NodeAgent, images: np.ndarray) -> None:
        self.edge, self.images = edge, images
        self.cheap_qps = self.accurate_qps = 0.0
        self.answers: list[tuple[str, str]] = []  # (node, variant) of accurate queries
        self._due = {"cheap": 0.0, "accurate": 0.0}
        self._sent = 0
        self._pending: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Trace:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._pending, return_exceptions=True)

    async def _one(self, kind: str) -> None:
        self._sent += 1
        slo = SLO(latency_ms=50, min_accuracy=0.98 if kind == "accurate" else None)
        req = InferRequest(task="digits", slo=slo, request_id=f"t{self._sent}",
                           tensors=[self.images[self._sent % len(self.images)][None]])
        try:
            r = await self.edge.infer(req, from_client=True)
        except (CannotMeetDeadline, Overloaded):
            return
        if kind == "accurate":
            self.answers.append((r.served_by.node, r.served_by.variant))

    async def _run(self) -> None:
        while True:
            for kind, rate in (("cheap", self.cheap_qps), ("accurate", self.accurate_qps)):
                self._due[kind] += rate * self.tick_s
                while self._due[kind] >= 1:
                    self._due[kind] -= 1
                    task = asyncio.create_task(self._one(kind))
                    self._pending.add(task)
                    task.add_done_callback(self._pending.discard)
            await asyncio.sleep(self.tick_s)  # pacing the arrivals, not synchronisation


async def test_a_variant_loads_ahead_of_a_learned_daily_rise_and_hides_its_cold_start(
        digits_home: Path, heldout: Any, live_mesh: Any) -> None:
    # A compressed day of 48 slices; the test's clock walks through it slice by slice while
    # real queries enter at the edge at each slice's rate. Day 1: cheap digits queries, a
    # trickle at night and many from slice 30 to 41 (the forecasts learn the day's shape).
    # Day 2: accurate queries too (only the core's CNN meets them), a trickle at night; the
    # root must place the CNN on the edge before their rise at slice 30, not after it.
    day_s, slices = 4800.0, 48
    slice_s = day_s / slices
    tuning = {"scale_up_util": 0.003, "target_util": 0.0015, "scale_down_util": 0.0003,
              "hold_s": 30.0, "scale_down_after_s": 1200.0, "idle_evict_s": 3000.0,
              "preload_horizon_s": 400.0, "max_forecast_growth": 100.0}
    # The two nodes stand for two machines: the edge a 16-core box, the core one CPU (so
    # the CNN's rise cannot be met with workers there, only with a replica near the load).
    topology = _topology(tuning, edge_cores=16, core_cores=1, interval_s=0.05, day_s=day_s)
    machines = {"edge-1": Machine(16.0, "edge-box-host"), "core-1": Machine(1.0, "core-host")}
    images = heldout[0].astype(np.float32)
    clock = Clock()
    midnight = 10 * day_s
    clock.now = midnight
    async with live_mesh(topology, digits_home, clock, machines) as mesh:
        core, edge = mesh.agents["core-1"], mesh.agents["edge-1"]
        await until(lambda: edge.placement.version == core.placement.version,
                    "the edge adopts the root's placement")
        assert "digits-cnn" not in edge.placement.placement.variants("edge-1")

        async def rounds(n: int) -> None:
            start = core.placement.rounds
            await until(lambda: core.placement.rounds >= start + n, f"{n} placement rounds")

        async def settle() -> None:  # the nodes' smoothed rates follow a new rate
            await rounds(30)

        async with Trace(edge, images) as trace:
            trace.cheap_qps = 2.0
            await settle()
            for i in range(slices):  # day 1
                rate = 300.0 if 30 <= i < 42 else 2.0
                if rate != trace.cheap_qps:
                    trace.cheap_qps = rate
                    await settle()
                clock.now = midnight + (i + 0.5) * slice_s
                await rounds(2)
            assert not [d for d in decisions(core, "replicate") if d["variant"] == "digits-cnn"]

            trace.cheap_qps, trace.accurate_qps = 2.0, 5.0  # day 2: the accurate trickle
            await settle()
            rise = midnight + day_s + 30 * slice_s
            for i in range(30):  # up to the rise, not into it
                clock.now = midnight + day_s + (i + 0.5) * slice_s
                await rounds(2)
            ahead = [d for d in decisions(core, "replicate", "edge-1")
                     if d["variant"] == "digits-cnn"]
            assert ahead, list(core.placement.history)[-5:]
            assert ahead[0]["cause"] == "forecast" and ahead[0]["at"] < rise
            assert ahead[0]["reason"].startswith("forecast: digits entering below")
            # the edge pulls and loads it while the night's queries still go to the core
            await until(lambda: "digits-cnn" in edge.loaded, "the edge loads the CNN")
            assert edge.status()["cold_starts_hidden"].get("digits-cnn") == 1

            # The rise arrives: the accurate queries find the CNN warm on the edge.
            trace.answers.clear()
            clock.now = rise + slice_s / 2
            trace.accurate_qps = 300.0
            await settle()
        served = trace.answers
        assert len(served) > 100
        assert served.count(("edge-1", "digits-cnn")) > 0.9 * len(served)
        status = edge.status()
        assert "digits-cnn" not in status["cold_starts"]  # no query paid for its load
        assert status["cold_starts_hidden"] == {"digits-cnn": 1}
