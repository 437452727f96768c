"""``mesh deploy render``: what a user types, what lands in the folder, what the errors say."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from mesh.cli import cli

ROOT = Path(__file__).resolve().parents[3]

#: The files shipped in deploy/, and the commands that render them (deploy/README.md).
SHIPPED = [
    ("kubernetes", ["topologies/campus.yaml", "--target", "kubernetes"]),
    ("systemd", ["topologies/campus.yaml", "--target", "systemd", "--node", "gym-gate"]),
]


def _render(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["deploy", "render", *map(str, args)])
    return result.exit_code, result.output


def _tree(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(("folder", "args"), SHIPPED)
def test_the_shipped_files_are_exactly_what_rendering_gives_today(
        folder: str, args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code, out = _render(*args, "--out", tmp_path)
    assert code == 0, out
    shipped = ROOT / "deploy" / folder
    assert _tree(tmp_path) == _tree(shipped), (
        f"deploy/{folder} is stale: run mesh deploy render {' '.join(args)} --out deploy/{folder}")


def test_render_writes_the_manifests_and_an_executable_secrets_script(tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    code, text = _render(ROOT / "topologies" / "local.yaml", "--target", "kubernetes",
                         "--out", out)
    assert code == 0, text
    assert f"ok 6 file(s) for kubernetes in {out}" in text
    assert sorted(os.listdir(out)) == ["00-mesh.yaml", "core-1.yaml", "create-secrets.sh",
                                       "edge-1.yaml", "edge-2.yaml", "mid-1.yaml"]
    assert os.access(out / "create-secrets.sh", os.X_OK)
    assert "tiermesh-certs-$node" in (out / "create-secrets.sh").read_text()


def test_a_re_render_removes_its_own_stale_files_and_keeps_the_users(tmp_path: Path) -> None:
    (tmp_path / "old-node.yaml").write_text("# Rendered by mesh deploy render from x.yaml\n")
    (tmp_path / "kustomization.yaml").write_text("resources: []\n")
    code, text = _render(ROOT / "topologies" / "local.yaml", "--target", "kubernetes",
                         "--out", tmp_path)
    assert code == 0, text
    assert "removed 1 stale: old-node.yaml" in text
    assert not (tmp_path / "old-node.yaml").exists()
    assert (tmp_path / "kustomization.yaml").read_text() == "resources: []\n"


def test_an_unexpressible_hardware_class_is_a_clear_error_and_nothing_is_written(
        tmp_path: Path) -> None:
    topology = tmp_path / "npu.yaml"
    topology.write_text(
        "name: npu\n"
        "hardware:\n"
        "  npu-box: {threads: 1, accelerators: [{type: hailo8, count: 1}]}\n"
        "nodes:\n"
        "  - {name: edge-1, tier: edge, hardware: npu-box}\n")
    out = tmp_path / "out"
    code, text = _render(topology, "--target", "kubernetes", "--out", out)
    assert code == 1
    assert "Error: npu.yaml (target kubernetes): 1 error(s)" in text
    assert "hardware.npu-box.accelerators[0].type: 'hailo8' has no Kubernetes device-plugin" in text
    assert "Traceback" not in text
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "nomad"], "Invalid value for '--target': 'nomad' is not one of"),
    (["--target", "kubernetes", "--node", "edge-1"], "--node applies to --target systemd"),
    (["--target", "kubernetes", "--home-size", "lots"], "home size: 'lots' is not a Kubernetes"),
    (["--target", "systemd", "--node", "edge-9"], "node 'edge-9' is not in the topology"),
])
def test_bad_arguments_are_clear_errors_and_nothing_is_written(
        args: list[str], message: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, text = _render(ROOT / "topologies" / "local.yaml", *args, "--out", out)
    assert code != 0 and message in text, text
    assert "Traceback" not in text
    assert not out.exists()


def test_systemd_warns_about_nodes_without_addresses(tmp_path: Path) -> None:
    code, text = _render(ROOT / "topologies" / "campus.yaml", "--target", "systemd",
                         "--node", "gym-gate", "--out", tmp_path)
    assert code == 0
    assert "Warning: gym-gate: gym-gate, sports have no address in campus.yaml" in text
    assert sorted(os.listdir(tmp_path)) == ["gym-gate.env", "tiermesh-gym-gate.service"]


def test_the_secrets_script_makes_one_secret_per_node_from_its_certificate_files(
        tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    assert _render(ROOT / "topologies" / "local.yaml", "--target", "kubernetes",
                   "--out", out)[0] == 0
    certs = tmp_path / "certs"
    for node in ("core-1", "mid-1", "edge-1", "edge-2"):
        (certs / node).mkdir(parents=True)
        for name in ("ca.pem", "node.pem", "node-key.pem"):
            (certs / node / name).write_text(f"{node} {name}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    kubectl = bin_dir / "kubectl"  # records its arguments; `apply -f -` reads what it is piped
    kubectl.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                       '[ "$3" = apply ] && cat > /dev/null\nexit 0\n')
    kubectl.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "NAMESPACE": "tm"}
    done = subprocess.run(["sh", str(out / "create-secrets.sh"), str(certs)], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    creates = [line for line in calls.read_text().splitlines() if " create secret " in line]
    assert [line.split()[5] for line in creates] == [
        "tiermesh-certs-core-1", "tiermesh-certs-mid-1", "tiermesh-certs-edge-1",
        "tiermesh-certs-edge-2"]
    assert f"--from-file=node-key.pem={certs}/edge-1/node-key.pem" in creates[2]
    assert all(line.startswith("--namespace tm ") for line in calls.read_text().splitlines())
    (certs / "mid-1" / "node-key.pem").unlink()
    done = subprocess.run(["sh", str(out / "create-secrets.sh"), str(certs)], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"missing {certs}/mid-1/node-key.pem: run mesh certs issue mid-1" in done.stderr
