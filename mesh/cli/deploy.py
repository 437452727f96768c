"""``mesh deploy render``: a topology file -> Kubernetes manifests or systemd units."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from mesh.cli.app import cli, console

if TYPE_CHECKING:  # the renderers are imported when a command runs, not by every `mesh` call
    from mesh.deploy import Rendering


@cli.group()
def deploy() -> None:
    """Deployment files rendered from a topology file."""


@deploy.command("render")
@click.argument("topology_file", metavar="TOPOLOGY", type=click.Path(dir_okay=False))
@click.option("--target", required=True, type=click.Choice(["kubernetes", "systemd"]),
              help="kubernetes: manifests for the whole mesh; systemd: units for bare machines.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write (created; files rendered there before are replaced).")
@click.option("--node", "nodes", multiple=True,
              help="systemd: a node to render (repeatable; default: every edge node).")
@click.option("--image", default="tiermesh:0.1.0", show_default=True,
              help="kubernetes: the node image (deploy/Containerfile).")
@click.option("--cuda-image", default=None,
              help="kubernetes: the image for accelerator classes (deploy/Containerfile.cuda); "
                   "default: --image with -cuda after its tag.")
@click.option("--home-size", default="10Gi", show_default=True,
              help="kubernetes: the home volume of core and intermediate nodes.")
@click.option("--storage-class", default=None,
              help="kubernetes: StorageClass of the home volumes (default: the cluster's).")
@click.option("--mesh-bin", default="/opt/tiermesh/bin/mesh", show_default=True,
              help="systemd: the mesh command on the machine.")
def deploy_render(topology_file: str, target: str, out_dir: str, nodes: tuple[str, ...],
                  image: str, cuda_image: str | None, home_size: str, storage_class: str | None,
                  mesh_bin: str) -> None:
    """Render TOPOLOGY for --target into --out. Nothing is written when it cannot be rendered.

    \b
    mesh deploy render topologies/campus.yaml --target kubernetes --out deploy/kubernetes
    mesh deploy render topologies/campus.yaml --target systemd --node gym-gate --out deploy/systemd
    """
    from mesh.deploy import KubernetesOptions, SystemdOptions, render_kubernetes, render_systemd
    from mesh.topology import load_topology

    topology = load_topology(topology_file)
    source = Path(topology_file).name
    try:
        if target == "kubernetes":
            if nodes:
                raise click.UsageError("--node applies to --target systemd; kubernetes renders "
                                       "the whole mesh")
            rendering = render_kubernetes(topology, KubernetesOptions(
                source=source, image=image, cuda_image=cuda_image, home_size=home_size,
                storage_class=storage_class))
        else:
            rendering = render_systemd(topology, nodes or None,
                                       SystemdOptions(source=source, mesh_bin=mesh_bin))
    except ValueError as exc:  # an option's value (the message names it)
        raise click.BadParameter(str(exc)) from None
    removed = _write(rendering, Path(out_dir))
    for warning in rendering.warnings:
        click.echo(f"Warning: {warning}", err=True)
    console.print(f"[green]ok[/green] {len(rendering.files)} file(s) for {target} in {out_dir}"
                  + (f"; removed {len(removed)} stale: {', '.join(removed)}" if removed else ""))


def _rendered_before(path: Path) -> bool:
    """Whether ``path`` is a file this command wrote (its marker in the first two lines)."""
    from mesh.deploy.rendering import MARKER

    try:
        with path.open(errors="replace") as f:
            return any(f.readline().startswith(MARKER) for _ in range(2))
    except OSError:
        return False


def _write(rendering: Rendering, out: Path) -> list[str]:
    """Write every file; remove files rendered before that this rendering no longer has.

    Files a user put in ``out`` are never touched. Returns the removed names.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        stale = sorted(p.name for p in out.iterdir()
                       if p.is_file() and p.name not in rendering.files and _rendered_before(p))
        for name, text in rendering.files.items():
            path = out / name
            path.write_text(text)
            os.chmod(path, 0o755 if name in rendering.executable else 0o644)
        for name in stale:
            (out / name).unlink()
    except OSError as exc:
        raise click.ClickException(f"cannot write {exc.filename or out}: {exc.strerror}") from None
    return stale
