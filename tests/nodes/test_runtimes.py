"""Each runtime serves a real model through a node agent (load, batch, answer)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.errors import Unavailable
from mesh.registry import Profile, Registry, TensorSpec, Variant
from mesh.runtimes import BACKENDS, Backend, runtime_for
from mesh.store import ArtifactStore
from mesh.topology import parse_topology
from mesh.wire import InferRequest, Route
from nodes.agent import AgentConfig, NodeAgent
from nodes.batching import BatchSettings


def test_a_missing_backend_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BACKENDS, "nothing", Backend("no_such_module_here", "Runtime",
                                                     "pip install 'tiermesh[nothing]'"))
    with pytest.raises(Unavailable, match=r"no_such_module_here missing.*tiermesh\[nothing\]"):
        runtime_for("nothing")
    with pytest.raises(Unavailable, match="no runtime for format 'gguf'"):
        runtime_for("gguf")


async def test_onnx_serves_the_digits_variants_in_batches(solo_config: Any, heldout: Any) -> None:
    images, labels = heldout
    # through the compute thread, so that requests arriving together run together
    config = solo_config(["digits-*"], options={"batching": BatchSettings(inline_max_ms=0.0)})
    async with NodeAgent(config) as agent:
        for name in ("digits-linear", "digits-mlp", "digits-cnn"):
            answers = await asyncio.gather(*(
                agent.infer(InferRequest("digits", [images[i:i + 4]], route=Route("solo-1", name)))
                for i in range(0, 200, 4)))
            probs = np.concatenate([a.outputs[0] for a in answers])
            assert probs.shape == (200, 10)
            assert (probs.argmax(1) == labels[:200]).mean() >= 0.9, name
            assert max(a.timing["batch_rows"] for a in answers) > 4  # batched together


def _tiny_module() -> Any:
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3)).eval()


def _register(home: Path, name: str, fmt: str, data: bytes) -> None:
    store = ArtifactStore(home / "store")
    registry = Registry.load(home)
    registry.add(Variant(
        name=name, task="tiny", family="tiny", arch="mlp", format=fmt, precision="fp32",
        sha256=store.put_bytes(data), size_bytes=len(data), accuracy=0.5, accuracy_metric="top1",
        macs=64 * 16 + 16 * 3, inputs=(TensorSpec("x", "float32", (-1, 64)),),
        outputs=(TensorSpec("y", "float32", (-1, 3)),), max_batch=8,
        profiles={"cpu-1t": Profile(batch_ms={1: 0.05, 8: 0.1})}))
    registry.save(home)


async def _serve_and_compare(home: Path, name: str, module: Any, rtol: float) -> None:
    import torch
    topology = parse_topology({
        "name": "solo", "hardware": {"box": {"kind": "cpu", "threads": 1}},
        "nodes": [{"name": "solo-1", "tier": "core", "hardware": "box", "variants": [name]}]})
    x = np.random.default_rng(1).random((20, 64)).astype(np.float32)
    async with NodeAgent(AgentConfig(node="solo-1", topology=topology, home=home)) as agent:
        assert set(agent.loaded) == {name}, agent.unavailable
        answers = await asyncio.gather(*(agent.infer(InferRequest("tiny", [x[i:i + 2]]))
                                         for i in range(0, 20, 2)))
    got = np.concatenate([a.outputs[0] for a in answers])
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=1e-5)
    assert {a.served_by.variant for a in answers} == {name}


async def test_torch_serves_an_exported_program(digits_home: Path) -> None:
    from mesh.variants import convert
    module = _tiny_module()
    sample = np.random.default_rng(0).random((4, 64)).astype(np.float32)
    _register(digits_home, "tiny-torch", "torch", convert.torch_artifact(module, [sample]))
    await _serve_and_compare(digits_home, "tiny-torch", module, rtol=1e-5)


async def test_litert_serves_a_converted_model(digits_home: Path) -> None:
    # `make test` installs the litert and convert extras: a missing one must fail, not skip
    from mesh.variants import convert

    module = _tiny_module()
    sample = np.random.default_rng(0).random((4, 64)).astype(np.float32)
    data = convert.tflite_from_torch(module, [sample], int8=False)
    _register(digits_home, "tiny-tflite", "tflite", data)
    await _serve_and_compare(digits_home, "tiny-tflite", module, rtol=1e-4)
