"""The content-addressed store refuses copies that do not hash to their name."""

from __future__ import annotations

import os
import subprocess
import sys
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


_HALF_WRITER = """
import sys
from mesh.store import ArtifactStore
pending = ArtifactStore(sys.argv[1]).pending("ab" * 32)
pending.write(b"half of a model")
print(pending.temp, flush=True)
sys.stdin.readline()  # killed while still writing
"""


def test_opening_a_store_removes_dead_writers_partials_and_keeps_live_ones(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    sha = store.put_bytes(b"intact model")
    # a pull and a put that died half-way (a node killed mid-download); nobody holds them
    dead = [tmp_path / sha[:2] / ".pull-abc123", tmp_path / sha[:2] / f".tmp-{sha}-x1y2"]
    for path in dead:
        path.write_bytes(b"truncated")
    opened = ArtifactStore(tmp_path)
    assert not any(path.exists() for path in dead)
    assert sorted(opened.cleaned) == sorted(dead)

    root = str(Path(__file__).resolve().parents[2])
    writer = subprocess.Popen([sys.executable, "-c", _HALF_WRITER, str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=root))
    try:
        assert writer.stdout is not None
        live = Path(writer.stdout.readline().strip())
        assert live.is_file()
        assert ArtifactStore(tmp_path).cleaned == [] and live.is_file()  # still being written
    finally:
        writer.kill()
        writer.wait()
        assert writer.stdout is not None and writer.stdin is not None
        writer.stdout.close()
        writer.stdin.close()
    assert ArtifactStore(tmp_path).cleaned == [live] and not live.exists()
    assert ArtifactStore(tmp_path).read(sha) == b"intact model"
    assert not store.has("ab" * 32)  # the half-written copy never took its name
