"""``mesh topology check`` and ``mesh plan``: topology files and the planner's reasoning."""

from __future__ import annotations

import json
import math
from typing import Any

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
    """Validate FILE and summarise it (fast even for thousands of nodes)."""
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
    if summary["groups"]:
        console.print("  expanded groups: " + ", ".join(
            f"{g} x{n}" for g, n in summary["groups"].items()))
    h = summary["hierarchy"]
    console.print(f"  hierarchy: root(s) {', '.join(h['roots'])}, depth {h['max_depth']}, "
                  + ("a tree" if h["is_tree"] else "with cross links"))
    console.print(f"  path latency (one way, over all connected pairs): {lat['min']:g} to "
                  f"{lat['max']:g} ms [dim]({lat['method']})[/dim]")
    e2c = summary["edge_to_nearest_core_ms"]
    if e2c:
        console.print(f"  edge to nearest core: {e2c['min']:g} / {e2c['median']:g} / "
                      f"{e2c['max']:g} ms (min / median / max)")
    m = summary["membership"]
    console.print(f"  membership: heartbeat every {m['heartbeat_interval_s']:g} s, "
                  f"down after {m['down_after_s']:g} s")
    if summary["tenants"]:
        console.print(f"  tenants: {', '.join(summary['tenants'])}")
    console.print(f"  unreachable: {', '.join(summary['unreachable']) or 'none'}")


