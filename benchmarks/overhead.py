"""What a Tiermesh agent adds to a model call, measured side by side in one run.

On the digits MLP (batch 1):

1. ``ort``        onnxruntime called in-process (``session.run``), the model alone;
2. ``floor``      a minimal aiohttp + onnxruntime server (uvloop) decoding and encoding
                  the same msgpack envelopes: the floor for a Python HTTP server;
3. ``agent``      a Tiermesh edge agent process serving locally over msgpack
                  (``POST /v1/infer``: validation, planning, batching, metrics);
   ``agent_stream`` the same agent and the same msgpack query over its stream port
                  (:mod:`mesh.stream`: length-prefixed frames on one TCP connection, no HTTP);
4. ``agent_oip``  the same agent over the Open Inference Protocol, JSON tensors;
5. ``agent_oip_binary`` the same with the binary tensor extension.

Latency: sequential requests from a raw-socket keep-alive client (p50/p90/p99).
Throughput: a closed loop of ``--concurrency`` connections from a child process.
The modes run interleaved, ``--rounds`` times, so that noise from other work on
a shared machine lands on all of them; throughput is the median round.
Goals (issue 4): the agent adds at most 150 us p50 over in-process onnxruntime, and
its throughput is at least 0.8x the minimal server's; both are reported for every
agent mode (the floor is an HTTP server, so ``agent_stream`` has an advantage there
that the others do not). Writes ``benchmarks/results/overhead.json``.

    python benchmarks/overhead.py [--home DIR] [--requests 3000] [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._loadgen import (  # noqa: E402
    HOST,
    closed_loop,
    free_port,
    http_request,
    machine,
    one_node_topology,
    percentiles_us,
    sequential,
    start_agent,
    stream_request,
)

RESULTS = Path(__file__).resolve().parent / "results"
VARIANT = "digits-mlp"
GOAL_ADDED_P50_US = 150.0
GOAL_THROUGHPUT_RATIO = 0.8


def _session(path: str):
    from mesh.runtimes import runtime_for

    return runtime_for("onnx").load(path, threads=1)


def ort_timer(path: str, x: np.ndarray) -> Any:
    """``timer(n)``: n timed ``session.run`` calls of the model alone (after a warm-up)."""
    from mesh.runtimes import runtime_for

    runtime = runtime_for("onnx")
    session = _session(path)
    for _ in range(500):
        runtime.run(session, [x])

    def timer(n: int) -> list[float]:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            runtime.run(session, [x])
            samples.append(time.perf_counter() - t0)
        return samples

    return timer


def _floor_server(port: int, path: str, ready: Any) -> None:
    """The minimal server: decode, run, encode. No validation, planning or batching."""
    import asyncio

    import uvloop
    from aiohttp import web

    from mesh.runtimes import runtime_for
    from mesh.wire import InferResponse, ServedBy, decode_request, encode_response

    runtime = runtime_for("onnx")
    session = runtime.load(path, threads=1)
    served_by = ServedBy("floor", "edge", VARIANT)

    async def infer(request: web.Request) -> web.Response:
        req = decode_request(await request.read())
        outputs = runtime.run(session, req.tensors)
        return web.Response(body=encode_response(InferResponse(req.request_id, outputs, served_by)),
                            content_type="application/msgpack")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/infer", infer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port).start()
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


def measure_rounds(targets: dict[str, tuple[int, bytes]], args: argparse.Namespace,
                   ort: Any) -> dict[str, Any]:
    """Every mode once per round, interleaved, so that a noisy minute hurts them all alike.

    Latency percentiles pool the sequential samples of all rounds; throughput is
    the median of the rounds' closed-loop rates.
    """
    samples: dict[str, list[float]] = {mode: [] for mode in ["ort", *targets]}
    rates: dict[str, list[float]] = {mode: [] for mode in ["ort", *targets]}
    loaded: dict[str, list[dict[str, Any]]] = {mode: [] for mode in targets}
    n = max(args.requests // args.rounds, 100)
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        ort_samples = ort(n)
        samples["ort"] += ort_samples
        rates["ort"].append(len(ort_samples) / sum(ort_samples))
        for mode, (port, request) in targets.items():
            samples[mode] += sequential(port, request, n=n)
            load = closed_loop(port, request, concurrency=args.concurrency, seconds=args.seconds)
            rates[mode].append(load["throughput_rps"])
            loaded[mode].append({"latency": load["latency"], "status": load["status"]})
    out: dict[str, Any] = {}
    for mode in samples:
        out[mode] = {**percentiles_us(samples[mode]),
                     "throughput_rps": round(float(np.median(rates[mode])), 1),
                     "throughput_rps_rounds": [round(x, 1) for x in rates[mode]]}
        if mode in loaded:
            out[mode]["under_load"] = loaded[mode]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("TIERMESH_HOME", ".tiermesh")))
    parser.add_argument("--requests", type=int, default=3000, help="sequential requests per mode")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="closed-loop time per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    args = parser.parse_args(argv)

    from mesh.registry import Registry
    from mesh.store import ArtifactStore
    from mesh.variants import build_bundled
    from mesh.wire import InferRequest, encode_request

    if VARIANT not in Registry.load(args.home).variants:
        build_bundled(args.home)
    variant = Registry.load(args.home).get(VARIANT)
    path = str(ArtifactStore(args.home / "store").path(variant.sha256))
    x = np.random.default_rng(0).random((1, 64), dtype=np.float64).astype(np.float32)

    msgpack_body = encode_request(InferRequest("digits", [x], request_id="bench"))
    v1 = http_request("/v1/infer", msgpack_body, "application/msgpack")
    oip_json = json.dumps({"id": "bench", "inputs": [
        {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}).encode()
    v2_json = http_request("/v2/models/digits/infer", oip_json, "application/json")
    header = json.dumps({"id": "bench", "inputs": [
        {"name": "input", "shape": [1, 64], "datatype": "FP32",
         "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": True}}).encode()
    v2_bin = http_request("/v2/models/digits/infer", header + x.tobytes(),
                          "application/octet-stream",
                          {"Inference-Header-Content-Length": str(len(header))})

    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    port = free_port()
    floor = ctx.Process(target=_floor_server, args=(port, path, ready), daemon=True)
    floor.start()
    stream_port = free_port()
    try:
        if not ready.wait(60):
            raise RuntimeError("floor server did not start")
        with start_agent(args.home, one_node_topology([VARIANT]),
                         options={"stream_port": stream_port}) as agent_port:
            targets = {"floor": (port, v1), "agent": (agent_port, v1),
                       "agent_stream": (stream_port, stream_request(msgpack_body)),
                       "agent_oip": (agent_port, v2_json),
                       "agent_oip_binary": (agent_port, v2_bin)}
            results = measure_rounds(targets, args, ort_timer(path, x))
    finally:
        floor.terminate()
        floor.join(10)

    ort_p50 = results["ort"]["p50_us"]
    goals = {}
    for mode in ("agent", "agent_stream", "agent_oip", "agent_oip_binary"):
        added = round(results[mode]["p50_us"] - ort_p50, 1)
        ratio = round(results[mode]["throughput_rps"] / results["floor"]["throughput_rps"], 3)
        goals[mode] = {"added_p50_us": added, "added_p50_goal_us": GOAL_ADDED_P50_US,
                       "added_p50_met": added <= GOAL_ADDED_P50_US,
                       "throughput_vs_floor": ratio, "throughput_goal": GOAL_THROUGHPUT_RATIO,
                       "throughput_met": ratio >= GOAL_THROUGHPUT_RATIO}
    floor_added = round(results["floor"]["p50_us"] - ort_p50, 1)
    report = {
        "benchmark": "overhead", "variant": VARIANT, "batch": 1,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
        "settings": {"requests": args.requests, "seconds": args.seconds, "rounds": args.rounds,
                     "concurrency": args.concurrency, "event_loop": "uvloop (all servers)",
                     "client": "raw-socket keep-alive HTTP/1.1 (sequential); closed loop in a "
                               "child process (throughput)"},
        "results": results,
        "floor_added_p50_us": floor_added,
        "goals": goals,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'mode':18} {'p50 us':>8} {'p99 us':>8} {'rps':>9}")
    for mode, r in results.items():
        print(f"{mode:18} {r['p50_us']:8.1f} {r['p99_us']:8.1f} {r['throughput_rps']:9.1f}")
    for mode, g in goals.items():
        print(f"{mode}: adds {g['added_p50_us']} us p50 over ORT (goal <= {GOAL_ADDED_P50_US}: "
              f"{'met' if g['added_p50_met'] else 'MISSED'}); throughput {g['throughput_vs_floor']}x "
              f"the floor (goal >= {GOAL_THROUGHPUT_RATIO}: "
              f"{'met' if g['throughput_met'] else 'MISSED'})")
    print(f"(the minimal server itself adds {floor_added} us p50) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
