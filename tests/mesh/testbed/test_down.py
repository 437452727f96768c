"""`mesh down` stops every process of the mesh, also a node restarted by hand, with real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from mesh.testbed.processes import find_processes

pytestmark = pytest.mark.integration

PAIR = {
    "name": "pair",
    "hardware": {"box": {"kind": "cpu", "threads": 1, "memory_mb": 256}},
    "nodes": [{"name": "core-1", "tier": "core", "hardware": "box", "variants": ["digits-linear"]},
              {"name": "edge-1", "tier": "edge", "hardware": "box", "variants": ["digits-linear"]}],
    "links": [{"between": ["edge-1", "core-1"], "latency_ms": 1, "bandwidth_mbps": 1000}],
}


def _healthy(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=0.5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        assert time.monotonic() < deadline, f"{url} never became healthy"
        time.sleep(0.1)


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in "ZX":
            return True
        time.sleep(0.05)
    return False


def test_down_stops_a_node_restarted_by_hand(built_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "registry.json").write_text((built_home / "registry.json").read_text())
    (home / "store").symlink_to(built_home / "store")
    topology = tmp_path / "pair.yaml"
    topology.write_text(yaml.safe_dump(PAIR))
    run_dir = home / "run"

    def mesh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mesh.cli", "--home", str(home), *args],
                              capture_output=True, text=True, timeout=120)

    up = mesh("up", str(topology))
    assert up.returncode == 0, up.stderr
    hand: subprocess.Popen[bytes] | None = None
    try:
        state = json.loads((run_dir / "state.json").read_text())
        started = {p["name"]: p["pid"] for p in state["processes"]}
        assert set(started) == {"links", "core-1", "edge-1"}
        # edge-1 crashes; its operator starts it again by hand, from the home, with the same run file
        os.killpg(started["edge-1"], signal.SIGKILL)
        assert _gone(started["edge-1"])
        hand = subprocess.Popen(
            [sys.executable, "-m", "nodes", "--runtime", "run/run.json", "--node", "edge-1"],
            cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _healthy(state["nodes"]["edge-1"]["address"])
        assert {p.pid for p in find_processes(run_dir)} == {
            started["links"], started["core-1"], hand.pid}
        again = mesh("up", str(topology))
        assert again.returncode != 0 and "already running" in again.stderr

        down = mesh("down")
        assert down.returncode == 0, down.stderr
        assert _gone(hand.pid) and _gone(started["links"]) and _gone(started["core-1"])
        assert "stopped 3 processes (2 nodes)" in down.stdout
        assert f"pid {hand.pid} (node edge-1)" in down.stdout  # named: 'mesh up' did not start it
        assert find_processes(run_dir) == []
        assert not (run_dir / "state.json").exists()
        after = mesh("down")
        assert after.returncode == 0 and "no mesh is running" in after.stdout
    finally:
        mesh("down")
        if hand is not None:  # the old 'mesh down' left it running
            hand.kill()
            hand.wait()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="runs 'mesh down' as another user: needs root and setpriv (util-linux)")
def test_down_names_what_it_cannot_stop_and_exits_1() -> None:
    """A node of the mesh that 'mesh down' may not signal (another user's) is named, exit 1."""
    root = Path(tempfile.mkdtemp(prefix="tiermesh-down-"))
    node: subprocess.Popen[bytes] | None = None
    try:
        root.chmod(0o755)  # readable by the unprivileged 'mesh down'
        fake = root / "fake" / "nodes"  # runs as 'python -m nodes --runtime ...', then only sleeps
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("")
        (fake / "__main__.py").write_text("import time\ntime.sleep(120)\n")
        (root / "home" / "run").mkdir(parents=True)
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        node = subprocess.Popen([sys.executable, "-m", "nodes", "--runtime",
                                 str(root / "home" / "run" / "run.json"), "--node", "edge-1"],
                                cwd=root / "fake")
        deadline = time.monotonic() + 10
        while not find_processes(root / "home" / "run"):
            assert time.monotonic() < deadline, "the stand-in node never started"
            time.sleep(0.05)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        down = subprocess.run([*nobody, sys.executable, "-m", "mesh.cli", "--home",
                               str(root / "home"), "down"],
                              capture_output=True, text=True, timeout=60, cwd="/",
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[3])))
        assert down.returncode == 1, down.stdout + down.stderr
        assert f"could not stop pid {node.pid} (node edge-1): not permitted" in down.stderr
        assert "Traceback" not in down.stderr
        assert node.poll() is None  # still running, as reported
    finally:
        if node is not None:
            node.kill()
            node.wait()
        shutil.rmtree(root)
