"""The real local mesh: node processes, link emulators, ONNX models, the SDK."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mesh import AsyncClient, Client, InvalidInput, MeshConnectionError, ServedBy, UnknownTask
from mesh.testbed.local import LocalMesh, is_mesh_process

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "topologies" / "local.yaml"

pytestmark = pytest.mark.integration


def test_slos_steer_queries_to_the_expected_tier(mesh: LocalMesh, heldout) -> None:
    images, labels = heldout
    with Client(mesh.url("edge-1")) as client:
        tight = [client.infer("digits", images[i:i + 1], latency_ms=10) for i in range(20)]
        accurate = [client.infer("digits", images[i:i + 1], latency_ms=250, min_accuracy=0.98)
                    for i in range(20)]
        relaxed = [client.infer("digits", images[i:i + 1]) for i in range(20)]
    assert {r.served_by.tier for r in tight} == {"edge"}
    assert {r.served_by.node for r in tight} == {"edge-1"}
    assert {r.served_by.tier for r in accurate} <= {"intermediate", "core"}
    assert {r.served_by.variant for r in accurate} == {"digits-cnn"}
    assert all(r.accuracy is not None and r.accuracy >= 0.98 for r in accurate)
    assert {r.served_by.variant for r in relaxed} == {"digits-linear"}
    for r in tight + accurate + relaxed:
        assert r.output.shape == (1, 10)
        assert r.output.dtype == np.float32
        np.testing.assert_allclose(r.output.sum(), 1.0, rtol=1e-4)  # probabilities
        assert r.plan.feasible is True


def test_accuracy_achieved_on_true_labels_matches_the_registry(mesh: LocalMesh, heldout) -> None:
    images, labels = heldout
    with Client(mesh.url("edge-2")) as client:
        accurate = client.infer("digits", images[:200], min_accuracy=0.98)
        cheap = client.infer("digits", images[:200])
    acc_hi = float(np.mean(accurate.output.argmax(1) == labels[:200]))
    acc_lo = float(np.mean(cheap.output.argmax(1) == labels[:200]))
    assert accurate.served_by.variant == "digits-cnn"
    assert acc_hi >= 0.97
    assert acc_lo >= 0.90
    assert acc_hi > acc_lo


def test_latency_through_emulated_links_reflects_the_topology(mesh: LocalMesh, heldout) -> None:
    images, _ = heldout
    with Client(mesh.url("edge-1")) as client:
        client.infer("digits", images[:1])
        local = [client.infer("digits", images[:1], latency_ms=10) for _ in range(10)]
        upstream = [client.infer("digits", images[:1], min_accuracy=0.98, latency_ms=250)
                    for _ in range(10)]
    # edge-1 -> mid-1 is 2 ms each way: a query served there pays at least 4 ms.
    assert min(r.latency_ms for r in upstream) >= 4.0
    assert all(r.timing["network_ms"] >= 4.0 for r in upstream)
    assert all(r.timing["network_ms"] == 0.0 for r in local)
    assert np.median([r.latency_ms for r in upstream]) > np.median([r.latency_ms for r in local])


def test_async_client_and_fallback_entry(mesh: LocalMesh, heldout) -> None:
    import asyncio

    images, _ = heldout

    async def go():
        dead = "http://127.0.0.1:9"  # nothing listens on the discard port
        async with AsyncClient([dead, mesh.url("edge-2")]) as client:
            results = await asyncio.gather(*(client.infer("digits", images[i:i + 1], latency_ms=10)
                                             for i in range(8)))
        return results

    results = asyncio.run(go())
    assert {r.served_by.node for r in results} == {"edge-2"}
    with pytest.raises(MeshConnectionError, match="cannot reach"):
        with Client("http://127.0.0.1:9") as client:
            client.infer("digits", images[:1])


def test_bad_input_gets_a_clear_4xx_and_the_node_keeps_serving(mesh: LocalMesh, heldout) -> None:
    import urllib.request

    images, _ = heldout
    url = mesh.url("edge-1")
    with Client(url) as client:
        with pytest.raises(InvalidInput, match=r"tensors\[0\].shape: task 'digits' takes \[N, 64\]"):
            client.infer("digits", np.zeros((1, 65), np.float32))
        with pytest.raises(InvalidInput, match="takes float32"):
            client.infer("digits", images[:1].astype(np.float64))
        with pytest.raises(UnknownTask, match="'speech' is not registered"):
            client.infer("speech", images[:1])
        with pytest.raises(InvalidInput, match=r"takes 1 input tensor\(s\) \(input\), got 2"):
            client.infer("digits", images[:1], images[:1])
        assert client.infer("digits", images[:1]).served_by.node == "edge-1"

    def post(body: bytes, content_type: str = "application/msgpack") -> tuple[int, dict]:
        req = urllib.request.Request(url + "/v1/infer", data=body, method="POST",
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req) as resp:
                return resp.status, {}
        except urllib.error.HTTPError as err:
            import msgpack
            raw = err.read()
            try:
                return err.code, msgpack.unpackb(raw)
            except Exception:
                return err.code, json.loads(raw)

    status, body = post(b"\xc1\xff\x00garbage")
    assert status == 400 and "not valid msgpack" in body["error"]["message"]
    status, body = post(b"{}", "application/json")
    assert status == 400 and "Content-Type" in body["error"]["message"]
    # a body over the cap is refused from its Content-Length, before a byte of it is read
    # (the node then closes the connection: a client still sending it would see a reset)
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.putrequest("POST", "/v1/infer")
    conn.putheader("Content-Type", "application/msgpack")
    conn.putheader("Content-Length", str(65 * 1024 * 1024))
    conn.endheaders()
    resp = conn.getresponse()
    import msgpack
    body = msgpack.unpackb(resp.read())
    conn.close()
    assert resp.status == 413 and "too large" in body["error"]["message"]
    with Client(url) as client:
        assert client.infer("digits", images[:1]).served_by.node == "edge-1"
    with Client(url) as client:
        with pytest.raises(InvalidInput, match="batch of 5000 rows; send 1 to 4096"):
            client.infer("digits", np.zeros((5000, 64), np.float32))


def test_status_reports_every_node(mesh: LocalMesh, built_home: Path, heldout) -> None:
    import asyncio

    from mesh.registry import Registry
    from mesh.status import fetch_status

    images, _ = heldout
    with Client(mesh.url("edge-1")) as client:
        for i in range(5):
            client.infer("digits", images[i:i + 1], min_accuracy=0.98)
    assert mesh.state is not None
    rows = {r["node"]: r for r in asyncio.run(fetch_status(mesh.state.nodes))}
    assert set(rows) == {"edge-1", "edge-2", "mid-1", "core-1"}
    assert all(r["up"] for r in rows.values())
    assert rows["edge-1"]["forwarded"].get("mid-1", 0) >= 5
    assert rows["mid-1"]["served_local"] >= 5
    assert rows["edge-1"]["latency_ms"]["p50"] is not None
    # the core hosts the cheap variants and the most accurate of every task (as placed)
    registry = Registry.load(built_home)
    core_variants = {v["name"] for v in rows["core-1"]["variants"]}
    assert {"digits-linear", "digits-mlp"} <= core_variants
    for task in registry.tasks():
        best = max(v.accuracy for v in registry.for_task(task))
        assert any(registry.get(v).task == task and registry.get(v).accuracy >= best - 1e-6
                   for v in core_variants), task
    edge_variants = {v["name"] for v in rows["edge-1"]["variants"]}
    assert {"digits-linear", "digits-mlp", "minilm-onnx-int8-dynamic"} <= edge_variants
    assert "digits-cnn" not in edge_variants and "minilm-torch-fp32" not in edge_variants
    # every node says it was placed by the mesh, within which globs
    assert rows["edge-1"]["placement"]["deny"] == ["*torch*", "minilm-*fp32"]
    assert rows["mid-1"]["placement"]["allow"] == ["digits-mlp", "digits-cnn", "minilm-onnx-*"]
    assert all(r["placement"]["managed"] for r in rows.values())


def test_core_round_trip_pays_both_links_each_way(built_home: Path, tmp_path: Path, heldout) -> None:
    """Only core hosts the CNN here, so accurate queries cross 2 ms + 25 ms each way."""
    data = yaml.safe_load(LOCAL.read_text())
    for node in data["nodes"]:
        if node["name"] == "mid-1":
            node["variants"] = ["digits-mlp"]
    topo = tmp_path / "core-only.yaml"
    topo.write_text(yaml.safe_dump(data))
    images, _ = heldout
    with LocalMesh(topo, home=built_home, run_dir=tmp_path / "run",
                   use_addresses=False) as m:
        with Client(m.url("edge-1")) as client:
            client.infer("digits", images[:1])
            results = [client.infer("digits", images[i:i + 1], min_accuracy=0.99, latency_ms=500)
                       for i in range(8)]
        pids = [p["pid"] for p in m.state.processes]
    assert {r.served_by.node for r in results} == {"core-1"}
    assert min(r.latency_ms for r in results) >= 54.0
    # the nodes' own account of network time agrees with the configured links
    assert all(54.0 <= r.timing["network_ms"] < 54.0 + 60.0 for r in results)
    assert all(r.plan.predicted["network_ms"] >= 54.0 for r in results)
    assert not any(is_mesh_process({"pid": pid}) for pid in pids)


def test_cli_up_status_down_leaves_nothing_behind(built_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "registry.json").write_text((built_home / "registry.json").read_text())
    (home / "store").symlink_to(built_home / "store")
    mesh_cmd = [sys.executable, "-m", "mesh.cli", "--home", str(home)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*mesh_cmd, *args], capture_output=True, text=True, timeout=120)

    # free ports: a developer's own `mesh up` may hold the ones local.yaml pins
    up = run("up", "--free-ports", str(LOCAL))
    assert up.returncode == 0, up.stderr
    try:
        again = run("up", "--free-ports", str(LOCAL))
        assert again.returncode != 0 and "already running" in again.stderr
        status = run("status", "--json")
        assert status.returncode == 0, status.stderr
        nodes = {n["node"]: n for n in json.loads(status.stdout)["nodes"]}
        assert set(nodes) == {"edge-1", "edge-2", "mid-1", "core-1"}
        assert all(n["up"] and n["address"].startswith("http://127.0.0.1:") for n in nodes.values())
        table = run("status")
        assert "core-1" in table.stdout and "up" in table.stdout
        pids = [p["pid"] for p in json.loads((home / "run" / "state.json").read_text())["processes"]]
        assert len(pids) == 5  # four nodes and the link emulator
    finally:
        down = run("down")
    assert down.returncode == 0, down.stderr
    assert "stopped 5 processes" in down.stdout
    assert not any(is_mesh_process({"pid": pid}) for pid in pids)
    after = run("status")
    assert after.returncode != 0 and "no mesh is running" in after.stderr
    assert "Traceback" not in after.stderr


def test_cli_reports_a_broken_topology_by_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load(LOCAL.read_text())
    data["links"][2]["latency_ms"] = -1
    bad.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "mesh.cli", "topology", "check", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "links[2].latency_ms: must be >= 0" in result.stderr
    assert "Traceback" not in result.stderr
    up = subprocess.run([sys.executable, "-m", "mesh.cli", "--home", str(tmp_path), "up", str(bad)],
                        capture_output=True, text=True, timeout=60)
    assert up.returncode != 0 and "links[2].latency_ms" in up.stderr


def test_sentence_embeddings_are_placed_by_slo_and_agree_with_the_original(
        mesh: LocalMesh, built_home: Path) -> None:
    from mesh.variants.sentences import SentenceTokenizer, load_sentences

    sentences = load_sentences()[:6]
    ids, mask = SentenceTokenizer.from_home(built_home).encode(sentences)
    with Client(mesh.url("edge-2")) as client:
        original = client.infer("sentence-embedding", ids, mask, policy="most-accurate",
                                min_accuracy=1.0)
        fast = client.infer("sentence-embedding", ids, mask, latency_ms=60)
        exact = client.infer("sentence-embedding", ids, mask, latency_ms=2000, min_accuracy=0.999)
    assert fast.served_by == ServedBy("edge-2", "edge", "minilm-onnx-int8-dynamic")
    assert exact.served_by.tier in {"intermediate", "core"}
    assert exact.served_by.variant in {"minilm-onnx-fp32", "minilm-torch-fp32"}
    assert original.output.shape == fast.output.shape == (6, 384)
    cos_fast = np.sum(original.output * fast.output, axis=1)
    cos_exact = np.sum(original.output * exact.output, axis=1)
    assert cos_exact.min() > 0.999
    assert cos_fast.min() > 0.95 and cos_fast.mean() < cos_exact.mean()
