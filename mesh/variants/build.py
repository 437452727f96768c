"""Build the bundled variants into a mesh home: train, export, store, profile, register.

``build_bundled(home)`` leaves, under ``home``::

    store/ab/abcd...      one ONNX artifact per variant, named by its sha256
    registry.json         digits-linear, digits-mlp, digits-cnn with measured
                          accuracy, MACs and per-hardware-class latency profiles

A build is cached by its *build key*: the sha256 of ``digits.py``'s source,
:data:`RECIPE_VERSION` and the versions of the libraries that shape the
result (torch, onnx, onnxruntime, scikit-learn). When the registry already
holds every variant under the current key and each artifact verifies in the
store, the build returns those entries without importing torch or training,
only profiling hardware classes that have no profile yet. A missing or
corrupt artifact, or ``force=True``, rebuilds the whole family.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from types import MappingProxyType

from tqdm import tqdm

from mesh.registry import Profile, Registry, TensorSpec, Variant
from mesh.store import ArtifactStore

__all__ = ["RECIPE_VERSION", "DEFAULT_PROFILE_THREADS", "STORE_DIR", "build_key",
           "build_bundled"]

RECIPE_VERSION = 1
"""Bump when the build changes in a way the hashed sources do not show."""

DEFAULT_PROFILE_THREADS: Mapping[str, int] = MappingProxyType({"cpu-1t": 1, "cpu-2t": 2})
"""Hardware classes profiled by default: profile key -> compute threads."""

STORE_DIR = "store"

FAMILY = "digits"
TASK = "digits"
ARCHS: tuple[str, ...] = ("linear", "mlp", "cnn")  # mirrors digits.ARCHS without importing torch
INPUTS = (TensorSpec("input", "float32", (-1, 64)),)
OUTPUTS = (TensorSpec("probs", "float32", (-1, 10)),)
MAX_BATCH = 32
PROFILE_BATCH_SIZES = (1, 8, 32)

_KEYED_PACKAGES = ("torch", "onnx", "onnxruntime", "scikit-learn")


def _name(arch: str) -> str:
    return f"{FAMILY}-{arch}"


def build_key() -> str:
    """The key a cached build must carry to be reused (see the module docstring)."""
    digest = hashlib.sha256()
    digest.update(Path(__file__).with_name("digits.py").read_bytes())
    digest.update(f"\0recipe={RECIPE_VERSION}".encode())
    for package in _KEYED_PACKAGES:
        digest.update(f"\0{package}={version(package)}".encode())
    return digest.hexdigest()


def _check_profile_keys(profile_keys_threads: Mapping[str, int]) -> dict[str, int]:
    if not profile_keys_threads:
        raise ValueError("profile_keys_threads is empty; pass at least one, e.g. {'cpu-1t': 1}")
    for key, threads in profile_keys_threads.items():
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"profile_keys_threads[{key!r}]: threads must be an int >= 1, "
                             f"got {threads!r}")
        if key != f"cpu-{threads}t":
            raise ValueError(f"profile_keys_threads: key {key!r} does not match {threads} "
                             f"threads; use 'cpu-{threads}t' (HardwareClass.profile_key)")
    return dict(profile_keys_threads)


def _cached(registry: Registry, store: ArtifactStore, key: str) -> list[Variant] | None:
    """The family's registered variants if all are current and intact, else None."""
    found = []
    for arch in ARCHS:
        variant = registry.variants.get(_name(arch))
        if variant is None or variant.build_key != key or not store.verify(variant.sha256):
            return None
        found.append(variant)
    return found


def _profile(variants: list[Variant], store: ArtifactStore, threads_by_key: dict[str, int],
             progress: bool) -> list[Variant]:
    """``variants`` with a fresh profile for each key in ``threads_by_key`` added."""
    from mesh.variants.profile import profile_onnx

    out = []
    with tqdm(total=len(variants) * len(threads_by_key), desc=f"profile {FAMILY}",
              unit="run", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        for variant in variants:
            profiles: dict[str, Profile] = dict(variant.profiles)
            for key, threads in sorted(threads_by_key.items()):
                bar.set_postfix_str(f"{variant.name} {key}")
                profiles[key] = profile_onnx(store.path(variant.sha256), variant.inputs[0],
                                             threads=threads, batch_sizes=PROFILE_BATCH_SIZES)
                bar.update()
            out.append(dataclasses.replace(variant, profiles=profiles))
    return out


def _train(store: ArtifactStore, key: str, progress: bool) -> list[Variant]:
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
                name=_name(arch), task=TASK, family=FAMILY, arch=arch, format="onnx",
                precision="fp32", sha256=store.put_bytes(trained.onnx_bytes),
                size_bytes=len(trained.onnx_bytes), accuracy=trained.accuracy,
                accuracy_metric="top1", macs=trained.macs, inputs=INPUTS, outputs=OUTPUTS,
                max_batch=MAX_BATCH, build_key=key))
    return variants


def build_bundled(
    home: str | Path,
    *,
    profile_keys_threads: Mapping[str, int] = DEFAULT_PROFILE_THREADS,
    force: bool = False,
    progress: bool = True,
) -> list[Variant]:
    """Build (or reuse) the digits variants in ``home``; return them smallest first.

    ``profile_keys_threads`` maps each hardware class's profile key
    (``cpu-{threads}t``, as :attr:`HardwareClass.profile_key` spells it) to
    its thread count. ``progress`` shows tqdm bars on stderr.

    Raises ``ValueError`` for a profile key that does not match its thread
    count, and ``ModuleNotFoundError`` when training is needed but the build
    extras are missing (``pip install 'tiermesh[build]'``).
    """
    home = Path(home)
    threads_by_key = _check_profile_keys(profile_keys_threads)
    store = ArtifactStore(home / STORE_DIR)
    registry = Registry.load(home)
    key = build_key()

    variants = None if force else _cached(registry, store, key)
    if variants is not None:
        missing = {k: t for k, t in threads_by_key.items()
                   if any(k not in v.profiles for v in variants)}
        if not missing:
            return variants
        variants = _profile(variants, store, missing, progress)
    else:
        variants = _profile(_train(store, key, progress), store, threads_by_key, progress)

    for variant in variants:
        registry.add(variant)
    registry.save(home)
    return variants
