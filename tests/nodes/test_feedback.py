"""Accuracy stays measured: applications' ground truth moves the planner off a variant that
no longer delivers what it promised."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mesh import AsyncClient
from mesh.accuracy import LiveAccuracy
from mesh.errors import AnswerNotFound, InvalidInput


async def test_wrong_answers_reported_by_the_application_stop_a_variant_being_chosen(
        solo_config: Any, serving: Any, heldout: Any) -> None:
    images, _ = heldout
    config = solo_config(["digits-linear", "digits-mlp", "digits-cnn"])
    async with serving(config) as (agent, server):
        agent.live = LiveAccuracy(min_samples=5)
        url = str(server.make_url("")).rstrip("/")
        async with AsyncClient(url) as client:
            for i in range(5):
                r = await client.infer("digits", images[i:i + 1], min_accuracy=0.99)
                assert r.served_by.variant == "digits-cnn" and r.slo_met
                wrong = (int(r.output.argmax(1)[0]) + 1) % 10  # the application says: wrong
                told = await client.feedback(r.request_id, wrong)
                assert told["variant"] == "digits-cnn" and told["correct"] == 0

            after = await client.infer("digits", images[9:10], min_accuracy=0.99)
            # nothing delivers 0.99 any more: the answer says so, with the live figure
            assert not after.slo_met and after.plan is not None and not after.plan.feasible
            assert after.plan.accuracy is not None and after.plan.accuracy < 0.99
            right = await client.infer("digits", images[:3], min_accuracy=0.95)
            told = await client.feedback(right.request_id, right.output.argmax(1))
            assert told["correct"] == 3

            with pytest.raises(AnswerNotFound):
                await client.feedback("never-asked", 3)
            with pytest.raises(InvalidInput, match="one per row"):
                await client.feedback(right.request_id, [1])  # three rows, one label
            with pytest.raises(InvalidInput, match="integer class"):
                await client.feedback(right.request_id, np.array([0.5, 1.5, 2.5]))
        live = agent.status()["live_accuracy"]["digits-cnn"]
        assert live["below_promise"] is True and live["samples"] == 5 and live["live"] == 0.0


async def test_oip_clients_report_ground_truth_by_the_id_their_answer_carried(
        solo_config: Any, serving: Any, heldout: Any) -> None:
    import aiohttp

    images, labels = heldout
    async with serving(solo_config(["digits-mlp"])) as (agent, server):
        url = str(server.make_url("")).rstrip("/")
        body = {"id": "oip-1", "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                                           "data": images[:2].astype(np.float32).ravel().tolist()}]}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v2/models/digits/infer", json=body) as resp:
                assert resp.status == 200, await resp.text()
                answer = await resp.json()
            assert answer["id"] == "oip-1"
            truth = [int(x) for x in labels[:2]]
            async with http.post(f"{url}/v2/models/digits/feedback",
                                 json={"id": "oip-1", "label": truth}) as resp:
                assert resp.status == 200, await resp.text()
                told = await resp.json()
            assert told["variant"] == "digits-mlp" and told["rows"] == 2
            assert agent.live.report({"digits-mlp": 0.97})["digits-mlp"].samples == 2
            # the answer was to digits, not to another model; a bad body names the field
            async with http.post(f"{url}/v2/models/text/feedback",
                                 json={"id": "oip-1", "label": truth}) as resp:
                assert resp.status == 404
            async with http.post(f"{url}/v2/models/digits/feedback",
                                 json={"request_id": "oip-1", "label": truth}) as resp:
                assert resp.status == 400 and "id (a string)" in (await resp.json())["error"]
