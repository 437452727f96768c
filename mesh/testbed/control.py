"""The link emulator's control channel: cut, heal and change links while they run.

``python -m mesh.testbed.links SPEC --control-port PORT`` serves
:class:`LinkControlServer` on ``127.0.0.1:PORT``: one JSON object per line in,
one per line out, as many as the client sends on one connection::

    {"op": "list"}                               -> {"ok": true, "links": [LINK, ...]}
    {"op": "cut",  "link": "edge-1--mid-1"}      -> {"ok": true, "link": LINK}
    {"op": "heal", "link": "edge-1--mid-1"}      -> {"ok": true, "link": LINK}
    {"op": "set",  "link": "edge-1--mid-1",
     "settings": {"latency_ms": 30, "loss": 0.01}} -> {"ok": true, "link": LINK}
    anything wrong                               -> {"ok": false, "error": "what and how to fix"}

``LINK`` is :meth:`~mesh.testbed.links.LinkSet.describe`: its settings, ``state``
("up" or "cut") and counters. ``link`` is a name of the spec's ``link`` field
(a topology link, for :class:`~mesh.testbed.local.LocalMesh`); an unknown one is
answered with the known names. The port listens on loopback only and has no
authentication: anyone who can open a loopback socket on the machine can cut
the testbed's links, which is what a testbed on one's own machine is for.

:func:`request` is the client: synchronous, for the ``mesh`` CLI and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Protocol, Self

from mesh.errors import MeshError


class Links(Protocol):
    """What the control channel drives: a :class:`~mesh.testbed.links.LinkSet` (kept
    structural, so that the links module may run this server without a cycle)."""

    links: Iterable[str]

    def describe(self, link: str) -> dict[str, Any]: ...
    def cut(self, link: str) -> None: ...
    def heal(self, link: str) -> None: ...
    def configure_from(self, link: str, raw: Any) -> None: ...

__all__ = ["LinkControlError", "LinkControlServer", "request"]

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 * 1024
"""The longest request line the server reads; a longer one closes the connection."""


class LinkControlError(MeshError):
    """The control channel refused a command or could not be reached."""


class LinkControlServer:
    """Answers control commands for a :class:`~mesh.testbed.links.LinkSet`; an async context
    manager that owns its listening socket and its connections' tasks."""

    def __init__(self, links: Links, host: str = "127.0.0.1", port: int = 0) -> None:
        self.links = links
        self.host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        return self._port

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, self.host, self._port,
                                                  limit=MAX_LINE_BYTES)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer),
                                                      name="link control")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                reply = self.answer(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (OSError, ValueError):  # a reset, or a line over the limit
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def answer(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line (never raises)."""
        try:
            body = json.loads(line)
        except ValueError:
            return _error("the request is not JSON; send one object per line, "
                          'e.g. {"op": "list"}')
        if not isinstance(body, dict):
            return _error('the request must be a JSON object, e.g. {"op": "list"}')
        op = body.get("op")
        try:
            if op == "list":
                return {"ok": True, "links": [self.links.describe(n) for n in self.links.links]}
            if op not in ("cut", "heal", "set"):
                return _error(f"op: expected one of list, cut, heal, set; got {op!r}")
            link = body.get("link")
            if not isinstance(link, str):
                return _error(f"link: the name of a link is required for {op!r}")
            if op == "cut":
                self.links.cut(link)
            elif op == "heal":
                self.links.heal(link)
            else:
                self.links.configure_from(link, body.get("settings"))
            log.info("link %s: %s %s", link, op, body.get("settings", ""))
            return {"ok": True, "link": self.links.describe(link)}
        except KeyError as exc:  # UnknownLink: its message lists the links there are
            return _error(getattr(exc, "message", str(exc)))
        except ValueError as exc:
            return _error(str(exc))


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def request(address: str, body: dict[str, Any], *, timeout_s: float = 5.0) -> dict[str, Any]:
    """Send one command to the control channel at ``HOST:PORT``; return the reply.

    Raises :class:`LinkControlError` with the server's message when it refuses
    the command, and when it cannot be reached or does not answer in time.
    """
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            sock.sendall(json.dumps(body).encode() + b"\n")
            with sock.makefile("rb") as stream:
                line = stream.readline(MAX_LINE_BYTES * 16)
    except (OSError, ValueError) as exc:
        raise LinkControlError(
            f"the link emulator's control channel at {address} does not answer ({exc}); "
            "is the mesh still running? ('mesh status')") from None
    try:
        reply = json.loads(line)
    except ValueError:
        raise LinkControlError(f"the link emulator at {address} closed the control connection "
                               "without an answer") from None
    if not reply.get("ok"):
        raise LinkControlError(str(reply.get("error", "refused")))
    return dict(reply)
