"""The mesh CA and node certificates: what init_ca and issue write, and what they refuse."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from mesh.certs import CertificateError, TlsFiles, init_ca, issue, with_tls
from mesh.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
LOCAL = load_topology(ROOT / "topologies" / "local.yaml")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_a_node_certificate_is_signed_by_the_mesh_ca_and_names_the_node(tmp_path: Path) -> None:
    ca_pem, ca_key = init_ca(tmp_path)
    files = issue("edge-1", LOCAL, tmp_path)
    assert files == TlsFiles.in_dir(tmp_path / "edge-1")
    assert files.ca.read_bytes() == ca_pem.read_bytes()
    cert, ca = _cert(files.cert), _cert(ca_pem)
    cert.verify_directly_issued_by(ca)  # raises when it is not
    assert files.node() == "edge-1"
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["edge-1"]
    # the topology's address for edge-1 is 127.0.0.1: reachable by IP with host names checked
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (ca_key, files.key):  # private keys: the owner's only
        assert key.stat().st_mode & 0o077 == 0
    # and the files make working contexts
    assert files.server_context().verify_mode == ssl.CERT_OPTIONAL
    assert files.server_context(require_client_cert=True).verify_mode == ssl.CERT_REQUIRED
    client = files.client_context()
    assert client.verify_mode == ssl.CERT_REQUIRED and not client.check_hostname
    assert client.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_a_second_ca_in_the_same_directory_is_refused(tmp_path: Path) -> None:
    init_ca(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(CertificateError, match="already holds a mesh CA"):
        init_ca(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == before  # the old CA is untouched


def test_issue_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match=r"no mesh CA in .*mesh certs init"):
        issue("edge-1", LOCAL, tmp_path / "missing")
    init_ca(tmp_path)
    with pytest.raises(CertificateError, match=r"'edge-9' is not in topology 'local'.*edge-1"):
        issue("edge-9", LOCAL, tmp_path)
    assert not (tmp_path / "edge-9").exists()
    (tmp_path / "ca-key.pem").write_text("not a key")
    with pytest.raises(CertificateError, match="cannot be read"):
        issue("edge-1", LOCAL, tmp_path)


def test_broken_tls_files_are_named(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    files = issue("edge-1", LOCAL, tmp_path / "ca")
    with pytest.raises(CertificateError, match=r"node key .*node-key\.pem does not exist"):
        TlsFiles(files.ca, files.cert, tmp_path / "node-key.pem").client_context()
    other = issue("edge-2", LOCAL, tmp_path / "ca")
    with pytest.raises(CertificateError, match="not a PEM certificate and its private key"):
        TlsFiles(files.ca, files.cert, other.key).server_context()


def test_with_tls_turns_http_urls_into_https() -> None:
    assert with_tls("http://10.0.0.2:7101") == "https://10.0.0.2:7101"
    assert with_tls("https://a:1") == "https://a:1"
    assert with_tls("tcp://a:1") == "tcp://a:1"
