"""Offline jobs: a large batch on idle capacity, in order, never in online queries' way."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from mesh import AsyncClient, Client
from mesh.errors import MeshTimeout
from mesh.wire import InferRequest


async def test_an_offline_job_answers_every_row_in_order_while_online_queries_keep_their_slo(
        solo_config: Any, serving: Any, heldout: Any) -> None:
    images, labels = heldout
    batch = images[:300]
    async with serving(solo_config(["digits-linear", "digits-cnn"])) as (agent, server):
        url = str(server.make_url("")).rstrip("/")
        async with AsyncClient(url) as client:
            job = client.submit("digits", batch, chunk_rows=32, concurrency=3)
            online = await asyncio.gather(*(
                client.infer("digits", images[i:i + 1], latency_ms=200, min_accuracy=0.99)
                for i in range(20)))
            outputs = await job.result()
        assert job.progress == 1.0 and job.done
        assert all(r.slo_met for r in online)
        assert outputs[0].shape == (300, 10)
        # the cheapest variant that answers digits, row for row in the input's order
        direct = await agent.infer(InferRequest("digits", [batch]))
        np.testing.assert_allclose(outputs[0], direct.outputs[0], rtol=1e-5, atol=1e-6)
        assert float(np.mean(outputs[0].argmax(1) == labels[:300])) > 0.9
        assert agent.status()["served_local"] >= 300 // 32


async def test_a_blocking_client_runs_a_job_on_its_own_thread_and_a_missed_deadline_says_how_far(
        solo_config: Any, serving: Any, heldout: Any) -> None:
    images, _ = heldout
    async with serving(solo_config(["digits-linear"])) as (_, server):
        url = str(server.make_url("")).rstrip("/")

        def run() -> tuple[list[np.ndarray], float]:
            with Client(url) as client:
                job = client.submit("digits", images[:100], chunk_rows=25)
                return job.result(timeout_s=30), job.progress

        outputs, progress = await asyncio.to_thread(run)
        assert progress == 1.0 and outputs[0].shape == (100, 10)

        def late() -> None:
            with Client(url) as client:
                client.submit("digits", images[:100], chunk_rows=1, deadline_s=1e-6).result(30)

        with pytest.raises(MeshTimeout, match="missed its deadline with"):
            await asyncio.to_thread(late)
