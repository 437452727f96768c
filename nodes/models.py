"""The model manager: which variants are loaded on this node, within its memory budget.

A variant's memory is estimated from its profile's peak memory when the
profile has one, else from its file size times ``size_factor`` (a session
holds the weights plus the runtime's buffers). Loaded variants together stay
within the node's budget (its hardware class's ``memory_mb``).

- **Loading** happens on first need (and at start for whatever fits). One
  load per variant at a time: concurrent requests for an unloaded variant
  wait on the same load. The artifact comes from the node's store, pulled
  through its parent when missing (:mod:`nodes.artifacts`); the session is
  opened on a loader thread and warmed up with one batch-1 run, so that
  serving never pays the first-run cost.
- **Evicting**: to make room, idle variants are unloaded coldest first. The
  temperature is an exponentially decaying count of recent requests
  (half-life ``heat_half_life_s``): least recently used, weighted by recent
  load. A variant with queued or running requests is never evicted.
- **Failing**: a variant that cannot load (corrupt artifact, no runtime for
  its format, larger than the whole budget, out of memory) is marked
  unavailable with its reason and never retried by this process; the node
  keeps serving everything else. A transient failure (the parent could not
  be reached, memory busy with variants in use) is not marked.
- **Profiling**: a variant with no profile for this node's hardware class
  is profiled here before the node advertises it (cached per hardware class
  and artifact under ``<home>/profiles``).
- **Private heads** (``Variant.base`` set) load onto one shared instance of
  their base (:mod:`nodes.heads`): the base is loaded with the first head
  and unloaded with the last, and counts once against the budget; each
  head adds only its own session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mesh.durable import write_atomic
from mesh.errors import ArtifactNotFound, MeshError, Overloaded, RuntimeMissing, Unavailable
from mesh.placement.resources import variant_memory_bytes
from mesh.registry import Profile, TensorSpec, Variant, compose_profile
from mesh.runtimes import ModelRuntime, runtime_for
from nodes.artifacts import ArtifactSource
from nodes.batching import Batcher, BatchPolicy, BatchSettings
from nodes.heads import HeadPool, SharedBase, instance_key
from nodes.metrics import NodeMetrics, VariantGauge
from nodes.tasks import cancel_all
from nodes.workers import WorkerPool

#: format ("onnx", "tflite", ...) -> the runtime for it; raises Unavailable when none
RuntimeLookup = Callable[[str], ModelRuntime]

__all__ = ["RuntimeLookup", "ModelConfig", "LoadedVariant", "ModelManager", "estimate_bytes", "sample_inputs"]

log = logging.getLogger("tiermesh.models")

_MB = 1024 * 1024


@dataclass(frozen=True)
class ModelConfig:
    """How one node loads, batches and evicts its variants."""

    budget_bytes: int
    threads: int
    profile_key: str
    max_queue: int = 256
    #: memory estimate = file size x this, when the profile has no peak memory
    size_factor: float = 3.0
    heat_half_life_s: float = 30.0
    #: how every loaded variant batches and admits
    batching: BatchSettings = BatchSettings()
    #: where profiles made on this node are cached; None: not cached
    profile_cache: Path | None = None
    #: tenants whose private heads get a base instance of their own (``share_base: false``)
    isolated_tenants: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be > 0, got {self.budget_bytes}")
        if self.size_factor <= 0:
            raise ValueError(f"size_factor must be > 0, got {self.size_factor}")


def estimate_bytes(variant: Variant, profile_key: str, size_factor: float) -> int:
    """Memory a loaded ``variant`` takes: profiled peak if known, else size x factor (the
    same rule placement plans with, :func:`mesh.placement.variant_memory_bytes`)."""
    return variant_memory_bytes(variant, variant.profile_for(profile_key), size_factor)


def sample_inputs(specs: Iterable[TensorSpec], batch: int, seed: int = 0) -> list[np.ndarray]:
    """Random inputs of the declared shapes (batch first; other open dimensions 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for spec in specs:
        shape = tuple(batch if i == 0 else (d if d > 0 else 1) for i, d in enumerate(spec.shape))
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            out.append(rng.random(shape).astype(dtype))
        else:
            out.append(np.zeros(shape, dtype))
    return out


@dataclass(eq=False)
class LoadedVariant:
    variant: Variant
    #: its compute workers (one batcher and session each; placement may add more); a
    #: private head's is its view of the shared base's workers
    batcher: WorkerPool | HeadPool
    memory_bytes: int
    heat: float = 0.0
    last_used: float = 0.0
    #: what opens one more session for another worker: (runtime, artifact path)
    opener: tuple[ModelRuntime, str] | None = None

    def score(self, now: float, half_life_s: float) -> float:
        """Recent load, decayed by the time since the last request."""
        return self.heat * 0.5 ** (max(now - self.last_used, 0.0) / half_life_s)

    def touch(self, now: float, half_life_s: float) -> None:
        self.heat = self.score(now, half_life_s) + 1.0
        self.last_used = now


class ModelManager:
    """Loads, evicts and profiles the variants one node hosts. An async context manager."""

    def __init__(self, config: ModelConfig, variants: Mapping[str, Variant],
                 artifacts: ArtifactSource, compute: Executor, *,
                 metrics: NodeMetrics | None = None,
                 on_change: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic,
                 runtimes: RuntimeLookup = runtime_for,
                 on_batch: Callable[[str, float], None] | None = None,
                 bases: Callable[[str], Variant | None] = lambda name: None,
                 heads_on: Callable[[str], bool] = lambda name: False) -> None:
        """``on_batch``: told (variant, compute seconds) after every batch (placement's
        measure of how busy each variant's workers are). ``bases``: looks up the base
        variant of a private head (the registry's; the base need not be hosted here);
        ``heads_on``: whether a variant has private heads registered on it (then it loads
        as a shared base instance, which its heads here will use too)."""
        self.config = config
        self._on_batch = on_batch
        #: format -> the runtime that loads and runs it (injected: tests wrap the real ones)
        self._runtime_for = runtimes
        self.variants: dict[str, Variant] = dict(variants)
        self.artifacts = artifacts
        self._compute = compute
        self._metrics = metrics
        self._on_change = on_change
        self._clock = clock
        self.loaded: dict[str, LoadedVariant] = {}
        self.unavailable: dict[str, str] = {}
        #: what clients are told instead, where the reason holds a runtime's own words
        self._public_reasons: dict[str, str] = {}
        self._loading: dict[str, asyncio.Task[LoadedVariant]] = {}
        self._waiting: dict[str, int] = {}
        self._reserved = 0
        self._loader: ThreadPoolExecutor | None = None
        self._bases = bases
        self._heads_on = heads_on
        #: loaded base instances of private heads, by (base variant, owner)
        self.shared: dict[tuple[str, str], SharedBase] = {}
        self._shared_loading: dict[tuple[str, str], asyncio.Task[SharedBase]] = {}

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> ModelManager:
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_all([*self._loading.values(), *self._shared_loading.values()])
        for name in list(self.loaded):
            await self._unload(name)
        for shared in list(self.shared.values()):
            await self._close_shared(shared)
        if self._loader is not None:
            self._loader.shutdown(wait=True, cancel_futures=True)
            self._loader = None

    # ------------------------------------------------------------------ queries
    @property
    def memory_used(self) -> int:
        return sum(e.memory_bytes for e in self.loaded.values()) + self._reserved + sum(
            s.memory_bytes for s in self.shared.values())

    def need_bytes(self, name: str) -> int:
        """Memory loading ``name`` takes now: for a private head, the head's own, plus its
        base's while no instance of that base it may use is loaded."""
        variant = self.variants[name]
        if not variant.base:
            if (name, "") in self.shared:  # loaded for heads already: served from there
                return 0
            return estimate_bytes(variant, self.config.profile_key, self.config.size_factor)
        head = variant_memory_bytes(variant, variant.head_profile, self.config.size_factor)
        base = self._base_of(variant)
        if base is None or instance_key(variant, self.config.isolated_tenants) in self.shared:
            return head
        return head + estimate_bytes(base, self.config.profile_key, self.config.size_factor)

    def _base_of(self, head: Variant) -> Variant | None:
        return self.variants.get(head.base) or self._bases(head.base)

    def gauges(self) -> dict[str, VariantGauge]:
        out = {}
        for name in self.variants:
            entry = self.loaded.get(name)
            out[name] = VariantGauge(entry.batcher.depth if entry else 0, entry is not None,
                                     entry.memory_bytes if entry else 0)
        return out

    def state_of(self, name: str) -> str:
        if name in self.loaded:
            return "loaded"
        if name in self._loading:
            return "loading"
        if name in self.unavailable:
            return "unavailable"
        return "unloaded"

    # ------------------------------------------------------------------ serving
    def get(self, name: str) -> LoadedVariant | None:
        """The loaded variant (counting this use), or None. Never waits."""
        entry = self.loaded.get(name)
        if entry is not None:
            entry.touch(self._clock(), self.config.heat_half_life_s)
        return entry

    async def acquire(self, name: str) -> LoadedVariant:
        """The loaded variant, loading it first if needed (one load however many ask).

        Raises :class:`Unavailable` (with the reason) for a variant that is not
        hosted here or failed to load, :class:`Overloaded` when too many
        requests already wait for its load or memory is held by busy variants.
        """
        entry = self.get(name)
        if entry is not None:
            return entry
        if name not in self.variants:
            raise Unavailable(f"variant {name} is not hosted on this node")
        if name in self.unavailable:
            raise Unavailable(f"variant {name} is unavailable here: {self._public_reasons[name]}")
        task = self._loading.get(name)
        if task is None:
            task = asyncio.create_task(self._load(name), name=f"load:{name}")
            self._loading[name] = task
            task.add_done_callback(lambda _t: self._loading.pop(name, None))
        waiting = self._waiting.get(name, 0)
        if waiting >= self.config.max_queue:
            raise Overloaded(f"{waiting} requests already wait for {name} to load; retry shortly",
                             retry_after_s=1.0)
        self._waiting[name] = waiting + 1
        try:
            entry = await asyncio.shield(task)
        finally:
            self._waiting[name] -= 1
        entry.touch(self._clock(), self.config.heat_half_life_s)
        return entry

    async def preload(self, names: Iterable[str]) -> None:
        """Load ``names`` smallest first while they fit without evicting anything."""
        for name in sorted(names, key=self.need_bytes):
            if name in self.loaded or name in self.unavailable:
                continue
            if self.memory_used + self.need_bytes(name) > self.config.budget_bytes:
                if self.need_bytes(name) > self.config.budget_bytes:
                    self._mark(name, self._too_big(name))
                continue
            try:
                await self.acquire(name)
            except MeshError as exc:
                log.warning("preloading %s: %s", name, exc.message)

    # ------------------------------------------------------------------ loading
    def _too_big(self, name: str) -> str:
        return (f"needs about {self.need_bytes(name) / _MB:.1f} MB of memory, more than this "
                f"node's {self.config.budget_bytes / _MB:.1f} MB for models (out of memory)")

    def _mark(self, name: str, reason: str, *, public: str | None = None) -> None:
        """``reason`` is for operators (status, log); ``public``, when given, is what clients see."""
        self.unavailable[name] = reason
        self._public_reasons[name] = public or reason
        log.warning("variant %s unavailable: %s", name, reason)
        if self._metrics is not None:
            self._metrics.loaded(name, "failed")
        self._on_change()

    async def _load(self, name: str) -> LoadedVariant:
        variant = self.variants[name]
        need = self.need_bytes(name)
        if need > self.config.budget_bytes:
            self._mark(name, self._too_big(name))
            raise Unavailable(f"variant {name} is unavailable here: {self.unavailable[name]}")
        if variant.base:
            return await self._load_head(name, variant)
        if len(variant.outputs) == 1 and self._heads_on(name):
            return await self._load_head(name, variant, base=variant)
        runtime, path, session = await self._open_session(name, variant, need)
        batcher = self._batcher(variant, runtime, session)
        await batcher.__aenter__()
        entry = LoadedVariant(variant, WorkerPool(name, batcher), need,
                              opener=(runtime, str(path)))
        self._loaded(entry)
        return entry

    def _loaded(self, entry: LoadedVariant) -> None:
        name, need = entry.variant.name, entry.memory_bytes
        entry.touch(self._clock(), self.config.heat_half_life_s)
        self.loaded[name] = entry
        if self._metrics is not None:
            self._metrics.loaded(name, "loaded")
        log.info("loaded %s (~%.1f MB, %.1f of %.1f MB used)", name, need / _MB,
                 self.memory_used / _MB, self.config.budget_bytes / _MB)
        self._on_change()

    async def _open_session(self, name: str, variant: Variant, need: int,
                            warm: tuple[TensorSpec, ...] | None = None
                            ) -> tuple[ModelRuntime, Any, Any]:
        """Pull ``variant``'s artifact, make room for ``need`` bytes and open a warmed-up
        session (with ``warm``'s shapes; default: the variant's inputs). What fails marks
        ``name`` unavailable with the reason (``name`` is the variant being loaded: a
        head, when this opens its base)."""
        try:
            runtime = self._runtime_for(variant.format)
            path = await self.artifacts.ensure(variant.sha256)
        except ArtifactNotFound as exc:
            self._mark(name, exc.message)
            raise Unavailable(f"variant {name} is unavailable here: {exc.message}") from None
        except RuntimeMissing as exc:  # this node cannot run it until someone installs more
            self._mark(name, exc.message)
            raise
        await self._make_room(need, for_variant=name)
        self._reserved += need
        loop = asyncio.get_running_loop()
        try:
            session = await loop.run_in_executor(self._loader, _open, runtime, str(path),
                                                 warm or variant.inputs, self.config.threads)
        except MemoryError:
            self._mark(name, "out of memory while loading")
            raise Unavailable(f"variant {name} is unavailable here: out of memory while loading"
                              ) from None
        except Exception as exc:  # a corrupt model must not take the node down
            detail = str(exc).replace(str(path), f"<{variant.name} artifact>")[:300]
            # the runtime's words go to the node's status (operators), never to clients
            public = "failed to load (the node's status says why)"
            self._mark(name, f"failed to load: {type(exc).__name__}: {detail}", public=public)
            self.artifacts.forget(variant.sha256)
            raise Unavailable(f"variant {name} is unavailable here: {public}") from None
        finally:
            self._reserved -= need
        return runtime, path, session

    # ------------------------------------------------------------------ private heads
    async def _load_head(self, name: str, variant: Variant, base: Variant | None = None
                         ) -> LoadedVariant:
        """Load a private head onto its base's instance (loading that first if needed).
        ``base`` given: ``variant`` is that base itself, served from the shared instance as
        it is (its features are its answer), so that heads and the base's own queries share
        one copy and its batches."""
        identity = base is not None
        base = base or self._base_of(variant)
        if base is None:
            self._mark(name, f"its base variant {variant.base} is not registered")
            raise Unavailable(f"variant {name} is unavailable here: {self.unavailable[name]}")
        key = (base.name, "") if identity else instance_key(variant,
                                                             self.config.isolated_tenants)
        shared = await self._shared_instance(name, key, base)
        need = 0 if identity else variant_memory_bytes(variant, variant.head_profile,
                                                       self.config.size_factor)
        runtime: ModelRuntime | None = None
        session: Any = None
        shared.pending += 1  # from here on, no other head's unloading closes the instance
        try:
            plain = self.loaded.get(base.name)
            if not key[1] and plain is not None and not isinstance(plain.batcher, HeadPool):
                # the base was loaded on its own before heads were registered on it: once
                # idle, its own queries move onto the shared instance (at no cost there)
                await self.unload(base.name)
            if not identity:
                features = TensorSpec("features", "float32", base.outputs[0].shape)
                runtime, _path, session = await self._open_session(name, variant, need,
                                                                   warm=(features,))
        except BaseException:
            shared.pending -= 1
            if shared.remove_head(name):
                await self._close_shared(shared)
            raise
        shared.pending -= 1
        width = variant.outputs[0].shape[-1]
        index = shared.add_head(name, runtime, session, width)
        entry = LoadedVariant(variant, HeadPool(shared, name, index, width), need)
        self._loaded(entry)
        return entry

    async def _shared_instance(self, name: str, key: tuple[str, str], base: Variant
                               ) -> SharedBase:
        """The loaded instance ``key`` of ``base`` (one load however many heads ask)."""
        shared = self.shared.get(key)
        if shared is not None:
            return shared
        task = self._shared_loading.get(key)
        if task is None:
            task = asyncio.create_task(self._open_shared(name, key, base),
                                       name=f"load-base:{key[0]}")
            self._shared_loading[key] = task
            task.add_done_callback(lambda _t: self._shared_loading.pop(key, None))
        return await asyncio.shield(task)

    async def _open_shared(self, name: str, key: tuple[str, str], base: Variant) -> SharedBase:
        need = estimate_bytes(base, self.config.profile_key, self.config.size_factor)
        runtime, path, session = await self._open_session(name, base, need)
        shared = SharedBase(key, base, need)
        shared.opener = (runtime, str(path))
        shared.pool = WorkerPool(base.name, await self._shared_batcher(shared, runtime, session))
        self.shared[key] = shared
        log.info("loaded base %s%s for private heads (~%.1f MB)", base.name,
                 f" (tenant {key[1]}'s own)" if key[1] else "", need / _MB)
        return shared

    async def _shared_batcher(self, shared: SharedBase, runtime: ModelRuntime,
                              session: Any) -> Batcher:
        cfg = self.config
        base = shared.base
        max_batch = min(base.max_batch, cfg.batching.max_batch or base.max_batch)
        policy = BatchPolicy(max_batch, base.profile_for(cfg.profile_key), cfg.batching)
        run, observer = shared.make_run(runtime, session, self._head_batch)
        batcher = Batcher(f"{base.name}+heads", run, self._compute, max_batch=max_batch,
                          max_queue=cfg.max_queue, policy=policy, observer=observer)
        await batcher.__aenter__()
        return batcher

    def _head_batch(self, name: str, rows: int, compute_ms: float) -> None:
        """A head's share of a shared batch, told to whoever watches batches."""
        if self._metrics is not None:
            self._metrics.batch(name, rows, compute_ms)
        if self._on_batch is not None:
            self._on_batch(name, compute_ms / 1000.0)

    async def _close_shared(self, shared: SharedBase) -> None:
        if self.shared.get(shared.key) is shared:
            del self.shared[shared.key]
        if shared.pool is not None:
            await shared.pool.__aexit__(None, None, None)
        log.info("unloaded base %s (no private head left on it)", shared.base.name)

    def _batcher(self, variant: Variant, runtime: ModelRuntime, session: Any) -> Batcher:
        cfg = self.config
        max_batch = min(variant.max_batch, cfg.batching.max_batch or variant.max_batch)
        policy = BatchPolicy(max_batch, variant.profile_for(cfg.profile_key), cfg.batching)
        observer = self._metrics.batch_observer(variant.name) if self._metrics else None
        if self._on_batch is not None:
            observer = _also_tell(observer, self._on_batch, variant.name)

        def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
            return runtime.run(session, inputs)

        return Batcher(variant.name, run, self._compute, max_batch=max_batch,
                       max_queue=cfg.max_queue, policy=policy, observer=observer)

    async def _make_room(self, need: int, *, for_variant: str, keep: str | None = None) -> None:
        budget = self.config.budget_bytes
        while self.memory_used + need > budget:
            now = self._clock()
            idle = [e for e in self.loaded.values() if e.batcher.idle and e.variant.name != keep]
            if not idle:
                raise Overloaded(
                    f"no memory free for {for_variant}: the variants loaded here are all in use; "
                    "retry shortly", retry_after_s=1.0)
            victim = min(idle, key=lambda e: (e.score(now, self.config.heat_half_life_s),
                                              e.last_used))
            log.info("evicting %s (temperature %.2f) to make room for %s", victim.variant.name,
                     victim.score(now, self.config.heat_half_life_s), for_variant)
            if self._metrics is not None:
                self._metrics.evicted(victim.variant.name)
            await self._unload(victim.variant.name)

    async def unload(self, name: str) -> bool:
        """Evict ``name`` if it is loaded and idle (placement's decision); True when it was.
        A variant with queries queued or running is left loaded."""
        entry = self.loaded.get(name)
        if entry is None or not entry.batcher.idle:
            return False
        if self._metrics is not None:
            self._metrics.evicted(name)
        await self._unload(name)
        return True

    async def set_workers(self, name: str, workers: int) -> int:
        """Run ``name`` with ``workers`` compute workers (placement's decision), each on a
        session of its own; returns how many it has now. Workers beyond the first take the
        memory of another session, made room for by evicting idle variants; when there is
        none, it stops short (and says so in the log). Not loaded: nothing happens (0).
        A private head (or a base with heads) sets the workers of the base instance it runs
        on, which every head on it shares (:meth:`sharing`)."""
        workers = max(int(workers), 1)
        entry = self.loaded.get(name)
        if entry is None:
            return 0
        if isinstance(entry.batcher, HeadPool):
            shared = entry.batcher.shared
            holder: LoadedVariant | SharedBase = shared
            pool, opener, base = shared.pool, shared.opener, shared.base
            per_worker = estimate_bytes(base, self.config.profile_key, self.config.size_factor)

            def alive() -> bool:
                return self.shared.get(shared.key) is shared and name in self.loaded

            async def worker(runtime: ModelRuntime, session: Any) -> Batcher:
                return await self._shared_batcher(shared, runtime, session)
        else:
            holder, pool, opener, base = entry, entry.batcher, entry.opener, entry.variant
            per_worker = self.need_bytes(name)

            def alive() -> bool:
                return self.loaded.get(name) is entry

            async def worker(runtime: ModelRuntime, session: Any) -> Batcher:
                batcher = self._batcher(entry.variant, runtime, session)
                await batcher.__aenter__()
                return batcher
        if opener is None or not isinstance(pool, WorkerPool):
            return 0
        while pool.workers > workers and pool.retire():
            holder.memory_bytes -= per_worker
        runtime, path = opener
        loop = asyncio.get_running_loop()
        while pool.workers < workers and alive():
            try:
                await self._make_room(per_worker, for_variant=name, keep=name)
            except Overloaded:
                log.info("%s stays at %d worker(s): no memory for another session", name,
                         pool.workers)
                break
            self._reserved += per_worker
            try:
                session = await loop.run_in_executor(self._loader, _open, runtime, path,
                                                     base.inputs, self.config.threads)
            except Exception as exc:  # noqa: BLE001 - the variant keeps the workers it has
                log.warning("%s: another worker could not open a session: %s", name, exc)
                break
            finally:
                self._reserved -= per_worker
            if not alive():  # unloaded meanwhile
                break
            pool.add(await worker(runtime, session))
            holder.memory_bytes += per_worker
            log.info("%s: %d compute worker(s)", name, pool.workers)
        self._on_change()
        return pool.workers

    def sharing(self, name: str) -> list[str]:
        """The loaded variants whose compute workers are ``name``'s: the variants on its
        base instance when it runs on one, else ``name`` alone."""
        entry = self.loaded.get(name)
        if entry is not None and isinstance(entry.batcher, HeadPool):
            return [n for n in entry.batcher.shared.heads if n in self.loaded]
        return [name]

    def workers(self, name: str) -> int:
        entry = self.loaded.get(name)
        return entry.batcher.workers if entry is not None else 0

    async def _unload(self, name: str) -> None:
        entry = self.loaded.pop(name, None)
        if entry is None:
            return
        await entry.batcher.__aexit__(None, None, None)
        if isinstance(entry.batcher, HeadPool):
            shared = entry.batcher.shared
            if shared.remove_head(name):
                await self._close_shared(shared)
        self._on_change()

    # ------------------------------------------------------------------ profiling
    async def profile_missing(self) -> dict[str, Profile]:
        """Profile, on this node, every variant without a profile for its hardware class.

        Returns the new profiles (also applied to :attr:`variants`). A
        variant that cannot be profiled is marked unavailable.
        """
        key = self.config.profile_key
        made: dict[str, Profile] = {}
        # whole models first: a private head's profile is its base's plus its own
        for name, variant in sorted(self.variants.items(), key=lambda kv: (bool(kv[1].base),
                                                                         kv[0])):
            if key in variant.profiles or name in self.unavailable:
                continue
            if variant.base:
                profile = await self._head_profile(name, variant, made)
            else:
                profile = await self._measured(name, variant)
            if profile is None:
                continue
            made[name] = profile
            self.variants[name] = replace(variant, profiles={**variant.profiles, key: profile})
        return made

    async def _measured(self, name: str, variant: Variant) -> Profile | None:
        """``variant``'s profile here (cached, else measured); None with ``name`` marked
        unavailable when it cannot be profiled."""
        profile = self._cached_profile(variant)
        if profile is not None:
            return profile
        try:
            self._runtime_for(variant.format)  # a missing backend fails here, clearly
            path = await self.artifacts.ensure(variant.sha256)
            log.info("profiling %s on %s (no profile for this hardware class)", variant.name,
                     self.config.profile_key)
            profile = await asyncio.get_running_loop().run_in_executor(
                self._loader, _profile, variant, str(path), self.config.threads)
        except (ArtifactNotFound, Unavailable) as exc:
            self._mark(name, f"cannot be profiled here: {exc.message}")
            return None
        except Exception as exc:  # noqa: BLE001 - same as a failed load
            self._mark(name, f"cannot be profiled here: {type(exc).__name__}: {exc}"[:300],
                       public="cannot be profiled here (the node's status says why)")
            return None
        self._store_profile(variant, profile)
        return profile

    async def _head_profile(self, name: str, head: Variant, made: dict[str, Profile]
                            ) -> Profile | None:
        """A private head's profile here: its base's (measured here when it has none for
        this class) plus the head's own, which the factory measured."""
        base = self._base_of(head)
        if base is None or head.head_profile is None:
            self._mark(name, f"cannot be profiled here: its base {head.base} is not registered"
                       if base is None else "cannot be profiled here: it has no head profile")
            return None
        base_profile = base.profiles.get(self.config.profile_key) or made.get(base.name) \
            or await self._measured(name, base)
        return None if base_profile is None else compose_profile(base_profile, head.head_profile)

    def _profile_path(self, variant: Variant) -> Path | None:
        root = self.config.profile_cache
        return None if root is None else root / self.config.profile_key / f"{variant.sha256}.json"

    def _cached_profile(self, variant: Variant) -> Profile | None:
        path = self._profile_path(variant)
        if path is None or not path.is_file():
            return None
        try:
            return Profile.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            return None

    def _store_profile(self, variant: Variant, profile: Profile) -> None:
        path = self._profile_path(variant)
        if path is None:
            return
        write_atomic(path, json.dumps(profile.to_json()))  # fsynced: survives a crash


def _also_tell(observer: Callable[[int, float], None] | None,
               told: Callable[[str, float], None], name: str) -> Callable[[int, float], None]:
    """A batch observer that also tells ``told`` (variant, compute seconds)."""
    def observe(rows: int, compute_ms: float) -> None:
        if observer is not None:
            observer(rows, compute_ms)
        told(name, compute_ms / 1000.0)
    return observe


def _open(runtime: ModelRuntime, path: str, inputs: tuple[TensorSpec, ...], threads: int) -> Any:
    """Open a session and warm it up with one batch-1 run of ``inputs`` (loader thread)."""
    session = runtime.load(path, threads=threads)
    runtime.run(session, sample_inputs(inputs, 1))
    return session


def _profile(variant: Variant, path: str, threads: int) -> Profile:
    """latency(batch), cold start and peak memory of ``variant`` here (loader thread)."""
    from mesh.variants.profile import batch_sizes_up_to, profile_variant

    return profile_variant(path, variant.format, variant.inputs, threads=threads,
                           batch_sizes=batch_sizes_up_to(variant.max_batch))
