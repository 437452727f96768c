"""The ``digits`` family: three classifiers of scikit-learn's bundled 8x8 digits.

Every variant takes ``input`` float32 ``[batch, 64]`` (pixels scaled to 0..1)
and returns ``probs`` float32 ``[batch, 10]`` (a softmax over the ten digits):

    linear   64 -> 10
    mlp      64 -> 128 -> 64 -> 10, ReLU
    cnn      [1, 8, 8] -> conv 32 -> conv 64 -> maxpool 2 -> fc 128 -> 10, ReLU

The CNN is the family's submitted model: ``mesh build`` trains it with
:func:`train` and hands the torch model to the variant factory, which makes
its torch, ONNX, int8, TFLite and student variants
(:mod:`mesh.variants.bundled`). The linear and MLP models are trained and
exported here (:func:`train_variant`) as extra members of the family.

Training is deterministic (fixed seeds, fixed data order, one thread,
deterministic kernels), so on a given machine and library versions
:func:`train_variant` always returns the same ONNX bytes. The build key in
:mod:`mesh.variants.build` hashes this file's source, so any change here
(architecture, recipe, split) invalidates cached builds.

Accuracy is measured by running the exported ONNX model with onnxruntime on a
fixed, stratified held-out split (:func:`load_heldout`).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

__all__ = [
    "ARCHS",
    "Classifier",
    "TrainedVariant",
    "load_split",
    "load_heldout",
    "build_model",
    "count_macs",
    "train",
    "export_onnx",
    "onnx_accuracy",
    "train_variant",
    "epochs",
]

ARCHS: tuple[str, ...] = ("linear", "mlp", "cnn")
"""Architectures of the family, smallest first."""

N_FEATURES = 64
N_CLASSES = 10
TEST_FRACTION = 0.3
SPLIT_SEED = 20240601
TRAIN_SEED = 1234
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "probs"


@dataclass(frozen=True, slots=True)
class _Recipe:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    shift_augment: bool = False


_RECIPES: dict[str, _Recipe] = {
    "linear": _Recipe(epochs=40, batch_size=64, lr=0.02),
    "mlp": _Recipe(epochs=60, batch_size=64, lr=0.003, weight_decay=1e-4),
    "cnn": _Recipe(epochs=20, batch_size=64, lr=0.002, shift_augment=True),
}


def epochs(arch: str) -> int:
    """How many epochs ``arch`` trains for (the length of its progress bar)."""
    return _RECIPES[arch].epochs


@dataclass(frozen=True, slots=True)
class TrainedVariant:
    """One trained, exported and measured architecture."""

    arch: str
    onnx_bytes: bytes
    accuracy: float
    macs: int


# --------------------------------------------------------------------------- data


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: x float32 ``[N, 64]`` in 0..1, y int64.

    The split is stratified and seeded, so it is the same on every call.
    """
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED)
    return x_train, y_train, x_test, y_test


def load_heldout() -> tuple[np.ndarray, np.ndarray]:
    """The held-out images and their true labels: ``(x float32 [N, 64], y int64 [N])``.

    These are the images every variant's accuracy was measured on; no model saw
    them in training.
    """
    _, _, x_test, y_test = load_split()
    return x_test, y_test


# --------------------------------------------------------------------------- models


class Classifier(nn.Module):
    """``logits`` produces scores; ``forward`` (what is exported) adds the softmax."""

    def __init__(self, logits: nn.Module) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)


