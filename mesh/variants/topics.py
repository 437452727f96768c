"""Topic classifiers on MiniLM: the private heads of the tenants demonstration.

The shipped sentences (``data/sentences_train.txt`` to train,
``data/sentences.txt`` held out) come in groups under ``# topic`` lines.
:func:`topic_head` trains a softmax-regression head on the embeddings of a
MiniLM base variant for some of those topics and exports it to ONNX (one
``Gemm``: embedding ``[batch, 384]`` -> logits ``[batch, topics]``); its
validation set is the held-out sentences of the same topics, tokenized as
clients tokenize them, with their labels. What a tenant would do with its own
data, done here with data the package ships (tests, ``benchmarks/tenants.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mesh.registry import Registry
from mesh.store import ArtifactStore
from mesh.variants.dataset import Dataset
from mesh.variants.sentences import SENTENCES_FILE, SentenceTokenizer

__all__ = ["TRAIN_FILE", "load_topics", "train_head", "topic_head"]

TRAIN_FILE = SENTENCES_FILE.with_name("sentences_train.txt")


def load_topics(path: str | Path = SENTENCES_FILE) -> list[tuple[str, str]]:
    """``(sentence, topic)`` for every sentence under a ``# topic`` line (one-word-ish
    headings; the file's prose header, lines of several sentences, is skipped)."""
    out, topic = [], None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text:
            continue
        if text.startswith("#"):
            heading = text.lstrip("#").strip()
            topic = heading if heading and len(heading.split()) <= 3 else None
            continue
        if topic is not None:
            out.append((text, topic))
    return out


def train_head(features: np.ndarray, labels: np.ndarray, classes: int, *, epochs: int = 300,
               lr: float = 0.5, l2: float = 1e-3, seed: int = 0) -> bytes:
    """A softmax-regression head (full-batch gradient descent) as ONNX bytes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    x = features.astype(np.float64)
    dim = x.shape[1]
    w = rng.normal(0, 0.01, (dim, classes))
    b = np.zeros(classes)
    onehot = np.eye(classes)[labels]
    for _ in range(epochs):
        logits = x @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - onehot) / len(x)
        w -= lr * (x.T @ grad + l2 * w)
        b -= lr * grad.sum(axis=0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["features", "W", "B"], ["logits"])], "topic_head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(w.astype(np.float32), "W"),
         numpy_helper.from_array(b.astype(np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def topic_head(home: str | Path, topics: Sequence[str], *,
               base_variant: str = "minilm-onnx-fp32") -> tuple[bytes, Dataset]:
    """A head classifying ``topics`` trained on ``base_variant``'s embeddings (from the
    mesh home ``home``), and its held-out validation set (token ids, mask, labels)."""
    from mesh.variants.recipes import run_artifact

    topics = list(topics)
    unknown = sorted(set(topics) - {t for _, t in load_topics()})
    if unknown:
        raise ValueError(f"topics: {unknown} are not among the shipped sentences' topics")
    home = Path(home)
    base = Registry.load(home).get(base_variant)
    tokenizer = SentenceTokenizer.from_home(home, base.task)

    def encoded(path: Path) -> tuple[Dataset, np.ndarray]:
        rows = [(s, topics.index(t)) for s, t in load_topics(path) if t in topics]
        ids, mask = tokenizer.encode([s for s, _ in rows])
        return Dataset((ids, mask), None), np.array([y for _, y in rows], dtype=np.int64)

    train, train_y = encoded(TRAIN_FILE)
    store = ArtifactStore(home / "store")
    features = run_artifact(store.path(base.sha256), base.format, train, base.max_batch)[0]
    head = train_head(features, train_y, len(topics))
    val, val_y = encoded(SENTENCES_FILE)
    return head, Dataset(val.inputs, val_y)
