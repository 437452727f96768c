"""Start a whole topology on this machine: one process per node, links emulated.

:class:`LocalMesh` allocates loopback ports, writes the run file every node
reads (``run.json``: its HTTP and stream ports, and the link-emulator URL of
each neighbour's HTTP and stream ports) and the link spec (``links.json``:
two emulators per link direction, one for each port, with the same latency
and bandwidth, so that forwarded queries pay the link whichever transport
carries them), starts the link-emulator
process and one ``python -m nodes`` process per node, and waits until every
node answers ``/healthz``. Its state (pids, addresses) goes to
``state.json`` so that ``mesh status`` and ``mesh down`` in another process
find it. Every process runs in its own session, so stopping kills the whole
process group and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.errors import MeshError
from mesh.registry import Registry
from mesh.topology import Topology, load_topology

__all__ = ["LocalMesh", "MeshState", "read_state", "stop_mesh"]

STATE_FILE = "state.json"


class TestbedError(MeshError):
    """The local mesh could not be started or stopped."""


@dataclass(frozen=True)
class MeshState:
    """What ``mesh up`` leaves behind for ``mesh status`` and ``mesh down``."""

    topology: str
    home: str
    run_dir: str
    #: node -> {"tier", "address", "stream_address"} (direct addresses, not through link
    #: emulators; ``stream_address`` is ``tcp://HOST:PORT``)
    nodes: dict[str, dict[str, str]]
    #: {"role": "node"|"links", "name", "pid"}
    processes: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"topology": self.topology, "home": self.home, "run_dir": self.run_dir,
                "nodes": self.nodes, "processes": self.processes}

    def address(self, node: str) -> str:
        return self.nodes[node]["address"]

    def stream_address(self, node: str) -> str:
        return self.nodes[node]["stream_address"]


def _free_ports(count: int, host: str) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalMesh:
    """A running local mesh. Use as a context manager, or ``start()`` / ``stop()``."""

    startup_timeout_s: float = 60.0
    stop_timeout_s: float = 10.0

    def __init__(self, topology: str | Path, *, home: str | Path, run_dir: str | Path | None = None,
                 host: str = "127.0.0.1", hop_transport: str = "stream") -> None:
        """``hop_transport``: how nodes forward to their neighbours, ``"stream"`` (one
        persistent msgpack stream per neighbour) or ``"http"`` (for comparison). Every node
        serves both either way."""
        if hop_transport not in ("stream", "http"):
            raise ValueError(f"hop_transport: expected 'stream' or 'http', got {hop_transport!r}")
        self.hop_transport = hop_transport
        self.topology_path = Path(topology).resolve()
        self.topology: Topology = load_topology(self.topology_path)
        self.home = Path(home).resolve()
        self.run_dir = Path(run_dir).resolve() if run_dir else self.home / "run"
        self.host = host
        self._procs: list[tuple[str, str, subprocess.Popen[bytes]]] = []
        self.state: MeshState | None = None

    def __enter__(self) -> LocalMesh:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, node: str) -> str:
        """The node's HTTP entry URL (``http://HOST:PORT``)."""
        assert self.state is not None, "mesh is not started"
        return self.state.address(node)

    def stream_url(self, node: str) -> str:
        """The node's msgpack stream entry URL (``tcp://HOST:PORT``), for the SDK too."""
        assert self.state is not None, "mesh is not started"
        return self.state.stream_address(node)

    # ------------------------------------------------------------------ start
    def _check_ready_to_start(self) -> None:
        existing = read_state(self.run_dir)
        if existing is not None and any(is_mesh_process(p) for p in existing.processes):
            raise TestbedError(
                f"a mesh is already running from {self.run_dir} (topology {existing.topology}); "
                "stop it with 'mesh down' first")
        registry = Registry.load(self.home)
        hosted = [n for n, spec in self.topology.nodes.items()
                  if any(spec.allows(v) for v in registry.variants)]
        if not registry.variants:
            raise TestbedError(f"no variants registered in {self.home}; run 'mesh build' first")
        if not hosted:
            raise TestbedError("no node of this topology may host any registered variant; "
                               "check the nodes' 'variants' lists")

    def start(self) -> MeshState:
        self._check_ready_to_start()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        topo = self.topology
        names = sorted(topo.nodes)
        ports = iter(_free_ports(2 * len(names) + 4 * len(topo.links), self.host))
        node_port = {n: next(ports) for n in names}
        stream_port = {n: next(ports) for n in names}
        neighbours: dict[str, dict[str, str]] = {n: {} for n in names}
        stream_neighbours: dict[str, dict[str, str]] = {n: {} for n in names}
        link_spec = []
        for link in topo.links:
            a, b = link.between
            for src, dst in ((a, b), (b, a)):
                for suffix, target, urls, scheme in (
                        ("", node_port, neighbours, "http"),
                        (" stream", stream_port, stream_neighbours, "tcp")):
                    port = next(ports)
                    urls[src][dst] = f"{scheme}://{self.host}:{port}"
                    link_spec.append({"name": f"{src}->{dst}{suffix}", "listen_port": port,
                                      "target_host": self.host, "target_port": target[dst],
                                      "latency_ms": link.latency_ms,
                                      "bandwidth_mbps": link.bandwidth_mbps})
        run = {"topology": str(self.topology_path), "home": str(self.home),
               "nodes": {n: {"host": self.host, "port": node_port[n],
                             "stream_port": stream_port[n], "neighbours": neighbours[n],
                             "stream_neighbours": stream_neighbours[n]
                             if self.hop_transport == "stream" else {}}
                         for n in names}}
        run_file = self.run_dir / "run.json"
        run_file.write_text(json.dumps(run, indent=2))
        links_file = self.run_dir / "links.json"
        links_file.write_text(json.dumps(link_spec, indent=2))

        nodes = {n: {"tier": topo.nodes[n].tier, "address": f"http://{self.host}:{node_port[n]}",
                     "stream_address": f"tcp://{self.host}:{stream_port[n]}"}
                 for n in names}
        try:
            if link_spec:
                self._spawn("links", "links", [sys.executable, "-m", "mesh.testbed.links",
                                               str(links_file)])
            for n in names:
                self._spawn("node", n, [sys.executable, "-m", "nodes", "--runtime", str(run_file),
                                        "--node", n])
            self.state = MeshState(str(self.topology_path), str(self.home), str(self.run_dir),
                                   nodes, [{"role": r, "name": nm, "pid": p.pid}
                                           for r, nm, p in self._procs])
            (self.run_dir / STATE_FILE).write_text(json.dumps(self.state.to_json(), indent=2))
            self._wait_ready(link_spec, nodes)
        except BaseException:
            self.stop()
            raise
        return self.state

    def _spawn(self, role: str, name: str, argv: list[str]) -> None:
        log = open(self.run_dir / "logs" / f"{name}.log", "wb")
        with ExitStack() as stack:
            stack.callback(log.close)  # the child keeps its own copy of the descriptor
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        self._procs.append((role, name, proc))

    def _wait_ready(self, link_spec: list[dict[str, Any]], nodes: dict[str, dict[str, str]]
                    ) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pending_links = {s["listen_port"] for s in link_spec}
        pending_nodes = dict(nodes)
        while pending_links or pending_nodes:
            for role, name, proc in self._procs:
                if proc.poll() is not None:
                    raise TestbedError(f"{role} process {name} exited with code {proc.returncode}:\n"
                                       + self._log_tail(name))
            for port in list(pending_links):
                with socket.socket() as s:
                    s.settimeout(0.2)
                    if s.connect_ex((self.host, port)) == 0:
                        pending_links.discard(port)
            for name, info in list(pending_nodes.items()):
                try:
                    with urllib.request.urlopen(info["address"] + "/healthz", timeout=0.5) as r:
                        if r.status == 200:
                            del pending_nodes[name]
                except (urllib.error.URLError, OSError):
                    pass
            if time.monotonic() > deadline:
                waiting = sorted(pending_nodes) + [f"link port {p}" for p in sorted(pending_links)]
                raise TestbedError(f"mesh not ready after {self.startup_timeout_s:.0f} s; "
                                   f"still waiting for: {', '.join(waiting)}")
            if pending_links or pending_nodes:
                time.sleep(0.1)

    def _log_tail(self, name: str, lines: int = 15) -> str:
        path = self.run_dir / "logs" / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self, node: str) -> None:
        """SIGKILL one node's process (a crash, for failure tests); the rest keep running."""
        for role, name, proc in self._procs:
            if role == "node" and name == node:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
                return
        raise TestbedError(f"no running node {node!r} in this mesh")

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        _terminate([p.pid for _, _, p in self._procs], self.stop_timeout_s,
                   waiters={p.pid: p for _, _, p in self._procs})
        self._procs.clear()
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)
        self.state = None


