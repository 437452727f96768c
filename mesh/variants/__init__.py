"""The variant factory: builds, measures and registers runnable model variants.

Each family trains its architectures, exports them to ONNX, stores the
artifacts content-addressed and registers every variant with its measured
accuracy, MACs and latency profiles. The first family is ``digits``
(:mod:`mesh.variants.digits`); :func:`build_bundled` builds it into a mesh home.
Training needs the ``build`` extras (torch, onnx, scikit-learn); reusing a
cached build does not.
"""

from __future__ import annotations

from mesh.variants.build import build_bundled

__all__ = ["build_bundled"]
