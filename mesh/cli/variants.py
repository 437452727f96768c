"""``mesh build`` and ``mesh variants``: the variant factory and the registry."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table

from mesh.cli.app import cli, console, fmt_ms, home_of
from mesh.registry import Registry

__all__ = ["variants_table"]


# ---------------------------------------------------------------------- build
@cli.command()
@click.option("--force", is_flag=True, help="Rebuild even when the cache is valid.")
@click.pass_context
def build(ctx: click.Context, force: bool) -> None:
    """Train, export, measure and register the bundled model variants."""
    from mesh.variants import build_bundled

    try:
        variants = build_bundled(home_of(ctx), force=force)
    except ModuleNotFoundError as exc:  # torch / onnx / sklearn are imported only to train
        raise click.ClickException(
            f"building variants needs the 'build' extra ({exc.name} is missing): "
            "pip install -e '.[build]'") from None
    variants_table(variants, title=f"Registered in {home_of(ctx)}")


# ---------------------------------------------------------------------- variants
@cli.group()
def variants() -> None:
    """The registered model variants."""


def variants_table(found: list[Any], title: str) -> None:
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
            cells += [fmt_ms(p.latency_ms(1)) if p else "-", fmt_ms(p.latency_ms(32)) if p else "-"]
        colds = [p.cold_start_ms for p in v.profiles.values()]
        cells.append(fmt_ms(max(colds)) if colds else "-")
        table.add_row(*cells)
    console.print(table)


@variants.command("list")
@click.option("--task", default=None, help="Only this task.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def variants_list(ctx: click.Context, task: str | None, as_json: bool) -> None:
    """List variants with format, size, accuracy and measured latency."""
    registry = Registry.load(home_of(ctx))
    found = registry.for_task(task) if task else sorted(registry.variants.values(),
                                                        key=lambda v: v.name)
    if as_json:
        click.echo(json.dumps({"variants": [v.to_json() for v in found]}, indent=2))
    elif not found:
        console.print(f"no variants registered in {home_of(ctx)}; run 'mesh build'")
    else:
        variants_table(found, title=f"variants in {home_of(ctx)}")
