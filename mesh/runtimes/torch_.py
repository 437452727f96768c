"""torch backend: a ``torch.export`` program (``.pt2``) or a TorchScript file.

Both are zip archives; the member names tell them apart (a ``.pt2`` holds
``models/model.json``, TorchScript ``data.pkl`` and ``code/``). A session
runs under ``torch.inference_mode``. ``torch.set_num_threads`` is
process-wide, so the last session loaded sets the thread budget for all of
them; a node agent runs with one hardware class, so they agree.

Format ``torch`` runs on the CPU; ``torch-cuda`` moves the module and each
batch to the first GPU and returns outputs on the CPU.
"""

from __future__ import annotations

import warnings
import zipfile
from typing import Any

import numpy as np
import torch

__all__ = ["TorchRuntime", "TorchCudaRuntime", "artifact_kind", "load_module"]


def artifact_kind(path: str) -> str:
    """``"export"`` for a torch.export archive, ``"torchscript"`` for TorchScript.

    Raises ``ValueError`` for anything else (a truncated or foreign file).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a torch archive (not a zip file)") from None
    if any(n.endswith("models/model.json") for n in names):
        return "export"
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return "torchscript"
    raise ValueError(f"{path} is neither a torch.export (.pt2) nor a TorchScript archive")


def load_module(path: str, device: str = "cpu") -> torch.nn.Module:
    """The runnable module in a ``.pt2`` or TorchScript file, on ``device``."""
    if artifact_kind(path) == "export":
        # Store paths have no ".pt2" suffix, which torch.export.load warns about; a file object it takes.
        with open(path, "rb") as fh:
            program = torch.export.load(fh)
        if device != "cpu":
            program = torch.export.passes.move_to_device_pass(program, device)
        return program.module()
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export; submitted TorchScript is still served.
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(path, map_location=device).eval()


class _Session:
    __slots__ = ("module", "device")

    def __init__(self, module: torch.nn.Module, device: str) -> None:
        self.module = module
        self.device = device


class TorchRuntime:
    format = "torch"
    device = "cpu"

    def load(self, path: str, *, threads: int) -> Any:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        return _Session(load_module(path, self.device), self.device)

    def run(self, session: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
        tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(session.device) for a in inputs]
        with torch.inference_mode():
            out = session.module(*tensors)
        outs = out if isinstance(out, list | tuple) else (out,)
        return [o.detach().cpu().numpy() for o in outs]


class TorchCudaRuntime(TorchRuntime):
    format = "torch-cuda"
    device = "cuda"

    def load(self, path: str, *, threads: int) -> Any:
        if not torch.cuda.is_available():
            raise RuntimeError("format 'torch-cuda' needs a CUDA GPU; torch sees none here")
        return super().load(path, threads=threads)
