"""onnxruntime backend."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

__all__ = ["OnnxRuntime"]


class OnnxRuntime:
    format = "onnx"

    def load(self, path: str, *, threads: int) -> Any:
        options = ort.SessionOptions()
        # Several agents share a small machine: each gets exactly its hardware
        # class's threads, no inter-op pool and no spinning threads.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3
        session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        # Input names resolved once: run() is on the hot path.
        return _Session(session, [i.name for i in session.get_inputs()])

    def run(self, session: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return list(session.session.run(None, dict(zip(session.names, inputs, strict=True))))


class _Session:
    __slots__ = ("session", "names")

    def __init__(self, session: ort.InferenceSession, names: list[str]) -> None:
        self.session = session
        self.names = names
