"""The LiteRT runtime on models converted by litert-torch: any batch, int8 and int64 interfaces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mesh.runtimes import runtime_for
from mesh.variants.convert import tflite_from_torch


class _SmallCnn(nn.Module):
    """Reshapes to an image with ``-1``: litert-torch bakes batch 1 into that reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x.reshape(-1, 1, 8, 8))).flatten(1))


class _TokenMean(nn.Module):
    """int64 token ids in: the embedding of each token, averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids).mean(dim=1)


def _convert(tmp_path: Path, module: nn.Module, rows: np.ndarray, *, int8: bool = False) -> str:
    path = tmp_path / ("int8.tflite" if int8 else "fp32.tflite")
    path.write_bytes(tflite_from_torch(module.eval(), [rows], int8=int8))
    return str(path)


def _torch(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return np.random.default_rng(0).random((40, 64), dtype=np.float64).astype(np.float32)


def test_resizable_model_runs_any_batch_size(tmp_path: Path, rows: np.ndarray) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    runtime = runtime_for("tflite")
    session = runtime.load(_convert(tmp_path, model, rows), threads=1)
    for batch in (1, 7, 32, 1, 40):
        (out,) = runtime.run(session, [rows[:batch]])
        assert out.shape == (batch, 3)
        np.testing.assert_allclose(out, _torch(model, rows[:batch]), atol=1e-5)


def test_model_with_a_baked_batch_size_is_run_in_chunks(tmp_path: Path, rows: np.ndarray) -> None:
    torch.manual_seed(0)
    model = _SmallCnn().eval()
    runtime = runtime_for("tflite")
    session = runtime.load(_convert(tmp_path, model, rows), threads=2)
    for batch in (5, 1, 32):
        (out,) = runtime.run(session, [rows[:batch]])
        assert out.shape == (batch, 3)
        np.testing.assert_allclose(out, _torch(model, rows[:batch]), atol=1e-4)


def test_int8_model_takes_and_returns_floats(tmp_path: Path, rows: np.ndarray) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    runtime = runtime_for("tflite")
    session = runtime.load(_convert(tmp_path, model, rows, int8=True), threads=1)
    (out,) = runtime.run(session, [rows[:8]])
    assert out.dtype == np.float32 and out.shape == (8, 3)
    expected = _torch(model, rows[:8])
    assert np.max(np.abs(out - expected)) < 0.05 * max(1.0, float(np.max(np.abs(expected))))


def test_int64_token_ids_are_accepted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _TokenMean().eval()
    ids = np.random.default_rng(0).integers(0, 50, (10, 5), dtype=np.int64)
    runtime = runtime_for("tflite")
    session = runtime.load(_convert(tmp_path, model, ids), threads=1)
    (out,) = runtime.run(session, [ids])
    np.testing.assert_allclose(out, _torch(model, ids), atol=1e-5)


def test_a_corrupt_file_fails_to_load(tmp_path: Path) -> None:
    (tmp_path / "bad.tflite").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError):
        runtime_for("tflite").load(str(tmp_path / "bad.tflite"), threads=1)
