"""An agent's msgpack stream port: multiplexed queries, typed errors, clean shutdown."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import numpy as np
import pytest

from mesh.errors import InvalidInput, MeshConnectionError, UnknownTask
from mesh.stream import ERROR, INFER, FrameReader, StreamClient, frame, frame_answer
from mesh.wire import InferRequest, unpack
from nodes.agent import NodeAgent
from nodes.stream import StreamServer


async def test_many_queries_share_one_connection_and_errors_come_back_typed(
        solo_config: Any, heldout: Any) -> None:
    images, labels = heldout
    async with NodeAgent(solo_config(["digits-*"])) as agent, \
            StreamServer(agent, "127.0.0.1", 0) as server:
        async with StreamClient("127.0.0.1", server.port) as client:
            answers = await asyncio.gather(*(
                client.infer(InferRequest("digits", [images[i:i + 1]])) for i in range(40)))
            probs = np.concatenate([a.outputs[0] for a in answers])
            assert (probs.argmax(1) == labels[:40]).mean() >= 0.85
            assert {a.served_by.node for a in answers} == {"solo-1"}
            with pytest.raises(UnknownTask, match="'speech' is not registered"):
                await client.infer(InferRequest("speech", [images[:1]]))
            with pytest.raises(InvalidInput, match="takes float32"):
                await client.infer(InferRequest("digits", [images[:1].astype(np.float64)]))
            assert (await client.infer(InferRequest("digits", [images[:2]]))).outputs[0].shape == (2, 10)

        # raw bytes: a frame that is not msgpack gets an ERROR frame with its request id
        reader = FrameReader()
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            await asyncio.to_thread(raw.sendall, frame(42, INFER, b"\xc1 not msgpack"))
            frames: list[tuple[int, int, bytes]] = []
            while not frames:
                frames = reader.feed(await asyncio.to_thread(raw.recv, 65536))
        ((request_id, kind, payload),) = frames
        assert (request_id, kind) == (42, ERROR)
        status, body = frame_answer(kind, payload)
        assert status == 400 and unpack(body)["error"]["type"] == "InvalidInput"
    with pytest.raises(MeshConnectionError):
        async with StreamClient("127.0.0.1", server.port):
            pass


async def test_a_saturated_node_refuses_client_queries_before_decoding_them(
        solo_config: Any, heldout: Any) -> None:
    from mesh.errors import Overloaded

    images, labels = heldout
    async with NodeAgent(solo_config(["digits-*"])) as agent, \
            StreamServer(agent, "127.0.0.1", 0) as server:
        async with StreamClient("127.0.0.1", server.port) as client:
            ok = await client.infer(InferRequest("digits", [images[:1]]))
            assert int(ok.outputs[0].argmax()) == labels[0]
            # the loop fell 200 ms behind: queries read now would start late anyway
            now = asyncio.get_running_loop().time()
            server.started(now - 0.2, now)
            with pytest.raises(Overloaded, match="saturated") as refused:
                await client.infer(InferRequest("digits", [images[:1]]))
            assert refused.value.retry_after_s == server.retry_after_s and server.shed == 1
            # the estimate relaxes while nothing starts: the node serves again by itself
            await asyncio.sleep(20 * server.lag_half_life_s)
            ok = await client.infer(InferRequest("digits", [images[1:2]]))
            assert int(ok.outputs[0].argmax()) == labels[1]
