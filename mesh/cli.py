"""The ``mesh`` command line.

::

    mesh build                         train and register the bundled variants
    mesh up topologies/local.yaml      start every node (own process) with emulated links
    mesh status [--json]               one row per node: tier, address, variants, queue, p50/p99
    mesh plan --task digits --from edge-1 --latency-ms 10
    mesh variants list [--task T]      the registered variants and their measurements
    mesh topology check FILE           validate and summarise a topology file
    mesh down                          stop everything ``mesh up`` started
    mesh demo                          all of the above with real queries

Every command takes ``--home`` (default ``.tiermesh``, or ``$TIERMESH_HOME``):
the folder holding the registry, the artifact store and the running mesh's state.
Errors are printed as one clear message and exit with status 1, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from mesh.errors import MeshError
from mesh.registry import Registry
from mesh.wire import POLICIES, SLO

# Piped output (CI logs, `make demo | tee`) gets a wide table instead of rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 180)


class _Group(click.Group):
    """Turns every MeshError into a one-line CLI error."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MeshError as exc:
            raise click.ClickException(exc.message) from None


def _home(ctx: click.Context) -> Path:
    return Path(ctx.obj["home"])


@click.group(cls=_Group)
@click.option("--home", default=".tiermesh", envvar="TIERMESH_HOME", show_default=True,
              type=click.Path(file_okay=False), help="Registry, artifact store and run state.")
@click.pass_context
def cli(ctx: click.Context, home: str) -> None:
    """Tiermesh: a managed, model-less edge-to-cloud inference mesh."""
    ctx.ensure_object(dict)
    ctx.obj["home"] = home


# ---------------------------------------------------------------------- build
@cli.command()
@click.option("--force", is_flag=True, help="Rebuild even when the cache is valid.")
@click.pass_context
def build(ctx: click.Context, force: bool) -> None:
    """Train, export, measure and register the bundled model variants."""
    try:
        from mesh.variants import build_bundled
    except ImportError as exc:
        raise click.ClickException(
            f"building variants needs the 'build' extra ({exc.name} is missing): "
            "pip install -e '.[build]'") from None
    variants = build_bundled(_home(ctx), force=force)
    _variants_table(variants, title=f"Registered in {_home(ctx)}")


# ---------------------------------------------------------------------- up / down
@cli.command()
@click.argument("topology", type=click.Path(dir_okay=False))
@click.pass_context
def up(ctx: click.Context, topology: str) -> None:
    """Start every node of TOPOLOGY on this machine, with emulated links."""
    from mesh.testbed.local import LocalMesh

    mesh = LocalMesh(topology, home=_home(ctx))
    with console.status(f"starting {len(mesh.topology.nodes)} nodes and "
                        f"{len(mesh.topology.links)} links..."):
        state = mesh.start()
    table = Table(title=f"mesh {mesh.topology.name!r} is up")
    for col in ("node", "tier", "address"):
        table.add_column(col)
    for name, info in state.nodes.items():
        table.add_row(name, info["tier"], info["address"])
    console.print(table)
    console.print(f"logs in {state.run_dir}/logs; stop with [bold]mesh down[/bold]")


@cli.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop every process that 'mesh up' started."""
    from mesh.testbed.local import stop_mesh

    state = stop_mesh(_home(ctx) / "run")
    if state is None:
        console.print("no mesh is running")
    else:
        console.print(f"stopped {len(state.processes)} processes ({len(state.nodes)} nodes)")


# ---------------------------------------------------------------------- status
async def _fetch_status(nodes: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    import aiohttp

    async def one(session: aiohttp.ClientSession, name: str, info: dict[str, str]
                  ) -> dict[str, Any]:
        try:
            async with session.get(info["address"] + "/v1/status") as resp:
                body = await resp.json()
                body["up"] = resp.status == 200
                return body
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return {"node": name, "tier": info["tier"], "address": info["address"], "up": False}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        return list(await asyncio.gather(*(one(session, n, i) for n, i in nodes.items())))


def mesh_status(home: Path) -> list[dict[str, Any]]:
    from mesh.testbed.local import read_state

    state = read_state(home / "run")
    if state is None:
        raise MeshError(f"no mesh is running from {home}; start one with 'mesh up TOPOLOGY'")
    return asyncio.run(_fetch_status(state.nodes))


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
                      str(row["served_local"]), _fmt(lat.get("p50")), _fmt(lat.get("p99")))
    console.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show every node of the running mesh."""
    rows = mesh_status(_home(ctx))
    if as_json:
        click.echo(json.dumps({"nodes": rows}, indent=2))
    else:
        print_status(rows)


# ---------------------------------------------------------------------- topology
@cli.group()
def topology() -> None:
    """Topology files."""


@topology.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def topology_check(file: str, as_json: bool) -> None:
    """Validate FILE and summarise it."""
    from mesh.topology import load_topology

    summary = load_topology(file).summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    lat = summary["path_latency_ms"]
    console.print(f"[green]ok[/green] {file}: topology {summary['name']!r}, "
                  f"{summary['nodes']} nodes, {summary['links']} links")
    console.print("  nodes per tier: " + ", ".join(
        f"{tier} {n}" for tier, n in summary["nodes_per_tier"].items()))
    console.print(f"  path latency (one way): {lat['min']:g} to {lat['max']:g} ms")
    console.print(f"  unreachable: {', '.join(summary['unreachable']) or 'none'}")


# ---------------------------------------------------------------------- variants
@cli.group()
def variants() -> None:
    """The registered model variants."""


