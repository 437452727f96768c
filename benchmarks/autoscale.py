"""Autoscale: managed placement against static placement, the same trace on the same mesh.

Issue 11, item 7. ``topologies/local.yaml`` (two edges, one intermediate site,
one core, links emulated) runs twice in one invocation, each from a fresh copy
of the home, with one seeded trace:

- ``static``: ``placement.managed: false``, the base placement within the
  topology's fixed globs, one compute worker per variant, nothing moves;
- ``managed``: ``placement.managed: true`` with the tuning compressed to the
  trace (rounds every second, holds of seconds, ``day_s`` = the trace).

The trace is a daily shape compressed into the run (a night trough, a midday
peak), plus two sudden spikes (a burst of tight embeddings at ``edge-1``, a
burst of accurate digits at ``edge-2``) and a model registered mid-run
(``sensor``, task ``sensor-digits``, pushed to the core as ``mesh models add
--mesh`` does; its queries start then, and static placement handles it by the
same rules it handles everything). Queries enter at both edges, open loop
(Poisson arrivals, thinned to the shape), with SLOs that resemble real ones:
tight cheap digits, accurate digits, tight embeddings with an accuracy floor
that an int8 MiniLM meets, accurate embeddings that need fp32, and the new
model's queries.

A query violates its SLO when it is refused, fails, times out, is answered
later than its ``latency_ms`` (measured here, at the client), below its
``min_accuracy`` or knowingly infeasible (``mesh.client.slo_met``). Every
couple of seconds each node's ``/v1/status`` is sampled: compute workers per
loaded variant (replicas), memory its models hold, cold starts paid by queries
and hidden by background loads, and the machine's CPU use from ``/proc/stat``.

Cost (both runs, same definition): what the answers cost by the mesh's own
price of each (the served plan's ``cost_per_1k``: hardware time and energy),
plus the memory held by loaded models priced as that share of its node's
``cost_per_hour`` (memory-seconds x price). ``violation_ratio`` = static
violations / managed violations (higher is better; the issue's goal is >= 10
at a cost ratio <= 1 and an accuracy delta >= -1 point).

Writes ``benchmarks/results/autoscale.json`` and ``autoscale.png``.

    python benchmarks/autoscale.py [--home DIR] [--out DIR] [--quick] [--seconds 150]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._loadgen import ROOT, code_version, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EDGES = ("edge-1", "edge-2")
SAMPLE_EVERY_S = 2.0
#: the model registered mid-run
NEW_MODEL, NEW_TASK = "sensor", "sensor-digits"

#: what the managed run's topology sets (the tuning compressed to a trace of minutes)
MANAGED_TUNING: dict[str, float] = {"hold_s": 5.0, "scale_down_after_s": 15.0,
                                    "idle_evict_s": 30.0, "preload_horizon_s": 10.0}


@dataclass(frozen=True)
class QueryClass:
    """One kind of query: its task, SLO and rate at each edge at the day's peak."""

    name: str
    task: str
    latency_ms: float
    min_accuracy: float | None
    peak_qps: float  # per edge, at the peak of the daily shape


CLASSES = (
    QueryClass("digits-fast", "digits", 15.0, None, 10.0),
    QueryClass("digits-accurate", "digits", 50.0, 0.99, 5.0),
    QueryClass("embed-fast", "sentence-embedding", 40.0, 0.99, 6.0),
    QueryClass("embed-accurate", "sentence-embedding", 80.0, 0.999, 3.0),
    QueryClass(NEW_TASK, NEW_TASK, 20.0, 0.96, 5.0),
)


@dataclass(frozen=True)
class Spike:
    """``factor`` times a class's rate at one edge, from ``start_frac`` of the trace for
    ``length_frac`` of it."""

    edge: str
    query: str
    start_frac: float
    length_frac: float
    factor: float


SPIKES = (Spike("edge-1", "embed-fast", 0.28, 0.08, 6.0),
          Spike("edge-2", "embed-accurate", 0.68, 0.08, 8.0))
