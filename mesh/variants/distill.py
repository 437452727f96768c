"""Knowledge distillation: a smaller student trained to imitate the submitted model.

Two students, chosen by the model's inputs (:func:`student_for`):

- **dense** (one float input): an MLP over the flattened input,
  ``flatten -> Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, k)``;
- **token bag** (integer token ids ``[N, T]``, optionally followed by a 0/1
  attention mask of the same shape, as a BERT-style encoder takes): each id
  is hashed into one of :data:`TOKEN_BUCKETS` learned vectors of width
  ``h`` (``id mod buckets``, so any id a client sends is valid), the vectors
  of the real tokens are averaged, then ``Linear(h, h) -> ReLU -> Linear(h, k)``.
  Word order is lost: a bag of words is what a student this small can learn
  from a few hundred training rows, and the agreement check says whether
  that is close enough.

The hidden width ``h`` is chosen so the student has about a quarter of the
teacher's parameters (between 16 and 256 units). The student learns from the
teacher's outputs on the training inputs:

- ``classes``: KL divergence between temperature-softened distributions
  (T = 2, scaled by T^2), plus cross-entropy on the labels when the training
  set has them. When the teacher outputs probabilities (non-negative rows
  summing to 1), the student does too (a softmax head); otherwise it
  outputs logits.
- ``embedding``: 1 - cosine similarity plus mean squared error; the
  student normalises its output when the teacher's rows are unit vectors.

Training is seeded and single-threaded, so it is repeatable on one machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["TEMPERATURE", "TOKEN_BUCKETS", "hidden_width", "student_for", "train_student"]

TEMPERATURE = 2.0
TOKEN_BUCKETS = 8192
"""Rows of the token-bag student's table; ids are hashed into them (``id mod TOKEN_BUCKETS``)."""
SEED = 4321
MAX_STEPS = 3000
MAX_EPOCHS = 60
BATCH = 64


def hidden_width(in_features: int, out_features: int, teacher_params: int) -> int:
    """Width ``h`` whose 3-layer MLP has about a quarter of ``teacher_params`` (16..256)."""
    budget = max(teacher_params // 4, 1)
    # d*h + h*h + h*k (+ biases, ignored) = budget  ->  h^2 + (d + k) h - budget = 0
    b = in_features + out_features
    h = int((-b + (b * b + 4 * budget) ** 0.5) / 2)
    return max(16, min(256, h))


def _is_mask(a: np.ndarray, ids: np.ndarray) -> bool:
    return a.dtype.kind in "iu" and a.shape == ids.shape and bool(np.isin(a, (0, 1)).all())


def student_for(inputs: Sequence[np.ndarray]) -> tuple[str, str]:
    """``(kind, why_not)``: ``("dense", "")``, ``("tokens", "")`` or ``("", reason)``."""
    if len(inputs) == 1 and inputs[0].dtype.kind == "f":
        return "dense", ""
    ids = inputs[0]
    if ids.dtype.kind in "iu" and ids.ndim == 2 and (
            len(inputs) == 1 or (len(inputs) == 2 and _is_mask(inputs[1], ids))):
        return "tokens", ""
    kinds = ", ".join(f"{a.dtype}{list(a.shape[1:])}" for a in inputs)
    return "", ("a student takes one float input, or integer token ids [N, T] with an optional "
                f"0/1 attention mask of the same shape; this model takes {kinds}")


def _is_probabilities(y: np.ndarray) -> bool:
    return bool(np.all(y >= 0) and np.allclose(y.sum(axis=1), 1.0, atol=1e-3))


def _is_unit(y: np.ndarray) -> bool:
    return bool(np.allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-3))


