"""``mesh certs init`` and ``mesh certs issue``: files that verify, clear errors."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from cryptography import x509

from mesh.cli import cli

ROOT = Path(__file__).resolve().parents[3]
LOCAL = str(ROOT / "topologies" / "local.yaml")


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


def test_init_then_issue_writes_a_certificate_the_ca_verifies(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    code, out = _run("certs", "init", "--dir", str(ca))
    assert code == 0 and "ca-key.pem" in out
    code, out = _run("certs", "issue", "mid-1", "--topology", LOCAL, "--dir", str(ca))
    assert code == 0 and "mid-1" in out
    node = ca / "mid-1"
    assert sorted(p.name for p in node.iterdir()) == ["ca.pem", "node-key.pem", "node.pem"]
    cert = x509.load_pem_x509_certificate((node / "node.pem").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes()))
    assert cert.subject.rfc4514_string() == "CN=mid-1"


def test_bad_input_gets_one_clear_message_and_a_nonzero_exit(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    code, out = _run("certs", "issue", "edge-1", "--topology", LOCAL, "--dir", str(ca))
    assert code == 1
    assert "no mesh CA in" in out and "mesh certs init --dir" in out
    assert "Traceback" not in out

    _run("certs", "init", "--dir", str(ca))
    code, out = _run("certs", "issue", "edge-7", "--topology", LOCAL, "--dir", str(ca))
    assert code == 1 and "'edge-7' is not in topology 'local'" in out
    code, out = _run("certs", "init", "--dir", str(ca))
    assert code == 1 and "already holds a mesh CA" in out
    code, out = _run("certs", "issue", "edge-1", "--topology", str(tmp_path / "nope.yaml"),
                     "--dir", str(ca))
    assert code != 0 and "nope.yaml" in out and "Traceback" not in out

