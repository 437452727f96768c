"""The bundled digits family: a real build (once per module), its registry, cache and store.

The CNN is the family's submitted model and goes through the variant factory;
the linear and MLP models are extra members trained and exported here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mesh.registry import REGISTRY_FILE, Profile, Registry, TensorSpec, Variant
from mesh.runtimes import runtime_for
from mesh.store import ArtifactStore
from mesh.variants import build, build_bundled, convert, digits
from mesh.variants.profile import profile_onnx

ROOT = Path(__file__).resolve().parents[3]
NAMES = ["digits-linear", "digits-mlp", "digits-cnn"]
"""The names the family had before the factory made it (many tests and docs use them)."""
ORIGINAL = "digits-cnn-torch-fp32"
FAMILY = [*NAMES, ORIGINAL, "digits-cnn-onnx-int8", "digits-cnn-tflite-fp32",
          "digits-cnn-tflite-int8", "digits-cnn-student-onnx-fp32"]
DIGITS = ("digits",)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Variant]]:
    home = tmp_path_factory.mktemp("home")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    variants = build_bundled(home, families=DIGITS, progress=False)
    # The build must leave torch's process-wide settings as it found them.
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (
        threads, deterministic)
    return home, variants


@pytest.fixture
def home_copy(built: tuple[Path, list[Variant]], tmp_path: Path) -> Path:
    """A private copy of the built home, for tests that change it."""
    return Path(shutil.copytree(built[0], tmp_path / "home"))


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the build retrained although its cache was valid")

    monkeypatch.setattr(digits, "train_variant", refuse)
    monkeypatch.setattr(digits, "train", refuse)


def _by_name(variants: list[Variant]) -> dict[str, Variant]:
    return {v.name: v for v in variants}


def _session(home: Path, variant: Variant) -> ort.InferenceSession:
    path = ArtifactStore(home / build.STORE_DIR).path(variant.sha256)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _probs(home: Path, variant: Variant, x: np.ndarray) -> np.ndarray:
    """``variant``'s answer to ``x``, run the way a node runs it (any format)."""
    runtime = runtime_for(variant.format)
    session = runtime.load(str(ArtifactStore(home / build.STORE_DIR).path(variant.sha256)),
                           threads=1)
    return np.concatenate([runtime.run(session, [x[i:i + 32]])[0] for i in range(0, len(x), 32)])


# --------------------------------------------------------------------------- the build


def test_build_keeps_the_three_onnx_variants_under_their_names(
        built: tuple[Path, list[Variant]]) -> None:
    home, variants = built
    assert [v.name for v in variants[:3]] == NAMES
    registry = Registry.load(home)
    for variant in variants[:3]:
        assert (variant.task, variant.family, variant.format, variant.precision) == (
            "digits", "digits", "onnx", "fp32")
        assert variant.name == f"digits-{variant.arch}"
        assert registry.get(variant.name) == variant


def test_the_family_is_the_cnn_made_by_the_factory_plus_the_small_models(
        built: tuple[Path, list[Variant]]) -> None:
    home, variants = built
    assert [v.name for v in variants] == FAMILY
    assert len({v.sha256 for v in variants}) == len(FAMILY)
    store = ArtifactStore(home / "store")
    registry = Registry.load(home)
    assert sorted(v.name for v in registry.for_task("digits")) == sorted(FAMILY)
    assert not [r for r in registry.rejected.values() if r.family == "digits"]
    v = _by_name(variants)
    assert {(x.format, x.precision, x.quantization) for n, x in v.items() if n not in NAMES[:2]} == {
        ("onnx", "fp32", ""), ("torch", "fp32", ""), ("onnx", "int8", "static"),
        ("tflite", "fp32", ""), ("tflite", "int8", "static"), ("onnx", "fp32", "")}
    for variant in variants:
        assert store.verify(variant.sha256)
        assert variant.size_bytes == store.path(variant.sha256).stat().st_size
        assert registry.get(variant.name) == variant
        assert (variant.task, variant.family, variant.accuracy_metric) == ("digits", "digits",
                                                                          "top1")
        assert variant.inputs == (TensorSpec("input", "float32", (-1, 64)),)
        assert variant.outputs == (TensorSpec("probs", "float32", (-1, 10)),)
        assert variant.max_batch == 32
        assert variant.build_key == build.build_key()
    # Every variant the factory made names the torch original it was checked against.
    assert v[ORIGINAL].parent == "" and v[ORIGINAL].arch == "cnn"
    assert {v[n].parent for n in FAMILY[2:] if n != ORIGINAL} == {ORIGINAL}
    assert v["digits-cnn-student-onnx-fp32"].arch == "student"
    # int8 and the student are smaller than the fp32 CNN they come from.
    for name in ("digits-cnn-onnx-int8", "digits-cnn-tflite-int8", "digits-cnn-student-onnx-fp32"):
        assert v[name].size_bytes < v["digits-cnn"].size_bytes / 3, name


