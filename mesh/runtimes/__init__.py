"""Model runtimes behind one small interface, chosen by a variant's format.

A runtime is two calls: ``load(path, *, threads) -> session`` and
``run(session, inputs) -> outputs``. Each backend module is imported only when
a variant of its format is first loaded, so a node without torch or LiteRT
still serves ONNX; a missing backend raises :class:`~mesh.errors.RuntimeMissing`
(a 503 ``Unavailable``) naming the extra that provides it.

Thread settings: several node agents share a small machine, so a session gets
exactly its hardware class's ``threads`` for compute, no inter-op pool and no
spinning threads. :func:`thread_env` gives the environment that keeps the
libraries that size their pools from the CPU count (OpenMP, BLAS, torch) to
the same budget; the node process applies it before those libraries load.

Backends: ``onnx`` (onnxruntime, a core dependency), ``tflite`` (ai-edge-litert,
extra ``litert``) and ``torch`` (extra ``build``, where torch is pinned), in :data:`BACKENDS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mesh.errors import RuntimeMissing

__all__ = ["BACKENDS", "Backend", "ModelRuntime", "runtime_for", "thread_env"]


class ModelRuntime(Protocol):
    """What a backend implements. Sessions must be safe to ``run`` from one thread at a time."""

    format: str

    def load(self, path: str, *, threads: int) -> Any:
        """Open the artifact at ``path`` with ``threads`` compute threads.

        Raises on a corrupt or unreadable file (any exception; the node marks
        the variant unavailable with its message).
        """

    def run(self, session: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run one batch; inputs and outputs are positional, batch dimension first."""


@dataclass(frozen=True, slots=True)
class Backend:
    """Where a format's runtime lives and which extra installs it."""

    module: str
    cls: str
    install: str


BACKENDS: dict[str, Backend] = {
    "onnx": Backend("mesh.runtimes.onnx", "OnnxRuntime", "pip install onnxruntime"),
    "tflite": Backend("mesh.runtimes.litert", "LiteRTRuntime", "pip install 'tiermesh[litert]'"),
    "torch": Backend("mesh.runtimes.torch_", "TorchRuntime", "pip install 'tiermesh[build]'"),
    "torch-cuda": Backend("mesh.runtimes.torch_", "TorchCudaRuntime",
                          "pip install 'tiermesh[build]' (with a CUDA build of torch)"),
}

_cache: dict[str, ModelRuntime] = {}


def runtime_for(fmt: str) -> ModelRuntime:
    """The runtime for a variant format (one instance per process).

    Raises :class:`RuntimeMissing` (an :class:`Unavailable`) for an unknown format, or one whose backend
    is not installed; the message says what to install.
    """
    runtime = _cache.get(fmt)
    if runtime is not None:
        return runtime
    backend = BACKENDS.get(fmt)
    if backend is None:
        raise RuntimeMissing(
            f"no runtime for format {fmt!r} (known: {', '.join(sorted(BACKENDS))})")
    try:
        runtime = getattr(importlib.import_module(backend.module), backend.cls)()
    except ImportError as exc:
        missing = exc.name or str(exc)
        raise RuntimeMissing(
            f"runtime for format {fmt!r} is not installed ({missing} missing); {backend.install}"
        ) from None
    _cache[fmt] = runtime
    return runtime


def thread_env(threads: int) -> dict[str, str]:
    """Environment that caps OpenMP / BLAS pools at ``threads`` (set before they load)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    value = str(threads)
    return {name: value for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                     "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")}
