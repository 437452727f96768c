"""The variant factory: one submitted model becomes a checked, measured family of variants.

:func:`register_model` loads the submission (:mod:`mesh.variants.source`),
runs it on the validation set to get the reference outputs, then for every
variant the model allows:

1. converts it (:mod:`mesh.variants.recipes`: what the model allows and how,
   with :mod:`mesh.variants.convert` and :mod:`mesh.variants.distill`);
2. runs the artifact through the runtime a node would use
   (:func:`mesh.runtimes.runtime_for`) on every validation row and checks its
   agreement with the reference (:mod:`mesh.variants.evaluate`);
3. measures its accuracy on the validation set;
4. profiles it on every hardware class (:mod:`mesh.variants.profile`).

A conversion that raises, an artifact its runtime cannot run, or an
agreement check that fails turns that variant into a
:class:`~mesh.registry.Rejection` with the reason; the others go on. Accepted
artifacts go into the content-addressed store; the registry (accepted and
rejected) is saved once at the end, replacing any earlier registration of
the same family when ``replace=True``.

Variant names are ``NAME-SUFFIX`` with the suffixes in
:data:`~mesh.variants.recipes.SUFFIXES`, and the family is ``NAME``; a caller
that folds the model into a larger family (``mesh build`` does, for the
bundled digits CNN) passes ``family`` and may rename single suffixes
(``names``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mesh.registry import Profile, Registry, Rejection, TensorSpec, Variant
from mesh.store import ArtifactStore
from mesh.variants.dataset import Dataset, load_dataset
from mesh.variants.evaluate import KINDS, Thresholds, accuracy, agreement, check
from mesh.variants.profile import batch_sizes_up_to, profile_variant
from mesh.variants.recipes import (
    SUFFIXES,
    Job,
    NotApplicable,
    Plan,
    build_artifact,
    original_suffix,
    plans,
    reference_outputs,
    run_artifact,
    short_error,
)
from mesh.variants.source import Source, load_source

__all__ = ["SUFFIXES", "FamilyReport", "register_model", "check_name", "save_family",
           "torch_settings_restored"]

DEFAULT_THRESHOLDS = Thresholds()

STORE_DIR = "store"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")


@dataclass(frozen=True)
class FamilyReport:
    """What :func:`register_model` made: accepted variants, rejections, and what it skipped."""

    family: str
    task: str
    accepted: list[Variant]
    rejected: list[Rejection]
    skipped: dict[str, str] = field(default_factory=dict)  # suffix -> why it was not attempted


# ------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def torch_settings_restored() -> Iterator[None]:
    """Profiling the torch runtime sets torch's process-wide thread count; put it back after."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and threads is not None:
            torch.set_num_threads(threads)


def _onnx_dtype(elem_type: int) -> str:
    from onnx import helper

    return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))


def _onnx_specs(onnx_bytes: bytes) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    import onnx

    graph = onnx.load_model_from_string(onnx_bytes).graph
    initialisers = {i.name for i in graph.initializer}
    ins = [(i.name, _onnx_dtype(i.type.tensor_type.elem_type)) for i in graph.input
           if i.name not in initialisers]
    outs = [(o.name, _onnx_dtype(o.type.tensor_type.elem_type)) for o in graph.output]
    return ins, outs


def _count_macs(module: Any, sample: Sequence[np.ndarray]) -> int:
    """Multiply-accumulates per input row on Linear and Conv layers (0 when none are visible)."""
    import torch
    from torch import nn

    total = 0

    def hook(layer: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Linear):
            total += out.numel() * layer.in_features
        elif isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            per_out = layer.in_channels // layer.groups * int(np.prod(layer.kernel_size))
            total += out.numel() * per_out

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)] \
        if isinstance(module, nn.Module) and not isinstance(module, torch.jit.ScriptModule) else []
    if not handles:
        return 0
    try:
        with torch.no_grad():
            module(*(torch.from_numpy(np.ascontiguousarray(a[:1])) for a in sample))
    finally:
        for h in handles:
            h.remove()
    return total


# ------------------------------------------------------------------------------ the factory


