"""The torch runtime: torch.export archives and TorchScript files, any batch size."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mesh.runtimes import runtime_for
from mesh.runtimes.torch_ import artifact_kind
from mesh.variants.convert import torch_artifact


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 2)).eval()


def _rows(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 12)).astype(np.float32)


def test_export_archive_runs_every_batch_size(tmp_path: Path, model: nn.Module,
                                              restore_threads: None) -> None:
    path = tmp_path / "m.pt2"
    path.write_bytes(torch_artifact(model, [_rows(2)]))
    assert artifact_kind(str(path)) == "export"
    runtime = runtime_for("torch")
    session = runtime.load(str(path), threads=1)
    assert torch.get_num_threads() == 1
    for batch in (1, 3, 32):
        (out,) = runtime.run(session, [_rows(batch)])
        with torch.no_grad():
            expected = model(torch.from_numpy(_rows(batch))).numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_torchscript_file_runs(tmp_path: Path, model: nn.Module, restore_threads: None) -> None:
    path = tmp_path / "m.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(model, (torch.from_numpy(_rows(2)),)).save(str(path))
    assert artifact_kind(str(path)) == "torchscript"
    runtime = runtime_for("torch")
    (out,) = runtime.run(runtime.load(str(path), threads=2), [_rows(5)])
    assert out.shape == (5, 2)


def test_files_that_are_not_torch_archives_are_refused(tmp_path: Path, model: nn.Module) -> None:
    (tmp_path / "junk").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="not a zip"):
        runtime_for("torch").load(str(tmp_path / "junk"), threads=1)
    good = torch_artifact(model, [_rows(2)])
    (tmp_path / "cut.pt2").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError):
        runtime_for("torch").load(str(tmp_path / "cut.pt2"), threads=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_format_says_it_needs_a_gpu(tmp_path: Path, model: nn.Module) -> None:
    path = tmp_path / "m.pt2"
    path.write_bytes(torch_artifact(model, [_rows(2)]))
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        runtime_for("torch-cuda").load(str(path), threads=1)
