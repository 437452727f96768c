"""``mesh models add``: register one model; the factory makes, checks and measures its variants."""

from __future__ import annotations

import click
from rich.table import Table

from mesh.cli.app import (
    cli,
    console,
    home_of,
    mesh_key_option,
    operator_credentials,
    tls_dir_option,
)
from mesh.cli.variants import rejected_table, variants_table

__all__ = ["models"]


@cli.group()
def models() -> None:
    """Submitted models and the variant families made from them."""


@models.command("add")
@click.argument("name")
@click.option("--task", required=True, help="Task the family serves, e.g. 'digits'.")
@click.option("--model", "model", default=None,
              help="ONNX file, torch.export .pt2, TorchScript file, or package.module:factory.")
@click.option("--base", default=None,
              help="A private head instead of a whole model: the public family (or one "
                   "variant) whose output features the head takes, e.g. 'minilm'.")
@click.option("--head", "head", type=click.Path(dir_okay=False, exists=True), default=None,
              help="With --base: the head, an ONNX model from the base's features "
                   "[batch, D] to float32 [batch, K].")
@click.option("--tenant", default="",
              help="The tenant that owns this model: its task is private to that tenant.")
@click.option("--weights", type=click.Path(dir_okay=False, exists=True), default=None,
              help="State dict for a module:factory model (torch.save(model.state_dict())).")
@click.option("--validation", required=True, type=click.Path(dir_okay=False, exists=True),
              help=".npz with 'x' (or x0, x1, ...) and optional labels 'y'.")
@click.option("--train", type=click.Path(dir_okay=False, exists=True), default=None,
              help=".npz training set: also distil a smaller student.")
@click.option("--kind", type=click.Choice(["classes", "embedding"]), default="classes",
              show_default=True, help="How outputs are compared: argmax or cosine.")
@click.option("--formats", default=None,
              help="Comma-separated variants to attempt (default: all the model allows).")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--replace", is_flag=True, help="Replace an existing family of the same NAME.")
@click.option("--mesh", "mesh_url", default=None,
              help="Also register the accepted variants at this running node (the core's "
                   "http://HOST:PORT): every node copies them down the tree and loads what "
                   "it hosts, without a restart.")
@mesh_key_option
@tls_dir_option
@click.pass_context
def models_add(ctx: click.Context, name: str, task: str, model: str | None, base: str | None,
               head: str | None, tenant: str, weights: str | None,
               validation: str, train: str | None, kind: str, formats: str | None,
               max_batch: int, replace: bool, mesh_url: str | None, mesh_key: str | None,
               tls_dir: str | None) -> None:
    """Register model NAME: generate, check, measure and store its variants.

    With --base and --head, NAME is a private head on a shared base: one variant per
    variant of the base, each measured end to end; nodes load the base once for every
    tenant's head on it (a tenant with share_base: false gets its own).
    """
    if (base is None) != (head is None):
        raise click.UsageError("--base and --head go together (a head on a shared base)")
    if (model is None) == (head is None):
        raise click.UsageError("give --model (a whole model) or --base with --head "
                               "(a private head on a shared base)")
    if head is not None and (weights or train or formats):
        raise click.UsageError("--weights, --train and --formats are for whole models; a "
                               "head gets one variant per variant of its base")

    # what --mesh needs is checked before anything is built
    key, tls = operator_credentials(ctx, mesh_key, tls_dir) if mesh_url else (None, None)
    from mesh.variants.factory import register_model
    from mesh.variants.heads import register_head

    wanted = [f.strip() for f in formats.split(",") if f.strip()] if formats else None
    try:
        if head is not None and base is not None:
            report = register_head(home_of(ctx), name, task=task, base=base, head=head,
                                   validation=validation, tenant=tenant, kind=kind,
                                   replace=replace)
        else:
            report = register_model(home_of(ctx), name, task=task, model=model,
                                    weights=weights, validation=validation, train=train,
                                    kind=kind, formats=wanted, max_batch=max_batch,
                                    replace=replace, tenant=tenant)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    except ModuleNotFoundError as exc:
        raise click.ClickException(
            f"this model needs {exc.name}, which is not installed: "
            "pip install -e '.[build,convert]'") from None
    if report.accepted:
        variants_table(report.accepted, title=f"{name}: {len(report.accepted)} variant(s) "
                                              f"accepted for task {task!r}")
    else:
        console.print(f"[red]{name}: no variant was accepted[/red]")
    if report.rejected:
        rejected_table(report.rejected, title="rejected (never routed to)")
    if report.skipped:
        table = Table(title="not attempted")
        table.add_column("variant")
        table.add_column("why")
        for suffix, why in sorted(report.skipped.items()):
            table.add_row(f"{name}-{suffix}", why)
        console.print(table)
    if not report.accepted:
        raise click.exceptions.Exit(1)
    if mesh_url is not None:
        from mesh.registry import Registry
        from mesh.remote import push_variants
        from mesh.store import ArtifactStore

        registry = Registry.load(home_of(ctx))
        sent = push_variants(mesh_url, [registry.variants[v.name] for v in report.accepted],
                             ArtifactStore(home_of(ctx) / "store"), key, ssl=tls)
        console.print(f"registered at {mesh_url}: {', '.join(sent.get('registered', []))} "
                      f"(registry version {sent.get('version')}); the nodes load what they "
                      "host within a few heartbeats")


@models.command("remove")
@click.argument("name")
@click.option("--mesh", "mesh_url", default=None,
              help="Remove it from this running mesh (the core's http://HOST:PORT) instead: "
                   "every node drops its variants with the next registry it copies.")
@mesh_key_option
@tls_dir_option
@click.pass_context
def models_remove(ctx: click.Context, name: str, mesh_url: str | None, mesh_key: str | None,
                  tls_dir: str | None) -> None:
    """Remove model NAME (every variant of its family), here or from a running mesh.

    A model that tenants' private heads sit on is refused until they are removed.
    """
    from mesh.errors import MeshError
    from mesh.registry import Registry
    from mesh.remote import remove_model

    if mesh_url is not None:
        try:
            key, tls = operator_credentials(ctx, mesh_key, tls_dir)
            done = remove_model(mesh_url, name, key, ssl=tls)
        except MeshError as exc:
            raise click.ClickException(exc.message) from None
        console.print(f"removed from {mesh_url}: {', '.join(done.get('removed', []))} "
                      f"(registry version {done.get('version')}); the nodes unload them within "
                      "a few heartbeats")
        return
    registry = Registry.load(home_of(ctx))
    try:
        gone = registry.remove_model(name)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    registry.save(home_of(ctx))
    console.print(f"removed {name}: {', '.join(gone)}")
