"""The model manager on real ONNX variants: memory budget, eviction, failures, single loads."""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.errors import Overloaded, Unavailable
from mesh.registry import Registry, Variant
from mesh.runtimes import runtime_for
from mesh.store import ArtifactStore
from nodes.agent import NodeAgent
from nodes.artifacts import ArtifactSource
from nodes.batching import BatchSettings
from nodes.metrics import NodeMetrics
from nodes.models import ModelConfig, ModelManager, estimate_bytes


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _variants(home: Path) -> dict[str, Variant]:
    return dict(Registry.load(home).variants)


def _need(variants: dict[str, Variant], name: str, config: ModelConfig) -> int:
    return estimate_bytes(variants[name], config.profile_key, config.size_factor)


def _manager(home: Path, variants: dict[str, Variant], pool: ThreadPoolExecutor, *,
             budget_bytes: int, clock: _Clock | None = None, metrics: NodeMetrics | None = None,
             profile_key: str = "cpu-1t", runtimes: Any = runtime_for, **config: Any
             ) -> ModelManager:
    store = ArtifactStore(home / "store")
    artifacts = ArtifactSource(store, known=lambda: {v.sha256 for v in variants.values()})
    cfg = ModelConfig(budget_bytes=budget_bytes, threads=1, profile_key=profile_key,
                      batching=BatchSettings(inline_max_ms=0.0), **config)
    return ModelManager(cfg, variants, artifacts, pool, metrics=metrics,
                        clock=clock or _Clock(), runtimes=runtimes)


async def test_loading_stays_within_budget_and_evicts_the_coldest(digits_home: Path) -> None:
    variants = _variants(digits_home)
    probe = ModelConfig(budget_bytes=1, threads=1, profile_key="cpu-1t")
    needs = {n: _need(variants, n, probe) for n in variants}
    budget = needs["digits-cnn"] + max(needs["digits-linear"], needs["digits-mlp"])  # two fit, not 3
    clock, metrics = _Clock(), NodeMetrics()
    with ThreadPoolExecutor(1) as pool:
        async with _manager(digits_home, variants, pool, budget_bytes=budget, clock=clock,
                            metrics=metrics) as manager:
            await manager.acquire("digits-linear")
            clock.now += 1
            mlp = await manager.acquire("digits-mlp")
            for _ in range(5):  # the MLP is busier, recently
                clock.now += 1
                manager.get("digits-mlp")
                await mlp.batcher.submit([np.zeros((1, 64), np.float32)])
            clock.now += 1
            await manager.acquire("digits-cnn")
            assert set(manager.loaded) == {"digits-mlp", "digits-cnn"}
            assert manager.memory_used <= budget
            assert metrics.evictions == {"digits-linear": 1}
            # the evicted variant comes back on demand, pushing out the coldest again
            clock.now += 100  # the MLP's heat decays: the CNN (used once, later) is warmer
            manager.get("digits-cnn")
            await manager.acquire("digits-linear")
            assert set(manager.loaded) == {"digits-linear", "digits-cnn"}
            assert manager.state_of("digits-mlp") == "unloaded"
            assert manager.unavailable == {}


async def test_variants_in_use_are_never_evicted(digits_home: Path, onnx_probe: Any) -> None:
    variants = _variants(digits_home)
    probe = ModelConfig(budget_bytes=1, threads=1, profile_key="cpu-1t")
    budget = max(_need(variants, n, probe) for n in variants)  # room for one
    with ThreadPoolExecutor(1) as pool:
        async with _manager(digits_home, variants, pool, budget_bytes=budget,
                            runtimes=onnx_probe.lookup) as manager:
            linear = await manager.acquire("digits-linear")
            onnx_probe.gate.clear()
            busy = asyncio.create_task(linear.batcher.submit([np.zeros((1, 64), np.float32)]))
            await asyncio.sleep(0.05)
            with pytest.raises(Overloaded, match="all in use") as info:
                await manager.acquire("digits-mlp")
            assert info.value.status == 429 and info.value.retry_after_s
            assert set(manager.loaded) == {"digits-linear"}
            assert "digits-mlp" not in manager.unavailable  # transient, not marked
            onnx_probe.gate.set()
            await busy
            await manager.acquire("digits-mlp")  # now the idle linear model makes room
            assert set(manager.loaded) == {"digits-mlp"}