#: the designs measured before this one, and what they gave (kept in the JSON)
TRIED = (
    "trace at load 1 (40 s smoke): both runs met ~99% of SLOs; too light to tell them apart",
    "design A, load 5, 150 s, same tuning as now (interval 1 s, hold 5 s, scale-down after 15 s, "
    "idle eviction 30 s, preload horizon 10 s): static 260 violations of 28,632, managed 2,661 "
    "(violation_ratio 0.098, cost ratio 1.13); other processes on the machine (another "
    "engineer's test suite) used 7.5% of the CPU during the static run and 40% during the "
    "managed one, so that run is confounded",
    "the same design repeated: confounded the other way, other "
    "processes used 69% of the CPU during the static run and 37% during the managed one; "
    "neither pair is a clean comparison on this shared 2-core machine",
    "design B (a quiet machine: other processes 13-14% of the CPU): "
    "a hot variant whose batches already run 1.5x slower than profiled gets no more workers "
    "(mesh.placement Tuning.contended_slowdown). Static 944 violations, managed 1,780 "
    "(violation_ratio 0.53, cost ratio 1.08). The managed mesh still added a second MiniLM "
    "worker on edge-1 and on mid-1 in each spike (their measured slowdown stayed under 1.5: "
    "the queue grew, not the per-batch time), and opening a ~100-200 MB session mid-spike on a "
    "2-core machine costs the very CPU the spike needs: digits-accurate saw 186 "
    "CannotMeetDeadline refusals at mid-1 during it (static: 0). The hardware classes declare "
    "4, 16 and 64 cores; the four nodes share 2, so extra workers cannot add capacity here, "
    "and every other lever (replicas, faster variants) draws on the same 2 cores",
    "design C (a quiet machine, other processes 0.3% of the CPU): "
    "a variant also gets no more workers when its compute thread had a CPU for less than "
    "70% of its runs' time (each batch's thread CPU time over its wall time, reported with "
    "the load). Static 179 violations, managed 95 (violation_ratio 1.88, cost ratio 1.02, "
    "accuracy unchanged); the managed mesh added one fp32 MiniLM worker on mid-1 in the "
    "second spike and took it back 26 s later. Static's own count moved from 944 (design B's "
    "run, 14% of the CPU used by other processes) to 179 here: on this machine the run-to-run "
    "spread is as large as the effect",
    "design D (the figures in this file; a quiet machine, other processes 1.5% and 0% of the "
    "CPU): nodes report the CPUs they really have and the host they share, and the root "
    "keeps the busy workers of one host's nodes within its CPUs. All four nodes report one "
    "host with 2 CPUs, so the managed mesh adds no worker and no replica: the same placement "
    "as static (mean workers 17.64 in both), only place decisions. Static 102 violations, "
    "managed 134 (violation_ratio 0.76, cost ratio 1.00, accuracy equal): run-to-run noise, "
    "plus 11 more UnknownTask answers to the model added mid-run before it reached the edges "
    "(19 against 8). On one 2-CPU machine no placement can add capacity; the goal needs "
    "nodes on machines of their own",
    "not tried: a ladder step that replicates toward the entry when queries miss their target "
    "for distance (small compute, not hot); this mix has no such misses",
)
#: every class's rate is multiplied by this (sized so that the spikes overload a static
#: placement while the machine's two cores are not simply saturated: see the JSON's CPU figures)
LOAD = 5.0
#: the new model is registered at this fraction of the trace; its queries start then
NEW_MODEL_AT = 0.45


def day_shape(frac: float) -> float:
    """The daily shape, 0.3 at midnight (the trace's ends) and 1.0 at noon (its middle)."""
    return 0.3 + 0.7 * 0.5 * (1 - math.cos(2 * math.pi * frac))


