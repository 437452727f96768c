"""The mesh's certificates: one CA per mesh, one certificate per node, mutual TLS between nodes.

Off loopback, nodes prove who they are with certificates instead of the
shared mesh key (:mod:`nodes.peers`). A mesh has one certificate authority
(:func:`init_ca`, ``mesh certs init``); every node gets a certificate signed
by it (:func:`issue`, ``mesh certs issue``) whose subject common name and DNS
name are the node's name (plus the host of its topology ``address``, as an
IP or DNS name, so that a client checking host names can reach it there).
A node's TLS material lives in one directory::

    DIR/ca.pem         the mesh CA's certificate (every node trusts it, and only it)
    DIR/node.pem       this node's certificate
    DIR/node-key.pem   this node's private key (mode 0600)

:class:`TlsFiles` turns those into :class:`ssl.SSLContext` objects (TLS 1.2
or later, the mesh CA as the only trust anchor). The server side verifies
every certificate a caller presents against the mesh CA and fails the
handshake on one that does not verify (another CA's, expired, not a node
certificate); a caller without a certificate is a *client*, never a node
(clients' own authentication comes later, in the handlers). The client side
requires the server's certificate to verify against the mesh CA. Which node
a connection comes from is :func:`peer_node` of its ``ssl_object``; whether
that name is a node of the mesh's topology is for the caller to decide
(:mod:`nodes.identity`). Host names are not checked between nodes: the mesh
CA signs nothing but node certificates, and in the testbed every neighbour is
reached through a link emulator on loopback.

Errors are :class:`CertificateError` (a ``ValueError``) naming the file or
the node and the fix.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.durable import make_dirs, write_atomic

__all__ = ["CA_CERT", "CA_KEY", "NODE_CERT", "NODE_KEY", "CertificateError", "TlsFiles",
           "ca_context", "init_ca", "issue", "peer_node", "with_tls"]

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
NODE_CERT, NODE_KEY = "node.pem", "node-key.pem"
#: How long certificates are valid unless told otherwise.
CA_DAYS, NODE_DAYS = 3650, 825


class CertificateError(ValueError):
    """A CA or node certificate is missing, unreadable or cannot be issued."""


@dataclass(frozen=True)
class TlsFiles:
    """One node's TLS material: the mesh CA, its certificate and its key (PEM files).

    Nothing is read until a context is made; :meth:`server_context` and
    :meth:`client_context` raise :class:`CertificateError` naming a missing or
    broken file.
    """

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: str | Path) -> TlsFiles:
        """The files ``mesh certs issue`` writes: ``DIR/ca.pem``, ``node.pem``, ``node-key.pem``."""
        d = Path(directory)
        return cls(d / CA_CERT, d / NODE_CERT, d / NODE_KEY)

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """For a node's ports: its own certificate, and the mesh CA to verify callers'.

        A certificate a caller presents must verify against the mesh CA, or the
        handshake fails. ``require_client_cert``: callers without one fail too
        (nodes only); by default they connect as clients, whom the handlers
        treat as such (no routes, heartbeats or artifact pulls), so that the SDK,
        health probes and metrics scrapers need only the CA certificate.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._configure(context)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        return context

    def client_context(self) -> ssl.SSLContext:
        """For a node's connections to others: presents its certificate, verifies theirs."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # peers are known by certificate, not by address
        self._configure(context)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def node(self) -> str:
        """The node name this certificate is for (its subject common name)."""
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(_read(self.cert, "node certificate"))
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if not names:
            raise CertificateError(f"{self.cert}: the certificate names no node (no common name)")
        return str(names[0].value)

    def _configure(self, context: ssl.SSLContext) -> None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        for path, what in ((self.ca, "mesh CA certificate"), (self.cert, "node certificate"),
                           (self.key, "node key")):
            if not path.is_file():
                raise CertificateError(
                    f"{what} {path} does not exist; create the node's files with "
                    "'mesh certs issue NODE --topology FILE --dir DIR'")
        try:
            context.load_verify_locations(cafile=str(self.ca))
        except ssl.SSLError as exc:
            raise CertificateError(f"{self.ca}: not a PEM CA certificate ({exc.reason})") from None
        try:
            context.load_cert_chain(str(self.cert), str(self.key))
        except ssl.SSLError as exc:
            raise CertificateError(f"{self.cert} with {self.key}: not a PEM certificate and its "
                                   f"private key ({exc.reason})") from None


def ca_context(ca: str | Path) -> ssl.SSLContext:
    """A client's context for nodes that serve TLS: trusts the mesh CA, presents nothing.

    ``Client(url, ssl=ca_context("ca.pem"))``: the nodes serve it as a client (no routes,
    heartbeats or pulls), over an encrypted connection to a node the mesh CA vouches for.
    Raises :class:`CertificateError` when ``ca`` is missing or not a CA certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # any node of the mesh; the CA signs nothing else
    try:
        context.load_verify_locations(cafile=str(ca))
    except FileNotFoundError:
        raise CertificateError(f"mesh CA certificate {ca} does not exist") from None
    except ssl.SSLError as exc:
        raise CertificateError(f"{ca}: not a PEM CA certificate ({exc.reason})") from None
    return context