async def test_concurrent_requests_for_an_unloaded_variant_cause_one_load(
        digits_home: Path, onnx_probe: Any) -> None:
    variants = _variants(digits_home)
    with ThreadPoolExecutor(1) as pool:
        async with _manager(digits_home, variants, pool, budget_bytes=1 << 30,
                            runtimes=onnx_probe.lookup) as manager:
            entries = await asyncio.gather(*(manager.acquire("digits-cnn") for _ in range(20)))
    assert len({id(e) for e in entries}) == 1
    assert len(onnx_probe.loads) == 1


async def test_a_corrupt_model_is_unavailable_with_its_reason_and_the_rest_load(
        digits_home: Path) -> None:
    variants = _variants(digits_home)
    store = ArtifactStore(digits_home / "store")
    garbage = store.put_bytes(b"this is not an onnx model" * 10)  # hashes fine, loads badly
    variants["digits-broken"] = dataclasses.replace(variants["digits-mlp"], name="digits-broken",
                                                    sha256=garbage, size_bytes=250)
    metrics = NodeMetrics()
    with ThreadPoolExecutor(1) as pool:
        async with _manager(digits_home, variants, pool, budget_bytes=1 << 30,
                            metrics=metrics) as manager:
            with pytest.raises(Unavailable, match="failed to load") as info:
                await manager.acquire("digits-broken")
            reason = manager.unavailable["digits-broken"]
            assert reason.startswith("failed to load: ")  # for operators, with the runtime's words
            assert str(digits_home) not in reason and str(digits_home) not in info.value.message
            # clients get no runtime text, path or exception class
            assert "Error" not in info.value.message and "Fail" not in info.value.message
            assert "status says why" in info.value.message
            with pytest.raises(Unavailable, match="unavailable here: failed to load"):
                await manager.acquire("digits-broken")  # marked: no second attempt
            await manager.preload(["digits-linear", "digits-mlp", "digits-cnn"])
            assert set(manager.loaded) == {"digits-linear", "digits-mlp", "digits-cnn"}
    assert metrics.loads[("digits-broken", "failed")] == 1


async def test_a_variant_larger_than_the_budget_is_unavailable_out_of_memory(
        digits_home: Path) -> None:
    variants = _variants(digits_home)
    probe = ModelConfig(budget_bytes=1, threads=1, profile_key="cpu-1t")
    budget = _need(variants, "digits-cnn", probe) - 1
    with ThreadPoolExecutor(1) as pool:
        async with _manager(digits_home, variants, pool, budget_bytes=budget) as manager:
            await manager.preload(list(variants))
            assert "out of memory" in manager.unavailable["digits-cnn"]
            with pytest.raises(Unavailable, match="out of memory"):
                await manager.acquire("digits-cnn")
            assert manager.loaded  # what fits is served


async def test_a_missing_artifact_without_parent_is_unavailable(digits_home: Path) -> None:
    variants = _variants(digits_home)
    path = ArtifactStore(digits_home / "store").path(variants["digits-cnn"].sha256)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:1000])  # truncated: no longer hashes to its name
    with ThreadPoolExecutor(1) as pool:
        async with _manager(digits_home, variants, pool, budget_bytes=1 << 30) as manager:
            with pytest.raises(Unavailable, match="missing or corrupt"):
                await manager.acquire("digits-cnn")
            assert "no parent" in manager.unavailable["digits-cnn"]
            await manager.acquire("digits-mlp")


