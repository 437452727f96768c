"""The ``mesh`` command group and what its commands share."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from mesh.errors import MeshError
from mesh.status import fmt_ms  # re-exported for the command modules

__all__ = ["cli", "console", "home_of", "fmt_ms", "mesh_key_option", "tls_dir_option",
           "operator_credentials"]

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





# Options of the commands that act on a running mesh (signed as an operator).
mesh_key_option = click.option(
    "--mesh-key", default=None, type=click.Path(dir_okay=False),
    help="The mesh key to sign with (default: <home>/mesh.key, the core's).")
tls_dir_option = click.option(
    "--tls-dir", default=None, type=click.Path(file_okay=False),
    help="For a mesh on TLS: a node's ca.pem, node.pem, node-key.pem (the core's).")


def operator_credentials(ctx: click.Context, mesh_key: str | None, tls_dir: str | None
                         ) -> tuple[Any, Any]:
    """(mesh key, TLS context) to act on a running mesh with: a node certificate on a TLS
    mesh, else the mesh key (``--mesh-key`` or the home's)."""
    from mesh.remote import key_from, tls_from

    tls = tls_from(tls_dir) if tls_dir else None
    return (key_from(home_of(ctx), mesh_key) if tls is None else None), tls
