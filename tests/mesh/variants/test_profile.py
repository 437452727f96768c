"""Profiling through the runtime interface: latency(batch) with its fitted line, cold start, memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mesh.registry import TensorSpec
from mesh.variants.digits import export_onnx
from mesh.variants.profile import batch_sizes_up_to, fit_latency, make_batch, profile_variant

SPEC = (TensorSpec("input", "float32", (-1, 64)),)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("onnx") / "mlp.onnx"
    path.write_bytes(export_onnx(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))))
    return path


def test_batch_sizes_double_up_to_the_maximum() -> None:
    assert batch_sizes_up_to(32) == (1, 2, 4, 8, 16, 32)
    assert batch_sizes_up_to(20) == (1, 2, 4, 8, 16, 20)
    assert batch_sizes_up_to(1) == (1,)
    with pytest.raises(ValueError):
        batch_sizes_up_to(0)


def test_fit_recovers_a_linear_cost_and_reports_its_error() -> None:
    exact = fit_latency({b: 0.5 + 0.25 * b for b in (1, 2, 4, 8, 16, 32)})
    assert exact.intercept_ms == pytest.approx(0.5)
    assert exact.per_row_ms == pytest.approx(0.25)
    assert exact.max_error_frac == pytest.approx(0.0, abs=1e-9)
    assert exact.latency_ms(10) == pytest.approx(3.0)
    knee = fit_latency({1: 1.0, 2: 1.0, 4: 1.0, 8: 10.0})
    assert knee.max_error_frac > 0.25  # a line does not describe this curve, and says so


def test_profile_measures_every_batch_size_cold_start_and_memory(onnx_file: Path) -> None:
    profile = profile_variant(onnx_file, "onnx", SPEC, threads=1, batch_sizes=(1, 2, 4, 8),
                              min_repeats=3, budget_s=0.01)
    assert sorted(profile.batch_ms) == [1, 2, 4, 8]
    assert all(ms > 0 for ms in profile.batch_ms.values())
    assert profile.cold_start_ms > 0
    # A 256-wide MLP's weights alone are ~80 KB; the session costs more than that.
    assert profile.peak_memory_bytes > 80_000
    assert profile.fit is not None
    measured = np.array([profile.batch_ms[b] for b in (1, 2, 4, 8)])
    fitted = np.array([profile.fit.latency_ms(b) for b in (1, 2, 4, 8)])
    assert np.max(np.abs(fitted - measured) / measured) == pytest.approx(
        profile.fit.max_error_frac, rel=1e-6)


def test_samples_are_tiled_to_each_batch_size() -> None:
    sample = [np.arange(6, dtype=np.int64).reshape(3, 2)]
    (batch,) = make_batch((TensorSpec("ids", "int64", (-1, 2)),), 5, sample,
                          np.random.default_rng(0))
    np.testing.assert_array_equal(batch[:, 0], [0, 2, 4, 0, 2])


def test_a_corrupt_artifact_fails_the_memory_measurement_with_its_error(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="memory measurement of .* failed"):
        profile_variant(tmp_path / "bad.onnx", "onnx", SPEC, threads=1, batch_sizes=(1,))


def test_bad_arguments_are_refused(onnx_file: Path) -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        profile_variant(onnx_file, "onnx", SPEC, threads=0)
    with pytest.raises(ValueError, match="batch_sizes must be positive"):
        profile_variant(onnx_file, "onnx", SPEC, threads=1, batch_sizes=(0, 4))
