"""A content-addressed artifact store: every file is named by its sha256.

Layout under the store root: ``ab/abcdef...`` (two-character fan-out). Writes
go to a temporary file, are fsynced and renamed into place (:mod:`mesh.durable`),
so a reader never sees a half-written artifact and a crash never leaves one
under its name. Opening a store removes the temporary files of writes (puts
and pulls) that died half-way; files other processes are still writing are
left alone. :meth:`ArtifactStore.verify` re-hashes a file; a copy that does
not match its name is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mesh.durable import PendingFile, remove_stale_temps

__all__ = ["ArtifactStore", "sha256_bytes", "sha256_file"]

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore:
    """Artifacts under ``root`` by sha256. Opening it cleans up after writers that died."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        #: temporary files of dead writers removed when this store was opened
        self.cleaned: list[Path] = self.remove_partials()

    def remove_partials(self) -> list[Path]:
        """Remove partial writes (puts, pulls) no live process holds; return what went."""
        if not self.root.is_dir():
            return []
        removed = remove_stale_temps(self.root)
        for fan in sorted(self.root.iterdir()):
            if fan.is_dir() and len(fan.name) == 2:
                removed += remove_stale_temps(fan)
        return removed

    def pending(self, sha256: str) -> PendingFile:
        """A new copy of ``sha256`` to write; ``commit()`` puts it in place durably."""
        return PendingFile(self.path(sha256))

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; return its sha256. Storing intact bytes again is a no-op."""
        sha = sha256_bytes(data)
        if self.verify(sha):
            return sha  # an intact copy is already here; a damaged one is replaced below
        with self.pending(sha) as pending:
            pending.write(data)
            pending.commit()
        return sha

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def verify(self, sha256: str) -> bool:
        """True when the stored copy exists and hashes to its name."""
        path = self.path(sha256)
        return path.is_file() and sha256_file(path) == sha256
