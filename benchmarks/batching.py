"""Deadline-aware dynamic batching against no batching, on the digits CNN at saturation.

The same node agent serves the CNN twice: with batching (the variant's
``max_batch``, 32) and without (``max_batch=1``); nothing else differs. A
closed loop of C clients keeps it saturated (each sends its next query as
soon as its answer arrives), at several concurrencies, measured two ways:

- ``engine``: the agent in this process (``NodeAgent.infer``, uvloop), no
  transport: what batching does to the data plane itself;
- ``http``: the agent in its own process, queried over ``POST /v1/infer``
  (msgpack) by a load generator in a third process.

Goal (issue 4), at saturation (the highest concurrency): throughput at least
3x the unbatched throughput with p95 latency no worse than 1.1x the unbatched
p95. ``compute_speedup_bound`` in the result is the most batching could give
from the model's profile alone (latency(1) over latency(32)/32): on a CPU,
where the CNN costs nearly as much per row in a batch as alone, it is below 2.
Writes ``benchmarks/results/batching.json`` and ``batching.png`` (when
matplotlib, the ``bench`` extra, is installed).

    python benchmarks/batching.py [--home DIR] [--seconds 4] [--concurrency 1 8 32 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._loadgen import (  # noqa: E402
    agent_options,
    closed_loop,
    http_request,
    machine,
    one_node_topology,
    percentiles_us,
    start_agent,
)

RESULTS = Path(__file__).resolve().parent / "results"
VARIANT = "digits-cnn"
GOAL_SPEEDUP = 3.0
GOAL_P95_RATIO = 1.1
CONFIGS = {"batched": {}, "unbatched": {"batching": {"max_batch": 1}}}


async def _engine(home: Path, options: dict[str, Any], concurrency: int, seconds: float,
                  warmup_s: float, images: np.ndarray) -> dict[str, Any]:
    from mesh.topology import parse_topology
    from mesh.wire import InferRequest
    from nodes.agent import AgentConfig, NodeAgent

    config = AgentConfig(node="edge-1", topology=parse_topology(
        one_node_topology([VARIANT], max_queue=1024)), home=home, **agent_options(options))
    latencies: list[float] = []
    batch_rows: list[float] = []
    async with NodeAgent(config) as agent:
        start = time.perf_counter()
        warm_until, stop_at = start + warmup_s, start + warmup_s + seconds

        async def client(i: int) -> None:
            x = images[i % len(images)][None, :]
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                answer = await agent.infer(InferRequest("digits", [x]))
                t1 = time.perf_counter()
                if t0 >= warm_until:
                    latencies.append(t1 - t0)
                    batch_rows.append(answer.timing["batch_rows"])
                await asyncio.sleep(0)  # a client elsewhere would not hold the loop either

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    return {"throughput_rps": round(len(latencies) / seconds, 1), "latency": percentiles_us(latencies),
            "mean_batch_rows": round(float(np.mean(batch_rows)), 2)}


def run_engine(home: Path, options: dict[str, Any], concurrency: int, seconds: float,
               images: np.ndarray) -> dict[str, Any]:
    import uvloop

    return uvloop.run(_engine(home, options, concurrency, seconds, 1.0, images))


def run_http(port: int, request: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    load = closed_loop(port, request, concurrency=concurrency, seconds=seconds)
    return {"throughput_rps": load["throughput_rps"], "latency": load["latency"],
            "status": load["status"]}


def _verdict(rows: dict[str, dict[int, dict[str, Any]]], at: int) -> dict[str, Any]:
    b, u = rows["batched"][at], rows["unbatched"][at]
    speedup = b["throughput_rps"] / u["throughput_rps"]
    p95_ratio = b["latency"]["p95_us"] / u["latency"]["p95_us"]
    return {"concurrency": at, "throughput_speedup": round(speedup, 2),
            "throughput_goal": GOAL_SPEEDUP, "throughput_met": speedup >= GOAL_SPEEDUP,
            "p95_ratio": round(p95_ratio, 3), "p95_goal": GOAL_P95_RATIO,
            "p95_met": p95_ratio <= GOAL_P95_RATIO}


def _plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for row, level in enumerate(("engine", "http")):
        for config, style in (("batched", "o-"), ("unbatched", "s--")):
            points = sorted((int(c), r) for c, r in report[level][config].items())
            cs = [c for c, _ in points]
            axes[row][0].plot(cs, [r["throughput_rps"] for _, r in points], style, label=config)
            axes[row][1].plot(cs, [r["latency"]["p95_us"] / 1000 for _, r in points], style,
                              label=config)
        axes[row][0].set_ylabel(f"{level}: queries / s")
        axes[row][1].set_ylabel(f"{level}: p95 latency (ms)")
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
    for ax in axes[1]:
        ax.set_xlabel("concurrent clients (closed loop)")
    fig.suptitle(f"{VARIANT}: deadline-aware batching vs none ({report['machine']['cpus']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("TIERMESH_HOME", ".tiermesh")))
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--out", type=Path, default=RESULTS / "batching.json")
    args = parser.parse_args(argv)

    from mesh.registry import Registry
    from mesh.variants import build_bundled
    from mesh.variants.digits import load_heldout
    from mesh.wire import InferRequest, encode_request

    if VARIANT not in Registry.load(args.home).variants:
        build_bundled(args.home)
    variant = Registry.load(args.home).get(VARIANT)
    images, _ = load_heldout()
    images = np.ascontiguousarray(images, dtype=np.float32)
    request = http_request("/v1/infer", encode_request(InferRequest("digits", [images[:1]])),
                           "application/msgpack")
    profile = variant.profiles["cpu-1t"]
    # Batching can at best replace latency(1) per query by latency(max)/max: the compute bound.
    bound = profile.latency_ms(1) / (profile.latency_ms(variant.max_batch) / variant.max_batch)
    report: dict[str, Any] = {
        "benchmark": "batching", "variant": VARIANT, "max_batch": variant.max_batch,
        "compute_speedup_bound": round(bound, 2),
        "profile_cpu_1t_ms": {str(k): round(v, 4)
                              for k, v in variant.profiles["cpu-1t"].batch_ms.items()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
        "settings": {"seconds": args.seconds, "concurrency": args.concurrency,
                     "query": "one 8x8 image, no latency SLO (default wait cap applies)",
                     "configs": CONFIGS},
        "engine": {}, "http": {},
    }
    for config, options in CONFIGS.items():
        report["engine"][config] = {}
        for c in args.concurrency:
            print(f"engine {config} c={c} ...", flush=True)
            report["engine"][config][c] = run_engine(args.home, options, c, args.seconds, images)
        report["http"][config] = {}
        with start_agent(args.home, one_node_topology([VARIANT], max_queue=1024),
                         options=options) as port:
            for c in args.concurrency:
                print(f"http {config} c={c} ...", flush=True)
                report["http"][config][c] = run_http(port, request, c, args.seconds)
    top = max(args.concurrency)
    report["goals"] = {level: _verdict(report[level], top) for level in ("engine", "http")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plotted = _plot(report, args.out.with_suffix(".png"))

    for level in ("engine", "http"):
        print(f"\n{level}: {'c':>4} {'batched rps':>12} {'p95 ms':>8} {'unbatched rps':>14} {'p95 ms':>8}")
        for c in args.concurrency:
            b, u = report[level]["batched"][c], report[level]["unbatched"][c]
            print(f"{'':8}{c:>4} {b['throughput_rps']:12.0f} {b['latency']['p95_us'] / 1000:8.2f} "
                  f"{u['throughput_rps']:14.0f} {u['latency']['p95_us'] / 1000:8.2f}")
        g = report["goals"][level]
        print(f"  at c={top}: {g['throughput_speedup']}x throughput (goal >= {GOAL_SPEEDUP}: "
              f"{'met' if g['throughput_met'] else 'MISSED'}), p95 ratio {g['p95_ratio']} "
              f"(goal <= {GOAL_P95_RATIO}: {'met' if g['p95_met'] else 'MISSED'})")
    print(f"(compute alone allows at most {report['compute_speedup_bound']}x: latency(1) over "
          f"latency({variant.max_batch})/{variant.max_batch} from the cpu-1t profile)")
    print(f"-> {args.out}" + (f" and {args.out.with_suffix('.png')}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
