"""Security has a cost: what authentication, per-hop identity signing and TLS add to a query.

Four pairs of real agent processes, each an entry node (hosts nothing) that forwards over
its stream to a serving node (the digits MLP), measured side by side, round by round in a
rotating order, one query at a time over one kept-alive HTTP connection:

- ``open``         no tenants, plain TCP (the baseline);
- ``tenants``      the mesh declares API keys: the entry checks the client's Bearer key,
                   signs the tenant for the hop (HMAC, expiry, nonce), the server checks it;
- ``tls``          no tenants, every hop (client's included) over TLS;
- ``tenants_tls``  both.

Reports the added p50 latency of each against ``open`` (and as a ratio), and, in-process,
what each operation costs on its own (``authenticate``, ``Identity.sign`` + ``check``): the
figures the planner adds to its predictions (``Planner.tls_hop_ms``,
``Planner.identity_hop_ms``).

    python benchmarks/security.py [--home DIR] [--requests 2000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import timeit
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._loadgen import (  # noqa: E402
    BENCH_ID,
    HOST,
    code_version,
    free_port,
    http_request,
    machine,
    socket_timer,
    start_agent,
)
from benchmarks.overhead import (  # noqa: E402
    ENTRY,
    SERVER,
    VARIANT,
    _certs,
    bench_topology,
    measure_latency,
)

RESULTS = Path(__file__).resolve().parent / "results"
CASES = ("open", "tenants", "tls", "tenants_tls")


def _topology(key_hash: str | None) -> dict[str, Any]:
    topology = bench_topology()
    if key_hash is not None:
        topology["tenants"] = [{"name": "bench", "keys": [key_hash]}]
    return topology


def _pair(stack: ExitStack, home: Path, topology: dict[str, Any], certs: Path | None) -> int:
    """An entry and a server agent; returns the entry's HTTP port."""
    entry_port, server_stream = free_port(), free_port()
    tls = {"tls_dir": str(certs / SERVER)} if certs else {}
    server = stack.enter_context(start_agent(
        home, topology, node=SERVER,
        options={"stream_port": server_stream, **tls,
                 "neighbours": {ENTRY: f"http://{HOST}:{entry_port}"}}))
    tls = {"tls_dir": str(certs / ENTRY)} if certs else {}
    stack.enter_context(start_agent(
        home, topology, node=ENTRY, port=entry_port,
        options={"stream_port": free_port(), **tls,
                 "neighbours": {SERVER: f"http://{HOST}:{server}"},
                 "stream_neighbours": {SERVER: f"tcp://{HOST}:{server_stream}"}}))
    return entry_port


def operation_costs(key: str, key_hash: str) -> dict[str, float]:
    """Microseconds per call, in-process: what each check costs on its own."""
    from mesh.peers import PeerKey
    from mesh.tenants import Identity, ReplayGuard, Tenancy, TenantRules

    tenancy = Tenancy({"bench": TenantRules("bench", frozenset({key_hash}))})
    header = f"Bearer {key}"
    peers = PeerKey(os.urandom(32))
    guard = ReplayGuard()
    n = 20_000
    auth = timeit.timeit(lambda: tenancy.authenticate(header), number=n) / n * 1e6
    sign = timeit.timeit(lambda: Identity.sign(peers, "bench", "q-1", time.time()),
                         number=n) / n * 1e6
    signed = [Identity.sign(peers, "bench", "q-1", time.time()) for _ in range(n)]
    it = iter(signed)
    check = timeit.timeit(lambda: next(it).check(peers, "q-1", time.time(), guard),
                          number=n) / n * 1e6
    return {"authenticate_us": round(auth, 2), "identity_sign_us": round(sign, 2),
            "identity_check_us": round(check, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path,
                        default=Path(os.environ.get("TIERMESH_HOME", ".tiermesh")))
    parser.add_argument("--requests", type=int, default=2000,
                        help="sequential queries per case, over all rounds")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "security.json")
    args = parser.parse_args(argv)

    from mesh.tenants import new_key
    from mesh.wire import InferRequest, encode_request

    key, key_hash = new_key()
    x = np.random.default_rng(0).random((1, 64)).astype(np.float32)
    body = encode_request(InferRequest("digits", [x], request_id=BENCH_ID))
    plain = http_request("/v1/infer", body, "application/msgpack")
    authed = http_request("/v1/infer", body, "application/msgpack",
                          {"Authorization": f"Bearer {key}"})
    with ExitStack() as stack:
        certs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="security-tls-")))
        client_tls = _certs(certs, _topology(key_hash))
        ports = {"open": _pair(stack, args.home, _topology(None), None),
                 "tenants": _pair(stack, args.home, _topology(key_hash), None),
                 "tls": _pair(stack, args.home, _topology(None), certs),
                 "tenants_tls": _pair(stack, args.home, _topology(key_hash), certs)}
        timers = {}
        for case in CASES:
            request = authed if case.startswith("tenants") else plain
            timers[case], client = socket_timer(ports[case], request, args.warmup,
                                                client_tls if case.endswith("tls") else None)
            stack.callback(client.close)
        print(f"latency: {len(timers)} cases x {args.rounds} rounds", flush=True)
        latency = measure_latency(timers, rounds=args.rounds,
                                  per_round=max(args.requests // args.rounds, 50))
    base = latency["open"]["p50_us"]
    added = {case: {"added_p50_us": round(latency[case]["p50_us"] - base, 1),
                    "ratio_p50": round(latency[case]["p50_us"] / base, 3)}
             for case in CASES if case != "open"}
    costs = operation_costs(key, key_hash)
    report = {
        "benchmark": "security", "variant": VARIANT, "batch": 1,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code": code_version(),
        "machine": machine(),
        "settings": {"requests": args.requests, "rounds": args.rounds, "warmup": args.warmup,
                     "path": f"client -http-> {ENTRY} -stream-> {SERVER}, no emulated link",
                     "tenants": "the client's Bearer key checked at the entry; the tenant "
                                "signed by the entry for the hop and checked by the server"},
        "latency": latency, "added_vs_open": added, "operations_us": costs,
        "notes": "TLS covers both legs (client to entry and entry to server), the entry's "
                 "handshakes excluded (kept connections); tenants adds one key check at the "
                 "entry and one signed identity per hop",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for case in CASES:
        extra = "" if case == "open" else (f"  +{added[case]['added_p50_us']} us "
                                           f"({added[case]['ratio_p50']}x)")
        print(f"{case:12} p50 {latency[case]['p50_us']:8.1f} us{extra}")
    print("in-process:", costs)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
