"""``mesh tenants new-key``: an API key for a tenant (or an operator), and the line to store."""

from __future__ import annotations

import click

from mesh.cli.app import cli, console

__all__: list[str] = []  # commands register themselves on the cli group


@cli.group()
def tenants() -> None:
    """Tenants: API keys (stored hashed in the topology), quotas, private tasks."""


@tenants.command("new-key")
@click.argument("tenant")
def new_key_command(tenant: str) -> None:
    """A new API key for TENANT (a tenant's name, or "operators").

    Prints the key once, for the tenant's application (`Client(url, api_key=...)`), and the
    hash to add to the tenant's `keys:` in the topology file; the mesh stores and compares
    only the hash.
    """
    from mesh.tenants import new_key

    key, stored = new_key()
    console.print(f"API key for {tenant} (give it to the application; it is not stored):")
    click.echo(key)
    where = "operators: {keys: [...]}" if tenant == "operators" else \
        f"the keys: of tenant {tenant}"
    console.print(f"add to {where} in the topology file:")
    click.echo(f'"{stored}"')
