"""Where a query's microseconds go inside a live agent: timed stages and cProfile, per protocol.

The setup of :mod:`benchmarks.overhead` (digits MLP, batch 1, one sequential
client on one keep-alive connection). The agent runs in its own process with
timers wrapped around the functions of its query path (:data:`TARGETS`:
handlers, decode and encode, validation, planning, metrics, the batcher's
submit, the model run); a function missing from the code is skipped and
listed. The minimal servers' CPU time per query is measured first, for
reference. For each protocol (stream, ``POST /v1/infer``, OIP JSON, OIP binary)
this script

1. measures the agent process's CPU time per query (``/proc/PID/stat``, all
   threads) and the timers' inclusive time per query over the same queries;
2. derives the table of stages: a stage is its function's time less the
   timed functions inside it and what their timers cost, and what the
   handler's timer does not cover (reading and parsing the protocol, uvloop's
   own C code, system calls, creating the query's task; for HTTP also aiohttp
   writing the response) is the CPU time left over;
3. runs cProfile over a shorter stretch for the Python function calls per
   query and the own-code functions (``mesh/``, ``nodes/``) with the most
   time; cProfile's own cost inflates those times, roughly in proportion to
   the calls, so they rank hot spots and the timers size them.

Both clocks are the agent thread's CPU time (``time.thread_time``): on two
shared cores the client often runs on the agent's core, and wall time would
count the client's turn inside the agent's ``send``. An async function's timer
also counts what the loop ran while it waited (at one query at a time, work
for that query: the batcher's worker task, the model when it runs inline; a
model run on the compute thread is not counted, the MLP runs inline). A timed
call costs ~1 us (``thread_time`` is a system call), measured in the agent at
start, taken out of the stages and reported as ``timer_cost_us_per_query``.
Writes ``benchmarks/results/profile.json``.

    python benchmarks/profile_path.py [--home DIR] [--seconds 4] [--profile-seconds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import json
import os
import pstats
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._loadgen import (  # noqa: E402
    FreshIds,
    RawHttp,
    agent_process,
    code_version,
    free_port,
    machine,
)
from benchmarks.overhead import (  # noqa: E402
    SERVER,
    VARIANT,
    bench_topology,
    floor_servers,
    model_path,
    requests_for,
)

RESULTS = Path(__file__).resolve().parent / "results"
PROTOCOLS = {"stream": "stream", "http": "v1", "oip_json": "oip_json",
             "oip_binary": "oip_binary"}

#: label -> "module:qualname" of a function on the query path, timed inclusively.
TARGETS: dict[str, str] = {
    "stream handler": "nodes.stream:_Connection._serve",
    "stream socket write": "nodes.stream:_Connection._write",
    "http handler": "nodes.app:infer",
    "oip handler": "nodes.oip:OipAdapter.infer",
    "decode msgpack query": "mesh.wire:decode_request",
    "encode msgpack answer": "mesh.wire:encode_response",
    "oip parse": "nodes.oip:parse_infer",
    "oip encode": "nodes.oip:encode_infer",
    "agent.infer": "nodes.agent:NodeAgent.infer",
    "validation": "nodes.agent:NodeAgent._check_inputs",
    "plan (NodeAgent._plan)": "nodes.agent:NodeAgent._plan",
    "Planner.plan": "mesh.planner:Planner.plan",
    "MeshView.report": "mesh.state:MeshView.report",
    "Plan.from_decision": "mesh.plan:Plan.from_decision",
    "served plan": "nodes.agent:NodeAgent._served_plan",
    "metrics (NodeAgent._observe)": "nodes.agent:NodeAgent._observe",
    "batcher submit (incl. model)": "nodes.batching:Batcher.submit",
    "model run": "mesh.runtimes.onnx:OnnxRuntime.run",
}
#: stage -> (the timed label it is, the timed labels that run inside it). A stage is its
#: label's time less its children's, less what their timers cost (reported apart).
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "model run (onnxruntime)": ("model run", ()),
    "batching hand-off (queue, worker task, future)": ("batcher submit (incl. model)",
                                                       ("model run",)),
    "planning (NodeAgent._plan: Planner.plan, own load report)": (
        "plan (NodeAgent._plan)", ()),
    "plan object (Plan.from_decision)": ("Plan.from_decision", ()),
    "plan object (served plan)": ("served plan", ()),
    "validation (inputs)": ("validation", ()),
    "metrics": ("metrics (NodeAgent._observe)", ()),
    "agent.infer, other lines": ("agent.infer", (
        "batcher submit (incl. model)", "plan (NodeAgent._plan)", "Plan.from_decision",
        "served plan", "validation", "metrics (NodeAgent._observe)")),
    "decode query (msgpack)": ("decode msgpack query", ()),
    "encode answer (msgpack)": ("encode msgpack answer", ()),
    "OIP parse": ("oip parse", ()),
    "OIP encode": ("oip encode", ()),
    "socket write (stream)": ("stream socket write", ()),
}
#: timed inside ``plan (NodeAgent._plan)``: their timers' cost is taken out of planning
PLAN_TIMERS = ("Planner.plan", "MeshView.report")
HANDLERS = ("stream handler", "http handler", "oip handler")
HANDLED = ("agent.infer", "decode msgpack query", "encode msgpack answer", "oip parse",
           "oip encode", "stream socket write")
OWN_DIRS = ("/mesh/", "/nodes/")


# --------------------------------------------------------------------------- in the agent


class _Timers:
    """Inclusive wall time and calls per label; installed by :func:`_instrument`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.seconds[label], self.calls[label] = 0.0, 0
        clock = time.thread_time  # CPU time: a preempted agent (2 shared cores) is not busy
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                t0 = clock()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    self.seconds[label] += clock() - t0
                    self.calls[label] += 1
            return timed_async

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += clock() - t0
                self.calls[label] += 1
        return timed


