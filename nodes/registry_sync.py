"""The mesh's registry on every node: the core holds it, every other node copies its parent's.

A node starts from whatever home it is given, empty included. If it has a
parent, it asks the parent for its registry (``GET /v1/registry``) before it
advances anything, and adopts it when it is newer than its own (atomically,
:meth:`mesh.registry.Registry.adopt`); it then pulls the artifacts it hosts
from the parent as it loads them, each verified by sha256
(:mod:`nodes.artifacts`). Every heartbeat answer carries the parent's
registry version; a child that sees a newer one pulls it again and loads
what it now hosts, without a restart, so a model registered at the core
reaches the edge within a membership interval or two per tier.

``POST /v1/registry/variants`` registers variants at a running node (the
core, normally: ``mesh models add --mesh URL``): their artifacts must be in
its store already (``PUT /v1/artifacts/{sha256}``, verified as written).
Both the registry read and the write are for mesh nodes and operators
holding the mesh key (:mod:`nodes.peers`); clients get 403.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from mesh.errors import Forbidden, InvalidInput, Unavailable
from mesh.registry import Registry, Variant
from mesh.topology.schema import KEY_HASH_PATTERN
from nodes.tasks import cancel_all

#: the node agent (nodes.agent.NodeAgent), which owns a RegistrySync: typed loosely so
#: that this module does not import the one that imports it
NodeAgent = Any

__all__ = ["RegistrySync", "routes", "REGISTRY_PATH"]

log = logging.getLogger("tiermesh.registry")

REGISTRY_PATH = "/v1/registry"
MAX_REGISTRY_BYTES = 64 * 1024 * 1024


class RegistrySync:
    """Pulls the parent's registry when it is newer. An async context manager (one task)."""

    #: How long a node with an empty registry waits for its parent at start.
    startup_wait_s: float = 60.0

    def __init__(self, agent: NodeAgent, *, parent_url: str | None,
                 session: Callable[[], aiohttp.ClientSession | None]) -> None:
        self.agent = agent
        self.parent = agent.artifacts.parent
        self.parent_url = parent_url
        self._session = session
        self._wanted = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.pulls = 0

    async def __aenter__(self) -> RegistrySync:
        self._task = asyncio.create_task(self._run(), name=f"registry:{self.agent.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_all([self._task])
        self._task = None

    def parent_has(self, version: int) -> None:
        """A heartbeat said the parent's registry is at ``version``."""
        if version > self.agent.registry.version and version > self._wanted:
            self._wanted = version
            self._wake.set()

    async def start(self) -> None:
        """Before the node serves: copy the parent's registry, waiting for the parent when
        this node has nothing at all. Raises :class:`Unavailable` naming the parent."""
        if self.parent_url is None:
            return
        empty = not self.agent.registry.variants
        deadline = asyncio.get_running_loop().time() + (self.startup_wait_s if empty else 2.0)
        while True:
            try:
                await self.pull()
                return
            except Unavailable as exc:
                if asyncio.get_running_loop().time() >= deadline:
                    if empty:
                        raise Unavailable(
                            f"{self.agent.name} has no registry and its parent {self.parent} "
                            f"({self.parent_url}) cannot be reached: {exc.message}") from None
                    log.warning("%s: serving registry version %d; parent %s: %s",
                                self.agent.name, self.agent.registry.version, self.parent,
                                exc.message)
                    return
                await asyncio.sleep(0.5)

    async def pull(self) -> bool:
        """Fetch the parent's registry and adopt it when newer; True when adopted."""
        session = self._session()
        if session is None or self.parent_url is None:
            raise Unavailable("no parent to pull the registry from")
        try:
            async with session.get(self.parent_url + REGISTRY_PATH,
                                   headers=self.agent.peers.headers(self.agent.name),
                                   timeout=aiohttp.ClientTimeout(total=10)) as resp:
                if resp.status != 200:
                    raise Unavailable(f"the parent answered {resp.status}")
                body = await resp.content.read(MAX_REGISTRY_BYTES + 1)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Unavailable(str(exc) or "the parent could not be reached") from None
        if len(body) > MAX_REGISTRY_BYTES:
            raise Unavailable("the parent's registry is larger than this node accepts")
        try:
            registry = Registry.from_document(json.loads(body))
        except ValueError as exc:
            raise Unavailable(f"the parent's registry is malformed: {exc}") from None
        self.pulls += 1
        mine = self.agent.registry
        if registry.version <= mine.version and (mine.variants or not registry.variants):
            return False
        registry.adopt(self.agent.config.home)
        await self.agent.adopt_registry(registry)
        log.info("%s: registry version %d from %s (%d variants)", self.agent.name,
                 registry.version, self.parent, len(registry.variants))
        return True

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.pull()
            except Unavailable as exc:
                log.warning("%s: registry pull from %s failed: %s", self.agent.name,
                            self.parent, exc.message)
                await asyncio.sleep(1.0)
                if self._wanted > self.agent.registry.version:
                    self._wake.set()


# --------------------------------------------------------------------------- handlers


def _require_node(request: web.Request, agent: NodeAgent) -> str:
    peer = agent.callers.of_request(request.transport, request.headers)  # cert or token
    if peer is None:
        raise Forbidden("the registry is for mesh nodes and operators (the mesh key)")
    return peer


def routes(agent: NodeAgent) -> list[web.RouteDef]:
    async def read(request: web.Request) -> web.Response:
        _require_node(request, agent)
        return web.json_response(agent.registry.to_document())

    async def register(request: web.Request) -> web.Response:
        _require_node(request, agent)
        try:
            entries = json.loads(await request.read())
        except ValueError:
            raise InvalidInput("body: a JSON list of variant entries") from None
        if not isinstance(entries, list) or not entries:
            raise InvalidInput("body: a non-empty JSON list of variant entries")
        variants: list[Variant] = []
        for i, entry in enumerate(entries):
            try:
                variants.append(Variant.from_json(entry))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise InvalidInput(f"variants[{i}]: malformed entry ({exc})") from None
        missing = [v.name for v in variants if not agent.store.verify(v.sha256)]
        if missing:
            raise InvalidInput(f"variants {', '.join(missing)}: their artifacts are not in this "
                               "node's store (PUT /v1/artifacts/SHA256 first)")
        registry = Registry.load(agent.config.home)
        coming = {v.name for v in variants}
        orphans = [f"{v.name} (base {v.base})" for v in variants
                   if v.base and v.base not in registry.variants and v.base not in coming]
        if orphans:
            raise InvalidInput(f"variants {', '.join(orphans)}: private heads whose base is not "
                               "registered here; register the base first")
        tenants = agent.config.topology.tenants
        strangers = sorted({v.tenant for v in variants if v.tenant and v.tenant not in tenants})
        if strangers:
            raise InvalidInput(f"tenant {', '.join(map(repr, strangers))}: not a tenant of this "
                               f"mesh's topology ({', '.join(sorted(tenants)) or 'none declared'})")
        for variant in variants:
            registry.add(variant)
        registry.save(agent.config.home)
        await agent.adopt_registry(registry)
        return web.json_response({"version": registry.version,
                                  "registered": [v.name for v in variants]})

    async def remove(request: web.Request) -> web.Response:
        """Remove a model (every variant of one family) from the running mesh: here, and
        from here down the tree with the registry; nodes unload its variants once idle."""
        _require_node(request, agent)
        family = request.match_info["family"]
        registry = Registry.load(agent.config.home)
        try:
            gone = registry.remove_model(family)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        registry.save(agent.config.home)
        await agent.adopt_registry(registry)
        return web.json_response({"version": registry.version, "removed": gone})

    async def keys(request: web.Request) -> web.Response:
        """Add a tenant's API key (its hash) or revoke one, on the running mesh: at the core,
        and from there down the tree with the registry. For nodes and operators only."""
        if agent.callers.of_request(request.transport, request.headers) is None \
                and not agent.tenancy.is_operator(request.headers.get("Authorization")):
            raise Forbidden("API keys are managed by operators (an operator key, the mesh key, "
                            "or a node certificate)")
        try:
            body = json.loads(await request.read())
        except ValueError:
            raise InvalidInput("body: JSON {tenant, key_hash} or {revoke: key_hash}") from None
        if not isinstance(body, dict):
            raise InvalidInput("body: JSON {tenant, key_hash} or {revoke: key_hash}")
        registry = Registry.load(agent.config.home)
        if "revoke" in body:
            registry.revoke_key(_key_hash(body["revoke"], "revoke"))
            done = "revoked"
        else:
            tenant = body.get("tenant")
            known = sorted(agent.config.topology.tenants)
            if tenant not in known:
                raise InvalidInput(f"tenant: {str(tenant)[:64]!r} is not a tenant of this "
                                   f"mesh's topology ({', '.join(known) or 'none declared'})")
            registry.add_key(_key_hash(body.get("key_hash"), "key_hash"), tenant)
            done = "added"
        registry.save(agent.config.home)
        await agent.adopt_registry(registry)
        return web.json_response({"version": registry.version, "key": done})

    async def upload(request: web.Request) -> web.Response:
        _require_node(request, agent)
        sha256 = request.match_info["sha256"]
        stored = await agent.artifacts.receive(sha256, request.content)
        return web.json_response({"sha256": sha256, "bytes": stored})

    return [web.get(REGISTRY_PATH, read), web.post(REGISTRY_PATH + "/variants", register),
            web.post(REGISTRY_PATH + "/keys", keys),
            web.delete(REGISTRY_PATH + "/models/{family}", remove),
            web.put("/v1/artifacts/{sha256}", upload)]


def _key_hash(value: Any, field: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(KEY_HASH_PATTERN, value):
        raise InvalidInput(f"{field}: an API key's hash ('sha256:' and 64 hex digits; "
                           "`mesh tenants new-key` prints one), never the key itself")
    return value
