"""``mesh up``, ``mesh down``, ``mesh status`` and ``mesh demo``: the local testbed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from mesh.cli.app import cli, console, fmt_ms, home_of
from mesh.errors import MeshError

__all__ = ["mesh_status", "print_status", "fetch_status"]


# ---------------------------------------------------------------------- up / down
@cli.command()
@click.argument("topology", type=click.Path(dir_okay=False))
@click.pass_context
def up(ctx: click.Context, topology: str) -> None:
    """Start every node of TOPOLOGY on this machine, with emulated links."""
    from mesh.testbed.local import LocalMesh

    mesh = LocalMesh(topology, home=home_of(ctx))
    with console.status(f"starting {len(mesh.topology.nodes)} nodes and "
                        f"{len(mesh.topology.links)} links..."):
        state = mesh.start()
    table = Table(title=f"mesh {mesh.topology.name!r} is up")
    for col in ("node", "tier", "address", "stream address"):
        table.add_column(col)
    for name, info in state.nodes.items():
        table.add_row(name, info["tier"], info["address"], info.get("stream_address", ""))
    console.print(table)
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
async def fetch_status(nodes: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    import aiohttp

    async def one(session: aiohttp.ClientSession, name: str, info: dict[str, str]
                  ) -> dict[str, Any]:
        try:
            async with session.get(info["address"] + "/v1/status") as resp:
                body = await resp.json()
                body["up"] = resp.status == 200
                return body
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return {"node": name, "tier": info["tier"], "address": info["address"],
                    "stream_address": info.get("stream_address"), "up": False}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        return list(await asyncio.gather(*(one(session, n, i) for n, i in nodes.items())))


def mesh_status(home: Path) -> list[dict[str, Any]]:
    from mesh.testbed.local import read_state

    state = read_state(home / "run")
    if state is None:
        raise MeshError(f"no mesh is running from {home}; start one with 'mesh up TOPOLOGY'")
    return asyncio.run(fetch_status(state.nodes))


def print_status(rows: list[dict[str, Any]]) -> None:
    table = Table(title="mesh status")
    for col in ("node", "tier", "address", "state", "variants", "queue", "requests",
                "served here", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right" if col in (
            "queue", "requests", "served here", "p50 ms", "p99 ms") else "left")
    order = {"core": 0, "intermediate": 1, "edge": 2}
    for row in sorted(rows, key=lambda r: (order.get(r.get("tier", ""), 3), r["node"])):
        if not row["up"]:
            table.add_row(row["node"], row.get("tier", "?"), row.get("address", ""),
                          "[red]down[/red]", "", "", "", "", "", "")
            continue
        loaded = [v["name"] for v in row["variants"] if v.get("loaded")]
        broken = [v["name"] for v in row["variants"] if not v.get("loaded")]
        variants = ", ".join(loaded) + (f" [red](failed: {', '.join(broken)})[/red]" if broken else "")
        lat = row.get("latency_ms", {})
        table.add_row(row["node"], row["tier"], row["address"], "[green]up[/green]",
                      variants or "-", str(row["queue_depth"]), str(row["requests"]),
                      str(row["served_local"]), fmt_ms(lat.get("p50")), fmt_ms(lat.get("p99")))
    console.print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show every node of the running mesh."""
    rows = mesh_status(home_of(ctx))
    if as_json:
        click.echo(json.dumps({"nodes": rows}, indent=2))
    else:
        print_status(rows)


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
