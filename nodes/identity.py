"""Who is calling a node: one of the mesh's nodes, or a client.

Every handler that does something only nodes may do (honour a query's
``route``, take a heartbeat, load reports or an artifact pull) asks
:class:`Callers` who sent the request, in one of two ways:

* **TLS on** (``AgentConfig.tls``): the node named by the caller's verified
  certificate (:func:`mesh.certs.peer_node`), which must be a node of the
  topology; the handshake has already refused a certificate the mesh CA did
  not sign. A certificate for a name the topology does not have (an old
  node, a stolen certificate of another mesh with the same CA) is refused
  with :class:`~mesh.errors.Forbidden` on every request and stream. A caller
  without a certificate is a client. Mesh-key tokens are ignored: off
  loopback they would travel in clear text to anyone who asks.
* **TLS off** (loopback, the testbed): the mesh-key token of
  :mod:`nodes.peers` (HTTP headers, the stream's HELLO frame).

``None`` means a client. Clients authenticate as tenants with API keys, which
the agent checks (:mod:`mesh.tenants`), not this module: a node never needs a
key, and a client never passes for a node.
"""

from __future__ import annotations

import ipaddress
import weakref
from collections.abc import Collection, Mapping
from typing import Any

from mesh.certs import peer_node
from mesh.errors import Forbidden
from nodes.peers import PeerKey

__all__ = ["Callers", "insecure_bind"]


class Callers:
    """Tells nodes from clients, by certificate (TLS) or by mesh-key token (loopback)."""

    def __init__(self, nodes: Collection[str], *, tls: bool, key: PeerKey | None) -> None:
        self.nodes = frozenset(nodes)
        self.tls = tls
        self.key = key
        # connection (its ssl object) -> the node its certificate names: read once, not per
        # request (decoding a certificate costs more than the rest of this check)
        self._named: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()

    @classmethod
    def for_agent(cls, agent: Any) -> Callers:
        """The callers of a :class:`~nodes.agent.NodeAgent` (its topology, TLS and key)."""
        config = agent.config
        return cls(config.topology.nodes, tls=config.tls is not None, key=agent.peers)

    def of_connection(self, transport: Any) -> str | None:
        """The node a TLS connection's certificate names; None for a client (or TLS off).

        Raises :class:`Forbidden` for a certificate of the mesh CA that names no
        node of the topology.
        """
        if not self.tls or transport is None:
            return None
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        try:
            name = self._named[ssl_object]
        except KeyError:
            name = self._named[ssl_object] = peer_node(ssl_object)
        if name is not None and name not in self.nodes:
            raise Forbidden(f"certificate for {name!r}: not a node of this mesh's topology; "
                            "only its nodes may connect with a mesh certificate")
        return name

    def of_request(self, transport: Any, headers: Mapping[str, str]) -> str | None:
        """The node an HTTP request comes from, or None (a client). Raises :class:`Forbidden`."""
        if self.tls:
            return self.of_connection(transport)
        return self.key.peer_of(headers) if self.key is not None else None

    def of_hello(self, payload: bytes) -> str | None:
        """The node a stream HELLO frame proves (TLS off only; with TLS the certificate says)."""
        if self.tls or self.key is None:
            return None
        return self.key.peer_of_hello(payload)

    def headers(self, node: str) -> dict[str, str]:
        """What ``node`` adds to its HTTP requests to prove itself: a token without TLS only."""
        return {} if self.tls or self.key is None else self.key.headers(node)

    def hello(self, node: str) -> bytes | None:
        """The HELLO payload ``node`` opens its streams with: without TLS only."""
        return None if self.tls or self.key is None else self.key.hello(node)


def insecure_bind(host: str, *, tls: bool, allow_insecure: bool) -> str | None:
    """Why a node must not listen on ``host`` as configured, or None when it may.

    Without TLS a node tells nodes from clients by mesh-key tokens, which travel in clear
    text: fine on loopback, where only this machine can listen in, and nowhere else unless
    the operator says so (``allow_insecure``).
    """
    if tls or allow_insecure or _is_loopback(host):
        return None
    return (f"it would listen on {host or 'every address'} without TLS, where anyone on the "
            "network could read the mesh key's tokens and pose as a node. Give it its "
            "certificate (--tls-dir DIR, from 'mesh certs issue'), bind a loopback address, "
            "or pass --insecure to run without TLS anyway")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a DNS name may resolve anywhere
