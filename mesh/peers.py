"""Which callers are mesh nodes: a shared mesh key, until node certificates land.

Only a mesh node may tell another where a query runs (its ``route``): a
client that could would pin any input on any variant. Nodes of one mesh
share a secret key, ``<home>/mesh.key`` (created once, readable by its owner
only, by whichever node or command needs it first). A node proves itself
with a token, HMAC-SHA256 of its name under that key: on HTTP in the
:data:`PEER_HEADER` and :data:`TOKEN_HEADER` headers of every forwarded
query; on the msgpack stream in one HELLO frame that opens the connection
(:data:`mesh.stream.HELLO`). The key never travels.

This is a stopgap with a known weakness (a token, once seen on an
unencrypted link, can be replayed); mutual TLS with a mesh CA replaces it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mesh.durable import fsync_dir, make_dirs
from mesh.errors import InvalidInput
from mesh.wire import pack, unpack

__all__ = ["KEY_FILE", "PEER_HEADER", "TOKEN_HEADER", "PeerKey"]

KEY_FILE = "mesh.key"
PEER_HEADER = "X-Tiermesh-Peer"
TOKEN_HEADER = "X-Tiermesh-Peer-Token"
_KEY_BYTES = 32


class PeerKey:
    """Makes and checks the tokens by which nodes of one mesh know each other."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError(f"a mesh key needs at least 16 bytes, got {len(key)}")
        self._key = key

    @classmethod
    def for_home(cls, home: Path) -> PeerKey:
        """The key in ``home/mesh.key``, created (race-free, mode 0600) when there is none."""
        path = home / KEY_FILE
        try:
            return cls(bytes.fromhex(path.read_text().strip()))
        except FileNotFoundError:
            pass
        make_dirs(home)
        tmp = home / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(_KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if another process won the race: use theirs
            except FileExistsError:
                pass
            else:
                fsync_dir(home)
        finally:
            tmp.unlink(missing_ok=True)
        return cls(bytes.fromhex(path.read_text().strip()))

    def token(self, node: str) -> str:
        return hmac.new(self._key, b"tiermesh-peer:" + node.encode(), hashlib.sha256).hexdigest()

    def verify(self, node: Any, token: Any) -> bool:
        if not isinstance(node, str) or not isinstance(token, str):
            return False
        return hmac.compare_digest(self.token(node), token)

    def sign(self, message: bytes) -> str:
        """An HMAC of ``message`` under the mesh key (what a node signs a claim with)."""
        return hmac.new(self._key, b"tiermesh-claim:" + message, hashlib.sha256).hexdigest()

    def signed(self, message: bytes, signature: Any) -> bool:
        return isinstance(signature, str) and hmac.compare_digest(self.sign(message), signature)

    def headers(self, node: str) -> dict[str, str]:
        """What ``node`` adds to every HTTP request it forwards."""
        return {PEER_HEADER: node, TOKEN_HEADER: self.token(node)}

    def peer_of(self, headers: Mapping[str, str]) -> str | None:
        """The node an HTTP request proves it comes from, or None (a client)."""
        node = headers.get(PEER_HEADER)
        if node is None:
            return None
        return node if self.verify(node, headers.get(TOKEN_HEADER)) else None

    def hello(self, node: str) -> bytes:
        """The payload of the HELLO frame that opens ``node``'s stream to a neighbour."""
        return pack({"node": node, "token": self.token(node)})

    def peer_of_hello(self, payload: bytes) -> str | None:
        """The node a HELLO payload proves, or None."""
        try:
            obj = unpack(payload)
        except InvalidInput:  # a malformed hello is simply not a peer
            return None
        if not isinstance(obj, dict):
            return None
        node = obj.get("node")
        return node if self.verify(node, obj.get("token")) else None
