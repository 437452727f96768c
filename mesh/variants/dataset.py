"""Validation and training sets as ``.npz`` files: what ``mesh models add`` reads.

Keys (``numpy.savez``):

- ``x``: the model's input, batch first, for a model with one input; or
- ``x0``, ``x1``, ...: one array per input, in the model's positional order,
  for a model with several (``input_ids`` and ``attention_mask``, say);
- ``y`` (optional): int labels ``[N]``, the true class of each row. With
  labels, accuracy is top-1 against them; without, it is agreement with the
  submitted model's own outputs.

Every input array has the same number of rows ``N`` (at least 2); float64
inputs are narrowed to float32, the dtype models are exported with. Nothing
is unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "load_dataset"]

_INPUT_KEY = re.compile(r"^x(\d+)?$")


@dataclass(frozen=True)
class Dataset:
    """Model inputs (positional) and optional labels."""

    inputs: tuple[np.ndarray, ...]
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("a dataset needs at least one input array")
        rows = {len(a) for a in self.inputs}
        if len(rows) != 1:
            raise ValueError(f"input arrays have different row counts: {sorted(rows)}")
        if self.labels is not None and len(self.labels) != len(self):
            raise ValueError(f"y has {len(self.labels)} labels for {len(self)} input rows")

    def __len__(self) -> int:
        return len(self.inputs[0])

    def head(self, rows: int) -> Dataset:
        """The first ``rows`` rows."""
        labels = None if self.labels is None else self.labels[:rows]
        return Dataset(tuple(a[:rows] for a in self.inputs), labels)

    def batches(self, size: int) -> list[list[np.ndarray]]:
        """The inputs cut into consecutive batches of at most ``size`` rows."""
        return [[a[i:i + size] for a in self.inputs] for i in range(0, len(self), size)]


def load_dataset(path: str | Path, *, what: str = "validation") -> Dataset:
    """Read ``path`` (keys above). ``what`` names the set in error messages.

    Raises ``ValueError`` naming the file, the key and the fix for a file
    without inputs, with both ``x`` and ``x0``, with a gap in ``x0, x1, ...``,
    with unknown keys, mismatched row counts, fewer than 2 rows, or
    non-integer labels.
    """
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} set {path}: not a readable .npz file ({exc})") from None
    with archive:
        data = {k: archive[k] for k in archive.files}
    unknown = sorted(k for k in data if k != "y" and not _INPUT_KEY.match(k))
    if unknown:
        raise ValueError(f"{what} set {path}: unknown key(s) {unknown}; use 'x' (or 'x0', "
                         "'x1', ... for several inputs) and optionally 'y' for labels")
    keys = [k for k in data if k != "y"]
    if not keys:
        raise ValueError(f"{what} set {path}: no input array; save the inputs under 'x'")
    if "x" in keys and len(keys) > 1:
        raise ValueError(f"{what} set {path}: has 'x' and numbered inputs {sorted(keys)}; "
                         "use 'x' alone for one input or 'x0', 'x1', ... for several")
    if "x" in keys:
        ordered = ["x"]
    else:
        ordered = [f"x{i}" for i in range(len(keys))]
        if sorted(keys) != sorted(ordered):
            raise ValueError(f"{what} set {path}: numbered inputs must be x0..x{len(keys) - 1} "
                             f"without gaps, got {sorted(keys)}")
    inputs = []
    for key in ordered:
        array = data[key]
        if array.ndim < 1:
            raise ValueError(f"{what} set {path}: '{key}' is a scalar; inputs are batch-first arrays")
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        inputs.append(np.ascontiguousarray(array))
    labels = data.get("y")
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(f"{what} set {path}: 'y' must be integer class labels of shape "
                             f"[N], got {labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
    try:
        dataset = Dataset(tuple(inputs), labels)
    except ValueError as exc:
        raise ValueError(f"{what} set {path}: {exc}") from None
    if len(dataset) < 2:
        raise ValueError(f"{what} set {path}: needs at least 2 rows, got {len(dataset)}")
    return dataset
