"""``mesh certs init`` and ``mesh certs issue``: the mesh CA and node certificates."""

from __future__ import annotations

from pathlib import Path

import click

from mesh.cli.app import cli, console

__all__: list[str] = []  # commands register themselves on the cli group


@cli.group()
def certs() -> None:
    """Certificates for mutual TLS between nodes: one CA per mesh, one certificate per node."""


@certs.command("init")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False),
              help="Where to write ca.pem and ca-key.pem (keep ca-key.pem off the nodes).")
@click.option("--name", default="Tiermesh mesh CA", show_default=True,
              help="The CA's common name.")
@click.option("--days", default=3650, show_default=True, type=click.IntRange(min=1),
              help="How long the CA is valid.")
def init(directory: str, name: str, days: int) -> None:
    """Create a mesh CA in DIR (refuses to replace one that is there)."""
    from mesh.certs import CertificateError, init_ca

    try:
        cert, key = init_ca(directory, name=name, days=days)
    except (CertificateError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    console.print(f"mesh CA written: {cert} and {key} (private: keep it off the nodes)")


@certs.command("issue")
@click.argument("node")
@click.option("--topology", "topology_file", required=True, type=click.Path(dir_okay=False),
              help="The mesh's topology file: NODE must be one of its nodes.")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False),
              help="The CA's directory ('mesh certs init'); writes DIR/NODE/.")
@click.option("--days", default=825, show_default=True, type=click.IntRange(min=1),
              help="How long the certificate is valid (at most as long as the CA).")
def issue(node: str, topology_file: str, directory: str, days: int) -> None:
    """Issue NODE's certificate: DIR/NODE/ca.pem, node.pem and node-key.pem.

    Copy DIR/NODE to the node's machine and start it with --tls-dir pointing there.
    """
    from mesh.certs import CertificateError
    from mesh.certs import issue as issue_cert
    from mesh.topology import load_topology

    topology = load_topology(topology_file)  # a broken file: a MeshError, one message
    try:
        files = issue_cert(node, topology, Path(directory), days=days)
    except (CertificateError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    console.print(f"certificate for {node} written to {files.cert.parent} "
                  f"({files.ca.name}, {files.cert.name}, {files.key.name})")
