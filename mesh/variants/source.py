"""The submitted model: an ONNX file or a PyTorch model, loaded for conversion.

Accepted forms (see :func:`load_source`):

- ``model.onnx``: an ONNX file (detected by parsing it as an ONNX model);
- ``model.pt2``: a ``torch.export`` archive (``torch.export.save``); its
  batch dimension should be dynamic (``Dim``), or every variant gets its
  example batch size;
- ``model.pt`` / ``model.ts``: a TorchScript archive (``torch.jit.save``);
- ``package.module:factory`` with ``weights=state_dict.pt``: the module is
  imported from the Python path or the current folder, the factory is
  called with no arguments and the state dict (``torch.save`` of
  ``model.state_dict()``, loaded with ``weights_only=True``) is loaded into it;
- an ``torch.nn.Module`` instance (Python API only).

A :class:`Source` knows what the model allows: ``module`` (a torch module
that ``torch.export`` and litert-torch can trace) for nn.Modules and
``.pt2`` files; ``torchscript`` for TorchScript (ONNX export works, TFLite
conversion does not); ``onnx`` for ONNX files (ONNX variants only).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Source", "load_source"]

KINDS = ("onnx", "module", "torchscript")


@dataclass
class Source:
    """A loaded submission. ``model`` is ONNX bytes or a torch module in eval mode."""

    kind: str
    model: Any
    description: str
    original_bytes: bytes | None = None  # the file as submitted, stored as-is when servable

    @property
    def is_torch(self) -> bool:
        return self.kind in ("module", "torchscript")


def _is_onnx(data: bytes) -> bool:
    import onnx

    try:
        proto = onnx.load_model_from_string(data)
    except Exception:  # noqa: BLE001  (any parse failure means "not ONNX")
        return False
    return len(proto.graph.node) > 0


def _torch_archive_kind(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return None
    if any(n.endswith("models/model.json") or n.endswith("archive_format") for n in names):
        return "export"
    if any(n.endswith("data.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    return None


def _from_factory(spec: str, weights: str | Path | None) -> Source:
    import torch

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {spec!r}: write a factory as 'package.module:function'")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # `mesh` is a console script: let it find modules of the folder it runs in
        sys.path.insert(0, cwd)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model {spec!r}: cannot import the factory ({exc})") from None
    finally:
        if added:
            sys.path.remove(cwd)
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model {spec!r}: the factory returned {type(model).__name__}, "
                         "not a torch.nn.Module")
    if weights is not None:
        state = torch.load(Path(weights), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"weights {weights}: expected a state dict "
                             "(torch.save(model.state_dict(), path))")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"weights {weights} do not fit {spec}: {exc}") from None
    return Source("module", model.eval(), f"{spec}" + (f" + {Path(weights).name}" if weights
                                                       else ""))


def load_source(model: Any, *, weights: str | Path | None = None) -> Source:
    """Load a submission in any accepted form (module docstring).

    Raises ``ValueError`` naming the file and what was expected when the
    model cannot be read, ``FileNotFoundError`` for a missing file and
    ``ModuleNotFoundError`` when a PyTorch model is given without torch
    installed (``pip install 'tiermesh[build]'``).
    """
    if not isinstance(model, str | Path):
        import torch

        if isinstance(model, torch.nn.Module):
            return Source("module", model.eval(), type(model).__name__)
        raise ValueError(f"model: expected a file path, 'module:factory' or a torch.nn.Module, "
                         f"got {type(model).__name__}")
    text = str(model)
    path = Path(text)
    if not path.exists() and ":" in text and not text.endswith((".onnx", ".pt", ".pt2", ".ts")):
        return _from_factory(text, weights)
    if weights is not None:
        raise ValueError("weights: a state dict goes with a 'module:factory' model, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    data = path.read_bytes()
    archive = _torch_archive_kind(path)
    if archive is not None:
        import torch

        if archive == "export":
            with open(path, "rb") as fh:  # any file name, not only *.pt2
                program = torch.export.load(fh)
            return Source("module", program.module(), f"torch.export {path.name}", data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
        return Source("torchscript", scripted.eval(), f"TorchScript {path.name}", data)
    if _is_onnx(data):
        return Source("onnx", data, f"ONNX {path.name}", data)
    raise ValueError(f"model file {path}: not an ONNX model, a torch.export (.pt2) archive or a "
                     "TorchScript archive")
