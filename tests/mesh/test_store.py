"""The content-addressed store refuses copies that do not hash to their name."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.store import ArtifactStore, sha256_bytes


def test_put_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    sha = store.put_bytes(b"model bytes")
    assert sha == sha256_bytes(b"model bytes")
    assert store.path(sha) == tmp_path / sha[:2] / sha
    assert store.put_bytes(b"model bytes") == sha
    assert store.read(sha) == b"model bytes" and store.verify(sha)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_corrupt_copy_is_refused_and_a_fresh_put_repairs_it(tmp_path: Path, damage: str) -> None:
    store = ArtifactStore(tmp_path)
    data = bytes(range(256)) * 64
    sha = store.put_bytes(data)
    path = store.path(sha)
    if damage == "flip":
        path.write_bytes(b"\xff" + data[1:])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")
    assert store.has(sha)  # the file is there...
    assert not store.verify(sha)  # ...but it is refused
    assert store.put_bytes(data) == sha  # fetching it again replaces the damaged copy
    assert store.verify(sha) and store.read(sha) == data


def test_missing_artifacts_and_bad_names(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    assert not store.verify("0" * 64) and not store.has("0" * 64)
    with pytest.raises(ValueError, match="not a sha256"):
        store.path("../../etc/passwd")
