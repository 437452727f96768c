"""Private heads on a shared base, on a real node: each tenant gets its own head's answers,
the base is loaded once and runs once per batch for every tenant that shares it, a tenant
that will not share gets its own base, and nobody else can see a tenant's head."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.errors import UnknownTask
from mesh.registry import Registry
from mesh.store import ArtifactStore
from mesh.tenants import new_key
from mesh.topology import parse_topology
from mesh.variants.dataset import Dataset
from mesh.variants.recipes import run_artifact
from mesh.variants.sentences import SentenceTokenizer
from mesh.variants.topics import load_topics
from mesh.wire import SLO, InferRequest
from nodes.agent import AgentConfig
from tests.conftest import HEAD_TOPICS

KEYS = {name: new_key() for name in ("acme", "globex", "initech")}


def _config(home: Path, *, share: dict[str, bool] | None = None,
            variants: list[str] | None = None) -> AgentConfig:
    share = share or {}
    topology = parse_topology({
        "name": "heads",
        "hardware": {"box": {"kind": "cpu", "threads": 1, "memory_mb": 2048}},
        "nodes": [{"name": "solo-1", "tier": "core", "hardware": "box",
                   "variants": variants or ["minilm-onnx-fp32"]}],
        "tenants": [{"name": n, "keys": [KEYS[n][1]], "share_base": share.get(n, True)}
                    for n in KEYS]})
    return AgentConfig(node="solo-1", topology=topology, home=home, mesh_key=b"m" * 32)


def _auth(tenant: str) -> str:
    return f"Bearer {KEYS[tenant][0]}"


def _sentences(home: Path, tenant: str) -> tuple[list[np.ndarray], np.ndarray]:
    topics = HEAD_TOPICS[tenant]
    rows = [(s, topics.index(t)) for s, t in load_topics() if t in topics]
    ids, mask = SentenceTokenizer.from_home(home).encode([s for s, _ in rows])
    return [ids, mask], np.array([y for _, y in rows])


async def _ask(agent: Any, tenant: str, task: str, tensors: list[np.ndarray]) -> np.ndarray:
    req = InferRequest(task=task, tensors=[t.copy() for t in tensors],
                       slo=SLO(min_accuracy=0.8))
    reply = await agent.infer(req, from_client=True, authorization=_auth(tenant))
    return reply.outputs[0]


def _pair(*tenants: str) -> Any:
    """core-1 with the fp32 encoder, edge-1 with the int8 one (heads follow their base)."""
    return parse_topology({
        "name": "pair",
        "hardware": {"box": {"kind": "cpu", "threads": 1, "memory_mb": 1024}},
        "nodes": [{"name": "core-1", "tier": "core", "hardware": "box",
                   "variants": ["minilm-onnx-fp32"]},
                  {"name": "edge-1", "tier": "edge", "hardware": "box",
                   "variants": ["minilm-onnx-int8-dynamic"]}],
        "links": [{"between": ["edge-1", "core-1"], "latency_ms": 1, "bandwidth_mbps": 1000}],
        "membership": {"heartbeat_interval_s": 0.05, "missed_heartbeats": 10,
                       "stale_after_s": 2.0, "startup_grace_s": 1.0},
        "tenants": [{"name": n, "keys": [KEYS[n][1]]} for n in tenants]})


def _without(source: Path, home: Path, *families: str) -> Path:
    """A copy of the home ``source`` at ``home`` whose registry lacks ``families``."""
    import shutil

    shutil.copytree(source, home)
    registry = Registry.load(home)
    for family in families:
        registry.remove_family(family)
    registry.save(home)
    return home


async def _loaded(agent: Any, variant: str, timeout_s: float = 30.0) -> None:
    """Until ``agent`` has ``variant`` loaded (it pulls and loads in the background)."""
    deadline = time.monotonic() + timeout_s
    while variant not in agent.models.loaded:
        assert time.monotonic() < deadline, agent.models.unavailable
        await asyncio.sleep(0.05)


async def test_two_tenants_share_one_base_and_each_gets_its_own_head(
        heads_home: Path, serving: Any) -> None:
    registry = Registry.load(heads_home)
    async with serving(_config(heads_home)) as (agent, _server):
        asks = []
        truth = {}
        for tenant in ("acme", "globex"):
            (ids, mask), labels = _sentences(heads_home, tenant)
            truth[tenant] = labels
            # one query per sentence, both tenants at once: they share the base's batches
            asks += [_ask(agent, tenant, f"{tenant}-topics", [ids[i:i + 1], mask[i:i + 1]])
                     for i in range(len(labels))]
        # and the base's own public task, embeddings, from a third tenant meanwhile
        (ids, mask), _ = _sentences(heads_home, "acme")
        asks += [_ask(agent, "initech", "sentence-embedding", [ids[i:i + 1], mask[i:i + 1]])
                 for i in range(4)]
        started = time.perf_counter()
        answers = await asyncio.gather(*asks)
        elapsed_s = time.perf_counter() - started
        embeddings = np.concatenate(answers[-4:])
        answers = answers[:-4]
        n_acme = len(truth["acme"])
        for tenant, got in (("acme", answers[:n_acme]), ("globex", answers[n_acme:])):
            logits = np.concatenate(got)
            # its own head: its number of topics, and its topics right
            assert logits.shape == (len(truth[tenant]), len(HEAD_TOPICS[tenant]))
            assert np.mean(logits.argmax(1) == truth[tenant]) >= 0.85

        models = agent.models
        (key, shared), = models.shared.items()  # one base instance for everyone
        assert key == ("minilm-onnx-fp32", "") and shared.heads == [
            "acme-topics-onnx-fp32", "globex-topics-onnx-fp32", "minilm-onnx-fp32"]
        # the base ran once per batch: fewer runs than queries, some batches held both heads
        assert shared.rows == {"acme-topics-onnx-fp32": n_acme,
                               "globex-topics-onnx-fp32": len(answers) - n_acme,
                               "minilm-onnx-fp32": 4}
        assert shared.batches < len(answers) and shared.mixed >= 1
        # the base's own queries came from the same instance, as the base alone answers them
        base = registry.get("minilm-onnx-fp32")
        alone = run_artifact(ArtifactStore(heads_home / "store").path(base.sha256), "onnx",
                             Dataset((ids[:4], mask[:4]), None), 4)[0]
        np.testing.assert_allclose(embeddings, alone, atol=1e-5)
        # each tenant is charged its rows' share of the batches it shared: on one compute
        # thread, all the charges together fit in the time it all took
        usage = agent.status()["tenants"]
        charged = sum(usage[t]["compute_s"] for t in ("acme", "globex", "initech"))
        assert 0 < charged <= elapsed_s
        assert all(usage[t]["compute_s"] > 0 for t in ("acme", "globex", "initech"))
        # memory: the base once, plus each head's own
        heads = [models.loaded[h] for h in shared.heads]
        assert models.memory_used == shared.memory_bytes + sum(h.memory_bytes for h in heads)
        assert all(h.memory_bytes < shared.memory_bytes / 10 for h in heads)

        # the last head unloaded takes the base with it
        for head in shared.heads:
            assert await models.unload(head)
        assert not models.shared and models.memory_used == 0


async def test_nobody_else_sees_a_tenants_head(heads_home: Path, serving: Any) -> None:
    (ids, mask), _ = _sentences(heads_home, "acme")
    async with serving(_config(heads_home)) as (agent, _server):
        with pytest.raises(UnknownTask) as private:
            await _ask(agent, "globex", "acme-topics", [ids[:1], mask[:1]])
        with pytest.raises(UnknownTask) as missing:
            await _ask(agent, "globex", "no-such-topics", [ids[:1], mask[:1]])
        assert private.value.message == missing.value.message.replace("no-such-topics",
                                                                      "acme-topics")
        assert "acme" not in private.value.message.split("known tasks")[1]
        assert agent.tenancy.visible_tasks("globex", agent.registry.tasks()) == [
            "globex-topics", "sentence-embedding"]
        # a device cannot be given a head (its artifact needs the base): a clear 404
        import aiohttp

        url = str(_server.make_url("")).rstrip("/")
        async with aiohttp.ClientSession() as http, http.get(
                url + "/v1/device/acme-topics", headers={"Authorization": _auth("acme")}) as r:
            assert r.status == 404 and "not a head on a shared base" in await r.text()
        # the owner's own query still works, and its usage is its own
        await _ask(agent, "acme", "acme-topics", [ids[:1], mask[:1]])
        usage = agent.status()["tenants"]
        assert usage["acme"]["queries"] == 1 and usage["acme"]["compute_s"] > 0
        assert usage.get("globex", {}).get("compute_s", 0) == 0  # it ran nothing


async def test_a_tenant_that_will_not_share_gets_a_base_of_its_own(
        heads_home: Path, serving: Any) -> None:
    from mesh.variants.heads import register_head
    from mesh.variants.topics import topic_head

    home = heads_home.parent / "heads-initech"
    if not home.exists():
        import shutil

        shutil.copytree(heads_home, home)
        head, validation = topic_head(home, ("weather", "cooking", "sport"))
        register_head(home, "initech-topics", task="initech-topics", base="minilm-onnx-fp32",
                      head=head, validation=validation, tenant="initech", progress=False,
                      profile_options={"warmup": 1, "min_repeats": 3, "budget_s": 0.01,
                                       "memory": False})
    (ids, mask), _ = _sentences(home, "acme")
    async with serving(_config(home, share={"initech": False})) as (agent, _server):
        await asyncio.gather(*(
            _ask(agent, tenant, f"{tenant}-topics", [ids[i:i + 1], mask[i:i + 1]])
            for i in range(6) for tenant in ("acme", "globex", "initech")))
        shared = agent.models.shared
        assert set(shared) == {("minilm-onnx-fp32", ""), ("minilm-onnx-fp32", "initech")}
        own = shared[("minilm-onnx-fp32", "initech")]
        # its base ran only its queries; the others shared theirs
        assert own.heads == ["initech-topics-onnx-fp32"] and own.rows == {
            "initech-topics-onnx-fp32": 6}
        assert set(shared[("minilm-onnx-fp32", "")].rows) == {"acme-topics-onnx-fp32",
                                                              "globex-topics-onnx-fp32"}
        assert agent.models.memory_used >= 2 * own.memory_bytes


async def test_an_edge_pulls_its_heads_and_their_base_and_serves_them_there(
        heads_home: Path, live_mesh: Any, tmp_path: Path) -> None:
    import shutil

    home = tmp_path / "core"
    shutil.copytree(heads_home, home)
    topology = _pair(*KEYS)
    (ids, mask), labels = _sentences(heads_home, "acme")
    async with live_mesh(topology, home) as mesh:
        edge = mesh.agents["edge-1"]
        # placement puts each head where its base's globs let the base go
        assert edge.planner.hosting.allows("edge-1", "acme-topics-onnx-int8-dynamic")
        assert not edge.planner.hosting.allows("edge-1", "acme-topics-onnx-fp32")
        await _loaded(edge, "acme-topics-onnx-int8-dynamic")
        req = InferRequest(task="acme-topics", tensors=[ids[:8], mask[:8]],
                           slo=SLO(latency_ms=5_000))
        reply = await edge.infer(req, from_client=True, authorization=_auth("acme"))
        assert reply.served_by.node == "edge-1"
        assert reply.served_by.variant == "acme-topics-onnx-int8-dynamic"
        assert np.mean(reply.outputs[0].argmax(1) == labels[:8]) >= 0.75
        # the edge pulled the head and the int8 base through its parent, nothing else
        registry = Registry.load(home)
        store = ArtifactStore(tmp_path / "home-edge-1" / "store")
        for name in ("acme-topics-onnx-int8-dynamic", "minilm-onnx-int8-dynamic"):
            assert store.has(registry.get(name).sha256)
        assert not store.has(registry.get("minilm-onnx-fp32").sha256)
        # to another tenant the head does not exist at the edge either
        with pytest.raises(UnknownTask):
            await _ask(edge, "globex", "acme-topics", [ids[:1], mask[:1]])


async def test_a_head_added_on_a_running_mesh_is_served_without_a_restart(
        heads_home: Path, live_mesh: Any, tmp_path: Path) -> None:

    from mesh.errors import MeshError
    from mesh.peers import PeerKey
    from mesh.remote import push_variants, remove_model

    home = _without(heads_home, tmp_path / "core", "acme-topics")
    heads = [v for v in Registry.load(heads_home).variants.values()
             if v.family == "acme-topics"]
    topology = _pair("acme", "globex")
    (ids, mask), labels = _sentences(heads_home, "acme")
    async with live_mesh(topology, home) as mesh:
        edge = mesh.agents["edge-1"]
        url = f"http://127.0.0.1:{mesh.ports['core-1']}"
        store = ArtifactStore(heads_home / "store")
        key = PeerKey(b"k" * 32)
        # a head of a tenant the mesh does not know, or without its base, is refused
        stranger = [dataclasses.replace(h, tenant="initech") for h in heads]
        with pytest.raises(MeshError, match="400: tenant 'initech': not a tenant"):
            await asyncio.to_thread(push_variants, url, stranger, store, key)
        orphan = [dataclasses.replace(heads[0], base="minilm-gone")]
        with pytest.raises(MeshError, match="400: variants .*base minilm-gone"):
            await asyncio.to_thread(push_variants, url, orphan, store, key)
        sent = await asyncio.to_thread(push_variants, url, heads, store, key)
        assert sorted(sent["registered"]) == sorted(h.name for h in heads)
        await _loaded(edge, "acme-topics-onnx-int8-dynamic")
        reply = await edge.infer(InferRequest(task="acme-topics", tensors=[ids[:4], mask[:4]]),
                                 from_client=True, authorization=_auth("acme"))
        assert reply.outputs[0].shape == (4, len(HEAD_TOPICS["acme"]))
        assert np.mean(reply.outputs[0].argmax(1) == labels[:4]) >= 0.75
        with pytest.raises(UnknownTask):
            await _ask(edge, "globex", "acme-topics", [ids[:1], mask[:1]])

        # and removed again, without a restart: the edge drops it, the task is gone
        with pytest.raises(MeshError, match="400: model 'minilm' is the base of private"):
            await asyncio.to_thread(remove_model, url, "minilm", key)
        done = await asyncio.to_thread(remove_model, url, "acme-topics", key)
        assert sorted(done["removed"]) == sorted(h.name for h in heads)
        deadline = time.monotonic() + 30
        while "acme-topics-onnx-int8-dynamic" in edge.models.loaded \
                or "acme-topics" in edge.registry.tasks():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        with pytest.raises(UnknownTask):
            await _ask(edge, "acme", "acme-topics", [ids[:1], mask[:1]])


async def test_a_base_loaded_before_its_heads_moves_onto_their_shared_instance(
        heads_home: Path, serving: Any, tmp_path: Path) -> None:

    home = _without(heads_home, tmp_path / "home", "acme-topics", "globex-topics")
    (ids, mask), _ = _sentences(heads_home, "acme")
    async with serving(_config(home)) as (agent, _server):
        models = agent.models
        await _ask(agent, "acme", "sentence-embedding", [ids[:1], mask[:1]])
        assert "minilm-onnx-fp32" in models.loaded and not models.shared  # on its own
        await agent.adopt_registry(Registry.load(heads_home))  # heads registered meanwhile
        deadline = time.monotonic() + 30  # the next placement round places them here
        while not agent.planner.hosting.allows("solo-1", "acme-topics-onnx-fp32"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await _ask(agent, "acme", "acme-topics", [ids[:1], mask[:1]])
        await _ask(agent, "acme", "sentence-embedding", [ids[:1], mask[:1]])
        (shared,) = models.shared.values()
        assert "minilm-onnx-fp32" in shared.heads  # one encoder for the heads and the base
        assert models.memory_used == shared.memory_bytes + sum(
            models.loaded[h].memory_bytes for h in shared.heads)