def rate(query: QueryClass, edge: str, frac: float) -> float:
    if query.task == NEW_TASK and frac < NEW_MODEL_AT:
        return 0.0
    r = query.peak_qps * day_shape(frac)
    for s in SPIKES:
        if s.edge == edge and s.query == query.name and s.start_frac <= frac < s.start_frac + s.length_frac:
            r *= s.factor
    return r


def make_trace(seconds: float, seed: int, load: float) -> list[tuple[float, str, str]]:
    """(send at s, entry edge, query class), sorted: Poisson arrivals thinned to ``load`` x
    ``rate``."""
    rng = random.Random(seed)
    out = []
    for query in CLASSES:
        top = load * query.peak_qps * max(s.factor for s in SPIKES)
        for edge in EDGES:
            t = 0.0
            while True:
                t += rng.expovariate(top)
                if t >= seconds:
                    break
                if rng.random() * top < load * rate(query, edge, t / seconds):
                    out.append((round(t, 4), edge, query.name))
    out.sort()
    return out


# --------------------------------------------------------------------------- set-up


def topology_for(managed: bool, seconds: float, tuning: dict[str, float]) -> dict[str, Any]:
    topo = yaml.safe_load((ROOT / "topologies" / "local.yaml").read_text())
    topo["placement"] = ({"managed": True, "interval_s": 1.0, "day_s": seconds,
                          "tuning": dict(tuning)} if managed else {"managed": False})
    return topo


def copy_home(home: Path, dest: Path) -> Path:
    """A fresh home per run: the registry copied, the store's artifacts hard-linked (they are
    content-addressed and never rewritten), so the run's new model never reaches ``home``."""
    dest.mkdir(parents=True)
    for name in ("registry.json", "mesh.key"):
        shutil.copy2(home / name, dest / name)
    shutil.copytree(home / "store", dest / "store", copy_function=os.link)
    return dest


def build_new_model(scratch: Path) -> Path:
    """The model registered mid-run: a small MLP digits classifier, built (ONNX fp32 and
    int8, checked, profiled) into its own home once, before either run."""
    import torch
    from torch import nn

    from mesh.variants.digits import export_onnx, load_split
    from mesh.variants.factory import register_model

    scratch.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_val, y_val = load_split()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x_tr)),
                                    torch.from_numpy(y_tr)).backward()
        optimiser.step()
    (scratch / "sensor.onnx").write_bytes(export_onnx(model.eval()))
    np.savez(scratch / "val.npz", x=x_val, y=y_val)
    home = scratch / "home"
    report = register_model(home, NEW_MODEL, task=NEW_TASK, model=str(scratch / "sensor.onnx"),
                            validation=str(scratch / "val.npz"), formats=["onnx-fp32", "onnx-int8"])
    if not report.accepted:
        raise RuntimeError(f"the new model was not accepted: {report.rejected}")
    return home


def query_inputs(home: Path) -> dict[str, list[np.ndarray]]:
    """One query's input tensors per task."""
    from mesh.variants.digits import load_split
    from mesh.variants.sentences import SentenceTokenizer

    _, _, x_val, _ = load_split()
    tokens = SentenceTokenizer.from_home(home).encode(
        ["the sensor on the third floor reports a fault in the cooling loop"])
    return {"digits": [x_val[:1].astype(np.float32)], NEW_TASK: [x_val[1:2].astype(np.float32)],
            "sentence-embedding": list(tokens)}


def process_jiffies(pids: list[int]) -> float:
    """CPU jiffies (user + system, children included) the processes ``pids`` used so far."""
    total = 0.0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        total += sum(float(x) for x in fields[11:15])
    return total


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


# --------------------------------------------------------------------------- one run


