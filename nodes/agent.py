"""NodeAgent: one node of the mesh.

It hosts the variants its topology entry allows through a
:class:`~nodes.models.ModelManager` (memory budget, loading on demand, one
deadline-aware :class:`~nodes.batching.Batcher` per loaded variant), plans
every query that enters the mesh here, serves it locally or forwards it one
hop along the topology path, and learns the load of other nodes from the
reports piggybacked on every answer.

Deadlines: a query planned here with a feasible latency target gets a
budget (``budget_ms``, what is left of the target). Every hop spends its own
time and reserves the link's round trip before forwarding; the serving node's
batcher refuses at once (:class:`~mesh.errors.CannotMeetDeadline`) a query
its queue would make late, and the entry node then hands it to the next
feasible candidate, once. A query nothing can serve in time is planned
best-effort, without a budget, so it is still answered.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from mesh.errors import (
    CannotMeetDeadline,
    InvalidInput,
    MeshError,
    Overloaded,
    Unavailable,
    UpstreamError,
)
from mesh.planner import Planner
from mesh.registry import Registry, TensorSpec
from mesh.state import MeshView
from mesh.store import ArtifactStore
from mesh.topology import Topology
from mesh.wire import (
    ALLOWED_DTYPES,
    DEFAULT_MAX_ELEMENTS,
    MAX_HOPS,
    InferRequest,
    InferResponse,
    Route,
    ServedBy,
    decode_answer,
    encode_request,
)
from nodes.artifacts import ArtifactSource, parent_of
from nodes.cascade import run_cascade
from nodes.forward import HopFailed, Neighbours
from nodes.metrics import NodeMetrics, outcome_of
from nodes.models import ModelConfig, ModelManager

__all__ = ["AgentConfig", "NodeAgent"]

log = logging.getLogger("tiermesh.agent")


class _HopDown(UpstreamError):
    """This node's own next hop failed (not an error passed up from further away)."""

    def to_payload(self) -> dict[str, Any]:
        return super().to_payload() | {"type": "UpstreamError"}  # callers see the public class


