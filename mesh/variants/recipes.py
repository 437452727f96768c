"""What the factory can make of a submission, and how: one :class:`Plan` per variant.

:func:`plans` lists the variants a submission allows (and why the others are
skipped); :func:`build_artifact` makes one of them, raising when the
conversion fails or :class:`NotApplicable` when the model turns out not to
allow it (dynamic int8 of a graph without MatMuls). The runners execute the
submitted model (:func:`reference_outputs`) and a built artifact through the
node runtimes (:func:`run_artifact`) on a dataset.

Variant names are ``NAME-SUFFIX`` with the suffixes in :data:`SUFFIXES`.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mesh.registry import TensorSpec
from mesh.runtimes import runtime_for
from mesh.variants import convert
from mesh.variants.dataset import Dataset
from mesh.variants.source import Source

__all__ = ["SUFFIXES", "DYNAMIC_MATMUL_SHARE", "Plan", "Job", "NotApplicable", "plans",
           "original_suffix", "build_artifact", "reference_outputs", "run_artifact",
           "short_error"]

SUFFIXES: tuple[str, ...] = ("torch-fp32", "torch-cuda-fp32", "onnx-fp32", "onnx-int8",
                             "onnx-int8-dynamic", "tflite-fp32", "tflite-int8",
                             "student-onnx-fp32")
"""Every variant the factory knows how to make, in the order it makes them."""

DYNAMIC_MATMUL_SHARE = 0.5
"""Dynamic int8 is generated when at least this share of the compute weights feed MatMuls."""


@dataclass(frozen=True)
class Plan:
    """One variant to make: its name suffix, format, precision and acceptance tier."""

    suffix: str
    format: str
    precision: str
    tier: str  # which agreement limits apply: fp32, int8 or student
    quantization: str = ""
    device: str = "cpu"


@dataclass
class Job:
    """One registration: the submission, its data and interface, and the shared ONNX export."""

    name: str
    task: str
    kind: str
    source: Source
    validation: Dataset
    train: Dataset | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    reference: np.ndarray
    max_batch: int
    progress: bool = True
    onnx_fp32: bytes | None = None
    onnx_error: str = ""


class NotApplicable(Exception):
    """The model does not allow this variant: skipped, not rejected."""


def short_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}" if text else type(exc).__name__


def _cuda_available() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())


def _run_torch(module: Any, data: Dataset, batch: int) -> list[np.ndarray]:
    import torch

    parts: list[list[np.ndarray]] = []
    with torch.no_grad():
        for chunk in data.batches(batch):
            out = module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in chunk))
            outs = out if isinstance(out, list | tuple) else (out,)
            parts.append([o.detach().cpu().numpy() for o in outs])
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def run_artifact(path: Path, fmt: str, data: Dataset, batch: int) -> list[np.ndarray]:
    runtime = runtime_for(fmt)
    session = runtime.load(str(path), threads=1)
    parts = [runtime.run(session, chunk) for chunk in data.batches(batch)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def reference_outputs(source: Source, data: Dataset, batch: int) -> list[np.ndarray]:
    if source.kind == "onnx":
        with tempfile.TemporaryDirectory(prefix="tiermesh-ref-") as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(source.model)
            return run_artifact(path, "onnx", data, batch)
    return _run_torch(source.model, data, batch)


def _teacher_params(source: Source) -> int:
    if source.kind == "onnx":
        import onnx
        from onnx import numpy_helper

        graph = onnx.load_model_from_string(source.model).graph
        return sum(int(numpy_helper.to_array(i).size) for i in graph.initializer)
    return sum(int(p.numel()) for p in source.model.parameters())


def plans(ctx: Job, wanted: set[str]) -> tuple[list[Plan], dict[str, str]]:
    """What to attempt for this source, and why the rest is skipped."""
    plans: list[Plan] = []
    skipped: dict[str, str] = {}
    src = ctx.source

    def offer(plan: Plan, why_not: str = "") -> None:
        if plan.suffix not in wanted:
            return
        if why_not:
            skipped[plan.suffix] = why_not
        else:
            plans.append(plan)

    no_torch = "" if src.is_torch else "an ONNX submission has no torch model to run or convert"
    offer(Plan("torch-fp32", "torch", "fp32", "fp32"), no_torch)
    offer(Plan("torch-cuda-fp32", "torch-cuda", "fp32", "fp32", device="cuda"),
          no_torch or ("" if _cuda_available() else "no CUDA GPU on this machine"))
    offer(Plan("onnx-fp32", "onnx", "fp32", "fp32"))
    offer(Plan("onnx-int8", "onnx", "int8", "int8", quantization="static"))
    offer(Plan("onnx-int8-dynamic", "onnx", "int8", "int8", quantization="dynamic"))
    no_tflite = "" if src.is_torch else "litert-torch converts torch models, not ONNX"
    offer(Plan("tflite-fp32", "tflite", "fp32", "fp32"), no_tflite)
    offer(Plan("tflite-int8", "tflite", "int8", "int8", quantization="static"), no_tflite)
    no_student = ("" if ctx.train is not None else "no training set given (--train)")
    offer(Plan("student-onnx-fp32", "onnx", "fp32", "student"), no_student)
    return plans, skipped


def original_suffix(source: Source) -> str:
    return "onnx-fp32" if source.kind == "onnx" else "torch-fp32"


def _ensure_onnx(ctx: Job) -> bytes:
    if ctx.onnx_fp32 is None:
        if ctx.onnx_error:
            raise RuntimeError(f"needs the ONNX fp32 export, which failed ({ctx.onnx_error})")
        try:
            if ctx.source.kind == "onnx":
                ctx.onnx_fp32 = ctx.source.model
            else:
                ctx.onnx_fp32 = convert.onnx_from_torch(
                    ctx.source.model, [a[:2] for a in ctx.validation.inputs],
                    [s.name for s in ctx.inputs], [s.name for s in ctx.outputs])
        except Exception as exc:
            ctx.onnx_error = short_error(exc)
            raise
    return ctx.onnx_fp32


def _calibration_bar(ctx: Job, total: int, unit: str) -> tqdm:
    return tqdm(total=total, desc=f"calibrate {ctx.name}", unit=unit, file=sys.stderr,
                disable=not ctx.progress, leave=False, dynamic_ncols=True)


def build_artifact(plan: Plan, ctx: Job, on_student: Callable[..., None]) -> bytes:
    """The artifact bytes for ``plan``; raises when the conversion fails."""
    src, val = ctx.source, ctx.validation
    if plan.suffix in ("torch-fp32", "torch-cuda-fp32"):
        if src.kind == "torchscript":
            assert src.original_bytes is not None
            return src.original_bytes
        return convert.torch_artifact(src.model, [a[:2] for a in val.inputs])
    if plan.suffix == "onnx-fp32":
        return _ensure_onnx(ctx)
    if plan.suffix == "onnx-int8":
        fp32 = _ensure_onnx(ctx)
        batches = val.batches(convert.CALIBRATION_BATCH)
        with _calibration_bar(ctx, len(batches), "batch") as calibration:
            return convert.onnx_int8_static(fp32, batches, on_batch=calibration.update)
    if plan.suffix == "onnx-int8-dynamic":
        fp32 = _ensure_onnx(ctx)
        share = convert.matmul_weight_share(fp32)
        if share < DYNAMIC_MATMUL_SHARE:
            raise NotApplicable(f"only {share:.0%} of the compute weights feed MatMuls "
                                 f"(needs {DYNAMIC_MATMUL_SHARE:.0%}); dynamic quantization "
                                 "would leave the model mostly fp32")
        return convert.onnx_int8_dynamic(fp32)
    if plan.suffix in ("tflite-fp32", "tflite-int8"):
        if importlib.util.find_spec("litert_torch") is None:
            raise NotApplicable("litert-torch is not installed: pip install 'tiermesh[convert]'")
        if src.kind == "torchscript":
            raise RuntimeError("litert-torch converts torch.export-able modules; a TorchScript "
                               "file cannot be converted (submit a .pt2 or module:factory)")
        if plan.suffix == "tflite-fp32":
            return convert.tflite_from_torch(src.model, val.inputs, int8=False)
        rows = min(len(val), convert.TFLITE_CALIBRATION_ROWS)
        with _calibration_bar(ctx, rows, "row") as calibration:
            return convert.tflite_from_torch(src.model, val.inputs, int8=True,
                                             on_row=calibration.update)
    if plan.suffix == "student-onnx-fp32":
        from mesh.variants import distill

        assert ctx.train is not None
        _, why_not = distill.student_for(ctx.train.inputs)
        if why_not:
            raise NotApplicable(why_not)
        teacher = reference_outputs(ctx.source, ctx.train, ctx.max_batch)[0]
        student = distill.train_student(
            ctx.train.inputs, teacher, ctx.train.labels, ctx.kind,
            teacher_params=_teacher_params(src), on_epoch=on_student)
        return convert.onnx_from_torch(student, [a[:2] for a in val.inputs],
                                       [s.name for s in ctx.inputs],
                                       [s.name for s in ctx.outputs[:1]])
    raise AssertionError(plan.suffix)