async def _status(session: Any, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(url + "/v1/status") as resp:
            return await resp.json() if resp.status == 200 else None
    except Exception:  # a node too busy to answer in time is a gap in the series
        return None


async def _drive(mesh: Any, trace: list[tuple[float, str, str]], seconds: float,
                 inputs: dict[str, Any], new_home: Path, home: Path, cost_per_hour: dict[str, float],
                 memory_bytes: dict[str, int]) -> dict[str, Any]:
    import aiohttp

    from mesh.client import AsyncClient
    from mesh.errors import MeshError
    from mesh.registry import Registry
    from mesh.remote import key_from, push_variants
    from mesh.store import ArtifactStore

    classes = {q.name: q for q in CLASSES}
    records: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    clients = {e: AsyncClient(mesh.stream_url(e), timeout_s=2.0, attempt_timeout_s=2.0)
               for e in EDGES}
    for c in clients.values():
        await c.__aenter__()

    async def one(t: float, edge: str, name: str, start: float) -> None:
        q = classes[name]
        sent = time.perf_counter() - start
        rec: dict[str, Any] = {"t": round(sent, 3), "due": t, "entry": edge, "query": name,
                               "task": q.task, "latency_target_ms": q.latency_ms,
                               "min_accuracy": q.min_accuracy}
        t0 = time.perf_counter()
        try:
            res = await clients[edge].infer(q.task, *inputs[q.task], latency_ms=q.latency_ms,
                                            min_accuracy=q.min_accuracy)
        except MeshError as exc:
            rec.update(outcome="refused" if getattr(exc, "status", 0) in (429, 503) else "error",
                       status=getattr(exc, "status", None), error=type(exc).__name__,
                       latency_ms=round((time.perf_counter() - t0) * 1000, 3), slo_met=False)
        except Exception as exc:  # noqa: BLE001 - any failure is a violation, recorded
            rec.update(outcome="error", error=f"{type(exc).__name__}: {exc}"[:200],
                       latency_ms=round((time.perf_counter() - t0) * 1000, 3), slo_met=False)
        else:
            plan = res.plan
            rec.update(outcome="answered", latency_ms=round(res.latency_ms, 3),
                       slo_met=bool(res.slo_met), node=res.served_by.node,
                       variant=res.served_by.variant, accuracy=res.accuracy,
                       cost_per_1k=plan.cost_per_1k if plan is not None else None)
        records.append(rec)

    async def sampler(start: float, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=1.5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            busy0, total0 = cpu_times()
            while not stop.is_set():
                at = time.perf_counter() - start
                rows = await asyncio.gather(*(_status(session, mesh.url(n)) for n in mesh.topology.nodes))
                busy1, total1 = cpu_times()
                cpu = (busy1 - busy0) / max(total1 - total0, 1e-9)
                busy0, total0 = busy1, total1
                sample: dict[str, Any] = {"t": round(at, 2), "cpu_busy_frac": round(cpu, 3), "nodes": {}}
                for node, st in zip(mesh.topology.nodes, rows, strict=True):
                    if st is None:
                        sample["nodes"][node] = None
                        continue
                    workers = {v["name"]: v.get("workers", 1) for v in st["variants"] if v["loaded"]}
                    sample["nodes"][node] = {
                        "workers": workers,
                        "memory_used_bytes": st["memory"]["used_bytes"],
                        "cold_starts": sum((st.get("cold_starts") or {}).values()),
                        "cold_starts_hidden": sum((st.get("cold_starts_hidden") or {}).values()),
                        "placement_version": (st["placement"].get("live") or {}).get("version")}
                samples.append(sample)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)

    def register_new_model() -> dict[str, Any]:
        registry = Registry.load(new_home)
        variants = [v for v in registry.variants.values() if v.task == NEW_TASK]
        return push_variants(mesh.url("core-1"), variants, ArtifactStore(new_home / "store"),
                             key_from(home, None))

    start = time.perf_counter()
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler(start, stop))
    pending: set[asyncio.Task[None]] = set()
    new_model_task: asyncio.Future[dict[str, Any]] | None = None
    try:
        for t, edge, name in trace:
            if new_model_task is None and t >= NEW_MODEL_AT * seconds:
                events.append({"t": round(time.perf_counter() - start, 3), "event": "register",
                               "model": NEW_MODEL})
                new_model_task = loop.run_in_executor(None, register_new_model)
                new_model_task.add_done_callback(lambda f: events.append(
                    {"t": round(time.perf_counter() - start, 3), "event": "registered",
                     "answer": f.result() if not f.exception() else str(f.exception())[:300]}))
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(t, edge, name, start))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=10)
        if new_model_task is not None:
            with contextlib.suppress(Exception):  # its outcome is recorded by the callback
                await asyncio.wait_for(new_model_task, 60)
        # the final status of each node, for its decisions and cold-start breakdown
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            final = dict(zip(mesh.topology.nodes, await asyncio.gather(
                *(_status(session, mesh.url(n)) for n in mesh.topology.nodes)), strict=True))
    finally:
        stop.set()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(sampling, return_exceptions=True)
        for c in clients.values():
            await c.aclose()
    return {"records": records, "samples": samples, "events": events, "final": final}