# ---------------------------------------------------------------------- other processes


def read_state(run_dir: str | Path) -> MeshState | None:
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return MeshState(data["topology"], data["home"], data["run_dir"], data["nodes"],
                         data["processes"])
    except (ValueError, KeyError) as exc:
        raise TestbedError(f"{path} is damaged ({exc}); remove it and stop stray processes") from None


def is_mesh_process(proc: dict[str, Any]) -> bool:
    """True when ``pid`` still runs one of ours (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{int(proc['pid'])}/cmdline").read_bytes()
    except OSError:
        return False
    return b"nodes" in cmdline or b"mesh.testbed.links" in cmdline


def _terminate(pids: list[int], timeout_s: float,
               waiters: dict[int, subprocess.Popen[bytes]] | None = None) -> list[int]:
    """SIGTERM each process group, then SIGKILL what is left. Returns the pids stopped."""
    waiters = waiters or {}
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout_s
    remaining = set(pids)
    while remaining and time.monotonic() < deadline:
        for pid in list(remaining):
            proc = waiters.get(pid)
            if proc is not None:
                if proc.poll() is not None:
                    remaining.discard(pid)
            elif not is_mesh_process({"pid": pid}):
                remaining.discard(pid)
        if remaining:
            time.sleep(0.05)
    for pid in remaining:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if pid in waiters:
            waiters[pid].wait(timeout=5)
    return pids


def stop_mesh(run_dir: str | Path, timeout_s: float = 10.0) -> MeshState | None:
    """Stop the mesh recorded in ``run_dir`` (from any process). None if nothing was up."""
    state = read_state(run_dir)
    if state is None:
        return None
    pids = [int(p["pid"]) for p in state.processes if is_mesh_process(p)]
    _terminate(pids, timeout_s)
    (Path(run_dir) / STATE_FILE).unlink(missing_ok=True)
    return state