async def test_a_hardware_class_without_profiles_is_profiled_once_and_cached(
        digits_home: Path) -> None:
    variants = {n: v for n, v in _variants(digits_home).items() if n != "digits-cnn"}
    cache = digits_home / "profiles"
    with ThreadPoolExecutor(1) as pool:
        async with _manager(digits_home, variants, pool, budget_bytes=1 << 30,
                            profile_cache=cache, profile_key="cpu-7t") as manager:
            made = await manager.profile_missing()
            assert set(made) == {"digits-linear", "digits-mlp"}
            for name, profile in made.items():
                assert {1, 8, 32} <= set(profile.batch_ms) and profile.cold_start_ms > 0
                assert profile.peak_memory_bytes > 0  # measured, so the budget can use it
                assert manager.variants[name].profiles["cpu-7t"] == profile
                assert (cache / "cpu-7t" / f"{variants[name].sha256}.json").is_file()
    with ThreadPoolExecutor(1) as pool:
        async with _manager(digits_home, variants, pool, budget_bytes=1 << 30,
                            profile_cache=cache, profile_key="cpu-7t") as again:
            assert await again.profile_missing() == made  # read back, not measured again


async def test_a_node_on_an_unprofiled_hardware_class_profiles_before_it_serves(
        solo_config: Any, digits_home: Path) -> None:
    config = solo_config(["digits-linear", "digits-mlp"], hardware={"threads": 3})
    assert config.topology.hardware_of("solo-1").profile_key == "cpu-3t"
    async with NodeAgent(config) as agent:
        assert agent.ready
        for name in ("digits-linear", "digits-mlp"):
            assert "cpu-3t" in agent.registry.get(name).profiles
        assert {v.name for v in agent.planner.hosted("solo-1")} == {"digits-linear", "digits-mlp"}
        assert set(agent.loaded) == {"digits-linear", "digits-mlp"}
    assert len(list((digits_home / "profiles" / "cpu-3t").glob("*.json"))) == 2


async def test_placement_gives_a_variant_more_workers_each_with_its_own_session(
        digits_home: Path, onnx_probe: Any) -> None:
    variants = _variants(digits_home)
    probe_cfg = ModelConfig(budget_bytes=1, threads=1, profile_key="cpu-1t")
    need = _need(variants, "digits-mlp", probe_cfg)
    with ThreadPoolExecutor(4) as pool:
        async with _manager(digits_home, variants, pool, budget_bytes=need * 3 + 1,
                            runtimes=onnx_probe.lookup) as manager:
            entry = await manager.acquire("digits-mlp")
            assert await manager.set_workers("digits-mlp", 3) == 3
            assert len(onnx_probe.loads) == 3  # a session per worker
            assert manager.memory_used == 3 * need  # each worker's session counts
            # Four slow queries at once run side by side on the three workers.
            onnx_probe.gate.clear()
            rows = np.zeros((1, 64), np.float32)
            queries = [asyncio.create_task(entry.batcher.submit([rows])) for _ in range(4)]
            await asyncio.sleep(0.2)
            assert entry.batcher.depth == 4
            onnx_probe.gate.set()
            await asyncio.gather(*queries)
            assert entry.batcher.served == 4
            # No memory for a fourth: it stays at three and says so in the log.
            assert await manager.set_workers("digits-mlp", 4) == 3


async def test_workers_taken_back_finish_what_they_hold_first(digits_home: Path,
                                                              onnx_probe: Any) -> None:
    variants = _variants(digits_home)
    with ThreadPoolExecutor(4) as pool:
        async with _manager(digits_home, variants, pool, budget_bytes=1 << 30,
                            runtimes=onnx_probe.lookup) as manager:
            entry = await manager.acquire("digits-mlp")
            await manager.set_workers("digits-mlp", 2)
            before = manager.memory_used
            onnx_probe.gate.clear()
            rows = np.zeros((1, 64), np.float32)
            queries = [asyncio.create_task(entry.batcher.submit([rows])) for _ in range(4)]
            await asyncio.sleep(0.2)
            assert await manager.set_workers("digits-mlp", 1) == 1
            assert manager.memory_used < before
            assert not entry.batcher.idle  # the retired worker still holds its queries
            onnx_probe.gate.set()
            answers = await asyncio.gather(*queries)  # none of them fails
            assert all(a.outputs[0].shape == (1, 10) for a in answers)
            await asyncio.sleep(0.1)
            assert entry.batcher.idle and entry.batcher.workers == 1 and entry.batcher.served == 4
