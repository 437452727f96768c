"""What a client needs to answer on its own device (:mod:`mesh.device`), served by any node.

Routes::

    GET /v1/device/{task}                       the task's device variant, described (JSON):
        ?formats=onnx,tflite&max_bytes=N        name, format, sha256, size, accuracy, specs
    GET /v1/device/{task}/artifacts/{sha256}    its file, from this node's store

The variant is :func:`mesh.device.choose`'s: among the task's variants in a
format the client can run, for a CPU, of at most ``max_bytes`` (and never
over :data:`~mesh.device.MAX_DEVICE_BYTES`), the most accurate, then the
smallest. Only the artifacts of such device-eligible variants are served to
clients; every other artifact is served only to child nodes
(``/v1/artifacts``, :mod:`nodes.artifacts`).

Errors: an unknown task is 404 naming it (and the known ones), a task with
nothing a device can run is 404 saying so, a sha256 that is not a device
variant of the task is 404, and a device variant whose artifact this node
does not hold (it pulls only what it hosts) is 404 pointing at a core node.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from mesh.device import DEVICE_FORMATS, MAX_DEVICE_BYTES, DeviceVariant, choose, eligible
from mesh.errors import ArtifactNotFound, InvalidInput
from nodes.agent import NodeAgent
from nodes.artifacts import check_sha256

__all__ = ["routes"]


def _formats(request: web.Request) -> tuple[str, ...]:
    text = request.query.get("formats")
    if text is None:
        return tuple(DEVICE_FORMATS)
    formats = tuple(f for f in text.split(",") if f)
    unknown = [f for f in formats if f not in DEVICE_FORMATS]
    if unknown or not formats:
        raise InvalidInput(f"formats: {text[:80]!r}; a device runs "
                           f"{', '.join(DEVICE_FORMATS)} (comma-separated)")
    return formats


def _max_bytes(request: web.Request) -> int:
    text = request.query.get("max_bytes")
    if text is None:
        return MAX_DEVICE_BYTES
    if not text.isdigit() or int(text) < 1:
        raise InvalidInput(f"max_bytes: a positive number of bytes, got {text[:40]!r}")
    return min(int(text), MAX_DEVICE_BYTES)


def routes(agent: NodeAgent) -> list[web.RouteDef]:
    """The device routes over ``agent``'s registry and store (read at each request: the
    registry is replaced when the mesh's changes)."""

    def visible_task(request: web.Request) -> str:
        """The task in the path, as this caller may see it: on a mesh with tenants a key is
        needed (401) and another tenant's private task does not exist (404)."""
        task = request.match_info["task"]
        agent.check_visible(task, agent.tenancy.authenticate(request.headers.get("Authorization")))
        return task

    async def describe(request: web.Request) -> web.Response:
        task = visible_task(request)
        variants = agent.registry.for_task(task)
        formats, max_bytes = _formats(request), _max_bytes(request)
        chosen = choose(variants, formats=formats, max_bytes=max_bytes)
        if chosen is None:
            raise ArtifactNotFound(
                f"task {task!r} has no variant a device can run: none is a whole model (not "
                f"a head on a shared base) in {' or '.join(formats)}, for a CPU, and at most "
                f"{max_bytes} bytes")
        return web.json_response(DeviceVariant.of(chosen).to_json())

    async def artifact(request: web.Request) -> web.FileResponse:
        task = visible_task(request)
        sha256 = check_sha256(request.match_info["sha256"])
        found = [v for v in agent.registry.for_task(task)
                 if v.sha256 == sha256 and eligible(v)]
        if not found:
            raise ArtifactNotFound(f"no device variant of task {task!r} has artifact "
                                   f"{sha256[:12]} (GET /v1/device/{task} names it)")
        # hashed before it is served: a damaged copy is never handed to a device
        intact = await asyncio.get_running_loop().run_in_executor(None, agent.store.verify, sha256)
        if not intact:
            raise ArtifactNotFound(f"this node does not hold device variant {found[0].name} "
                                   "(a node keeps only what it hosts); ask a core node, which "
                                   "holds every variant")
        return web.FileResponse(agent.store.path(sha256),
                                headers={"Content-Type": "application/octet-stream"})

    return [web.get("/v1/device/{task}", describe),
            web.get("/v1/device/{task}/artifacts/{sha256}", artifact)]
