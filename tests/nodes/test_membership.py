"""Membership over real HTTP on loopback: heartbeats up, summaries down, failures detected."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer, unused_port

from mesh.errors import InvalidInput
from mesh.state import MeshView
from mesh.topology import parse_topology
from nodes.membership import LocalLoad, Membership

ROOT = Path(__file__).resolve().parents[2]
INTERVAL_S = 0.05
MISSED = 3


def _topology():
    data = yaml.safe_load((ROOT / "topologies" / "local.yaml").read_text())
    data["membership"] = {"heartbeat_interval_s": INTERVAL_S, "missed_heartbeats": MISSED,
                          "stale_after_s": 2.0, "startup_grace_s": 0.5}
    return parse_topology(data)


class _Node:
    """One node's membership and its HTTP server; queue depth set by the test."""

    def __init__(self, name: str, topology, ports: dict[str, int]) -> None:
        self.name = name
        self.ports = ports
        self.queue = 0
        self.view = MeshView()
        neighbours = {n: f"http://127.0.0.1:{ports[n]}" for n in topology.neighbours(name)}
        self.membership = Membership(name, topology, self.view, neighbours=neighbours,
                                     local_load=self._load)
        app = web.Application()
        self.membership.add_routes(app)
        self.server = TestServer(app, port=ports[name])

    def _load(self) -> LocalLoad:
        return LocalLoad(self.queue, frozenset({"digits-mlp"}), frozenset(), 0)

    async def start(self) -> None:
        await self.server.start_server()
        await self.membership.__aenter__()

    async def stop(self) -> None:
        await self.membership.__aexit__(None, None, None)
        await self.server.close()


async def _until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
async def mesh():
    topology = _topology()
    ports = {n: unused_port() for n in topology.nodes}
    nodes = {n: _Node(n, topology, ports) for n in topology.nodes}
    for node in nodes.values():
        await node.start()
    try:
        yield nodes
    finally:
        for node in nodes.values():
            if node.membership._task is not None:
                await node.stop()


async def test_an_edge_learns_its_sibling_and_ancestors_through_its_parent(mesh) -> None:
    mesh["edge-2"].queue = 17
    mesh["core-1"].queue = 5
    edge1 = mesh["edge-1"].view
    await _until(lambda: edge1.queue_depth("edge-2", time.monotonic()) == 17
                 and edge1.queue_depth("core-1", time.monotonic()) == 5)
    # the parent aggregates its subtree and the root sees all four nodes
    await _until(lambda: mesh["core-1"].membership.status()["subtree"].get("sub", [0])[0] == 4)
    status = mesh["mid-1"].membership.status()
    assert status["parent"] == "core-1" and not status["parent_down"]
    assert set(status["children"]) == {"edge-1", "edge-2"}
    assert mesh["edge-1"].membership.status()["held_version"] >= 1


async def test_a_dead_child_is_down_within_the_bound_everywhere(mesh) -> None:
    await _until(lambda: "edge-2" in mesh["edge-1"].view.loads)
    await mesh["edge-2"].stop()
    bound = INTERVAL_S * MISSED
    took = await _until(lambda: mesh["mid-1"].view.is_down("edge-2", time.monotonic()))
    assert took < bound + 10 * INTERVAL_S  # detection + a few loop turns of slack
    # ...and the news reaches the sibling through the next summary
    await _until(lambda: mesh["edge-1"].view.is_down("edge-2", time.monotonic()))
    assert mesh["mid-1"].membership.status()["children"]["edge-2"]["down"]


async def test_a_dead_parent_cuts_off_everything_beyond_it_until_it_returns(mesh) -> None:
    edge1 = mesh["edge-1"]
    await _until(lambda: "core-1" in edge1.view.loads)
    await mesh["mid-1"].stop()
    await _until(lambda: edge1.view.is_down("mid-1", time.monotonic()))
    now = time.monotonic()
    assert edge1.view.is_down("core-1", now) and edge1.view.is_down("edge-2", now)
    assert not edge1.view.is_down("edge-1", now)
    assert edge1.membership.status()["parent_down"]
    # mid-1 comes back (a fresh process: new membership state, same port)
    revived = _Node("mid-1", edge1.membership.topology, edge1.ports)
    await revived.start()
    try:
        await _until(lambda: not edge1.view.is_down("mid-1", time.monotonic())
                     and not edge1.view.is_down("core-1", time.monotonic()))
    finally:
        await revived.stop()


