"""Conversions from a submitted model to runnable artifacts (bytes); each may raise.

- :func:`torch_artifact`: the torch model itself, as a ``torch.export``
  archive with a dynamic batch dimension (TorchScript submissions are kept
  as submitted);
- :func:`onnx_from_torch`: ONNX fp32 with the legacy TorchScript-based
  exporter (``dynamo=False``: small, stable graphs), batch axis dynamic;
- :func:`onnx_int8_static`: onnxruntime static quantization (QDQ, int8
  weights per channel, int8 activations) calibrated on validation inputs;
- :func:`onnx_int8_dynamic`: onnxruntime dynamic quantization (int8 weights
  per channel, activations quantized at run time), which pays off when the
  graph's compute weights sit in MatMuls (:func:`matmul_weight_share`);
- :func:`tflite_from_torch`: LiteRT flatbuffers with ``litert-torch``, fp32
  or int8 (PT2E static quantization, symmetric per channel, calibrated on
  validation rows). Converted at batch 1; the LiteRT runtime resizes (or
  chunks) batches.

torch, onnx and litert-torch are imported inside the functions, so this
module loads without them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["OPSET", "quiet", "torch_artifact", "onnx_from_torch", "onnx_int8_static",
           "onnx_int8_dynamic", "matmul_weight_share", "tflite_from_torch"]

OPSET = 17
CALIBRATION_BATCH = 32
TFLITE_CALIBRATION_ROWS = 128
MAX_EXPORT_BATCH = 4096


_NOISY_LOGGERS = (
    "",  # root: onnxruntime.quantization advises "consider pre-processing" there
    "torchao",  # its optional CUDA kernels fail to load on a CPU-only machine, by design
    "torch.utils._pytree",  # torchao registers Enums the deprecated way
)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence third-party warnings and log chatter while exporting, quantizing or loading models."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # Tracer, deprecation and future warnings from torch, transformers and the
            # quantizers say nothing a user of the factory can act on; agreement checks
            # catch a conversion that really went wrong.
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _tensors(arrays: Sequence[np.ndarray]) -> tuple[Any, ...]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def _dynamic_batch(n_inputs: int) -> tuple[dict[int, Any], ...]:
    import torch

    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    return tuple({0: batch} for _ in range(n_inputs))


def _frozen(module: Any) -> Any:
    """``module`` wrapped so that ``train()``/``eval()`` are no-ops.

    The legacy ONNX exporter switches modules to eval mode, which a module
    loaded from a ``torch.export`` archive refuses.
    """
    import torch

    class Frozen(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def train(self, mode: bool = True) -> Frozen:
            return self

        def forward(self, *args: torch.Tensor) -> Any:
            return self.inner(*args)

    return Frozen(module)


def torch_artifact(module: Any, sample: Sequence[np.ndarray]) -> bytes:
    """``torch.export`` archive bytes of ``module`` with a dynamic batch dimension.

    ``sample`` holds at least two rows per input (torch.export specialises a
    dimension of size 1).
    """
    import torch

    with quiet():
        program = torch.export.export(module, _tensors(sample),
                                      dynamic_shapes=_dynamic_batch(len(sample)))
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
    return buffer.getvalue()


def onnx_from_torch(module: Any, sample: Sequence[np.ndarray], input_names: Sequence[str],
                    output_names: Sequence[str]) -> bytes:
    """ONNX (opset :data:`OPSET`) bytes of ``module``, batch axis dynamic on every input/output."""
    import torch

    axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    buffer = io.BytesIO()
    target = module if isinstance(module, torch.jit.ScriptModule) else _frozen(module)
    with quiet():
        torch.onnx.export(
            target, _tensors(sample), buffer,  # type: ignore[arg-type]
            dynamo=False, opset_version=OPSET, input_names=list(input_names),
            output_names=list(output_names), dynamic_axes=axes)
    return buffer.getvalue()


def _calibration_reader(names: Sequence[str], batches: Sequence[Sequence[np.ndarray]],
                        on_batch: Callable[[], None] | None) -> Any:
    """An onnxruntime ``CalibrationDataReader`` yielding ``batches`` as name -> array feeds."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter([dict(zip(names, b, strict=True)) for b in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(self._feeds, None)
            if feed is not None and on_batch is not None:
                on_batch()
            return feed

    return Reader()