class _Image(nn.Module):
    """``[batch, 64]`` -> ``[batch, 1, 8, 8]``; ``-1`` keeps the batch axis dynamic in ONNX."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1, 8, 8)


def build_model(arch: str) -> Classifier:
    """A freshly initialised model of ``arch`` (uses torch's global RNG)."""
    if arch == "linear":
        logits: nn.Module = nn.Linear(N_FEATURES, N_CLASSES)
    elif arch == "mlp":
        logits = nn.Sequential(
            nn.Linear(N_FEATURES, 128), nn.ReLU(),
            nn.Linear(128, 64), nn.ReLU(),
            nn.Linear(64, N_CLASSES),
        )
    elif arch == "cnn":
        logits = nn.Sequential(
            _Image(),
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
            nn.Linear(128, N_CLASSES),
        )
    else:
        raise ValueError(f"arch {arch!r} is not a digits architecture (choose from {ARCHS})")
    return Classifier(logits)


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates for one input row, counted on every Linear and Conv2d."""
    total = 0

    def on_linear(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Linear)
        total += out.numel() * module.in_features

    def on_conv(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d)
        kh, kw = module.kernel_size
        total += out.numel() * (module.in_channels // module.groups) * kh * kw

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(on_linear))
        elif isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(on_conv))
    try:
        with torch.no_grad():
            model(torch.zeros(1, N_FEATURES))
    finally:
        for handle in handles:
            handle.remove()
    return total


# --------------------------------------------------------------------------- training


@contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    """Seeded, single-threaded, deterministic kernels; torch's global settings restored after."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    rng_state = torch.get_rng_state()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(rng_state)
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _shifted_copies(x: torch.Tensor) -> torch.Tensor:
    """All nine 1-pixel shifts (zero-filled) of ``x [N, 64]``: ``[9, N, 64]``."""
    padded = nn.functional.pad(x.reshape(-1, 8, 8), (1, 1, 1, 1))
    shifts = [padded[:, dy:dy + 8, dx:dx + 8].reshape(-1, N_FEATURES)
              for dy in range(3) for dx in range(3)]
    return torch.stack(shifts)


def train(arch: str, x_train: np.ndarray, y_train: np.ndarray, *,
          on_epoch: Callable[[int, float], None] | None = None) -> Classifier:
    """Train ``arch`` on the given rows; deterministic for the same inputs.

    ``on_epoch(epoch, mean_loss)`` is called after each epoch (progress reporting).
    Returns the model in eval mode.
    """
    recipe = _RECIPES[arch]
    with _deterministic_torch(TRAIN_SEED):
        model = build_model(arch)
        x = torch.from_numpy(x_train)
        y = torch.from_numpy(y_train)
        views = _shifted_copies(x) if recipe.shift_augment else x.unsqueeze(0)
        order_rng = torch.Generator().manual_seed(TRAIN_SEED)
        optimiser = torch.optim.Adam(model.parameters(), lr=recipe.lr,
                                     weight_decay=recipe.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=recipe.epochs)
        rows = torch.arange(len(x))
        model.train()
        for epoch in range(recipe.epochs):
            perm = torch.randperm(len(x), generator=order_rng)
            view = torch.randint(len(views), (len(x),), generator=order_rng)
            total = 0.0
            for start in range(0, len(x), recipe.batch_size):
                idx = perm[start:start + recipe.batch_size]
                batch = views[view[idx], rows[idx]]
                loss = nn.functional.cross_entropy(model.logits(batch), y[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += loss.item() * len(idx)
            schedule.step()
            if on_epoch is not None:
                on_epoch(epoch, total / len(x))
        model.eval()
    return model


# --------------------------------------------------------------------------- export


def export_onnx(model: nn.Module) -> bytes:
    """ONNX bytes (opset 17): ``input`` float32 ``[batch, 64]`` -> ``probs`` ``[batch, 10]``."""
    buffer = io.BytesIO()
    model.eval()
    with warnings.catch_warnings():
        # The legacy TorchScript exporter is deprecated but produces small, stable graphs.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, N_FEATURES),),
            buffer,  # type: ignore[arg-type]  # the legacy exporter accepts a binary file object
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return buffer.getvalue()


def onnx_accuracy(model_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an exported model, run with onnxruntime on ``(x, y)``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    (probs,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    return float(np.mean(np.argmax(probs, axis=1) == y))


def train_variant(arch: str, *,
                  on_epoch: Callable[[int, float], None] | None = None) -> TrainedVariant:
    """Train, export and measure one architecture on the fixed split."""
    x_train, y_train, x_test, y_test = load_split()
    model = train(arch, x_train, y_train, on_epoch=on_epoch)
    onnx_bytes = export_onnx(model)
    return TrainedVariant(arch=arch, onnx_bytes=onnx_bytes,
                          accuracy=onnx_accuracy(onnx_bytes, x_test, y_test),
                          macs=count_macs(model))
