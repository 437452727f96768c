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
find it; every file is written atomically and durably (:mod:`mesh.durable`).
Every process runs in its own session, so stopping kills the whole process
group. Stopping finds the mesh's processes by their command lines
(:mod:`mesh.testbed.processes`), not only by the pids it recorded, so a node
restarted by hand with the same run file is stopped too; a process that
cannot be stopped is reported, never silently left behind.

While it runs, one node can be stopped, started and restarted
(:meth:`LocalMesh.restart_node`) and one link cut, healed or changed
(:meth:`LocalMesh.cut_link`, :meth:`LocalMesh.set_link`); the same operations
work from another process on the run directory alone (:mod:`mesh.testbed.faults`,
``mesh node ...``, ``mesh link ...``). Each topology link ``between: [a, b]`` is
named ``a--b``; the state file records the names, the command line of every
process (to start a node again) and the link emulator's control port.

With ``tls=True`` (``mesh up --tls``) the nodes run as they do off loopback:
a mesh CA under ``RUN_DIR/tls`` (made once, then reused, so that clients'
copies of ``ca.pem`` stay valid), a certificate per node issued at every
start, every node started with ``--tls-dir RUN_DIR/tls/NODE``. Both ports of
every node then speak TLS only, and nodes know each other by certificate.
The link emulators are unchanged: they proxy TCP, so TLS passes through them.
Clients reach the nodes with ``ssl=``:func:`mesh.certs.ca_context` of
``RUN_DIR/tls/ca.pem`` (:attr:`MeshState.ca`).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.certs import CA_CERT, init_ca, issue
from mesh.durable import write_atomic
from mesh.placement import Hosting
from mesh.registry import Registry
from mesh.testbed import faults
from mesh.testbed.processes import (
    LINKS_FILE,
    RUN_FILE,
    MeshProcess,
    StopResult,
    find_processes,
    log_tail,
    spawn,
    stop_processes,
)
from mesh.testbed.state import STATE_FILE, MeshState, TestbedError, read_state, write_state
from mesh.topology import Topology, load_topology

__all__ = ["LocalMesh", "MeshState", "MeshStop", "TestbedError", "read_state", "stop_mesh"]

