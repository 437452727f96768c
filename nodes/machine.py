"""What a node measures about the machine it runs on: its usable CPUs and the host's identity.

Placement trusts a hardware class's declared ``cores`` only until the node
says otherwise (:class:`mesh.placement.machines.Machine`, carried up in its
load report). Four local nodes whose classes declare 4 to 64 cores on one
2-core laptop report 2 CPUs each and one host, so the root places no more
busy workers on the four together than the 2 CPUs can run.

* **CPUs**: the CPUs this process may run on (``os.sched_getaffinity``), capped
  by a cgroup v2 CPU quota (``cpu.max``) of the process's cgroup or any cgroup
  above it: a container limited to 1.5 CPUs on a 16-core box reports 1.5.
* **Host**: a hash of the kernel's boot id (``/proc/sys/kernel/random/boot_id``),
  which is one for every process on one running kernel (network namespaces and
  containers included: they share its CPUs) and differs between machines and
  virtual machines. Where it cannot be read, the machine id
  (``/etc/machine-id``) and the hostname. Only the hash leaves the node.

Measured once, when the agent starts (:func:`measure_machine`); the parsing is
in pure functions for tests.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
from pathlib import Path

from mesh.placement.machines import Machine

__all__ = ["measure_machine", "quota_cpus", "host_identity"]


def quota_cpus(cpu_max: str) -> float | None:
    """The CPUs a cgroup v2 ``cpu.max`` line (``"150000 100000"``) allows; None for
    ``"max ..."`` (no quota) or a line that does not parse."""
    parts = cpu_max.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = float(parts[0])
        period = float(parts[1]) if len(parts) > 1 else 100_000.0
    except ValueError:
        return None
    if not (math.isfinite(quota) and math.isfinite(period)) or quota <= 0 or period <= 0:
        return None
    return quota / period


def host_identity(boot_id: str | None, machine_id: str | None, hostname: str) -> str:
    """The host's identity: a hash of the boot id, else of the machine id and hostname."""
    source = f"boot:{boot_id.strip()}" if boot_id and boot_id.strip() else \
        f"machine:{(machine_id or '').strip()}:{hostname}"
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _quotas(root: Path) -> list[float]:
    """The CPU quotas of this process's cgroup v2 and every cgroup above it."""
    cgroups = root / "sys/fs/cgroup"
    own = _read(root / "proc/self/cgroup") or ""
    path = next((line[3:].strip() for line in own.splitlines() if line.startswith("0::")), "/")
    here = (cgroups / path.lstrip("/")).resolve() if path != "/" else cgroups
    found = []
    while True:
        text = _read(here / "cpu.max")
        cpus = quota_cpus(text) if text is not None else None
        if cpus is not None:
            found.append(cpus)
        if here == cgroups or cgroups not in here.parents:
            break
        here = here.parent
    return found


def measure_machine(root: Path = Path("/")) -> Machine:
    """This process's usable CPUs and its host's identity (``root``: where ``/proc`` and
    ``/sys`` are, for a node that sees its host's through a mount)."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        cpus = float(os.cpu_count() or 1)
    cpus = min([cpus, *_quotas(root)])
    host = host_identity(_read(root / "proc/sys/kernel/random/boot_id"),
                         _read(root / "etc/machine-id"), socket.gethostname())
    return Machine(cpus=max(cpus, 0.01), host=host)
