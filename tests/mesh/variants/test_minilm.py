"""The bundled sentence-embedding family: all-MiniLM-L6-v2 as torch, ONNX fp32/int8 and TFLite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mesh.registry import Registry, Variant
from mesh.runtimes import runtime_for
from mesh.store import ArtifactStore
from mesh.variants import build_bundled, minilm
from mesh.variants.build import MINILM_NAMES
from mesh.variants.sentences import TOKENIZER_ASSET, SentenceTokenizer, load_sentences

TASK = "sentence-embedding"
ACCEPTED = (*MINILM_NAMES, "minilm-tflite-fp32")
REJECTED = ("minilm-onnx-int8", "minilm-tflite-int8", "minilm-student-onnx-fp32")


@pytest.fixture(scope="module")
def family(built_home: Path) -> dict[str, Variant]:
    return {v.name: v for v in Registry.load(built_home).for_task(TASK)}


@pytest.fixture(scope="module")
def tokens(built_home: Path) -> tuple[np.ndarray, np.ndarray]:
    return SentenceTokenizer.from_home(built_home).encode(load_sentences())


def _embed(home: Path, variant: Variant, inputs: list[np.ndarray]) -> np.ndarray:
    runtime = runtime_for(variant.format)
    session = runtime.load(str(ArtifactStore(home / "store").path(variant.sha256)), threads=2)
    return np.concatenate([runtime.run(session, [a[i:i + 32] for a in inputs])[0]
                           for i in range(0, len(inputs[0]), 32)])


def test_the_family_has_a_variant_per_tier_and_the_failed_one_is_recorded(
        built_home: Path, family: dict[str, Variant]) -> None:
    assert sorted(family) == sorted(ACCEPTED)
    assert {(v.format, v.precision, v.quantization) for v in family.values()} == {
        ("torch", "fp32", ""), ("onnx", "fp32", ""), ("onnx", "int8", "dynamic"),
        ("tflite", "fp32", "")}
    for v in family.values():
        assert [(s.name, s.dtype, s.shape) for s in v.inputs] == [
            ("input_ids", "int64", (-1, 64)), ("attention_mask", "int64", (-1, 64))]
        assert [(s.name, s.dtype, s.shape) for s in v.outputs] == [
            ("embedding", "float32", (-1, 384))]
        assert v.accuracy_metric == "cosine"
        assert set(v.profiles) >= {"cpu-1t", "cpu-2t"}
        assert sorted(v.profiles["cpu-1t"].batch_ms) == [1, 2, 4, 8, 16, 32]
    int8 = family["minilm-onnx-int8-dynamic"]
    assert int8.size_bytes < family["minilm-onnx-fp32"].size_bytes / 3
    assert 0.98 <= int8.accuracy < 1.0
    assert int8.agreement["nn_agreement"] >= 0.85
    assert family["minilm-tflite-fp32"].agreement["mean_cosine"] >= 0.9999
    # Static int8 (ONNX and TFLite) and the student are tried too; their agreement checks
    # fail and they are kept apart, each with the measured reason.
    rejected = Registry.load(built_home).rejected
    assert sorted(r for r in rejected if r.startswith("minilm-")) == sorted(REJECTED)
    for name in REJECTED:
        assert rejected[name].stage == "agreement" and "mean_cosine" in rejected[name].reason
        assert rejected[name].agreement["mean_cosine"] < (
            0.9 if "student" in name else 0.98), name


def test_registered_accuracy_is_what_each_artifact_scores_on_the_shipped_sentences(
        built_home: Path, family: dict[str, Variant], tokens) -> None:
    from sentence_transformers import SentenceTransformer

    sentences = load_sentences()
    # The library's own encoder is the independent reference for the original.
    reference = SentenceTransformer(str(minilm.model_dir()), device="cpu").encode(
        sentences, normalize_embeddings=True)
    for variant in family.values():
        out = _embed(built_home, variant, list(tokens))
        assert out.shape == (len(sentences), 384)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3)
        cosine = float(np.mean(np.sum(out * reference, axis=1)))
        assert cosine == pytest.approx(variant.accuracy, abs=2e-3), variant.name


def test_the_int8_edge_variant_still_finds_paraphrases(built_home: Path,
                                                      family: dict[str, Variant]) -> None:
    tok = SentenceTokenizer.from_home(built_home)
    queries = ["Expect a downpour tomorrow after lunch.", "How do I reset my password?"]
    corpus = ["It is going to rain heavily tomorrow afternoon.",
              "What should I do if I forgot my login password?",
              "The stock market fell sharply this morning."]
    variant = family["minilm-onnx-int8-dynamic"]
    q = _embed(built_home, variant, list(tok.encode(queries)))
    c = _embed(built_home, variant, list(tok.encode(corpus)))
    assert list((q @ c.T).argmax(axis=1)) == [0, 1]


def test_the_tokenizer_ships_with_the_family(built_home: Path, family: dict[str, Variant]) -> None:
    shas = {v.assets[TOKENIZER_ASSET] for v in family.values()}
    assert len(shas) == 1 and ArtifactStore(built_home / "store").verify(shas.pop())
    ids, mask = SentenceTokenizer.from_home(built_home).encode(["hello world", "x " * 200])
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == (2, 64)
    assert mask[0].sum() == 4 and mask[1].sum() == 64  # [CLS] hello world [SEP]; truncated
    with pytest.raises(TypeError, match="list of sentences"):
        SentenceTokenizer.from_home(built_home).encode("one string")  # type: ignore[arg-type]


def test_shipped_sentences_are_a_fixed_set_of_distinct_lines() -> None:
    sentences = load_sentences()
    assert 80 <= len(sentences) == len(set(sentences))
    assert not any(s.startswith("#") for s in sentences)


def test_a_current_build_is_reused_without_loading_the_model(
        built_home: Path, family: dict[str, Variant], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> None:
        raise AssertionError("the build reloaded MiniLM although its cache was valid")

    monkeypatch.setattr(minilm, "load_encoder", refuse)
    again = build_bundled(built_home, families=("minilm",), progress=False)
    assert {v.name: v for v in again} == family
