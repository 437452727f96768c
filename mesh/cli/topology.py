"""``mesh topology check`` and ``mesh plan``: topology files and the planner's reasoning."""

from __future__ import annotations

import json

import click
from rich.table import Table

from mesh.cli.app import cli, console, home_of
from mesh.registry import Registry
from mesh.wire import POLICIES, SLO


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

    home = home_of(ctx)
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
