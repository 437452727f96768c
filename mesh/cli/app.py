"""The ``mesh`` command group and what its commands share."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from mesh.errors import MeshError
from mesh.status import fmt_ms  # re-exported for the command modules

__all__ = ["cli", "console", "home_of", "fmt_ms"]

console = Console(width=None if sys.stdout.isatty() else 180)


class _Group(click.Group):
    """Turns every MeshError into a one-line CLI error."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MeshError as exc:
            raise click.ClickException(exc.message) from None


def home_of(ctx: click.Context) -> Path:
    return Path(ctx.obj["home"])


@click.group(cls=_Group)
@click.option("--home", default=".tiermesh", envvar="TIERMESH_HOME", show_default=True,
              type=click.Path(file_okay=False), help="Registry, artifact store and run state.")
@click.pass_context
def cli(ctx: click.Context, home: str) -> None:
    """Tiermesh: a managed, model-less edge-to-cloud inference mesh."""
    ctx.ensure_object(dict)
    ctx.obj["home"] = home



