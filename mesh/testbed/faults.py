"""Failures to rehearse on a running local mesh: one node stopped, started or restarted;
one link cut, healed, slowed or made lossy.

Everything here works from the run directory alone (its ``state.json``), so that
``mesh node ...`` and ``mesh link ...`` act on a mesh another process started;
:class:`~mesh.testbed.local.LocalMesh` calls the same functions.

Nodes. :func:`stop_node` sends SIGTERM to the node's process group, SIGKILL after
``timeout_s`` (:func:`~mesh.testbed.processes.stop_processes`), finding the node by
its command line, so one restarted by hand is stopped too. :func:`start_node` runs
the command line ``mesh up`` recorded for it (the same run file, so the same
ports: its neighbours' link emulators reach it again), appends to its log, records
the new pid and waits until it answers ``/healthz``. What the node does on start
(re-register, reload from its store, rejoin) is the node's own start-up, as after
any crash: nothing here tells other nodes.

Links are named after the topology's ``between: [a, b]`` as ``a--b``; ``b--a``
names the same link. They are changed through the link emulator's control channel
(:mod:`mesh.testbed.control`); both directions and both ports (HTTP and stream)
of the link change together.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.testbed import control
from mesh.testbed.processes import (
    MeshProcess,
    find_processes,
    log_tail,
    spawn,
    stop_processes,
)
from mesh.testbed.state import MeshState, TestbedError, read_state, update_state

__all__ = ["NodeStart", "cut_link", "heal_link", "link_name", "list_links", "restart_node",
           "set_link", "start_node", "stop_node"]


@dataclass(frozen=True)
class NodeStart:
    """What :func:`start_node` found or did."""

    node: str
    pid: int
    #: the process started here; None when the node was already running (nothing started)
    process: subprocess.Popen[bytes] | None


def running_state(run_dir: str | Path) -> MeshState:
    """The state of the mesh running from ``run_dir``; raises :class:`TestbedError` if none."""
    state = read_state(run_dir)
    if state is None:
        raise TestbedError(f"no mesh is running from {Path(run_dir)}; start one with "
                           "'mesh up TOPOLOGY'")
    return state


def _check_node(state: MeshState, node: str) -> None:
    if node not in state.nodes:
        raise TestbedError(f"no node {node!r} in this mesh; its nodes are: "
                           f"{', '.join(sorted(state.nodes))}")


def node_processes(run_dir: str | Path, node: str) -> list[MeshProcess]:
    """The running processes of ``node`` (one, normally; none when it is stopped)."""
    return [p for p in find_processes(run_dir) if p.role == "node" and p.name == node]


# --------------------------------------------------------------------------- nodes


def stop_node(run_dir: str | Path, node: str, *, timeout_s: float = 10.0,
              waiters: dict[int, subprocess.Popen[bytes]] | None = None) -> list[MeshProcess]:
    """Stop ``node`` (SIGTERM, SIGKILL after ``timeout_s``); return what was stopped (empty:
    it was not running). ``waiters``: our own children's ``Popen`` objects, to reap them.

    Raises :class:`TestbedError` for an unknown node (naming the known ones) and for a
    process that could not be stopped.
    """
    state = running_state(run_dir)
    _check_node(state, node)
    result = stop_processes(node_processes(run_dir, node), timeout_s, waiters=waiters or {})
    if result.failed:
        raise TestbedError("could not stop " + "; ".join(f"{p.label()}: {why}"
                                                         for p, why in result.failed))
    return result.stopped


def start_node(run_dir: str | Path, node: str, *, timeout_s: float = 60.0) -> NodeStart:
    """Start ``node`` again as ``mesh up`` did and wait until it is healthy. A node already
    running is left alone (:attr:`NodeStart.process` is None).

    Raises :class:`TestbedError` for an unknown node, and when the node exits or is not
    healthy within ``timeout_s`` (then it is stopped again, and its log's tail is shown).
    """
    run_dir = Path(run_dir)
    state = running_state(run_dir)
    _check_node(state, node)
    running = node_processes(run_dir, node)
    if running:
        return NodeStart(node, running[0].pid, None)
    entry = state.process("node", node)
    if entry is None or not entry.get("argv"):
        raise TestbedError(f"{run_dir}/state.json does not say how to start {node} (an older "
                           "'mesh up' wrote it); restart the mesh with 'mesh down' and 'mesh up'")
    log = run_dir / "logs" / f"{node}.log"
    proc = spawn(list(entry["argv"]), log, append=True)
    update_state(run_dir, lambda s: s.with_pid(node, proc.pid))
    try:
        _wait_healthy(state, node, proc, timeout_s)
    except BaseException:
        stop_processes(node_processes(run_dir, node), 5.0, waiters={proc.pid: proc})
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise
    return NodeStart(node, proc.pid, proc)


def restart_node(run_dir: str | Path, node: str, *, stop_timeout_s: float = 10.0,
                 start_timeout_s: float = 60.0,
                 waiters: dict[int, subprocess.Popen[bytes]] | None = None
                 ) -> tuple[list[MeshProcess], NodeStart]:
    """:func:`stop_node` then :func:`start_node`; returns what each did."""
    stopped = stop_node(run_dir, node, timeout_s=stop_timeout_s, waiters=waiters)
    return stopped, start_node(run_dir, node, timeout_s=start_timeout_s)


def _wait_healthy(state: MeshState, node: str, proc: subprocess.Popen[bytes],
                  timeout_s: float) -> None:
    url = state.address(node) + "/healthz"
    context = state.client_ssl()
    log = Path(state.run_dir) / "logs" / f"{node}.log"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise TestbedError(f"node {node} exited with code {proc.returncode}:\n"
                               + log_tail(log))
        try:
            with urllib.request.urlopen(url, timeout=0.5, context=context) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TestbedError(f"node {node} not healthy {timeout_s:.0f} s after start:\n"
                               + log_tail(log))
        time.sleep(0.1)


# --------------------------------------------------------------------------- links


def link_name(state: MeshState, name: str) -> str:
    """The mesh's own name of a link given as ``a--b`` or ``b--a``; raises
    :class:`TestbedError` listing the links."""
    if name in state.links:
        return name
    a, sep, b = name.partition("--")
    if sep and f"{b}--{a}" in state.links:
        return f"{b}--{a}"
    known = ", ".join(sorted(state.links)) or "(none: this mesh has no links)"
    raise TestbedError(f"no link {name!r} in this mesh; its links are: {known}")


def _control(state: MeshState) -> str:
    if state.control is None:
        raise TestbedError("this mesh's link emulator has no control channel (an older "
                           "'mesh up' started it); restart the mesh with 'mesh down' and "
                           "'mesh up'")
    return state.control


def list_links(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every link of the running mesh: ``between``, settings, ``state`` ("up"/"cut") and
    counters (:meth:`~mesh.testbed.links.LinkSet.describe`)."""
    state = running_state(run_dir)
    if not state.links:
        return []
    links = control.request(_control(state), {"op": "list"})["links"]
    return [link | {"between": state.links.get(link["name"])} for link in links]


def _change(run_dir: str | Path, name: str, body: dict[str, Any]) -> dict[str, Any]:
    state = running_state(run_dir)
    name = link_name(state, name)
    link: dict[str, Any] = control.request(_control(state), body | {"link": name})["link"]
    return link | {"between": state.links[name]}


def cut_link(run_dir: str | Path, name: str) -> dict[str, Any]:
    """Cut a link (see :mod:`mesh.testbed.links`: silence, not refusal); return it."""
    return _change(run_dir, name, {"op": "cut"})


def heal_link(run_dir: str | Path, name: str) -> dict[str, Any]:
    """Heal a cut link; return it."""
    return _change(run_dir, name, {"op": "heal"})


def set_link(run_dir: str | Path, name: str, *, latency_ms: float | None = None,
             bandwidth_mbps: float | None = None, loss: float | None = None,
             jitter_ms: float | None = None) -> dict[str, Any]:
    """Change a link's settings (None: keep); return it. Raises
    :class:`~mesh.testbed.control.LinkControlError` naming a value out of range."""
    settings = {k: v for k, v in (("latency_ms", latency_ms), ("bandwidth_mbps", bandwidth_mbps),
                                  ("loss", loss), ("jitter_ms", jitter_ms)) if v is not None}
    if not settings:
        raise TestbedError("nothing to set: give latency_ms, bandwidth_mbps, loss and/or "
                           "jitter_ms")
    return _change(run_dir, name, {"op": "set", "settings": settings})
