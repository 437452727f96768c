"""LiteRT (TFLite) backend: ``ai_edge_litert.interpreter.Interpreter``.

A ``.tflite`` model has fixed input shapes. :meth:`LiteRTRuntime.run` resizes
the inputs to each batch's size; a model whose graph bakes its batch size in
(a reshape to a constant shape, as litert-torch emits for ``x.reshape(-1,
...)``) refuses the resize, and is then run in chunks of its own batch size,
the last chunk padded. Full-integer models take and return int8/uint8
tensors: float inputs are quantized and such outputs dequantized with the
tensor's scale and zero point, so callers always see the variant's declared
float interface. int64 inputs are narrowed to the int32 litert-torch
converts them to.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

__all__ = ["LiteRTRuntime"]


class _Session:
    __slots__ = ("interpreter", "inputs", "outputs", "native_batch", "fixed", "batch")

    def __init__(self, interpreter: Interpreter) -> None:
        self.interpreter = interpreter
        self.inputs = interpreter.get_input_details()
        self.outputs = interpreter.get_output_details()
        self.native_batch = int(self.inputs[0]["shape"][0]) if len(self.inputs[0]["shape"]) else 1
        self.fixed = False  # True once the model refused a resize: run in native-size chunks
        self.batch = self.native_batch


def _to_model(detail: dict[str, Any], array: np.ndarray) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype == array.dtype:
        return array
    if dtype.kind in "iu" and array.dtype.kind == "f":
        scale, zero = detail["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(array / scale) + zero, info.min, info.max).astype(dtype)
    return array.astype(dtype)


def _from_model(detail: dict[str, Any], array: np.ndarray) -> np.ndarray:
    scale, zero = detail["quantization"]
    if array.dtype.kind in "iu" and scale:
        return ((array.astype(np.float32) - zero) * scale).astype(np.float32)
    if array.dtype == np.int32:
        return array.astype(np.int64)
    return array


class LiteRTRuntime:
    format = "tflite"

    def load(self, path: str, *, threads: int) -> Any:
        interpreter = Interpreter(model_path=path, num_threads=threads)
        interpreter.allocate_tensors()
        return _Session(interpreter)

    def _invoke(self, session: _Session, inputs: list[np.ndarray]) -> list[np.ndarray]:
        interp = session.interpreter
        for detail, array in zip(session.inputs, inputs, strict=True):
            interp.set_tensor(detail["index"], _to_model(detail, np.ascontiguousarray(array)))
        interp.invoke()
        return [_from_model(d, interp.get_tensor(d["index"])) for d in session.outputs]

    def _resize(self, session: _Session, batch: int) -> bool:
        """Resize every input to ``batch`` rows; False when the model cannot take that size."""
        interp = session.interpreter
        try:
            for detail in session.inputs:
                interp.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
            interp.allocate_tensors()
        except (RuntimeError, ValueError):
            for detail in session.inputs:
                interp.resize_tensor_input(detail["index"], [session.native_batch,
                                                             *detail["shape"][1:]])
            interp.allocate_tensors()
            session.batch = session.native_batch
            return False
        session.batch = batch
        return True

    def run(self, session: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
        rows = int(inputs[0].shape[0])
        if rows == session.batch:
            return self._invoke(session, inputs)
        if not session.fixed:
            if self._resize(session, rows):
                return self._invoke(session, inputs)
            session.fixed = True
        return self._run_chunked(session, inputs, rows)

    def _run_chunked(self, session: _Session, inputs: list[np.ndarray], rows: int
                     ) -> list[np.ndarray]:
        size = session.native_batch
        parts: list[list[np.ndarray]] = []
        for start in range(0, rows, size):
            chunk = [a[start:start + size] for a in inputs]
            short = size - chunk[0].shape[0]
            if short:
                chunk = [np.concatenate([c, np.repeat(c[-1:], short, axis=0)]) for c in chunk]
            outs = self._invoke(session, chunk)
            parts.append([o[:size - short].copy() for o in outs])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
