"""A frozen entry node: how long the SDK takes to get an answer from the next entry URL.

Starts ``topologies/local.yaml``, lets edge-2 answer once, stops edge-1 with
SIGSTOP (its sockets stay open: the kernel still accepts connections and
buffers queries), then sends one query per case through a fresh client given
``[edge-1, edge-2]`` with its default timeouts: the blocking and the asyncio
client, over ``http://`` and ``tcp://``, with ``latency_ms=10`` and without an
SLO. Records each case's outcome (who served it, or the error) and the seconds
it took, continues edge-1 (SIGCONT) and stops the mesh. Bounded: at most one
client timeout per case. Uses only the SDK API that predates per-attempt
timeouts, so the same script measures the code before and after.
Writes ``benchmarks/results/frozen_entry.json``.

    python benchmarks/frozen_entry.py [--home DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh import AsyncClient, Client, MeshError  # noqa: E402
from mesh.testbed.local import LocalMesh  # noqa: E402
from mesh.variants import build_bundled  # noqa: E402
from mesh.variants.digits import load_heldout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SLOS: dict[str, dict[str, Any]] = {"latency_ms=10": {"latency_ms": 10}, "none": {}}


def _case(kind: str, urls: list[str], images: Any, slo: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    try:
        if kind == "Client":
            with Client(urls) as client:
                r = client.infer("digits", images, **slo)
        else:
            async def go() -> Any:
                async with AsyncClient(urls) as client:
                    return await client.infer("digits", images, **slo)
            r = asyncio.run(go())
    except MeshError as exc:
        return {"outcome": type(exc).__name__, "message": exc.message,
                "seconds": round(time.monotonic() - started, 3)}
    return {"outcome": f"served by {r.served_by.node}", "slo_met": r.slo_met,
            "seconds": round(time.monotonic() - started, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default=os.environ.get("TIERMESH_HOME", ".tiermesh"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "frozen_entry.json"))
    args = parser.parse_args(argv)
    build_bundled(Path(args.home), progress=False)
    images = load_heldout()[0][:1]
    cases = []
    with tempfile.TemporaryDirectory() as run_dir, \
            LocalMesh(ROOT / "topologies" / "local.yaml", home=args.home, run_dir=run_dir,
                      use_addresses=False) as mesh:
        assert mesh.state is not None
        pid = next(int(p["pid"]) for p in mesh.state.processes
                   if p["role"] == "node" and p["name"] == "edge-1")
        for address in (mesh.url, mesh.stream_url):
            with Client(address("edge-2")) as client:  # loaded and answering: only edge-1 is slow
                client.infer("digits", images, latency_ms=10)
        os.killpg(pid, signal.SIGSTOP)
        try:
            for transport, address in (("http", mesh.url), ("tcp", mesh.stream_url)):
                urls = [address("edge-1"), address("edge-2")]
                for kind in ("Client", "AsyncClient"):
                    for slo_name, slo in SLOS.items():
                        result = _case(kind, urls, images, slo)
                        cases.append({"client": kind, "transport": transport, "slo": slo_name,
                                      **result})
                        print(json.dumps(cases[-1]), flush=True)
        finally:
            os.killpg(pid, signal.SIGCONT)
    out = {"benchmark": "frozen_entry", "entries": ["edge-1 (SIGSTOP)", "edge-2"],
           "client_defaults": "as constructed with only the entry URLs", "cases": cases}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
