"""Measure a variant's latency, cold start and memory on this machine with a given thread budget.

:func:`profile_variant` profiles any format through the runtime interface
(:func:`mesh.runtimes.runtime_for`), exactly as a node would run it, and
returns a :class:`~mesh.registry.Profile`:

- ``cold_start_ms``: ``runtime.load`` plus the first run (batch 1), what a
  node pays to bring a variant up (the runtime library itself is imported
  beforehand: a node pays that once per process, not per variant);
- ``batch_ms[b]``: the median of ``runtime.run`` over repeated calls at batch
  size ``b``, after a warm-up;
- ``fit``: a least-squares line ``intercept + per_row * b`` through those
  medians, with the worst relative gap to a measurement. When that gap
  exceeds :data:`FIT_TOLERANCE` (noise from a neighbour on a shared machine
  or a real knee in the curve), the batch sizes are measured once more and
  the better-fitting set is kept; the fit error is recorded either way;
- ``peak_memory_bytes``: measured in a fresh process (:mod:`mesh.variants.memory`)
  as the growth of its resident-set high-water mark while loading the variant
  and running its largest batch.

Inputs are rows of the validation set tiled to each batch size when given
(token ids must be real ids), else seeded random values of the declared
shape and dtype. Each batch size stops after ``repeats`` runs or
``budget_s`` seconds, but never fewer than ``min_repeats`` runs.

:func:`profile_onnx` is a shorthand for one-input ONNX models held as bytes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mesh.registry import LatencyFit, Profile, TensorSpec
from mesh.runtimes import runtime_for, thread_env

__all__ = ["FIT_TOLERANCE", "batch_sizes_up_to", "fit_latency",
           "make_batch", "profile_variant", "peak_memory_bytes", "profile_onnx"]

FIT_TOLERANCE = 0.25
"""Largest relative gap between the linear latency model and a measurement before re-measuring."""


def batch_sizes_up_to(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to and including ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return tuple(sizes)


def fit_latency(batch_ms: dict[int, float]) -> LatencyFit:
    """Least-squares ``intercept + per_row * batch`` and its worst relative error."""
    sizes = sorted(batch_ms)
    x = np.array(sizes, dtype=np.float64)
    y = np.array([batch_ms[b] for b in sizes], dtype=np.float64)
    if len(sizes) == 1:
        intercept, slope = 0.0, float(y[0] / x[0])
    else:
        slope, intercept = (float(v) for v in np.polyfit(x, y, 1))
    fitted = np.maximum(intercept + slope * x, 0.0)
    error = float(np.max(np.abs(fitted - y) / np.maximum(y, 1e-9)))
    return LatencyFit(intercept_ms=intercept, per_row_ms=slope, max_error_frac=error)


def _random_input(spec: TensorSpec, batch: int, rng: np.random.Generator) -> np.ndarray:
    if not spec.shape or spec.shape[0] != -1:
        raise ValueError(f"input {spec.name!r}: shape {spec.shape} has no leading batch "
                         "dimension; declare it as -1")
    if any(d < 0 for d in spec.shape[1:]):
        raise ValueError(f"input {spec.name!r}: only the batch dimension may be -1, "
                         f"got shape {spec.shape}")
    shape = (batch, *spec.shape[1:])
    return rng.random(shape, dtype=np.float64).astype(np.dtype(spec.dtype))


def make_batch(specs: Sequence[TensorSpec], batch: int, sample: Sequence[np.ndarray] | None,
               rng: np.random.Generator) -> list[np.ndarray]:
    """``batch`` rows per input: ``sample``'s rows repeated, or random values of the spec."""
    if sample is None:
        return [_random_input(s, batch, rng) for s in specs]
    if len(sample) != len(specs):
        raise ValueError(f"sample has {len(sample)} arrays for {len(specs)} inputs")
    rows = len(sample[0])
    idx = np.arange(batch) % rows
    return [np.ascontiguousarray(a[idx]) for a in sample]


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _time_batches(runtime: object, session: object, feeds: dict[int, object], *,
                  warmup: int, repeats: int, min_repeats: int, budget_s: float
                  ) -> dict[int, float]:
    batch_ms: dict[int, float] = {}
    for batch, feed in sorted(feeds.items()):
        for _ in range(warmup):
            runtime.run(session, feed)  # type: ignore[attr-defined]
        samples: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(samples) < repeats and (len(samples) < min_repeats
                                          or time.perf_counter() < deadline):
            start = time.perf_counter()
            runtime.run(session, feed)  # type: ignore[attr-defined]
            samples.append(_ms_since(start))
        batch_ms[batch] = statistics.median(samples)
    return batch_ms