def run_once(label: str, topology: dict[str, Any], trace: list[tuple[float, str, str]],
             seconds: float, base_home: Path, new_home: Path, tmp: Path) -> dict[str, Any]:
    import uvloop

    from mesh.testbed.local import LocalMesh
    from mesh.topology import load_topology

    home = copy_home(base_home, tmp / f"home-{label}")
    path = tmp / f"{label}.yaml"
    path.write_text(yaml.safe_dump(topology))
    parsed = load_topology(path)
    cost_per_hour = {n: parsed.hardware[s.hardware].cost_per_hour for n, s in parsed.nodes.items()}
    memory_bytes = {n: parsed.hardware[s.hardware].memory_mb * 2**20 for n, s in parsed.nodes.items()}
    inputs = query_inputs(home)
    t0 = time.perf_counter()
    with LocalMesh(path, home=home, run_dir=tmp / f"run-{label}", use_addresses=False) as mesh:
        started_s = time.perf_counter() - t0
        pids = [int(p["pid"]) for p in mesh.state.processes] + [os.getpid()]
        busy0, total0 = cpu_times()
        ours0 = process_jiffies(pids)
        out = uvloop.run(_drive(mesh, trace, seconds, inputs, new_home, home, cost_per_hour,
                                memory_bytes))
        busy1, total1 = cpu_times()
        ours1 = process_jiffies(pids)
    # /proc/stat sums every core; a process's jiffies are of one: both over the machine's total
    out["own_cpu_frac"] = round((ours1 - ours0) / max(total1 - total0, 1e-9), 3)
    out["start_s"] = round(started_s, 1)
    out["cpu_busy_frac"] = round((busy1 - busy0) / max(total1 - total0, 1e-9), 3)
    out["cost_per_hour"], out["memory_bytes"] = cost_per_hour, memory_bytes
    return out


# --------------------------------------------------------------------------- summaries


