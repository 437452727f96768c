"""Measure an ONNX model's latency on this machine with a given thread budget.

:func:`profile_onnx` returns a :class:`~mesh.registry.Profile`:

- ``cold_start_ms``: creating the onnxruntime session plus its first run
  (batch 1), what a node pays to bring a variant up;
- ``batch_ms[b]``: the median of ``session.run`` over repeated calls at batch
  size ``b``, after a warm-up, with ``intra_op_num_threads=threads``,
  ``inter_op_num_threads=1`` and sequential execution, the settings of
  :func:`session_options`.

Inputs are seeded random values of the declared shape and dtype; a model's
latency on CPU does not depend on the values. Each batch size stops after
``repeats`` runs or ``budget_s`` seconds (but never fewer than
``min_repeats`` runs), so profiling one variant at one thread setting takes a
few hundred milliseconds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mesh.registry import Profile, TensorSpec

__all__ = ["session_options", "profile_onnx"]


def session_options(threads: int) -> ort.SessionOptions:
    """onnxruntime options for running with ``threads`` compute threads, one op at a time."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only; the default logs graph-optimisation chatter
    return options


def _batch_input(spec: TensorSpec, batch: int, rng: np.random.Generator) -> np.ndarray:
    if not spec.shape or spec.shape[0] != -1:
        raise ValueError(f"input {spec.name!r}: shape {spec.shape} has no leading batch "
                         "dimension; declare it as -1")
    if any(d < 0 for d in spec.shape[1:]):
        raise ValueError(f"input {spec.name!r}: only the batch dimension may be -1, "
                         f"got shape {spec.shape}")
    shape = (batch, *spec.shape[1:])
    return rng.random(shape, dtype=np.float64).astype(np.dtype(spec.dtype))


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def profile_onnx(
    model: bytes | str | Path,
    input_spec: TensorSpec,
    *,
    threads: int,
    batch_sizes: Iterable[int] = (1, 8, 32),
    warmup: int = 3,
    repeats: int = 200,
    min_repeats: int = 5,
    budget_s: float = 0.05,
    seed: int = 0,
) -> Profile:
    """Profile ``model`` (ONNX bytes or a file path) with ``threads`` compute threads.

    Raises ``ValueError`` for a non-positive thread count or batch size, or an
    input spec without a leading ``-1`` batch dimension; onnxruntime's own
    errors propagate for a model it cannot load or run.
    """
    sizes = sorted(set(batch_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch_sizes must be positive integers, got {sizes}")
    rng = np.random.default_rng(seed)
    feeds = {b: {input_spec.name: _batch_input(input_spec, b, rng)} for b in sizes}
    source = str(model) if isinstance(model, Path) else model

    start = time.perf_counter()
    session = ort.InferenceSession(source, session_options(threads),
                                   providers=["CPUExecutionProvider"])
    session.run(None, {input_spec.name: _batch_input(input_spec, 1, rng)})
    cold_start_ms = _ms_since(start)

    batch_ms: dict[int, float] = {}
    for batch in sizes:
        feed = feeds[batch]
        for _ in range(warmup):
            session.run(None, feed)
        samples: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(samples) < repeats and (len(samples) < min_repeats
                                          or time.perf_counter() < deadline):
            start = time.perf_counter()
            session.run(None, feed)
            samples.append(_ms_since(start))
        batch_ms[batch] = statistics.median(samples)
    return Profile(batch_ms=batch_ms, cold_start_ms=cold_start_ms)