def test_every_member_answers_close_to_the_torch_original_on_heldout_digits(
        built: tuple[Path, list[Variant]]) -> None:
    home, variants = built
    v = _by_name(variants)
    x, y = digits.load_heldout()
    original = _probs(home, v[ORIGINAL], x)
    assert float(np.mean(original.argmax(1) == y)) == pytest.approx(v[ORIGINAL].accuracy)
    # the limits of the factory's acceptance tiers (docs/variants.md)
    limits = {"digits-cnn": 0.99, "digits-cnn-tflite-fp32": 0.99, "digits-cnn-onnx-int8": 0.97,
              "digits-cnn-tflite-int8": 0.97, "digits-cnn-student-onnx-fp32": 0.90}
    for name, least in limits.items():
        probs = _probs(home, v[name], x)
        agree = float(np.mean(probs.argmax(1) == original.argmax(1)))
        assert agree >= least, (name, agree)
        assert agree == pytest.approx(v[name].agreement["top1_agreement"]), name
        if v[name].precision == "fp32" and v[name].arch != "student":
            assert np.abs(probs - original).max() < 1e-3, name


def test_accuracies_are_measured_on_the_heldout_split_and_ordered(
        built: tuple[Path, list[Variant]]) -> None:
    home, variants = built
    v = _by_name(variants)
    for variant in variants:
        assert 0.8 < variant.accuracy <= 1.0
    assert v["digits-linear"].accuracy < v["digits-cnn"].accuracy
    assert v["digits-linear"].accuracy < v["digits-cnn-student-onnx-fp32"].accuracy
    # Re-run each stored artifact on the held-out images: the registered number is what it scores.
    x, y = digits.load_heldout()
    for variant in variants:
        probs = _probs(home, variant, x)
        assert float(np.mean(probs.argmax(axis=1) == y)) == pytest.approx(variant.accuracy)


def test_macs_are_counted_per_layer(built: tuple[Path, list[Variant]]) -> None:
    v = _by_name(built[1])
    assert v["digits-linear"].macs == 64 * 10
    assert v["digits-mlp"].macs == 64 * 128 + 128 * 64 + 64 * 10
    conv = 8 * 8 * 32 * 9 + 8 * 8 * 64 * 32 * 9
    assert v["digits-cnn"].macs == conv + 1024 * 128 + 128 * 10
    assert v["digits-cnn-tflite-int8"].macs == v["digits-cnn"].macs
    assert v["digits-cnn"].macs >= 20 * v["digits-linear"].macs


def test_profiles_cover_both_thread_settings_and_batch_sizes(
        built: tuple[Path, list[Variant]]) -> None:
    assert len(built[1]) == len(FAMILY)
    for variant in built[1]:
        assert set(variant.profiles) == {"cpu-1t", "cpu-2t"}
        for profile in variant.profiles.values():
            assert set(profile.batch_ms) == {1, 2, 4, 8, 16, 32}
            assert profile.fit is not None and profile.peak_memory_bytes > 0
            assert all(ms > 0 for ms in profile.batch_ms.values())
            assert profile.cold_start_ms > 0


