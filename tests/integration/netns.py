"""Hosts on one machine: a Linux network namespace per node, veth pairs on one bridge.

``hosts(["core-1", "mid-1", ...])`` makes, for each name, a namespace with its
own address on a private /24 (the bridge in this namespace holds ``.1``, so
the test process reaches every host), and removes all of it on the way out,
also when the test fails or is interrupted. Needs root and ``ip netns``; when
they are not there :class:`NetnsUnavailable` says so.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["Host", "NetnsUnavailable", "hosts"]


class NetnsUnavailable(RuntimeError):
    """This machine cannot make network namespaces (not root, no iproute2, not permitted)."""


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsUnavailable(f"'ip {' '.join(args)}' failed: {done.stderr.strip()}")


@contextlib.contextmanager
def hosts(names: Sequence[str]) -> Iterator[dict[str, Host]]:
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root; run the tests as root")
    tag = secrets.token_hex(3)
    subnet = f"10.{77 + int(tag[:2], 16) % 100}.{int(tag[2:4], 16)}"
    bridge = f"tmbr{tag}"
    made: list[tuple[str, str]] = []  # ("netns" | "link", name), undone in reverse
    try:
        _ip("link", "add", bridge, "type", "bridge")
        made.append(("link", bridge))
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        out: dict[str, Host] = {}
        for i, name in enumerate(names):
            netns, outer, inner = f"tm-{tag}-{i}", f"tmv{tag}{i}", f"tmw{tag}{i}"
            _ip("netns", "add", netns)
            made.append(("netns", netns))
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            made.append(("link", outer))
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            _ip("link", "set", inner, "netns", netns)
            address = f"{subnet}.{10 + i}"
            _ip("-n", netns, "addr", "add", f"{address}/24", "dev", inner)
            _ip("-n", netns, "link", "set", inner, "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            out[name] = Host(name, netns, address)
        yield out
    finally:
        for kind, name in reversed(made):
            if kind == "netns":
                subprocess.run(["ip", "netns", "pids", name], capture_output=True)
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            else:
                subprocess.run(["ip", "link", "del", name], capture_output=True)
