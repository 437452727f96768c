"""Validation and training ``.npz`` files: the keys, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mesh.variants.dataset import Dataset, load_dataset


def test_single_input_with_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "v.npz", x=np.zeros((5, 3)), y=np.arange(5))
    data = load_dataset(tmp_path / "v.npz")
    assert len(data) == 5
    assert data.inputs[0].dtype == np.float32  # float64 narrowed to what models take
    assert data.labels is not None and data.labels.dtype == np.int64


def test_several_inputs_keep_their_order(tmp_path: Path) -> None:
    ids = np.arange(12, dtype=np.int64).reshape(4, 3)
    np.savez(tmp_path / "v.npz", x1=ids * 0 + 1, x0=ids)
    data = load_dataset(tmp_path / "v.npz")
    np.testing.assert_array_equal(data.inputs[0], ids)
    assert data.inputs[1].dtype == np.int64 and data.labels is None
    assert [len(b[0]) for b in data.batches(3)] == [3, 1]


@pytest.mark.parametrize(("arrays", "message"), [
    ({"y": np.arange(3)}, "no input array"),
    ({"x": np.zeros((3, 2)), "x0": np.zeros((3, 2))}, "use 'x' alone"),
    ({"x0": np.zeros((3, 2)), "x2": np.zeros((3, 2))}, "without gaps"),
    ({"inputs": np.zeros((3, 2))}, "unknown key"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(3)}, "integer class labels"),
    ({"x": np.zeros((3, 2)), "y": np.arange(4)}, "4 labels for 3 input rows"),
    ({"x0": np.zeros((3, 2)), "x1": np.zeros((2, 2))}, "different row counts"),
    ({"x": np.zeros((1, 2))}, "at least 2 rows"),
])
def test_malformed_files_are_refused_naming_the_problem(tmp_path: Path, arrays: dict,
                                                         message: str) -> None:
    np.savez(tmp_path / "v.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_dataset(tmp_path / "v.npz")


def test_a_file_that_is_not_npz_is_refused(tmp_path: Path) -> None:
    (tmp_path / "v.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_dataset(tmp_path / "v.npz", what="training")


def test_dataset_head() -> None:
    data = Dataset((np.arange(10).reshape(5, 2),), np.arange(5))
    assert len(data.head(2)) == 2 and list(data.head(2).labels) == [0, 1]
