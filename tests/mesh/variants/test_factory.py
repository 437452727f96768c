"""The variant factory on small real models: every conversion path, checks, rejections, persistence."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mesh.registry import Registry
from mesh.runtimes import runtime_for
from mesh.store import ArtifactStore
from mesh.variants.dataset import Dataset
from mesh.variants.digits import export_onnx
from mesh.variants.factory import FamilyReport

ROOT = Path(__file__).resolve().parents[3]


def _run_stored(home: Path, variant_name: str, inputs: list[np.ndarray]) -> np.ndarray:
    """Run a registered variant's stored artifact the way a node would."""
    variant = Registry.load(home).get(variant_name)
    runtime = runtime_for(variant.format)
    session = runtime.load(str(ArtifactStore(home / "store").path(variant.sha256)), threads=1)
    return runtime.run(session, inputs)[0]


# ------------------------------------------------------------------ the full family of one model


@pytest.fixture(scope="module")
def full_family(tmp_path_factory: pytest.TempPathFactory, digits_data, trained_mlp, register
                ) -> tuple[Path, FamilyReport]:
    """``module:factory`` + state dict + training set: every variant the factory makes, measured."""
    _, weights = trained_mlp
    home = tmp_path_factory.mktemp("home")
    report = register(home, "tiny", task="tiny-digits", model="tiny_models:mlp", weights=weights,
                       validation=digits_data.val_npz, train=digits_data.train_npz,
                       profile_options={"warmup": 1, "min_repeats": 2, "repeats": 20,
                                        "budget_s": 0.005, "memory": True})
    return home, report


def test_every_conversion_path_is_accepted_for_a_torch_model(full_family) -> None:
    home, report = full_family
    names = {v.name: v for v in report.accepted}
    assert set(names) == {"tiny-torch-fp32", "tiny-onnx-fp32", "tiny-onnx-int8", "tiny-tflite-fp32",
                          "tiny-tflite-int8", "tiny-student-onnx-fp32"}
    assert report.rejected == []
    assert (names["tiny-torch-fp32"].format, names["tiny-onnx-int8"].format,
            names["tiny-tflite-int8"].format) == ("torch", "onnx", "tflite")
    assert names["tiny-onnx-int8"].quantization == "static"
    assert names["tiny-torch-fp32"].parent == ""
    assert {v.parent for n, v in names.items() if n != "tiny-torch-fp32"} == {"tiny-torch-fp32"}
    # Where the model does not allow a variant, the report says why.
    assert "MatMul" in report.skipped["onnx-int8-dynamic"]
    assert "CUDA" in report.skipped["torch-cuda-fp32"] or torch.cuda.is_available()


def test_int8_artifacts_are_smaller_and_agree_with_the_original(full_family) -> None:
    _, report = full_family
    v = {x.name: x for x in report.accepted}
    for fmt in ("onnx", "tflite"):
        assert v[f"tiny-{fmt}-int8"].size_bytes < v[f"tiny-{fmt}-fp32"].size_bytes
        assert v[f"tiny-{fmt}-int8"].agreement["top1_agreement"] >= 0.97
        assert v[f"tiny-{fmt}-fp32"].agreement["max_abs_diff"] < 1e-4
    assert v["tiny-student-onnx-fp32"].size_bytes < v["tiny-onnx-fp32"].size_bytes
    assert v["tiny-student-onnx-fp32"].arch == "student"


def test_accuracy_is_what_the_stored_artifact_scores_on_the_labels(
        full_family, digits_data) -> None:
    home, report = full_family
    for variant in report.accepted:
        assert variant.accuracy_metric == "top1"
        probs = _run_stored(home, variant.name, [digits_data.x_val])
        assert probs.shape == (len(digits_data.y_val), 10)
        measured = float(np.mean(probs.argmax(1) == digits_data.y_val))
        assert measured == pytest.approx(variant.accuracy), variant.name
        assert 0.85 <= variant.accuracy <= 1.0


def test_every_variant_is_profiled_from_batch_1_to_its_maximum(full_family) -> None:
    home, report = full_family
    store = ArtifactStore(home / "store")
    for variant in report.accepted:
        assert store.verify(variant.sha256)
        assert variant.size_bytes == store.path(variant.sha256).stat().st_size
        profile = variant.profiles["cpu-1t"]
        assert sorted(profile.batch_ms) == [1, 2, 4, 8, 16, 32]
        assert all(ms > 0 for ms in profile.batch_ms.values())
        assert profile.cold_start_ms > 0
        assert profile.peak_memory_bytes > 0
        # the recorded fit is the line through these measurements, with its true worst gap
        fit = profile.fit
        assert fit is not None
        gaps = [abs(max(fit.intercept_ms + fit.per_row_ms * b, 0.0) - ms) / ms
                for b, ms in profile.batch_ms.items()]
        assert fit.max_error_frac == pytest.approx(max(gaps), rel=1e-6, abs=1e-9)