def _instrument(timers: _Timers) -> list[str]:
    """Wrap every target wherever it is bound (modules that imported it by name too)."""
    for name in ("nodes.__main__", "nodes.app", "nodes.stream", "nodes.oip", "nodes.agent"):
        importlib.import_module(name)
    missing = []
    for label, target in TARGETS.items():
        module_name, qualname = target.split(":")
        try:
            owner: Any = importlib.import_module(module_name)
            *outer, attr = qualname.split(".")
            for part in outer:
                owner = getattr(owner, part)
            raw = inspect.getattr_static(owner, attr)
        except (ImportError, AttributeError):
            missing.append(target)
            continue
        if isinstance(raw, classmethod):
            setattr(owner, attr, classmethod(timers.wrap(label, raw.__func__)))
            continue
        if isinstance(raw, staticmethod):
            setattr(owner, attr, staticmethod(timers.wrap(label, raw.__func__)))
            continue
        wrapped = timers.wrap(label, raw)
        if inspect.isclass(owner):
            setattr(owner, attr, wrapped)
            continue
        for module in list(sys.modules.values()):  # `from mesh.wire import decode_request`
            if getattr(module, "__name__", "").split(".")[0] in ("mesh", "nodes"):
                for key, value in list(vars(module).items()):
                    if value is raw:
                        setattr(module, key, wrapped)
    return missing


def _wrapper_cost_s() -> float:
    """What one timed call adds (a wrapped no-op against a plain one)."""
    def noop() -> None:
        return None

    timed = _Timers().wrap("noop", noop)
    n = 100_000
    t0 = time.thread_time()
    for _ in range(n):
        noop()
    t1 = time.thread_time()
    for _ in range(n):
        timed()
    return max((time.thread_time() - t1) - (t1 - t0), 0.0) / n


def _agent_with_timers(spec: dict[str, Any]) -> None:
    """The agent of :mod:`benchmarks._loadgen`, timed; SIGUSR1 starts a stretch, SIGUSR2 ends it.

    The stretch's mode is read from ``spec["control"]`` ("timers" or "cprofile");
    its figures are written to ``spec["dump"]`` (JSON, or pstats for cprofile).
    """
    import cProfile

    from benchmarks._loadgen import _agent_main

    timers = _Timers()
    missing = _instrument(timers)
    cost_s = _wrapper_cost_s()
    state: dict[str, Any] = {"profiler": None}

    def start(*_: Any) -> None:
        timers.reset()
        if Path(spec["control"]).read_text().strip() == "cprofile":
            state["profiler"] = cProfile.Profile(time.thread_time)  # CPU, as the timers
            state["profiler"].enable()

    def stop(*_: Any) -> None:
        profiler = state.pop("profiler", None)
        dump = Path(spec["dump"])
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(dump) + ".tmp")
        else:
            (Path(str(dump) + ".tmp")).write_text(json.dumps(
                {"seconds": timers.seconds, "calls": timers.calls, "missing": missing,
                 "wrapper_cost_s": cost_s}))
        os.replace(str(dump) + ".tmp", dump)  # whole, or not there yet
        state["profiler"] = None

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    _agent_main(spec)