def test_exported_models_take_any_batch_and_return_probabilities(
        built: tuple[Path, list[Variant]]) -> None:
    home, variants = built
    x, _ = digits.load_heldout()
    for variant in [v for v in variants if v.format == "onnx"]:
        session = _session(home, variant)
        assert [i.name for i in session.get_inputs()] == ["input"]
        assert [o.name for o in session.get_outputs()] == ["probs"]
        for batch in (1, 5, 32):
            (probs,) = session.run(["probs"], {"input": x[:batch]})
            assert probs.shape == (batch, 10)
            # int8 outputs come in steps of 1/255 per class
            np.testing.assert_allclose(probs.sum(axis=1), 1.0,
                                       rtol=1e-5 if variant.precision == "fp32" else 0.03)


# --------------------------------------------------------------------------- caching


def test_second_build_is_a_cache_hit(built: tuple[Path, list[Variant]], no_training: None) -> None:
    home, variants = built
    registry_file = home / REGISTRY_FILE
    before = registry_file.stat().st_mtime_ns
    assert build_bundled(home, families=DIGITS, progress=False) == variants
    assert registry_file.stat().st_mtime_ns == before


def test_new_hardware_class_is_profiled_without_retraining(
        built: tuple[Path, list[Variant]], home_copy: Path, no_training: None) -> None:
    variants = build_bundled(home_copy, families=DIGITS,
                             profile_keys_threads={"cpu-1t": 1, "cpu-3t": 3},
                             progress=False)
    for old, new in zip(built[1], variants, strict=False):
        assert new.sha256 == old.sha256
        assert set(new.profiles) == {"cpu-1t", "cpu-2t", "cpu-3t"}
        assert new.profiles["cpu-1t"] == old.profiles["cpu-1t"]
        assert all(ms > 0 for ms in new.profiles["cpu-3t"].batch_ms.values())
    assert Registry.load(home_copy).get("digits-cnn") == variants[2]


