"""Shared fixtures: a mesh home with the bundled variants built (cached)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def built_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with the digits variants. Reuses $TIERMESH_HOME (set by `make test`) when given."""
    from mesh.variants import build_bundled

    home = Path(os.environ["TIERMESH_HOME"]) if os.environ.get("TIERMESH_HOME") else (
        tmp_path_factory.mktemp("home"))
    build_bundled(home, progress=False)
    return home


@pytest.fixture(scope="session")
def heldout():
    from mesh.variants.digits import load_heldout

    return load_heldout()