def test_registry_survives_a_restart(full_family) -> None:
    """A fresh process reads back exactly what the factory registered."""
    home, report = full_family
    out = subprocess.run([sys.executable, "-m", "mesh.cli", "--home", str(home), "variants",
                          "list", "--task", "tiny-digits", "--json"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    listed = {v["name"]: v for v in json.loads(out.stdout)["variants"]}
    assert set(listed) == {v.name for v in report.accepted}
    reloaded = Registry.load(home)
    for variant in report.accepted:
        assert reloaded.get(variant.name) == variant
        assert listed[variant.name]["sha256"] == variant.sha256
        assert listed[variant.name]["profiles"]["cpu-1t"]["peak_memory_bytes"] > 0


# ------------------------------------------------------------------ other kinds of submission


def test_onnx_submission_gets_onnx_variants_only(tmp_path: Path, digits_data, trained_mlp,
                                                 register) -> None:
    model, _ = trained_mlp
    path = tmp_path / "model.onnx"
    path.write_bytes(export_onnx(nn.Sequential(model, nn.Softmax(dim=-1))))
    report = register(tmp_path / "home", "onnxsub", task="t", model=path,
                       validation=digits_data.val_npz)
    assert [v.name for v in report.accepted] == ["onnxsub-onnx-fp32", "onnxsub-onnx-int8"]
    original = report.accepted[0]
    assert original.parent == "" and original.inputs[0].name == "input"
    assert original.outputs[0].name == "probs"
    assert "ONNX" in report.skipped["torch-fp32"] and "ONNX" in report.skipped["tflite-fp32"]
    assert "training set" in report.skipped["student-onnx-fp32"]


def test_torch_export_archive_is_served_as_torch_onnx_and_tflite(
        tmp_path: Path, digits_data, trained_mlp, register) -> None:
    model, _ = trained_mlp
    x = torch.from_numpy(digits_data.x_val[:2])
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "model.pt2")
    report = register(tmp_path / "home", "pt2", task="t", model=tmp_path / "model.pt2",
                       validation=digits_data.val_npz,
                       formats=["torch-fp32", "onnx-fp32", "tflite-fp32"])
    assert [v.name for v in report.accepted] == ["pt2-torch-fp32", "pt2-onnx-fp32",
                                                 "pt2-tflite-fp32"]
    assert all(v.agreement["max_abs_diff"] < 1e-4 for v in report.accepted)


def test_torchscript_cannot_become_tflite_and_is_rejected_with_the_reason(
        tmp_path: Path, digits_data, trained_mlp, register) -> None:
    model, _ = trained_mlp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
        torch.jit.trace(model, (torch.from_numpy(digits_data.x_val[:2]),)).save(
            str(tmp_path / "model.ts"))
    report = register(tmp_path / "home", "ts", task="t", model=tmp_path / "model.ts",
                       validation=digits_data.val_npz,
                       formats=["torch-fp32", "onnx-fp32", "tflite-fp32"])
    assert [v.name for v in report.accepted] == ["ts-torch-fp32", "ts-onnx-fp32"]
    (rejection,) = report.rejected
    assert (rejection.name, rejection.stage) == ("ts-tflite-fp32", "convert")
    assert "TorchScript" in rejection.reason
    assert Registry.load(tmp_path / "home").rejected["ts-tflite-fp32"] == rejection


class _TokenMixer(nn.Module):
    """Linear layers over [batch, tokens, features]: exported as MatMuls, like a transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(x).mean(dim=1))


def test_matmul_heavy_graph_gets_a_dynamic_int8_variant_checked_by_agreement(
        tmp_path: Path, register) -> None:
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((120, 8, 16)).astype(np.float32)
    report = register(tmp_path / "home", "mixer", task="t", model=_TokenMixer().eval(),
                       validation=Dataset((x,)),
                       formats=["onnx-fp32", "onnx-int8-dynamic"])
    assert [v.name for v in report.accepted] == ["mixer-onnx-fp32", "mixer-onnx-int8-dynamic"]
    dynamic = report.accepted[1]
    assert (dynamic.precision, dynamic.quantization) == ("int8", "dynamic")
    # No labels: accuracy is top-1 agreement with the original, measured.
    assert dynamic.accuracy_metric == "top1_agreement"
    assert dynamic.accuracy == dynamic.agreement["top1_agreement"] >= 0.97
    assert dynamic.inputs[0].shape == (-1, 8, 16)


# ------------------------------------------------------------------ the rejection path


class _OffsetLogits(nn.Module):
    """A classifier whose logits ride on a +1000 offset: the scores differ by ~1e-3.

    fp32 keeps those differences; int8 activations cannot (their range must span
    0..1000, a step of ~4), so every int8 conversion loses the argmax.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.offset = nn.Linear(10, 10)
        with torch.no_grad():
            self.offset.weight.copy_(torch.eye(10) * 1e-3)
            self.offset.bias.fill_(1000.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.offset(self.inner(x))


@pytest.fixture(scope="module")
def offset_family(tmp_path_factory: pytest.TempPathFactory, digits_data, trained_mlp,
                  register) -> tuple[Path, FamilyReport]:
    model, _ = trained_mlp
    home = tmp_path_factory.mktemp("home")
    report = register(home, "offset", task="offset-digits", model=_OffsetLogits(model).eval(),
                       validation=digits_data.val_npz,
                       formats=["onnx-fp32", "onnx-int8", "tflite-int8"])
    return home, report


def test_a_model_int8_cannot_represent_is_rejected_and_the_rest_go_on(offset_family) -> None:
    home, report = offset_family
    assert [v.name for v in report.accepted] == ["offset-onnx-fp32"]
    assert report.accepted[0].agreement["top1_agreement"] == 1.0
    assert sorted(r.name for r in report.rejected) == ["offset-onnx-int8", "offset-tflite-int8"]
    for rejection in report.rejected:
        assert rejection.stage == "agreement"
        assert rejection.agreement["top1_agreement"] < 0.97
        assert "top1_agreement" in rejection.reason and ">= 0.97" in rejection.reason


def test_rejected_variants_are_persisted_apart_and_never_offered(offset_family) -> None:
    home, _ = offset_family
    registry = Registry.load(home)
    assert set(registry.rejected) == {"offset-onnx-int8", "offset-tflite-int8"}
    assert "offset-onnx-int8" not in registry.variants
    assert [v.name for v in registry.for_task("offset-digits")] == ["offset-onnx-fp32"]
    # Nothing of a rejected variant was stored.
    stored = {p.name for p in (home / "store").rglob("*") if p.is_file()}
    assert stored == {registry.get("offset-onnx-fp32").sha256}


# ------------------------------------------------------------------ registering again, bad input


def test_registering_a_family_again_needs_replace_and_replaces_it(
        tmp_path: Path, digits_data, trained_mlp, register) -> None:
    _, weights = trained_mlp
    home = tmp_path / "home"
    args = {"task": "t", "model": "tiny_models:mlp", "weights": weights,
            "validation": digits_data.val_npz}
    register(home, "again", formats=["onnx-fp32", "tflite-int8"], **args)
    with pytest.raises(ValueError, match="already registered.*--replace"):
        register(home, "again", formats=["onnx-fp32"], **args)
    report = register(home, "again", formats=["torch-fp32"], replace=True, **args)
    assert [v.name for v in report.accepted] == ["again-torch-fp32"]
    assert sorted(Registry.load(home).variants) == ["again-torch-fp32"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "Bad_Name"}, "lowercase letters"),
    ({"kind": "regression"}, "classes, embedding"),
    ({"formats": ["onnx-fp16"]}, "unknown variant"),
    ({"model": "tiny_models:broken"}, "not a torch.nn.Module"),
    ({"model": "no_such_module_xyz:make"}, "cannot import"),
])
def test_bad_submissions_are_refused_with_a_fix(tmp_path: Path, digits_data, trained_mlp,
                                               register, kwargs: dict, message: str) -> None:
    args = {"name": "ok", "task": "t", "model": "tiny_models:mlp",
            "validation": digits_data.val_npz} | kwargs
    name = args.pop("name")
    with pytest.raises(ValueError, match=message):
        register(tmp_path, name, **args)
    assert not (tmp_path / "registry.json").exists()


