"""What a node reports about its machine: the CPUs it may really use and the host it runs on."""

from __future__ import annotations

import os
from pathlib import Path

from nodes.machine import host_identity, measure_machine, quota_cpus


def _root(tmp_path: Path, *, boot_id: str | None = "7c1e0b0e-boot", cgroup: str = "0::/\n",
          quotas: dict[str, str] | None = None) -> Path:
    """A /proc and /sys as a node sees them (a container's, a systemd unit's)."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    if boot_id is not None:
        (tmp_path / "proc/sys/kernel/random").mkdir(parents=True)
        (tmp_path / "proc/sys/kernel/random/boot_id").write_text(boot_id + "\n")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/machine-id").write_text("0123456789abcdef\n")
    for where, line in (quotas or {}).items():
        path = tmp_path / "sys/fs/cgroup" / where / "cpu.max"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(line + "\n")
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True, exist_ok=True)
    return tmp_path


def test_a_node_reports_the_cpus_its_process_may_use() -> None:
    machine = measure_machine()
    assert machine.cpus == len(os.sched_getaffinity(0))  # no quota on this test machine
    assert measure_machine().host == machine.host  # every node process here: one host


def test_a_cgroup_quota_caps_the_cpus_of_a_container_or_unit(tmp_path: Path) -> None:
    # a container's own cgroup limited to 1.5 CPUs (its cgroup namespace: it sees it at /)
    assert measure_machine(_root(tmp_path / "a", quotas={"": "150000 100000"})).cpus == \
        min(1.5, len(os.sched_getaffinity(0)))
    # a systemd unit with CPUQuota=50% below a slice with no quota
    unit = measure_machine(_root(tmp_path / "b", cgroup="0::/system.slice/tiermesh.service\n",
                                 quotas={"system.slice": "max 100000",
                                         "system.slice/tiermesh.service": "50000 100000"}))
    assert unit.cpus == 0.5
    # no quota anywhere: the affinity alone
    assert measure_machine(_root(tmp_path / "c", quotas={"": "max 100000"})).cpus == \
        len(os.sched_getaffinity(0))
    assert quota_cpus("max") is None and quota_cpus("garbage") is None
    assert quota_cpus("200000 100000") == 2.0


def test_processes_on_one_kernel_share_a_host_and_other_machines_do_not(tmp_path: Path) -> None:
    one = measure_machine(_root(tmp_path / "a", boot_id="boot-1"))
    # another process on the same kernel, in a container with its own hostname and machine id
    assert host_identity("boot-1\n", "another-machine-id", "container-7") == one.host
    # another machine (another kernel)
    assert measure_machine(_root(tmp_path / "b", boot_id="boot-2")).host != one.host
    # no boot id to read: the machine id and hostname tell machines apart
    assert host_identity(None, "m-1", "a") != host_identity(None, "m-2", "a")
    assert "boot-1" not in one.host  # only a hash leaves the node
