"""``mesh up``, ``mesh down``, ``mesh status`` and ``mesh demo``: the local testbed."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from mesh.cli.app import cli, console, home_of
from mesh.status import (
    decisions_table,
    failures_table,
    mesh_status,
    status_table,
    tenant_table,
)

__all__: list[str] = []  # commands register themselves on the cli group


# ---------------------------------------------------------------------- up / down
@cli.command()
@click.argument("topology", type=click.Path(dir_okay=False))
@click.option("--free-ports", is_flag=True,
              help="Ignore the ports in the topology's addresses; use any free ones.")
@click.option("--tls", is_flag=True,
              help="Run the nodes as off loopback: a mesh CA and a certificate per node under "
                   "the run directory, every hop over mutual TLS, both ports TLS only.")
@click.pass_context
def up(ctx: click.Context, topology: str, free_ports: bool, tls: bool) -> None:
    """Start every node of TOPOLOGY on this machine, with emulated links.

    A node whose topology entry gives an address listens on its ports (on loopback), so
    that the URLs in the topology file work; the links between nodes are emulated.
    """
    from mesh.testbed.local import LocalMesh

    mesh = LocalMesh(topology, home=home_of(ctx), use_addresses=not free_ports, tls=tls)
    with console.status(f"starting {len(mesh.topology.nodes)} nodes and "
                        f"{len(mesh.topology.links)} links..."):
        state = mesh.start()
    table = Table(title=f"mesh {mesh.topology.name!r} is up")
    for col in ("node", "tier", "address", "stream address"):
        table.add_column(col)
    for name, info in state.nodes.items():
        table.add_row(name, info["tier"], info["address"], info.get("stream_address", ""))
    console.print(table)
    if state.ca:
        console.print(f"nodes serve TLS only; clients pass ssl=mesh.certs.ca_context({state.ca!r})")
    console.print(f"logs in {state.run_dir}/logs; stop with [bold]mesh down[/bold]")


@cli.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop every process of the mesh: what 'mesh up' started and nodes restarted since.

    Exits with status 1, naming them, when some process could not be stopped.
    """
    from mesh.testbed.local import stop_mesh

    result = stop_mesh(home_of(ctx) / "run")
    if result is None:
        console.print("no mesh is running")
        return
    nodes = sorted({p.name for p in result.stopped if p.role == "node"})
    console.print(f"stopped {len(result.stopped)} processes ({len(nodes)} nodes)")
    later = result.unrecorded()
    if later:
        console.print(f"  of which {len(later)} not started by 'mesh up': "
                      + ", ".join(p.label() for p in later))
    if result.failed:
        for proc, why in result.failed:
            click.echo(f"could not stop {proc.label()}: {why}", err=True)
        ctx.exit(1)


# ---------------------------------------------------------------------- status
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--tenant", default=None, help="Show this tenant's usage on every node instead.")
@click.pass_context
def status(ctx: click.Context, as_json: bool, tenant: str | None) -> None:
    """Show every node of the running mesh."""
    rows = mesh_status(home_of(ctx))
    if tenant is not None:
        if as_json:
            click.echo(json.dumps({r["node"]: (r.get("tenants") or {}).get(tenant)
                                   for r in rows if r.get("up")}, indent=2))
        else:
            console.print(tenant_table(rows, tenant))
    elif as_json:
        click.echo(json.dumps({"nodes": rows, "links": _links(home_of(ctx))}, indent=2))
    else:
        console.print(status_table(rows))
        for extra in (decisions_table(rows), failures_table(rows)):
            if extra is not None:
                console.print(extra)


def _links(home: Path) -> list[dict[str, object]]:
    """The links for ``status --json``: live from the emulator, else their names only."""
    from mesh.testbed import faults
    from mesh.testbed.control import LinkControlError
    from mesh.testbed.local import read_state

    try:
        return faults.list_links(home / "run")
    except LinkControlError:
        state = read_state(home / "run")
        return [{"name": name, "between": between, "state": "unknown"}
                for name, between in (state.links if state else {}).items()]


# ---------------------------------------------------------------------- demo
@cli.command()
@click.option("--topology", "topology_file", default="topologies/local.yaml", show_default=True,
              type=click.Path(dir_okay=False))
@click.option("--queries", default=200, show_default=True, help="Queries per SLO class.")
@click.pass_context
def demo(ctx: click.Context, topology_file: str, queries: int) -> None:
    """Build, start a mesh, send real digit images under three SLOs, show where they went."""
    from mesh.demo import run_demo

    run_demo(home_of(ctx), Path(topology_file), queries_per_class=queries, console=console)
