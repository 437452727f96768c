"""Private heads on shared bases, in the variant factory: one family per head, measured end
to end on every base variant, private to its tenant; heads that do not fit are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mesh.registry import Registry
from mesh.variants.dataset import Dataset
from mesh.variants.heads import register_head
from mesh.variants.topics import load_topics, topic_head, train_head
from tests.conftest import HEAD_BASES, HEAD_TOPICS


def test_each_base_variant_gets_the_head_measured_end_to_end(heads_home: Path) -> None:
    registry = Registry.load(heads_home)
    for tenant, topics in HEAD_TOPICS.items():
        heads = sorted((v for v in registry.variants.values() if v.family == f"{tenant}-topics"),
                       key=lambda v: v.base)
        assert [h.base for h in heads] == sorted(HEAD_BASES)
        for head in heads:
            base = registry.get(head.base)
            assert head.tenant == tenant and head.task == f"{tenant}-topics"
            # clients send the base's inputs (token ids and mask) and get the head's logits
            assert head.inputs == base.inputs
            assert head.outputs[0].shape == (-1, len(topics))
            # held-out sentences of the tenant's topics, classified through the base
            assert head.accuracy >= 0.85 and head.accuracy_metric == "top1"
            # a query pays the base and the head: the profile is their sum
            for key, profile in head.profiles.items():
                assert profile.batch_ms[1] > base.profiles[key].batch_ms[1]
        # the int8 encoder under the head agrees with the fp32 one on the topics
        assert heads[1].agreement["top1_agreement"] >= 0.97
        assert heads[1].parent == heads[0].name
    assert registry.owners() == {"acme-topics": "acme", "globex-topics": "globex"}


def test_the_shipped_topics_are_the_sentence_groups() -> None:
    topics = {t for _, t in load_topics()}
    assert {"weather", "cooking", "music and art"} <= topics and len(topics) == 13
    assert all(not s.startswith("#") for s, _ in load_topics())


def test_a_head_that_does_not_fit_its_base_is_refused_naming_why(heads_home: Path,
                                                                 tmp_path: Path) -> None:
    head, validation = topic_head(heads_home, ["weather", "travel"])
    wrong_width = train_head(np.zeros((4, 100), np.float32), np.array([0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match="takes 100 features; base 'minilm' gives"):
        register_head(heads_home, "bad", task="bad", base="minilm", head=wrong_width,
                      validation=validation, progress=False)
    with pytest.raises(ValueError, match="not an ONNX model"):
        register_head(heads_home, "bad", task="bad", base="minilm", head=b"nonsense",
                      validation=validation, progress=False)
    with pytest.raises(ValueError, match="base 'nope': no public family.*families: minilm"):
        register_head(heads_home, "bad", task="bad", base="nope", head=head,
                      validation=validation, progress=False)
    with pytest.raises(ValueError, match="give labels 'y'"):
        register_head(heads_home, "bad", task="bad", base="minilm", head=head,
                      validation=Dataset(validation.inputs, None), progress=False)
    ids, _mask = validation.inputs
    with pytest.raises(ValueError, match="takes 2 input"):
        register_head(heads_home, "bad", task="bad", base="minilm", head=head,
                      validation=Dataset((ids,), validation.labels), progress=False)
    with pytest.raises(ValueError, match="already served by"):  # another family's task
        register_head(heads_home, "bad", task="acme-topics", base="minilm", head=head,
                      validation=validation, tenant="globex", progress=False)
    assert "bad" not in {v.family for v in Registry.load(heads_home).variants.values()}