def _variants_table(found: list[Any], title: str) -> None:
    keys = sorted({k for v in found for k in v.profiles})
    table = Table(title=title)
    for col in ("variant", "task", "format", "precision", "size KB", "MACs", "accuracy"):
        table.add_column(col, justify="left" if col in ("variant", "task", "format",
                                                        "precision") else "right")
    for key in keys:
        table.add_column(f"{key} b1 ms", justify="right")
        table.add_column(f"{key} b32 ms", justify="right")
    table.add_column("cold start ms", justify="right")
    for v in found:
        cells = [v.name, v.task, v.format, v.precision, f"{v.size_bytes / 1024:.1f}",
                 f"{v.macs:,}", f"{v.accuracy:.4f}"]
        for key in keys:
            p = v.profiles.get(key)
            cells += [_fmt(p.latency_ms(1)) if p else "-", _fmt(p.latency_ms(32)) if p else "-"]
        colds = [p.cold_start_ms for p in v.profiles.values()]
        cells.append(_fmt(max(colds)) if colds else "-")
        table.add_row(*cells)
    console.print(table)


@variants.command("list")
@click.option("--task", default=None, help="Only this task.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def variants_list(ctx: click.Context, task: str | None, as_json: bool) -> None:
    """List variants with format, size, accuracy and measured latency."""
    registry = Registry.load(_home(ctx))
    found = registry.for_task(task) if task else sorted(registry.variants.values(),
                                                        key=lambda v: v.name)
    if as_json:
        click.echo(json.dumps({"variants": [v.to_json() for v in found]}, indent=2))
    elif not found:
        console.print(f"no variants registered in {_home(ctx)}; run 'mesh build'")
    else:
        _variants_table(found, title=f"variants in {_home(ctx)}")


# ---------------------------------------------------------------------- plan
@cli.command()
@click.option("--task", required=True)
@click.option("--from", "entry", required=True, help="Entry node the query arrives at.")
@click.option("--topology", "topology_file", type=click.Path(dir_okay=False), default=None,
              help="Topology file (default: the running mesh's).")
@click.option("--latency-ms", type=float, default=None)
@click.option("--min-accuracy", type=float, default=None)
@click.option("--policy", type=click.Choice(POLICIES), default="cheapest")
@click.option("--rows", type=int, default=1, show_default=True, help="Batch rows in the query.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def plan(ctx: click.Context, task: str, entry: str, topology_file: str | None,
         latency_ms: float | None, min_accuracy: float | None, policy: str, rows: int,
         as_json: bool) -> None:
    """Explain where a query would go and why."""
    from mesh.planner import Planner
    from mesh.state import MeshView
    from mesh.testbed.local import read_state
    from mesh.topology import load_topology

    home = _home(ctx)
    if topology_file is None:
        state = read_state(home / "run")
        if state is None:
            raise click.UsageError("no mesh is running; pass --topology FILE")
        topology_file = state.topology
    topo = load_topology(topology_file)
    if entry not in topo.nodes:
        raise click.BadParameter(f"{entry!r} is not a node of {topo.name!r} "
                                 f"({', '.join(sorted(topo.nodes))})", param_hint="--from")
    registry = Registry.load(home)
    slo = SLO.from_wire(SLO(latency_ms, min_accuracy, None, False, policy).to_wire())
    planner = Planner(topo, registry)
    variant = registry.for_task(task)[0]
    payload = rows * sum(4 * max(1, abs(_prod(s.shape[1:]))) for s in variant.inputs)
    decision = planner.plan(task, slo, entry, MeshView(), now=0.0, rows=rows,
                            payload_bytes=payload, explain=True)
    if as_json:
        click.echo(json.dumps({"decision": decision.to_dict(),
                               "candidates": [s.to_dict() for s in decision.candidates]},
                              indent=2))
        return
    table = Table(title=f"candidates for {task!r} from {entry} ({policy})")
    for col in ("node", "tier", "variant", "accuracy", "network", "queue", "compute", "load",
                "total ms", "$/1k", "feasible"):
        table.add_column(col)
    for s in decision.candidates:
        p = s.prediction
        mark = "[green]yes[/green]" if s.feasible else f"[red]{'; '.join(s.problems)}[/red]"
        if (s.candidate.node, s.candidate.variant) == (decision.node, decision.variant):
            mark = "[bold]chosen[/bold] " + mark
        table.add_row(s.candidate.node, s.candidate.tier, s.candidate.variant,
                      f"{s.candidate.accuracy:.4f}", f"{p.network_ms:.2f}", f"{p.queue_ms:.2f}",
                      f"{p.compute_ms:.3f}", f"{p.load_ms:.1f}", f"{p.total_ms:.2f}",
                      f"{s.cost_per_1k:.2e}", mark)
    console.print(table)
    console.print(f"-> {decision.node}/{decision.variant}: {decision.reason}")


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


# ---------------------------------------------------------------------- demo
@cli.command()
@click.option("--topology", "topology_file", default="topologies/local.yaml", show_default=True,
              type=click.Path(dir_okay=False))
@click.option("--queries", default=100, show_default=True, help="Queries per SLO class.")
@click.pass_context
def demo(ctx: click.Context, topology_file: str, queries: int) -> None:
    """Build, start a mesh, send real digit images under three SLOs, show where they went."""
    from mesh.demo import run_demo

    run_demo(_home(ctx), Path(topology_file), queries_per_class=queries, console=console)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="mesh")


if __name__ == "__main__":
    main(sys.argv[1:])
