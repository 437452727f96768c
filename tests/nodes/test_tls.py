"""Nodes trust only nodes: mutual TLS on every hop, nodes known by their certificates."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest
from aiohttp import web

from mesh.certs import TlsFiles, ca_context, init_ca, issue, peer_node
from mesh.errors import MeshConnectionError
from mesh.registry import Registry
from mesh.state import MeshView
from mesh.stream import StreamClient
from mesh.topology import load_topology, parse_topology
from mesh.transport import HttpTransport, StreamTransport
from mesh.wire import SLO, InferRequest, Route, decode_answer, encode_request, pack
from nodes.agent import AgentConfig, NodeAgent
from nodes.app import error_middleware, make_app, runner_options
from nodes.identity import Callers, insecure_bind
from nodes.limits import NodeLimits
from nodes.membership import HEARTBEAT_PATH, LocalLoad, Membership
from nodes.stream import StreamServer

ROOT = Path(__file__).resolve().parents[2]
X = np.zeros((1, 64), np.float32)
MSGPACK = {"Content-Type": "application/msgpack"}


def _routed(node: str = "core-1", variant: str = "digits-cnn") -> bytes:
    return encode_request(InferRequest("digits", [X], route=Route(node, variant)))


@pytest.fixture
def pki(tmp_path: Path, edge_and_core: Any) -> dict[str, Any]:
    """A mesh CA with certificates for edge-1 and core-1, and the means to forge others."""
    ca_dir = tmp_path / "ca"
    init_ca(ca_dir)
    other = tmp_path / "other-ca"  # another mesh's CA: same node names, different trust
    init_ca(other)
    stranger = parse_topology({  # a node the pair's topology does not have, same CA
        "name": "elsewhere", "hardware": {"box": {"kind": "cpu"}},
        "nodes": [{"name": "rogue-1", "tier": "edge", "hardware": "box"}]})
    return {"ca": ca_dir / "ca.pem",
            "edge-1": issue("edge-1", edge_and_core, ca_dir),
            "core-1": issue("core-1", edge_and_core, ca_dir),
            "foreign edge-1": issue("edge-1", edge_and_core, other),
            "rogue-1": issue("rogue-1", stranger, ca_dir)}


@contextlib.asynccontextmanager
async def _tls_node(config: AgentConfig) -> AsyncIterator[tuple[NodeAgent, str, str, StreamServer]]:
    """A node as ``python -m nodes`` serves it with TLS: (agent, https URL, tcp URL, stream)."""
    assert config.tls is not None
    context = config.tls.server_context()
    async with NodeAgent(config) as agent:
        limits = NodeLimits.for_agent(agent)
        async with StreamServer(agent, "127.0.0.1", 0, limits=limits, ssl=context) as stream:
            app = make_app(agent, limits=limits)
            Membership.for_agent(agent).add_routes(app)
            runner = web.AppRunner(app, access_log=None, **runner_options(config))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
            await site.start()
            port = runner.addresses[0][1]
            try:
                yield agent, f"https://127.0.0.1:{port}", f"tcp://127.0.0.1:{stream.port}", stream
            finally:
                await runner.cleanup()


async def _send(url: str, body: bytes, context: ssl.SSLContext | None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
    transport = (StreamTransport(url, ssl=context) if url.startswith("tcp://")
                 else HttpTransport(url, ssl=context, headers=headers))
    try:
        status, data = await transport.send(body, timeout_s=10, connect_timeout_s=5)
    finally:
        await transport.aclose()
    return status, msgpack.unpackb(data)


async def test_a_forwarded_query_crosses_a_mutual_tls_hop_over_http_and_over_the_stream(
        digits_home: Path, edge_and_core: Any, pki: dict[str, Any], heldout: Any) -> None:
    images, _ = heldout
    accurate = InferRequest("digits", [images[:1]], slo=SLO(min_accuracy=0.99))
    core = AgentConfig(node="core-1", topology=edge_and_core, home=digits_home,
                       tls=pki["core-1"])
    async with _tls_node(core) as (_, core_url, core_stream, stream):
        plain = core_url.replace("https://", "http://")  # as the topology writes addresses
        for stream_neighbours, via in (({"core-1": core_stream}, "stream"), ({}, "http")):
            edge = AgentConfig(node="edge-1", topology=edge_and_core, home=digits_home,
                               tls=pki["edge-1"], neighbours={"core-1": plain},
                               stream_neighbours=stream_neighbours)
            async with NodeAgent(edge) as agent:
                answer = await agent.infer(dataclasses.replace(accurate))
                assert answer.served_by.node == "core-1", answer.plan
                assert answer.plan.handed_back is None
                assert agent.status()["forwarded_via"] == {via: 1}
                if via == "stream":  # the core knows the stream's other end by certificate
                    assert [c.peer for c in stream.connections] == ["edge-1"]


async def test_a_peer_without_a_mesh_certificate_for_a_node_of_the_topology_is_refused(
        digits_home: Path, edge_and_core: Any, pki: dict[str, Any]) -> None:
    core = AgentConfig(node="core-1", topology=edge_and_core, home=digits_home,
                       tls=pki["core-1"])
    async with _tls_node(core) as (agent, url, stream_url, _):
        # the real edge's certificate: its route is honoured, on both ports
        for target in (url, stream_url):
            status, body = await _send(target, _routed(), pki["edge-1"].client_context())
            assert status == 200 and body["served_by"]["variant"] == "digits-cnn"

        # another CA's certificate for the same name: the handshake fails
        for target in (url, stream_url):
            with pytest.raises(MeshConnectionError):
                await _send(target, _routed(), pki["foreign edge-1"].client_context())

        # this CA's certificate for a name outside the topology: 403, whatever is asked
        rogue = pki["rogue-1"].client_context()
        status, body = await _send(url, encode_request(InferRequest("digits", [X])), rogue)
        assert status == 403 and "'rogue-1': not a node" in body["error"]["message"]
        async with aiohttp.ClientSession() as session, \
                session.get(url + "/v1/status", ssl=rogue) as resp:
            assert resp.status == 403
        with pytest.raises(MeshConnectionError):  # the stream answers 403, then closes
            await _send(stream_url, _routed(), rogue)

        # no certificate: a client, who may query but not route; a mesh-key token (sent in
        # clear text on plain links) does not make it a node either
        client = ca_context(pki["ca"])
        token = agent.peers.headers("edge-1")
        for target, headers in ((url, None), (url, token), (stream_url, None)):
            status, body = await _send(target, _routed(), client, headers)
            assert status == 403 and "only mesh nodes" in body["error"]["message"]
        status, body = await _send(url, encode_request(InferRequest("digits", [X])), client)
        assert status == 200 and body["served_by"]["node"] == "core-1"

        # and nobody gets in over plain TCP
        with pytest.raises(MeshConnectionError):
            await _send(url.replace("https://", "http://"), _routed(), None)


async def test_artifacts_and_the_registry_are_pulled_over_tls_by_certificate_only(
        digits_home: Path, edge_and_core: Any, pki: dict[str, Any], tmp_path: Path) -> None:
    """An edge with an empty home gets the registry and its artifacts from its parent."""
    core = AgentConfig(node="core-1", topology=edge_and_core, home=digits_home,
                       tls=pki["core-1"])
    async with _tls_node(core) as (core_agent, url, _, _):
        sha = core_agent.registry.get("digits-linear").sha256
        for context in (ca_context(pki["ca"]), pki["rogue-1"].client_context()):
            async with aiohttp.ClientSession() as session, \
                    session.get(f"{url}/v1/artifacts/{sha}", ssl=context) as resp:
                assert resp.status == 403

        edge = AgentConfig(node="edge-1", topology=edge_and_core, home=tmp_path / "empty",
                           tls=pki["edge-1"],
                           neighbours={"core-1": url.replace("https://", "http://")})
        async with NodeAgent(edge) as agent:
            assert {"digits-linear", "digits-mlp"} <= set(agent.loaded)
            assert agent.artifacts.fetches["ok"] >= 2
            assert Registry.load(tmp_path / "empty").version == core_agent.registry.version


async def test_a_childs_heartbeat_over_tls_counts_and_a_forged_one_is_refused(
        tmp_path: Path) -> None:
    topology = load_topology(ROOT / "topologies" / "local.yaml")
    parent = "mid-1"
    child, sibling = sorted(topology.children[parent])
    ca = tmp_path / "ca"
    init_ca(ca)
    files = {n: issue(n, topology, ca) for n in (parent, child, sibling)}
    view = MeshView()
    membership = Membership(parent, topology, view, neighbours={},
                            local_load=lambda: LocalLoad(0, frozenset(), frozenset(), 0),
                            callers=Callers(topology.nodes, tls=True, key=None))
    app = web.Application(middlewares=[error_middleware])
    membership.add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=files[parent].server_context())
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        forged = pack({"node": child, "version": -1, "entries": [{"node": child, "q": 99}]})
        async with aiohttp.ClientSession() as session:
            for context in (ca_context(ca / "ca.pem"), files[sibling].client_context()):
                async with session.post(url + HEARTBEAT_PATH, data=forged, headers=MSGPACK,
                                        ssl=context) as resp:
                    assert resp.status == 403
        assert child not in view.loads  # nothing forged reached the view

        heard = Membership(child, topology, MeshView(),
                           neighbours={parent: url.replace("https://", "http://")},
                           local_load=lambda: LocalLoad(7, frozenset(), frozenset(), 0),
                           callers=Callers(topology.nodes, tls=True, key=None),
                           ssl=files[child].client_context())
        async with heard:
            async with asyncio.timeout(10):
                while child not in view.loads:
                    await asyncio.sleep(0.05)
        assert view.loads[child].queue_depth == 7
        assert heard.heartbeats_failed == 0
    finally:
        await runner.cleanup()


async def test_the_server_can_require_a_certificate_of_every_caller(
        pki: dict[str, Any]) -> None:
    """require_client_cert=True: a caller without a certificate fails the handshake."""
    seen: list[str | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(peer_node(writer.get_extra_info("ssl_object")))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(
        handle, "127.0.0.1", 0,
        ssl=pki["core-1"].server_context(require_client_cert=True))
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=pki["edge-1"].client_context())
        assert await reader.read() == b"ok"
        assert peer_node(writer.get_extra_info("ssl_object")) == "core-1"
        writer.close()
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ca_context(pki["ca"]))
        try:  # TLS 1.3: the refusal arrives after the client's side of the handshake
            got = await reader.read()
        except (ssl.SSLError, ConnectionError):
            got = b""
        assert got == b""
        writer.close()
    assert seen == ["edge-1"]  # the handler never ran for the caller without one


@pytest.mark.parametrize("host, tls, allowed, refused", [
    ("127.0.0.1", False, False, False), ("::1", False, False, False),
    ("localhost", False, False, False), ("10.0.0.2", False, False, True),
    ("0.0.0.0", False, False, True), ("edge-1.example", False, False, True),
    ("10.0.0.2", True, False, False), ("10.0.0.2", False, True, False)])
def test_only_loopback_may_be_served_without_tls(host: str, tls: bool, allowed: bool,
                                                 refused: bool) -> None:
    problem = insecure_bind(host, tls=tls, allow_insecure=allowed)
    assert (problem is not None) == refused
    if problem is not None:
        assert host in problem and "--tls-dir" in problem and "--insecure" in problem


async def test_a_node_refuses_to_start_off_loopback_without_tls_or_with_broken_tls_files(
        solo_config: Any, tmp_path: Path) -> None:
    from nodes.__main__ import serve

    config = solo_config(["digits-linear"], options={"host": "10.9.8.7"})
    with pytest.raises(SystemExit, match=r"10\.9\.8\.7 without TLS.*--tls-dir"):
        await serve(config, "http://10.9.8.7:7101")
    missing = TlsFiles.in_dir(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match=r"ca\.pem does not exist.*mesh certs issue"):
        await serve(dataclasses.replace(config, tls=missing), "http://10.9.8.7:7101")


async def test_a_client_reaches_a_tls_node_through_the_sdk_with_an_ssl_context(
        digits_home: Path, edge_and_core: Any, pki: dict[str, Any]) -> None:
    """Client-facing TLS: the SDK passes ``ssl=``; the node serves it as a client."""
    from mesh import AsyncClient

    core = AgentConfig(node="core-1", topology=edge_and_core, home=digits_home,
                       tls=pki["core-1"])
    async with _tls_node(core) as (_, url, stream_url, _):
        async with AsyncClient([stream_url, url], ssl=ca_context(pki["ca"])) as client:
            result = await client.infer("digits", X)
        assert result.served_by.node == "core-1"
        async with StreamClient.from_url(stream_url, ssl=ca_context(pki["ca"])) as c:
            answer = decode_answer(*await c.send(encode_request(InferRequest("digits", [X]))))
        assert answer.served_by.node == "core-1"
