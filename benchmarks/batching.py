"""Deadline-aware batching at saturation, against the bound the variant's own profile allows.

On a CPU a model's latency(batch) profile bounds what batching can give: one
compute thread running batches of the sizes the batcher formed can answer at
most ``rows / sum(latency(batch))`` queries a second. For each variant, the
same node agent serves it batched (the variant's ``max_batch``) and unbatched
(``max_batch=1``); a closed loop of C clients, each sending its next query as
soon as its answer arrives, keeps it saturated. Every query carries a latency
SLO, so that the batcher's deadlines and admission are in play and "p95 within
the deadline" means something. Two levels:

- ``engine``: the agent in this process (``NodeAgent.infer``, uvloop), no transport:
  batch sizes are exact (every answer says the rows of the batch it ran in);
- ``http``: the agent in its own process, ``POST /v1/infer`` (msgpack) from a load
  generator in a third: batch sizes from the agent's ``tiermesh_batch_size_rows``
  histogram (scraped before and after each point; its buckets are the profile's
  batch sizes and the profile is linear between them, so only the split of rows
  between buckets is estimated, and a single bucket is exact).

Every point starts a fresh agent (admission learns from load, and what one
point taught it must not decide the next) and the two configurations
alternate at each concurrency, so that a noisy minute hurts both alike.
Refused queries (429/503: admission) count as not served; the clients retry
at once. Reported per point: throughput, latency, refusals, the batch sizes formed, the
profile's bound at those sizes (``bound_rps``), throughput over it
(``of_bound``), and the bound from the batches' run time as the agent measured
it here (``measured_compute_bound_rps``: below ``bound_rps`` when the model ran
slower than profiled, or when a batch run on the compute thread waited for the
busy event loop to take its result; the profile was measured on another day
and the machine is shared, so it can also be above). Goal (issue 9): batched, at saturation (the highest
concurrency), throughput >= 0.9 of the bound with p95 within the SLO. The
batched/unbatched speedup is reported too (the GPU goal, >= 3x, is for a GPU
machine; none is used here).

Variants: the digits CNN (microseconds per row: the agent's own per-query work
is the bottleneck, not the model) and MiniLM fp32 (milliseconds per row: the
model is). Writes ``benchmarks/results/batching.json`` and ``batching.png``
(when matplotlib, the ``bench`` extra, is installed).

    python benchmarks/batching.py [--home DIR] [--seconds 4] [--variants digits-cnn ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._loadgen import (  # noqa: E402
    BENCH_ID,
    HOST,
    agent_options,
    closed_loop,
    code_version,
    http_request,
    machine,
    one_node_topology,
    percentiles_us,
    start_agent,
)

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_OF_BOUND = 0.9
#: variant -> the latency SLO its queries carry and the concurrencies measured
VARIANTS: dict[str, dict[str, Any]] = {
    "digits-cnn": {"slo_ms": 20.0, "concurrency": [1, 8, 32, 64]},
    "minilm-onnx-fp32": {"slo_ms": 1000.0, "concurrency": [1, 8, 32]},
}
CONFIGS: dict[str, dict[str, Any]] = {"batched": {}, "unbatched": {"batching": {"max_batch": 1}}}
PROFILE_KEY = "cpu-1t"  # one_node_topology's hardware: one compute thread


# --------------------------------------------------------------------------- the bound


def profile_bound_rps(profile: Any, batches: dict[float, float]) -> float | None:
    """Rows a second one compute thread gets running ``batches`` ({size: count}) per the profile."""
    rows = sum(size * n for size, n in batches.items())
    seconds = sum(profile.latency_ms(size) / 1000.0 * n for size, n in batches.items())
    return rows / seconds if seconds > 0 else None


def batches_from_histogram(counts: dict[float, float], rows: float) -> dict[float, float]:
    """{mean size in bucket: batches} from bucket counts ({upper bound: n}, not cumulative).

    Only the total rows is known, not each bucket's: each bucket's mean starts at
    its midpoint and all move together, within their bounds, until the rows add up.
    With one bucket (the usual case at saturation) the mean is exact.
    """
    bounds = sorted(counts)
    spans = []
    for i, hi in enumerate(bounds):
        lo = bounds[i - 1] if i else 0.0
        if counts[hi] > 0:
            spans.append((max(lo + 1, 1.0) if hi > 1 else 1.0, hi, counts[hi]))
    if not spans:
        return {}
    lo_total = sum(lo * n for lo, _, n in spans)
    hi_total = sum(hi * n for _, hi, n in spans)
    # one fraction f of the way from each bucket's low end to its high end
    f = 0.5 if hi_total == lo_total else min(max((rows - lo_total) / (hi_total - lo_total), 0.0),
                                                 1.0)
    return {round(lo + f * (hi - lo), 2): n for lo, hi, n in spans}


def _scrape(port: int, variant: str) -> dict[str, Any]:
    """The variant's batch-size histogram and compute seconds from the agent's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, Any] = {"buckets": {}, "rows": 0.0, "batches": 0.0, "compute_s": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("variant") != variant:
                continue
            if s.name == "tiermesh_batch_size_rows_bucket":
                out["buckets"][float(s.labels["le"])] = s.value
            elif s.name == "tiermesh_batch_size_rows_sum":
                out["rows"] = s.value
            elif s.name == "tiermesh_batch_size_rows_count":
                out["batches"] = s.value
            elif s.name == "tiermesh_batch_compute_seconds_sum":
                out["compute_s"] = s.value
    return out


def _histogram_diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    cumulative = {le: after["buckets"].get(le, 0.0) - before["buckets"].get(le, 0.0)
                  for le in after["buckets"] if le != float("inf")}
    counts, running = {}, 0.0
    for le in sorted(cumulative):
        counts[le], running = cumulative[le] - running, cumulative[le]
    rows = after["rows"] - before["rows"]
    return {"counts": {le: n for le, n in counts.items() if n > 0}, "rows": rows,
            "batches": after["batches"] - before["batches"],
            "compute_s": after["compute_s"] - before["compute_s"]}


def _bound_fields(profile: Any, batches: dict[float, float], rows: float, compute_s: float,
                  rps: float) -> dict[str, Any]:
    bound = profile_bound_rps(profile, batches)
    n = sum(batches.values())
    return {"batches_formed": {str(k): round(v, 1) for k, v in sorted(batches.items())},
            "mean_batch_rows": round(rows / n, 2) if n else None,
            "bound_rps": round(bound, 1) if bound else None,
            "of_bound": round(rps / bound, 3) if bound else None,
            "measured_compute_bound_rps": round(rows / compute_s, 1) if compute_s > 0 else None,
            "of_measured_compute_bound": round(rps * compute_s / rows, 3)
            if compute_s > 0 and rows else None}


# --------------------------------------------------------------------------- the two levels


def sample_inputs(task: str, n: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """``n`` one-row queries for ``task``: held-out digits, or token ids with their mask."""
    if task == "digits":
        from mesh.variants.digits import load_heldout

        images = np.ascontiguousarray(load_heldout()[0], dtype=np.float32)
        return [[images[i % len(images)][None, :]] for i in range(n)]
    ids = rng.integers(1000, 5000, size=(n, 64), dtype=np.int64)
    return [[ids[i:i + 1], np.ones((1, 64), dtype=np.int64)] for i in range(n)]


async def _engine(home: Path, variant: Any, options: dict[str, Any], concurrency: int,
                  seconds: float, warmup_s: float, queries: list[list[np.ndarray]],
                  slo_ms: float) -> dict[str, Any]:
    from mesh.errors import MeshError
    from mesh.topology import parse_topology
    from mesh.wire import SLO, InferRequest
    from nodes.agent import AgentConfig, NodeAgent

    config = AgentConfig(node="edge-1", topology=parse_topology(
        one_node_topology([variant.name], max_queue=1024, memory_mb=4096)), home=home,
        **agent_options(options))
    slo = SLO(latency_ms=slo_ms)
    latencies: list[float] = []
    batches: dict[float, float] = {}
    refused: dict[str, int] = {}
    compute_s = 0.0
    async with NodeAgent(config) as agent:
        start = time.perf_counter()
        warm_until, stop_at = start + warmup_s, start + warmup_s + seconds

        async def client(i: int) -> None:
            nonlocal compute_s
            x = queries[i % len(queries)]
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                try:
                    answer = await agent.infer(InferRequest(variant.task, x, slo=slo),
                                               from_client=True)
                except MeshError as exc:
                    if t0 >= warm_until:
                        refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + 1
                    await asyncio.sleep(0)
                    continue
                t1 = time.perf_counter()
                if t0 >= warm_until:
                    latencies.append(t1 - t0)
                    rows = answer.timing["batch_rows"]
                    # each row of a batch answers one query: 1/rows of the batch each
                    batches[rows] = batches.get(rows, 0.0) + 1.0 / rows
                    compute_s += answer.timing["compute_ms"] / 1000.0 / rows
                await asyncio.sleep(0)  # a client elsewhere would not hold the loop either

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    rps = len(latencies) / seconds
    n_refused = sum(refused.values())
    return {"throughput_rps": round(rps, 1),
            "latency": percentiles_us(latencies) if latencies else {}, "refused": refused,
            "refused_share": round(n_refused / max(n_refused + len(latencies), 1), 4),
            **_bound_fields(variant.profiles[PROFILE_KEY], batches, float(len(latencies)),
                            compute_s, rps)}


def run_engine(home: Path, variant: Any, options: dict[str, Any], concurrency: int,
               seconds: float, queries: list[list[np.ndarray]], slo_ms: float
               ) -> dict[str, Any]:
    """One point: a fresh in-process agent saturated by ``concurrency`` clients."""
    import uvloop

    return uvloop.run(_engine(home, variant, options, concurrency, seconds, 1.0, queries,
                              slo_ms))


def run_http(home: Path, variant: Any, options: dict[str, Any], concurrency: int,
             seconds: float, request: bytes) -> dict[str, Any]:
    """One point: a fresh agent process saturated over HTTP from a load generator process."""
    with start_agent(home, one_node_topology([variant.name], max_queue=1024, memory_mb=4096),
                     options=options) as port:
        closed_loop(port, request, concurrency=concurrency, seconds=0.5, warmup_s=0.5)  # warm
        before = _scrape(port, variant.name)
        # no warm-up inside: the histogram counts every batch from here on
        load = closed_loop(port, request, concurrency=concurrency, seconds=seconds,
                           warmup_s=0.0)
        hist = _histogram_diff(before, _scrape(port, variant.name))
    batches = batches_from_histogram(hist["counts"], hist["rows"])
    rps = load["throughput_rps"]
    answered = sum(load["status"].values())
    return {"throughput_rps": rps, "latency": load["latency"], "status": load["status"],
            "refused_share": round(1 - load["status"].get("200", 0) / max(answered, 1), 4),
            "histogram_counts": {str(k): v for k, v in hist["counts"].items()},
            **_bound_fields(variant.profiles[PROFILE_KEY], batches, hist["rows"],
                            hist["compute_s"], rps)}


# --------------------------------------------------------------------------- verdicts, plot


def verdict(points: dict[str, dict[int, dict[str, Any]]], at: int, slo_ms: float
            ) -> dict[str, Any]:
    b, u = points["batched"][at], points["unbatched"][at]
    p95_ms = b["latency"]["p95_us"] / 1000 if b["latency"] else None
    of_bound = b["of_bound"]
    return {"concurrency": at, "throughput_rps": b["throughput_rps"], "bound_rps": b["bound_rps"],
            "of_bound": of_bound, "of_bound_goal": GOAL_OF_BOUND,
            "of_bound_met": of_bound is not None and of_bound >= GOAL_OF_BOUND,
            "p95_ms": round(p95_ms, 2) if p95_ms is not None else None, "slo_ms": slo_ms,
            "p95_met": p95_ms is not None and p95_ms <= slo_ms,
            "refused_share": b["refused_share"],
            "of_measured_compute_bound": b["of_measured_compute_bound"],
            "speedup_vs_unbatched": round(b["throughput_rps"] / u["throughput_rps"], 2)
            if u["throughput_rps"] else None,
            "unbatched_of_bound": u["of_bound"]}


def _plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(report["variants"])
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.6 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        v = report["variants"][name]
        for level, marker in (("engine", "o"), ("http", "s")):
            for config, style in (("batched", "-"), ("unbatched", "--")):
                points = sorted((int(c), r) for c, r in v[level][config].items())
                cs = [c for c, _ in points]
                # a point where admission refused (nearly) everything has no throughput to
                # draw on a log axis: a cross on the axis marks it
                axes[row][0].plot(cs, [r["throughput_rps"] or None for _, r in points],
                                  marker + style, label=f"{level} {config}")
                for c, r in points:
                    if r["refused_share"] > 0.5:
                        axes[row][0].annotate(f"{level} {config}: {r['refused_share']:.0%} "
                                              "refused", (c, 0.02), xycoords=("data", "axes fraction"),
                                              fontsize=7, color="red", ha="center")
                axes[row][1].plot(cs, [r["latency"]["p95_us"] / 1000 if r["latency"] else None
                                       for _, r in points], marker + style,
                                  label=f"{level} {config}")
            points = sorted((int(c), r) for c, r in v[level]["batched"].items())
            axes[row][0].plot([c for c, _ in points], [r["bound_rps"] for _, r in points],
                              marker + ":", color="grey", alpha=0.7,
                              label=f"{level}: profile bound, batches formed")
        axes[row][1].axhline(v["slo_ms"], color="red", alpha=0.5, label="SLO latency_ms")
        axes[row][0].set_ylabel(f"{name}\nqueries / s")
        axes[row][1].set_ylabel("p95 latency (ms)")
        for ax in axes[row]:
            ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
            ax.set_xlabel("concurrent clients (closed loop)")
        axes[row][0].set_yscale("log")
        axes[row][0].legend(fontsize=7)
        axes[row][1].legend(fontsize=7)
    fig.suptitle(f"batching vs the profile's bound ({report['machine']['cpus']} shared CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path,
                        default=Path(os.environ.get("TIERMESH_HOME", ".tiermesh")))
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per point")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--concurrency", type=int, nargs="+",
                        help="override every variant's concurrencies")
    parser.add_argument("--out", type=Path, default=RESULTS / "batching.json")
    args = parser.parse_args(argv)

    from mesh.registry import Registry
    from mesh.variants import build_bundled
    from mesh.wire import SLO, InferRequest, encode_request

    registry = Registry.load(args.home)
    if any(name not in registry.variants for name in args.variants):
        build_bundled(args.home)
        registry = Registry.load(args.home)
    report: dict[str, Any] = {
        "benchmark": "batching", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code": code_version(), "machine": machine(),
        "settings": {"seconds": args.seconds, "configs": CONFIGS, "profile": PROFILE_KEY,
                     "goal": f"batched, at the highest concurrency: >= {GOAL_OF_BOUND} of the "
                             "profile's bound at the batch sizes formed, p95 <= SLO"},
        "variants": {}}
    rng = np.random.default_rng(0)
    for name in args.variants:
        variant = registry.get(name)
        spec = VARIANTS[name]
        concurrencies = args.concurrency or spec["concurrency"]
        profile = variant.profiles[PROFILE_KEY]
        queries = sample_inputs(variant.task, 256, rng)
        slo = SLO(latency_ms=spec["slo_ms"])
        request = http_request("/v1/infer", encode_request(InferRequest(
            variant.task, queries[0], slo=slo, request_id=BENCH_ID)), "application/msgpack")
        row: dict[str, Any] = {
            "task": variant.task, "max_batch": variant.max_batch, "slo_ms": spec["slo_ms"],
            "profile_ms": {str(k): round(v, 4) for k, v in sorted(profile.batch_ms.items())},
            "compute_speedup_bound": round(profile.latency_ms(1) / (
                profile.latency_ms(variant.max_batch) / variant.max_batch), 2),
            "concurrency": concurrencies,
            "engine": {config: {} for config in CONFIGS}, "http": {config: {} for config in CONFIGS}}
        # configs alternate at each concurrency, so that a noisy minute hurts both alike
        for c in concurrencies:
            for config, options in CONFIGS.items():
                print(f"{name} c={c} {config}: engine, http", flush=True)
                row["engine"][config][c] = run_engine(args.home, variant, options, c,
                                                      args.seconds, queries, spec["slo_ms"])
                row["http"][config][c] = run_http(args.home, variant, options, c, args.seconds,
                                                  request)
        top = max(concurrencies)
        row["goals"] = {level: verdict(row[level], top, spec["slo_ms"])
                        for level in ("engine", "http")}
        report["variants"][name] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plotted = _plot(report, args.out.with_suffix(".png"))
    print_report(report)
    print(f"-> {args.out}" + (f" and {args.out.with_suffix('.png')}" if plotted else ""))
    return 0


def print_report(report: dict[str, Any]) -> None:
    for name, v in report["variants"].items():
        print(f"\n{name} (SLO {v['slo_ms']:g} ms; profile: batching can at most "
              f"{v['compute_speedup_bound']}x per row)")
        for level in ("engine", "http"):
            print(f"  {level:6} {'config':9} {'c':>4} {'q/s':>8} {'bound':>9} {'of bound':>8} "
                  f"{'batch':>6} {'p95 ms':>8} {'refused':>8}")
            for config in CONFIGS:
                for c, r in v[level][config].items():
                    p95 = r["latency"]["p95_us"] / 1000 if r["latency"] else float("nan")
                    print(f"  {'':6} {config:9} {c:>4} {r['throughput_rps']:8.0f} "
                          f"{r['bound_rps'] or 0:9.0f} {r['of_bound'] or 0:8.2f} "
                          f"{r['mean_batch_rows'] or 0:6.1f} {p95:8.2f} {r['refused_share']:8.1%}")
            g = v["goals"][level]
            print(f"  -> at c={g['concurrency']}: {g['of_bound']} of the bound (goal >= "
                  f"{GOAL_OF_BOUND}: {'met' if g['of_bound_met'] else 'MISSED'}), p95 "
                  f"{g['p95_ms']} ms (SLO {g['slo_ms']:g}: {'met' if g['p95_met'] else 'MISSED'}),"
                  f" {g['speedup_vs_unbatched']}x unbatched")


if __name__ == "__main__":
    sys.exit(main())