@dataclass(frozen=True)
class MeshStop:
    """What :func:`stop_mesh` did. ``state`` is None when the mesh left no state file."""

    state: MeshState | None
    stopped: list[MeshProcess]
    #: (process, why it is still running)
    failed: list[tuple[MeshProcess, str]]

    def unrecorded(self) -> list[MeshProcess]:
        """Stopped processes that ``mesh up`` did not start (restarted by hand, say)."""
        recorded = {int(p["pid"]) for p in self.state.processes} if self.state else set()
        return [p for p in self.stopped if p.pid not in recorded]


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
                 host: str = "127.0.0.1", hop_transport: str = "stream",
                 use_addresses: bool = True, tls: bool = False) -> None:
        """``hop_transport``: how nodes forward to their neighbours, ``"stream"`` (one
        persistent msgpack stream per neighbour) or ``"http"`` (for comparison). Every node
        serves both either way. ``use_addresses``: a node whose topology entry gives an
        address listens on its ports (so that the README's URLs work); False: every node
        on free ports (tests that may run beside another mesh). ``tls``: every node with its
        own certificate from a mesh CA under ``run_dir/tls``, both ports TLS only."""
        if hop_transport not in ("stream", "http"):
            raise ValueError(f"hop_transport: expected 'stream' or 'http', got {hop_transport!r}")
        self.hop_transport = hop_transport
        self.topology_path = Path(topology).resolve()
        self.topology: Topology = load_topology(self.topology_path)
        self.home = Path(home).resolve()
        self.run_dir = Path(run_dir).resolve() if run_dir else self.home / "run"
        self.host = host
        self.use_addresses = use_addresses
        self.tls = tls
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
        running = find_processes(self.run_dir)
        if running:
            existing = read_state(self.run_dir)
            what = f"topology {existing.topology}, " if existing is not None else ""
            raise TestbedError(
                f"a mesh is already running from {self.run_dir} ({what}{len(running)} processes: "
                f"{', '.join(p.label() for p in running)}); stop it with 'mesh down' first")
        registry = Registry.load(self.home)
        hosting = Hosting(self.topology, registry)
        hosted = [n for n in self.topology.nodes
                  if any(hosting.allows(n, v) for v in registry.variants)]
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
        ports = iter(_free_ports(2 * len(names) + 4 * len(topo.links) + 1, self.host))
        control_port = next(ports)
        node_port = {n: next(ports) for n in names}
        stream_port = {n: next(ports) for n in names}
        if self.use_addresses:  # the topology's own ports, on this machine's loopback
            for n in names:
                address = topo.nodes[n].address
                if address is not None:
                    node_port[n], stream_port[n] = address.http_port, address.stream_port
            self._check_ports_free([p for n in names for p in (node_port[n], stream_port[n])])
        neighbours: dict[str, dict[str, str]] = {n: {} for n in names}
        stream_neighbours: dict[str, dict[str, str]] = {n: {} for n in names}
        link_spec = []
        link_names: dict[str, list[str]] = {}
        for link in topo.links:
            a, b = link.between
            link_name = f"{a}--{b}"
            link_names[link_name] = [a, b]
            for src, dst in ((a, b), (b, a)):
                for suffix, target, urls, scheme in (
                        ("", node_port, neighbours, "http"),
                        (" stream", stream_port, stream_neighbours, "tcp")):
                    port = next(ports)
                    urls[src][dst] = f"{scheme}://{self.host}:{port}"
                    link_spec.append({"name": f"{src}->{dst}{suffix}", "link": link_name,
                                      "listen_port": port,
                                      "target_host": self.host, "target_port": target[dst],
                                      "latency_ms": link.latency_ms,
                                      "bandwidth_mbps": link.bandwidth_mbps})
        run = {"topology": str(self.topology_path), "home": str(self.home),
               "nodes": {n: {"host": self.host, "port": node_port[n],
                             "stream_port": stream_port[n], "neighbours": neighbours[n],
                             "stream_neighbours": stream_neighbours[n]
                             if self.hop_transport == "stream" else {}}
                         for n in names}}
        tls_dirs = self._issue_certificates() if self.tls else {}
        scheme = "https" if self.tls else "http"
        run_file = write_atomic(self.run_dir / RUN_FILE, json.dumps(run, indent=2))
        links_file = write_atomic(self.run_dir / LINKS_FILE, json.dumps(link_spec, indent=2))

        nodes = {n: {"tier": topo.nodes[n].tier, "address": f"{scheme}://{self.host}:{node_port[n]}",
                     "stream_address": f"tcp://{self.host}:{stream_port[n]}"}
                 for n in names}
        processes: list[dict[str, Any]] = []
        try:
            if link_spec:
                # the spec first: mesh.testbed.processes finds the emulator by its first argument
                argv = [sys.executable, "-m", "mesh.testbed.links", str(links_file),
                        "--control-port", str(control_port), "--control-host", self.host]
                processes.append(self._spawn("links", "links", argv))
            for n in names:
                tls = ["--tls-dir", str(tls_dirs[n])] if self.tls else []
                processes.append(self._spawn("node", n, [
                    sys.executable, "-m", "nodes", "--runtime", str(run_file), "--node", n, *tls]))
            self.state = MeshState(str(self.topology_path), str(self.home), str(self.run_dir),
                                   nodes, processes,
                                   ca=str(self.run_dir / "tls" / CA_CERT) if self.tls else None,
                                   links=link_names,
                                   control=f"{self.host}:{control_port}" if link_spec else None)
            write_state(self.state)
            self._wait_ready(link_spec, nodes)
        except BaseException:
            self.stop()
            raise
        return self.state

    def _issue_certificates(self) -> dict[str, Path]:
        """A certificate per node from the run directory's mesh CA (made on first use)."""
        root = self.run_dir / "tls"
        if not (root / CA_CERT).exists():
            init_ca(root, name=f"Tiermesh testbed CA ({self.topology.name})")
        return {n: issue(n, self.topology, root).cert.parent for n in self.topology.nodes}

    def _check_ports_free(self, ports: list[int]) -> None:
        busy = []
        for port in ports:
            with socket.socket() as s:
                try:
                    s.bind((self.host, port))
                except OSError:
                    busy.append(port)
        if busy:
            raise TestbedError(
                f"port(s) {', '.join(map(str, busy))} on {self.host}, which the topology's "
                "addresses give its nodes, are in use; stop what holds them ('mesh down'), "
                "or start with free ports (mesh up --free-ports)")

    def _spawn(self, role: str, name: str, argv: list[str]) -> dict[str, Any]:
        proc = spawn(argv, self.run_dir / "logs" / f"{name}.log")
        self._procs.append((role, name, proc))
        return {"role": role, "name": name, "pid": proc.pid, "argv": argv}

    def _wait_ready(self, link_spec: list[dict[str, Any]], nodes: dict[str, dict[str, str]]
                    ) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pending_links = {s["listen_port"] for s in link_spec}
        pending_nodes = dict(nodes)
        context = self.state.client_ssl() if self.state is not None else None
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
                    with urllib.request.urlopen(info["address"] + "/healthz", timeout=0.5,
                                                context=context) as r:
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
        return log_tail(self.run_dir / "logs" / f"{name}.log", lines)

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

    # ------------------------------------------------------------------ faults (mesh.testbed.faults)
    def stop_node(self, node: str) -> list[MeshProcess]:
        """SIGTERM one node (SIGKILL after :attr:`stop_timeout_s`); the rest keep running.
        Returns what was stopped (empty: it was not running)."""
        waiters = {p.pid: p for role, _, p in self._procs if role == "node"}
        return faults.stop_node(self.run_dir, node, timeout_s=self.stop_timeout_s,
                                waiters=waiters)

    def start_node(self, node: str) -> int:
        """Start a stopped node again on its ports and wait until it is healthy; return its
        pid (the running one's, when it was running)."""
        started = faults.start_node(self.run_dir, node, timeout_s=self.startup_timeout_s)
        if started.process is not None:
            self._procs = [e for e in self._procs if e[:2] != ("node", node)]
            self._procs.append(("node", node, started.process))
            self.state = read_state(self.run_dir)
        return started.pid

    def restart_node(self, node: str) -> int:
        """:meth:`stop_node` then :meth:`start_node`; return the new pid."""
        self.stop_node(node)
        return self.start_node(node)

    def links(self) -> list[dict[str, Any]]:
        """Every link: ``name`` (``a--b``), ``between``, settings, ``state``, counters."""
        return faults.list_links(self.run_dir)

    def cut_link(self, name: str) -> dict[str, Any]:
        """Cut link ``a--b`` (either order): nothing crosses, nothing is refused."""
        return faults.cut_link(self.run_dir, name)

    def heal_link(self, name: str) -> dict[str, Any]:
        return faults.heal_link(self.run_dir, name)

    def set_link(self, name: str, *, latency_ms: float | None = None,
                 bandwidth_mbps: float | None = None, loss: float | None = None,
                 jitter_ms: float | None = None) -> dict[str, Any]:
        """Change a running link's settings (None: keep)."""
        return faults.set_link(self.run_dir, name, latency_ms=latency_ms,
                               bandwidth_mbps=bandwidth_mbps, loss=loss, jitter_ms=jitter_ms)

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Stop every process of this mesh, also ones started after it (by hand).

        Raises :class:`TestbedError` naming the processes it could not stop.
        """
        ours = {p.pid: p for _, _, p in self._procs}
        procs = {p.pid: p for p in find_processes(self.run_dir)}
        for role, name, proc in self._procs:
            # not running our command line (yet): still ours to stop, unless it has ended (a node
            # stopped alone: its pid may belong to someone else by now)
            if proc.pid not in procs and proc.poll() is None:
                found = _child(proc.pid, role, name)
                if found is not None:
                    procs[proc.pid] = found
        result = stop_processes(procs.values(), self.stop_timeout_s, waiters=ours)
        for proc in ours.values():
            if proc.poll() is None and proc.pid not in {p.pid for p, _ in result.failed}:
                proc.wait(timeout=self.stop_timeout_s)
        self._procs.clear()
        self.state = None
        if result.failed:
            raise TestbedError(_failures(result))
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------------- other processes


def _child(pid: int, role: str, name: str) -> MeshProcess | None:
    """One of our children that does not (yet) show the command line we gave it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return MeshProcess(pid, role, name, int(text[text.rindex(")") + 2:].split()[19]))


def _failures(result: StopResult) -> str:
    return "could not stop " + "; ".join(f"{p.label()}: {why}" for p, why in result.failed)


def is_mesh_process(proc: dict[str, Any]) -> bool:
    """True when ``pid`` still runs a node agent or link emulator (of any mesh; pids get reused)."""
    try:
        cmdline = Path(f"/proc/{int(proc['pid'])}/cmdline").read_bytes()
    except OSError:
        return False
    return b"nodes" in cmdline or b"mesh.testbed.links" in cmdline


def stop_mesh(run_dir: str | Path, timeout_s: float = 10.0) -> MeshStop | None:
    """Stop the mesh of ``run_dir`` (from any process). None if nothing of it was running.

    Stops every process whose command line runs on this run directory's
    files, whether ``mesh up`` started it or someone did later; the state
    file is removed only when all of them stopped.
    """
    try:
        state = read_state(run_dir)
    except TestbedError:
        state = None  # a damaged state file must not keep the processes alive
    procs = find_processes(run_dir)
    if state is None and not procs:
        return None
    result = stop_processes(procs, timeout_s)
    if not result.failed:
        (Path(run_dir) / STATE_FILE).unlink(missing_ok=True)
    return MeshStop(state, result.stopped, result.failed)
