"""``mesh tenants``: API keys for tenants: made here (``new-key``), or added to and revoked on
a running mesh (``key add``, ``key revoke``)."""

from __future__ import annotations

import click

from mesh.cli.app import cli, console, mesh_key_option, operator_credentials, tls_dir_option

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


@tenants.group("key")
def key_group() -> None:
    """API keys on a running mesh: added or revoked at the core, in force everywhere within
    a heartbeat or two per tier, without a restart."""


_MESH = click.option("--mesh", "mesh_url", required=True,
                     help="The running core's http://HOST:PORT (or https:// with --tls-dir).")


def _send(ctx: click.Context, mesh_url: str, mesh_key: str | None, tls_dir: str | None,
          body: dict[str, str]) -> dict[str, object]:
    from mesh.errors import MeshError
    from mesh.remote import manage_key

    try:
        key, tls = operator_credentials(ctx, mesh_key, tls_dir)
        return manage_key(mesh_url, body, key, ssl=tls)
    except MeshError as exc:
        raise click.ClickException(exc.message) from None


@key_group.command("add")
@click.argument("tenant")
@_MESH
@mesh_key_option
@tls_dir_option
@click.pass_context
def key_add(ctx: click.Context, tenant: str, mesh_url: str, mesh_key: str | None,
            tls_dir: str | None) -> None:
    """A new API key for TENANT, in force on the running mesh (printed once)."""
    from mesh.tenants import new_key

    key, stored = new_key()
    answer = _send(ctx, mesh_url, mesh_key, tls_dir, {"tenant": tenant, "key_hash": stored})
    console.print(f"API key for {tenant} (registry version {answer.get('version')}; give it "
                  "to the application, it is not stored):")
    click.echo(key)
    console.print(f"its hash, to revoke it: {stored}")


@key_group.command("revoke")
@click.argument("key_hash")
@_MESH
@mesh_key_option
@tls_dir_option
@click.pass_context
def key_revoke(ctx: click.Context, key_hash: str, mesh_url: str, mesh_key: str | None,
               tls_dir: str | None) -> None:
    """Revoke the API key whose hash is KEY_HASH (``sha256:...``), everywhere."""
    answer = _send(ctx, mesh_url, mesh_key, tls_dir, {"revoke": key_hash})
    console.print(f"revoked (registry version {answer.get('version')})")
