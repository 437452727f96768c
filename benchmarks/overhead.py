"""What a Tiermesh agent adds to a model call, as ratios to a minimal server in the same run.

On the digits MLP, batch 1, concurrency 1, these cases run interleaved (every
case once per round, in a rotating order, several rounds) so that noise from
other work on a shared machine lands on all of them alike:

- ``ort``            onnxruntime called in-process (``session.run``): the model alone;
- ``floor``          a minimal aiohttp + onnxruntime server (uvloop) decoding and encoding
                     the same msgpack envelopes: the reference every goal is a ratio to;
- ``floor_stream``   the same minimal work behind a bare asyncio protocol speaking the
                     stream's frames (:mod:`mesh.stream`): what a protocol round trip costs
                     here without HTTP (for reading, no goal);
- ``agent_http``     a Tiermesh agent, ``POST /v1/infer`` (msgpack): validation, planning,
                     batching, metrics;
- ``agent_stream``   the same agent and query over its msgpack stream port;
- ``agent_oip_json`` / ``agent_oip_binary``  the same agent over the Open Inference Protocol;
- ``agent_forward``  the same query over the stream to an entry agent that hosts nothing and
                     forwards it over its stream to the serving agent (one extra hop, no
                     emulated link).

Latency: sequential queries from a raw-socket keep-alive client (one connection
per case, kept for the whole run); the added latency of a case is its p50 minus
in-process onnxruntime's, and its ratio is that over what ``floor`` adds.
Throughput: a closed loop of ``--concurrency`` connections from a child process
for ``floor``, ``agent_http``, ``agent_stream`` and the OIP cases, interleaved
the same way; the ratio is the median over rounds of each round's ratio to
``floor``.

Goals (issue 9): the agent adds at most 0.5x what ``floor`` adds over the
stream, 1.1x over HTTP msgpack and 1.3x over OIP; its throughput is at least
1.0x ``floor``'s over HTTP msgpack and 0.8x over OIP (JSON and binary); the
forwarding hop adds no more than the stream case itself adds. Missed goals are
reported with the measured figure. Writes ``benchmarks/results/overhead.json``.

    python benchmarks/overhead.py [--home DIR] [--requests 3000] [--latency-rounds 10]
                                  [--rounds 4] [--seconds 2] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._loadgen import (  # noqa: E402
    BENCH_ID,
    HOST,
    closed_loop,
    code_version,
    free_port,
    http_request,
    machine,
    percentiles_us,
    socket_timer,
    start_agent,
    stream_request,
)

RESULTS = Path(__file__).resolve().parent / "results"
VARIANT = "digits-mlp"
SERVER, ENTRY = "serve-1", "entry-1"

#: case -> (largest ratio of its added p50 to the minimal server's), issue 9
LATENCY_GOALS = {"agent_stream": 0.5, "agent_http": 1.1, "agent_oip_json": 1.3,
                 "agent_oip_binary": 1.3}
#: case -> (smallest ratio of its throughput to the minimal server's), issue 9
THROUGHPUT_GOALS = {"agent_http": 1.0, "agent_oip_json": 0.8, "agent_oip_binary": 0.8}
LOADED = ("floor", "agent_http", "agent_stream", "agent_oip_json", "agent_oip_binary")


def bench_topology() -> dict[str, Any]:
    """``serve-1`` hosts the MLP; ``entry-1`` hosts nothing and forwards to it (no delay)."""
    return {"name": "bench-overhead",
            "hardware": {"cpu": {"kind": "cpu", "threads": 1, "memory_mb": 1024}},
            "nodes": [{"name": SERVER, "tier": "intermediate", "hardware": "cpu",
                       "variants": [VARIANT], "max_queue": 256},
                      {"name": ENTRY, "tier": "edge", "hardware": "cpu", "variants": []}],
            "links": [{"between": [ENTRY, SERVER], "latency_ms": 0, "bandwidth_mbps": 100000}]}


# --------------------------------------------------------------------------- the minimal servers


def _floor_servers(http_port: int, stream_port: int, path: str, ready: Any) -> None:
    """The minimal servers: decode, run, encode. No validation, planning or batching."""
    import asyncio

    import uvloop
    from aiohttp import web

    from mesh.runtimes import runtime_for
    from mesh.stream import ANSWER, HEADER, frame
    from mesh.wire import InferResponse, ServedBy, decode_request, encode_response

    runtime = runtime_for("onnx")
    session = runtime.load(path, threads=1)
    served_by = ServedBy("floor", "edge", VARIANT)

    def answer(body: bytes) -> bytes:
        req = decode_request(body)
        outputs = runtime.run(session, req.tensors)
        return encode_response(InferResponse(req.request_id, outputs, served_by))

    async def infer(request: web.Request) -> web.Response:
        return web.Response(body=answer(await request.read()), content_type="application/msgpack")

    class Frames(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport, self.buf = transport, b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while len(self.buf) >= HEADER.size:
                length, request_id, _ = HEADER.unpack_from(self.buf)
                end = HEADER.size + length
                if len(self.buf) < end:
                    return
                body, self.buf = self.buf[HEADER.size:end], self.buf[end:]
                self.transport.write(frame(request_id, ANSWER, answer(body)))

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/infer", infer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, http_port).start()
        await asyncio.get_running_loop().create_server(Frames, HOST, stream_port)
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


@contextmanager
def floor_servers(path: str) -> Iterator[tuple[int, int, int]]:
    """The minimal HTTP and stream servers in a child process; yields their ports and its pid."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    ports = free_port(), free_port()
    proc = ctx.Process(target=_floor_servers, args=(*ports, path, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the minimal servers did not start")
        assert proc.pid is not None
        yield (*ports, proc.pid)
    finally:
        proc.terminate()
        proc.join(10)


# --------------------------------------------------------------------------- measuring


def ort_timer(path: str, x: np.ndarray) -> Callable[[int], list[float]]:
    """``timer(n)``: n timed ``session.run`` calls of the model alone (after a warm-up)."""
    from mesh.runtimes import runtime_for

    runtime = runtime_for("onnx")
    session = runtime.load(path, threads=1)
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


def _rotated(items: list[str], r: int) -> list[str]:
    k = r % len(items)
    return items[k:] + items[:k]


def measure_latency(timers: dict[str, Callable[[int], list[float]]], *, rounds: int,
                    per_round: int) -> dict[str, Any]:
    """Every case ``per_round`` queries per round, in a rotating order; pooled and per round."""
    pooled: dict[str, list[float]] = {c: [] for c in timers}
    round_p50: dict[str, list[float]] = {c: [] for c in timers}
    for r in range(rounds):
        for case in _rotated(list(timers), r):
            samples = timers[case](per_round)
            pooled[case] += samples
            round_p50[case].append(float(np.percentile(samples, 50)) * 1e6)
    return {c: {**percentiles_us(pooled[c]), "p50_us_rounds": [round(x, 1) for x in round_p50[c]]}
            for c in timers}


def measure_throughput(targets: dict[str, tuple[int, bytes]], *, rounds: int, seconds: float,
                       concurrency: int) -> dict[str, Any]:
    """A closed loop per case and round, rotating the order; the median round per case."""
    rates: dict[str, list[float]] = {c: [] for c in targets}
    loaded: dict[str, list[dict[str, Any]]] = {c: [] for c in targets}
    for r in range(rounds):
        for case in _rotated(list(targets), r):
            port, request = targets[case]
            load = closed_loop(port, request, concurrency=concurrency, seconds=seconds)
            rates[case].append(load["throughput_rps"])
            loaded[case].append({"p50_us": load["latency"].get("p50_us"),
                                 "p99_us": load["latency"].get("p99_us"),
                                 "status": load["status"]})
            print(f"  {case:18} {load['throughput_rps']:9.0f} q/s", flush=True)
    return {c: {"throughput_rps": round(float(np.median(rates[c])), 1),
                "throughput_rps_rounds": rates[c], "rounds": loaded[c]} for c in targets}


# --------------------------------------------------------------------------- verdicts


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(float(np.median(values)), 3),
            "max": round(max(values), 3)}


def verdicts(latency: dict[str, Any], throughput: dict[str, Any]) -> dict[str, Any]:
    """Added latency and throughput as ratios to the minimal server, and the goals met."""
    ort = latency["ort"]["p50_us"]
    floor_added = latency["floor"]["p50_us"] - ort
    rounds_ort = latency["ort"]["p50_us_rounds"]
    rounds_floor = [f - o for f, o in zip(latency["floor"]["p50_us_rounds"], rounds_ort,
                                          strict=True)]
    added: dict[str, Any] = {}
    for case, row in latency.items():
        if case == "ort":
            continue
        value = row["p50_us"] - ort
        per_round = [(c - o) / f for c, o, f in zip(row["p50_us_rounds"], rounds_ort, rounds_floor,
                                                    strict=True)]
        added[case] = {"added_p50_us": round(value, 1),
                       "ratio_to_floor": round(value / floor_added, 3),
                       "ratio_to_floor_rounds": _spread(per_round)}
    goals: dict[str, Any] = {}
    for case, most in LATENCY_GOALS.items():
        ratio = added[case]["ratio_to_floor"]
        goals[f"{case}_added_p50"] = {
            "measured": ratio, "goal": f"<= {most}x what the minimal server adds",
            "added_p50_us": added[case]["added_p50_us"], "met": ratio <= most}
    if "agent_forward_tls" in latency:
        # what mutual TLS adds to one node-to-node hop: the TLS forward less the plain one,
        # less what TLS adds to the client's own leg (the TLS stream less the plain stream)
        tls_hop = ((latency["agent_forward_tls"]["p50_us"] - latency["agent_forward"]["p50_us"])
                   - (latency["agent_stream_tls"]["p50_us"] - latency["agent_stream"]["p50_us"]))
        added["tls_hop"] = {"added_p50_us": round(tls_hop, 1),
                            "note": "mutual TLS on a kept stream between two nodes; the "
                                    "planner's tls_hop_ms is this figure"}
    hop = latency["agent_forward"]["p50_us"] - latency["agent_stream"]["p50_us"]
    stream_added = added["agent_stream"]["added_p50_us"]
    goals["forward_hop_added_p50"] = {
        "measured_us": round(hop, 1), "goal": "<= what agent_stream adds over in-process "
        f"({stream_added} us)", "ratio_to_stream_added": round(hop / stream_added, 3),
        "met": hop <= stream_added}
    floor_rps = throughput["floor"]["throughput_rps_rounds"]
    ratios: dict[str, Any] = {}
    for case, row in throughput.items():
        per_round = [c / f for c, f in zip(row["throughput_rps_rounds"], floor_rps, strict=True)]
        ratios[case] = {"throughput_rps": row["throughput_rps"],
                        "ratio_to_floor": round(float(np.median(per_round)), 3),
                        "ratio_to_floor_rounds": _spread(per_round)}
    for case, least in THROUGHPUT_GOALS.items():
        ratio = ratios[case]["ratio_to_floor"]
        goals[f"{case}_throughput"] = {
            "measured": ratio, "goal": f">= {least}x the minimal server's",
            "throughput_rps": ratios[case]["throughput_rps"], "met": ratio >= least}
    return {"floor_added_p50_us": round(floor_added, 1), "added": added,
            "throughput_vs_floor": ratios, "goals": goals}


# --------------------------------------------------------------------------- main


def _certs(directory: Path, topology: dict[str, Any]) -> Any:
    """A mesh CA and both nodes' certificates in ``directory``; the client's TLS context
    (trusts the CA, checks no host name: the bench nodes have no addresses)."""
    import ssl

    from mesh.certs import init_ca, issue
    from mesh.topology import parse_topology

    init_ca(directory)
    parsed = parse_topology(topology)
    for node in (SERVER, ENTRY):
        issue(node, parsed, directory)
    context = ssl.create_default_context(cafile=str(directory / "ca.pem"))
    context.check_hostname = False
    return context


def model_path(home: Path) -> str:
    """The MLP's ONNX file in ``home``'s store (built first when the home has none)."""
    from mesh.registry import Registry
    from mesh.store import ArtifactStore
    from mesh.variants import build_bundled

    if VARIANT not in Registry.load(home).variants:
        build_bundled(home)
    variant = Registry.load(home).get(VARIANT)
    return str(ArtifactStore(home / "store").path(variant.sha256))


def requests_for(x: np.ndarray) -> dict[str, tuple[str, bytes]]:
    """The same query in every protocol: kind ('http' or 'stream') -> raw request bytes."""
    from mesh.wire import InferRequest, encode_request

    msgpack_body = encode_request(InferRequest("digits", [x], request_id=BENCH_ID))
    oip_json = json.dumps({"id": BENCH_ID, "inputs": [
        {"name": "input", "shape": [1, 64], "datatype": "FP32",
         "data": x.ravel().tolist()}]}).encode()
    header = json.dumps({"id": BENCH_ID, "inputs": [
        {"name": "input", "shape": [1, 64], "datatype": "FP32",
         "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": True}}).encode()
    return {
        "v1": ("http", http_request("/v1/infer", msgpack_body, "application/msgpack")),
        "stream": ("stream", stream_request(msgpack_body)),
        "oip_json": ("http", http_request("/v2/models/digits/infer", oip_json,
                                          "application/json")),
        "oip_binary": ("http", http_request(
            "/v2/models/digits/infer", header + x.tobytes(), "application/octet-stream",
            {"Inference-Header-Content-Length": str(len(header))})),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path,
                        default=Path(os.environ.get("TIERMESH_HOME", ".tiermesh")))
    parser.add_argument("--requests", type=int, default=3000,
                        help="sequential queries per case, over all latency rounds")
    parser.add_argument("--latency-rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=300, help="queries per case before timing")
    parser.add_argument("--rounds", type=int, default=4, help="closed-loop rounds")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="closed-loop time per case and round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    args = parser.parse_args(argv)

    path = model_path(args.home)
    x = np.random.default_rng(0).random((1, 64), dtype=np.float64).astype(np.float32)
    req = requests_for(x)
    topology = bench_topology()
    entry_port = free_port()
    server_stream, entry_stream = free_port(), free_port()
    tls_entry_port, tls_server_stream, tls_entry_stream = free_port(), free_port(), free_port()

    with ExitStack() as stack:  # closed in reverse: clients, then agents, then the floor
        certs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="overhead-tls-")))
        client_tls = _certs(certs, topology)
        floor_port, floor_stream, _ = stack.enter_context(floor_servers(path))
        server = stack.enter_context(start_agent(
            args.home, topology, node=SERVER,
            options={"stream_port": server_stream,
                     "neighbours": {ENTRY: f"http://{HOST}:{entry_port}"}}))
        stack.enter_context(start_agent(
            args.home, topology, node=ENTRY, port=entry_port,
            options={"stream_port": entry_stream,
                     "neighbours": {SERVER: f"http://{HOST}:{server}"},
                     "stream_neighbours": {SERVER: f"tcp://{HOST}:{server_stream}"}}))
        tls_server = stack.enter_context(start_agent(
            args.home, topology, node=SERVER,
            options={"stream_port": tls_server_stream, "tls_dir": str(certs / SERVER),
                     "neighbours": {ENTRY: f"http://{HOST}:{tls_entry_port}"}}))
        stack.enter_context(start_agent(
            args.home, topology, node=ENTRY, port=tls_entry_port,
            options={"stream_port": tls_entry_stream, "tls_dir": str(certs / ENTRY),
                     "neighbours": {SERVER: f"http://{HOST}:{tls_server}"},
                     "stream_neighbours": {SERVER: f"tcp://{HOST}:{tls_server_stream}"}}))
        tls_targets = {"agent_stream_tls": (tls_server_stream, req["stream"][1]),
                       "agent_forward_tls": (tls_entry_stream, req["stream"][1])}
        targets = {"floor": (floor_port, req["v1"][1]),
                   "floor_stream": (floor_stream, req["stream"][1]),
                   "agent_http": (server, req["v1"][1]),
                   "agent_stream": (server_stream, req["stream"][1]),
                   "agent_oip_json": (server, req["oip_json"][1]),
                   "agent_oip_binary": (server, req["oip_binary"][1]),
                   "agent_forward": (entry_stream, req["stream"][1])}
        timers: dict[str, Callable[[int], list[float]]] = {"ort": ort_timer(path, x)}
        for case, (port, request) in targets.items():
            timers[case], client = socket_timer(port, request, args.warmup)
            stack.callback(client.close)
        for case, (port, request) in tls_targets.items():
            timers[case], client = socket_timer(port, request, args.warmup, client_tls)
            stack.callback(client.close)
        print(f"latency: {len(timers)} cases x {args.latency_rounds} rounds", flush=True)
        latency = measure_latency(timers, rounds=args.latency_rounds,
                                  per_round=max(args.requests // args.latency_rounds, 50))
        print(f"throughput: {len(LOADED)} cases x {args.rounds} rounds", flush=True)
        throughput = measure_throughput({c: targets[c] for c in LOADED}, rounds=args.rounds,
                                        seconds=args.seconds, concurrency=args.concurrency)

    result = verdicts(latency, throughput)
    report = {
        "benchmark": "overhead", "variant": VARIANT, "batch": 1,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code": code_version(),
        "machine": machine(),
        "settings": {"requests": args.requests, "latency_rounds": args.latency_rounds,
                     "warmup": args.warmup, "rounds": args.rounds, "seconds": args.seconds,
                     "concurrency": args.concurrency, "event_loop": "uvloop (all servers)",
                     "client": "raw-socket keep-alive, one connection per case (sequential); "
                               "closed loop in a child process (throughput)",
                     "forward": f"client -stream-> {ENTRY} -stream-> {SERVER}, no emulated link"},
        "latency": latency, "throughput": throughput, **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"-> {args.out}")
    return 0


def print_report(report: dict[str, Any]) -> None:
    latency, added, tput = report["latency"], report["added"], report["throughput_vs_floor"]
    print(f"\n{'case':18} {'p50 us':>8} {'p99 us':>8} {'added':>8} {'x floor':>8} "
          f"{'rounds (min-max)':>17} {'q/s':>8} {'x floor':>8}")
    for case, row in latency.items():
        a = added.get(case)
        t = tput.get(case)
        print(f"{case:18} {row['p50_us']:8.1f} {row['p99_us']:8.1f} "
              + (f"{a['added_p50_us']:8.1f} {a['ratio_to_floor']:8.2f} "
                 f"{a['ratio_to_floor_rounds']['min']:8.2f}-{a['ratio_to_floor_rounds']['max']:<8.2f}"
                 if a else f"{'':8} {'':8} {'':17}")
              + (f" {t['throughput_rps']:8.0f} {t['ratio_to_floor']:8.2f}" if t else ""))
    print()
    for name, goal in report["goals"].items():
        measured = goal.get("measured", goal.get("measured_us"))
        print(f"{name:32} {measured!s:>8}  goal {goal['goal']}: "
              f"{'met' if goal['met'] else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
