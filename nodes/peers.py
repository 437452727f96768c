"""The mesh key, as the node uses it: see :mod:`mesh.peers` (where it lives, so that the
``mesh`` command can sign operator requests without importing the node)."""

from mesh.peers import KEY_FILE, PEER_HEADER, TOKEN_HEADER, PeerKey

__all__ = ["KEY_FILE", "PEER_HEADER", "TOKEN_HEADER", "PeerKey"]
