"""A running local mesh's state file (``RUN_DIR/state.json``): what ``mesh up`` leaves
behind for ``mesh status``, ``mesh down``, ``mesh node ...`` and ``mesh link ...``.

Written atomically and durably (:mod:`mesh.durable`); :func:`update_state` holds
a lock (``RUN_DIR/state.lock``) around read-modify-write, so two ``mesh node``
commands at once do not lose each other's pids.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mesh.certs import ca_context
from mesh.durable import write_atomic
from mesh.errors import MeshError

__all__ = ["STATE_FILE", "MeshState", "TestbedError", "read_state", "update_state",
           "write_state"]

STATE_FILE = "state.json"
LOCK_FILE = "state.lock"


class TestbedError(MeshError):
    """The local mesh, or one of its nodes or links, could not be started, stopped or
    changed."""


@dataclass(frozen=True)
class MeshState:
    """What ``mesh up`` leaves behind for the commands that act on the running mesh."""

    topology: str
    home: str
    run_dir: str
    #: node -> {"tier", "address", "stream_address"} (direct addresses, not through link
    #: emulators; ``stream_address`` is ``tcp://HOST:PORT``)
    nodes: dict[str, dict[str, str]]
    #: {"role": "node"|"links", "name", "pid", "argv"}: ``argv`` starts it again
    processes: list[dict[str, Any]]
    #: the mesh CA's certificate when the nodes serve TLS (``mesh up --tls``), else None
    ca: str | None = None
    #: topology link name (``a--b``) -> its two nodes, as the topology lists them
    links: dict[str, list[str]] = field(default_factory=dict)
    #: ``HOST:PORT`` of the link emulator's control channel (:mod:`mesh.testbed.control`)
    control: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"topology": self.topology, "home": self.home, "run_dir": self.run_dir,
               "nodes": self.nodes, "processes": self.processes, "links": self.links}
        return out | ({"ca": self.ca} if self.ca else {}) | (
            {"control": self.control} if self.control else {})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MeshState:
        return cls(data["topology"], data["home"], data["run_dir"], data["nodes"],
                   data["processes"], data.get("ca"), data.get("links", {}), data.get("control"))

    def client_ssl(self) -> ssl.SSLContext | None:
        """What a client passes as ``ssl=`` to reach these nodes (None: plain TCP)."""
        return ca_context(self.ca) if self.ca else None

    def address(self, node: str) -> str:
        return self.nodes[node]["address"]

    def stream_address(self, node: str) -> str:
        return self.nodes[node]["stream_address"]

    def process(self, role: str, name: str) -> dict[str, Any] | None:
        return next((p for p in self.processes if p["role"] == role and p["name"] == name), None)

    def with_pid(self, name: str, pid: int) -> MeshState:
        """This state with node ``name`` recorded as running as ``pid``."""
        return replace(self, processes=[p | {"pid": pid} if p["role"] == "node"
                                        and p["name"] == name else p for p in self.processes])


def read_state(run_dir: str | Path) -> MeshState | None:
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        return MeshState.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise TestbedError(f"{path} is damaged ({exc}); remove it and stop stray processes") from None


def write_state(state: MeshState) -> None:
    write_atomic(Path(state.run_dir) / STATE_FILE, json.dumps(state.to_json(), indent=2))


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    with open(run_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_state(run_dir: str | Path, change: Callable[[MeshState], MeshState]) -> MeshState | None:
    """Read, change and write the state under the lock; None (nothing written) when there is
    no state file (the mesh was stopped meanwhile)."""
    run_dir = Path(run_dir)
    with _locked(run_dir):
        state = read_state(run_dir)
        if state is None:
            return None
        state = change(state)
        write_state(state)
        return state
