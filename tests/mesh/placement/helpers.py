"""Registries, topologies and checks shared by the placement tests.

The registry looks like the bundled families once they are real families
(issue 11, item 1): the digits CNN as ONNX fp32/int8, TFLite fp32/int8, the
torch original and a distilled student, beside the linear and MLP models;
MiniLM as ONNX fp32/int8, TFLite int8 and torch. Figures are of the order
measured on this machine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mesh.placement import Placement
from mesh.placement.resources import MIB, NodeResources, hosted_bytes, variant_memory_bytes
from mesh.registry import Profile, Registry, TensorSpec, Variant
from mesh.topology import Topology, parse_topology, without_variants

ROOT = Path(__file__).resolve().parents[3]


def make_variant(name: str, task: str, accuracy: float, b1_ms: float, memory_mb: float, *,
                 fmt: str = "onnx", precision: str = "fp32", cold_ms: float = 50.0,
                 profiles: dict[str, float] | None = None, device: str = "cpu") -> Variant:
    """A variant whose batch-1 latency is ``b1_ms`` (per profile key: ``profiles``)."""
    by_key = profiles or {"cpu-1t": b1_ms, "cpu-2t": b1_ms * 0.7}
    return Variant(
        name=name, task=task, family=task, arch="x", format=fmt, precision=precision,
        sha256=(name.encode().hex() * 64)[:64], size_bytes=int(memory_mb * MIB / 3),
        accuracy=accuracy, accuracy_metric="top1", macs=1000,
        inputs=(TensorSpec("input", "float32", (-1, 64)),),
        outputs=(TensorSpec("probs", "float32", (-1, 10)),), device=device,
        profiles={key: Profile({1: ms, 8: ms * 4, 32: ms * 14}, cold_start_ms=cold_ms,
                               peak_memory_bytes=int(memory_mb * MIB))
                  for key, ms in by_key.items()})


DIGITS = (
    make_variant("digits-linear", "digits", 0.961, 0.004, 6.5),
    make_variant("digits-mlp", "digits", 0.972, 0.006, 6.7),
    make_variant("digits-cnn-student", "digits", 0.985, 0.010, 7.0),
    make_variant("digits-cnn-tflite-int8", "digits", 0.994, 0.015, 7.5, fmt="tflite",
                 precision="int8"),
    make_variant("digits-cnn-onnx-int8", "digits", 0.995, 0.020, 8.0, precision="int8"),
    make_variant("digits-cnn-onnx-fp32", "digits", 0.996, 0.040, 10.0),
    make_variant("digits-cnn-tflite-fp32", "digits", 0.996, 0.050, 11.0, fmt="tflite"),
    make_variant("digits-cnn-torch", "digits", 0.996, 0.300, 60.0, fmt="torch"),
)
MINILM = (
    make_variant("minilm-tflite-int8", "sentence-embedding", 0.990, 4.0, 100.0, fmt="tflite",
                 precision="int8"),
    make_variant("minilm-onnx-int8-dynamic", "sentence-embedding", 0.993, 3.3, 110.0,
                 precision="int8"),
    make_variant("minilm-onnx-fp32", "sentence-embedding", 0.999999, 8.3, 215.0),
    make_variant("minilm-torch-fp32", "sentence-embedding", 1.0, 17.4, 294.0, fmt="torch"),
)


def registry_of(*variants: Variant) -> Registry:
    return Registry({v.name: v for v in variants})


def bundled() -> Registry:
    """Both families, every variant."""
    return registry_of(*DIGITS, *MINILM)


def shipped(name: str, *, strip: bool = True,
            edit: Callable[[dict[str, Any]], None] | None = None) -> Topology:
    """A shipped topology file, by default with no globs at all (allow and deny lists
    stripped); ``strip=False``: as shipped, its globs the constraints placement works within."""
    doc = yaml.safe_load((ROOT / "topologies" / f"{name}.yaml").read_text())
    if strip:
        without_variants(doc, deny=True)
    if edit is not None:
        edit(doc)
    return parse_topology(doc, source=f"{name}.yaml")


def memory_used(topology: Topology, registry: Registry, placement: Placement,
                node: str) -> tuple[int, int]:
    """(bytes used, budget) on ``node`` as placement reckons them (host memory)."""
    res = NodeResources.of(topology.hardware_of(node))
    used = 0
    for name, workers in placement.variants(node).items():
        v = registry.get(name)
        used += hosted_bytes(variant_memory_bytes(v, v.profile_for(res.profile_key), 3.0),
                             workers, 1.0)
    return used, res.memory_bytes


def assert_within_memory(topology: Topology, registry: Registry, placement: Placement) -> None:
    for node in placement.nodes():
        used, budget = memory_used(topology, registry, placement, node)
        assert used <= budget, f"{node} uses {used / MIB:.0f} MB of {budget / MIB:.0f} MB"


def assert_every_task_reachable(topology: Topology, registry: Registry,
                                placement: Placement) -> None:
    """Every edge node has a host of every task on its path up to its root."""
    for entry in topology.nodes_in_tier("edge"):
        path = [entry, *topology.ancestors(entry)]
        for task in registry.tasks():
            hosts = [n for n in path for v in placement.variants(n)
                     if registry.get(v).task == task]
            assert hosts, f"{task} has no host on the path of {entry}: {path}"
