"""What the benchmarks share: servers in child processes and clients that cost little.

- :func:`start_agent`: a real node agent (``nodes.__main__.serve``, uvloop) in its own
  process, on a one-node topology, with :class:`~nodes.agent.AgentConfig` overrides.
- :class:`RawHttp`: a blocking keep-alive HTTP/1.1 client over a raw socket, for
  sequential latency (``http.client`` would add ~100 us of its own per request);
  it also speaks the msgpack stream (:mod:`mesh.stream`) when given INFER frames.
- :func:`closed_loop`: C connections in a child process, each sending its next
  request as soon as the last answer arrives, for a fixed time (uvloop, raw protocol).

Everything talks to 127.0.0.1 only, and every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "note": "shared 2-core sandbox; client and server compete for the cores"}


def code_version(root: Path = ROOT) -> str:
    """The commit the benchmark ran on, with ``+dirty`` when the checkout had changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


def percentiles_us(samples_s: list[float]) -> dict[str, float]:
    arr = np.asarray(samples_s) * 1e6
    return {"p50_us": round(float(np.percentile(arr, 50)), 1),
            "p90_us": round(float(np.percentile(arr, 90)), 1),
            "p95_us": round(float(np.percentile(arr, 95)), 1),
            "p99_us": round(float(np.percentile(arr, 99)), 1),
            "mean_us": round(float(arr.mean()), 1), "n": len(samples_s)}