@dataclass(frozen=True)
class AgentConfig:
    """Everything a node agent needs, parsed once at start-up."""

    node: str
    topology: Topology
    home: Path
    #: neighbour node name -> base URL that reaches it (through the link emulator).
    neighbours: Mapping[str, str] = field(default_factory=dict)
    #: neighbour node name -> ``tcp://HOST:PORT`` of its msgpack stream (through the link
    #: emulator); queries to these go over one persistent stream, to the others over HTTP.
    stream_neighbours: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    max_body_bytes: int = 64 * 1024 * 1024
    max_elements: int = DEFAULT_MAX_ELEMENTS
    max_rows: int = 4096
    forward_timeout_s: float = 30.0
    #: a variant's memory estimate, when its profile has no peak memory: file size x this
    memory_size_factor: float = 3.0
    #: caps every variant's max_batch (1 turns batching off)
    max_batch: int | None = None
    #: longest a query without a latency SLO waits for its batch to fill
    max_wait_ms: float = 2.0
    #: batches predicted faster than this run on the event loop thread, without a thread hop
    inline_max_ms: float = 0.1
    #: port of the msgpack stream (mesh.stream); None: HTTP only, 0: any free port
    stream_port: int | None = None

    def __post_init__(self) -> None:
        if self.node not in self.topology.nodes:
            raise ValueError(
                f"node {self.node!r} is not in topology {self.topology.name!r} "
                f"(nodes: {', '.join(sorted(self.topology.nodes))})"
            )
        unknown = sorted(set(self.stream_neighbours) - set(self.neighbours))
        if unknown:
            raise ValueError(f"stream_neighbours: {', '.join(unknown)} have no HTTP URL in "
                             "neighbours; every neighbour needs one (status, artifacts, heartbeats)")


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
        self.metrics = NodeMetrics()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{self.name}")
        self._http: aiohttp.ClientSession | None = None
        self.neighbours = Neighbours(config.neighbours, config.stream_neighbours,
                                     http=lambda: self._http, timeout_s=config.forward_timeout_s)
        parent = parent_of(config.topology, config.node)
        self.artifacts = ArtifactSource(
            self.store, known=lambda: {v.sha256 for v in self.registry.variants.values()},
            parent=parent, parent_url=config.neighbours.get(parent) if parent else None,
            http=lambda: self._http, on_fetch=self.metrics.fetched)
        self.models = ModelManager(
            ModelConfig(budget_bytes=self.hardware.memory_mb * 1024 * 1024,
                        threads=self.hardware.threads, profile_key=self.hardware.profile_key,
                        max_queue=self.spec.max_queue, size_factor=config.memory_size_factor,
                        max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                        inline_max_ms=config.inline_max_ms,
                        profile_cache=config.home / "profiles"),
            {v.name: v for v in self.registry.variants.values() if self.spec.allows(v.name)},
            self.artifacts, self._executor, metrics=self.metrics, on_change=self._report_self,
            clock=clock)
        self.metrics.watch(self.models.gauges, lambda: self.models.config.budget_bytes)
        #: task -> its input specs (the hot path must not scan the registry)
        self._inputs: dict[str, tuple[TensorSpec, ...]] = {}
        self.ready = False
        self._started = clock()
        self._latencies: collections.deque[float] = collections.deque(maxlen=self.latency_window)
        self.counters: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> NodeAgent:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.forward_timeout_s),
            connector=aiohttp.TCPConnector(limit=256),
        )
        try:
            await self.neighbours.__aenter__()
            await self.models.__aenter__()
            # A hardware class with no profile: measure here before advertising anything.
            for name, profile in (await self.models.profile_missing()).items():
                variant = self.registry.variants[name]
                self.registry.add(replace(variant, profiles={**variant.profiles,
                                                             self.hardware.profile_key: profile}))
            await self.models.preload(v.name for v in self.planner.hosted(self.name))
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        self._report_self()
        self.ready = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.ready = False
        await self.neighbours.aclose()
        await self.models.__aexit__(None, None, None)
        await self.artifacts.aclose()
        if self._http is not None:
            await self._http.close()
            self._http = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def loaded(self) -> Mapping[str, Any]:
        """Variants loaded now, by name."""
        return self.models.loaded

    @property
    def unavailable(self) -> Mapping[str, str]:
        """Variants that cannot run here, with the reason."""
        return self.models.unavailable

    def _report_self(self) -> None:
        self.view.report(self.name, self.queue_depth, self.clock(),
                         loaded=frozenset(self.models.loaded),
                         failed=frozenset(self.models.unavailable))

    # ------------------------------------------------------------------ serving
    @property
    def queue_depth(self) -> int:
        return sum(entry.batcher.depth for entry in self.models.loaded.values())

    async def infer(self, req: InferRequest) -> InferResponse:
        started = time.perf_counter()
        self.counters["requests"] += 1
        try:
            response = await self._infer(req, started)
        except Exception as exc:
            if isinstance(exc, MeshError):
                self.counters[f"error:{type(exc).__name__}"] += 1
            self._observe(req, None, exc, started)
            raise
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._latencies.append(elapsed_ms)
        response.timing["hop_total_ms"] = elapsed_ms
        response.loads[self.name] = float(self.queue_depth)
        self._observe(req, response, None, started)
        return response

    def _observe(self, req: InferRequest, response: InferResponse | None,
                 error: BaseException | None, started: float) -> None:
        task = req.task if req.task in self._inputs else "(unknown)"
        if response is not None:
            variant, tier = response.served_by.variant, response.served_by.tier
        elif req.route is not None:
            variant = req.route.variant
            tier = self.config.topology.nodes[req.route.node].tier \
                if req.route.node in self.config.topology.nodes else ""
        else:
            variant = tier = ""
        self.metrics.request(task, variant, tier, outcome_of(error), time.perf_counter() - started)

    async def _infer(self, req: InferRequest, arrived: float) -> InferResponse:
        if req.hops >= MAX_HOPS:
            raise InvalidInput(f"hops: query crossed {req.hops} nodes; refusing to forward a loop")
        inputs = self._check_inputs(req.task, req.tensors)
        plan: dict[str, Any] = {}
        if req.route is not None and req.route.node != self.name and self.view.is_down(
                req.route.node, self.clock()):
            req.route = None  # this node knows the planned one is down: re-plan from here
        if req.route is None:
            decision = self.planner.plan(
                req.task, req.slo, self.name, self.view, now=self.clock(),
                rows=int(inputs[0].shape[0]), payload_bytes=req.payload_bytes)
            req.route = Route(decision.node, decision.variant)
            plan = decision.to_dict()
            if req.slo.latency_ms is not None and not req.slo.offline:
                # a target nothing can meet is served best-effort: no deadline to refuse by
                req.budget_ms = req.slo.latency_ms if decision.feasible else None
            if decision.escalation is not None:  # cascade: answer here, unsure rows upstream
                return await run_cascade(self.infer, req, decision, plan)
        budget_ms, hops = req.budget_ms, req.hops
        try:
            response = await self._dispatch(req, inputs, arrived)
        except (CannotMeetDeadline, Overloaded) as exc:
            if not plan:  # only the entry node re-places a query, and only once
                raise
            req.budget_ms, req.hops = budget_ms, hops  # as they were before the refused attempt
            response = await self._hand_back(req, inputs, arrived, exc, plan)
        except _HopDown as exc:
            # Any node whose own next hop died re-plans, once: its view now counts everything
            # behind that hop as down, and inference has no side effects to repeat.
            req.budget_ms, req.hops = budget_ms, hops
            response = await self._route_around(req, inputs, arrived, exc, plan)
        if plan:
            response.plan = plan
        return response

    async def _dispatch(self, req: InferRequest, inputs: list[np.ndarray], arrived: float
                        ) -> InferResponse:
        assert req.route is not None
        if req.route.node == self.name:
            left_ms = None if req.budget_ms is None else (
                req.budget_ms - (time.perf_counter() - arrived) * 1000)
            return await self._serve_local(req.request_id, req.route.variant, inputs, left_ms)
        return await self._forward(req, arrived)

    async def _hand_back(self, req: InferRequest, inputs: list[np.ndarray], arrived: float,
                         refused: MeshError, plan: dict[str, Any]) -> InferResponse:
        """Place a query its first choice refused on the next feasible candidate, or re-raise."""
        assert req.route is not None
        first = req.route
        if first.node == self.name:
            self._report_self()
        decision = self.planner.plan(req.task, req.slo, self.name, self.view, now=self.clock(),
                                     rows=int(inputs[0].shape[0]),
                                     payload_bytes=req.payload_bytes, explain=True)
        for scored in decision.candidates:
            c = scored.candidate
            if scored.feasible and (c.node, c.variant) != (first.node, first.variant):
                break
        else:
            raise refused
        log.info("%s/%s refused %s (%s); handing it to %s/%s", first.node, first.variant,
                 req.request_id, type(refused).__name__, c.node, c.variant)
        req.route = Route(c.node, c.variant)
        plan.update(node=c.node, tier=c.tier, variant=c.variant, accuracy=c.accuracy,
                    predicted=scored.prediction.to_dict(),
                    handed_back={"node": first.node, "variant": first.variant,
                                 "reason": refused.message})
        return await self._dispatch(req, inputs, arrived)

    async def _route_around(self, req: InferRequest, inputs: list[np.ndarray], arrived: float,
                            failed: _HopDown, plan: dict[str, Any]) -> InferResponse:
        """Plan a query again after its next hop failed; re-raise when nothing else is left."""
        assert req.route is not None
        first = req.route
        decision = self.planner.plan(req.task, req.slo, self.name, self.view, now=self.clock(),
                                     rows=int(inputs[0].shape[0]),
                                     payload_bytes=req.payload_bytes)
        if (decision.node, decision.variant) == (first.node, first.variant):
            raise failed
        log.info("%s: %s; serving %s on %s/%s instead", self.name, failed.message,
                 req.request_id, decision.node, decision.variant)
        req.route = Route(decision.node, decision.variant)
        if plan:
            plan.update(decision.to_dict(), handed_back={
                "node": first.node, "variant": first.variant, "reason": failed.message})
            if req.slo.latency_ms is not None and not req.slo.offline:
                left = req.slo.latency_ms - (time.perf_counter() - arrived) * 1000
                req.budget_ms = left if decision.feasible else None
        return await self._dispatch(req, inputs, arrived)

    def input_specs(self, task: str) -> tuple[TensorSpec, ...]:
        """The inputs a task takes; raises :class:`UnknownTask`."""
        specs = self._inputs.get(task)
        if specs is None:
            specs = self.registry.for_task(task)[0].inputs
            self._inputs[task] = specs
        return specs

    def _check_inputs(self, task: str, tensors: list[np.ndarray]) -> list[np.ndarray]:
        specs = self.input_specs(task)
        if len(tensors) != len(specs):
            names = ", ".join(s.name for s in specs)
            raise InvalidInput(
                f"tensors: task {task!r} takes {len(specs)} input tensor(s) ({names}), got {len(tensors)}")
        rows = None
        for i, (tensor, spec) in enumerate(zip(tensors, specs, strict=False)):
            # dtype objects compare in C; dtype.name is a slow Python property
            if tensor.dtype != _DTYPES[spec.dtype]:
                raise InvalidInput(f"tensors[{i}].dtype: task {task!r} takes {spec.dtype} "
                                   f"{_shape_text(spec.shape)}, got {tensor.dtype.name}")
            if tensor.ndim != len(spec.shape) or any(
                    d != -1 and d != s for d, s in zip(spec.shape, tensor.shape, strict=False)):
                raise InvalidInput(f"tensors[{i}].shape: task {task!r} takes "
                                   f"{_shape_text(spec.shape)}, got {list(tensor.shape)}")
            n = int(tensor.shape[0]) if tensor.ndim else 0
            if n < 1 or n > self.config.max_rows:
                raise InvalidInput(
                    f"tensors[{i}].shape[0]: batch of {n} rows; send 1 to {self.config.max_rows}")
            if rows is not None and n != rows:
                raise InvalidInput(f"tensors[{i}].shape[0]: {n} rows but tensors[0] has {rows}")
            rows = n
        return tensors

    async def _serve_local(self, request_id: str, variant: str, inputs: list[np.ndarray],
                           budget_ms: float | None = None) -> InferResponse:
        entry = self.models.get(variant)
        if entry is None or not entry.batcher.running:
            entry = await self.models.acquire(variant)  # loads it (one load however many wait)
            if not entry.batcher.running:  # evicted before this request got to it
                entry = await self.models.acquire(variant)
        result = await entry.batcher.submit(inputs, budget_ms=budget_ms)
        self.counters["served_local"] += 1
        return InferResponse(
            request_id=request_id,
            outputs=result.outputs,
            served_by=ServedBy(self.name, self.spec.tier, variant),
            timing={"queue_ms": result.queue_ms, "compute_ms": result.compute_ms,
                    "batch_rows": float(result.batch_rows), "network_ms": 0.0},
        )

    async def _forward(self, req: InferRequest, arrived: float) -> InferResponse:
        assert req.route is not None and self._http is not None
        target = req.route.node
        hop = self.config.topology.next_hop(self.name, target)
        if hop is None or hop not in self.config.neighbours:
            raise Unavailable(f"no path from {self.name} to {target}")
        req.hops += 1
        if req.budget_ms is not None:
            # what is left once this hop's time and the link's round trip are paid
            link_ms = self.config.topology.link(self.name, hop).latency_ms
            req.budget_ms -= (time.perf_counter() - arrived) * 1000 + 2 * link_ms
        self.metrics.forwarded(target, hop)
        sent = time.perf_counter()
        try:
            status, body = await self.neighbours.post(hop, encode_request(req))
        except HopFailed as exc:
            # Everything behind a dead hop is unreachable too, until a fresh report says
            # otherwise; the planner then routes around it instead of failing again.
            now = self.clock()
            for node in self.config.topology.behind(self.name, hop):
                self.view.mark_down(node, now)
            raise _HopDown(f"forwarding to {hop} failed: {exc.reason}") from None
        rtt_ms = (time.perf_counter() - sent) * 1000
        self.counters[f"forwarded:{hop}"] += 1
        self.counters[f"via:{self.neighbours.transport(hop)}"] += 1
        response = decode_answer(status, body)
        downstream_ms = response.timing.get("hop_total_ms", 0.0)
        response.timing["network_ms"] = response.timing.get("network_ms", 0.0) + max(
            rtt_ms - downstream_ms, 0.0)
        now = self.clock()
        for node, depth in response.loads.items():
            self.view.report(node, int(depth), now)
        return response

    # ------------------------------------------------------------------ status
    def status(self, address: str = "", stream_address: str | None = None) -> dict[str, Any]:
        lat = sorted(self._latencies)
        variants: list[dict[str, Any]] = []
        for name in sorted(self.models.variants):
            state = self.models.state_of(name)
            row: dict[str, Any] = {"name": name, "loaded": state == "loaded", "state": state}
            entry = self.models.loaded.get(name)
            if entry is not None:
                row.update(queue_depth=entry.batcher.depth, served=entry.batcher.served,
                           batches=entry.batcher.batches, memory_bytes=entry.memory_bytes)
            if state == "unavailable":
                row["error"] = self.models.unavailable[name]
            variants.append(row)
        forwarded = {k.split(":", 1)[1]: v for k, v in self.counters.items()
                     if k.startswith("forwarded:")}
        errors = {k.split(":", 1)[1]: v for k, v in self.counters.items() if k.startswith("error:")}
        via = {k.split(":", 1)[1]: v for k, v in self.counters.items() if k.startswith("via:")}
        return {
            "node": self.name,
            "tier": self.spec.tier,
            "hardware": self.spec.hardware,
            "address": address,
            "stream_address": stream_address,
            "topology": self.config.topology.name,
            "uptime_s": round(self.clock() - self._started, 3),
            "ready": self.ready,
            "variants": variants,
            "memory": {"budget_bytes": self.models.config.budget_bytes,
                       "used_bytes": self.models.memory_used},
            "artifacts": {"parent": self.artifacts.parent, "fetches": dict(self.artifacts.fetches)},
            "queue_depth": self.queue_depth,
            "requests": self.counters["requests"],
            "served_local": self.counters["served_local"],
            "forwarded": forwarded,
            #: forwarded queries by transport ("stream", "http"); neighbour -> transport
            "forwarded_via": via,
            "neighbour_transports": {n: self.neighbours.transport(n)
                                     for n in sorted(self.config.neighbours)},
            "errors": errors,
            "latency_ms": {"p50": _percentile(lat, 0.50), "p99": _percentile(lat, 0.99)},
            "view": self.view.snapshot(self.clock()),
        }


_DTYPES: dict[str, np.dtype[Any]] = {name: np.dtype(name) for name in ALLOWED_DTYPES}


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("N" if d == -1 else str(d) for d in shape) + "]"


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    index = min(int(q * len(ordered)), len(ordered) - 1)
    return round(ordered[index], 3)
