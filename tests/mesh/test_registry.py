"""The registry file: round trips, older files, rejected variants kept apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mesh.errors import UnknownTask
from mesh.registry import REGISTRY_FILE, LatencyFit, Profile, Registry, Rejection, TensorSpec, Variant


def _variant(name: str, family: str = "fam", **extra: object) -> Variant:
    return Variant(
        name=name, task="t", family=family, arch="original", format="onnx", precision="fp32",
        sha256="a" * 64, size_bytes=10, accuracy=0.9, accuracy_metric="top1", macs=0,
        inputs=(TensorSpec("input", "float32", (-1, 4)),),
        outputs=(TensorSpec("output", "float32", (-1, 2)),), **extra)  # type: ignore[arg-type]


def test_factory_fields_survive_a_save_and_load(tmp_path: Path) -> None:
    profile = Profile({1: 0.5, 32: 3.0}, cold_start_ms=12.0, peak_memory_bytes=4096,
                      fit=LatencyFit(0.4, 0.08, 0.05))
    variant = _variant("fam-onnx-int8", parent="fam-torch-fp32", quantization="static",
                       agreement={"top1_agreement": 0.99}, assets={"tokenizer.json": "b" * 64},
                       profiles={"cpu-1t": profile})
    registry = Registry()
    registry.add(variant)
    registry.reject(Rejection("fam-tflite-int8", "t", "fam", "tflite", "int8", "agreement",
                              "disagrees", {"top1_agreement": 0.1}))
    registry.save(tmp_path)
    loaded = Registry.load(tmp_path)
    assert loaded.get("fam-onnx-int8") == variant
    assert loaded.rejected == registry.rejected
    assert loaded.get("fam-onnx-int8").profiles["cpu-1t"].fit == LatencyFit(0.4, 0.08, 0.05)


def test_a_registry_written_before_the_factory_still_loads(tmp_path: Path) -> None:
    old = _variant("digits-mlp").to_json()
    for key in ("parent", "quantization", "device", "agreement", "assets"):
        del old[key]
    old["profiles"] = {"cpu-1t": {"batch_ms": {"1": 0.1, "8": 0.3}, "cold_start_ms": 1.0}}
    (tmp_path / REGISTRY_FILE).write_text(json.dumps({"schema": 1, "variants": {"digits-mlp": old}}))
    loaded = Registry.load(tmp_path)
    variant = loaded.get("digits-mlp")
    assert (variant.parent, variant.device, variant.agreement) == ("", "cpu", {})
    profile = variant.profiles["cpu-1t"]
    assert (profile.peak_memory_bytes, profile.fit) == (0, None)
    assert profile.latency_ms(8) == 0.3
    assert loaded.rejected == {}


def test_rejections_are_not_variants(tmp_path: Path) -> None:
    registry = Registry()
    registry.add(_variant("fam-onnx-fp32"))
    registry.reject(Rejection("fam-onnx-int8", "t", "fam", "onnx", "int8", "convert", "boom"))
    assert [v.name for v in registry.for_task("t")] == ["fam-onnx-fp32"]
    with pytest.raises(KeyError):
        registry.get("fam-onnx-int8")
    # A later accepted build of the same name clears the rejection, and the reverse.
    registry.add(_variant("fam-onnx-int8"))
    assert "fam-onnx-int8" not in registry.rejected
    registry.reject(Rejection("fam-onnx-fp32", "t", "fam", "onnx", "fp32", "run", "broken"))
    assert "fam-onnx-fp32" not in registry.variants


def test_remove_family_drops_only_that_family() -> None:
    registry = Registry()
    registry.add(_variant("a-onnx-fp32", family="a"))
    registry.add(_variant("b-onnx-fp32", family="b"))
    registry.reject(Rejection("a-onnx-int8", "t", "a", "onnx", "int8", "agreement", "x"))
    assert registry.remove_family("a") == ["a-onnx-fp32", "a-onnx-int8"]
    assert list(registry.variants) == ["b-onnx-fp32"] and registry.rejected == {}
    registry.remove_family("b")
    with pytest.raises(UnknownTask):
        registry.for_task("t")


_WRITER = """
import sys
from mesh.registry import Registry, TensorSpec, Variant

home, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()  # every writer starts at once
for i in range(count):
    registry = Registry.load(home)  # the usual cycle: load, change, save
    registry.add(Variant(
        name=f"{prefix}-{i}", task="t", family=prefix, arch="original", format="onnx",
        precision="fp32", sha256="a" * 64, size_bytes=10, accuracy=0.9,
        accuracy_metric="top1", macs=0, inputs=(TensorSpec("input", "float32", (-1, 4)),),
        outputs=(TensorSpec("output", "float32", (-1, 2)),)))
    registry.save(home)
"""


def test_processes_saving_at_once_lose_no_update(tmp_path: Path) -> None:
    writers, count = 4, 50
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=root)  # the same mesh package as this test
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), f"w{k}", str(count)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
             for k in range(writers)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.close()
        assert [proc.wait(timeout=120) for proc in procs] == [0] * writers
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    saved = Registry.load(tmp_path).variants
    missing = sorted({f"w{k}-{i}" for k in range(writers) for i in range(count)} - set(saved))
    assert missing == [], f"{len(missing)} of {writers * count} updates lost"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_save_keeps_changes_other_writers_saved_meanwhile(tmp_path: Path) -> None:
    first = Registry.load(tmp_path)
    second = Registry.load(tmp_path)
    first.add(_variant("a-onnx-fp32", family="a"))
    first.add(_variant("b-onnx-fp32", family="b"))
    first.save(tmp_path)
    second.add(_variant("c-onnx-fp32", family="c"))
    second.remove_family("a")  # applies to what is on disk when saving, not when loaded
    second.save(tmp_path)
    assert sorted(Registry.load(tmp_path).variants) == ["b-onnx-fp32", "c-onnx-fp32"]
    assert sorted(second.variants) == ["b-onnx-fp32", "c-onnx-fp32"]  # it now sees the file


def test_every_saving_change_raises_the_version_and_a_newer_copy_is_adopted(tmp_path: Path) -> None:
    core, edge = tmp_path / "core", tmp_path / "edge"
    registry = Registry()
    registry.add(_variant("a"))
    registry.save(core)
    assert Registry.load(core).version == 1
    registry.add(_variant("b"))
    registry.save(core)
    registry.save(core)  # nothing changed: the version stays
    assert Registry.load(core).version == 2
    parent = Registry.from_document(Registry.load(core).to_document())
    assert parent.adopt(edge) and Registry.load(edge).version == 2
    assert set(Registry.load(edge).variants) == {"a", "b"}
    assert not parent.adopt(edge)  # not newer than what the edge holds
    with pytest.raises(ValueError, match="registry.version"):
        Registry.from_document({"variants": {}, "version": -1})


def test_planning_with_live_accuracy_leaves_the_registry_and_its_file_alone(tmp_path: Path) -> None:
    registry = Registry({"a": _variant("a"), "b": replace(_variant("b"), accuracy=0.8)})
    registry.save(tmp_path)
    planned = registry.with_accuracy({"a": 0.7})
    assert planned.variants["a"].accuracy == 0.7 and planned.variants["b"].accuracy == 0.8
    assert registry.variants["a"].accuracy == 0.9
    assert planned.version == registry.version == 1
    planned.save(tmp_path)  # nothing to write: the measured accuracy stays on disk
    assert Registry.load(tmp_path).variants["a"].accuracy == 0.9