# ---------------------------------------------------------------------- plan
def _parse_loads(values: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for value in values:
        node, sep, depth = value.partition("=")
        if not sep or not depth.isdigit():
            raise click.BadParameter(f"{value!r}: expected NODE=QUEUE_DEPTH", param_hint="--load")
        out[node] = int(depth)
    return out


def _live_view(address: str) -> Any:
    """The entry node's own mesh view, from its /v1/status."""
    import urllib.request

    from mesh.state import MeshView

    with urllib.request.urlopen(address + "/v1/status", timeout=5) as resp:
        status = json.loads(resp.read())
    view = MeshView()
    for node, info in status.get("view", {}).items():
        age = info.get("age_s")
        if age is None:
            view.set_down([node], 0.0)
            continue
        view.report(node, int(info.get("queue_depth", 0)), -float(age),
                    healthy=bool(info.get("healthy", True)))
    return view


@cli.command()
@click.option("--task", required=True)
@click.option("--from", "entry", required=True, help="Entry node the query arrives at.")
@click.option("--topology", "topology_file", type=click.Path(dir_okay=False), default=None,
              help="Topology file (default: the running mesh's).")
@click.option("--latency-ms", type=float, default=None)
@click.option("--min-accuracy", type=float, default=None)
@click.option("--max-cost-per-1k", type=float, default=None, help="USD per 1,000 inferences.")
@click.option("--policy", type=click.Choice(tuple(POLICIES)), default="cheapest", show_default=True)
@click.option("--rows", type=int, default=1, show_default=True, help="Batch rows in the query.")
@click.option("--payload-bytes", type=int, default=None,
              help="Request size (default: rows x the task's input size).")
@click.option("--tenant", default=None, help="Only the nodes this tenant may use.")
@click.option("--load", "loads", multiple=True, metavar="NODE=DEPTH",
              help="Pretend NODE reports this queue depth (repeatable).")
@click.option("--down", "downs", multiple=True, metavar="NODE",
              help="Pretend NODE is down (repeatable).")
@click.option("--live", is_flag=True, help="Use the entry node's current view of the running mesh.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def plan(ctx: click.Context, task: str, entry: str, topology_file: str | None,
         latency_ms: float | None, min_accuracy: float | None, max_cost_per_1k: float | None,
         policy: str, rows: int, payload_bytes: int | None, tenant: str | None,
         loads: tuple[str, ...], downs: tuple[str, ...], live: bool, as_json: bool) -> None:
    """Explain where a query would go, what each candidate is predicted to cost, and why."""
    from mesh.planner import Planner, why_not
    from mesh.state import MeshView
    from mesh.testbed.local import read_state
    from mesh.topology import load_topology

    home = home_of(ctx)
    state = read_state(home / "run")
    if topology_file is None:
        if state is None:
            raise click.UsageError("no mesh is running; pass --topology FILE")
        topology_file = state.topology
    topo = load_topology(topology_file)
    if entry not in topo.nodes:
        names = sorted(topo.nodes)
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        raise click.BadParameter(f"{entry!r} is not a node of {topo.name!r} ({shown})",
                                 param_hint="--from")
    registry = Registry.load(home)
    slo = SLO.from_wire(SLO(latency_ms, min_accuracy, max_cost_per_1k, False, policy).to_wire())
    planner = Planner(topo, registry)
    if payload_bytes is None:
        variant = registry.for_task(task)[0]
        payload_bytes = rows * sum(
            4 * max(1, abs(math.prod(d for d in s.shape[1:] if d > 0))) for s in variant.inputs)
    if live:
        if state is None or entry not in state.nodes:
            raise click.UsageError("--live needs a running mesh that includes the entry node")
        view = _live_view(state.address(entry))
    else:
        view = MeshView()
    for node, depth in _parse_loads(loads).items():
        view.report(node, depth, 0.0)
    view.set_down(downs, 0.0)
    decision = planner.plan(task, slo, entry, view, now=0.0, rows=rows,
                            payload_bytes=payload_bytes, explain=True, tenant=tenant)
    table_info = planner.table(entry, task, tenant)
    candidates = [dict(s.to_dict(), why_not=why_not(decision, s)) for s in decision.candidates]
    if as_json:
        click.echo(json.dumps({"decision": decision.to_dict(), "candidates": candidates,
                               "considered": len(table_info.rows),
                               "reachable_hosts": table_info.reachable_hosts,
                               "payload_bytes": payload_bytes}, indent=2))
        return
    table = Table(title=f"candidates for {task!r} from {entry} ({policy}, "
                        f"{payload_bytes} bytes in, {rows} row(s))")
    for col in ("node", "tier", "variant", "accuracy", "network", "queue", "compute", "load",
                "total ms", "$/1k", "J/1k", "verdict"):
        table.add_column(col, justify="right" if col in ("accuracy", "network", "queue", "compute",
                                                         "load", "total ms", "$/1k", "J/1k")
                         else "left")
    for s, info in zip(decision.candidates, candidates, strict=True):
        p = s.prediction
        chosen = (s.candidate.node, s.candidate.variant) == (decision.node, decision.variant)
        verdict = "[bold green]chosen[/bold green]" if chosen else (
            f"[yellow]{info['why_not']}[/yellow]" if s.feasible else f"[red]{info['why_not']}[/red]")
        table.add_row(s.candidate.node, s.candidate.tier, s.candidate.variant,
                      f"{s.candidate.accuracy:.4f}", f"{p.network_ms:.2f}", f"{p.queue_ms:.2f}",
                      f"{p.compute_ms:.3f}", f"{p.load_ms:.1f}", f"{p.total_ms:.2f}",
                      f"{s.cost_per_1k:.2e}", f"{s.energy_j_per_1k:.3g}", verdict)
    console.print(table)
    console.print(f"{len(table_info.rows)} (node, variant) candidates kept from "
                  f"{table_info.reachable_hosts} reachable host node(s): the nearest "
                  f"{planner.per_group} per variant, hardware class and tier, plus ties")
    mark = "" if decision.feasible else " [red](does not meet the SLO)[/red]"
    console.print(f"-> [bold]{decision.node}/{decision.variant}[/bold]{mark}: {decision.reason}")
    if decision.escalation is not None:
        e = decision.escalation
        console.print(f"   escalates rows below {e.threshold:g} confidence to {e.node}/{e.variant} "
                      f"(predicted {e.prediction.total_ms:.1f} ms more)")

