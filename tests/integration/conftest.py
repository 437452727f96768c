"""Integration fixtures: a live local mesh from topologies/local.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.testbed.local import LocalMesh

LOCAL = Path(__file__).resolve().parents[2] / "topologies" / "local.yaml"


@pytest.fixture(scope="module")
def mesh(built_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """topologies/local.yaml running on loopback; one per test module, stopped after it."""
    with LocalMesh(LOCAL, home=built_home, run_dir=tmp_path_factory.mktemp("run"),
                   use_addresses=False) as m:
        yield m