async def test_a_heartbeat_from_a_stranger_is_refused(mesh) -> None:
    with pytest.raises(InvalidInput, match="not a child"):
        mesh["mid-1"].membership.on_heartbeat(
            {"node": "core-1", "version": 0, "entries": [{"node": "core-1", "q": 0}]})
    with pytest.raises(InvalidInput, match="entries"):
        mesh["mid-1"].membership.on_heartbeat({"node": "edge-1", "entries": []})


async def test_a_childs_load_report_counts_only_for_its_own_subtree(mesh) -> None:
    mid = mesh["mid-1"].membership
    entry = [{"node": "edge-1", "q": 0}]
    load = {"served": {"edge-1": {"digits-linear": [20.0, 0.1, 1.0, 0, 0.0, 12.0, None]}},
            "demand": {"edge-1": {"digits": 20.0}}}
    mid.on_heartbeat({"node": "edge-1", "version": 0, "entries": entry, "load": load})
    report = mid.subtree_load()
    assert report.served["edge-1"]["digits-linear"].rate_qps == 20.0
    assert report.demand["mid-1"]["digits"] == 20.0  # summed into the parent's subtree
    # Speaking for a node outside its subtree is refused (400), and changes nothing.
    forged = {"served": {"edge-2": {"digits-linear": [999.0, 9.0, 1.0, 0, 1.0, 1.0, None]}}}
    with pytest.raises(InvalidInput, match="not a node of the sender's subtree"):
        mid.on_heartbeat({"node": "edge-1", "version": 0, "entries": entry, "load": forged})
    with pytest.raises(InvalidInput, match="list of 7 to 9 numbers"):
        mid.on_heartbeat({"node": "edge-1", "version": 0, "entries": entry,
                          "load": {"served": {"edge-1": {"digits-linear": "hot"}}}})
    assert "edge-2" not in mid.subtree_load().served
    assert mid.subtree_load().served["edge-1"]["digits-linear"].rate_qps == 20.0


async def test_the_subtree_load_goes_up_once_a_placement_round_not_every_heartbeat() -> None:
    """Heartbeats every 0.05 s, placement rounds every 0.5 s: the load report (which grows
    with the subtree) rides one heartbeat in ten, and the parent has it fresh each round."""
    import aiohttp

    from mesh.placement import VariantLoad

    data = yaml.safe_load((ROOT / "topologies" / "local.yaml").read_text())
    data["membership"] = {"heartbeat_interval_s": INTERVAL_S, "missed_heartbeats": MISSED,
                          "stale_after_s": 2.0, "startup_grace_s": 0.5}
    data["placement"] = {"interval_s": 0.5}
    topology = parse_topology(data)
    ports = {n: unused_port() for n in topology.nodes}
    parent = _Node("mid-1", topology, ports)
    await parent.start()
    now = [100.0]
    child = Membership("edge-1", topology, MeshView(),
                       neighbours={"mid-1": f"http://127.0.0.1:{ports['mid-1']}"},
                       local_load=lambda: LocalLoad(0, frozenset(), frozenset(), 0),
                       clock=lambda: now[0],
                       own_load=lambda t: ({"digits-linear": VariantLoad(rate_qps=7.0)},
                                           {"digits": 7.0}))
    child._http = aiohttp.ClientSession()
    try:
        for _ in range(40):  # two seconds of heartbeats on the child's clock
            child._tick()
            await child._heartbeat()
            now[0] += INTERVAL_S
        assert child.heartbeats_sent == 40 and child.heartbeats_failed == 0
        assert child.loads_sent == 4  # at 0, 0.5, 1.0 and 1.5 s
        got = parent.membership.subtree_load()
        assert got.served["edge-1"]["digits-linear"].rate_qps == 7.0
        assert got.demand["mid-1"]["digits"] == 7.0
    finally:
        await child._http.close()
        await parent.stop()