def peer_node(ssl_object: Any) -> str | None:
    """The node a TLS connection's verified peer certificate names, or None.

    ``ssl_object`` is a connection's :class:`ssl.SSLObject` / :class:`ssl.SSLSocket`
    (``transport.get_extra_info("ssl_object")``), or None for a plain connection.
    None also when the peer sent no certificate: a certificate is only returned
    by :meth:`~ssl.SSLSocket.getpeercert` once it has been verified.
    """
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def with_tls(url: str) -> str:
    """``http://HOST:PORT`` -> ``https://HOST:PORT`` (other URLs as they are)."""
    return "https://" + url[len("http://"):] if url.startswith("http://") else url


# --------------------------------------------------------------------------- issuing


def init_ca(directory: str | Path, *, name: str = "Tiermesh mesh CA",
            days: int = CA_DAYS) -> tuple[Path, Path]:
    """Create a mesh CA in ``directory``: ``ca.pem`` and ``ca-key.pem`` (mode 0600).

    Returns their paths. Raises :class:`CertificateError` when the directory
    already holds a CA: replacing it would make every certificate it issued
    stop verifying.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = Path(directory)
    existing = [p for p in (d / CA_CERT, d / CA_KEY) if p.exists()]
    if existing:
        raise CertificateError(
            f"{d} already holds a mesh CA ({', '.join(p.name for p in existing)}); replacing it "
            "would invalidate every node certificate it issued. Use another --dir, or remove "
            "the old CA on purpose first")
    if days < 1:
        raise CertificateError(f"days: must be at least 1, got {days}")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks differ a little
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    make_dirs(d)
    key_path = _write_key(d / CA_KEY, key)
    cert_path = write_atomic(d / CA_CERT, _pem(cert))
    return cert_path, key_path


def issue(node: str, topology: Any, directory: str | Path, *,
          days: int = NODE_DAYS) -> TlsFiles:
    """Issue ``node``'s certificate from the CA in ``directory``; write ``DIR/NODE/``.

    ``topology``: the mesh's :class:`~mesh.topology.Topology`; ``node`` must be
    one of its nodes. The certificate names the node (common name and DNS
    name) and the host of its ``address`` when the topology gives one. Writes
    ``DIR/NODE/ca.pem``, ``node.pem`` and ``node-key.pem`` (0600), replacing an
    older certificate of the node (renewal). Raises :class:`CertificateError`
    for an unknown node or a missing or unreadable CA.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if node not in topology.nodes:
        raise CertificateError(f"node {node!r} is not in topology {topology.name!r} "
                               f"(nodes: {', '.join(sorted(topology.nodes))})")
    if days < 1:
        raise CertificateError(f"days: must be at least 1, got {days}")
    d = Path(directory)
    ca_cert, ca_key = _load_ca(d)
    key = ec.generate_private_key(ec.SECP256R1())
    address = getattr(topology.nodes[node], "address", None)
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False),
                           critical=True)
            # a node is a server to its children and clients, and a client of its neighbours
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(
                list(_alt_names([node, address.host] if address is not None else [node]))),
                critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out = d / node
    make_dirs(out)
    _write_key(out / NODE_KEY, key)
    write_atomic(out / NODE_CERT, _pem(cert))
    write_atomic(out / CA_CERT, _pem(ca_cert))
    return TlsFiles.in_dir(out)


def _load_ca(d: Path) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    missing = [name for name in (CA_CERT, CA_KEY) if not (d / name).is_file()]
    if missing:
        raise CertificateError(f"no mesh CA in {d} ({', '.join(missing)} missing); create one "
                               f"with 'mesh certs init --dir {d}'")
    try:
        cert = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"the mesh CA in {d} cannot be read: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or \
            key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise CertificateError(f"{d / CA_KEY} is not the key of {d / CA_CERT}")
    return cert, key


def _alt_names(names: Iterable[str]) -> Iterable[Any]:
    from cryptography import x509

    seen: set[str] = set()
    for name in names:
        host = name.strip("[]")
        if host in seen:
            continue
        seen.add(host)
        try:
            yield x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            yield x509.DNSName(host)


def _write_key(path: Path, key: Any) -> Path:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    path = write_atomic(path, data)
    os.chmod(path, 0o600)
    return path


def _pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{what} {path} cannot be read: {exc.strerror}") from None
