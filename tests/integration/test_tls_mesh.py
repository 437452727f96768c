"""``mesh up --tls``: the local testbed with every node on mutual TLS, answering queries."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import pytest

from mesh import Client, MeshConnectionError
from mesh.status import fetch_status
from mesh.testbed.local import LocalMesh

LOCAL = Path(__file__).resolve().parents[2] / "topologies" / "local.yaml"

pytestmark = pytest.mark.integration


def test_a_tls_mesh_answers_queries_across_its_tiers(built_home: Path, tmp_path: Path,
                                                     heldout) -> None:
    images, _ = heldout
    with LocalMesh(LOCAL, home=built_home, run_dir=tmp_path / "run", use_addresses=False,
                   tls=True) as mesh:
        assert mesh.state is not None
        context = mesh.state.client_ssl()
        assert context is not None and mesh.url("edge-1").startswith("https://")
        for entry in (mesh.url("edge-1"), mesh.stream_url("edge-2")):
            with Client(entry, ssl=context) as client:
                near = client.infer("digits", images[:1], latency_ms=10)
                far = client.infer("digits", images[:1], latency_ms=250, min_accuracy=0.98)
            assert near.served_by.node.startswith("edge-")
            # forwarded over TLS through the link emulators; the next node honoured the
            # route because the edge's certificate says it is a node of the mesh
            assert far.served_by.tier in ("intermediate", "core")
            assert far.served_by.variant == "digits-cnn"
            assert far.plan.handed_back is None and far.slo_met

        rows = asyncio.run(fetch_status(mesh.state.nodes, context))  # what mesh status shows
        assert all(row["up"] for row in rows)
        # heartbeats over TLS count: mid-1 hears both edges (a refused one never would)
        deadline = time.monotonic() + 20
        while True:
            with urllib.request.urlopen(mesh.url("mid-1") + "/v1/membership",
                                        context=context, timeout=5) as resp:
                children = json.load(resp)["children"]
            if all(children.get(e, {}).get("last_heard_s", 99) < 2 for e in ("edge-1", "edge-2")):
                break
            assert time.monotonic() < deadline, children
            time.sleep(0.2)
        with Client(mesh.url("edge-1").replace("https://", "http://"), timeout_s=3) as client:
            with pytest.raises(MeshConnectionError):  # no plain-text way in
                client.infer("digits", images[:1])
