"""``mesh link list|cut|heal|set``: the links of the running local mesh, changed live."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table

from mesh.cli.app import cli, console, home_of

__all__: list[str] = []  # commands register themselves on the cli group


@cli.group()
def link() -> None:
    """Cut, heal, slow down or make lossy one link of the running local mesh.

    Links are named after the topology's 'between: [a, b]' as a--b (b--a works too);
    'mesh link list' shows them. A cut link carries nothing and refuses nothing: nodes
    notice through their own timeouts and heartbeats, as on a real network.
    """


def _describe(link: dict[str, Any]) -> str:
    extra = "".join([f", loss {link['loss']:g}" if link["loss"] else "",
                     f", jitter {link['jitter_ms']:g} ms" if link["jitter_ms"] else ""])
    return (f"{link['name']}: {link['state']}, {link['latency_ms']:g} ms, "
            f"{link['bandwidth_mbps']:g} Mbps{extra}")


@link.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """Every link: its state (up or cut), latency, bandwidth, loss, jitter and traffic."""
    from mesh.testbed import faults

    links = faults.list_links(home_of(ctx) / "run")
    if as_json:
        click.echo(json.dumps({"links": links}, indent=2))
        return
    table = Table(title="mesh links")
    for col in ("link", "state", "latency ms", "bandwidth Mbps", "loss", "jitter ms",
                "connections", "bytes", "lost chunks"):
        table.add_column(col, justify="left" if col in ("link", "state") else "right")
    for item in links:
        state = "[red]cut[/red]" if item["state"] == "cut" else "up"
        table.add_row(item["name"], state, f"{item['latency_ms']:g}",
                      f"{item['bandwidth_mbps']:g}", f"{item['loss']:g}",
                      f"{item['jitter_ms']:g}", str(item["connections"]), str(item["bytes"]),
                      str(item["lost_chunks"]))
    console.print(table)


@link.command("cut")
@click.argument("name")
@click.pass_context
def cut(ctx: click.Context, name: str) -> None:
    """Cut link NAME: open connections stall, new ones hang; nothing is refused."""
    from mesh.testbed import faults

    click.echo(_describe(faults.cut_link(home_of(ctx) / "run", name)))


@link.command("heal")
@click.argument("name")
@click.pass_context
def heal(ctx: click.Context, name: str) -> None:
    """Heal link NAME: what waited is delivered, held connections go through."""
    from mesh.testbed import faults

    click.echo(_describe(faults.heal_link(home_of(ctx) / "run", name)))


@link.command("set")
@click.argument("name")
@click.option("--latency-ms", type=click.FloatRange(0, 60_000), help="One-way latency.")
@click.option("--bandwidth-mbps", type=click.FloatRange(0, min_open=True), help="Bandwidth.")
@click.option("--loss", type=click.FloatRange(0, 1),
              help="Probability that a chunk is lost (it then arrives one TCP retransmission "
                   "timeout late: max(200 ms, 2 round trips)).")
@click.option("--jitter-ms", type=click.FloatRange(0, 60_000),
              help="Extra delay per chunk, uniform in [0, JITTER]; bytes stay in order.")
@click.pass_context
def set_(ctx: click.Context, name: str, latency_ms: float | None, bandwidth_mbps: float | None,
         loss: float | None, jitter_ms: float | None) -> None:
    """Change link NAME while it runs; what is not given is kept."""
    from mesh.testbed import faults

    if latency_ms is None and bandwidth_mbps is None and loss is None and jitter_ms is None:
        raise click.UsageError("give at least one of --latency-ms, --bandwidth-mbps, --loss, "
                               "--jitter-ms")
    click.echo(_describe(faults.set_link(home_of(ctx) / "run", name, latency_ms=latency_ms,
                                         bandwidth_mbps=bandwidth_mbps, loss=loss,
                                         jitter_ms=jitter_ms)))
