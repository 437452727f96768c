"""The variant factory: builds, checks, measures and registers runnable model variants.

- :func:`register_model` (``mesh models add``): one submitted model (ONNX,
  ``torch.export``, TorchScript or ``module:factory`` + state dict) becomes a
  family of variants (torch, ONNX fp32/int8, TFLite fp32/int8, a distilled
  student), each checked against the original, scored on the validation set
  and profiled per hardware class; failures are recorded as rejections
  (:mod:`mesh.variants.factory`, ``docs/variants.md``).
- :func:`build_bundled` (``mesh build``): the bundled families, ``digits``
  (:mod:`mesh.variants.digits`) and ``minilm``, task ``sentence-embedding``
  (:mod:`mesh.variants.minilm`).

Building needs the ``build`` extras (torch, onnx, scikit-learn, transformers)
and, for TFLite variants, ``convert`` (litert-torch); reusing a cached build
does not. torch is imported only when a model is converted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mesh.variants.bundled import build_bundled

if TYPE_CHECKING:
    from mesh.variants.factory import FamilyReport, register_model

__all__ = ["build_bundled", "register_model", "FamilyReport"]


def __getattr__(name: str) -> Any:
    # The factory pulls in onnxruntime and the profiler; load it on first use only.
    if name in ("register_model", "FamilyReport"):
        from mesh.variants import factory

        return getattr(factory, name)
    raise AttributeError(f"module 'mesh.variants' has no attribute {name!r}")