def _student(kind: str, inputs: Sequence[np.ndarray], k: int, teacher_params: int, head: str
             ) -> Any:
    """A fresh student module: ``raw(*inputs)`` gives scores, ``forward`` adds the ``head``."""
    import torch
    from torch import nn

    class Student(nn.Module):
        def finish(self, out: torch.Tensor) -> torch.Tensor:
            if head == "softmax":
                return torch.softmax(out, dim=-1)
            if head == "normalize":
                return nn.functional.normalize(out, dim=-1)
            return out

    if kind == "dense":
        d = int(np.prod(inputs[0].shape[1:]))
        h = hidden_width(d, k, teacher_params)

        class Dense(Student):
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, h), nn.ReLU(),
                                          nn.Linear(h, h), nn.ReLU(), nn.Linear(h, k))

            def raw(self, x: torch.Tensor) -> torch.Tensor:
                return self.body(x)  # type: ignore[no-any-return]

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.finish(self.raw(x))

        return Dense()

    h = hidden_width(TOKEN_BUCKETS, k, teacher_params)

    class TokenBag(Student):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(TOKEN_BUCKETS, h)
            self.body = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, k))

        def raw(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            vectors = self.table(torch.remainder(ids, TOKEN_BUCKETS))
            weight = (torch.ones_like(ids) if mask is None else mask).unsqueeze(-1).to(
                vectors.dtype)
            pooled = (vectors * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
            return self.body(pooled)  # type: ignore[no-any-return]

        def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return self.finish(self.raw(ids, mask))

    return TokenBag()


def train_student(inputs: Sequence[np.ndarray], teacher_out: np.ndarray,
                  labels: np.ndarray | None, kind: str, *, teacher_params: int,
                  on_epoch: Callable[[int, int, float], None] | None = None) -> Any:
    """Train and return the student (a ``torch.nn.Module`` in eval mode, same inputs as the teacher).

    ``inputs`` are the training inputs in the teacher's order (what
    :func:`student_for` accepts), ``teacher_out`` ``[N, k]`` (the teacher on
    them), ``labels`` ``[N]`` or None. ``on_epoch(epoch, epochs, loss)``
    reports progress. Raises ``ValueError`` for inputs no student takes or
    non-2-D teacher outputs.
    """
    import torch
    from torch import nn

    student_kind, why_not = student_for(inputs)
    if why_not:
        raise ValueError(why_not)
    if teacher_out.ndim != 2:
        raise ValueError(f"a student imitates [N, k] outputs; the teacher gives {teacher_out.shape}")
    probs = kind == "classes" and _is_probabilities(teacher_out)
    unit = kind == "embedding" and _is_unit(teacher_out)
    head = "softmax" if probs else "normalize" if unit else ""

    threads = torch.get_num_threads()
    rng_state = torch.get_rng_state()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    try:
        student = _student(student_kind, inputs, teacher_out.shape[1], teacher_params, head)
        xs = [torch.from_numpy(np.ascontiguousarray(
            a, dtype=np.float32 if student_kind == "dense" else np.int64)) for a in inputs]
        target = torch.from_numpy(teacher_out.astype(np.float32))
        if probs:
            target = torch.log(target.clamp_min(1e-8))  # teacher log-probabilities act as logits
        ys = None if labels is None else torch.from_numpy(labels.astype(np.int64))
        rows = len(xs[0])
        steps_per_epoch = max(1, -(-rows // BATCH))
        epochs = max(1, min(MAX_EPOCHS, MAX_STEPS // steps_per_epoch))
        optimiser = torch.optim.Adam(student.parameters(), lr=3e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
        order = torch.Generator().manual_seed(SEED)
        student.train()
        for epoch in range(epochs):
            perm = torch.randperm(rows, generator=order)
            total = 0.0
            for start in range(0, rows, BATCH):
                idx = perm[start:start + BATCH]
                out = student.raw(*(x[idx] for x in xs))
                if kind == "classes":
                    t = TEMPERATURE
                    loss = nn.functional.kl_div(
                        nn.functional.log_softmax(out / t, dim=-1),
                        nn.functional.log_softmax(target[idx] / t, dim=-1),
                        log_target=True, reduction="batchmean") * t * t
                    if ys is not None:
                        loss = loss + 0.5 * nn.functional.cross_entropy(out, ys[idx])
                else:
                    pred = nn.functional.normalize(out, dim=-1) if unit else out
                    loss = (1 - nn.functional.cosine_similarity(pred, target[idx]).mean()
                            + nn.functional.mse_loss(pred, target[idx]))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.item()) * len(idx)
            schedule.step()
            if on_epoch is not None:
                on_epoch(epoch, epochs, total / rows)
        student.eval()
    finally:
        torch.set_rng_state(rng_state)
        torch.set_num_threads(threads)
    return student