def test_weights_that_do_not_fit_the_factory_are_refused(tmp_path: Path, digits_data,
                                                         tiny_models_dir: Path,
                                                         register) -> None:
    wrong = tmp_path / "wrong.pt"
    torch.save(nn.Linear(3, 3).state_dict(), wrong)
    with pytest.raises(ValueError, match="do not fit tiny_models:mlp"):
        register(tmp_path, "w", task="t", model="tiny_models:mlp", weights=wrong,
                  validation=digits_data.val_npz)


# ------------------------------------------------------------------ folding a model into a family


def test_a_model_joins_a_larger_family_under_the_names_given(
        tmp_path: Path, digits_data, trained_mlp, register) -> None:
    """What ``mesh build`` does with the digits CNN: family, one renamed suffix, an arch."""
    model, _ = trained_mlp
    home = tmp_path / "home"
    register(home, "other", task="t", model=model, validation=digits_data.val_npz,
             family="fam", formats=["onnx-fp32"])
    with pytest.raises(ValueError, match="family 'fam' is already registered"):
        register(home, "big", task="t", model=model, validation=digits_data.val_npz,
                 family="fam", formats=["onnx-fp32"])
    report = register(home, "big", task="t", model=model, validation=digits_data.val_npz,
                      family="fam", names={"onnx-fp32": "fam-main"}, arch="mlp",
                      formats=["torch-fp32", "onnx-fp32", "onnx-int8"], replace=True)
    assert [v.name for v in report.accepted] == ["big-torch-fp32", "fam-main", "big-onnx-int8"]
    assert {(v.family, v.arch) for v in report.accepted} == {("fam", "mlp")}
    assert [v.parent for v in report.accepted] == ["", "big-torch-fp32", "big-torch-fp32"]
    # replace=True replaced the whole family: the earlier member is gone.
    assert sorted(Registry.load(home).variants) == ["big-onnx-int8", "big-torch-fp32", "fam-main"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"names": {"onnx-fp16": "x"}}, "names: unknown variant 'onnx-fp16'"),
    ({"names": {"onnx-fp32": "Bad_Name"}}, "names\\['onnx-fp32'\\] 'Bad_Name'"),
    ({"names": {"onnx-fp32": "same", "onnx-int8": "same"}}, "share a name"),
    ({"family": "-bad"}, "family '-bad'"),
])
def test_bad_family_or_names_are_refused(tmp_path: Path, digits_data, trained_mlp, register,
                                         kwargs: dict, message: str) -> None:
    model, _ = trained_mlp
    with pytest.raises(ValueError, match=message):
        register(tmp_path, "ok", task="t", model=model, validation=digits_data.val_npz, **kwargs)
    assert not (tmp_path / "registry.json").exists()


