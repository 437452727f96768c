"""Overload: refused at once, not served late. This checkout against a baseline commit.

One node agent serves the MiniLM sentence encoder (ONNX fp32, one compute
thread: about 8 ms a query, so a few hundred queries a second saturate it)
and is driven far past that, two ways, each query asking ``latency_ms=50``:

- ``http_128``: 128 closed-loop clients on ``POST /v1/infer`` (the issue's
  probe): each sends its next query as soon as its answer comes;
- ``stream_10x``: an open loop over the msgpack stream at 10x the node's
  measured capacity (queries keep coming whatever the answers do).

For every status the client sees, its latency; for the answers, how many
came within the 50 ms asked for; and from the node's own histogram
(``tiermesh_request_latency_seconds``) how many refusals left the node within
5 ms of arriving. Goals (issue 8): refusals leave the node within 5 ms at
p99; a query that cannot be on time is refused, not served late, so the
answers that do come are on time.

The same measurements run against a baseline: the agent code of another
commit (default: the last one before issue 8), checked out with ``git
worktree`` into a temporary folder, on the same home, in the same run.
Writes ``benchmarks/results/overload.json``.

    python benchmarks/overload.py [--home DIR] [--seconds 5] [--baseline-ref REF|none]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._loadgen import (  # noqa: E402
    BENCH_ID,
    HOST,
    ROOT,
    FreshIds,
    closed_loop,
    free_port,
    http_request,
    machine,
    one_node_topology,
    percentiles_us,
    start_agent,
)

RESULTS = Path(__file__).resolve().parent / "results"
VARIANT = "minilm-onnx-fp32"
LATENCY_MS = 50.0
REFUSAL_GOAL_MS = 5.0
#: the last commit before issue 8's work
DEFAULT_BASELINE = "eaefba7"


# --------------------------------------------------------------------------- queries


def _query(home: Path, slo_ms: float | None) -> bytes:
    from mesh.variants.sentences import SentenceTokenizer
    from mesh.wire import SLO, InferRequest, encode_request

    tokens = SentenceTokenizer.from_home(home).encode(
        ["the mesh refuses what it cannot serve in time"])
    slo = SLO(latency_ms=slo_ms) if slo_ms is not None else SLO()
    return encode_request(InferRequest("sentence-embedding", list(tokens), slo=slo,
                                       request_id=BENCH_ID))


# --------------------------------------------------------------------------- open loop


async def _open_loop(port: int, body: bytes, rate: float, seconds: float, connections: int
                     ) -> dict[str, Any]:
    """Send at ``rate`` queries/s over ``connections`` streams for ``seconds``; then drain."""
    from mesh.stream import INFER, FrameReader, frame

    loop = asyncio.get_running_loop()
    sent: dict[int, float] = {}
    by_status: dict[int, list[float]] = {}

    class Conn(asyncio.Protocol):
        def __init__(self) -> None:
            self.reader = FrameReader(1 << 30)

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            now = time.perf_counter()
            for rid, kind, payload in self.reader.feed(data):
                start = sent.pop(rid, None)
                if start is None:
                    continue
                status = _status(kind, payload)
                by_status.setdefault(status, []).append(now - start)

    conns = []
    for _ in range(connections):
        _, conn = await loop.create_connection(Conn, HOST, port)
        conns.append(conn)
    ids = itertools.count(1)
    fresh = FreshIds(body)  # a request id of its own per query: no cached answers
    interval = 1.0 / rate
    start = time.perf_counter()
    n = 0
    while True:
        now = time.perf_counter()
        if now - start >= seconds:
            break
        due = int((now - start) / interval) + 1
        while n < due:  # catch up in bursts when the loop falls behind
            rid = next(ids)
            sent[rid] = time.perf_counter()
            conns[n % connections].transport.write(frame(rid, INFER, fresh()))
            n += 1
        await asyncio.sleep(min(interval, 0.001))
    drain_until = time.perf_counter() + 15
    while sent and time.perf_counter() < drain_until:
        await asyncio.sleep(0.05)
    for conn in conns:
        conn.transport.close()
    return {"offered_rps": rate, "sent": n, "unanswered": len(sent),
            "status": {str(k): len(v) for k, v in by_status.items()},
            "latency_by_status": {str(k): percentiles_us(v) for k, v in by_status.items()},
            "ok_latencies_s": by_status.get(200, [])}


def _status(kind: int, payload: bytes) -> int:
    """The status of an answer frame, in this checkout's format or the baseline's (before
    issue 9 an ERROR frame was msgpack {"status": ..., "error": ...})."""
    from mesh.stream import ERROR, frame_answer
    from mesh.wire import unpack

    if kind == ERROR and payload[:1] and (0x80 <= payload[0] <= 0x8F or payload[0] in (0xDE, 0xDF)):
        old = unpack(payload)
        if isinstance(old, dict) and isinstance(old.get("status"), int):
            return int(old["status"])
    return frame_answer(kind, payload)[0]


def _open_loop_child(port: int, body: bytes, rate: float, seconds: float, connections: int,
                     out: Any) -> None:
    import uvloop

    out.send(uvloop.run(_open_loop(port, body, rate, seconds, connections)))


def open_loop(port: int, body: bytes, *, rate: float, seconds: float, connections: int = 8
              ) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_open_loop_child,
                       args=(port, body, rate, seconds, connections, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(seconds + 60):
            raise RuntimeError("open-loop generator did not report")
        return parent.recv()
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


# --------------------------------------------------------------------------- node metrics


def _histogram(port: int) -> dict[str, dict[str, float]]:
    """outcome -> {bucket bound: cumulative count, "count": n} summed over the other labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "tiermesh_request_latency_seconds":
            continue
        for sample in family.samples:
            outcome = sample.labels.get("outcome", "")
            row = out.setdefault(outcome, {})
            if sample.name.endswith("_bucket"):
                key = sample.labels["le"]
                row[key] = row.get(key, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                row["count"] = row.get("count", 0.0) + sample.value
    return out


def _share(counts: dict[str, float], prior: dict[str, float], bound: str, n: float
           ) -> float | None:
    """The share of ``n`` observations in the bucket ``le=bound`` since ``prior``."""
    if bound not in counts:
        return None
    return round((counts[bound] - prior.get(bound, 0.0)) / n, 4)


def _node_side(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
               ) -> dict[str, Any]:
    """Per outcome during the run: count, and the share that left the node within 5 / 50 ms."""
    rows: dict[str, Any] = {}
    for outcome, counts in after.items():
        prior = before.get(outcome, {})
        n = counts.get("count", 0.0) - prior.get("count", 0.0)
        if n <= 0:
            continue

        rows[outcome] = {"count": int(n), "within_5ms": _share(counts, prior, "0.005", n),
                         "within_50ms": _share(counts, prior, "0.05", n)}
    refused = {k: v for k, v in rows.items() if k != "ok"}
    total = sum(v["count"] for v in refused.values())
    within = sum(v["count"] * (v["within_5ms"] or 0.0) for v in refused.values())
    return {"by_outcome": rows, "refused": total,
            "refused_within_5ms": round(within / total, 4) if total else None}


# --------------------------------------------------------------------------- one target


def _summary(load: dict[str, Any]) -> dict[str, Any]:
    ok = load.pop("ok_latencies_s", [])
    answered = len(ok)
    on_time = sum(1 for s in ok if s * 1000 <= LATENCY_MS)
    load["answers_on_time"] = on_time
    load["answers_on_time_share"] = round(on_time / answered, 4) if answered else None
    return load


def measure(root: Path, home: Path, seconds: float) -> dict[str, Any]:
    stream_port = free_port()
    topology = one_node_topology([VARIANT], memory_mb=2048)
    tight = _query(home, LATENCY_MS)
    out: dict[str, Any] = {}
    with start_agent(home, topology, options={"stream_port": stream_port}, root=root) as port:
        print("  capacity (8 clients, no SLO) ...", flush=True)
        cap = closed_loop(port, http_request("/v1/infer", _query(home, None), "application/msgpack"),
                          concurrency=8, seconds=max(seconds / 2, 2.0))
        capacity = max(cap["throughput_rps"], 1.0)
        out["capacity_rps"] = capacity
        print(f"  capacity {capacity:.0f}/s; http_128 ...", flush=True)
        before = _histogram(port)
        http = closed_loop(port, http_request("/v1/infer", tight, "application/msgpack"),
                           concurrency=128, seconds=seconds, keep_samples=True)
        out["http_128"] = _summary(http) | {"node": _node_side(before, _histogram(port))}
        time.sleep(1.0)  # let the queue drain between scenarios
        print(f"  stream_10x at {10 * capacity:.0f}/s ...", flush=True)
        before = _histogram(port)
        stream = open_loop(stream_port, tight, rate=10 * capacity, seconds=seconds)
        out["stream_10x"] = _summary(stream) | {"node": _node_side(before, _histogram(port))}
    return out


@contextlib.contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """A temporary checkout of ``ref`` (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="tiermesh-baseline-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(path), ref], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT,
                           check=False, capture_output=True)


# --------------------------------------------------------------------------- main


def _line(name: str, r: dict[str, Any]) -> str:
    node = r["node"]
    refused = node["refused_within_5ms"]
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["status"].items()))
    lat = r["latency_by_status"]
    parts = [f"{name:>10}: {statuses}"]
    for status, p in sorted(lat.items()):
        parts.append(f"{status} p50 {p['p50_us'] / 1000:.1f} ms p99 {p['p99_us'] / 1000:.1f} ms")
    share = r["answers_on_time_share"]
    parts.append(f"answers within {LATENCY_MS:g} ms: "
                 f"{'-' if share is None else f'{share:.0%}'}")
    parts.append(f"refusals out of the node within {REFUSAL_GOAL_MS:g} ms: "
                 f"{'-' if refused is None else f'{refused:.1%}'}")
    if "unanswered" in r:
        parts.append(f"unanswered {r['unanswered']}")
    return "\n             ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path,
                        default=Path(os.environ.get("TIERMESH_HOME", ".tiermesh")))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--baseline-ref", default=DEFAULT_BASELINE,
                        help="commit whose agent is measured beside this checkout ('none': skip)")
    parser.add_argument("--out", type=Path, default=RESULTS / "overload.json")
    args = parser.parse_args(argv)

    from mesh.registry import Registry

    if VARIANT not in Registry.load(args.home).variants:
        print(f"{VARIANT} is not built in {args.home}: run `mesh build` first", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "benchmark": "overload", "variant": VARIANT, "latency_ms": LATENCY_MS,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
        "settings": {"seconds": args.seconds, "baseline_ref": args.baseline_ref},
    }
    print("this checkout ...", flush=True)
    report["current"] = measure(ROOT, args.home, args.seconds)
    if args.baseline_ref != "none":
        print(f"baseline {args.baseline_ref} ...", flush=True)
        with worktree(args.baseline_ref) as tree:
            report["baseline"] = measure(tree, args.home, args.seconds)
    cur = report["current"]
    report["goals"] = {
        "refusals_within_5ms_p99": {
            name: (cur[name]["node"]["refused_within_5ms"] or 0.0) >= 0.99
            for name in ("http_128", "stream_10x") if cur[name]["node"]["refused"]},
        "unanswered_stream_queries": cur["stream_10x"]["unanswered"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for target in ("current", "baseline"):
        if target in report:
            print(f"\n{target} (capacity {report[target]['capacity_rps']:.0f} queries/s)")
            for name in ("http_128", "stream_10x"):
                print(_line(name, report[target][name]))
    print(f"\n-> {args.out}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
