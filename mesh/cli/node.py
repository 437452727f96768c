"""``mesh node run``: one node of a topology on this machine, from the topology alone."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from mesh.cli.app import cli, home_of
from mesh.errors import MeshError
from mesh.topology import load_topology

__all__: list[str] = []  # commands register themselves on the cli group


@cli.group()
def node() -> None:
    """Run one node of a mesh (one node per host), or stop, start or restart one node of
    the running local mesh (mesh up)."""


@node.command("run")
@click.argument("topology_file", type=click.Path(dir_okay=False))
@click.argument("name")
@click.option("--tls-dir", type=click.Path(file_okay=False),
              help="ca.pem, node.pem, node-key.pem for mutual TLS with the other nodes "
                   "(mesh certs issue).")
@click.option("--insecure", is_flag=True,
              help="Allow a non-loopback address without TLS (a trusted network only).")
@click.pass_context
def run(ctx: click.Context, topology_file: str, name: str, tls_dir: str | None,
        insecure: bool) -> None:
    """Start node NAME of TOPOLOGY_FILE here: it listens at its address and finds its
    neighbours at theirs. It pulls the registry entries and artifacts it needs from its
    parent, so its --home may start empty. Runs until SIGTERM or Ctrl-C."""
    topology = load_topology(topology_file)  # a broken file is reported by key path
    try:
        topology.addresses_for(name)
    except ValueError as exc:
        raise MeshError(f"{topology_file}: {exc}") from None
    if tls_dir is not None:
        absent = [f for f in ("ca.pem", "node.pem", "node-key.pem")
                  if not (Path(tls_dir) / f).is_file()]
        if absent:
            raise MeshError(f"--tls-dir {tls_dir}: missing {', '.join(absent)}; make them "
                            f"with 'mesh certs issue {name} --topology {topology_file}'")
    home = home_of(ctx).resolve()
    argv = [sys.executable, "-m", "nodes", "--topology", str(Path(topology_file).resolve()),
            "--node", name, "--home", str(home)]
    if tls_dir is not None:
        argv += ["--tls-dir", str(Path(tls_dir).resolve())]
    if insecure:
        argv.append("--insecure")
    # The node is its own process image: signals, exit status and logs are the node's.
    os.execv(sys.executable, argv)


# ---------------------------------------------------------------------- the running local mesh
# Failures to rehearse on the mesh 'mesh up' started from --home (mesh.testbed.faults).


@node.command("stop")
@click.argument("name")
@click.option("--timeout-s", default=10.0, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
@click.pass_context
def stop(ctx: click.Context, name: str, timeout_s: float) -> None:
    """Stop node NAME of the running local mesh (SIGTERM, then SIGKILL). Its neighbours
    notice through their own heartbeats and timeouts. A stopped node stays stopped."""
    from mesh.testbed import faults

    stopped = faults.stop_node(home_of(ctx) / "run", name, timeout_s=timeout_s)
    if stopped:
        click.echo(f"stopped {name} (pid {', '.join(str(p.pid) for p in stopped)})")
    else:
        click.echo(f"{name} was not running")


@node.command("start")
@click.argument("name")
@click.pass_context
def start(ctx: click.Context, name: str) -> None:
    """Start node NAME of the running local mesh again, on its own ports, and wait until it
    is healthy. It rejoins by itself: heartbeats to its parent, its variants from the store."""
    from mesh.testbed import faults

    started = faults.start_node(home_of(ctx) / "run", name)
    if started.process is None:
        click.echo(f"{name} is already running (pid {started.pid})")
    else:
        click.echo(f"started {name} (pid {started.pid})")


@node.command("restart")
@click.argument("name")
@click.option("--timeout-s", default=10.0, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
@click.pass_context
def restart(ctx: click.Context, name: str, timeout_s: float) -> None:
    """Stop node NAME of the running local mesh and start it again (see stop and start)."""
    from mesh.testbed import faults

    stopped, started = faults.restart_node(home_of(ctx) / "run", name, stop_timeout_s=timeout_s)
    before = ", ".join(str(p.pid) for p in stopped) or "not running"
    click.echo(f"restarted {name}: pid {before} -> {started.pid}")