def _specs(source: Source, validation: Dataset, reference: list[np.ndarray],
           input_names: Sequence[str] | None, output_names: Sequence[str] | None
           ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    n_in, n_out = len(validation.inputs), len(reference)
    if source.kind == "onnx":
        onnx_in, onnx_out = _onnx_specs(source.model)
        if len(onnx_in) != n_in:
            raise ValueError(f"the ONNX model takes {len(onnx_in)} inputs "
                             f"({', '.join(n for n, _ in onnx_in)}); the validation set has "
                             f"{n_in} (keys x0..x{n_in - 1})")
        for (name, dtype), array in zip(onnx_in, validation.inputs, strict=True):
            if str(array.dtype) != dtype:
                raise ValueError(f"ONNX input {name!r} takes {dtype}; the validation set gives "
                                 f"{array.dtype}")
        in_names = [n for n, _ in onnx_in]
        out_names = [n for n, _ in onnx_out]
    else:
        in_names = list(input_names or (["input"] if n_in == 1 else
                                        [f"input{i}" for i in range(n_in)]))
        out_names = list(output_names or (["output"] if n_out == 1 else
                                          [f"output{i}" for i in range(n_out)]))
        if len(in_names) != n_in or len(out_names) != n_out:
            raise ValueError(f"input_names/output_names: the model takes {n_in} input(s) and "
                             f"returns {n_out} output(s); got {in_names} and {out_names}")
    inputs = tuple(TensorSpec(n, str(a.dtype), (-1, *a.shape[1:]))
                   for n, a in zip(in_names, validation.inputs, strict=True))
    outputs = tuple(TensorSpec(n, str(a.dtype), (-1, *a.shape[1:]))
                    for n, a in zip(out_names, reference, strict=True))
    return inputs, outputs


def check_name(what: str, name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"{what} {name!r}: use 1-42 lowercase letters, digits and '-', "
                         "starting and ending with a letter or digit")


def _check_args(name: str, task: str, kind: str, max_batch: int,
                formats: Sequence[str] | None, family: str,
                names: Mapping[str, str]) -> set[str]:
    check_name("name", name)
    check_name("family", family)
    for suffix, variant_name in names.items():
        if suffix not in SUFFIXES:
            raise ValueError(f"names: unknown variant {suffix!r}; choose from {', '.join(SUFFIXES)}")
        check_name(f"names[{suffix!r}]", variant_name)
    if len(set(names.values())) != len(names):
        raise ValueError(f"names: two variants would share a name ({dict(names)})")
    if not task.strip():
        raise ValueError("task: must not be empty (e.g. 'digits', 'sentence-embedding')")
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose one of {', '.join(KINDS)}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    wanted = set(SUFFIXES if formats is None else formats)
    unknown = sorted(wanted - set(SUFFIXES))
    if unknown:
        raise ValueError(f"formats: unknown variant(s) {unknown}; choose from {', '.join(SUFFIXES)}")
    return wanted


def register_model(
    home: str | Path,
    name: str,
    *,
    task: str,
    model: Any,
    validation: str | Path | Dataset,
    train: str | Path | Dataset | None = None,
    weights: str | Path | None = None,
    kind: str = "classes",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    formats: Sequence[str] | None = None,
    profile_keys_threads: Mapping[str, int] | None = None,
    max_batch: int = 32,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    assets: Mapping[str, bytes] | None = None,
    build_key: str = "",
    replace: bool = False,
    progress: bool = True,
    profile_options: Mapping[str, Any] | None = None,
    family: str | None = None,
    names: Mapping[str, str] | None = None,
    arch: str = "original",
    tenant: str = "",
) -> FamilyReport:
    """Make, check, measure and register the variants of one model (module docstring).

    ``model`` is a path (ONNX, ``.pt2``, TorchScript), ``"module:factory"``
    (with ``weights``, a state dict) or a ``torch.nn.Module``;
    ``validation``/``train`` are ``.npz`` paths (:mod:`mesh.variants.dataset`)
    or :class:`Dataset` objects. ``kind`` is ``classes`` or ``embedding``.
    ``formats`` limits the variants attempted (suffixes in :data:`SUFFIXES`).
    ``assets`` are files clients need (a tokenizer), stored and named on every
    variant. ``profile_keys_threads`` defaults to
    :data:`~mesh.variants.build.DEFAULT_PROFILE_THREADS`. ``family`` (default
    ``name``) is the family the variants join and that ``replace`` replaces;
    ``names`` maps a suffix to the name its variant gets instead of
    ``NAME-SUFFIX``; ``arch`` is recorded on every variant but the student.
    ``tenant``: the tenant that owns the family; its task is private to that tenant.

    Raises ``ValueError`` for a bad name, task, kind, format, dataset or
    model, or when ``name`` is already registered and ``replace`` is false;
    ``FileNotFoundError`` for a missing model file. Failures of single
    variants are not raised: they are in the report's ``rejected``.
    """
    from mesh.variants.build import DEFAULT_PROFILE_THREADS, check_profile_keys

    family = family or name
    names = dict(names or {})
    wanted = _check_args(name, task, kind, max_batch, formats, family, names)
    threads_by_key = check_profile_keys(profile_keys_threads or DEFAULT_PROFILE_THREADS)
    home = Path(home)
    registry = Registry.load(home)
    existing = {v.family for v in registry.variants.values()} | {
        r.family for r in registry.rejected.values()}
    if family in existing and not replace:
        raise ValueError(f"model family {family!r} is already registered in {home}; "
                         "pass replace=True (--replace) to register it again")
    val = validation if isinstance(validation, Dataset) else load_dataset(validation)
    tr = train if isinstance(train, Dataset) or train is None else load_dataset(train, what="training")
    source = load_source(model, weights=weights)
    reference = reference_outputs(source, val, max_batch)
    ins, outs = _specs(source, val, reference, input_names, output_names)
    ctx = Job(name, task, kind, source, val, tr, ins, outs, reference[0], max_batch, progress)
    todo, skipped = plans(ctx, wanted)
    store = ArtifactStore(home / STORE_DIR)
    asset_shas = {k: store.put_bytes(v) for k, v in (assets or {}).items()}
    macs = _count_macs(source.model, val.inputs) if source.is_torch else 0
    original = names.get(original_suffix(source), f"{name}-{original_suffix(source)}")

    accepted: list[Variant] = []
    rejected: list[Rejection] = []
    with torch_settings_restored(), tempfile.TemporaryDirectory(prefix="tiermesh-v-") as tmp, \
            tqdm(total=len(todo), desc=f"convert {name}", unit="variant", file=sys.stderr,
                 disable=not progress, dynamic_ncols=True) as bar:
        for plan in todo:
            variant_name = names.get(plan.suffix, f"{name}-{plan.suffix}")
            bar.set_postfix_str(plan.suffix)

            def reject(stage: str, reason: str, metrics: dict[str, float] | None = None,
                       plan: Plan = plan, variant_name: str = variant_name) -> None:
                rejected.append(Rejection(variant_name, task, family, plan.format, plan.precision,
                                          stage, reason, dict(metrics or {})))

            def on_student(epoch: int, epochs: int, loss: float, plan: Plan = plan) -> None:
                bar.set_postfix_str(f"{plan.suffix}: distilling epoch {epoch + 1}/{epochs} "
                                    f"loss={loss:.3f}")

            try:
                data = build_artifact(plan, ctx, on_student)
            except NotApplicable as exc:
                skipped[plan.suffix] = str(exc)
                bar.update()
                continue
            except Exception as exc:  # noqa: BLE001  (one failed conversion must not stop the rest)
                reject("convert", short_error(exc))
                bar.update()
                continue
            path = Path(tmp) / variant_name
            path.write_bytes(data)
            try:
                outputs = run_artifact(path, plan.format, val, max_batch)
            except Exception as exc:  # noqa: BLE001
                reject("run", short_error(exc))
                bar.update()
                continue
            metrics = agreement(ctx.reference, outputs[0], kind)
            failure = check(metrics, thresholds.limits(plan.tier, kind))
            if failure is not None:
                reject("agreement", f"disagrees with the original: {failure}", metrics)
                bar.update()
                continue
            value, metric = accuracy(outputs[0], ctx.reference, val.labels, kind)
            student = plan.tier == "student"
            accepted.append(Variant(
                name=variant_name, task=task, family=family,
                arch="student" if student else arch, format=plan.format,
                precision=plan.precision, sha256=store.put_bytes(data), size_bytes=len(data),
                accuracy=value, accuracy_metric=metric,
                macs=0 if student else macs,
                inputs=ins, outputs=outs[:1] if student else outs,
                max_batch=max_batch, build_key=build_key,
                parent="" if variant_name == original else original,
                quantization=plan.quantization, device=plan.device, agreement=metrics,
                assets=asset_shas, tenant=tenant))
            bar.update()
        bar.close()
        accepted = _profile_all(accepted, store, threads_by_key, val, progress,
                                dict(profile_options or {}))

    save_family(home, family, accepted, rejected)
    return FamilyReport(name, task, accepted, rejected, skipped)


def save_family(home: Path, family: str, accepted: Sequence[Variant],
                rejected: Sequence[Rejection]) -> None:
    """Replace ``family`` in the registry at ``home`` with ``accepted`` and ``rejected``,
    re-read first: whatever others registered meanwhile is kept."""
    registry = Registry.load(home)
    registry.remove_family(family)
    for variant in accepted:
        registry.add(variant)
    for rejection in rejected:
        registry.reject(rejection)
    registry.save(home)


def _profile_all(variants: list[Variant], store: ArtifactStore, threads_by_key: dict[str, int],
                 validation: Dataset, progress: bool, options: dict[str, Any]) -> list[Variant]:
    """``variants`` with a profile per hardware class (CUDA variants on ``cuda-*`` classes)."""
    jobs = [(v, (f"cuda-{t}t" if v.device == "cuda" else key), t)
            for v in variants for key, t in sorted(threads_by_key.items())]
    out: dict[str, dict[str, Profile]] = {v.name: dict(v.profiles) for v in variants}
    with tqdm(total=len(jobs), desc="profile", unit="run", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for variant, key, threads in jobs:
            bar.set_postfix_str(f"{variant.name} {key}")
            sample = [a[:variant.max_batch] for a in validation.inputs]
            out[variant.name][key] = profile_variant(
                store.path(variant.sha256), variant.format, variant.inputs, threads=threads,
                batch_sizes=batch_sizes_up_to(variant.max_batch), sample=sample, **options)
            bar.update()
    return [dataclasses.replace(v, profiles=out[v.name]) for v in variants]
