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
from mesh.registry import Profile, TensorSpec, Variant
from mesh.runtimes import ModelRuntime, runtime_for
from nodes.artifacts import ArtifactSource
from nodes.batching import Batcher, BatchPolicy, BatchSettings
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
    #: its compute workers (one batcher and session each; placement may add more)
    batcher: WorkerPool
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
                 on_batch: Callable[[str, float], None] | None = None) -> None:
        """``on_batch``: told (variant, compute seconds) after every batch (placement's
        measure of how busy each variant's workers are)."""
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

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> ModelManager:
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_all(list(self._loading.values()))
        for name in list(self.loaded):
            await self._unload(name)
        if self._loader is not None:
            self._loader.shutdown(wait=True, cancel_futures=True)
            self._loader = None

    # ------------------------------------------------------------------ queries
    @property
    def memory_used(self) -> int:
        return sum(e.memory_bytes for e in self.loaded.values()) + self._reserved

    def need_bytes(self, name: str) -> int:
        return estimate_bytes(self.variants[name], self.config.profile_key, self.config.size_factor)

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
            session = await loop.run_in_executor(self._loader, _open, runtime, str(path), variant,
                                                 self.config.threads)
        except MemoryError:
            self._mark(name, "out of memory while loading")
            raise Unavailable(f"variant {name} is unavailable here: out of memory while loading"
                              ) from None
        except Exception as exc:  # a corrupt model must not take the node down
            detail = str(exc).replace(str(path), f"<{name} artifact>")[:300]
            # the runtime's words go to the node's status (operators), never to clients
            public = "failed to load (the node's status says why)"
            self._mark(name, f"failed to load: {type(exc).__name__}: {detail}", public=public)
            self.artifacts.forget(variant.sha256)
            raise Unavailable(f"variant {name} is unavailable here: {public}") from None
        finally:
            self._reserved -= need
        batcher = self._batcher(variant, runtime, session)
        await batcher.__aenter__()
        entry = LoadedVariant(variant, WorkerPool(name, batcher), need,
                              opener=(runtime, str(path)))
        entry.touch(self._clock(), self.config.heat_half_life_s)
        self.loaded[name] = entry
        if self._metrics is not None:
            self._metrics.loaded(name, "loaded")
        log.info("loaded %s (~%.1f MB, %.1f of %.1f MB used)", name, need / _MB,
                 self.memory_used / _MB, self.config.budget_bytes / _MB)
        self._on_change()
        return entry

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
        none, it stops short (and says so in the log). Not loaded: nothing happens (0)."""
        workers = max(int(workers), 1)
        entry = self.loaded.get(name)
        if entry is None or entry.opener is None:
            return 0
        pool = entry.batcher
        while pool.workers > workers and pool.retire():
            entry.memory_bytes -= self.need_bytes(name)
        runtime, path = entry.opener
        loop = asyncio.get_running_loop()
        while pool.workers < workers and self.loaded.get(name) is entry:
            need = self.need_bytes(name)
            try:
                await self._make_room(need, for_variant=name, keep=name)
            except Overloaded:
                log.info("%s stays at %d worker(s): no memory for another session", name,
                         pool.workers)
                break
            self._reserved += need
            try:
                session = await loop.run_in_executor(self._loader, _open, runtime, path,
                                                     entry.variant, self.config.threads)
            except Exception as exc:  # noqa: BLE001 - the variant keeps the workers it has
                log.warning("%s: another worker could not open a session: %s", name, exc)
                break
            finally:
                self._reserved -= need
            if self.loaded.get(name) is not entry:  # unloaded meanwhile
                break
            batcher = self._batcher(entry.variant, runtime, session)
            await batcher.__aenter__()
            pool.add(batcher)
            entry.memory_bytes += need
            log.info("%s: %d compute worker(s)", name, pool.workers)
        self._on_change()
        return pool.workers

    def workers(self, name: str) -> int:
        entry = self.loaded.get(name)
        return entry.batcher.workers if entry is not None else 0

    async def _unload(self, name: str) -> None:
        entry = self.loaded.pop(name, None)
        if entry is None:
            return
        await entry.batcher.__aexit__(None, None, None)
        self._on_change()

    # ------------------------------------------------------------------ profiling
    async def profile_missing(self) -> dict[str, Profile]:
        """Profile, on this node, every variant without a profile for its hardware class.

        Returns the new profiles (also applied to :attr:`variants`). A
        variant that cannot be profiled is marked unavailable.
        """
        key = self.config.profile_key
        made: dict[str, Profile] = {}
        loop = asyncio.get_running_loop()
        for name, variant in sorted(self.variants.items()):
            if key in variant.profiles or name in self.unavailable:
                continue
            profile = self._cached_profile(variant)
            if profile is None:
                try:
                    self._runtime_for(variant.format)  # a missing backend fails here, clearly
                    path = await self.artifacts.ensure(variant.sha256)
                    log.info("profiling %s on %s (no profile for this hardware class)", name, key)
                    profile = await loop.run_in_executor(self._loader, _profile, variant, str(path),
                                                         self.config.threads)
                except (ArtifactNotFound, Unavailable) as exc:
                    self._mark(name, f"cannot be profiled here: {exc.message}")
                    continue
                except Exception as exc:  # noqa: BLE001 - same as a failed load
                    self._mark(name, f"cannot be profiled here: {type(exc).__name__}: {exc}"[:300],
                               public="cannot be profiled here (the node's status says why)")
                    continue
                self._store_profile(variant, profile)
            made[name] = profile
            self.variants[name] = replace(variant, profiles={**variant.profiles, key: profile})
        return made

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


def _open(runtime: ModelRuntime, path: str, variant: Variant, threads: int) -> Any:
    """Open a session and warm it up with one batch-1 run (loader thread)."""
    session = runtime.load(path, threads=threads)
    runtime.run(session, sample_inputs(variant.inputs, 1))
    return session


def _profile(variant: Variant, path: str, threads: int) -> Profile:
    """latency(batch), cold start and peak memory of ``variant`` here (loader thread)."""
    from mesh.variants.profile import batch_sizes_up_to, profile_variant

    return profile_variant(path, variant.format, variant.inputs, threads=threads,
                           batch_sizes=batch_sizes_up_to(variant.max_batch))
