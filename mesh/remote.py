"""Operating a running mesh from the ``mesh`` command: register variants, see what runs where.

:func:`push_variants` sends variants built here (the factory writes them
into a local home) to a running node, normally the core: each artifact with
``PUT /v1/artifacts/{sha256}`` (the node verifies it by its hash as it
writes it), then the registry entries with ``POST /v1/registry/variants``.
The core's registry version rises, and every node copies it down the tree
and loads what it now hosts (:mod:`nodes.registry_sync`).
:func:`mesh_variants` reads a node's ``/v1/status``: what it has loaded, and
what the nodes below it report having loaded.

Both sign their requests with the mesh key (:mod:`mesh.peers`), as nodes do.
Raises :class:`~mesh.errors.MeshError` naming the URL and what went wrong.
"""

from __future__ import annotations

import http.client
import json
import ssl as _ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from mesh.errors import MeshError
from mesh.peers import PeerKey
from mesh.registry import Variant
from mesh.store import ArtifactStore

__all__ = ["push_variants", "remove_model", "manage_key", "mesh_variants", "key_from", "tls_from", "OPERATOR"]

#: The name an operator's requests are signed with.
OPERATOR = "operator"


def _connection(url: str, timeout_s: float, ssl: _ssl.SSLContext | None
                ) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MeshError(f"--mesh {url!r}: expected http://HOST:PORT (or https://) of a node")
    if parts.scheme == "https" or ssl is not None:
        return (http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout_s,
                                            context=ssl), parts.path.rstrip("/"))
    return (http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s),
            parts.path.rstrip("/"))


def _request(url: str, method: str, path: str, body: Any, headers: dict[str, str],
             timeout_s: float = 60.0, ssl: _ssl.SSLContext | None = None) -> dict[str, Any]:
    conn, prefix = _connection(url, timeout_s, ssl)
    try:
        conn.request(method, prefix + path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    except OSError as exc:
        raise MeshError(f"cannot reach {url}: {exc}") from None
    finally:
        conn.close()
    try:
        parsed = json.loads(data) if data else {}
    except ValueError:
        parsed = {}
    if resp.status != 200:
        error = parsed.get("error") if isinstance(parsed, dict) else None
        message = error.get("message") if isinstance(error, dict) else data[:200].decode(
            errors="replace")
        raise MeshError(f"{url}{path}: HTTP {resp.status}: {message}")
    return parsed if isinstance(parsed, dict) else {"value": parsed}


def push_variants(url: str, variants: Iterable[Variant], store: ArtifactStore,
                  key: PeerKey | None, *, ssl: _ssl.SSLContext | None = None) -> dict[str, Any]:
    """Register ``variants`` (their artifacts in ``store``) at the node at ``url``.

    Signed with the mesh ``key`` on loopback; over TLS, ``ssl`` carries a node certificate
    of the mesh (the core's, on the core's machine) and no key is needed.
    """
    variants = list(variants)
    headers = key.headers(OPERATOR) if key is not None else {}
    for sha in sorted({v.sha256 for v in variants}):
        path = store.path(sha)
        if not store.verify(sha):
            raise MeshError(f"artifact {sha[:12]} is missing or corrupt in {store.root}")
        with open(path, "rb") as f:
            _request(url, "PUT", f"/v1/artifacts/{sha}", f,
                     {**headers, "Content-Type": "application/octet-stream",
                      "Content-Length": str(path.stat().st_size)}, timeout_s=600.0, ssl=ssl)
    body = json.dumps([v.to_json() for v in variants]).encode()
    return _request(url, "POST", "/v1/registry/variants", body,
                    {**headers, "Content-Type": "application/json"}, ssl=ssl)


def remove_model(url: str, family: str, key: PeerKey | None, *,
                 ssl: _ssl.SSLContext | None = None) -> dict[str, Any]:
    """Remove model ``family`` from the running mesh at ``url`` (the core): every node
    drops its variants with the next registry it copies."""
    headers = key.headers(OPERATOR) if key is not None else {}
    return _request(url, "DELETE", f"/v1/registry/models/{quote(family, safe='')}", None,
                    headers, ssl=ssl)


def manage_key(url: str, body: dict[str, str], key: PeerKey | None, *,
               ssl: _ssl.SSLContext | None = None) -> dict[str, Any]:
    """Add (``{"tenant", "key_hash"}``) or revoke (``{"revoke": key_hash}``) an API key at
    the running node at ``url`` (the core): it reaches every node with the registry."""
    headers = key.headers(OPERATOR) if key is not None else {}
    return _request(url, "POST", "/v1/registry/keys", json.dumps(body).encode(),
                    {**headers, "Content-Type": "application/json"}, ssl=ssl)


def mesh_variants(url: str, *, ssl: _ssl.SSLContext | None = None) -> dict[str, Any]:
    """``{"node": ..., "registry_version": ..., "loaded": {node: [variants]}}`` seen from
    the node at ``url`` (itself, and what the nodes whose reports it holds have loaded)."""
    status = _request(url, "GET", "/v1/status", None, {}, ssl=ssl)
    loaded: dict[str, list[str]] = {
        status["node"]: sorted(v["name"] for v in status.get("variants", []) if v.get("loaded"))}
    for node, seen in (status.get("view") or {}).items():
        if node != status["node"] and isinstance(seen.get("loaded"), list):
            loaded[node] = sorted(seen["loaded"])
    return {"node": status["node"], "registry_version": status.get("registry_version"),
            "loaded": dict(sorted(loaded.items()))}


def key_from(home: Path, key_file: str | None) -> PeerKey:
    """The mesh key to sign with: ``key_file``, else ``<home>/mesh.key``."""
    path = Path(key_file) if key_file else home / "mesh.key"
    try:
        return PeerKey(bytes.fromhex(path.read_text().strip()))
    except FileNotFoundError:
        raise MeshError(f"no mesh key at {path}: give --mesh-key (the core's "
                        "<home>/mesh.key)") from None
    except ValueError:
        raise MeshError(f"{path} is not a mesh key (hex)") from None


def tls_from(tls_dir: str | Path) -> _ssl.SSLContext:
    """A client context that proves a node of the mesh: ``ca.pem``, ``node.pem``,
    ``node-key.pem`` in ``tls_dir``; raises :class:`MeshError` naming a missing file."""
    folder = Path(tls_dir)
    missing = [f for f in ("ca.pem", "node.pem", "node-key.pem") if not (folder / f).is_file()]
    if missing:
        raise MeshError(f"--tls-dir {folder}: missing {', '.join(missing)}")
    context = _ssl.create_default_context(cafile=str(folder / "ca.pem"))
    context.load_cert_chain(folder / "node.pem", folder / "node-key.pem")
    return context
