"""Private heads on shared bases: a tenant's small model on top of a public base family.

A tenant registers a *head* (an ONNX model from the base's output features
to its own outputs, e.g. a topic classifier on MiniLM embeddings) on a base
family (``mesh models add NAME --base minilm --head head.onnx --tenant T``).
:func:`register_head` makes one variant per accepted base variant, named
``NAME-<the base variant's suffix>`` (``topics-onnx-int8-dynamic`` on
``minilm-onnx-int8-dynamic``), each checked and measured *end to end*, the
base and the head together, as one family:

1. the head must take the base's output (float32 ``[batch, D]``, the same
   ``D``) and return one float32 ``[batch, K]`` output;
2. every base variant is run on the validation inputs (what clients send the
   base: token ids and masks for MiniLM) through its node runtime, and the
   head on its features; the composition on the family's original (the base
   variant without a parent) is the reference the others must agree with,
   under the limits of the base variant's tier (int8 bases: int8 limits);
3. accuracy is measured on the validation labels, end to end;
4. the head alone is profiled on every hardware class (latency, and the
   memory it adds to a loaded base); the variant's ``profiles`` are the
   base's plus the head's, which is what a query pays and what the planner
   predicts with.

The variants' task is private to the tenant (``Variant.tenant``): to every
other caller it does not exist. Nodes load each base once for every head
that shares it, run the base once per batch across tenants, then each head
on its own rows (:mod:`nodes.heads`); a tenant whose topology entry says
``share_base: false`` gets a base instance of its own.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mesh.registry import Profile, Registry, Rejection, TensorSpec, Variant, compose_profile
from mesh.store import ArtifactStore
from mesh.variants.dataset import Dataset, load_dataset
from mesh.variants.evaluate import Thresholds, accuracy, agreement, check
from mesh.variants.profile import batch_sizes_up_to, profile_variant
from mesh.variants.recipes import run_artifact, short_error

__all__ = ["HEAD_FORMAT", "head_interface", "register_head", "base_variants"]

HEAD_FORMAT = "onnx"
"""Heads are ONNX: small, thread-safe sessions that every worker of a base can share."""

STORE_DIR = "store"
DEFAULT_THRESHOLDS = Thresholds()


def head_interface(onnx_bytes: bytes) -> tuple[int, TensorSpec]:
    """``(features it takes, its output spec)``; ``ValueError`` naming what is wrong."""
    import onnx

    try:
        graph = onnx.load_model_from_string(onnx_bytes).graph
    except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's bad file
        raise ValueError(f"head: not an ONNX model ({short_error(exc)})") from None
    initialisers = {i.name for i in graph.initializer}
    ins = [i for i in graph.input if i.name not in initialisers]
    if len(ins) != 1 or len(graph.output) != 1:
        raise ValueError(f"head: must take one input (the base's features) and return one "
                         f"output; it takes {len(ins)} and returns {len(graph.output)}")
    (inp,), (out,) = ins, graph.output

    def dims(value: object) -> list[int]:
        shape = value.type.tensor_type.shape  # type: ignore[attr-defined]
        return [d.dim_value if d.HasField("dim_value") else -1 for d in shape.dim]

    float32 = onnx.TensorProto.FLOAT
    if inp.type.tensor_type.elem_type != float32 or len(dims(inp)) != 2 or dims(inp)[1] < 1:
        raise ValueError(f"head: input {inp.name!r} must be float32 [batch, features], got "
                         f"{onnx.TensorProto.DataType.Name(inp.type.tensor_type.elem_type)} "
                         f"{dims(inp)}")
    if out.type.tensor_type.elem_type != float32 or len(dims(out)) != 2 or dims(out)[1] < 1:
        raise ValueError(f"head: output {out.name!r} must be float32 [batch, outputs], got "
                         f"{onnx.TensorProto.DataType.Name(out.type.tensor_type.elem_type)} "
                         f"{dims(out)}")
    return dims(inp)[1], TensorSpec(out.name, "float32", (-1, dims(out)[1]))


def base_variants(registry: Registry, base: str) -> list[Variant]:
    """The variants a head on ``base`` (a family, or one variant's name) sits on."""
    found = [v for v in registry.variants.values()
             if (v.family == base or v.name == base) and not v.base and not v.tenant]
    if not found:
        families = sorted({v.family for v in registry.variants.values()
                           if not v.base and not v.tenant})
        raise ValueError(f"base {base!r}: no public family or variant of that name is "
                         f"registered (families: {', '.join(families) or 'none'})")
    return sorted(found, key=lambda v: v.name)


def _tier(base: Variant) -> str:
    if base.arch == "student":
        return "student"
    return "int8" if "int8" in base.precision else "fp32"


def register_head(
    home: str | Path,
    name: str,
    *,
    task: str,
    base: str,
    head: str | Path | bytes,
    validation: str | Path | Dataset,
    tenant: str = "",
    kind: str = "classes",
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    profile_keys_threads: Mapping[str, int] | None = None,
    profile_options: Mapping[str, object] | None = None,
    replace: bool = False,
    progress: bool = True,
):  # -> FamilyReport (imported lazily: the factory imports torch helpers)
    """Register head ``name`` for ``task`` on every variant of ``base`` (module docstring).

    ``validation``: the base's inputs (``x0``, ``x1``, ...) with labels ``y``.
    Raises ``ValueError`` for a bad name, an unknown base, a head that does
    not fit it, a validation set that is not the base's inputs, or a family
    already registered (without ``replace``).
    """
    from mesh.variants.build import DEFAULT_PROFILE_THREADS, check_profile_keys
    from mesh.variants.factory import FamilyReport, check_name, save_family

    check_name("name", name)
    if tenant != tenant.strip() or (tenant and not tenant.isprintable()):
        raise ValueError(f"tenant {tenant!r}: a tenant's name as the topology declares it")
    if not task.strip():
        raise ValueError("task: must not be empty")
    threads_by_key = check_profile_keys(profile_keys_threads or DEFAULT_PROFILE_THREADS)
    home = Path(home)
    registry = Registry.load(home)
    if any(v.family == name for v in registry.variants.values()) and not replace:
        raise ValueError(f"model family {name!r} is already registered in {home}; "
                         "pass replace=True (--replace) to register it again")
    taken = {v.task: v for v in registry.variants.values() if v.family != name}
    if task in taken and taken[task].tenant != tenant:
        raise ValueError(f"task {task!r} is already served by {taken[task].family!r}; "
                         "a private head needs a task of its own")
    bases = base_variants(registry, base)
    data = head if isinstance(head, bytes) else Path(head).read_bytes()
    features, out_spec = head_interface(data)
    feature_specs = {v.outputs[0].shape[1:] for v in bases}
    if feature_specs != {(features,)}:
        raise ValueError(f"head: takes {features} features; base {base!r} gives "
                         f"{', '.join(str(list(s)) for s in sorted(feature_specs))}")
    val = validation if isinstance(validation, Dataset) else load_dataset(validation)
    if val.labels is None and kind == "classes":
        raise ValueError("validation: a head's accuracy is measured end to end; give labels 'y'")
    _check_inputs(bases[0], val)

    store = ArtifactStore(home / STORE_DIR)
    sha = store.put_bytes(data)
    original = next((v for v in bases if not v.parent), bases[0])
    suffix_of = {v.name: v.name[len(v.family) + 1:] if v.name.startswith(v.family + "-")
                 else v.name for v in bases}
    accepted: list[tuple[Variant, Variant]] = []
    rejected: list[Rejection] = []
    with tempfile.TemporaryDirectory(prefix="tiermesh-head-") as tmp:
        head_path = Path(tmp) / "head.onnx"
        head_path.write_bytes(data)
        outputs: dict[str, np.ndarray | str] = {}
        for b in tqdm([original, *(v for v in bases if v is not original)],
                      desc=f"heads {name}", unit="base", file=sys.stderr, disable=not progress):
            try:
                feats = run_artifact(store.path(b.sha256), b.format, val, b.max_batch)[0]
                outputs[b.name] = run_artifact(head_path, HEAD_FORMAT, Dataset((feats,), None),
                                               b.max_batch)[0]
            except Exception as exc:  # noqa: BLE001 - one base that cannot run here
                outputs[b.name] = short_error(exc)
        reference = outputs[original.name]
        if isinstance(reference, str):
            raise ValueError(f"the base's original {original.name} cannot run the validation "
                             f"set here: {reference}")
        for b in bases:
            variant_name = f"{name}-{suffix_of[b.name]}"
            got = outputs[b.name]
            if isinstance(got, str):
                rejected.append(Rejection(variant_name, task, name, b.format, b.precision,
                                          "run", got))
                continue
            metrics = agreement(reference, got, kind)
            failure = check(metrics, thresholds.limits(_tier(b), kind))
            if failure is not None:
                rejected.append(Rejection(variant_name, task, name, b.format, b.precision,
                                          "agreement", f"disagrees with the head on "
                                          f"{original.name}: {failure}", metrics))
                continue
            value, metric = accuracy(got, reference, val.labels, kind)
            accepted.append((b, Variant(
                name=variant_name, task=task, family=name, arch="head", format=HEAD_FORMAT,
                precision=b.precision, sha256=sha, size_bytes=len(data), accuracy=value,
                accuracy_metric=metric, macs=b.macs + features * out_spec.shape[1],
                inputs=b.inputs, outputs=(out_spec,), max_batch=b.max_batch,
                parent="" if b is original else f"{name}-{suffix_of[original.name]}",
                quantization=b.quantization, device=b.device, agreement=metrics,
                assets=dict(b.assets), base=b.name, tenant=tenant)))
        head_alone = _profile_head(head_path, features, threads_by_key,
                                   max(b.max_batch for b, _ in accepted) if accepted else 32,
                                   dict(profile_options or {}))
    variants = [_with_profiles(v, b, head_alone) for b, v in accepted]
    save_family(home, name, variants, rejected)
    return FamilyReport(name, task, variants, rejected)


def _check_inputs(base: Variant, val: Dataset) -> None:
    specs = base.inputs
    if len(val.inputs) != len(specs):
        raise ValueError(f"validation: base {base.name} takes {len(specs)} input(s) "
                         f"({', '.join(s.name for s in specs)}); the set has {len(val.inputs)}")
    for spec, array in zip(specs, val.inputs, strict=True):
        if str(array.dtype) != spec.dtype or any(
                d > 0 and d != n for d, n in zip(spec.shape[1:], array.shape[1:], strict=False)) \
                or array.ndim != len(spec.shape):
            raise ValueError(f"validation: base input {spec.name!r} is {spec.dtype} "
                             f"{list(spec.shape)}; the set gives {array.dtype} "
                             f"{list(array.shape)}")


def _profile_head(path: Path, features: int, threads_by_key: Mapping[str, int],
                  max_batch: int, options: dict[str, object]) -> dict[str, Profile]:
    spec = TensorSpec("features", "float32", (-1, features))
    return {key: profile_variant(path, HEAD_FORMAT, [spec], threads=threads,
                                 batch_sizes=batch_sizes_up_to(max_batch), **options)
            for key, threads in sorted(threads_by_key.items())}


def _with_profiles(variant: Variant, base: Variant, head: dict[str, Profile]) -> Variant:
    """``variant`` with base + head profiles on every class the base has one for, and the
    head's own profile (the first class's: a head is small enough to look the same)."""
    first = next(iter(head.values()))
    profiles = {}
    for key, profile in base.profiles.items():
        profiles[key] = compose_profile(profile, head.get(key, first))
    return dataclasses.replace(variant, profiles=profiles, head_profile=first)
