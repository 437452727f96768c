"""Text in, tensors out: the tokenizer of the ``sentence-embedding`` family, and its test sentences.

Where tokenization happens: **in the client**. Every variant of the family
(torch, ONNX fp32, ONNX int8) takes two int64 tensors,
``input_ids [batch, 64]`` and ``attention_mask [batch, 64]``, and returns
``embedding`` float32 ``[batch, 384]``, unit length (mean pooling over the
real tokens, then L2 normalisation, inside the model). Nodes therefore only
ever see tensors, like every other task, and the wire format stays
text-free. Sentences longer than :data:`MAX_TOKENS` word pieces (with
``[CLS]``/``[SEP]``) are truncated; shorter ones are padded, so every batch
has the same shape and the profiled latency is the latency served.

The tokenizer ships with the family: its ``tokenizer.json`` is stored in the
artifact store, and every variant of the family names it in
``assets["tokenizer.json"]`` (a sha256), so a client fetches it by hash like
any artifact. :meth:`SentenceTokenizer.from_home` loads it from a mesh home::

    tok = SentenceTokenizer.from_home(".tiermesh")
    ids, mask = tok.encode(["How do I reset my password?"])
    reply = client.infer("sentence-embedding", ids, mask)   # -> embedding [1, 384]

Needs the ``tokenizers`` package (installed with the ``build`` extra).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mesh.registry import Registry
from mesh.store import ArtifactStore

__all__ = ["TASK", "MAX_TOKENS", "TOKENIZER_ASSET", "SENTENCES_FILE", "load_sentences",
           "SentenceTokenizer"]

TASK = "sentence-embedding"
MAX_TOKENS = 64
TOKENIZER_ASSET = "tokenizer.json"
SENTENCES_FILE = Path(__file__).with_name("data") / "sentences.txt"


def load_sentences(path: str | Path = SENTENCES_FILE) -> list[str]:
    """The fixed evaluation sentences: non-blank lines not starting with ``#``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class SentenceTokenizer:
    """WordPiece tokenization to fixed-length ``input_ids`` and ``attention_mask`` (int64)."""

    def __init__(self, tokenizer_json: str | bytes, *, max_tokens: int = MAX_TOKENS) -> None:
        from tokenizers import Tokenizer

        text = tokenizer_json.decode() if isinstance(tokenizer_json, bytes) else tokenizer_json
        self._tok = Tokenizer.from_str(text)
        pad_id = self._tok.token_to_id("[PAD]")
        self._tok.enable_truncation(max_length=max_tokens)
        self._tok.enable_padding(length=max_tokens, pad_id=0 if pad_id is None else pad_id,
                                 pad_token="[PAD]")
        self.max_tokens = max_tokens

    @classmethod
    def from_file(cls, path: str | Path, *, max_tokens: int = MAX_TOKENS) -> SentenceTokenizer:
        return cls(Path(path).read_text(encoding="utf-8"), max_tokens=max_tokens)

    @classmethod
    def from_home(cls, home: str | Path, task: str = TASK) -> SentenceTokenizer:
        """The tokenizer registered with ``task``'s variants in the mesh home ``home``.

        Raises :class:`~mesh.errors.UnknownTask` when the task is not
        registered and ``LookupError`` when its variants carry no tokenizer
        or the stored copy does not verify.
        """
        home = Path(home)
        variants = Registry.load(home).for_task(task)
        sha = next((v.assets[TOKENIZER_ASSET] for v in variants if TOKENIZER_ASSET in v.assets),
                   None)
        if sha is None:
            raise LookupError(f"task {task!r} has no {TOKENIZER_ASSET} asset; rebuild it "
                              "with 'mesh build'")
        store = ArtifactStore(home / "store")
        if not store.verify(sha):
            raise LookupError(f"the stored {TOKENIZER_ASSET} ({sha[:12]}) is missing or "
                              "corrupt; rebuild with 'mesh build --force'")
        return cls(store.read(sha))

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, each int64 ``[len(texts), max_tokens]``."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of sentences, not one string")
        encodings = self._tok.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(-1, self.max_tokens)
        mask = np.array([e.attention_mask for e in encodings],
                        dtype=np.int64).reshape(-1, self.max_tokens)
        return ids, mask
