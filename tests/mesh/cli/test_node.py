"""`mesh node run`: what it refuses before any process starts, with a message that says why."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mesh.cli import cli

ROOT = Path(__file__).resolve().parents[3]


def _run(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "node", "run", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize(("edit", "node", "expected"), [
    (lambda d: None, "edge-9", "node 'edge-9' is not in"),
    (lambda d: d["nodes"][2].pop("address"), "edge-1", "node 'edge-1' has no address"),
    (lambda d: d["nodes"][1].pop("address"), "edge-1", "neighbour(s) mid-1 of 'edge-1' have no address"),
    (lambda d: d["links"][0].update(latency_ms=-1), "edge-1", "links[0].latency_ms: must be >= 0"),
])
def test_a_node_that_cannot_run_from_this_topology_is_refused_by_name(
        tmp_path: Path, edit, node: str, expected: str) -> None:
    doc = yaml.safe_load((ROOT / "topologies" / "local.yaml").read_text())
    edit(doc)
    topology = tmp_path / "t.yaml"
    topology.write_text(yaml.safe_dump(doc))
    code, output = _run(tmp_path, str(topology), node)
    assert code != 0 and expected in output
    assert "Traceback" not in output


def test_missing_tls_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "ca.pem").write_text("x")
    code, output = _run(tmp_path, str(ROOT / "topologies" / "local.yaml"), "edge-1",
                        "--tls-dir", str(tmp_path / "tls"))
    assert code != 0 and "missing node.pem, node-key.pem" in output
