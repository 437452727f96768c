"""A real network: every node of local.yaml on its own host (network namespace), over TLS.

Each node runs `mesh node run` inside its namespace with its own address, its
own certificate from the mesh CA and, but for the core, an empty home: the
registry and every artifact it serves cross the network to it, verified. The
test queries both edge nodes from outside (a client of the mesh), checks the
tiers the SLOs call for, then registers a model at the core and watches it
reach the edge while the mesh runs. Namespaces and processes are removed
whatever happens.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh import Client
from mesh.registry import Registry
from mesh.remote import mesh_variants, push_variants
from mesh.store import ArtifactStore
from tests.integration.netns import NetnsUnavailable, hosts
from tests.integration.processes import running, until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
HTTP, STREAM = 7101, 7102


def _mesh(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def test_a_mesh_of_namespaces_serves_over_tls_from_empty_homes(
        built_home: Path, tmp_path: Path, heldout: Any) -> None:
    images, _ = heldout
    doc = yaml.safe_load((ROOT / "topologies" / "local.yaml").read_text())
    names = [n["name"] for n in doc["nodes"]]
    try:
        network = hosts(names)
        where = network.__enter__()
    except NetnsUnavailable as exc:
        pytest.fail(f"this test needs network namespaces: {exc}")
    try:
        for node in doc["nodes"]:
            node["address"] = {"host": where[node["name"]].address, "http_port": HTTP,
                               "stream_port": STREAM}
            if node["tier"] == "edge":
                node["variants"] = ["digits-linear*", "digits-mlp"]
        topology = tmp_path / "mesh.yaml"
        topology.write_text(yaml.safe_dump(doc))
        tls = tmp_path / "tls"
        _mesh("certs", "init", "--dir", str(tls))
        for name in names:
            _mesh("certs", "issue", name, "--topology", str(topology), "--dir", str(tls))
        homes = {name: tmp_path / "homes" / name for name in names}
        for home in homes.values():
            home.mkdir(parents=True)
        shutil.copy(built_home / "registry.json", homes["core-1"] / "registry.json")
        (homes["core-1"] / "store").symlink_to(built_home / "store")
        logs = tmp_path / "logs"
        logs.mkdir()
        client_tls = ssl.create_default_context(cafile=str(tls / "ca.pem"))
        url = {n: f"https://{where[n].address}:{HTTP}" for n in names}

        commands = {name: host.command(
            [sys.executable, "-m", "mesh.cli", "--home", str(homes[name]), "node", "run",
             str(topology), name, "--tls-dir", str(tls / name)]) for name, host in where.items()}
        with running(commands, logs):
            def answers(entry: str) -> bool:
                with Client(url[entry], ssl=client_tls, timeout_s=5) as client:
                    return client.infer("digits", images[:1]).served_by.node == entry
            for entry in ("edge-1", "edge-2"):
                until(lambda e=entry: answers(e), f"{entry} answering over TLS")

            registry = Registry.load(homes["core-1"])
            for entry in ("edge-1", "edge-2"):
                with Client(url[entry], ssl=client_tls) as client:
                    fast = client.infer("digits", images[:1], latency_ms=10)
                    accurate = client.infer("digits", images[:1], min_accuracy=0.99)
                assert (fast.served_by.node, fast.served_by.tier) == (entry, "edge")
                assert accurate.served_by.variant == "digits-cnn" and accurate.slo_met
                assert accurate.served_by.tier in ("intermediate", "core")
                # the registry and the artifacts the edge serves came over the network
                assert Registry.load(homes[entry]).version == registry.version
                store = ArtifactStore(homes[entry] / "store")
                for variant in ("digits-linear", "digits-mlp"):
                    assert store.verify(registry.variants[variant].sha256)
            assert ArtifactStore(homes["mid-1"] / "store").verify(
                registry.variants["digits-cnn"].sha256)

            # a model registered at the core (with the core's certificate) reaches the edge
            linear = registry.variants["digits-linear"]
            new = type(linear).from_json({**linear.to_json(), "name": "digits-linear-v2",
                                          "family": "digits-v2"})
            core_tls = ssl.create_default_context(cafile=str(tls / "ca.pem"))
            core_tls.load_cert_chain(tls / "core-1" / "node.pem", tls / "core-1" / "node-key.pem")
            push_variants(url["core-1"], [new], ArtifactStore(homes["core-1"] / "store"),
                          key=None, ssl=core_tls)
            until(lambda: "digits-linear-v2" in mesh_variants(
                url["edge-1"], ssl=client_tls)["loaded"]["edge-1"],
                "the new variant loaded at edge-1", timeout_s=60)
    finally:
        network.__exit__(None, None, None)
