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


#: the tenants demonstration: two tenants' topic classifiers on the shared MiniLM encoder
HEAD_TOPICS = {"acme": ("weather", "travel", "sport", "health", "finance"),
               "globex": ("cooking", "computing", "animals", "home", "science", "music and art")}
HEAD_BASES = ("minilm-onnx-fp32", "minilm-onnx-int8-dynamic")


@pytest.fixture(scope="session")
def heads_home(built_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with two MiniLM variants and each tenant's private head on them
    (``acme-topics``, ``globex-topics``; tasks of the same names, private to their tenant)."""
    from mesh.registry import Registry
    from mesh.store import ArtifactStore
    from mesh.variants.heads import register_head
    from mesh.variants.topics import topic_head

    registry = Registry.load(built_home)
    source = ArtifactStore(built_home / "store")
    home = tmp_path_factory.mktemp("heads")
    store = ArtifactStore(home / "store")
    keep = Registry({n: v for n, v in registry.variants.items() if n in HEAD_BASES})
    for variant in keep.variants.values():
        store.put_bytes(source.read(variant.sha256))
        for sha in variant.assets.values():
            store.put_bytes(source.read(sha))
    keep.save(home)
    quick = {"warmup": 1, "min_repeats": 3, "budget_s": 0.01, "memory": False}
    for tenant, topics in HEAD_TOPICS.items():
        head, validation = topic_head(home, topics)
        register_head(home, f"{tenant}-topics", task=f"{tenant}-topics", base="minilm",
                      head=head, validation=validation, tenant=tenant, progress=False,
                      profile_options=quick)
    return home
