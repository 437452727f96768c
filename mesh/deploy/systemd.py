"""A systemd unit and an environment file per node, for a bare machine (an edge box).

``tiermesh-<node>.service`` runs ``mesh node run`` as the dedicated user
``tiermesh``, restarts it on failure, keeps its home under
``/var/lib/tiermesh`` (``StateDirectory``: created and owned by that user)
and caps its memory at the hardware class's ``memory_mb`` plus the process's
headroom. ``<node>.env`` holds what differs per machine: the topology, the
node, the home and the TLS folder. On the machine the node reads the
topology file itself, so its own and its neighbours' addresses must be in it:
a node without one is rendered, with a warning.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mesh.deploy.rendering import Rendering, header
from mesh.deploy.resources import PROCESS_HEADROOM_MB
from mesh.errors import TopologyError
from mesh.topology import Topology

__all__ = ["SystemdOptions", "render_systemd"]


@dataclass(frozen=True)
class SystemdOptions:
    """How to render. ``source``: what the header names as the topology file."""

    source: str = "topology"
    #: The ``mesh`` command on the machine (a virtual environment under /opt).
    mesh_bin: str = "/opt/tiermesh/bin/mesh"
    topology_path: str = "/etc/tiermesh/topology.yaml"
    home: str = "/var/lib/tiermesh"
    tls_dir: str = "/etc/tiermesh/tls"
    user: str = "tiermesh"

    def __post_init__(self) -> None:
        for what in ("mesh_bin", "topology_path", "home", "tls_dir"):
            value = getattr(self, what)
            if not value.startswith("/") or any(c.isspace() for c in value):
                raise ValueError(f"{what.replace('_', ' ')}: {value!r} must be an absolute path "
                                 "without spaces")
        if self.home.rstrip("/") != "/var/lib/tiermesh":
            # StateDirectory= only creates folders under /var/lib
            raise ValueError(f"home: {self.home!r}; a systemd node keeps its home in "
                             "/var/lib/tiermesh")


def render_systemd(topology: Topology, nodes: Iterable[str] | None = None,
                   options: SystemdOptions | None = None) -> Rendering:
    """Unit and environment files of ``nodes`` (default: every edge node).

    Raises :class:`TopologyError` naming any node that is not in the topology.
    """
    options = options or SystemdOptions()
    chosen = list(nodes) if nodes is not None else topology.nodes_in_tier("edge")
    unknown = [n for n in chosen if n not in topology.nodes]
    if unknown:
        known = ", ".join(list(topology.nodes)[:8]) + (", ..." if len(topology.nodes) > 8 else "")
        raise TopologyError(f"{options.source} (target systemd)",
                            [f"node {n!r} is not in the topology (its nodes: {known})"
                             for n in unknown])
    if not chosen:
        raise TopologyError(f"{options.source} (target systemd)",
                            ["the topology has no edge node; name the nodes to render with --node"])
    files: dict[str, str] = {}
    warnings: list[str] = []
    for node in dict.fromkeys(chosen):
        files[f"tiermesh-{node}.service"] = _unit(topology, node, options)
        files[f"{node}.env"] = _environment(topology, node, options)
        missing = [n for n in (node, *topology.neighbours(node))
                   if topology.nodes[n].address is None]
        if missing:
            warnings.append(
                f"{node}: {', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no "
                f"address in {options.source}; give every node an address "
                "(docs/topology.md) before this node runs off this machine")
    return Rendering(files=files, warnings=tuple(warnings))


def _environment(topology: Topology, node: str, options: SystemdOptions) -> str:
    return (header(options.source, topology.name,
                   f"Environment of tiermesh-{node}.service; install as /etc/tiermesh/{node}.env.")
            + f"TIERMESH_TOPOLOGY={options.topology_path}\n"
            + f"TIERMESH_NODE={node}\n"
            + f"TIERMESH_HOME={options.home}\n"
            + f"TIERMESH_TLS_DIR={options.tls_dir}\n")


def _unit(topology: Topology, node: str, options: SystemdOptions) -> str:
    spec = topology.nodes[node]
    hardware = topology.hardware_of(node)
    memory_mb = hardware.memory_mb + PROCESS_HEADROOM_MB
    accelerated = hardware.kind == "cuda" or bool(hardware.accelerators)
    devices = ("" if accelerated else
               "PrivateDevices=yes\n")  # an accelerator's device files must stay visible
    # ${VAR}: one argument each, from the environment file
    command = (f"{options.mesh_bin} --home ${{TIERMESH_HOME}} node run ${{TIERMESH_TOPOLOGY}} "
               "${TIERMESH_NODE} --tls-dir ${TIERMESH_TLS_DIR}")
    return f"""{header(options.source, topology.name,
                       f"Install as /etc/systemd/system/tiermesh-{node}.service (deploy/README.md).")}
[Unit]
Description=Tiermesh node {node} ({spec.tier} tier of mesh {topology.name})
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
User={options.user}
Group={options.user}
EnvironmentFile=/etc/tiermesh/{node}.env
ExecStart={command}
Restart=on-failure
RestartSec=5s
TimeoutStopSec=30s
# The home: /var/lib/tiermesh, created and owned by {options.user}.
StateDirectory=tiermesh
StateDirectoryMode=0750
# Hardware class {spec.hardware}: {hardware.memory_mb} MB for models, plus the process itself.
MemoryMax={memory_mb}M
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
{devices}ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
"""
