"""Private heads on a shared base: memory and latency saved against one full copy per tenant.

Issue 13, item 4. Each tenant registers a small topic classifier (a head
trained here on the shipped sentences' topic groups) on the public MiniLM
encoder (``minilm-onnx-fp32``). One real node process per case serves every
tenant's head, with one compute thread, in two modes, side by side in one run:

- ``shared``  every tenant shares one encoder instance: one copy in memory, and
              one encoder run per batch whatever tenants' queries it holds;
- ``copies``  every tenant has ``share_base: false``: its own encoder instance
              (what one full model per tenant costs), batched per tenant.

For 2 and 4 tenants, in alternating rounds: the node's resident memory once
every tenant's head has answered (``VmRSS``), then all tenants at once, each
with a closed loop of ``--concurrency`` connections of single sentences
(msgpack over HTTP, each tenant with its API key) for ``--seconds``: latency
percentiles and throughput. Ratios are copies / shared (higher: sharing saves
more). Accuracy is each head's, measured end to end by the factory.

Writes ``benchmarks/results/tenants.json`` and ``tenants.png``.

    python benchmarks/tenants.py [--home DIR] [--seconds 8] [--rounds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._loadgen import (  # noqa: E402
    BENCH_ID,
    agent_process,
    closed_loop,
    code_version,
    http_request,
    machine,
)

RESULTS = Path(__file__).resolve().parent / "results"
BASE = "minilm-onnx-fp32"
TOPICS = {"t1": ("weather", "travel", "sport"), "t2": ("cooking", "computing", "animals"),
          "t3": ("health", "finance", "work"), "t4": ("home", "science", "music and art")}
MODES = ("shared", "copies")


def make_home(source: Path, into: Path) -> dict[str, Any]:
    """A home with the MiniLM fp32 encoder and every tenant's head on it; the heads'
    accuracy and sizes."""
    from mesh.registry import Registry
    from mesh.store import ArtifactStore
    from mesh.variants.heads import register_head
    from mesh.variants.topics import topic_head

    registry = Registry.load(source)
    base = registry.get(BASE)
    store, src = ArtifactStore(into / "store"), ArtifactStore(source / "store")
    for sha in (base.sha256, *base.assets.values()):
        store.put_bytes(src.read(sha))
    Registry({BASE: base}).save(into)
    heads = {}
    for tenant, topics in TOPICS.items():
        head, validation = topic_head(into, topics, base_variant=BASE)
        report = register_head(into, f"{tenant}-topics", task=f"{tenant}-topics", base=BASE,
                               head=head, validation=validation, tenant=tenant,
                               progress=False)
        (variant,) = report.accepted
        heads[tenant] = {"accuracy": round(variant.accuracy, 4), "topics": list(topics),
                         "head_bytes": variant.size_bytes,
                         "head_memory_bytes": variant.head_profile.peak_memory_bytes}
    heads["base_memory_bytes"] = base.profile_for("cpu-1t").peak_memory_bytes
    return heads


def topology(tenants: list[str], keys: dict[str, tuple[str, str]], mode: str) -> dict[str, Any]:
    return {"name": "tenants-bench",
            "hardware": {"box": {"kind": "cpu", "threads": 1, "memory_mb": 8192}},
            "nodes": [{"name": "edge-1", "tier": "core", "hardware": "box",
                       "variants": [BASE], "max_queue": 1024}],
            "tenants": [{"name": t, "keys": [keys[t][1]], "share_base": mode == "shared"}
                        for t in tenants]}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def requests(home: Path, tenants: list[str], keys: dict[str, tuple[str, str]]
             ) -> dict[str, bytes]:
    """One HTTP request per tenant: a sentence of its first topic, its key."""
    from mesh.variants.sentences import SentenceTokenizer
    from mesh.variants.topics import load_topics
    from mesh.wire import InferRequest, encode_request

    tok = SentenceTokenizer.from_home(home)
    out = {}
    for t in tenants:
        sentence = next(s for s, topic in load_topics() if topic == TOPICS[t][0])
        ids, mask = tok.encode([sentence])
        body = encode_request(InferRequest(f"{t}-topics", [ids, mask], request_id=BENCH_ID))
        out[t] = http_request("/v1/infer", body, "application/msgpack",
                              {"Authorization": f"Bearer {keys[t][0]}"})
    return out


def run_case(home: Path, tenants: list[str], mode: str, keys: dict[str, tuple[str, str]],
             args: argparse.Namespace) -> dict[str, Any]:
    from mesh import Client
    from mesh.variants.sentences import SentenceTokenizer

    bodies = requests(home, tenants, keys)
    ids, mask = SentenceTokenizer.from_home(home).encode(["Is it going to rain tomorrow?"])
    with agent_process(home, topology(tenants, keys, mode)) as (port, proc):
        for t in tenants:  # every head answers once: the bases and heads are loaded
            with Client(f"http://127.0.0.1:{port}", api_key=keys[t][0]) as client:
                client.infer(f"{t}-topics", ids, mask)
        time.sleep(0.5)
        rss = rss_bytes(proc.pid)
        results: dict[str, dict[str, Any]] = {}

        def load(t: str) -> None:
            results[t] = closed_loop(port, bodies[t], concurrency=args.concurrency,
                                     seconds=args.seconds, warmup_s=1.0, keep_samples=True)

        threads = [threading.Thread(target=load, args=(t,)) for t in tenants]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    samples = [s for r in results.values() for s in r.pop("ok_latencies_s")]
    samples.sort()

    def pct(p: float) -> float:
        return round(samples[min(int(p * len(samples)), len(samples) - 1)] * 1000, 2)

    errors = sum(v for r in results.values() for k, v in r["status"].items() if k != "200")
    return {"rss_bytes": rss, "throughput_rps": round(sum(r["throughput_rps"]
                                                          for r in results.values()), 1),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "answered": len(samples),
            "errors": errors,
            "per_tenant_rps": {t: r["throughput_rps"] for t, r in results.items()}}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [c["tenants"] for c in report["cases"]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for mode, colour in zip(MODES, ("tab:green", "tab:red"), strict=True):
        rss = [c[mode]["rss_mb"] for c in report["cases"]]
        p99 = [c[mode]["p99_ms"] for c in report["cases"]]
        rps = [c[mode]["throughput_rps"] for c in report["cases"]]
        label = "shared base" if mode == "shared" else "one copy per tenant"
        axes[0].plot(counts, rss, "o-", color=colour, label=label)
        axes[1].plot(counts, p99, "o-", color=colour, label=label)
        axes[2].plot(counts, rps, "o-", color=colour, label=label)
    for ax, title in zip(axes, ("node memory (MB RSS)", "p99 latency (ms)",
                                "throughput (queries/s)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("tenants")
        ax.set_xticks(counts)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("MiniLM topic heads: shared encoder vs one encoder per tenant")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path,
                        default=Path(os.environ.get("TIERMESH_HOME", ".tiermesh")))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=2, help="connections per tenant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tenants", default="2,4")
    parser.add_argument("--out", type=Path, default=RESULTS / "tenants.json")
    args = parser.parse_args(argv)
    from mesh.tenants import new_key

    counts = [int(n) for n in args.tenants.split(",")]
    keys = {t: new_key() for t in TOPICS}
    with tempfile.TemporaryDirectory(prefix="tenants-bench-") as tmp:
        home = Path(tmp) / "home"
        print("registering the tenants' heads on", BASE, flush=True)
        heads = make_home(args.home, home)
        cases = []
        for n in counts:
            tenants = list(TOPICS)[:n]
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
            for r in range(args.rounds):
                order = MODES if r % 2 == 0 else MODES[::-1]
                for mode in order:
                    print(f"{n} tenants, {mode}, round {r + 1}", flush=True)
                    runs[mode].append(run_case(home, tenants, mode, keys, args))
            case: dict[str, Any] = {"tenants": n}
            for mode in MODES:
                rs = runs[mode]
                case[mode] = {
                    "rss_mb": round(statistics.median(x["rss_bytes"] for x in rs) / 2**20, 1),
                    "p50_ms": round(statistics.median(x["p50_ms"] for x in rs), 2),
                    "p99_ms": round(statistics.median(x["p99_ms"] for x in rs), 2),
                    "throughput_rps": round(statistics.median(x["throughput_rps"] for x in rs),
                                            1),
                    "errors": sum(x["errors"] for x in rs), "runs": rs}
            s, c = case["shared"], case["copies"]
            case["ratios_copies_over_shared"] = {
                "memory": round(c["rss_mb"] / s["rss_mb"], 3),
                "p50": round(c["p50_ms"] / s["p50_ms"], 3),
                "p99": round(c["p99_ms"] / s["p99_ms"], 3),
                "throughput_shared_over_copies": round(s["throughput_rps"]
                                                       / c["throughput_rps"], 3)}
            case["memory_saved_mb"] = round(c["rss_mb"] - s["rss_mb"], 1)
            cases.append(case)
    report = {"benchmark": "tenants", "base": BASE,
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code": code_version(),
              "machine": machine(),
              "settings": {"seconds": args.seconds, "concurrency_per_tenant": args.concurrency,
                           "rounds": args.rounds, "compute_threads": 1,
                           "path": "client -http msgpack-> one node (one compute thread)"},
              "heads": heads, "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    for case in cases:
        s, c, r = case["shared"], case["copies"], case["ratios_copies_over_shared"]
        print(f"{case['tenants']} tenants: memory {s['rss_mb']} MB shared vs {c['rss_mb']} MB "
              f"copies ({r['memory']}x); p50 {s['p50_ms']} vs {c['p50_ms']} ms; p99 "
              f"{s['p99_ms']} vs {c['p99_ms']} ms ({r['p99']}x); {s['throughput_rps']} vs "
              f"{c['throughput_rps']} q/s")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
