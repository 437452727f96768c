"""The msgpack stream as a first-class transport on the live local mesh.

Node-to-node forwarding goes over one persistent stream per neighbour,
through link emulators of its own with the link's latency and bandwidth; the
SDK reaches an entry node over ``tcp://`` as well as ``http://``.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from mesh import (
    AsyncClient,
    Client,
    InvalidInput,
    MeshConnectionError,
    MeshError,
    MeshTimeout,
    UnknownTask,
)
from mesh.errors import ClientError
from mesh.testbed.local import LocalMesh

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "topologies" / "local.yaml"

pytestmark = pytest.mark.integration


def _status(mesh: LocalMesh, node: str) -> dict:
    with urllib.request.urlopen(mesh.url(node) + "/v1/status", timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def mesh(built_home: Path, tmp_path_factory: pytest.TempPathFactory):
    with LocalMesh(LOCAL, home=built_home, run_dir=tmp_path_factory.mktemp("run"),
                   use_addresses=False) as m:
        yield m


def test_every_node_has_a_stream_address_in_the_run_file_and_in_status(mesh: LocalMesh) -> None:
    from mesh.status import fetch_status

    assert mesh.state is not None
    run = json.loads((Path(mesh.state.run_dir) / "run.json").read_text())
    links = {s["name"]: s for s in json.loads((Path(mesh.state.run_dir) / "links.json").read_text())}
    for name, node in run["nodes"].items():
        assert isinstance(node["stream_port"], int)
        assert set(node["stream_neighbours"]) == set(node["neighbours"])
        for neighbour, url in node["stream_neighbours"].items():
            # the stream to a neighbour crosses an emulator of its own, with the link's figures
            spec = links[f"{name}->{neighbour} stream"]
            http = links[f"{name}->{neighbour}"]
            assert url == f"tcp://127.0.0.1:{spec['listen_port']}"
            assert spec["target_port"] == run["nodes"][neighbour]["stream_port"]
            assert (spec["latency_ms"], spec["bandwidth_mbps"]) == (
                http["latency_ms"], http["bandwidth_mbps"])
    rows = {r["node"]: r for r in asyncio.run(fetch_status(mesh.state.nodes))}
    for name, row in rows.items():
        assert row["stream_address"] == mesh.stream_url(name)
        assert row["stream_address"] == f"tcp://127.0.0.1:{run['nodes'][name]['stream_port']}"
        assert row["address"] == mesh.url(name)


def test_forwarding_over_the_stream_pays_the_emulated_link(mesh: LocalMesh, heldout) -> None:
    images, _ = heldout
    before = _status(mesh, "edge-1")["forwarded_via"].get("stream", 0)
    with Client(mesh.stream_url("edge-1")) as client:
        client.infer("digits", images[:1])
        upstream = [client.infer("digits", images[i:i + 1], min_accuracy=0.98, latency_ms=250)
                    for i in range(10)]
    assert {r.served_by.node for r in upstream} == {"mid-1"}
    # edge-1 -> mid-1 is 2 ms each way: a query served there pays at least 4 ms.
    assert min(r.latency_ms for r in upstream) >= 4.0
    assert all(r.timing["network_ms"] >= 4.0 for r in upstream)
    status = _status(mesh, "edge-1")
    assert status["neighbour_transports"] == {"mid-1": "stream"}
    assert status["forwarded_via"].get("stream", 0) - before >= 10
    assert "http" not in status["forwarded_via"]


def test_the_sdk_over_tcp_answers_like_http(mesh: LocalMesh, heldout) -> None:
    images, _ = heldout
    slo = {"latency_ms": 250, "min_accuracy": 0.98}
    with Client(mesh.url("edge-1")) as http, Client(mesh.stream_url("edge-1")) as tcp:
        a = http.infer("digits", images[:3], **slo, request_id="over-http")
        b = tcp.infer("digits", images[:3], **slo, request_id="over-tcp")
        for client in (http, tcp):
            with pytest.raises(InvalidInput, match=r"tensors\[0\].shape: task 'digits' takes"):
                client.infer("digits", np.zeros((1, 65), np.float32))
            with pytest.raises(UnknownTask, match="'speech' is not registered"):
                client.infer("speech", images[:1])
            with pytest.raises(InvalidInput, match="batch of 5000 rows; send 1 to 4096"):
                client.infer("digits", np.zeros((5000, 64), np.float32))
        assert tcp.infer("digits", images[:1], latency_ms=10).served_by.node == "edge-1"
    assert (a.request_id, b.request_id) == ("over-http", "over-tcp")
    assert a.served_by == b.served_by
    assert set(a.timing) == set(b.timing) == {"network_ms", "queue_ms", "compute_ms"}
    assert a.plan is not None and b.plan is not None
    assert a.plan.to_wire().keys() == b.plan.to_wire().keys()
    assert a.plan.node == b.plan.node == "mid-1"
    assert a.slo_met is b.slo_met is True and b.slo == a.slo
    np.testing.assert_allclose(a.output, b.output, rtol=1e-5)
    assert set(b.breakdown["predicted"]) == set(a.breakdown["predicted"])


def test_mixed_entry_lists_fall_back_across_transports(mesh: LocalMesh, heldout) -> None:
    images, _ = heldout
    dead_tcp, dead_http = "tcp://127.0.0.1:9", "http://127.0.0.1:9"

    async def go() -> list:
        async with AsyncClient([dead_tcp, mesh.stream_url("edge-2")]) as a, \
                AsyncClient([dead_http, mesh.stream_url("edge-1")]) as b, \
                AsyncClient([dead_tcp, mesh.url("edge-2")]) as c:
            return list(await asyncio.gather(*(
                client.infer("digits", images[i:i + 1], latency_ms=10)
                for client in (a, b, c) for i in range(4))))

    results = asyncio.run(go())
    assert [r.served_by.node for r in results] == ["edge-2"] * 4 + ["edge-1"] * 4 + ["edge-2"] * 4
    with Client([dead_tcp, mesh.url("edge-1")]) as client:
        assert client.infer("digits", images[:1], latency_ms=10).served_by.node == "edge-1"
    with Client([dead_http, mesh.stream_url("edge-2")]) as client:
        assert client.infer("digits", images[:1], latency_ms=10).served_by.node == "edge-2"
    with pytest.raises(MeshConnectionError, match="cannot reach entry node tcp://127.0.0.1:9"):
        with Client(dead_tcp) as client:
            client.infer("digits", images[:1])
    for bad in ("udp://127.0.0.1:1", "tcp://127.0.0.1", "tcp://127.0.0.1:1/v1"):
        with pytest.raises(ClientError, match="expected http://HOST:PORT"):
            Client(bad)
        with pytest.raises(ClientError, match="expected http://HOST:PORT"):
            AsyncClient(bad)


def test_a_stream_neighbour_going_away_fails_cleanly_or_reroutes(
        built_home: Path, tmp_path: Path, heldout) -> None:
    """mid-1 dies: queries that needed it go elsewhere (or fail with a 5xx), never hang."""
    images, _ = heldout
    with LocalMesh(LOCAL, home=built_home, run_dir=tmp_path / "run",
                   use_addresses=False) as m:
        with Client(m.stream_url("edge-1"), timeout_s=10) as client:
            first = [client.infer("digits", images[i:i + 1], min_accuracy=0.98, latency_ms=250)
                     for i in range(3)]
            assert {r.served_by.node for r in first} == {"mid-1"}
            m.kill("mid-1")
            outcomes: list[str] = []
            handed_back: list[dict] = []
            for i in range(8):
                started = time.monotonic()
                try:
                    r = client.infer("digits", images[i:i + 1], min_accuracy=0.98, latency_ms=250)
                except MeshTimeout:
                    pytest.fail("a query hung on the dead neighbour until the client gave up")
                except MeshError as exc:
                    assert exc.status in (502, 503), exc
                    outcomes.append(exc.message)
                else:
                    assert r.served_by.node != "mid-1"
                    outcomes.append(f"served by {r.served_by.node}")
                    handed_back.append(r.plan.handed_back if r.plan else None)
                assert time.monotonic() - started < 10
            # The first query planned through mid-1 finds the stream gone; edge-1 then counts
            # mid-1 and core-1 (behind it) as down, plans that query again and serves the
            # closest variant itself, as it does every later one.
            assert outcomes == ["served by edge-1"] * 8, outcomes
            assert handed_back[0] is not None and handed_back[0].node == "mid-1"
            assert handed_back[0].reason.startswith("forwarding to mid-1 failed")
            assert handed_back[1:] == [None] * 7
            assert _status(m, "edge-1")["view"]["core-1"]["healthy"] is False
            assert _status(m, "edge-1")["view"]["mid-1"]["healthy"] is False
