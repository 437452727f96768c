"""`mesh tenants`: API keys for tenants."""

from __future__ import annotations


def test_a_new_tenant_key_prints_the_key_and_the_hash_to_store() -> None:
    from click.testing import CliRunner

    from mesh.cli import cli
    from mesh.tenants import hash_key

    out = CliRunner().invoke(cli, ["tenants", "new-key", "clinic"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    key = next(line for line in lines if line.startswith("tm_"))
    stored = next(line for line in lines if "sha256:" in line).strip('"')
    assert stored == hash_key(key)  # the topology stores the hash, never the key


def test_managing_keys_on_a_mesh_that_is_not_there_is_a_clear_error(tmp_path) -> None:
    from click.testing import CliRunner

    from mesh.cli import cli

    (tmp_path / "mesh.key").write_text("ab" * 32)
    out = CliRunner().invoke(cli, ["--home", str(tmp_path), "tenants", "key", "revoke",
                                   "sha256:" + "0" * 64, "--mesh", "http://127.0.0.1:9"])
    assert out.exit_code == 1 and "cannot reach http://127.0.0.1:9" in out.output