def summarise(run: dict[str, Any], seconds: float) -> dict[str, Any]:
    recs = run["records"]
    n = len(recs)
    violations = sum(1 for r in recs if not r["slo_met"])
    answered = [r for r in recs if r["outcome"] == "answered"]
    accs = [r["accuracy"] for r in answered if r.get("accuracy") is not None]
    by_class: dict[str, dict[str, Any]] = {}
    for q in CLASSES:
        rs = [r for r in recs if r["query"] == q.name]
        if not rs:
            continue
        why: dict[str, int] = {}
        for r in rs:
            if r["slo_met"]:
                continue
            if r["outcome"] != "answered":
                key = f"{r['outcome']}:{r.get('error', '')}"
            elif r["min_accuracy"] is not None and (r.get("accuracy") or 0) < r["min_accuracy"]:
                key = "below min_accuracy"
            elif r["latency_ms"] > r["latency_target_ms"]:
                key = "late"
            else:
                key = "infeasible plan"
            why[key] = why.get(key, 0) + 1
        served: dict[str, int] = {}
        for r in rs:
            if r["outcome"] == "answered":
                k = f"{r['node']}/{r['variant']}"
                served[k] = served.get(k, 0) + 1
        lat = [r["latency_ms"] for r in rs if r["outcome"] == "answered"]
        by_class[q.name] = {
            "queries": len(rs), "violations": sum(1 for r in rs if not r["slo_met"]),
            "attainment": round(sum(1 for r in rs if r["slo_met"]) / len(rs), 4),
            "violations_by_cause": why, "served_by": served,
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 2) if lat else None,
            "latency_p99_ms": round(float(np.percentile(lat, 99)), 2) if lat else None}
    # memory-seconds, priced as the memory's share of each node's hourly price
    mem_cost, mem_gb_s = 0.0, 0.0
    samples = run["samples"]
    for a, b in zip(samples, samples[1:], strict=False):
        dt = b["t"] - a["t"]
        for node, row in a["nodes"].items():
            if row is None:
                continue
            used = row["memory_used_bytes"]
            mem_gb_s += used / 2**30 * dt
            mem_cost += used / run["memory_bytes"][node] * run["cost_per_hour"][node] * dt / 3600
    answer_cost = sum((r.get("cost_per_1k") or 0.0) / 1000 for r in answered)
    final = run["final"]
    cold = {n: sum((st.get("cold_starts") or {}).values()) if st else None for n, st in final.items()}
    hidden = {n: sum((st.get("cold_starts_hidden") or {}).values()) if st else None
              for n, st in final.items()}
    mean_mem = [sum(r["memory_used_bytes"] for r in s["nodes"].values() if r) for s in samples]
    replicas = [sum(sum(r["workers"].values()) for r in s["nodes"].values() if r) for s in samples]
    lag = [r["t"] - r["due"] for r in recs]
    return {
        "queries": n, "violations": violations, "attainment": round(1 - violations / max(n, 1), 4),
        "answered": len(answered),
        "refused": sum(1 for r in recs if r["outcome"] == "refused"),
        "errors": sum(1 for r in recs if r["outcome"] == "error"),
        "mean_accuracy": round(float(np.mean(accs)), 5) if accs else None,
        "answers_without_accuracy": len(answered) - len(accs),
        "cold_starts_seen": sum(v for v in cold.values() if v is not None),
        "cold_starts_hidden": sum(v for v in hidden.values() if v is not None),
        "cold_starts_by_node": {"seen": cold, "hidden": hidden},
        "mean_memory_mb": round(float(np.mean(mean_mem)) / 2**20, 1) if mean_mem else None,
        "peak_memory_mb": round(float(np.max(mean_mem)) / 2**20, 1) if mean_mem else None,
        "mean_workers": round(float(np.mean(replicas)), 2) if replicas else None,
        "max_workers": int(np.max(replicas)) if replicas else None,
        "memory_gb_s": round(mem_gb_s, 2),
        "cost": {"answers": round(answer_cost, 6), "memory": round(mem_cost, 6),
                 "total": round(answer_cost + mem_cost, 6)},
        "machine_cpu_busy_frac": run["cpu_busy_frac"],
        "mesh_and_loadgen_cpu_frac": run["own_cpu_frac"],
        "other_processes_cpu_frac": round(run["cpu_busy_frac"] - run["own_cpu_frac"], 3),
        "send_lag_ms_p99": round(float(np.percentile(lag, 99)) * 1000, 1) if lag else None,
        "mesh_start_s": run["start_s"],
        "by_query": by_class,
        "events": run["events"],
        "placement_decisions": [d for st in final.values() if st
                                for d in (st["placement"].get("live") or {}).get("decisions", [])
                                if (st["placement"].get("live") or {}).get("root")],
    }


