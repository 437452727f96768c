"""Variant artifacts on a node: its own store, pulled through its parent by sha256.

A node that needs an artifact it lacks (or whose copy no longer hashes to its
name) asks its *parent*, the neighbour on the lowest-latency path towards the
nearest core node, with ``GET /v1/artifacts/{sha256}``. The parent serves it
from its own store, pulling it from its parent first when it lacks it too, so
an artifact flows down the tree once per node. Every copy is hashed while it
streams in; one that does not hash to its name (corrupt, truncated) is
refused and fetched again, up to ``attempts`` times. Concurrent requests for
one artifact share one pull.

Only artifacts of registered variants are served or pulled: a request for any
other hash is answered :class:`~mesh.errors.ArtifactNotFound` without
touching the parent.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Collection
from concurrent.futures import Executor
from pathlib import Path

import aiohttp

from mesh.errors import ArtifactNotFound, InvalidInput, Unavailable
from mesh.store import ArtifactStore
from mesh.topology import Topology

__all__ = ["ArtifactSource", "parent_of", "check_sha256"]

log = logging.getLogger("tiermesh.artifacts")

_HEX = frozenset("0123456789abcdef")


def check_sha256(sha256: str) -> str:
    """``sha256`` if it is 64 lower-case hex digits; else :class:`InvalidInput`."""
    if len(sha256) != 64 or not _HEX.issuperset(sha256):
        raise InvalidInput(f"sha256: expected 64 lower-case hex digits, got {sha256[:80]!r}")
    return sha256


def parent_of(topology: Topology, node: str) -> str | None:
    """The neighbour towards the nearest core node; None on a core node or with no core in reach."""
    if topology.nodes[node].tier == "core":
        return None
    paths = topology.paths_from(node)
    cores = sorted((p.latency_ms, name) for name, p in paths.items()
                   if name != node and topology.nodes[name].tier == "core")
    if not cores:
        return None
    return paths[cores[0][1]].hops[1]


class ArtifactSource:
    """Verified local copies of artifacts, pulled from the parent on first need."""

    #: Pull attempts before giving up on one artifact.
    attempts: int = 3
    #: Pause between attempts, in seconds (doubles each time).
    backoff_s: float = 0.05

    def __init__(self, store: ArtifactStore, *, known: Callable[[], Collection[str]],
                 parent: str | None = None, parent_url: str | None = None,
                 http: Callable[[], aiohttp.ClientSession | None] = lambda: None,
                 executor: Executor | None = None,
                 on_fetch: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.parent = parent
        self.parent_url = parent_url
        self._known = known
        self._http = http
        self._executor = executor
        self._on_fetch = on_fetch
        self._verified: set[str] = set()
        self._pulls: dict[str, asyncio.Task[Path]] = {}
        #: "ok" / "corrupt" / "failed" -> count, for status and metrics.
        self.fetches: dict[str, int] = {"ok": 0, "corrupt": 0, "failed": 0}

    def _count(self, outcome: str) -> None:
        self.fetches[outcome] += 1
        if self._on_fetch is not None:
            self._on_fetch(outcome)

    async def aclose(self) -> None:
        """Cancel and await pulls still in flight."""
        tasks = list(self._pulls.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pulls.clear()

    def forget(self, sha256: str) -> None:
        """Stop trusting the local copy (it failed to load); the next ensure re-hashes it."""
        self._verified.discard(sha256)

    async def ensure(self, sha256: str) -> Path:
        """The path of a verified local copy, pulling it from the parent when needed.

        Raises :class:`ArtifactNotFound` for a hash no registered variant has,
        or when there is no parent to ask; :class:`Unavailable` when the
        parent could not deliver an intact copy.
        """
        check_sha256(sha256)
        path = self.store.path(sha256)
        if sha256 in self._verified and path.is_file():
            return path
        if sha256 not in self._known():
            raise ArtifactNotFound(f"no registered variant has artifact {sha256[:12]}")
        task = self._pulls.get(sha256)
        if task is None:
            task = asyncio.create_task(self._obtain(sha256), name=f"artifact:{sha256[:12]}")
            self._pulls[sha256] = task
            task.add_done_callback(lambda _t, s=sha256: self._pulls.pop(s, None))
        return await asyncio.shield(task)

    async def _obtain(self, sha256: str) -> Path:
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(self._executor, self.store.verify, sha256):
            self._verified.add(sha256)
            return self.store.path(sha256)
        if self.parent_url is None:
            raise ArtifactNotFound(
                f"artifact {sha256[:12]} is missing or corrupt here and this node has no parent "
                "to fetch it from; rebuild the variants ('mesh build')")
        problem = "no attempt made"
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                if await self._download(sha256):
                    self._count("ok")
                    self._verified.add(sha256)
                    log.info("fetched artifact %s from %s", sha256[:12], self.parent)
                    return self.store.path(sha256)
                self._count("corrupt")
                problem = "the copy received did not hash to its name (corrupt or truncated)"
            except ArtifactNotFound:
                self._count("failed")
                raise
            except (TimeoutError, aiohttp.ClientError, Unavailable) as exc:
                self._count("failed")
                problem = getattr(exc, "message", None) or type(exc).__name__
            log.warning("artifact %s from %s, attempt %d/%d: %s", sha256[:12], self.parent,
                        attempt, self.attempts, problem)
            if attempt < self.attempts:
                await asyncio.sleep(delay)
                delay *= 2
        raise Unavailable(
            f"artifact {sha256[:12]} could not be fetched intact from {self.parent} after "
            f"{self.attempts} attempts: {problem}", retry_after_s=1.0)

    async def _download(self, sha256: str) -> bool:
        """Stream one copy from the parent, hashing it; keep it only if it verifies."""
        session = self._http()
        if session is None:
            raise Unavailable("no HTTP session to reach the parent (agent not started)")
        target = self.store.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".pull-")
        try:
            with os.fdopen(fd, "wb") as fh:
                async with session.get(f"{self.parent_url}/v1/artifacts/{sha256}") as resp:
                    if resp.status == 404:
                        raise ArtifactNotFound(f"parent {self.parent} has no artifact {sha256[:12]}")
                    if resp.status != 200:
                        raise Unavailable(f"parent {self.parent} answered HTTP {resp.status}")
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        digest.update(chunk)
                        fh.write(chunk)
            if digest.hexdigest() != sha256:
                return False
            os.replace(tmp, target)
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)
