"""``mesh build`` and ``mesh variants``: the variant factory and the registry."""

from __future__ import annotations

import json

import click
from rich.table import Table

from mesh.cli.app import cli, console, fmt_ms, home_of
from mesh.registry import Registry, Rejection, Variant

__all__ = ["variants_table", "rejected_table"]


# ---------------------------------------------------------------------- build
@cli.command()
@click.option("--force", is_flag=True, help="Rebuild even when the cache is valid.")
@click.option("--family", "families", multiple=True,
              help="Build only this bundled family (repeatable; default: all).")
@click.pass_context
def build(ctx: click.Context, force: bool, families: tuple[str, ...]) -> None:
    """Train or convert, check, measure and register the bundled model families."""
    from mesh.variants import build_bundled
    from mesh.variants.build import FAMILIES

    try:
        variants = build_bundled(home_of(ctx), force=force, families=families or FAMILIES)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    except ModuleNotFoundError as exc:  # torch / onnx / sklearn / transformers load only to build
        raise click.ClickException(
            f"building variants needs the 'build' extra ({exc.name} is missing): "
            "pip install -e '.[build]'") from None
    variants_table(variants, title=f"Registered in {home_of(ctx)}")


# ---------------------------------------------------------------------- variants
@cli.group()
def variants() -> None:
    """The registered model variants."""


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 2**20:.1f} MB" if size_bytes >= 2**20 else f"{size_bytes / 1024:.1f} KB"


_METRIC = {"top1": "top-1", "top1_agreement": "agree", "cosine": "cos"}


def variants_table(found: list[Variant], title: str) -> None:
    """Print variant, format, precision, size, accuracy, latency b1/b32 per class, cold start, memory."""
    keys = sorted({k for v in found for k in v.profiles})
    tasks = {v.task for v in found}
    table = Table(title=title)
    table.add_column("variant", no_wrap=True)
    if len(tasks) > 1:
        table.add_column("task", no_wrap=True)
    for col in ("format", "precision"):
        table.add_column(col)
    for col in ("size", "accuracy"):
        table.add_column(col, justify="right", no_wrap=True)
    for key in keys:
        table.add_column(f"{key}\nb1 ms", justify="right")
        table.add_column(f"{key}\nb32 ms", justify="right")
    table.add_column("cold\nstart ms", justify="right")
    table.add_column("peak\nmem MB", justify="right")
    for v in found:
        cells = [v.name + (f"\n[dim]head on {v.base}"
                           + (f", {v.tenant}'s" if v.tenant else "") + "[/dim]" if v.base
                           else (f"\n[dim]{v.tenant}'s[/dim]" if v.tenant else ""))]
        cells += [v.task] if len(tasks) > 1 else []
        cells += [v.format + ("" if v.device == "cpu" else f" ({v.device})"),
                  v.precision + (f" {v.quantization}" if v.quantization else ""),
                  _size(v.size_bytes),
                  f"{v.accuracy:.4f} {_METRIC.get(v.accuracy_metric, v.accuracy_metric)}"]
        for key in keys:
            p = v.profiles.get(key)
            cells += [fmt_ms(p.latency_ms(1)) if p else "-", fmt_ms(p.latency_ms(32)) if p else "-"]
        colds = [p.cold_start_ms for p in v.profiles.values()]
        peaks = [p.peak_memory_bytes for p in v.profiles.values() if p.peak_memory_bytes]
        cells.append(fmt_ms(max(colds)) if colds else "-")
        cells.append(f"{max(peaks) / 2**20:.1f}" if peaks else "-")
        table.add_row(*cells)
    console.print(table)


def rejected_table(rejected: list[Rejection], title: str) -> None:
    """Print the variants the factory refused, with the stage and the reason."""
    table = Table(title=title)
    for col in ("variant", "format", "precision", "stage"):
        table.add_column(col, no_wrap=True)
    table.add_column("reason")
    for r in rejected:
        table.add_row(r.name, r.format, r.precision, r.stage, r.reason)
    console.print(table)


@variants.command("list")
@click.option("--task", default=None, help="Only this task.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--mesh", "mesh_url", default=None,
              help="Instead: what each node of the running mesh at this URL has loaded.")
@click.pass_context
def variants_list(ctx: click.Context, task: str | None, as_json: bool,
                  mesh_url: str | None) -> None:
    """List variants with format, size, accuracy, latency per hardware class, cold start, memory.

    Variants the factory rejected are listed after them, with the reason.
    """
    if mesh_url is not None:
        from mesh.remote import mesh_variants

        seen = mesh_variants(mesh_url)
        if as_json:
            click.echo(json.dumps(seen, indent=2))
            return
        table = Table(title=f"loaded variants seen from {seen['node']} (registry version "
                            f"{seen['registry_version']})")
        table.add_column("node")
        table.add_column("loaded variants")
        for node, names in seen["loaded"].items():
            table.add_row(node, ", ".join(names) or "-")
        console.print(table)
        return
    registry = Registry.load(home_of(ctx))
    found = registry.for_task(task) if task else sorted(registry.variants.values(),
                                                        key=lambda v: v.name)
    rejected = sorted((r for r in registry.rejected.values() if task in (None, r.task)),
                      key=lambda r: r.name)
    if as_json:
        click.echo(json.dumps({"variants": [v.to_json() for v in found],
                               "rejected": [r.to_json() for r in rejected]}, indent=2))
        return
    if not found:
        console.print(f"no variants registered in {home_of(ctx)}; run 'mesh build'")
    else:
        variants_table(found, title=f"variants in {home_of(ctx)}")
    if rejected:
        rejected_table(rejected, title="rejected variants (never routed to)")