# --------------------------------------------------------------------------- in the client


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stretch(pid: int, control: Path, dump: Path, mode: str, send: Callable[[], None],
             seconds: float) -> tuple[int, float, float]:
    """Queries for ``seconds`` between SIGUSR1 and SIGUSR2: (queries, CPU s, wall s)."""
    control.write_text(mode)
    with contextlib.suppress(FileNotFoundError):
        dump.unlink()
    os.kill(pid, signal.SIGUSR1)
    send()  # the signal is handled by the time this is answered
    cpu0, t0, n = cpu_seconds(pid), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        send()
        n += 1
    cpu, wall = cpu_seconds(pid) - cpu0, time.perf_counter() - t0
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not dump.exists():
        send()  # the agent handles the signal between callbacks
        if time.monotonic() > deadline:
            raise RuntimeError("the agent did not write its figures")
        time.sleep(0.01)
    return n, cpu, wall


def floor_cpu(path: str, requests: dict[str, tuple[str, bytes]], seconds: float
              ) -> dict[str, dict[str, float]]:
    """The minimal servers' CPU time per query (the reference the agent is held to)."""
    out = {}
    with floor_servers(path) as (http_port, stream_port, pid):
        for case, port, key in (("floor_http", http_port, "v1"),
                                ("floor_stream", stream_port, "stream")):
            client = RawHttp(port)
            try:
                for _ in range(500):
                    client.roundtrip(requests[key][1])
                cpu0, t0, n = cpu_seconds(pid), time.perf_counter(), 0
                while time.perf_counter() - t0 < seconds:
                    client.roundtrip(requests[key][1])
                    n += 1
                out[case] = {"cpu_us_per_query": round((cpu_seconds(pid) - cpu0) / n * 1e6, 1),
                             "wall_us_per_query": round((time.perf_counter() - t0) / n * 1e6, 1)}
            finally:
                client.close()
    return out


def stage_table(timed: dict[str, Any], n: int, cpu_s: float) -> dict[str, Any]:
    """Microseconds per query by stage; the rest of the CPU time is outside the handler."""
    us = {label: timed["seconds"][label] / n * 1e6 for label in timed["seconds"]}
    calls = {label: timed["calls"][label] / n for label in timed["calls"]}
    cost_us = timed["wrapper_cost_s"] * 1e6

    def net(label: str, children: tuple[str, ...]) -> float:
        inside = [c for c in children if calls.get(c)]
        return us[label] - sum(us[c] + calls[c] * cost_us for c in inside)

    stages: dict[str, float] = {}
    for stage, (label, children) in STAGES.items():
        if calls.get(label):
            stages[stage] = net(label, children)
    planning = "planning (NodeAgent._plan: Planner.plan, own load report)"
    if planning in stages:
        stages[planning] -= sum(calls.get(c, 0.0) for c in PLAN_TIMERS) * cost_us
    handler = next((h for h in HANDLERS if calls.get(h)), None)
    cpu_us = cpu_s / n * 1e6
    if handler is not None:
        stages["handler, other lines (body, headers, framing)"] = net(handler, HANDLED)
        stages["outside the handler: protocol parsing, uvloop C code, syscalls, task steps"] = (
            cpu_us - us[handler] - calls[handler] * cost_us)
    return {"cpu_us_per_query": round(cpu_us, 1),
            "stages_us": {k: round(v, 1) for k, v in sorted(stages.items(), key=lambda kv: -kv[1])},
            "timer_cost_us_per_query": round(sum(calls.values()) * cost_us, 1),
            "timers_us": {k: round(v, 2) for k, v in us.items() if calls.get(k)},
            "calls_per_query": {k: round(v, 2) for k, v in calls.items() if v},
            "untimed_targets": timed["missing"]}