def peak_memory_bytes(path: str | Path, fmt: str, inputs: Sequence[np.ndarray], *,
                      threads: int, timeout_s: float = 300.0) -> int:
    """Resident memory a fresh process gains loading ``path`` and running ``inputs`` (bytes).

    Raises ``RuntimeError`` with the child's stderr when the measurement fails.
    """
    with tempfile.TemporaryDirectory(prefix="tiermesh-mem-") as tmp:
        feed = Path(tmp) / "inputs.npz"
        np.savez(feed, *inputs)
        cmd = [sys.executable, "-m", "mesh.variants.memory", fmt, str(path), str(feed),
               str(threads)]
        env = dict(os.environ) | thread_env(threads)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                              check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {path} failed: {done.stderr.strip()[-2000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])


def profile_variant(
    path: str | Path,
    fmt: str,
    inputs: Sequence[TensorSpec],
    *,
    threads: int,
    batch_sizes: Iterable[int] = (1, 8, 32),
    sample: Sequence[np.ndarray] | None = None,
    memory: bool = True,
    warmup: int = 3,
    repeats: int = 200,
    min_repeats: int = 5,
    budget_s: float = 0.05,
    seed: int = 0,
) -> Profile:
    """Profile the artifact at ``path`` of format ``fmt`` with ``threads`` compute threads.

    Raises ``ValueError`` for a non-positive thread count or batch size, or an
    input spec without a leading ``-1`` batch dimension;
    :class:`~mesh.errors.Unavailable` when the format's runtime is not
    installed; the runtime's own errors for an artifact it cannot load or run.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    sizes = sorted(set(batch_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch_sizes must be positive integers, got {sizes}")
    rng = np.random.default_rng(seed)
    feeds = {b: make_batch(inputs, b, sample, rng) for b in sizes}
    runtime = runtime_for(fmt)  # imports the backend library outside the cold-start timing

    peak = peak_memory_bytes(path, fmt, feeds[sizes[-1]], threads=threads) if memory else 0

    start = time.perf_counter()
    session = runtime.load(str(path), threads=threads)
    runtime.run(session, [a[:1] for a in feeds[sizes[0]]])
    cold_start_ms = _ms_since(start)

    timing = {"warmup": warmup, "repeats": repeats, "min_repeats": min_repeats,
              "budget_s": budget_s}
    batch_ms = _time_batches(runtime, session, feeds, **timing)
    fit = fit_latency(batch_ms)
    if fit.max_error_frac > FIT_TOLERANCE and len(sizes) > 2:
        again = _time_batches(runtime, session, feeds, **timing)
        refit = fit_latency(again)
        if refit.max_error_frac < fit.max_error_frac:
            batch_ms, fit = again, refit
    return Profile(batch_ms=batch_ms, cold_start_ms=cold_start_ms, peak_memory_bytes=peak,
                   fit=fit)


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
    """:func:`profile_variant` for one-input ONNX ``model`` given as bytes or a file path.

    Latency and cold start only (no memory measurement); the same errors as
    :func:`profile_variant`.
    """
    options = {"threads": threads, "batch_sizes": batch_sizes, "memory": False,
               "warmup": warmup, "repeats": repeats, "min_repeats": min_repeats,
               "budget_s": budget_s, "seed": seed}
    if not isinstance(model, bytes):
        return profile_variant(model, "onnx", [input_spec], **options)
    with tempfile.TemporaryDirectory(prefix="tiermesh-profile-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model)
        return profile_variant(path, "onnx", [input_spec], **options)
