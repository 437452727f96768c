"""Knowledge distillation: a smaller student trained to imitate the submitted model.

The student is an MLP over the flattened input (one float input only):
``flatten -> Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, k)``
with the hidden width ``h`` chosen so the student has about a quarter of the
teacher's parameters (between 16 and 256 units). It learns from the
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

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["TEMPERATURE", "hidden_width", "train_student"]

TEMPERATURE = 2.0
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


def _is_probabilities(y: np.ndarray) -> bool:
    return bool(np.all(y >= 0) and np.allclose(y.sum(axis=1), 1.0, atol=1e-3))


def _is_unit(y: np.ndarray) -> bool:
    return bool(np.allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-3))


def train_student(x: np.ndarray, teacher_out: np.ndarray, labels: np.ndarray | None, kind: str,
                  *, teacher_params: int,
                  on_epoch: Callable[[int, int, float], None] | None = None) -> Any:
    """Train and return the student (a ``torch.nn.Module`` in eval mode).

    ``x`` float ``[N, ...]``, ``teacher_out`` ``[N, k]`` (the teacher on
    ``x``), ``labels`` ``[N]`` or None. ``on_epoch(epoch, epochs, loss)``
    reports progress. Raises ``ValueError`` for non-float inputs or
    non-2-D teacher outputs.
    """
    import torch
    from torch import nn

    if x.dtype.kind != "f":
        raise ValueError(f"a student needs one float input; this model takes {x.dtype}")
    if teacher_out.ndim != 2:
        raise ValueError(f"a student imitates [N, k] outputs; the teacher gives {teacher_out.shape}")
    d = int(np.prod(x.shape[1:]))
    k = teacher_out.shape[1]
    h = hidden_width(d, k, teacher_params)
    probs = kind == "classes" and _is_probabilities(teacher_out)
    unit = kind == "embedding" and _is_unit(teacher_out)

    class Student(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, h), nn.ReLU(),
                                      nn.Linear(h, h), nn.ReLU(), nn.Linear(h, k))

        def raw(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.body(inputs)  # type: ignore[no-any-return]

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            out = self.body(inputs)
            if probs:
                return torch.softmax(out, dim=-1)
            if unit:
                return nn.functional.normalize(out, dim=-1)
            return out  # type: ignore[no-any-return]

    threads = torch.get_num_threads()
    rng_state = torch.get_rng_state()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    try:
        student = Student()
        xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        target = torch.from_numpy(teacher_out.astype(np.float32))
        if probs:
            target = torch.log(target.clamp_min(1e-8))  # teacher log-probabilities act as logits
        ys = None if labels is None else torch.from_numpy(labels.astype(np.int64))
        steps_per_epoch = max(1, -(-len(xs) // BATCH))
        epochs = max(1, min(MAX_EPOCHS, MAX_STEPS // steps_per_epoch))
        optimiser = torch.optim.Adam(student.parameters(), lr=3e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
        order = torch.Generator().manual_seed(SEED)
        student.train()
        for epoch in range(epochs):
            perm = torch.randperm(len(xs), generator=order)
            total = 0.0
            for start in range(0, len(xs), BATCH):
                idx = perm[start:start + BATCH]
                out = student.raw(xs[idx])
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
                on_epoch(epoch, epochs, total / len(xs))
        student.eval()
    finally:
        torch.set_rng_state(rng_state)
        torch.set_num_threads(threads)
    return student
