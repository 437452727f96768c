"""The bundled digits family: a real build (once per module), its registry, cache and store."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mesh.registry import REGISTRY_FILE, Profile, Registry, TensorSpec, Variant
from mesh.store import ArtifactStore
from mesh.variants import build, build_bundled, digits
from mesh.variants.profile import profile_onnx

NAMES = ["digits-linear", "digits-mlp", "digits-cnn"]
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


def _by_name(variants: list[Variant]) -> dict[str, Variant]:
    return {v.name: v for v in variants}


def _session(home: Path, variant: Variant) -> ort.InferenceSession:
    path = ArtifactStore(home / build.STORE_DIR).path(variant.sha256)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- the build


def test_build_registers_three_distinct_verified_variants(built: tuple[Path, list[Variant]]) -> None:
    home, variants = built
    assert [v.name for v in variants] == NAMES
    assert len({v.sha256 for v in variants}) == 3
    store = ArtifactStore(home / "store")
    registry = Registry.load(home)
    for variant in variants:
        assert store.verify(variant.sha256)
        assert variant.size_bytes == store.path(variant.sha256).stat().st_size
        assert registry.get(variant.name) == variant
        assert (variant.task, variant.family, variant.format, variant.precision) == (
            "digits", "digits", "onnx", "fp32")
        assert variant.name == f"digits-{variant.arch}"
        assert variant.accuracy_metric == "top1"
        assert variant.inputs == (TensorSpec("input", "float32", (-1, 64)),)
        assert variant.outputs == (TensorSpec("probs", "float32", (-1, 10)),)
        assert variant.max_batch == 32
        assert variant.build_key == build.build_key()
    assert [v.name for v in registry.for_task("digits")] == sorted(NAMES)


def test_accuracies_are_measured_on_the_heldout_split_and_ordered(
        built: tuple[Path, list[Variant]]) -> None:
    home, variants = built
    v = _by_name(variants)
    for variant in variants:
        assert 0.8 < variant.accuracy <= 1.0
    assert v["digits-linear"].accuracy < v["digits-cnn"].accuracy
    # Re-run each stored artifact on the held-out images: the registered number is what it scores.
    x, y = digits.load_heldout()
    for variant in variants:
        (probs,) = _session(home, variant).run(["probs"], {"input": x})
        assert float(np.mean(probs.argmax(axis=1) == y)) == pytest.approx(variant.accuracy)


def test_macs_are_counted_per_layer(built: tuple[Path, list[Variant]]) -> None:
    v = _by_name(built[1])
    assert v["digits-linear"].macs == 64 * 10
    assert v["digits-mlp"].macs == 64 * 128 + 128 * 64 + 64 * 10
    conv = 8 * 8 * 32 * 9 + 8 * 8 * 64 * 32 * 9
    assert v["digits-cnn"].macs == conv + 1024 * 128 + 128 * 10
    assert v["digits-cnn"].macs >= 20 * v["digits-linear"].macs


def test_profiles_cover_both_thread_settings_and_batch_sizes(
        built: tuple[Path, list[Variant]]) -> None:
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
    for variant in variants:
        session = _session(home, variant)
        assert [i.name for i in session.get_inputs()] == ["input"]
        assert [o.name for o in session.get_outputs()] == ["probs"]
        for batch in (1, 5, 32):
            (probs,) = session.run(["probs"], {"input": x[:batch]})
            assert probs.shape == (batch, 10)
            np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


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
    variants = build_bundled(home_copy, families=DIGITS, force=True, progress=True)
    assert "train digits" in capsys.readouterr().err
    assert registry_file.stat().st_mtime_ns != before
    for old, new in zip(built[1], variants, strict=False):
        assert (new.sha256, new.accuracy, new.macs) == (old.sha256, old.accuracy, old.macs)


def test_corrupt_artifact_triggers_a_rebuild(built: tuple[Path, list[Variant]], home_copy: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(home_copy / "store")
    cnn = _by_name(built[1])["digits-cnn"]
    path = store.path(cnn.sha256)
    path.write_bytes(path.read_bytes()[:-10] + b"corrupted!")
    assert not store.verify(cnn.sha256)

    trained: list[str] = []
    real = digits.train_variant

    def counting(arch: str, **kwargs: object) -> digits.TrainedVariant:
        trained.append(arch)
        return real(arch, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(digits, "train_variant", counting)
    variants = build_bundled(home_copy, families=DIGITS, progress=False)
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