def http_request(path: str, body: bytes, content_type: str,
                 headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def stream_request(body: bytes) -> bytes:
    """An INFER frame of the msgpack stream (mesh.stream) carrying ``body``."""
    from mesh.stream import INFER, frame

    return frame(1, INFER, body)


def _parse_frame(buf: bytes) -> tuple[int, int] | None:
    """(200 for an answer or 500 for an error, total length) of the first frame, or None."""
    if len(buf) < 9:
        return None
    length = int.from_bytes(buf[:4], "big")
    if len(buf) < 9 + length:
        return None
    return (200 if buf[8] == 2 else 500), 9 + length


def _parse(buf: bytes) -> tuple[int, int] | None:
    """(status, total length) of the first complete response in ``buf``, or None."""
    if buf[:4] != b"HTTP":
        return _parse_frame(buf)
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].split(b"\r\n")
    status = int(head[0].split(b" ", 2)[1])
    length = 0
    for line in head[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    total = end + 4 + length
    return (status, total) if len(buf) >= total else None


#: The request id the benchmarks build their queries with. Nodes answer a repeated request
#: id (a client's retry) from their cache, so every send replaces it with a unique id of the
#: same length (:class:`FreshIds`): the Content-Length and frame length stay right.
BENCH_ID = "bench-0000000000000000"


class FreshIds:
    """The bytes of one request, each time with a request id of its own (``prefix`` keeps
    ids of different senders apart). Requests without :data:`BENCH_ID` come back as they
    are (the minimal servers' and anything that does not carry an id)."""

    def __init__(self, request: bytes, prefix: int = 0) -> None:
        self.request = request
        self.parts = request.split(BENCH_ID.encode())
        self.prefix = prefix
        self.n = 0

    def __call__(self) -> bytes:
        if len(self.parts) == 1:
            return self.request
        self.n += 1
        return f"{self.prefix:05x}-{self.n:016x}".encode().join(self.parts)


class RawHttp:
    """Blocking keep-alive client. ``roundtrip`` returns (status, body)."""

    def __init__(self, port: int, ssl_context: Any = None) -> None:
        sock = socket.create_connection((HOST, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ssl_context.wrap_socket(sock) if ssl_context is not None else sock

    def roundtrip(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        buf = b""
        while True:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
            parsed = _parse(buf)
            if parsed:
                status, total = parsed
                start = buf.find(b"\r\n\r\n") + 4 if buf[:4] == b"HTTP" else 9
                return status, buf[start:total]

    def close(self) -> None:
        self.sock.close()


def socket_timer(port: int, request: bytes, warmup: int, ssl_context: Any = None
                 ) -> tuple[Callable[[int], list[float]], RawHttp]:
    """``timer(n)``: the latencies of ``n`` requests sent one after another over one
    keep-alive connection (TLS with ``ssl_context``), checked and warmed up first.
    Close the returned client when done."""
    client = RawHttp(port, ssl_context)
    fresh = FreshIds(request, prefix=port)
    for _ in range(warmup):
        status, body = client.roundtrip(fresh())
        if status != 200:
            raise RuntimeError(f"status {status}: {body[:300]!r}")

    def timer(n: int) -> list[float]:
        samples = []
        for _ in range(n):
            body = fresh()
            t0 = time.perf_counter()
            client.roundtrip(body)
            samples.append(time.perf_counter() - t0)
        return samples

    return timer, client


# --------------------------------------------------------------------------- closed loop


class _Conn(asyncio.Protocol):
    def __init__(self, request: FreshIds, stats: dict[str, Any], stop_at: float,
                 warm_until: float, done: asyncio.Future[None]) -> None:
        self.request, self.stats, self.stop_at, self.warm_until = request, stats, stop_at, warm_until
        self.done = done
        self.buf = b""
        self.sent = 0.0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send()

    def _send(self) -> None:
        body = self.request()
        self.sent = time.perf_counter()
        self.transport.write(body)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            parsed = _parse(self.buf)
            if parsed is None:
                return
            status, total = parsed
            self.buf = self.buf[total:]
            now = time.perf_counter()
            if now >= self.warm_until:
                self.stats["status"][status] = self.stats["status"].get(status, 0) + 1
                self.stats["by_status"].setdefault(status, []).append(now - self.sent)
                if status == 200:
                    self.stats["latencies"].append(now - self.sent)
            if now >= self.stop_at:
                self.transport.close()
                if not self.done.done():
                    self.done.set_result(None)
                return
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _closed_loop(port: int, request: bytes, concurrency: int, seconds: float,
                       warmup_s: float, keep_samples: bool = False) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stats: dict[str, Any] = {"status": {}, "latencies": [], "by_status": {}}
    start = time.perf_counter()
    warm_until, stop_at = start + warmup_s, start + warmup_s + seconds
    dones = []
    for i in range(concurrency):
        done = loop.create_future()
        await loop.create_connection(
            lambda d=done, i=i: _Conn(FreshIds(request, prefix=i), stats, stop_at, warm_until,
                                      d), HOST, port)
        dones.append(done)
    await asyncio.wait_for(asyncio.gather(*dones), timeout=warmup_s + seconds + 30)
    ok = stats["status"].get(200, 0)
    return {"completed": ok, "status": {str(k): v for k, v in stats["status"].items()},
            "duration_s": seconds, "throughput_rps": round(ok / seconds, 1),
            "latency": percentiles_us(stats["latencies"]) if stats["latencies"] else {},
            "latency_by_status": {str(k): percentiles_us(v) for k, v in stats["by_status"].items()},
            **({"ok_latencies_s": stats["latencies"]} if keep_samples else {})}


def _closed_loop_child(port: int, request: bytes, concurrency: int, seconds: float,
                       warmup_s: float, keep_samples: bool, out: Any) -> None:
    import uvloop

    out.send(uvloop.run(_closed_loop(port, request, concurrency, seconds, warmup_s,
                                     keep_samples)))


def closed_loop(port: int, request: bytes, *, concurrency: int, seconds: float,
                warmup_s: float = 1.0, keep_samples: bool = False) -> dict[str, Any]:
    """Saturate a server with ``concurrency`` connections from a child process.

    ``keep_samples``: also return every answered query's latency (``ok_latencies_s``).
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_closed_loop_child,
                       args=(port, request, concurrency, seconds, warmup_s, keep_samples, child),
                       daemon=True)
    proc.start()
    try:
        if not parent.poll(warmup_s + seconds + 60):
            raise RuntimeError("load generator did not report")
        return parent.recv()
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


# --------------------------------------------------------------------------- agents


def one_node_topology(variants: list[str], *, threads: int = 1, memory_mb: int = 1024,
                      max_queue: int = 256) -> dict[str, Any]:
    return {"name": "bench",
            "hardware": {"edge-cpu": {"kind": "cpu", "threads": threads, "memory_mb": memory_mb}},
            "nodes": [{"name": "edge-1", "tier": "edge", "hardware": "edge-cpu",
                       "variants": variants, "max_queue": max_queue}]}


@contextlib.contextmanager
def start_agent(home: Path, topology: dict[str, Any], *, options: dict[str, Any] | None = None,
                timeout_s: float = 60.0, root: Path = ROOT, node: str = "edge-1",
                port: int | None = None) -> Iterator[int]:
    """A node agent process serving ``node`` of ``topology``; yields its HTTP port.

    ``root``: the checkout whose code the agent runs (another one, e.g. a git worktree
    of an older commit, makes a baseline measured in the same run). ``port``: listen
    there (its neighbours must know it before it starts); default a free one.
    """
    with agent_process(home, topology, options=options, timeout_s=timeout_s, root=root,
                       node=node, port=port) as (bound, _):
        yield bound


@contextlib.contextmanager
def agent_process(home: Path, topology: dict[str, Any], *, options: dict[str, Any] | None = None,
                  timeout_s: float = 60.0, root: Path = ROOT, node: str = "edge-1",
                  port: int | None = None, launcher: Path | None = None,
                  extra: dict[str, Any] | None = None, log_path: Path | None = None
                  ) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """:func:`start_agent` that also yields the process (to profile it by its pid).

    ``launcher``: a script run as ``launcher agent SPEC`` instead of this module (it
    wraps :func:`_agent_main`); ``extra``: more keys for its SPEC; ``log_path``: where
    the agent's output goes (default a temporary file, gone afterwards).
    """
    port = free_port() if port is None else port
    with tempfile.TemporaryDirectory(prefix="tiermesh-bench-") as tmp:
        topo = Path(tmp) / "topology.yaml"
        topo.write_text(yaml.safe_dump(topology))
        spec = {"topology": str(topo), "home": str(home), "node": node, "port": port,
                "options": options or {}, **(extra or {})}
        log_path = log_path or Path(tmp) / "agent.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed below
        script = launcher or root / "benchmarks" / "_loadgen.py"
        proc = subprocess.Popen([sys.executable, str(script), "agent", json.dumps(spec)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=root,
                                env={**os.environ, "PYTHONPATH": str(root)})
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError("agent exited: " + log_path.read_text()[-2000:])
                tls_dir = (options or {}).get("tls_dir")
                scheme, context = "http", None
                if tls_dir:  # a TLS node: ask over TLS, trusting its mesh CA
                    import ssl

                    scheme = "https"
                    context = ssl.create_default_context(cafile=str(Path(tls_dir) / "ca.pem"))
                    context.check_hostname = False
                try:
                    with urllib.request.urlopen(f"{scheme}://{HOST}:{port}/v2/health/ready",
                                                timeout=1, context=context) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("agent not ready in time")
                time.sleep(0.1)
            yield port, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def agent_options(options: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly AgentConfig overrides -> keyword arguments (``batching`` as a dict)."""
    from nodes.batching import BatchSettings

    out = dict(options)
    if isinstance(out.get("batching"), dict):
        out["batching"] = BatchSettings(**out["batching"])
    if "tls_dir" in out:  # a node's certificate directory (mesh certs issue)
        from mesh.certs import TlsFiles

        out["tls"] = TlsFiles.in_dir(out.pop("tls_dir"))
    return out


def _agent_main(spec: dict[str, Any]) -> None:
    sys.path.insert(0, str(ROOT))
    import uvloop

    from mesh.topology import load_topology
    from nodes.__main__ import serve
    from nodes.agent import AgentConfig

    config = AgentConfig(node=spec["node"], topology=load_topology(spec["topology"]),
                         home=Path(spec["home"]), host=HOST, port=spec["port"],
                         **agent_options(spec["options"]))
    uvloop.run(serve(config, f"http://{HOST}:{spec['port']}"))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "agent":
        _agent_main(json.loads(sys.argv[2]))
