"""Model runtimes behind one small interface, chosen by a variant's format.

A runtime is two calls: ``load(path) -> session`` and ``run(session, inputs)
-> outputs``. Each backend module is imported only when a variant of its
format is first loaded, so a node without torch or LiteRT still serves ONNX.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np

from mesh.errors import Unavailable

__all__ = ["ModelRuntime", "runtime_for"]


class ModelRuntime(Protocol):
    format: str

    def load(self, path: str, *, threads: int) -> Any:
        """Open the artifact at ``path``; raise on a corrupt or unreadable file."""

    def run(self, session: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run one batch; inputs and outputs are positional."""


# format -> (module, class, pip extra that provides it)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "onnx": ("mesh.runtimes.onnx", "OnnxRuntime", "tiermesh (core dependency onnxruntime)"),
}

_cache: dict[str, ModelRuntime] = {}


def runtime_for(fmt: str) -> ModelRuntime:
    """The runtime for a variant format; a clear error names a missing extra."""
    if fmt in _cache:
        return _cache[fmt]
    if fmt not in _BACKENDS:
        raise Unavailable(f"no runtime for format {fmt!r} (known: {sorted(_BACKENDS)})")
    module, cls, extra = _BACKENDS[fmt]
    try:
        runtime = getattr(importlib.import_module(module), cls)()
    except ImportError as exc:
        raise Unavailable(
            f"runtime for format {fmt!r} is not installed ({exc.name} missing); "
            f"install the extra: pip install '{extra}'"
        ) from None
    _cache[fmt] = runtime
    return runtime
