"""The Open Inference Protocol v2 surface, with plain HTTP and an unmodified Triton client."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import numpy as np

# the dev extra installs tritonclient: a standard client must work unmodified, never skip
import tritonclient.http as tritonhttp
import tritonclient.utils as triton_utils

from mesh.wire import InferRequest, Route
from nodes.oip import HEADER_LENGTH


def _json_request(x: np.ndarray, **parameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": "q-1", "inputs": [
        {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    if parameters:
        body["parameters"] = parameters
    return body


async def test_health_metadata_and_readiness(solo_config: Any, serving: Any) -> None:
    async with serving(solo_config(["digits-*"])) as (_, server), aiohttp.ClientSession() as s:
        url = str(server.make_url("")).rstrip("/")
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/digits/ready"):
            async with s.get(url + path) as resp:
                assert resp.status == 200, path
        async with s.get(url + "/v2") as resp:
            meta = await resp.json()
            assert meta["name"] == "tiermesh" and "binary_tensor_data" in meta["extensions"]
        async with s.get(url + "/v2/models/digits") as resp:
            model = await resp.json()
        assert model["name"] == "digits"
        assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        assert model["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}]
        assert set(model["versions"]) == {"digits-linear", "digits-mlp", "digits-cnn"}
        async with s.get(url + "/v2/models/speech") as resp:
            assert resp.status == 404 and "speech" in (await resp.json())["error"]
        async with s.get(url + "/v2/models/speech/ready") as resp:
            assert resp.status == 404


async def test_json_inference_carries_the_slo_and_says_who_served(
        solo_config: Any, serving: Any, heldout: Any) -> None:
    images, labels = heldout
    x = images[:8]
    async with serving(solo_config(["digits-*"])) as (_, server), aiohttp.ClientSession() as s:
        url = str(server.make_url("")).rstrip("/") + "/v2/models/digits/infer"
        async with s.post(url, json=_json_request(x, tiermesh_min_accuracy=0.99)) as resp:
            assert resp.status == 200 and resp.content_type == "application/json"
            body = await resp.json()
        assert body["model_name"] == "digits" and body["id"] == "q-1"
        params = body["parameters"]
        assert params["tiermesh_variant"] == "digits-cnn" == body["model_version"]
        assert params["tiermesh_node"] == "solo-1" and params["tiermesh_tier"] == "edge"
        assert params["tiermesh_feasible"] is True
        (out,) = body["outputs"]
        assert out["name"] == "probs" and out["datatype"] == "FP32" and out["shape"] == [8, 10]
        probs = np.asarray(out["data"], np.float32).reshape(8, 10)
        assert (probs.argmax(1) == labels[:8]).mean() >= 0.75
        async with s.post(url, json=_json_request(x, tiermesh_latency_ms="fast")) as resp:
            assert resp.status == 400
            assert "parameters.tiermesh_latency_ms" in (await resp.json())["error"]
        bad = _json_request(x)
        bad["inputs"][0]["shape"] = [8, 65]
        async with s.post(url, json=bad) as resp:
            assert resp.status == 400 and "expected 520 FP32 values" in (await resp.json())["error"]


async def test_binary_tensors_in_and_out(solo_config: Any, serving: Any, heldout: Any) -> None:
    images, _ = heldout
    x = np.ascontiguousarray(images[:5])
    header = json.dumps({"inputs": [
        {"name": "input", "shape": [5, 64], "datatype": "FP32",
         "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "probs", "parameters": {"binary_data": True}}]}).encode()
    async with serving(solo_config(["digits-*"])) as (agent, server), aiohttp.ClientSession() as s:
        url = str(server.make_url("")).rstrip("/") + "/v2/models/digits/infer"
        async with s.post(url, data=header + x.tobytes(),
                          headers={HEADER_LENGTH: str(len(header)),
                                   "Content-Type": "application/octet-stream"}) as resp:
            assert resp.status == 200
            raw = await resp.read()
            length = int(resp.headers[HEADER_LENGTH])
        meta = json.loads(raw[:length])
        (out,) = meta["outputs"]
        assert out["parameters"]["binary_data_size"] == 5 * 10 * 4 and "data" not in out
        probs = np.frombuffer(raw[length:], np.float32).reshape(5, 10)
        direct = await agent.infer(_request(x, meta["model_version"]))  # the same variant
        np.testing.assert_allclose(probs, direct.outputs[0], rtol=1e-6)
        async with s.post(url, data=header + x.tobytes()[:-4],
                          headers={HEADER_LENGTH: str(len(header))}) as resp:
            assert resp.status == 400 and "body ends before" in (await resp.json())["error"]


def _request(x: np.ndarray, variant: str) -> InferRequest:
    return InferRequest("digits", [x], route=Route("solo-1", variant))


async def test_an_unmodified_triton_client_works(solo_config: Any, serving: Any,
                                                  heldout: Any) -> None:
    images, labels = heldout
    x = np.ascontiguousarray(images[:16])

    def call(url: str) -> dict[str, Any]:
        client = tritonhttp.InferenceServerClient(url)
        try:
            out: dict[str, Any] = {"live": client.is_server_live(),
                                   "ready": client.is_model_ready("digits"),
                                   "meta": client.get_model_metadata("digits")}
            for binary in (False, True):
                inp = tritonhttp.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary)
                wanted = tritonhttp.InferRequestedOutput("probs", binary_data=binary)
                result = client.infer("digits", [inp], outputs=[wanted],
                                      parameters={"tiermesh_min_accuracy": 0.99})
                out[f"probs_{binary}"] = result.as_numpy("probs")
                out[f"response_{binary}"] = result.get_response()
            inp = tritonhttp.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            out["default"] = client.infer("digits", [inp]).as_numpy("probs")  # binary both ways
            try:
                client.infer("speech", [inp])
            except triton_utils.InferenceServerException as exc:
                out["unknown"] = (exc.status(), exc.message())
            return out
        finally:
            client.close()

    async with serving(solo_config(["digits-*"])) as (_, server):
        got = await asyncio.to_thread(call, f"127.0.0.1:{server.port}")
    assert got["live"] and got["ready"]
    assert got["meta"]["inputs"][0]["name"] == "input"
    for binary in (False, True):
        probs = got[f"probs_{binary}"]
        assert probs.shape == (16, 10) and probs.dtype == np.float32
        assert (probs.argmax(1) == labels[:16]).mean() >= 0.8
        assert got[f"response_{binary}"]["parameters"]["tiermesh_variant"] == "digits-cnn"
    np.testing.assert_allclose(got["probs_False"], got["probs_True"], rtol=1e-6)
    assert got["default"].shape == (16, 10)
    assert got["unknown"][0] == "404" and "speech" in got["unknown"][1]
