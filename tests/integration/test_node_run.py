"""One node per host, from the topology alone: `mesh node run` on every node of local.yaml.

Here every "host" is a process on loopback with its own home: only the core's home
holds the registry and the artifacts; the others start empty (but for the mesh key,
which TLS replaces off loopback) and copy what they need from their parents. A model
registered at the core while the mesh runs reaches the edge without a restart.
(`tests/integration/test_netns.py` does the same across network namespaces.)
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mesh import Client
from mesh.peers import PeerKey
from mesh.registry import Registry
from mesh.remote import mesh_variants, push_variants
from mesh.store import ArtifactStore
from tests.integration.processes import running, until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        err.close()
        return err.code, None
    except (OSError, ValueError):
        return 0, None


def test_every_node_runs_from_the_topology_and_an_empty_home(
        built_home: Path, tmp_path: Path, heldout: Any) -> None:
    images, _ = heldout
    doc = yaml.safe_load((ROOT / "topologies" / "local.yaml").read_text())
    ports = iter(_free_ports(2 * len(doc["nodes"])))
    for node in doc["nodes"]:
        node["address"] = {"host": "127.0.0.1", "http_port": next(ports),
                           "stream_port": next(ports)}
        if node["tier"] == "edge":  # lets the model registered below reach the edge
            node["variants"] = ["digits-linear*", "digits-mlp"]
    topology = tmp_path / "local.yaml"
    topology.write_text(yaml.safe_dump(doc))
    url = {n["name"]: f"http://127.0.0.1:{n['address']['http_port']}" for n in doc["nodes"]}

    homes = {n["name"]: tmp_path / "homes" / n["name"] for n in doc["nodes"]}
    core = homes["core-1"]
    core.mkdir(parents=True)
    shutil.copy(built_home / "registry.json", core / "registry.json")
    (core / "store").symlink_to(built_home / "store")
    key = PeerKey.for_home(core)
    for name, home in homes.items():
        if name != "core-1":
            home.mkdir(parents=True)
            shutil.copy(core / "mesh.key", home / "mesh.key")  # TLS replaces this off loopback
    logs = tmp_path / "logs"
    logs.mkdir()

    commands = {name: [sys.executable, "-m", "mesh.cli", "--home", str(home), "node", "run",
                        str(topology), name] for name, home in homes.items()}
    with running(commands, logs):
        until(lambda: all(_get(u + "/v1/status")[0] == 200 for u in url.values()),
               "every node serving")
        registry = Registry.load(core)
        for name in ("edge-1", "edge-2", "mid-1"):  # the registry came down the tree
            status = _get(url[name] + "/v1/status")[1]
            assert status["registry_version"] == registry.version, (name, status)
            assert status["unreachable"] == []
        for entry in ("edge-1", "edge-2"):
            with Client(url[entry]) as client:
                fast = client.infer("digits", images[:1], latency_ms=10)
                accurate = client.infer("digits", images[:1], min_accuracy=0.99)
            assert fast.served_by.node == entry and fast.served_by.tier == "edge"
            assert accurate.served_by.variant == "digits-cnn"
            assert accurate.served_by.tier in ("intermediate", "core")
            assert accurate.slo_met
        # every artifact an edge node serves crossed the network, and verified
        edge_store = ArtifactStore(homes["edge-1"] / "store")
        linear = registry.variants["digits-linear"]
        assert edge_store.verify(linear.sha256)
        assert not edge_store.has(registry.variants["digits-cnn"].sha256)  # not hosted there

        # a model registered at the core reaches the edge while the mesh runs
        new = linear.__class__.from_json({**linear.to_json(), "name": "digits-linear-v2",
                                          "family": "digits-v2"})
        sent = push_variants(url["core-1"], [new], ArtifactStore(core / "store"), key)
        assert sent["registered"] == ["digits-linear-v2"]
        until(lambda: "digits-linear-v2" in mesh_variants(url["edge-1"])["loaded"]["edge-1"],
               "the new variant loaded at edge-1", timeout_s=60)
        until(lambda: _get(url["edge-2"] + "/v1/status")[1]["registry_version"]
               == sent["version"], "edge-2 on the new registry", timeout_s=30)
        # and a client's route is still refused while a stranger's registration is too
        req = urllib.request.Request(url["core-1"] + "/v1/registry/variants", method="POST",
                                     data=json.dumps([new.to_json()]).encode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=5)
        refused.value.close()
        assert refused.value.code == 403
    assert np.isfinite(fast.output).all()


def test_a_node_killed_during_a_pull_restarts_and_serves_with_its_store_intact(
        built_home: Path, tmp_path: Path, heldout: Any) -> None:
    """The edge is SIGKILLed while it copies the MiniLM artifact from its parent."""
    images, _ = heldout
    ports = iter(_free_ports(4))
    box = {"kind": "cpu", "threads": 1, "memory_mb": 2048}
    doc = {"name": "pair", "hardware": {"box": box},
           "nodes": [{"name": "core-1", "tier": "core", "hardware": "box",
                      "variants": ["digits-*", "minilm-*"]},
                     {"name": "edge-1", "tier": "edge", "hardware": "box",
                      "variants": ["digits-linear", "minilm-onnx-fp32"]}],
           "links": [{"between": ["edge-1", "core-1"], "latency_ms": 1, "bandwidth_mbps": 1000}]}
    for node in doc["nodes"]:
        node["address"] = {"host": "127.0.0.1", "http_port": next(ports),
                           "stream_port": next(ports)}
    # The core listens on 127.0.0.2; its address in the file is a link emulator at 200 Mbit/s
    # in front of it, so the edge's copy of the 86 MB artifact lasts seconds, long enough to
    # be caught (and killed) in the middle on any machine.
    doc["nodes"][0]["address"]["bind"] = "127.0.0.2"
    core_at = doc["nodes"][0]["address"]
    links = tmp_path / "links.json"
    links.write_text(json.dumps([
        {"name": f"to-core-{kind}", "listen_port": core_at[f"{kind}_port"],
         "target_host": "127.0.0.2", "target_port": core_at[f"{kind}_port"],
         "latency_ms": 0, "bandwidth_mbps": 200} for kind in ("http", "stream")]))
    topology = tmp_path / "pair.yaml"
    topology.write_text(yaml.safe_dump(doc))
    core, edge = tmp_path / "core", tmp_path / "edge"
    core.mkdir()
    shutil.copy(built_home / "registry.json", core / "registry.json")
    (core / "store").symlink_to(built_home / "store")
    PeerKey.for_home(core)
    edge.mkdir()
    shutil.copy(core / "mesh.key", edge / "mesh.key")
    big = Registry.load(core).variants["minilm-onnx-fp32"].sha256
    url = f"http://127.0.0.1:{doc['nodes'][1]['address']['http_port']}"
    logs = tmp_path / "logs"
    logs.mkdir()

    def node(name: str, home: Path) -> list[str]:
        return [sys.executable, "-m", "mesh.cli", "--home", str(home), "node", "run",
                str(topology), name]

    def partial() -> bool:
        return any(p.name.startswith(".tmp-") for p in (edge / "store").rglob("*"))

    with running({"links": [sys.executable, "-m", "mesh.testbed.links", str(links)],
                  "core-1": node("core-1", core)}, logs), \
            open(logs / "edge-1-killed.log", "wb") as edge_log:
        proc = subprocess.Popen(node("edge-1", edge), stdout=edge_log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            until(lambda: (edge / "store").exists() and partial(), "the edge pulling", 60)
        finally:
            proc.send_signal(signal.SIGKILL)  # in the middle of the pull
            proc.wait()
        assert not ArtifactStore(edge / "store").verify(big)  # it did not finish
        with running({"edge-1": node("edge-1", edge)}, logs):
            until(lambda: _get(url + "/v1/status")[0] == 200, "edge-1 back", 90)
            with Client(url) as client:
                assert client.infer("digits", images[:1]).served_by.node == "edge-1"
            until(lambda: ArtifactStore(edge / "store").verify(big), "the pull done again", 90)
    assert not partial()  # the dead writer's partial file was removed
