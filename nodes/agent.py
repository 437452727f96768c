"""NodeAgent: one node of the mesh.

It hosts the variants its topology entry allows through a
:class:`~nodes.models.ModelManager` (memory budget, loading on demand, one
deadline-aware :class:`~nodes.batching.Batcher` per loaded variant), plans
every query that enters the mesh here, serves it locally or forwards it one
hop along the topology path, and learns the load of other nodes from the
reports piggybacked on every answer.

Who may say where a query runs: only mesh nodes. A client's query that
carries a ``route`` is refused (:class:`~mesh.errors.Forbidden`); a route from
a neighbour that proved itself (:mod:`nodes.peers`) is honoured only for a
variant of the query's task that the named node hosts.

Deadlines: a query planned here with a feasible latency target gets a
budget (``budget_ms``, what is left of the target). Every hop spends its own
time and reserves the link's round trip before forwarding; the serving node's
batcher refuses at once (:class:`~mesh.errors.CannotMeetDeadline`) a query
its queue would make late, and the entry node then hands it to the next
feasible candidate, once. A query whose latency target nothing can meet is
refused at the entry at once, unless its SLO says ``allow_degraded``: then it
is served best-effort, without a budget, and its answer says the SLO was not
met. Every hop also bounds how long it waits for the next one: from the
query's budget (at least ``min_hop_timeout_ms``) and half of what is left of
the caller's ``timeout_ms``, so a node that gives up on a frozen hop still has
time to plan the query once around it before its own caller gives up.

The answer's ``plan`` describes what served the query: when a node further
along planned again, its decision replaces the entry's, and the accuracy and
feasibility are those of the variant that ran.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from mesh.accuracy import LiveAccuracy
from mesh.certs import TlsFiles
from mesh.errors import (
    AnswerNotFound,
    CannotMeetDeadline,
    Forbidden,
    InvalidInput,
    MeshError,
    Overloaded,
    Unavailable,
    UnknownTask,
    UpstreamError,
)
from mesh.health import Ejection, OutlierDetector, RetryBudget
from mesh.placement import Hosting, LoadMeter, Placement, PlacementDecision, VariantLoad
from mesh.placement.machines import Machine, node_slots
from mesh.placement.resources import NodeResources
from mesh.plan import Detour, Plan
from mesh.planner import Decision, Planner
from mesh.registry import Registry, TensorSpec
from mesh.runtimes import runtime_for
from mesh.state import MeshView
from mesh.store import ArtifactStore
from mesh.tenants import Identity, ReplayGuard, Tenancy
from mesh.topology import Topology
from mesh.transport import Transport
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
from nodes.artifacts import ArtifactSource, PullPolicy, parent_of
from nodes.batching import BatchSettings
from nodes.cascade import run_cascade
from nodes.forward import HopFailed, Neighbours
from nodes.identity import Callers
from nodes.machine import measure_machine
from nodes.membership import LocalLoad
from nodes.metrics import NodeMetrics, outcome_of
from nodes.models import LoadedVariant, ModelConfig, ModelManager, RuntimeLookup
from nodes.peers import PeerKey
from nodes.placement import PlacementControl
from nodes.registry_sync import RegistrySync
from nodes.tasks import cancel_all

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
    #: ceiling on the body cap; the cap itself is the largest valid query of the tasks the
    #: mesh serves at max_rows rows (nodes.limits.body_caps), usually far below this
    max_body_bytes: int = 64 * 1024 * 1024
    max_elements: int = DEFAULT_MAX_ELEMENTS
    max_rows: int = 4096
    #: bytes of large bodies (over large_body_bytes) read and decoded at once, over all
    #: connections; a large query over it is refused 429 instead of buffered
    max_buffered_body_bytes: int = 64 * 1024 * 1024
    large_body_bytes: int = 256 * 1024
    #: a connection (HTTP or stream) with nothing in flight is closed after this long; an
    #: HTTP request's headers must come within it too. Proven neighbours' streams stay open.
    idle_timeout_s: float = 60.0
    #: a request body, or a stream frame once begun, must arrive within this
    read_timeout_s: float = 30.0
    #: queries one stream connection may have open; at the limit the node stops reading it
    stream_max_in_flight: int = 1024
    #: answers (bytes) a stream connection has not read yet, over which the node stops
    #: reading its queries until it reads them
    stream_max_unread_bytes: int = 1024 * 1024
    #: longest a node waits for a neighbour's answer (queries' own deadlines are shorter)
    forward_timeout_s: float = 10.0
    #: a hop is given up no sooner than this, however tight the query's latency budget
    min_hop_timeout_ms: float = 250.0
    #: the mesh's shared peer key (nodes.peers); None: ``<home>/mesh.key``, created if missing
    mesh_key: bytes | None = None
    #: a variant's memory estimate, when its profile has no peak memory: file size x this
    memory_size_factor: float = 3.0
    #: how every variant loaded here batches and admits (nodes.batching.BatchSettings)
    batching: BatchSettings = BatchSettings()
    #: port of the msgpack stream (mesh.stream); None: HTTP only, 0: any free port
    stream_port: int | None = None
    #: the node's certificate, key and mesh CA (mesh.certs): every hop to and from other
    #: nodes over mutual TLS, nodes known by certificate. None: plain TCP, nodes known by
    #: the mesh key's tokens (loopback only, unless allow_insecure)
    tls: TlsFiles | None = None
    #: serve a non-loopback address without TLS (anyone on the network could pose as a node)
    allow_insecure: bool = False

    def __post_init__(self) -> None:
        if self.node not in self.topology.nodes:
            raise ValueError(
                f"node {self.node!r} is not in topology {self.topology.name!r} "
                f"(nodes: {', '.join(sorted(self.topology.nodes))})"
            )
        for name in ("max_body_bytes", "max_buffered_body_bytes", "large_body_bytes",
                     "idle_timeout_s", "read_timeout_s", "stream_max_in_flight",
                     "stream_max_unread_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)!r}")
        if self.max_buffered_body_bytes < self.large_body_bytes:
            raise ValueError("max_buffered_body_bytes must be at least large_body_bytes")
        unknown = sorted(set(self.stream_neighbours) - set(self.neighbours))
        if unknown:
            raise ValueError(f"stream_neighbours: {', '.join(unknown)} have no HTTP URL in "
                             "neighbours; every neighbour needs one (status, artifacts, heartbeats)")

    @classmethod
    def from_topology(cls, topology: Topology, node: str, home: Path, **options: Any
                      ) -> AgentConfig:
        """The config of ``node`` from the topology alone: where it listens and where its
        neighbours are, from their ``address`` entries (``mesh node run``).

        Raises ``ValueError`` naming the node or neighbour that has no address.
        """
        me, neighbours = topology.addresses_for(node)
        return cls(node=node, topology=topology, home=home,
                   neighbours={n: a.http_url for n, a in neighbours.items()},
                   stream_neighbours={n: a.stream_url for n, a in neighbours.items()},
                   host=me.bind_host, port=me.http_port, stream_port=me.stream_port, **options)


class NodeAgent:
    """The protocol-neutral data plane of one node. An async context manager."""

    #: How many recent request latencies feed the p50/p99 in status.
    latency_window: int = 2048

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.monotonic,
                 transports: Mapping[str, Transport] | None = None,
                 runtimes: RuntimeLookup = runtime_for,
                 placement_clock: Callable[[], float] = time.time,
                 machine: Machine | None = None) -> None:
        """``transports``: how to reach some neighbours (tests: in-memory ones to other
        agents); the others from their URLs. ``runtimes``: format -> runtime (tests wrap
        the real ones). ``placement_clock``: the time placement rounds are decided at (the
        wall clock: forecasts learn the day; tests: one they move). ``machine``: the CPUs
        and host this node reports to placement (default: measured here, :mod:`nodes.machine`)."""
        self.config = config
        self.name = config.node
        self.spec = config.topology.nodes[config.node]
        self.hardware = config.topology.hardware_of(config.node)
        self.clock = clock
        self.registry = Registry.load(config.home)
        self.store = ArtifactStore(config.home / "store")
        self.planner = self._planner(self.registry, None)
        self.view = MeshView()
        self.metrics = NodeMetrics()
        #: the CPUs this node really has and the host it shares them on, for placement
        #: (the declared class says ``cores``; several nodes may share one machine)
        self.machine = machine if machine is not None else measure_machine()
        # One compute worker per `threads` of the class's cores, capped by the CPUs the node
        # really has (at least one): batches of different variants run side by side where the
        # hardware allows; each variant still runs one batch at a time (its Batcher).
        self.compute_workers = node_slots(NodeResources.of(self.hardware), self.machine)
        self._executor = ThreadPoolExecutor(max_workers=self.compute_workers,
                                            thread_name_prefix=f"compute-{self.name}")
        self._http: aiohttp.ClientSession | None = None
        self.peers = PeerKey(config.mesh_key) if config.mesh_key is not None else \
            PeerKey.for_home(config.home)
        #: this node's side of mutual TLS to other nodes (None: plain TCP)
        self.tls_client = config.tls.client_context() if config.tls is not None else None
        #: who calls: nodes (by certificate with TLS, else by token) or clients
        self.callers = Callers.for_agent(self)
        self.neighbours = Neighbours(config.neighbours, config.stream_neighbours,
                                     timeout_s=config.forward_timeout_s,
                                     headers=self.callers.headers(self.name),
                                     hello=self.callers.hello(self.name), transports=transports,
                                     ssl=self.tls_client)
        parent = parent_of(config.topology, config.node)
        policy = PullPolicy(config.topology, config.node, self.registry.variants.values(),
                            hosts=self.planner.hosting.allows)
        self.artifacts = ArtifactSource(
            self.store, known=policy.hosted,  # pulls for itself only what it hosts
            parent=parent, parent_url=config.neighbours.get(parent) if parent else None,
            http=lambda: self._http, on_fetch=self.metrics.fetched, policy=policy,
            neighbour_urls=config.neighbours, pull_headers=self.callers.headers(self.name),
            ssl=self.tls_client)
        #: what placement is told: per variant served here and per task entering here
        self.meter = LoadMeter(half_life_s=min(max(config.topology.placement.interval_s / 2,
                                                   0.5), 30.0))
        self.models = ModelManager(
            ModelConfig(budget_bytes=self.hardware.memory_mb * 1024 * 1024,
                        threads=self.hardware.threads, profile_key=self.hardware.profile_key,
                        max_queue=self.spec.max_queue, size_factor=config.memory_size_factor,
                        batching=config.batching,
                        profile_cache=config.home / "profiles",
                        isolated_tenants=frozenset(
                            t.name for t in config.topology.tenants.values() if not t.share_base)),
            {v.name: v for v in self.registry.variants.values()
             if self.planner.hosting.allows(self.name, v.name)},
            self.artifacts, self._executor, metrics=self.metrics, on_change=self._report_self,
            clock=clock, runtimes=runtimes, on_batch=self.meter.computed,
            bases=lambda name: self.registry.variants.get(name),
            heads_on=lambda name: any(v.base == name for v in self.registry.variants.values()))
        self.metrics.watch(self.models.gauges, lambda: self.models.config.budget_bytes)
        self.metrics.tenant_usage = lambda: self.tenancy.usage
        self.registry_sync = RegistrySync(
            self, parent_url=self.artifacts.parent_url,  # https:// with TLS
            session=lambda: self._http)
        self._adopting: asyncio.Task[None] | None = None
        #: a variant loading in the background because queries would prefer it warm
        self._warming: asyncio.Task[None] | None = None
        self._warm_checked: dict[str, float] = {}  # task -> when it was last looked at
        #: loads already counted as cold starts hidden (the placement's preload and a
        #: query's background warm-up may both wait for one load)
        self._counted_ahead: weakref.WeakSet[LoadedVariant] = weakref.WeakSet()
        #: queries in progress on this node (one alone needs no batching)
        self._active = 0
        self._reported_depth = -1  # the own queue depth last put in the view, and when
        self._reported_at = 0.0
        #: ground truth from applications, per variant (client.feedback)
        self.live = LiveAccuracy()
        self._planned_accuracy: dict[str, float] = {}
        #: request id -> (variant, answer, the query's fingerprint)
        self._answered: collections.OrderedDict[
            str, tuple[str, InferResponse, tuple[Any, ...]]] = \
            collections.OrderedDict()
        #: task -> its input specs (the hot path must not scan the registry)
        self._inputs: dict[str, tuple[TensorSpec, ...]] = {}
        #: (node, variant) routes checked once: -> the variant's task
        self._routes: dict[tuple[str, str], str] = {}
        #: tenants: API keys, quotas, private tasks, usage (mesh.tenants)
        self.tenancy = Tenancy.of(config.topology, keys=self.registry.keys,
                                  revoked=self.registry.revoked, owners=self.registry.owners())
        #: signed identities already seen here (a replayed forwarded query is refused)
        self.replays = ReplayGuard()
        #: peers failing the queries sent to them are ejected for a while (mesh.health)
        self.outliers = OutlierDetector()
        #: retries elsewhere stay within 20% of this node's requests (plus a few)
        self.retries = RetryBudget()
        self.recent_failures: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
        self.degraded_answers = 0
        #: client queries in progress by request id (a repeat waits for the first)
        self._in_flight: dict[str, tuple[tuple[Any, ...], asyncio.Future[InferResponse]]] = {}
        self.repeats_answered = 0
        #: live placement: the root decides, every node carries it out (nodes.placement)
        self.placement = PlacementControl(self, clock=placement_clock)
        self.ready = False
        self._started = clock()
        self._latencies: collections.deque[float] = collections.deque(maxlen=self.latency_window)

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> NodeAgent:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.forward_timeout_s),
            # https:// URLs (every neighbour's, with TLS) present this node's certificate
            connector=aiohttp.TCPConnector(limit=256, ssl=self.tls_client or True),
        )
        try:
            await self.neighbours.__aenter__()
            await self.registry_sync.start()  # the parent's registry first: it says what to host
            await self.registry_sync.__aenter__()
            await self.models.__aenter__()
            # A hardware class with no profile: measure here before advertising anything.
            await self._profile_missing()
            await self.models.preload(v.name for v in self.planner.hosted(self.name))
            await self._sync_workers()
            await self.placement.__aenter__()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        self._report_self()
        self.ready = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.ready = False
        await self.placement.__aexit__(None, None, None)
        await self.registry_sync.__aexit__(None, None, None)
        await cancel_all([self._adopting, self._warming])
        self._adopting = self._warming = None
        await self.neighbours.aclose()
        await self.models.__aexit__(None, None, None)
        await self.artifacts.aclose()
        if self._http is not None:
            await self._http.close()
            self._http = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def adopt_registry(self, registry: Registry) -> None:
        """Serve from ``registry`` from now on (a newer one from the parent, or a model
        registered here): plan with it, host what it adds, load that in the background."""
        before = set(self.models.variants)
        key = self.hardware.profile_key
        for name, variant in list(registry.variants.items()):
            # profiles this node measured for its own hardware class stay (same artifact)
            mine = self.registry.variants.get(name)
            if variant.profile_for(key) is None and mine is not None \
                    and mine.sha256 == variant.sha256 and mine.profile_for(key) is not None:
                registry.variants[name] = replace(variant, profiles={**variant.profiles,
                                                                     key: mine.profiles[key]})
        self.registry = registry
        # keys added or revoked on the running mesh take effect here now
        self.tenancy = Tenancy.of(self.config.topology, keys=registry.keys,
                                  revoked=registry.revoked,
                                  owners=registry.owners()).carry_over(self.tenancy)
        hosting = self.planner.hosting
        live = hosting.placement if self.placement.version else None
        self.planner = self._planner(registry, None if live is None else Hosting(
            self.config.topology, registry, live=live, decisions=hosting.decisions))
        self._planned_accuracy.clear()
        self._apply_live_accuracy()
        self._inputs.clear()
        self._routes.clear()
        await self._rehost(before)
        self.placement.kick()  # the root places what the registry adds, at once

    async def adopt_placement(self, placement: Placement,
                              decisions: tuple[PlacementDecision, ...]) -> None:
        """Host what the root's placement says, with its workers (:mod:`nodes.placement`)."""
        before = set(self.models.variants)
        planned = self.registry.with_accuracy(self._planned_accuracy) \
            if self._planned_accuracy else self.registry
        self.planner = self._planner(planned, Hosting(self.config.topology, self.registry,
                                                      live=placement, decisions=decisions))
        self._routes.clear()
        await self._rehost(before)

    async def _rehost(self, before: set[str]) -> None:
        """Carry out what the planner's hosting says: pull and load what is new (in the
        background), unload what is no longer hosted here, set each variant's workers."""
        registry = self.registry
        self.artifacts.use_policy(PullPolicy(self.config.topology, self.name,
                                             registry.variants.values(),
                                             hosts=self.planner.hosting.allows))
        hosted = {v.name: v for v in registry.variants.values()
                  if self.planner.hosting.allows(self.name, v.name)}
        self.models.variants.update(hosted)
        gone = sorted(before - set(hosted))
        for name in gone:  # no longer hosted here (placed elsewhere, or removed)
            if name in self.models.unavailable and name in registry.variants:
                continue  # placed elsewhere because it failed here: status keeps saying why
            if await self.models.unload(name) or name not in self.models.loaded:
                self.models.variants.pop(name, None)
            # one still busy stays until idle; the planner no longer sends it queries
        if gone:
            log.info("%s: no longer hosts %s", self.name, ", ".join(gone))
        self._report_self()
        if self.ready:
            if self._adopting is not None and not self._adopting.done():
                self._adopting.cancel()
            self._adopting = asyncio.create_task(self._load_new(), name=f"adopt:{self.name}")

    async def _load_new(self) -> None:
        """Profile what this hardware class has no profile for, then load what fits, then
        give each loaded variant the workers the placement says."""
        try:
            await self._profile_missing()
            had, paid = set(self.models.loaded), dict(self.metrics.cold_starts)
            await self.models.preload(v.name for v in self.planner.hosted(self.name))
            for name in sorted(set(self.models.loaded) - had):
                if self.metrics.cold_starts.get(name, 0) == paid.get(name, 0):
                    # loaded before any query waited for it (placed ahead of a forecast
                    # rise, or a replica): a cold start the mesh hid
                    self._loaded_ahead(name)
            await self._sync_workers()
        except Exception:  # the node keeps serving what it had
            log.exception("%s: loading the variants the mesh places here failed", self.name)
        self._report_self()

    async def _sync_workers(self) -> None:
        hosting = self.planner.hosting
        for name in sorted(self.models.loaded):
            # variants on one base instance share its workers: the most any of them wants
            want = max(hosting.workers(self.name, n) for n in self.models.sharing(name))
            if self.models.workers(name) != want:
                await self.models.set_workers(name, want)

    async def _profile_missing(self) -> None:
        for name, profile in (await self.models.profile_missing()).items():
            variant = self.registry.variants[name]
            self.registry.add(replace(variant, profiles={**variant.profiles,
                                                         self.hardware.profile_key: profile}))
        self.planner = self._planner(self.registry,
                                     self.planner.hosting if self.placement.version else None)

    def _planner(self, registry: Registry, hosting: Hosting | None) -> Planner:
        """A planner for this node's mesh: its TLS, and its tenants' signed hops, priced in."""
        return Planner(self.config.topology, registry, tls=self.config.tls is not None,
                       signed_hops=bool(self.config.topology.tenants), hosting=hosting)

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

    async def infer(self, req: InferRequest, *, from_client: bool = False,
                    authorization: str | None = None) -> InferResponse:
        """Serve or forward one query. ``from_client``: it came from outside the mesh.

        The protocol handlers pass ``from_client=True`` for everything but a
        proven neighbour (:mod:`nodes.peers`); code inside the node may route.
        ``authorization``: the client's ``Authorization`` (``Bearer <API key>``): on a
        mesh with tenants it names the tenant (401 without a valid one); a task private
        to another tenant is then unknown (404); the tenant's quota is enforced (429).
        """
        if from_client:
            self._admit(req, authorization)
            try:
                return await self._client_query(req)
            finally:
                self.tenancy.done(req.tenant)
        if req.identity is not None:  # the tenant, as the previous node signed it
            req.identity.check(None if self.callers.tls else self.peers, req.request_id,
                               time.time(), self.replays)
        return await self._query(req, False, ())

    def _admit(self, req: InferRequest, authorization: str | None) -> None:
        """The entry's checks of a client query: who (tenant), what it may see, how much."""
        if req.tenant is not None or req.identity is not None:
            raise Forbidden("identity: set by the entry node from your API key; send "
                            "Authorization: Bearer <key> instead")
        tenancy = self.tenancy
        if tenancy.enabled:
            req.tenant = tenancy.authenticate(authorization)
        if tenancy.private:
            self.check_visible(req.task, req.tenant)
        tenancy.admit(req.tenant, self.clock())

    def check_visible(self, task: str, tenant: str | None) -> None:
        """Raise :class:`UnknownTask` unless ``task`` exists and ``tenant`` may see it: a task
        private to another tenant gets the very answer a task that does not exist gets,
        whose list of known tasks holds only what ``tenant`` may see."""
        tenancy = self.tenancy
        if task in self._inputs and tenancy.visible(tenant, task):
            return
        try:
            self.input_specs(task)
            if tenancy.visible(tenant, task):
                return
        except UnknownTask:
            pass
        known = ", ".join(tenancy.visible_tasks(tenant, self.registry.tasks())) or "none"
        raise UnknownTask(f"task {task[:64]!r} is not registered (known tasks: {known})")

    async def _client_query(self, req: InferRequest) -> InferResponse:
        fingerprint = _fingerprint(req)
        again = self._repeated(req, fingerprint)
        if again is not None:
            return await again
        response = await self._query(req, True, fingerprint)
        if req.tenant is not None:
            self.tenancy.account(req.tenant, bytes_in=req.payload_bytes,
                                 bytes_out=sum(o.nbytes for o in response.outputs),
                                 cost=(response.plan.cost_per_1k or 0.0) / 1000.0
                                 if response.plan is not None else 0.0)
        return response

    async def _query(self, req: InferRequest, from_client: bool,
                     fingerprint: tuple[Any, ...]) -> InferResponse:
        started = time.perf_counter()
        self._active += 1
        waiting: asyncio.Future[InferResponse] | None = None
        if from_client:  # a repeat of this query meanwhile waits for this answer
            waiting = asyncio.get_running_loop().create_future()
            self._in_flight[req.request_id] = (fingerprint, waiting)
        try:
            response = await self._infer(req, started, from_client)
        except BaseException as exc:
            if isinstance(exc, Exception):
                self._observe(req, None, exc, started)
            if waiting is not None:
                waiting.set_exception(exc if isinstance(exc, Exception) else Unavailable(
                    "the first copy of this query was cancelled; retry", retry_after_s=0.1))
                waiting.exception()  # retrieved: nobody may be waiting
            raise
        finally:
            self._active -= 1
            if waiting is not None and self._in_flight.get(req.request_id, (0, 0))[1] is waiting:
                del self._in_flight[req.request_id]
        if waiting is not None:
            waiting.set_result(response)
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._latencies.append(elapsed_ms)
        response.timing["hop_total_ms"] = elapsed_ms
        response.loads[self.name] = float(self.queue_depth)
        self._observe(req, response, None, started)
        if from_client:  # this node answered a client: it can take that client's feedback
            self._answered[req.request_id] = (response.served_by.variant, response,
                                              fingerprint)
            if len(self._answered) > self.answers_kept:
                self._answered.popitem(last=False)
        return response

    #: How many recent answers to clients are kept for their feedback (oldest dropped).
    answers_kept: int = 10_000

    # The request id is a query's idempotency id: a client that retries (its answer was
    # lost, or slow) sends the same id, and must not make the mesh compute it twice.
    def _repeated(self, req: InferRequest, fingerprint: tuple[Any, ...]
                  ) -> Awaitable[InferResponse] | None:
        """The answer to an earlier copy of ``req`` (same id, same query), in flight or given
        recently; None when it is new."""
        running = self._in_flight.get(req.request_id)
        if running is not None and running[0] == fingerprint:
            self.repeats_answered += 1
            return asyncio.shield(running[1])
        kept = self._answered.get(req.request_id)
        if kept is not None and kept[2] == fingerprint:
            self.repeats_answered += 1
            done: asyncio.Future[InferResponse] = asyncio.get_running_loop().create_future()
            done.set_result(kept[1])
            return done
        return None

    def feedback(self, request_id: str, labels: Any, *, task: str | None = None,
                 tenant: str | None = None) -> dict[str, Any]:
        """Ground truth for an answer this node gave: record per row whether the class it
        returned was right. Raises :class:`AnswerNotFound` (404) for an answer it does not
        hold (too old, given by another entry node, or, with ``task``, to another task) and
        :class:`InvalidInput` for labels that do not match the answer's rows."""
        kept = self._answered.get(request_id)
        if kept is not None and kept[2][1] != tenant:
            kept = None  # another tenant's answer: as if there were none
        if kept is not None and task is not None:
            served = self.registry.variants.get(kept[0])
            kept = kept if served is not None and served.task == task else None
        if kept is None:
            raise AnswerNotFound(f"no recent answer {request_id[:64]!r} on this node; send "
                                   "feedback to the entry node that answered, soon after")
        variant, response, _ = kept
        scores = response.outputs[0] if response.outputs else None
        if scores is None or scores.ndim != 2:
            raise InvalidInput(f"the answer to {request_id[:64]!r} is not a class score matrix; "
                               "feedback takes class labels")
        truth = np.atleast_1d(np.asarray(labels))
        if truth.dtype.kind not in "iu" or truth.shape != (scores.shape[0],):
            raise InvalidInput(f"label: {scores.shape[0]} integer class label(s) expected, one "
                               "per row of the query")
        correct = scores.argmax(axis=1) == truth
        for ok in correct:
            self.live.record(variant, bool(ok))
        self._apply_live_accuracy()
        return {"variant": variant, "correct": int(correct.sum()), "rows": int(correct.size),
                "live_accuracy": self.live.live(variant)}

    def _apply_live_accuracy(self) -> None:
        """Plan with the live accuracy of every variant that has enough feedback."""
        live = self.live.overrides()
        changed = {v: a for v, a in live.items()
                   if abs(a - self._planned_accuracy.get(v, -1.0)) >= 0.005}
        if not changed:
            return
        self._planned_accuracy.update(changed)
        self.planner = self._planner(self.registry.with_accuracy(self._planned_accuracy),
                                     self.planner.hosting)  # what is hosted stays put
        log.info("%s: planning with live accuracy %s", self.name,
                 {v: round(a, 4) for v, a in changed.items()})

    def accuracy_of(self, variant: str) -> float | None:
        """What ``variant`` delivers: its live accuracy once known, else its validation one."""
        live = self._planned_accuracy.get(variant)
        if live is not None:
            return live
        found = self.registry.variants.get(variant)
        return found.accuracy if found is not None else None

    def _observe(self, req: InferRequest, response: InferResponse | None,
                 error: BaseException | None, started: float) -> None:
        task = req.task if req.task in self._inputs else self._label(req.task)
        if response is not None:
            variant, tier = response.served_by.variant, response.served_by.tier
        elif req.route is not None and req.route in self._routes:
            variant = req.route.variant
            tier = self.config.topology.nodes[req.route.node].tier
        else:
            variant = tier = ""
        self.metrics.request(task, variant, tier, outcome_of(error), time.perf_counter() - started)

    async def _infer(self, req: InferRequest, arrived: float, from_client: bool) -> InferResponse:
        if req.hops >= MAX_HOPS:
            raise InvalidInput(f"hops: query crossed {req.hops} nodes; refusing to forward a loop")
        if from_client:
            if req.route is not None:
                raise Forbidden("route: only mesh nodes choose where a query runs; send the task "
                                "and an SLO, without a route")
            req.budget_ms, req.hops = None, 0  # set by nodes only
        elif req.route is not None:
            self._check_route(req)
        if req.route is None or req.route.node == self.name:
            # the entry validates what it plans, the serving node what it runs; a node that
            # only passes a peer's query on does not look inside its tensors
            self._check_inputs(req.task, req.tensors)
        deadline = None if req.timeout_ms is None else arrived + req.timeout_ms / 1000.0
        plan: Plan | None = None
        if req.route is not None and req.route.node != self.name and self.view.is_down(
                req.route.node, self.clock()):
            req.route = None  # this node knows the planned one is down: re-plan from here
        if req.route is None:
            decision = self._plan(req, arrived)
            req.route = Route(decision.node, decision.variant)
            plan = Plan.from_decision(decision)
            if decision.escalation is not None:  # cascade: answer here, unsure rows upstream
                answer = await run_cascade(self._stage, req, decision, plan)
                return self._served_plan(answer, answer.plan or plan, req)
        budget_ms, hops = req.budget_ms, req.hops
        first = req.route
        self.retries.started(self.clock())
        sent = time.perf_counter()
        try:
            response = await self._dispatch(req, arrived, deadline)
        except (CannotMeetDeadline, Overloaded) as exc:
            if plan is None:  # only the node that planned a query re-places it, and only once
                raise
            self._retry_or_raise(exc)
            req.budget_ms, req.hops = budget_ms, hops  # as they were before the refused attempt
            plan = self._hand_back(req, exc, plan)
            response = await self._dispatch(req, arrived, deadline)
        except _HopDown as exc:
            # Any node whose own next hop died re-plans, once: its view now counts everything
            # behind that hop as down, and inference has no side effects to repeat.
            self._retry_or_raise(exc)
            req.budget_ms, req.hops = budget_ms, hops
            plan = self._route_around(req, arrived, exc)
            response = await self._dispatch(req, arrived, deadline)
        except Unavailable as exc:
            if first.node == self.name or plan is None:
                raise
            # The planned node answered with a failure of its own (a variant that broke, a
            # node shutting down): count it against that node, and try the next candidate.
            self._peer_failed(first.node, exc.message)
            self._retry_or_raise(exc)
            req.budget_ms, req.hops = budget_ms, hops
            plan = self._hand_back(req, exc, plan)
            response = await self._dispatch(req, arrived, deadline)
        else:
            if first.node != self.name:
                self._peer_answered(first.node, (time.perf_counter() - sent) * 1000, plan)
        if plan is not None:
            if not plan.feasible:
                plan = self._degraded(req, plan)
            response = self._served_plan(response, plan, req)
        return response

    # ------------------------------------------------------------------ failures
    def _retry_or_raise(self, exc: MeshError) -> None:
        """Take one retry from this node's budget, or give up with ``exc`` (no budget left:
        retries must not multiply the load of a mesh that is already failing)."""
        if not self.retries.try_spend(self.clock()):
            self._failed("retry-budget", f"no retry left in the budget; {exc.message}")
            raise exc

    def _failed(self, peer: str, reason: str) -> None:
        self.recent_failures.append({"at": round(time.time(), 3), "peer": peer,
                                     "reason": reason[:300]})

    def _peer_failed(self, peer: str, reason: str) -> None:
        """A query to ``peer`` failed: outlier detection may eject it (the planner then
        stops choosing it for the very next query)."""
        self._failed(peer, reason)
        now = self.clock()
        ejection = self.outliers.failure(peer, now, reason)
        if ejection is not None:
            self._ejected(ejection, now)

    def _peer_answered(self, peer: str, latency_ms: float, plan: Plan | None) -> None:
        predicted = plan.predicted.get("total_ms") if plan is not None and \
            plan.describes(peer, plan.variant) else None
        now = self.clock()
        ejection = self.outliers.success(peer, now, latency_ms=latency_ms,
                                         predicted_ms=predicted)
        if ejection is not None:
            self._failed(peer, ejection.reason)
            self._ejected(ejection, now)

    def _ejected(self, ejection: Ejection, now: float) -> None:
        log.warning("%s: ejecting %s for %.1f s: %s", self.name, ejection.peer,
                    ejection.until - now, ejection.reason)
        self.view.eject(ejection.peer, ejection.until, now)

    def _degraded(self, req: InferRequest, plan: Plan) -> Plan:
        """An answer outside its SLO: when the mesh with nothing down would have met it, say
        it is degraded by the failure, with the accuracy it delivers."""
        down = self.view.down_now(self.clock())
        if not down:
            return plan
        try:
            whole = self.planner.plan(req.task, req.slo, self.name, MeshView(),
                                      now=self.clock(), rows=req.rows,
                                      payload_bytes=req.payload_bytes)
        except MeshError:
            return plan
        if not whole.feasible:
            return plan  # not the failure's doing: nothing could have met it
        self.degraded_answers += 1
        acc = "unknown" if plan.accuracy is None else f"{plan.accuracy:.3f}"
        return plan.amended(degraded=(
            f"{', '.join(down[:5])}{' ...' if len(down) > 5 else ''} unreachable: served by "
            f"{plan.variant} on {plan.node} (accuracy {acc}), the best reachable; "
            f"{whole.variant} on {whole.node} would meet the SLO"))

    async def _stage(self, req: InferRequest) -> InferResponse:
        """One routed stage of a cascade: served or forwarded, not counted as another query."""
        return await self._infer(req, time.perf_counter(), False)

    def _plan(self, req: InferRequest, arrived: float) -> Decision:
        if self.view.ejected:
            for peer in self.view.expire_ejections(self.clock()):
                log.info("%s: %s back on probation", self.name, peer)
        return self._plan_now(req, arrived)

    def _plan_now(self, req: InferRequest, arrived: float) -> Decision:
        """Plan a query that has no route; set its budget. Refuses at once what cannot be on time.

        At the entry node (``hops == 0``) a latency target nothing can meet is
        refused with :class:`CannotMeetDeadline`, unless the SLO allows a degraded
        answer; a node further along (re-planning around a failure) answers it late.
        A ``min_accuracy`` nothing reachable meets is not refused: the most accurate
        variant reachable answers, and the answer says so (``slo_met`` False, the plan
        infeasible with the accuracy delivered, ``plan.degraded`` when a failure is why),
        so that a device cut off from the core still gets the best answer there is.
        """
        now = self.clock()
        if req.hops == 0:  # the planner must see this node's own queue as it is now
            depth = self.queue_depth
            if depth != self._reported_depth or now - self._reported_at > 1.0:
                self.view.report(self.name, depth, now)
                self._reported_depth, self._reported_at = depth, now
        decision = self.planner.plan(req.task, req.slo, self.name, self.view, now=now,
                                     rows=req.rows, payload_bytes=req.payload_bytes)
        if req.hops == 0:
            self.meter.arrived(req.task)  # demand entering here, answered or refused
        if req.hops == 0 and len(self.models.loaded) < len(self.models.variants):
            self._warm_behind(req, decision, now)
        target = None if req.slo.offline else req.slo.latency_ms
        if target is None:
            return decision
        late = decision.misses_latency(target)
        if late and req.hops == 0 and not req.slo.allow_degraded:
            p = decision.prediction
            raise CannotMeetDeadline(
                f"no node can answer task {req.task!r} within {target:g} ms now (the closest, "
                f"{decision.tier} {decision.variant}, is predicted at {p.total_ms:.1f} ms); "
                "retry later, relax latency_ms, or set allow_degraded to get a late answer",
                retry_after_s=max((p.queue_ms + p.load_ms) / 1000.0, 0.05))
        if late:
            req.budget_ms = None  # served best-effort: no deadline to refuse it by
        elif req.hops == 0:
            req.budget_ms = target
        # a node further along keeps what is left of the budget it was sent
        return decision

    #: How often, per task, queries look for a variant worth loading behind them.
    warm_check_s: float = 1.0

    def _warm_behind(self, req: InferRequest, decision: Decision, now: float) -> None:
        """Hide a cold start: when, were everything here loaded, the planner would have
        served this query with a variant of this node that is not loaded, the query goes
        where it was planned (a warm variant that meets its SLO, or the closest) and that
        variant loads in the background, for the queries after it."""
        if self._warming is not None and not self._warming.done():
            return  # one load at a time; the next query asks again
        if now - self._warm_checked.get(req.task, -1e9) < self.warm_check_s:
            return  # a node that cannot fit all it hosts would otherwise pay this per query
        self._warm_checked[req.task] = now
        cold = {v.name for v in self.planner.hosted(self.name)
                if v.task == req.task and v.name not in self.models.loaded
                and v.name not in self.models.unavailable}
        if not cold:
            return
        warm = MeshView(stale_after_s=self.view.stale_after_s)
        warm.loads, warm.down = dict(self.view.loads), self.view.down
        own = warm.loads.get(self.name)
        if own is not None:
            warm.loads[self.name] = replace(own, loaded=None)  # "everything loaded"
        ideal = self.planner.plan(req.task, req.slo, self.name, warm, now=now, rows=req.rows,
                                  payload_bytes=req.payload_bytes)
        if ideal.node != self.name or ideal.variant not in cold or \
                (ideal.node, ideal.variant) == (decision.node, decision.variant):
            return
        log.info("%s: %s would serve %s better once loaded; loading it behind %s", self.name,
                 ideal.variant, req.request_id, decision.variant)
        self._warming = asyncio.create_task(self._warm(ideal.variant), name=f"warm:{self.name}")

    async def _warm(self, variant: str) -> None:
        try:
            await self.models.acquire(variant)
        except MeshError as exc:  # the node keeps serving with what it has
            log.warning("%s: loading %s ahead failed: %s", self.name, variant, exc.message)
            return
        self._loaded_ahead(variant)

    def _loaded_ahead(self, variant: str) -> None:
        """``variant`` was loaded in the background, ahead of the queries that want it: one
        cold start hidden per load, however many background tasks waited for that load."""
        entry = self.models.loaded.get(variant)
        if entry is not None and entry not in self._counted_ahead:
            self._counted_ahead.add(entry)
            self.metrics.warmed(variant)

    def _served_plan(self, response: InferResponse, plan: Plan, req: InferRequest
                     ) -> InferResponse:
        """Make the answer's plan describe what served it (for ``slo_met`` and the user)."""
        sb = response.served_by
        if not plan.describes(sb.node, sb.variant) and plan.cascade is None:
            inner = response.plan
            before = Detour(plan.node, plan.variant, f"{self.name} planned it; a node further "
                            "along planned it again")
            if inner is not None and inner.describes(sb.node, sb.variant):
                plan = inner.amended(replanned_from=before)  # its decision is what ran
            else:  # the prediction was for another (node, variant): drop it
                plan = plan.amended(node=sb.node, tier=sb.tier, variant=sb.variant,
                                    predicted={}, replanned_from=before)
        accuracy = self.accuracy_of(sb.variant)  # the live figure once feedback says it
        min_accuracy = req.slo.min_accuracy
        feasible = plan.feasible and not (
            min_accuracy is not None and (accuracy is None or accuracy < min_accuracy))
        if accuracy != plan.accuracy or feasible != plan.feasible:
            plan = plan.amended(accuracy=accuracy, feasible=feasible)
        response.plan = plan
        return response

    def _check_route(self, req: InferRequest) -> None:
        """A neighbour's route must name a node that hosts a variant of the query's task."""
        route = req.route
        assert route is not None
        task = self._routes.get((route.node, route.variant))
        if task is None:
            spec = self.config.topology.nodes.get(route.node)
            if spec is None:
                raise InvalidInput(f"route.node: {route.node!r} is not a node of this mesh")
            variant = self.registry.variants.get(route.variant)
            if variant is None or not self.planner.hosting.allows(route.node, variant.name):
                raise InvalidInput(f"route.variant: {route.node} hosts no variant "
                                   f"{route.variant!r}")
            task = self._routes[(route.node, route.variant)] = variant.task
        if task != req.task:
            raise InvalidInput(f"route.variant: {route.variant!r} does not serve task "
                               f"{req.task!r}")

    @staticmethod
    def _left_ms(req: InferRequest, arrived: float, now: float) -> float | None:
        """What is left of the query's latency budget at ``now``: the one place it is computed.

        ``req.budget_ms`` is what was left when the query arrived here (``arrived``); it is
        rewritten only in the copy sent on to the next hop.
        """
        if req.budget_ms is None:
            return None
        return req.budget_ms - (now - arrived) * 1000.0

    async def _dispatch(self, req: InferRequest, arrived: float, deadline: float | None
                        ) -> InferResponse:
        assert req.route is not None
        if req.route.node == self.name:
            left_ms = self._left_ms(req, arrived, time.perf_counter())
            response = await self._serve_local(req.request_id, req.route.variant, req.tensors,
                                               left_ms, offline=req.slo.offline)
            t = response.timing
            # a batch shared with other queries (other tenants' too) is charged by rows
            share = req.rows / max(t["batch_rows"], req.rows)
            self.tenancy.account(req.tenant, compute_s=t["compute_ms"] * share / 1000.0)
            self.meter.served(req.route.variant, req.rows,
                              budget_ms=left_ms, min_accuracy=req.slo.min_accuracy,
                              spent_ms=t["queue_ms"] + t["compute_ms"] + t.get("cold_start_ms", 0.0))
            return response
        return await self._forward(req, arrived, deadline)

    def _hand_back(self, req: InferRequest, refused: MeshError, plan: Plan) -> Plan:
        """Route a query its first choice refused to the next feasible candidate, or re-raise."""
        assert req.route is not None
        first = req.route
        if first.node == self.name:
            self._report_self()
        decision = self.planner.plan(req.task, req.slo, self.name, self.view, now=self.clock(),
                                     rows=req.rows, payload_bytes=req.payload_bytes,
                                     explain=True)
        for scored in decision.candidates:
            c = scored.candidate
            if scored.feasible and (c.node, c.variant) != (first.node, first.variant):
                break
        else:
            raise refused
        log.info("%s/%s refused %s (%s); handing it to %s/%s", first.node, first.variant,
                 req.request_id, type(refused).__name__, c.node, c.variant)
        req.route = Route(c.node, c.variant)
        return plan.amended(node=c.node, tier=c.tier, variant=c.variant, accuracy=c.accuracy,
                            predicted=scored.prediction.to_dict(),
                            handed_back=Detour(first.node, first.variant, refused.message))

    def _route_around(self, req: InferRequest, arrived: float, failed: _HopDown) -> Plan:
        """Plan a query again after its next hop failed; re-raise when nothing else is left."""
        assert req.route is not None
        first = req.route
        decision = self.planner.plan(req.task, req.slo, self.name, self.view, now=self.clock(),
                                     rows=req.rows, payload_bytes=req.payload_bytes)
        if (decision.node, decision.variant) == (first.node, first.variant):
            raise failed
        log.info("%s: %s; serving %s on %s/%s instead", self.name, failed.message,
                 req.request_id, decision.node, decision.variant)
        req.route = Route(decision.node, decision.variant)
        left_ms = self._left_ms(req, arrived, time.perf_counter())
        if left_ms is not None and (not decision.feasible or left_ms <= 0):
            req.budget_ms = None  # served best-effort now: no deadline to refuse it by
        return Plan.from_decision(decision).amended(
            handed_back=Detour(first.node, first.variant, failed.message))

    def _label(self, task: str) -> str:
        """``task`` when it is registered, else one label for all others (bounded labels)."""
        try:
            self.input_specs(task)
        except MeshError:
            return "(unknown)"
        return task

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
                           budget_ms: float | None = None, *, offline: bool = False
                           ) -> InferResponse:
        entry = self.models.get(variant)
        cold_ms = 0.0
        if entry is None or not entry.batcher.running:
            waited = time.perf_counter()
            entry = await self.models.acquire(variant)  # loads it (one load however many wait)
            if not entry.batcher.running:  # evicted before this request got to it
                entry = await self.models.acquire(variant)
            cold_ms = (time.perf_counter() - waited) * 1000
            self.metrics.cold_start(variant)  # this query paid for a load
        result = await entry.batcher.submit(inputs, budget_ms=budget_ms, offline=offline,
                                            alone=self._active <= 1)
        self.metrics.served()
        timing = {"queue_ms": result.queue_ms, "compute_ms": result.compute_ms,
                  "batch_rows": float(result.batch_rows), "network_ms": 0.0}
        if cold_ms:
            timing["cold_start_ms"] = cold_ms
        return InferResponse(request_id=request_id, outputs=result.outputs,
                             served_by=ServedBy(self.name, self.spec.tier, variant),
                             timing=timing)

    #: Of what is left of the caller's timeout, the share a hop may use: the rest is kept
    #: for planning the query once around that hop if it does not answer.
    hop_share: float = 0.5

    def _hop_timeout_s(self, req: InferRequest, deadline: float | None, now: float) -> float:
        """How long to wait for the next hop: from the query's budget and its caller's timeout."""
        limit = self.config.forward_timeout_s
        if req.budget_ms is not None:
            limit = min(limit, max(req.budget_ms, self.config.min_hop_timeout_ms) / 1000.0)
        if deadline is not None:
            limit = min(limit, max(deadline - now, 0.0) * self.hop_share)
        return max(limit, 0.001)

    async def _forward(self, req: InferRequest, arrived: float, deadline: float | None
                       ) -> InferResponse:
        assert req.route is not None
        target = req.route.node
        hop = self.config.topology.next_hop(self.name, target)
        if hop is None or hop not in self.neighbours.transports:
            raise Unavailable(f"no path from {self.name} to {target}")
        req.hops += 1
        sent = time.perf_counter()
        link_ms = self.config.topology.link(self.name, hop).latency_ms
        left_ms = self._left_ms(req, arrived, sent)
        if left_ms is not None:
            # what the next node gets: what is left once the link's round trip is paid
            req.budget_ms = left_ms - 2 * link_ms
        timeout_s = self._hop_timeout_s(req, deadline, sent)
        if req.tenant is not None:  # signed afresh for each hop: a replayed copy is refused
            req.identity = Identity.sign(self.peers, req.tenant, req.request_id, time.time())
        # the next node must give up on its own next hop before this one gives up on it
        req.timeout_ms = max(timeout_s * 1000 - 2 * link_ms, 1.0)
        try:
            status, body = await self.neighbours.post(hop, encode_request(req), timeout_s)
        except HopFailed as exc:
            # Everything behind a dead (or frozen) hop is unreachable too, until a fresh
            # report says otherwise; the planner then routes around it instead of failing again.
            now = self.clock()
            for node in self.config.topology.behind(self.name, hop):
                self.view.mark_down(node, now)
            if exc.timed_out:
                # Marked down above until a fresh report (a frozen node stays avoided), but
                # not ejected: a hop slow for the query's budget may only be busy, and an
                # overload must not eject half the mesh for a minute.
                self._failed(hop, f"forwarding to {hop}: {exc.reason}")
            else:
                self._peer_failed(hop, f"forwarding to {hop} failed: {exc.reason}")
            raise _HopDown(f"forwarding to {hop} failed: {exc.reason}") from None
        rtt_ms = (time.perf_counter() - sent) * 1000
        self.metrics.forwarded(target, hop, self.neighbours.transport(hop))
        response = decode_answer(status, body)
        downstream_ms = response.timing.get("hop_total_ms", 0.0)
        response.timing["network_ms"] = response.timing.get("network_ms", 0.0) + max(
            rtt_ms - downstream_ms, 0.0)
        now = self.clock()
        nodes = self.config.topology.nodes
        for node, depth in response.loads.items():
            if node in nodes:  # the view holds this mesh's nodes only, whatever a peer says
                self.view.report(node, int(depth), now)
        return response

    # ------------------------------------------------------------------ status
    def waiting_for(self) -> list[str] | None:
        """What keeps the node from being ready: the hosted variants still on their way.

        None when it is ready: the agent has started and every variant it hosts
        is loaded, or unavailable here for good, or can load at once from the
        local store when asked (evicted for memory, or not preloaded because it
        does not fit beside the others; waiting for those would make readiness
        flap with normal eviction). A variant still being pulled or loaded, or
        whose artifact the parent has not delivered yet, holds readiness back.
        """
        if not self.ready:
            return ["the agent to start"]
        models = self.models
        pending = []
        for variant in self.planner.hosted(self.name):
            name = variant.name
            if name in models.loaded or name in models.unavailable:
                continue
            if name in models.variants and models.state_of(name) != "loading" and (
                    self.artifacts.store.has(variant.sha256)
                    or models.memory_used + models.need_bytes(name) > models.config.budget_bytes):
                continue
            pending.append(name)
        return pending or None

    def local_load(self) -> LocalLoad:
        """What membership reports about this node on every heartbeat (cheap: no sorting)."""
        return LocalLoad(self.queue_depth, frozenset(self.models.loaded),
                         frozenset(self.models.unavailable),
                         sum(s.count for s in self.metrics.requests.values()))

    def placement_load(self, now: float) -> tuple[dict[str, VariantLoad], dict[str, float]]:
        """What membership reports up for placement on each heartbeat: per variant served
        here (rate, compute busy, misses, targets) and per task entering here."""
        loaded = self.models.loaded
        return self.meter.report(now, {name: e.batcher.depth for name, e in loaded.items()},
                                 {name: e.batcher.slowdown for name, e in loaded.items()},
                                 {name: e.batcher.cpu_share for name, e in loaded.items()})

    def status(self, address: str = "", stream_address: str | None = None) -> dict[str, Any]:
        lat = sorted(self._latencies)
        variants: list[dict[str, Any]] = []
        for name in sorted(self.models.variants):
            state = self.models.state_of(name)
            row: dict[str, Any] = {"name": name, "loaded": state == "loaded", "state": state}
            entry = self.models.loaded.get(name)
            if entry is not None:
                row.update(queue_depth=entry.batcher.depth, served=entry.batcher.served,
                           batches=entry.batcher.batches, memory_bytes=entry.memory_bytes,
                           workers=entry.batcher.workers)
            if state == "unavailable":
                row["error"] = self.models.unavailable[name]
            if self.models.variants[name].base:
                row["base"] = self.models.variants[name].base
            variants.append(row)
        totals = self.metrics.totals()
        return {
            "node": self.name,
            "tier": self.spec.tier,
            "hardware": self.spec.hardware,
            "compute_workers": self.compute_workers,
            #: base instances loaded for private heads: one per (base, owner); "" shared
            "shared_bases": [{"base": key[0], "owner": key[1], "heads": sb.heads,
                              "memory_bytes": sb.memory_bytes, "batches": sb.batches,
                              "mixed_batches": sb.mixed}
                             for key, sb in sorted(self.models.shared.items())],
            #: what the class declares beside what this node measured (its usable CPUs, and
            #: the host it shares them on: nodes on one machine report one host)
            "machine": {"declared_cores": self.hardware.cores or self.hardware.threads,
                        "cpus": self.machine.cpus,
                        "host": self.machine.host},
            "address": address,
            "stream_address": stream_address,
            "topology": self.config.topology.name,
            #: what this node hosts and why: its allow/deny globs, the placement, its reasons,
            #: and the live placement (version, workers, the root's latest decisions)
            "placement": {**self.planner.hosting.explain(self.name),
                          "live": self.placement.status()},
            #: the registry version this node serves (the core's, once copied down the tree)
            "registry_version": self.registry.version,
            #: neighbours this node currently counts as down (missed heartbeats, failed hops)
            "unreachable": sorted(n for n in self.config.topology.neighbours(self.name)
                                  if self.view.is_down(n, self.clock())),
            "uptime_s": round(self.clock() - self._started, 3),
            "ready": self.ready,
            "variants": variants,
            "memory": {"budget_bytes": self.models.config.budget_bytes,
                       "used_bytes": self.models.memory_used},
            "artifacts": {"parent": self.artifacts.parent, "fetches": dict(self.artifacts.fetches)},
            "queue_depth": self.queue_depth,
            "requests": totals["requests"],
            "served_local": totals["served_local"],
            "forwarded": totals["forwarded"],
            #: forwarded queries by transport ("stream", "http"); neighbour -> transport
            "forwarded_via": totals["forwarded_via"],
            "neighbour_transports": {n: self.neighbours.transport(n)
                                     for n in sorted(self.config.neighbours)},
            #: failed queries by outcome (the metrics' label: "overloaded", "invalid_input", ...)
            "errors": totals["errors"],
            #: queries that paid for a variant's load, by variant
            "cold_starts": totals["cold_starts"],
            #: loads made in the background while queries went to warm variants, by variant
            "cold_starts_hidden": totals["cold_starts_hidden"],
            #: live accuracy from applications' feedback beside what each variant promised
            "live_accuracy": {v: f.to_json() for v, f in self.live.report(
                {n: x.accuracy for n, x in self.registry.variants.items()}).items()},
            "latency_ms": {"p50": _percentile(lat, 0.50), "p99": _percentile(lat, 0.99)},
            #: per tenant, what it used here (queries, compute seconds, bytes, cost): for
            #: operators only (status needs an operator key once the mesh has tenants)
            "tenants": {t: u.to_json() for t, u in sorted(self.tenancy.usage.items())},
            #: failures as this node sees them: peers ejected (or on probation) for failing
            #: queries, retries spent against the budget, answers degraded by a failure
            "failures": {"ejected": self.outliers.status(self.clock()),
                         "retries": self.retries.status(self.clock()),
                         "degraded_answers": self.degraded_answers,
                         "recent": list(self.recent_failures)},
            "view": self.view.snapshot(self.clock()),
        }


_DTYPES: dict[str, np.dtype[Any]] = {name: np.dtype(name) for name in ALLOWED_DTYPES}


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("N" if d == -1 else str(d) for d in shape) + "]"


def _fingerprint(req: InferRequest) -> tuple[Any, ...]:
    """What makes two queries with one request id the same query: task, SLO and tensors (a
    repeat gets the first's answer; another client reusing the id does not)."""
    return (req.task, req.tenant, req.slo, tuple(
        (t.dtype.str, t.shape, hashlib.blake2b(np.ascontiguousarray(t).data,
                                                digest_size=16).digest())
        for t in req.tensors))


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    index = min(int(q * len(ordered)), len(ordered) - 1)
    return round(ordered[index], 3)
