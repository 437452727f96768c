"""Small real models and datasets for the variant factory tests (built once per session)."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Profiling settings that keep a test run short; the measurements stay real.
FAST_PROFILE = {"warmup": 1, "min_repeats": 2, "repeats": 20, "budget_s": 0.005, "memory": False}
ONE_CLASS = {"cpu-1t": 1}

TINY_MODELS = textwrap.dedent('''
    """Factories importable as 'tiny_models:NAME' (module:factory submissions)."""
    import torch
    from torch import nn


    def mlp():
        """64 -> 32 -> 10 logits (untrained; weights come from a state dict)."""
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


    def broken():
        return "not a module"
''')


@pytest.fixture(scope="session")
def register():
    """``register_model`` with one hardware class, short profiling and no progress bars."""
    from mesh.variants.factory import register_model

    def call(home: Path, name: str, **kwargs: Any):
        kwargs.setdefault("profile_keys_threads", ONE_CLASS)
        kwargs.setdefault("profile_options", FAST_PROFILE)
        kwargs.setdefault("progress", False)
        return register_model(home, name, **kwargs)

    return call


@dataclass(frozen=True)
class DigitsData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    val_npz: Path
    train_npz: Path
    unlabelled_npz: Path


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> DigitsData:
    from mesh.variants.digits import load_split

    x_tr, y_tr, x_val, y_val = load_split()
    root = tmp_path_factory.mktemp("digits-npz")
    np.savez(root / "val.npz", x=x_val, y=y_val)
    np.savez(root / "train.npz", x=x_tr, y=y_tr)
    np.savez(root / "unlabelled.npz", x=x_val)
    return DigitsData(x_tr, y_tr, x_val, y_val, root / "val.npz", root / "train.npz",
                      root / "unlabelled.npz")


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder on sys.path holding ``tiny_models.py``."""
    root = tmp_path_factory.mktemp("tiny-models")
    (root / "tiny_models.py").write_text(TINY_MODELS)
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("tiny_models", None)


@pytest.fixture(scope="session")
def trained_mlp(digits_data: DigitsData, tiny_models_dir: Path):
    """``tiny_models.mlp()`` trained on the digits (seeded), in eval mode, and its state dict file."""
    import tiny_models  # type: ignore[import-not-found]
    import torch

    torch.manual_seed(0)
    model = tiny_models.mlp()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(digits_data.x_train), torch.from_numpy(digits_data.y_train)
    for _ in range(150):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    model.eval()
    weights = tiny_models_dir / "mlp_state.pt"
    torch.save(model.state_dict(), weights)
    return model, weights