def onnx_int8_static(onnx_bytes: bytes, calibration: Sequence[Sequence[np.ndarray]], *,
                     on_batch: Callable[[], None] | None = None) -> bytes:
    """Statically quantized ONNX bytes: QDQ, int8 per-channel weights, int8 activations.

    ``calibration`` is a list of batches (one array per model input), run once
    to fix the activation ranges (min/max); ``on_batch()`` is called as each
    is fed (progress).
    """
    import tempfile
    from pathlib import Path

    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    names = [i.name for i in onnx.load_model_from_string(onnx_bytes).graph.input]
    with tempfile.TemporaryDirectory(prefix="tiermesh-q-") as tmp, quiet():
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        quantize_static(src, dst, _calibration_reader(names, calibration, on_batch),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return dst.read_bytes()


def onnx_int8_dynamic(onnx_bytes: bytes) -> bytes:
    """Dynamically quantized ONNX bytes: int8 per-channel weights, activations quantized per run."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="tiermesh-q-") as tmp, quiet():
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)
        return dst.read_bytes()


def matmul_weight_share(onnx_bytes: bytes) -> float:
    """Share of the graph's compute weights (MatMul, Gemm, Conv) that feed ``MatMul`` nodes (0..1).

    Dynamic quantization in onnxruntime makes MatMuls with a constant weight
    int8 (not Gemm, not Conv), so this says how much of the model's
    arithmetic it can speed up: a transformer scores near 1, a Gemm-only MLP
    or a CNN 0. Embedding tables (Gather) are not compute and are left out.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_model_from_string(onnx_bytes).graph
    sizes = {init.name: int(numpy_helper.to_array(init).size) for init in graph.initializer}

    def weights(ops: tuple[str, ...]) -> set[str]:
        return {name for node in graph.node if node.op_type in ops
                for name in node.input if name in sizes}

    matmul = weights(("MatMul",))
    compute = matmul | weights(("Gemm", "Conv", "ConvTranspose"))
    total = sum(sizes[n] for n in compute)
    return sum(sizes[n] for n in matmul) / total if total else 0.0


def tflite_from_torch(module: Any, rows: Sequence[np.ndarray], *, int8: bool,
                      on_row: Callable[[], None] | None = None) -> bytes:
    """LiteRT flatbuffer bytes of ``module`` converted at batch 1.

    ``rows`` are validation inputs (one array per model input); the first row
    is the conversion example and, for ``int8``, up to
    :data:`TFLITE_CALIBRATION_ROWS` rows calibrate the activation ranges
    (``on_row()`` is called after each: progress).
    """
    import torch

    example = _tensors([a[:1] for a in rows])
    # The converter's TensorFlow core logs every conversion at INFO on stderr; keep warnings.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet():
        import litert_torch

        litert_torch.config.show_progress = False
        if not int8:
            return bytes(litert_torch.convert(module, example).model_content())
        from litert_torch.quantize import pt2e_quantizer
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import quantize_pt2e

        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True,
                                                             is_dynamic=False))
        prepared = quantize_pt2e.prepare_pt2e(torch.export.export(module, example).module(),
                                              quantizer)
        with torch.no_grad():
            for i in range(min(len(rows[0]), TFLITE_CALIBRATION_ROWS)):
                prepared(*_tensors([a[i:i + 1] for a in rows]))
                if on_row is not None:
                    on_row()
        converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
        edge = litert_torch.convert(converted, example,
                                    quant_config=QuantConfig(pt2e_quantizer=quantizer))
        return bytes(edge.model_content())