# ------------------------------------------------------------------ students of token models


class _BagOfWords(nn.Module):
    """(input_ids, attention_mask) -> 4 logits: mean of the real tokens' vectors, then a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(60, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weight = mask.unsqueeze(-1).to(torch.float32)
        return self.head((self.table(ids) * weight).sum(1) / weight.sum(1).clamp(min=1.0))


def _tokens(rows: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 60, size=(rows, 12), dtype=np.int64)
    lengths = rng.integers(3, 13, size=rows)
    mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int64)
    return Dataset((ids * mask, mask))


def test_a_token_model_gets_a_bag_of_tokens_student(tmp_path: Path, register) -> None:
    torch.manual_seed(0)
    report = register(tmp_path / "home", "bow", task="t", model=_BagOfWords().eval(),
                      validation=_tokens(200, 1), train=_tokens(1500, 2),
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      formats=["onnx-fp32", "student-onnx-fp32"])
    assert report.rejected == []
    student = {v.name: v for v in report.accepted}["bow-student-onnx-fp32"]
    assert student.arch == "student" and student.agreement["top1_agreement"] >= 0.9
    assert [s.name for s in student.inputs] == ["input_ids", "attention_mask"]
    # Any id a client sends is valid: ids beyond the teacher's vocabulary are hashed, not refused.
    ids = np.full((2, 12), 10**6, dtype=np.int64)
    out = _run_stored(tmp_path / "home", student.name, [ids, np.ones_like(ids)])
    assert out.shape == (2, 4) and np.isfinite(out).all()


def test_inputs_no_student_takes_are_skipped_with_the_reason(tmp_path: Path, register) -> None:
    class TwoFloats(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    report = register(tmp_path / "home", "two", task="t", model=TwoFloats().eval(),
                      validation=Dataset((x, x)), train=Dataset((x, x)),
                      formats=["onnx-fp32", "student-onnx-fp32"])
    assert "integer token ids" in report.skipped["student-onnx-fp32"]
    assert [v.name for v in report.accepted] == ["two-onnx-fp32"]
