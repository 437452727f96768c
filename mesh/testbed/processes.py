"""The processes of one local mesh: found by what they run, stopped and checked.

A process belongs to the mesh of a run directory when its command line runs
a node agent on that directory's run file (``python -m nodes --runtime
RUN_DIR/run.json ...``) or the link emulator on its link file (``python -m
mesh.testbed.links RUN_DIR/links.json``). Finding them by command line, not
only by the pids ``mesh up`` recorded, also finds a node someone restarted
by hand with the same run file. A relative path is resolved against the
process's own working directory.

A process is identified by its pid *and* its start time, so a pid the
kernel reused for something else is never signalled. Linux only (``/proc``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MeshProcess", "StopResult", "find_processes", "describe", "log_tail", "spawn",
           "stop_processes"]

RUN_FILE = "run.json"
LINKS_FILE = "links.json"


@dataclass(frozen=True)
class MeshProcess:
    """One running process of a mesh: ``role`` is "node" or "links"."""

    pid: int
    role: str
    name: str
    #: start time in clock ticks since boot (``/proc/PID/stat`` field 22): with the pid, an identity
    started: int

    def label(self) -> str:
        return f"pid {self.pid} ({self.role} {self.name})" if self.role == "node" \
            else f"pid {self.pid} (link emulator)"


@dataclass
class StopResult:
    """What :func:`stop_processes` did: every process is in exactly one of the lists."""

    stopped: list[MeshProcess] = field(default_factory=list)
    #: (process, why it is still running)
    failed: list[tuple[MeshProcess, str]] = field(default_factory=list)


def spawn(argv: list[str], log_path: Path, *, append: bool = False) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own (so that stopping it takes its children too),
    its output to ``log_path`` (appended to with ``append``: a restart keeps the old log)."""
    with open(log_path, "ab" if append else "wb") as log:  # the child keeps its own copy
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of ``pid``, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def _module_and_args(argv: list[str]) -> tuple[str, list[str]] | None:
    """``("nodes", [args...])`` for ``python [opts] -m nodes args...``; None for anything else."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return (argv[i + 1], argv[i + 2:]) if i + 1 < len(argv) else None
        if arg.startswith("-m") and len(arg) > 2:  # "-mnodes"
            return arg[2:], argv[i + 1:]
        if arg.endswith("nodes/__main__.py"):  # "python nodes/__main__.py ..."
            return "nodes", argv[i + 1:]
        if not arg.startswith("-") or arg == "-c":
            return None  # a script or a command: not one of ours
        i += 2 if arg in ("-X", "-W") else 1  # the interpreter options that take a value
    return None


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    return None


def describe(pid: int, run_dir: str | Path) -> MeshProcess | None:
    """``pid`` as a process of the mesh in ``run_dir``; None when it is not one (or is gone)."""
    run_dir = Path(run_dir).resolve()
    try:
        argv = [a.decode(errors="replace")
                for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    parsed = _module_and_args(argv)
    if parsed is None:
        return None
    module, args = parsed
    if module in ("nodes", "nodes.__main__"):
        role, path, name = "node", _option(args, "--runtime"), _option(args, "--node") or "?"
        wanted = run_dir / RUN_FILE
    elif module == "mesh.testbed.links":
        role, path, name = "links", (args[0] if args else None), "links"
        wanted = run_dir / LINKS_FILE
    else:
        return None
    if path is None:
        return None
    if not os.path.isabs(path):
        try:
            path = os.path.join(os.readlink(f"/proc/{pid}/cwd"), path)
        except OSError:
            return None  # its working directory is hidden from us: cannot tell
    if os.path.realpath(path) != str(wanted.resolve()):
        return None
    stat = _stat(pid)
    if stat is None or stat[0] in "ZX":  # gone, or dead and waiting for its parent
        return None
    return MeshProcess(pid, role, name, stat[1])


def find_processes(run_dir: str | Path) -> list[MeshProcess]:
    """Every running process of the mesh in ``run_dir``, by pid."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            proc = describe(int(entry.name), run_dir)
            if proc is not None:
                found.append(proc)
    return sorted(found, key=lambda p: p.pid)


def _alive(proc: MeshProcess, waiters: Mapping[int, subprocess.Popen[bytes]]) -> bool:
    waiter = waiters.get(proc.pid)
    if waiter is not None and waiter.poll() is not None:
        return False  # our child, reaped just now
    stat = _stat(proc.pid)
    return stat is not None and stat[1] == proc.started and stat[0] not in "ZX"


def _signal(proc: MeshProcess, sig: signal.Signals) -> None:
    """Signal the process, and its process group when it leads one of its own.

    ``mesh up`` starts every process in its own session, so the group takes
    its children with it; a node started by hand from a script shares its
    caller's group, and then only the node itself is signalled.
    """
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    if pgid == proc.pid and pgid != os.getpgrp():
        os.killpg(pgid, sig)
    else:
        os.kill(proc.pid, sig)


def _wait(procs: Iterable[MeshProcess], until: float,
          waiters: Mapping[int, subprocess.Popen[bytes]]) -> list[MeshProcess]:
    """Wait until every process has ended or ``until`` passed; return those still running."""
    left = list(procs)
    while True:
        left = [p for p in left if _alive(p, waiters)]
        if not left or time.monotonic() >= until:
            return left
        time.sleep(0.05)


def stop_processes(procs: Iterable[MeshProcess], timeout_s: float, *,
                   waiters: Mapping[int, subprocess.Popen[bytes]] | None = None,
                   kill_wait_s: float = 5.0) -> StopResult:
    """SIGTERM every process, SIGKILL those left after ``timeout_s``, and report.

    ``waiters`` are the ``Popen`` objects of processes that are our own
    children, so that they are reaped. Never raises for a process that
    cannot be signalled: it is reported in :attr:`StopResult.failed`.
    """
    waiters = waiters or {}
    procs = [p for p in procs if _alive(p, waiters)]
    result = StopResult()
    denied: dict[int, str] = {}

    def send(targets: list[MeshProcess], sig: signal.Signals) -> None:
        for proc in targets:
            if proc.pid in denied or not _alive(proc, waiters):
                continue
            try:
                _signal(proc, sig)
            except PermissionError:
                denied[proc.pid] = "not permitted to signal it (another user's process)"
            except ProcessLookupError:
                pass

    send(procs, signal.SIGTERM)
    left = _wait([p for p in procs if p.pid not in denied], time.monotonic() + timeout_s, waiters)
    send(left, signal.SIGKILL)
    left = _wait([p for p in left if p.pid not in denied], time.monotonic() + kill_wait_s, waiters)
    for proc in procs:
        if proc.pid in denied:
            result.failed.append((proc, denied[proc.pid]))
        elif proc in left:
            result.failed.append((proc, f"still running {kill_wait_s:.0f} s after SIGKILL"))
        else:
            result.stopped.append(proc)
    for proc in result.stopped:  # reap our own children
        if proc.pid in waiters:
            waiters[proc.pid].wait(timeout=kill_wait_s)
    return result
