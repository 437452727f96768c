"""NodeAgent: one node of the mesh.

It loads the variants its topology entry allows, keeps one :class:`Batcher`
per loaded variant, plans every query that enters the mesh here, serves it
locally or forwards it one hop along the topology path, and learns the load
of other nodes from the reports piggybacked on every answer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from mesh.errors import (
    InvalidInput,
    MeshError,
    Unavailable,
    UpstreamError,
)
from mesh.planner import Planner
from mesh.registry import Registry, TensorSpec, Variant
from mesh.runtimes import runtime_for
from mesh.state import MeshView
from mesh.store import ArtifactStore
from mesh.topology import Topology
from mesh.wire import (
    DEFAULT_MAX_ELEMENTS,
    MAX_HOPS,
    InferRequest,
    InferResponse,
    Route,
    ServedBy,
    decode_answer,
    encode_request,
)
from nodes.batching import Batcher

__all__ = ["AgentConfig", "NodeAgent"]

log = logging.getLogger("tiermesh.agent")


@dataclass(frozen=True)
class AgentConfig:
    """Everything a node agent needs, parsed once at start-up."""

    node: str
    topology: Topology
    home: Path
    #: neighbour node name -> base URL that reaches it (through the link emulator).
    neighbours: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    max_body_bytes: int = 64 * 1024 * 1024
    max_elements: int = DEFAULT_MAX_ELEMENTS
    max_rows: int = 4096
    forward_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.node not in self.topology.nodes:
            raise ValueError(
                f"node {self.node!r} is not in topology {self.topology.name!r} "
                f"(nodes: {', '.join(sorted(self.topology.nodes))})"
            )


@dataclass
class _Loaded:
    variant: Variant
    batcher: Batcher


class NodeAgent:
    """The protocol-neutral data plane of one node. An async context manager."""

    #: How many recent request latencies feed the p50/p99 in status.
    latency_window: int = 2048

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.name = config.node
        self.spec = config.topology.nodes[config.node]
        self.hardware = config.topology.hardware_of(config.node)
        self.clock = clock
        self.registry = Registry.load(config.home)
        self.store = ArtifactStore(config.home / "store")
        self.planner = Planner(config.topology, self.registry)
        self.view = MeshView()
        self.loaded: dict[str, _Loaded] = {}
        self.unavailable: dict[str, str] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{self.name}")
        self._http: aiohttp.ClientSession | None = None
        self._started = clock()
        self._latencies: collections.deque[float] = collections.deque(maxlen=self.latency_window)
        self.counters: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> NodeAgent:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.forward_timeout_s),
            connector=aiohttp.TCPConnector(limit=256),
        )
        for variant in self.planner.hosted(self.name):
            await self._load(variant)
        self.view.report(self.name, 0, self.clock(), loaded=frozenset(self.loaded),
                         failed=frozenset(self.unavailable))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for loaded in self.loaded.values():
            await loaded.batcher.__aexit__(None, None, None)
        self.loaded.clear()
        if self._http is not None:
            await self._http.close()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _load(self, variant: Variant) -> None:
        try:
            if not self.store.verify(variant.sha256):
                raise Unavailable(f"artifact {variant.sha256[:12]} is missing or corrupt")
            runtime = runtime_for(variant.format)
            path = str(self.store.path(variant.sha256))
            loop = asyncio.get_running_loop()
            session = await loop.run_in_executor(
                self._executor, lambda: runtime.load(path, threads=self.hardware.threads))
        except Exception as exc:  # one bad variant must not stop the node
            reason = exc.message if isinstance(exc, MeshError) else f"{type(exc).__name__}: {exc}"
            self.unavailable[variant.name] = reason
            log.warning("variant %s unavailable: %s", variant.name, reason)
            return
        batcher = Batcher(variant.name, lambda inputs: runtime.run(session, inputs),
                          self._executor, max_batch=variant.max_batch,
                          max_queue=self.spec.max_queue)
        await batcher.__aenter__()
        self.loaded[variant.name] = _Loaded(variant, batcher)

    # ------------------------------------------------------------------ serving
    @property
    def queue_depth(self) -> int:
        return sum(entry.batcher.depth for entry in self.loaded.values())

    async def infer(self, req: InferRequest) -> InferResponse:
        started = time.perf_counter()
        self.counters["requests"] += 1
        try:
            response = await self._infer(req)
        except MeshError as exc:
            self.counters[f"error:{type(exc).__name__}"] += 1
            raise
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._latencies.append(elapsed_ms)
        response.timing["hop_total_ms"] = elapsed_ms
        response.loads[self.name] = float(self.queue_depth)
        return response

    async def _infer(self, req: InferRequest) -> InferResponse:
        if req.hops >= MAX_HOPS:
            raise InvalidInput(f"hops: query crossed {req.hops} nodes; refusing to forward a loop")
        inputs = self._check_inputs(req.task, req.tensors)
        plan: dict[str, Any] = {}
        if req.route is None:
            decision = self.planner.plan(
                req.task, req.slo, self.name, self.view, now=self.clock(),
                rows=int(inputs[0].shape[0]), payload_bytes=req.payload_bytes)
            req.route = Route(decision.node, decision.variant)
            plan = decision.to_dict()
            if req.slo.latency_ms is not None:
                req.budget_ms = req.slo.latency_ms
        if req.route.node == self.name:
            response = await self._serve_local(req.request_id, req.route.variant, inputs)
        else:
            response = await self._forward(req)
        if plan:
            response.plan = plan
        return response

    def _check_inputs(self, task: str, tensors: list[np.ndarray]) -> list[np.ndarray]:
        specs: tuple[TensorSpec, ...] = self.registry.for_task(task)[0].inputs
        if len(tensors) != len(specs):
            names = ", ".join(s.name for s in specs)
            raise InvalidInput(
                f"tensors: task {task!r} takes {len(specs)} input tensor(s) ({names}), got {len(tensors)}")
        rows = None
        for i, (tensor, spec) in enumerate(zip(tensors, specs, strict=False)):
            want = _shape_text(spec.shape)
            if tensor.dtype.name != spec.dtype:
                raise InvalidInput(
                    f"tensors[{i}].dtype: task {task!r} takes {spec.dtype} {want}, got {tensor.dtype.name}")
            if tensor.ndim != len(spec.shape) or any(
                    d != -1 and d != s for d, s in zip(spec.shape, tensor.shape, strict=False)):
                raise InvalidInput(
                    f"tensors[{i}].shape: task {task!r} takes {want}, got {list(tensor.shape)}")
            n = int(tensor.shape[0]) if tensor.ndim else 0
            if n < 1 or n > self.config.max_rows:
                raise InvalidInput(
                    f"tensors[{i}].shape[0]: batch of {n} rows; send 1 to {self.config.max_rows}")
            if rows is not None and n != rows:
                raise InvalidInput(f"tensors[{i}].shape[0]: {n} rows but tensors[0] has {rows}")
            rows = n
        return tensors

    async def _serve_local(self, request_id: str, variant: str, inputs: list[np.ndarray]
                           ) -> InferResponse:
        entry = self.loaded.get(variant)
        if entry is None:
            reason = self.unavailable.get(variant, "not hosted here")
            raise Unavailable(f"variant {variant} is not available on {self.name}: {reason}")
        result = await entry.batcher.submit(inputs)
        self.counters["served_local"] += 1
        return InferResponse(
            request_id=request_id,
            outputs=result.outputs,
            served_by=ServedBy(self.name, self.spec.tier, variant),
            timing={"queue_ms": result.queue_ms, "compute_ms": result.compute_ms,
                    "batch_rows": float(result.batch_rows), "network_ms": 0.0},
        )

    async def _forward(self, req: InferRequest) -> InferResponse:
        assert req.route is not None and self._http is not None
        target = req.route.node
        hop = self.config.topology.next_hop(self.name, target)
        if hop is None or hop not in self.config.neighbours:
            raise Unavailable(f"no path from {self.name} to {target}")
        req.hops += 1
        url = self.config.neighbours[hop] + "/v1/infer"
        sent = time.perf_counter()
        try:
            async with self._http.post(url, data=encode_request(req),
                                       headers={"Content-Type": "application/msgpack"}) as resp:
                body = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.view.mark_down(hop, self.clock())
            raise UpstreamError(f"forwarding to {hop} failed: {type(exc).__name__}") from None
        rtt_ms = (time.perf_counter() - sent) * 1000
        self.counters[f"forwarded:{hop}"] += 1
        response = decode_answer(status, body)
        downstream_ms = response.timing.get("hop_total_ms", 0.0)
        response.timing["network_ms"] = response.timing.get("network_ms", 0.0) + max(
            rtt_ms - downstream_ms, 0.0)
        now = self.clock()
        for node, depth in response.loads.items():
            self.view.report(node, int(depth), now)
        return response

    # ------------------------------------------------------------------ status
    def status(self, address: str = "") -> dict[str, Any]:
        lat = sorted(self._latencies)
        variants = [
            {"name": name, "loaded": True, "queue_depth": e.batcher.depth,
             "served": e.batcher.served, "batches": e.batcher.batches}
            for name, e in sorted(self.loaded.items())
        ] + [
            {"name": name, "loaded": False, "error": reason}
            for name, reason in sorted(self.unavailable.items())
        ]
        forwarded = {k.split(":", 1)[1]: v for k, v in self.counters.items()
                     if k.startswith("forwarded:")}
        errors = {k.split(":", 1)[1]: v for k, v in self.counters.items() if k.startswith("error:")}
        return {
            "node": self.name,
            "tier": self.spec.tier,
            "hardware": self.spec.hardware,
            "address": address,
            "topology": self.config.topology.name,
            "uptime_s": round(self.clock() - self._started, 3),
            "variants": variants,
            "queue_depth": self.queue_depth,
            "requests": self.counters["requests"],
            "served_local": self.counters["served_local"],
            "forwarded": forwarded,
            "errors": errors,
            "latency_ms": {"p50": _percentile(lat, 0.50), "p99": _percentile(lat, 0.99)},
            "view": self.view.snapshot(self.clock()),
        }


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("N" if d == -1 else str(d) for d in shape) + "]"


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    index = min(int(q * len(ordered)), len(ordered) - 1)
    return round(ordered[index], 3)