def test_forced_rebuild_is_deterministic(built: tuple[Path, list[Variant]], home_copy: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    registry_file = home_copy / REGISTRY_FILE
    before = registry_file.stat().st_mtime_ns
    variants = build_bundled(home_copy, families=DIGITS, force=True, progress=True,
                             profile_keys_threads={"cpu-1t": 1})  # one class: shorter
    assert "train digits" in capsys.readouterr().err
    assert registry_file.stat().st_mtime_ns != before
    assert [v.name for v in variants] == FAMILY
    for old, new in zip(built[1], variants, strict=True):
        assert (new.sha256, new.accuracy, new.macs) == (old.sha256, old.accuracy, old.macs)


def test_a_member_the_factory_rejects_keeps_its_reason_and_the_others_stay(
        home_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = convert.tflite_from_torch

    def no_int8(module: object, rows: object, *, int8: bool, **kwargs: object) -> bytes:
        if int8:
            raise RuntimeError("LiteRT cannot lower this quantized graph")
        return real(module, rows, int8=int8, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(convert, "tflite_from_torch", no_int8)
    one_class = {"cpu-1t": 1}
    variants = build_bundled(home_copy, families=DIGITS, force=True,
                             profile_keys_threads=one_class, progress=False)
    assert [v.name for v in variants] == [n for n in FAMILY if n != "digits-cnn-tflite-int8"]
    registry = Registry.load(home_copy)
    assert "digits-cnn-tflite-int8" not in registry.variants
    rejection = registry.rejected["digits-cnn-tflite-int8"]
    assert (rejection.family, rejection.stage) == ("digits", "convert")
    assert "cannot lower this quantized graph" in rejection.reason
    listed = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "--home", str(home_copy), "variants", "list",
         "--task", "digits", "--json"], capture_output=True, text=True, check=True, cwd=ROOT)
    assert [r["name"] for r in json.loads(listed.stdout)["rejected"]] == ["digits-cnn-tflite-int8"]
    # The family is complete without it: the next build reuses it, rejection included.
    monkeypatch.setattr(digits, "train", lambda *a, **k: pytest.fail("retrained"))
    assert build_bundled(home_copy, families=DIGITS, profile_keys_threads=one_class,
                         progress=False) == variants
    assert "digits-cnn-tflite-int8" in Registry.load(home_copy).rejected


def test_corrupt_artifact_triggers_a_rebuild(built: tuple[Path, list[Variant]], home_copy: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(home_copy / "store")
    cnn = _by_name(built[1])["digits-cnn"]
    path = store.path(cnn.sha256)
    path.write_bytes(path.read_bytes()[:-10] + b"corrupted!")
    assert not store.verify(cnn.sha256)

    trained: list[str] = []
    real = digits.train  # train_variant (the extras) calls it too

    def counting(arch: str, *args: object, **kwargs: object) -> digits.Classifier:
        trained.append(arch)
        return real(arch, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(digits, "train", counting)
    variants = build_bundled(home_copy, families=DIGITS, progress=False,
                             profile_keys_threads={"cpu-1t": 1})
    assert trained == ["linear", "mlp", "cnn"]
    assert [v.sha256 for v in variants] == [v.sha256 for v in built[1]]
    assert all(store.verify(v.sha256) for v in variants)


def test_profile_key_must_match_thread_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="use 'cpu-2t'"):
        build_bundled(tmp_path, profile_keys_threads={"cpu-2": 2}, progress=False)
    with pytest.raises(ValueError, match="threads must be an int >= 1"):
        build_bundled(tmp_path, profile_keys_threads={"cpu-0t": 0}, progress=False)
    assert not (tmp_path / REGISTRY_FILE).exists()


# --------------------------------------------------------------------------- pieces


def test_heldout_split_is_fixed_stratified_and_scaled() -> None:
    x, y = digits.load_heldout()
    x2, y2 = digits.load_heldout()
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.shape == (540, 64) and y.shape == (540,)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert sorted(set(y.tolist())) == list(range(10))
    assert min(np.bincount(y)) >= 50


def test_build_and_family_agree_on_architectures() -> None:
    assert build.ARCHS == digits.ARCHS


def test_profile_onnx_accepts_bytes_and_paths(built: tuple[Path, list[Variant]]) -> None:
    home, variants = built
    linear = variants[0]
    path = ArtifactStore(home / "store").path(linear.sha256)
    for model in (path, path.read_bytes()):
        profile = profile_onnx(model, linear.inputs[0], threads=1, batch_sizes=(4, 2))
        assert sorted(profile.batch_ms) == [2, 4]
        assert profile.cold_start_ms > 0


def test_profile_onnx_rejects_bad_arguments(built: tuple[Path, list[Variant]]) -> None:
    home, variants = built
    linear = variants[0]
    path = ArtifactStore(home / "store").path(linear.sha256)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        profile_onnx(path, linear.inputs[0], threads=0)
    with pytest.raises(ValueError, match="batch_sizes"):
        profile_onnx(path, linear.inputs[0], threads=1, batch_sizes=(0, 8))
    with pytest.raises(ValueError, match="declare it as -1"):
        profile_onnx(path, TensorSpec("input", "float32", (1, 64)), threads=1)


def test_profiles_from_an_older_build_are_refreshed_without_retraining(
        built: tuple[Path, list[Variant]], home_copy: Path, no_training: None) -> None:
    registry = Registry.load(home_copy)
    for name in NAMES:  # what a registry written before latency fits looked like
        old = registry.get(name)
        registry.add(dataclasses.replace(old, profiles={
            k: Profile(p.batch_ms, p.cold_start_ms) for k, p in old.profiles.items()}))
    registry.save(home_copy)
    variants = build_bundled(home_copy, families=DIGITS, progress=False)
    assert [v.sha256 for v in variants] == [v.sha256 for v in built[1]]
    assert all(p.fit is not None and p.peak_memory_bytes > 0
               for v in variants for p in v.profiles.values())