def cprofile_table(path: Path, n: int, top: int) -> dict[str, Any]:
    """Python calls per query and the own-code functions with the most time (inflated)."""
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    # not counted: this script's timers and the clock they read (2 calls per timed call)
    calls = sum(nc for (file, _, func), (_, nc, _, _, _) in stats.items()
                if not file.endswith("profile_path.py") and "thread_time" not in func)
    own = []
    for (file, line, func), (_, nc, tt, ct, _) in stats.items():
        if any(d in file for d in OWN_DIRS):
            short = file[file.rfind("/mesh/") + 1:] if "/mesh/" in file else \
                file[file.rfind("/nodes/") + 1:]
            own.append({"where": f"{short}:{func}", "line": line,
                        "self_us": round(tt / n * 1e6, 2), "incl_us": round(ct / n * 1e6, 2),
                        "calls": round(nc / n, 2)})
    own.sort(key=lambda r: -r["self_us"])
    return {"python_calls_per_query": round(calls / n, 1), "own_code_by_self_time": own[:top]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path,
                        default=Path(os.environ.get("TIERMESH_HOME", ".tiermesh")))
    parser.add_argument("--seconds", type=float, default=4.0, help="timed stretch per protocol")
    parser.add_argument("--profile-seconds", type=float, default=2.0,
                        help="cProfile stretch per protocol")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS),
                        choices=list(PROTOCOLS))
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS / "profile.json")
    args = parser.parse_args(argv)

    x = np.random.default_rng(0).random((1, 64), dtype=np.float64).astype(np.float32)
    requests = requests_for(x)
    stream_port = free_port()
    report: dict[str, Any] = {
        "benchmark": "profile", "variant": VARIANT, "batch": 1, "concurrency": 1,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code": code_version(),
        "machine": machine(),
        "settings": {"seconds": args.seconds, "profile_seconds": args.profile_seconds,
                     "method": "timers around the query path's functions (inclusive wall "
                               "time, one query at a time) + agent CPU time from /proc; "
                               "cProfile for call counts and ranking"},
        "protocols": {}}
    report["minimal_servers"] = floor_cpu(model_path(args.home), requests, args.seconds)
    for case, row in report["minimal_servers"].items():
        print(f"{case}: CPU {row['cpu_us_per_query']} us/query, client wall "
              f"{row['wall_us_per_query']} us")
    with tempfile.TemporaryDirectory() as tmp:
        control, dump = Path(tmp) / "control", Path(tmp) / "dump"
        control.write_text("timers")
        with agent_process(args.home, bench_topology(), node=SERVER,
                           options={"stream_port": stream_port},
                           launcher=Path(__file__).resolve(),
                           extra={"control": str(control), "dump": str(dump)}) as (port, proc):
            for name in args.protocols:
                kind, request = requests[PROTOCOLS[name]]
                client = RawHttp(stream_port if kind == "stream" else port)
                fresh = FreshIds(request)
                try:
                    def send(c: RawHttp = client, r: FreshIds = fresh, what: str = name) -> None:
                        status, body = c.roundtrip(r())  # an id of its own: no cached answer
                        if status != 200:
                            raise RuntimeError(f"{what}: status {status}: {body[:300]!r}")

                    for _ in range(500):
                        send()
                    n, cpu, wall = _stretch(proc.pid, control, dump, "timers", send,
                                            args.seconds)
                    row = stage_table(json.loads(dump.read_text()), n, cpu)
                    row["wall_us_per_query"] = round(wall / n * 1e6, 1)
                    pn, _, pwall = _stretch(proc.pid, control, dump, "cprofile", send,
                                            args.profile_seconds)
                    row["cprofile"] = {**cprofile_table(dump, pn, args.top),
                                       "wall_us_per_query": round(pwall / pn * 1e6, 1)}
                finally:
                    client.close()
                report["protocols"][name] = row
                print(f"\n{name}: agent CPU {row['cpu_us_per_query']} us/query, client wall "
                      f"{row['wall_us_per_query']} us, {row['cprofile']['python_calls_per_query']}"
                      " Python calls/query")
                for stage, us in row["stages_us"].items():
                    print(f"  {us:7.1f}  {stage}")
                print("  cProfile, own code by self time (inflated):")
                for r in row["cprofile"]["own_code_by_self_time"][:8]:
                    print(f"  {r['self_us']:7.1f}  {r['where']} ({r['calls']} calls)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "agent":
        _agent_with_timers(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
