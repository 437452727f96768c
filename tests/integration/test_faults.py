"""Rehearsed failures on a real local mesh: `mesh node restart`, `mesh link cut|heal|set`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh import Client
from mesh.testbed.local import LocalMesh
from tests.integration.processes import until

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "topologies" / "local.yaml"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def home(built_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home of its own (the registry copied, the store shared), so the CLI finds this mesh."""
    home = tmp_path_factory.mktemp("faults-home")
    (home / "registry.json").write_text((built_home / "registry.json").read_text())
    (home / "store").symlink_to(built_home / "store")
    return home


@pytest.fixture(scope="module")
def faulty(home: Path) -> Iterator[LocalMesh]:
    with LocalMesh(LOCAL, home=home, use_addresses=False) as m:
        yield m


def _mesh(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2.0) as resp:
        return dict(json.loads(resp.read()))


def _status(mesh: LocalMesh, node: str) -> dict[str, Any]:
    return _get(mesh.url(node) + "/v1/status")


def _store_files(home: Path) -> dict[str, float]:
    store = (home / "store").resolve()
    return {str(p.relative_to(store)): p.stat().st_mtime for p in store.rglob("*") if p.is_file()}


def test_a_restarted_node_rejoins_by_itself(faulty: LocalMesh, home: Path, heldout) -> None:
    images, _ = heldout
    with Client(faulty.url("edge-1")) as client:
        assert client.infer("digits", images[:1], min_accuracy=0.98,
                            latency_ms=250).served_by.node == "mid-1"
    before = _status(faulty, "mid-1")
    store_before = _store_files(home)
    old_pid = faulty.state.process("node", "mid-1")["pid"]

    # queries keep flowing through another entry (edge-2, served there) during the restart
    failures: list[Exception] = []
    served = 0
    stop = threading.Event()

    def flow() -> None:
        nonlocal served
        with Client(faulty.url("edge-2")) as client:
            while not stop.is_set():
                try:
                    client.infer("digits", images[:1], latency_ms=10)
                    served += 1
                except Exception as exc:  # noqa: BLE001 - counted, asserted below
                    failures.append(exc)

    flowing = threading.Thread(target=flow)
    flowing.start()
    try:
        restart = _mesh(home, "node", "restart", "mid-1")
    finally:
        stop.set()
        flowing.join(30)
    assert restart.returncode == 0, restart.stderr
    state = json.loads((faulty.run_dir / "state.json").read_text())
    new_pid = next(p["pid"] for p in state["processes"] if p["name"] == "mid-1")
    assert f"restarted mid-1: pid {old_pid} -> {new_pid}" in restart.stdout
    assert new_pid != old_pid
    assert failures == [] and served > 0

    # it answers again, and its neighbours count it up again, without anyone telling them
    def served_by_mid() -> bool:
        with Client(faulty.url("edge-1")) as client:
            return client.infer("digits", images[:1], min_accuracy=0.98,
                                latency_ms=250).served_by.node == "mid-1"

    until(served_by_mid, "edge-1 forwards accurate queries to the restarted mid-1", 60)
    until(lambda: not _get(faulty.url("core-1") + "/v1/membership")["children"]["mid-1"]["down"],
          "core-1 counts mid-1 up", 30)
    until(lambda: _status(faulty, "edge-1")["unreachable"] == [], "edge-1 reaches mid-1", 30)
    until(lambda: _get(faulty.url("mid-1") + "/v1/membership")["heartbeats_sent"] > 0
          and not _get(faulty.url("mid-1") + "/v1/membership")["parent_down"],
          "mid-1 heartbeats to core-1", 30)
    after = _status(faulty, "mid-1")
    assert after["uptime_s"] < before["uptime_s"] + 120 and after["requests"] >= 1
    # the registry and the store lost nothing, and nothing was pulled again
    assert after["registry_version"] == before["registry_version"]
    assert after["artifacts"]["fetches"] == {"ok": 0, "corrupt": 0, "failed": 0}
    assert _store_files(home) == store_before
    assert "digits-cnn" in {v["name"] for v in after["variants"] if v["loaded"]}
    # `mesh status` and `mesh down` (the fixture's stop) still see every process
    status = _mesh(home, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert all(n["up"] for n in json.loads(status.stdout)["nodes"])


def test_stop_and_start_one_node(faulty: LocalMesh, home: Path, heldout) -> None:
    images, _ = heldout
    stopped = faulty.stop_node("edge-2")
    assert [p.name for p in stopped] == ["edge-2"]
    assert faulty.stop_node("edge-2") == []  # already stopped: nothing to do
    status = json.loads(_mesh(home, "status", "--json").stdout)
    assert {n["node"]: n["up"] for n in status["nodes"]} == {
        "edge-1": True, "edge-2": False, "mid-1": True, "core-1": True}
    # the other entries keep answering while it is down
    with Client(faulty.url("edge-1")) as client:
        assert client.infer("digits", images[:1]).output.shape == (1, 10)
    started = _mesh(home, "node", "start", "edge-2")
    assert started.returncode == 0 and "started edge-2 (pid" in started.stdout, started.stderr
    again = _mesh(home, "node", "start", "edge-2")
    assert again.returncode == 0 and "edge-2 is already running" in again.stdout
    with Client(faulty.url("edge-2")) as client:
        assert client.infer("digits", images[:1], latency_ms=10).served_by.node == "edge-2"


def test_a_cut_link_is_noticed_by_timeouts_and_healed(faulty: LocalMesh, home: Path,
                                                      heldout) -> None:
    images, _ = heldout
    listed = _mesh(home, "link", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    links = {item["name"]: item for item in json.loads(listed.stdout)["links"]}
    assert set(links) == {"edge-1--mid-1", "edge-2--mid-1", "mid-1--core-1"}
    assert links["mid-1--core-1"]["between"] == ["mid-1", "core-1"]
    assert all(item["state"] == "up" for item in links.values())
    status_links = json.loads(_mesh(home, "status", "--json").stdout)["links"]
    assert {item["name"] for item in status_links} == set(links)

    cut = _mesh(home, "link", "cut", "core-1--mid-1")  # either order names the link
    assert cut.returncode == 0, cut.stderr
    assert "mid-1--core-1: cut" in cut.stdout
    try:
        # mid-1 notices only by missed heartbeats (nothing is refused), then routes around it
        until(lambda: "core-1" in _status(faulty, "mid-1")["unreachable"],
              "mid-1 counts core-1 down after the cut", 30)
        with Client(faulty.url("edge-1")) as client:
            below = client.infer("digits", images[:1], min_accuracy=0.98, latency_ms=500)
            relaxed = client.infer("digits", images[:1])
        assert below.served_by.node == "mid-1"  # served below the cut
        assert relaxed.served_by.node in {"edge-1", "mid-1"}
    finally:
        heal = _mesh(home, "link", "heal", "mid-1--core-1")
    assert heal.returncode == 0 and "mid-1--core-1: up" in heal.stdout, heal.stderr
    until(lambda: _status(faulty, "mid-1")["unreachable"] == [],
          "mid-1 counts core-1 up after the heal", 30)


def test_set_changes_a_running_links_latency(faulty: LocalMesh, home: Path, heldout) -> None:
    images, _ = heldout
    changed = _mesh(home, "link", "set", "edge-1--mid-1", "--latency-ms", "40", "--jitter-ms", "1")
    assert changed.returncode == 0, changed.stderr
    assert "edge-1--mid-1: up, 40 ms, 100 Mbps, jitter 1 ms" in changed.stdout
    try:
        with Client(faulty.url("edge-1")) as client:
            results = [client.infer("digits", images[:1], min_accuracy=0.98, latency_ms=2000)
                       for _ in range(3)]
    finally:
        reset = _mesh(home, "link", "set", "edge-1--mid-1", "--latency-ms", "2",
                      "--jitter-ms", "0")
    assert reset.returncode == 0, reset.stderr
    # 40 ms each way to mid-1 (or beyond it to the core)
    assert all(r.timing["network_ms"] >= 80.0 for r in results)


def test_bad_fault_commands_get_clear_errors(faulty: LocalMesh, home: Path,
                                             tmp_path: Path) -> None:
    unknown = _mesh(home, "link", "cut", "edge-1--core-1")
    assert unknown.returncode == 1
    assert ("no link 'edge-1--core-1' in this mesh; its links are: edge-1--mid-1, "
            "edge-2--mid-1, mid-1--core-1") in unknown.stderr
    node = _mesh(home, "node", "restart", "edge-9")
    assert node.returncode == 1
    assert "no node 'edge-9' in this mesh; its nodes are: core-1, edge-1, edge-2, mid-1" \
        in node.stderr
    loss = _mesh(home, "link", "set", "edge-1--mid-1", "--loss", "1.5")
    assert loss.returncode == 2 and "'--loss': 1.5 is not in the range 0<=x<=1" in loss.stderr
    negative = _mesh(home, "link", "set", "edge-1--mid-1", "--latency-ms", "-1")
    assert negative.returncode == 2 and "--latency-ms" in negative.stderr
    nothing = _mesh(home, "link", "set", "edge-1--mid-1")
    assert nothing.returncode == 2 and "give at least one of" in nothing.stderr
    nothing_running = _mesh(tmp_path, "link", "list")
    assert nothing_running.returncode == 1 and "no mesh is running" in nothing_running.stderr
    stopped = _mesh(tmp_path, "node", "stop", "edge-1")
    assert stopped.returncode == 1 and "no mesh is running" in stopped.stderr
    for result in (unknown, node, loss, negative, nothing, nothing_running, stopped):
        assert "Traceback" not in result.stderr
