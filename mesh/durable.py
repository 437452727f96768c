"""Atomic, durable files: everything Tiermesh writes under a mesh home goes through here.

A write goes to a temporary file in the target's own directory (named
``.tmp-<name>-<random>``), is flushed and fsynced, renamed over the target and
the directory is fsynced, so that after a crash the target holds either the
old contents or the new ones, never a mix or nothing, and the rename itself
survives a power cut.

While a temporary file is being written its writer holds an exclusive
``flock`` on it. :func:`remove_stale_temps` removes only temporary files
nobody holds (left by a process that died mid-write), so it is safe to run
while other processes write into the same directory (the testbed's nodes
share one store).

:func:`locked` serialises read-modify-write cycles across processes with an
exclusive ``flock`` on a lock file; the kernel drops it when its holder dies,
so a crashed writer never wedges the others. Linux and other POSIX systems
only (``fcntl``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

__all__ = ["PendingFile", "write_atomic", "fsync_dir", "make_dirs", "locked",
           "remove_stale_temps", "TEMP_PREFIX"]

#: Every temporary file this module creates starts with this.
TEMP_PREFIX = ".tmp-"
#: Prefixes of temporary files older Tiermesh versions left behind (cleaned as well).
_LEGACY_PREFIXES = (".pull-", ".registry-", ".profile-")


def fsync_dir(directory: str | Path) -> None:
    """fsync a directory, so that a rename or unlink in it is on disk. Raises ``OSError``."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: str | Path) -> None:
    """``mkdir -p``, fsyncing the parent of every directory it creates, so that it stays."""
    missing: list[Path] = []
    here = Path(directory)
    while not here.is_dir():
        missing.append(here)
        here = here.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            continue  # another writer made it (and fsyncs its parent)
        fsync_dir(new.parent)


class PendingFile:
    """A new version of ``target``, written to a locked temporary file beside it.

    ``commit()`` makes it durable and renames it into place; leaving the
    ``with`` block without committing (or on an exception) removes the
    temporary file and leaves ``target`` as it was. Raises ``OSError`` when
    the directory is not writable or the disk is full.
    """

    def __init__(self, target: str | Path) -> None:
        self.target = Path(target)
        make_dirs(self.target.parent)
        self._file, self.temp = _locked_temp(self.target)
        self.committed = False

    @property
    def file(self) -> BinaryIO:
        return self._file

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self) -> Path:
        """fsync the data, rename it over the target, fsync the directory; return the target."""
        self._file.flush()
        os.fsync(self._file.fileno())
        os.replace(self.temp, self.target)
        self.committed = True
        self._file.close()  # drops the flock; the name it guarded is gone
        fsync_dir(self.target.parent)
        return self.target

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        if not self.committed:
            self.temp.unlink(missing_ok=True)

    def __enter__(self) -> PendingFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.discard()


def _locked_temp(target: Path) -> tuple[BinaryIO, Path]:
    """A new temporary file beside ``target``, open and exclusively flocked by us."""
    while True:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{target.name}-")
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A cleaner may have locked and removed the name between mkstemp and flock; then
        # the name no longer leads to our file and we start again with a fresh one.
        try:
            same = os.stat(name).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return os.fdopen(fd, "wb"), Path(name)
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` atomically and durably; return the path. Raises ``OSError``."""
    with PendingFile(path) as pending:
        pending.write(data.encode() if isinstance(data, str) else data)
        return pending.commit()


@contextlib.contextmanager
def locked(lock_path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if missing) for the ``with`` block.

    Blocks until every other holder, in any process, has left its block.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove temporary files in ``directory`` that no live writer holds; return them.

    A file some process is still writing is left alone (its flock is held).
    A missing directory has nothing to clean.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith((TEMP_PREFIX, *_LEGACY_PREFIXES)):
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # its writer committed or discarded it meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue  # being written right now
                raise
            # Holding its lock: nobody writes it, and a writer that locks it after us
            # notices the name is gone (see _locked_temp).
            with contextlib.suppress(FileNotFoundError):
                if os.stat(entry.path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
        finally:
            os.close(fd)
    if removed:
        fsync_dir(directory)
    return removed