def series(run: dict[str, Any], seconds: float, bucket_s: float = 5.0) -> dict[str, Any]:
    """Per bucket: offered load, SLO attainment; per sample: workers, memory, CPU."""
    buckets = int(math.ceil(seconds / bucket_s))
    sent = [0] * buckets
    met = [0] * buckets
    for r in run["records"]:
        b = min(int(r["due"] // bucket_s), buckets - 1)
        sent[b] += 1
        met[b] += bool(r["slo_met"])
    return {
        "bucket_s": bucket_s,
        "t": [round((i + 0.5) * bucket_s, 1) for i in range(buckets)],
        "load_qps": [round(s / bucket_s, 2) for s in sent],
        "attainment": [round(m / s, 4) if s else None for m, s in zip(met, sent, strict=True)],
        "sample_t": [s["t"] for s in run["samples"]],
        "workers": [sum(sum(r["workers"].values()) for r in s["nodes"].values() if r)
                    for s in run["samples"]],
        "workers_by_node": {n: [sum(s["nodes"][n]["workers"].values()) if s["nodes"].get(n) else None
                                for s in run["samples"]] for n in run["cost_per_hour"]},
        "memory_mb": [round(sum(r["memory_used_bytes"] for r in s["nodes"].values() if r) / 2**20, 1)
                      for s in run["samples"]],
        "cold_starts_seen": [sum(r["cold_starts"] for r in s["nodes"].values() if r)
                             for s in run["samples"]],
        "cpu_busy_frac": [s["cpu_busy_frac"] for s in run["samples"]],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    seconds = result["settings"]["seconds"]
    for label, style in (("static", "--"), ("managed", "-")):
        s = result["series"][label]
        axes[0].plot(s["t"], s["load_qps"], style, label=f"{label}: offered q/s")
        axes[1].step(s["sample_t"], s["workers"], style, where="post", label=f"{label}: workers")
        axes[2].plot(s["t"], [a if a is not None else float("nan") for a in s["attainment"]],
                     style, marker=".", label=label)
    for ax in axes:
        for spike in SPIKES:
            ax.axvspan(spike.start_frac * seconds, (spike.start_frac + spike.length_frac) * seconds,
                       color="orange", alpha=0.15)
        ax.axvline(NEW_MODEL_AT * seconds, color="grey", lw=0.8, ls=":")
        ax.legend(loc="lower left", fontsize=8)
    axes[0].set_ylabel("load (q/s)")
    axes[1].set_ylabel("compute workers\n(all nodes)")
    axes[2].set_ylabel("SLO attainment")
    axes[2].set_ylim(0, 1.02)
    axes[2].set_xlabel("seconds into the trace (shaded: spikes; dotted: new model registered)")
    fig.suptitle(f"Managed vs static placement, local mesh: violation ratio "
                 f"{result['violation_ratio']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--home", type=Path,
                        default=Path(os.environ.get("TIERMESH_HOME", ROOT / ".tiermesh")))
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and PNG go")
    parser.add_argument("--seconds", type=float, default=150.0, help="trace length per run")
    parser.add_argument("--quick", action="store_true", help="a 40 s trace per run (smoke)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--load", type=float, default=LOAD,
                        help="multiplies every class's rate (QueryClass.peak_qps)")
    parser.add_argument("--only", choices=["static", "managed"], default=None,
                        help="run one side only (trials; no ratio)")
    parser.add_argument("--tuning", type=json.loads, default=None,
                        help="JSON tuning for the managed run (default: MANAGED_TUNING)")
    args = parser.parse_args(argv)
    seconds = 40.0 if args.quick else args.seconds
    tuning = args.tuning if args.tuning is not None else MANAGED_TUNING
    trace = make_trace(seconds, args.seed, args.load)
    with tempfile.TemporaryDirectory(prefix="tiermesh-autoscale-") as tmp_name:
        tmp = Path(tmp_name)
        new_home = build_new_model(tmp / "new-model")
        runs = {}
        for label, managed in (("static", False), ("managed", True)):
            if args.only and args.only != label:
                continue
            print(f"{label}: {len(trace)} queries over {seconds:.0f} s ...", flush=True)
            runs[label] = run_once(label, topology_for(managed, seconds, tuning), trace, seconds,
                                   args.home, new_home, tmp)
    summaries = {k: summarise(v, seconds) for k, v in runs.items()}
    result: dict[str, Any] = {
        "benchmark": "autoscale", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code": code_version(), "machine": machine(),
        "settings": {"seconds": seconds, "seed": args.seed, "load": args.load,
                     "topology": "topologies/local.yaml",
                     "sample_every_s": SAMPLE_EVERY_S,
                     "queries": [asdict(q) for q in CLASSES], "spikes": [asdict(s) for s in SPIKES],
                     "day_shape": "0.3 + 0.35 * (1 - cos(2 pi t / seconds)): trough at the ends, "
                                  "peak mid-trace",
                     "new_model": {"name": NEW_MODEL, "task": NEW_TASK, "registered_at_s":
                                   NEW_MODEL_AT * seconds,
                                   "variants": ["sensor-onnx-fp32", "sensor-onnx-int8"]},
                     "managed_placement": {"interval_s": 1.0, "day_s": seconds, "tuning": tuning},
                     "static_placement": {"managed": False}},
        "definitions": {
            "violation": "refused, error or timeout (2 s), or answered later than latency_ms "
                         "(client clock), below min_accuracy, or with an infeasible plan",
            "cost": "sum over answers of the served plan's cost_per_1k / 1000, plus the memory "
                    "models hold on each node as its share of the node's memory_mb, times the "
                    "node's cost_per_hour, integrated over the run (sampled)",
            "violation_ratio": "static violations / managed violations",
            "accuracy_delta_points": "(managed - static) mean accuracy of answers, x100"},
    }
    if len(summaries) == 2:
        s, m = summaries["static"], summaries["managed"]
        result["violation_ratio"] = ratio(s["violations"], m["violations"])
        result["cost_ratio"] = ratio(m["cost"]["total"], s["cost"]["total"])
        result["accuracy_delta_points"] = (round((m["mean_accuracy"] - s["mean_accuracy"]) * 100, 3)
                                           if m["mean_accuracy"] and s["mean_accuracy"] else None)
        result["memory_ratio"] = ratio(m["mean_memory_mb"] or 0, s["mean_memory_mb"] or 0)
        result["goal"] = {"violation_ratio_min": 10.0, "cost_ratio_max": 1.0,
                          "accuracy_delta_points_min": -1.0,
                          "met": bool(result["violation_ratio"] and result["violation_ratio"] >= 10
                                      and result["cost_ratio"] is not None
                                      and result["cost_ratio"] <= 1
                                      and (result["accuracy_delta_points"] or 0) >= -1)}
    result["tried"] = list(TRIED)
    result["runs"] = summaries
    result["series"] = {k: series(v, seconds) for k, v in runs.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "autoscale.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    if len(summaries) == 2:
        plot(result, args.out / "autoscale.png")
    for k, v in summaries.items():
        print(f"{k}: {v['queries']} queries, {v['violations']} violations "
              f"(attainment {v['attainment']}), accuracy {v['mean_accuracy']}, "
              f"cold starts {v['cold_starts_seen']} seen / {v['cold_starts_hidden']} hidden, "
              f"memory {v['mean_memory_mb']} MB, cost {v['cost']['total']}, "
              f"cpu {v['machine_cpu_busy_frac']} (others {v['other_processes_cpu_frac']})")
        for q, c in v["by_query"].items():
            print(f"   {q}: {c['violations']}/{c['queries']} {c['violations_by_cause']} "
                  f"{c['served_by']} p50 {c['latency_p50_ms']} p99 {c['latency_p99_ms']}")
    if len(summaries) == 2:
        print(f"violation_ratio {result['violation_ratio']}, cost_ratio {result['cost_ratio']}, "
              f"accuracy delta {result['accuracy_delta_points']} points")
    return result


if __name__ == "__main__":
    main()
