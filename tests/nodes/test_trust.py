"""Only mesh nodes choose where a query runs: clients' routes are refused, peers' are checked."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest

from mesh.errors import MeshConnectionError
from mesh.registry import Registry
from mesh.stream import StreamClient
from mesh.wire import InferRequest, Route, decode_answer, encode_request
from nodes.peers import PEER_HEADER, TOKEN_HEADER, PeerKey
from nodes.stream import StreamServer

X = np.zeros((1, 64), np.float32)
MSGPACK = {"Content-Type": "application/msgpack"}


def _routed(variant: str, node: str = "solo-1", task: str = "digits") -> bytes:
    return encode_request(InferRequest(task, [X], route=Route(node, variant)))


async def _post(url: str, body: bytes, headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(
            url + "/v1/infer", data=body, headers={**MSGPACK, **(headers or {})}) as resp:
        return resp.status, msgpack.unpackb(await resp.read())


@pytest.fixture
def two_tasks(digits_home: Path) -> Path:
    """The digits home plus a second task whose variant reuses the linear model's artifact."""
    registry = Registry.load(digits_home)
    linear = registry.get("digits-linear")
    registry.add(dataclasses.replace(linear, name="other-linear", task="other"))
    registry.save(digits_home)
    return digits_home


async def test_a_client_route_is_refused_403_over_http_and_the_stream(
        solo_config: Any, serving: Any) -> None:
    async with serving(solo_config(["digits-*"])) as (agent, server):
        url = str(server.make_url("")).rstrip("/")
        status, body = await _post(url, _routed("digits-linear"))
        assert status == 403
        assert body["error"]["type"] == "Forbidden"
        assert "only mesh nodes" in body["error"]["message"]
        async with StreamServer(agent, "127.0.0.1", 0) as stream:
            async with StreamClient("127.0.0.1", stream.port) as client:
                status, payload = await client.send(_routed("digits-linear"))
        assert status == 403
        # a forged peer header with a wrong token is a client like any other
        status, body = await _post(url, _routed("digits-linear"),
                                   {PEER_HEADER: "solo-1", TOKEN_HEADER: "00" * 32})
        assert status == 403
        # and the node still serves everyone who did not try to route
        status, body = await _post(url, encode_request(InferRequest("digits", [X])))
        assert status == 200


async def test_a_peer_route_is_honoured_only_for_a_hosted_variant_of_the_task(
        two_tasks: Path, solo_config: Any, serving: Any) -> None:
    config = solo_config(["digits-linear", "digits-mlp", "other-linear"])
    async with serving(config) as (agent, server):
        url = str(server.make_url("")).rstrip("/")
        peer = agent.peers.headers("edge-9")  # any holder of the mesh key is a node
        status, body = await _post(url, _routed("digits-mlp"), peer)
        assert status == 200 and body["served_by"]["variant"] == "digits-mlp"

        # the linear model of another task takes the same tensors: still refused
        status, body = await _post(url, _routed("other-linear"), peer)
        assert status == 400
        assert "does not serve task 'digits'" in body["error"]["message"]
        status, body = await _post(url, _routed("digits-linear", node="nowhere-7"), peer)
        assert status == 400 and "not a node of this mesh" in body["error"]["message"]
        status, body = await _post(url, _routed("digits-cnn"), peer)  # not hosted here
        assert status == 400 and "hosts no variant 'digits-cnn'" in body["error"]["message"]

        # over the stream, a HELLO with the mesh's token makes the connection a peer's
        async with StreamServer(agent, "127.0.0.1", 0) as stream:
            async with StreamClient("127.0.0.1", stream.port,
                                    hello=agent.peers.hello("edge-9")) as client:
                answer = decode_answer(*await client.send(_routed("digits-mlp")))
            assert answer.served_by.variant == "digits-mlp"
            stranger = PeerKey(b"x" * 32)  # another mesh's key
            async with StreamClient("127.0.0.1", stream.port,
                                    hello=stranger.hello("edge-9")) as client:
                with pytest.raises(MeshConnectionError):  # a bad HELLO closes the connection
                    await client.send(_routed("digits-mlp"))


def test_nodes_sharing_a_home_share_one_mesh_key(tmp_path: Path) -> None:
    first, second = PeerKey.for_home(tmp_path), PeerKey.for_home(tmp_path)
    assert first.verify("edge-1", second.token("edge-1"))
    assert not first.verify("edge-2", second.token("edge-1"))
    assert (tmp_path / "mesh.key").stat().st_mode & 0o077 == 0  # owner only


async def test_only_a_child_may_heartbeat_and_only_signed(digits_home: Path) -> None:
    """A forged heartbeat could mark nodes down or loaded at will; it is refused 403."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from mesh.state import MeshView
    from mesh.topology import load_topology
    from mesh.wire import pack
    from nodes.app import error_middleware
    from nodes.membership import HEARTBEAT_PATH, LocalLoad, Membership

    topology = load_topology(Path(__file__).resolve().parents[2] / "topologies" / "local.yaml")
    parent = next(n for n in topology.nodes if topology.children[n])
    child = topology.children[parent][0]
    key = PeerKey(b"k" * 32)
    view = MeshView()
    membership = Membership(parent, topology, view, neighbours={},
                            local_load=lambda: LocalLoad(0, frozenset(), frozenset(), 0),
                            peers=key)
    app = web.Application(middlewares=[error_middleware])
    membership.add_routes(app)
    body = pack({"node": child, "version": -1,
                 "entries": [{"node": child, "q": 7}]})
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        url = str(server.make_url(HEARTBEAT_PATH))
        for headers in ({}, key.headers("someone-else"), PeerKey(b"x" * 32).headers(child)):
            async with session.post(url, data=body, headers={**MSGPACK, **headers}) as resp:
                assert resp.status == 403
        assert child not in view.loads  # nothing forged reached the view
        async with session.post(url, data=body, headers={**MSGPACK, **key.headers(child)}) as r:
            assert r.status == 200
        assert view.loads[child].queue_depth == 7
