"""What hostile callers can make a node hold: the issue 8 (item 5) probe, repeatable.

Against a one-node digits agent process (HTTP and stream ports), with
``idle_timeout_s`` and ``read_timeout_s`` shortened to ``--timeout-s``:

1. ``half_open``: ``--connections`` connections, half HTTP and half stream,
   half of each silent and half stopped in the middle of a request (headers
   or a frame); after the timeout plus a margin, how many are still open.
2. ``unread_stream``: one stream client sends ``--frames`` one-row queries
   without reading a single answer; how much the node took before it
   stopped reading, and how much its resident memory grew.
3. ``big_bodies``: six concurrent 63 MiB bodies on ``POST /v1/infer``; their
   statuses and the node's peak memory growth while they are sent.

Writes ``benchmarks/results/limits.json``.

    python benchmarks/limits.py [--home DIR] [--timeout-s 5] [--connections 600] [--frames 300000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._loadgen import HOST, machine  # noqa: E402
from benchmarks.fuzz import node_process  # noqa: E402
from mesh.stream import INFER, frame  # noqa: E402
from mesh.wire import InferRequest, encode_request  # noqa: E402
from tests.fuzzing import rss_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MiB = 2**20


def half_open(http_port: int, stream_port: int, *, count: int, wait_s: float) -> dict[str, Any]:
    body = encode_request(InferRequest("digits", [np.zeros((1, 64), np.float32)]))
    kinds = {
        "http_silent": (http_port, b""),
        "http_half_header": (http_port, b"POST /v1/infer HTTP/1.1\r\nHost: n"),
        "stream_silent": (stream_port, b""),
        "stream_half_frame": (stream_port, frame(1, INFER, body)[:20]),
    }
    socks: dict[str, list[socket.socket]] = {k: [] for k in kinds}
    for i in range(count):
        kind = list(kinds)[i % len(kinds)]
        port, data = kinds[kind]
        sock = socket.create_connection((HOST, port))
        if data:
            sock.sendall(data)
        socks[kind].append(sock)
    time.sleep(wait_s)
    still_open = {}
    for kind, group in socks.items():
        n = 0
        for sock in group:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                n += 1  # nothing to read, not even the EOF of a close
            else:
                with contextlib.suppress(ConnectionResetError):
                    data = sock.recv(65536)
                    while data:
                        sock.settimeout(0.5)
                        data = sock.recv(65536)
            sock.close()
        still_open[kind] = n
    return {"connections": count, "waited_s": wait_s, "still_open": still_open,
            "still_open_total": sum(still_open.values())}


def unread_stream(stream_port: int, pid: int, *, frames: int) -> dict[str, Any]:
    one = frame(1, INFER, encode_request(InferRequest("digits", [np.zeros((1, 64), np.float32)])))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((HOST, stream_port))
    sock.setblocking(False)
    before = rss_bytes(pid)
    data = memoryview(one * frames)
    sent, stalled_since = 0, None
    while sent < len(data):
        try:
            sent += sock.send(data[sent:sent + (1 << 20)])
            stalled_since = None
        except BlockingIOError:
            now = time.monotonic()
            stalled_since = stalled_since or now
            if now - stalled_since > 3:  # the node stopped reading: it holds no more of it
                break
            select.select([], [sock], [], 0.2)
    time.sleep(1)
    grown = rss_bytes(pid) - before
    sock.close()
    return {"frames_offered": frames, "frame_bytes": len(one), "bytes_offered": len(data),
            "bytes_taken": sent, "frames_taken": sent // len(one),
            "node_rss_growth_bytes": grown}


def big_bodies(http_port: int, pid: int, *, count: int = 6, size: int = 63 * MiB) -> dict[str, Any]:
    before = rss_bytes(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(pid))
            time.sleep(0.02)

    statuses: list[str] = []

    def send() -> None:
        sock = socket.create_connection((HOST, http_port), timeout=60)
        head = (f"POST /v1/infer HTTP/1.1\r\nHost: n\r\nContent-Type: application/msgpack\r\n"
                f"Content-Length: {size}\r\n\r\n").encode()
        try:
            sock.sendall(head + b"\x00" * size)
            reply = sock.recv(65536)
            statuses.append(reply.split(b" ", 2)[1].decode() if reply else "closed")
        except OSError as exc:  # refused from its headers and closed while the body was going
            statuses.append(type(exc).__name__)
        finally:
            sock.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    senders = [threading.Thread(target=send) for _ in range(count)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    time.sleep(0.5)
    done.set()
    sampler.join()
    return {"bodies": count, "body_bytes": size, "outcomes": sorted(statuses),
            "node_rss_peak_growth_bytes": peak[0] - before}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path,
                        default=Path(os.environ.get("TIERMESH_HOME", ROOT / ".tiermesh")))
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=600)
    parser.add_argument("--frames", type=int, default=300_000)
    parser.add_argument("--out", type=Path, default=RESULTS / "limits.json")
    args = parser.parse_args(argv)

    options = {"idle_timeout_s": args.timeout_s, "read_timeout_s": args.timeout_s}
    with node_process(args.home, options) as (target, pid):
        result = {
            "machine": machine(),
            "timeout_s": args.timeout_s,
            "half_open": half_open(target.http_port, target.stream_port, count=args.connections,
                                   wait_s=args.timeout_s + 3),
            "unread_stream": unread_stream(target.stream_port, pid, frames=args.frames),
            "big_bodies": big_bodies(target.http_port, pid),
        }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
