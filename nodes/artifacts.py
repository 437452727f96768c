"""Variant artifacts on a node: its own store, pulled through its parent by sha256.

A node that needs an artifact it lacks (or whose copy no longer hashes to its
name) asks its *parent*, the neighbour on the lowest-latency path towards the
nearest core node, with ``GET /v1/artifacts/{sha256}``. The parent serves it
from its own store, pulling it from its parent first when it lacks it too, so
an artifact flows down the tree once per node. Every copy is hashed while it
streams in and written durably (:mod:`mesh.durable`); one that does not hash
to its name (corrupt, truncated) is refused and fetched again, up to
``attempts`` times. Concurrent requests for one artifact share one pull.

Who gets what (:class:`PullPolicy`): a node pulls and keeps, for itself,
only the artifacts of the variants the mesh places on it. It serves an
artifact only to a pull from one of its *children* (a neighbour whose parent
it is) that proved it is a mesh node (the pull carries the node's name and
peer token, :mod:`nodes.peers`), that comes from that neighbour's address,
and only when the child hosts a variant with that artifact or some node
that pulls through the child does. So an intermediate node pulls through,
and keeps, what the edge nodes below it host, and nothing else; a client,
or a node asking for what it has no use for, gets a 403 naming the reason
and nothing is pulled or stored. With TLS the pull comes over mutual TLS and
the child's certificate proves who it is (``by_certificate``), wherever it
connects from; without TLS (loopback) it carries the mesh-key token and must
come from the child's address, so that a leaked token is useless elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import ssl as _ssl
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Executor
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from mesh.certs import with_tls
from mesh.errors import ArtifactNotFound, Forbidden, InvalidInput, Unavailable
from mesh.registry import Variant
from mesh.store import ArtifactStore
from mesh.topology import Topology
from nodes.tasks import cancel_all

__all__ = ["ArtifactSource", "PullPolicy", "parent_of", "check_sha256"]

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


class PullPolicy:
    """Which artifacts a node keeps for itself, and which child may pull which. Pure.

    Built from the topology and the registry's variants; what it computes
    about the pull tree is kept, so checks after the first are dictionary
    look-ups.
    """

    def __init__(self, topology: Topology, node: str, variants: Iterable[Variant],
                 hosts: Callable[[str, str], bool] | None = None) -> None:
        """``hosts(node, variant)``: what each node hosts (the mesh's placement); default:
        what each node's allow/deny lists let in."""
        self.topology = topology
        self.node = node
        self._hosts = hosts or (lambda n, v: topology.nodes[n].allows(v, bases.get(v, "")))
        #: artifact -> the variants that need it: its own, and the private heads whose base
        #: it is (a node hosting a head loads the base's artifact too)
        self._names: dict[str, list[str]] = {}
        variants = list(variants)
        by_name = {v.name: v for v in variants}
        bases = {v.name: v.base for v in variants if v.base}
        for variant in variants:
            self._names.setdefault(variant.sha256, []).append(variant.name)
            base = by_name.get(variant.base) if variant.base else None
            if base is not None:
                self._names.setdefault(base.sha256, []).append(variant.name)
        self._parents: dict[str, str | None] = {}
        self._pullers: dict[str, frozenset[str]] = {}

    def hosted(self) -> frozenset[str]:
        """The artifacts of the variants this node may host: all it pulls for itself."""
        return frozenset(sha for sha, names in self._names.items()
                         if any(self._hosts(self.node, n) for n in names))

    def parent(self, node: str) -> str | None:
        if node not in self._parents:
            self._parents[node] = parent_of(self.topology, node)
        return self._parents[node]

    def pullers(self, node: str) -> frozenset[str]:
        """``node`` and every node whose pulls pass through it (its subtree in the pull tree)."""
        found = self._pullers.get(node)
        if found is None:
            out, stack = {node}, [node]
            while stack:
                here = stack.pop()
                for child in self.topology.neighbours(here):
                    if child not in out and self.parent(child) == here:
                        out.add(child)
                        stack.append(child)
            found = self._pullers[node] = frozenset(out)
        return found

    def check(self, requester: str | None, sha256: str) -> None:
        """Whether ``requester`` (a proven mesh node, or None) may pull ``sha256`` from here.

        Raises :class:`Forbidden` saying why not, or :class:`ArtifactNotFound`
        for a hash no registered variant has.
        """
        if requester is None:
            raise Forbidden("artifacts are served only to the pulls of this node's neighbours, "
                            "which name themselves with a mesh peer token; this request has none")
        if requester not in self.topology.nodes or \
                requester not in self.topology.neighbours(self.node):
            raise Forbidden(f"node {requester!r} is not a neighbour of {self.node}; "
                            "artifacts are pulled from the parent only")
        if self.parent(requester) != self.node:
            raise Forbidden(f"{requester} pulls its artifacts from "
                            f"{self.parent(requester) or 'nowhere (it is a core node)'}, "
                            f"not from {self.node}")
        names = self._names.get(sha256)
        if not names:
            raise ArtifactNotFound(f"no registered variant has artifact {sha256[:12]}")
        below = self.pullers(requester)
        if not any(self._hosts(n, name) for n in below for name in names):
            raise Forbidden(f"{requester} hosts no variant with artifact {sha256[:12]}, and no "
                            "node that pulls through it does")


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
                 on_fetch: Callable[[str], None] | None = None,
                 policy: PullPolicy | None = None,
                 neighbour_urls: Mapping[str, str] | None = None,
                 pull_headers: Mapping[str, str] | None = None,
                 ssl: _ssl.SSLContext | None = None) -> None:
        """``known``: the artifacts this node pulls for itself (those of the variants it
        hosts). ``policy`` decides which child may pull what from here (None: nobody);
        ``neighbour_urls`` are the neighbours' URLs, whose hosts are the only addresses a
        pull is taken from; ``pull_headers`` name this node (and prove it) on its own pulls.
        ``ssl``: pull over TLS with this context (the node's client context).
        """
        self.store = store
        self.parent = parent
        self.parent_url = with_tls(parent_url) if parent_url and ssl is not None else parent_url
        self._ssl: _ssl.SSLContext | bool = ssl if ssl is not None else True
        self.policy = policy
        self._known = known
        self._http = http
        self._executor = executor
        self._on_fetch = on_fetch
        self._neighbour_urls = dict(neighbour_urls or {})
        self._pull_headers = dict(pull_headers or {})
        self._addresses: dict[str, frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
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
        await cancel_all(list(self._pulls.values()))
        self._pulls.clear()

    def forget(self, sha256: str) -> None:
        """Stop trusting the local copy (it failed to load); the next ensure re-hashes it."""
        self._verified.discard(sha256)

    def use_policy(self, policy: PullPolicy) -> None:
        """A new registry: what this node hosts and serves follows it from now on."""
        self.policy = policy
        self._known = policy.hosted

    async def receive(self, sha256: str, content: aiohttp.StreamReader, *,
                      max_bytes: int = 8 << 30) -> int:
        """Store an uploaded artifact (an operator registering a model here), verified by
        its sha256 as it is written; returns its size. Raises :class:`InvalidInput` when the
        bytes do not hash to ``sha256`` (nothing is kept) or exceed ``max_bytes``."""
        check_sha256(sha256)
        digest = hashlib.sha256()
        size = 0
        with self.store.pending(sha256) as pending:
            async for chunk in content.iter_chunked(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    raise InvalidInput(f"artifact {sha256[:12]}: over {max_bytes} bytes")
                digest.update(chunk)
                pending.write(chunk)
            if digest.hexdigest() != sha256:
                raise InvalidInput(f"artifact {sha256[:12]}: the {size} bytes sent hash to "
                                   f"{digest.hexdigest()[:12]}, not to their name")
            await asyncio.get_running_loop().run_in_executor(self._executor, pending.commit)
        self._verified.add(sha256)
        return size

    async def ensure(self, sha256: str) -> Path:
        """The path of a verified local copy of an artifact this node hosts, pulled when needed.

        Raises :class:`ArtifactNotFound` for a hash of no variant this node
        hosts (nothing is pulled), or when there is no parent to ask;
        :class:`Unavailable` when the parent could not deliver an intact copy.
        """
        check_sha256(sha256)
        path = self.store.path(sha256)
        if sha256 in self._verified and path.is_file():
            return path
        if sha256 not in self._known():
            raise ArtifactNotFound(f"no variant this node hosts has artifact {sha256[:12]}")
        return await self._local_copy(sha256)

    async def serve(self, sha256: str, *, requester: str | None, remote: str | None,
                    by_certificate: bool = False) -> Path:
        """The local copy to send to a pull from ``requester`` at address ``remote``.

        ``requester`` is the mesh node the request proved it comes from (None:
        a client); ``by_certificate``: proved by its TLS certificate, so where it
        connects from does not matter (a token must come from the requester's
        address). Everything is checked before anything is pulled: raises
        :class:`InvalidInput` for a malformed hash, :class:`Forbidden` when
        the requester may not have it (see :class:`PullPolicy`) or the request
        does not come from the requester's address, :class:`ArtifactNotFound`
        for an unknown hash; then as :meth:`ensure`.
        """
        check_sha256(sha256)
        if self.policy is None:
            raise Forbidden("this node serves no artifacts")
        self.policy.check(requester, sha256)
        assert requester is not None  # the policy refuses anonymous pulls
        if not by_certificate:
            await self._check_address(requester, remote)
        path = self.store.path(sha256)
        if sha256 in self._verified and path.is_file():
            return path
        return await self._local_copy(sha256)

    async def _check_address(self, requester: str, remote: str | None) -> None:
        allowed = self._addresses.get(requester)
        if allowed is None:
            url = self._neighbour_urls.get(requester)
            host = urlsplit(url).hostname if url else None
            if not host:
                raise Forbidden(f"this node has no address for its neighbour {requester}, so it "
                                "takes no pulls from it (the run file lists no URL for it)")
            allowed = await _resolve(host)
            if allowed:  # a name that does not resolve now may resolve later
                self._addresses[requester] = allowed
        if _ip(remote) not in allowed:
            raise Forbidden(f"this pull names {requester} but does not come from its address")

    def _local_copy(self, sha256: str) -> asyncio.Future[Path]:
        task = self._pulls.get(sha256)
        if task is None:
            task = asyncio.create_task(self._obtain(sha256), name=f"artifact:{sha256[:12]}")
            self._pulls[sha256] = task
            task.add_done_callback(lambda _t, s=sha256: self._pulls.pop(s, None))
        return asyncio.shield(task)

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
        """Stream one copy from the parent, hashing it; keep it (durably) only if it verifies."""
        session = self._http()
        if session is None:
            raise Unavailable("no HTTP session to reach the parent (agent not started)")
        digest = hashlib.sha256()
        with self.store.pending(sha256) as pending:
            async with session.get(f"{self.parent_url}/v1/artifacts/{sha256}",
                                   headers=self._pull_headers, ssl=self._ssl) as resp:
                if resp.status == 404:
                    raise ArtifactNotFound(f"parent {self.parent} has no artifact {sha256[:12]}")
                if resp.status == 403:
                    raise ArtifactNotFound(f"parent {self.parent} refused artifact {sha256[:12]}: "
                                           f"{await _reason(resp)}")
                if resp.status != 200:
                    raise Unavailable(f"parent {self.parent} answered HTTP {resp.status}")
                async for chunk in resp.content.iter_chunked(1 << 16):
                    digest.update(chunk)
                    pending.write(chunk)
            if digest.hexdigest() != sha256:
                return False
            # fsync of tens of megabytes: off the event loop
            await asyncio.get_running_loop().run_in_executor(self._executor, pending.commit)
            return True


async def _reason(resp: aiohttp.ClientResponse) -> str:
    try:
        body = await resp.json(content_type=None)
        return str(body["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        return f"HTTP {resp.status}"


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # an IPv4 peer on a dual-stack socket
    return address


async def _resolve(host: str) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address ``host`` (a name or a literal) resolves to; empty when it does not."""
    literal = _ip(host.strip("[]"))
    if literal is not None:
        return frozenset({literal})
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None)
    except OSError:
        return frozenset()
    return frozenset(a for a in (_ip(str(info[4][0])) for info in infos) if a is not None)
