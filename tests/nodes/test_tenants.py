"""Tenants on a real node: API keys on every protocol, private tasks that do not exist for
anyone else, quotas, operator-only status, usage counted where the work is done."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from mesh import AsyncClient, Client
from mesh.errors import Forbidden, Overloaded, Unauthorized, UnknownTask
from mesh.remote import OPERATOR
from mesh.tenants import Tenancy, TokenBucket, hash_key, new_key
from mesh.topology import parse_topology
from mesh.wire import SLO, InferRequest
from nodes.agent import AgentConfig
from nodes.stream import StreamServer

KEYS = {name: new_key() for name in ("clinic", "school", "ops")}


def _tenants(quota: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [{"name": "clinic", "keys": [KEYS["clinic"][1]], "private": ["digits"],
             **({"quota": quota} if quota else {})},
            {"name": "school", "keys": [KEYS["school"][1]]}]


def _solo(home: Path, **tenants: Any) -> AgentConfig:
    topology = parse_topology({
        "name": "tenanted",
        "hardware": {"box": {"kind": "cpu", "threads": 1, "memory_mb": 1024}},
        "nodes": [{"name": "solo-1", "tier": "edge", "hardware": "box",
                   "variants": ["digits-linear", "digits-mlp"]}],
        "tenants": _tenants(**tenants),
        "operators": {"keys": [KEYS["ops"][1]]},
    })
    return AgentConfig(node="solo-1", topology=topology, home=home, mesh_key=b"m" * 32)


def _pair(variants: dict[str, list[str]], **extra: Any) -> Any:
    """core-1 above edge-1 (1 ms apart), with the clinic and the school; ``variants``: a
    node's allow list (none: the mesh places freely); ``extra``: more top-level sections."""
    return parse_topology({
        "name": "pair",
        "hardware": {"box": {"kind": "cpu", "threads": 1, "memory_mb": 512}},
        "nodes": [{"name": n, "tier": tier, "hardware": "box",
                   **({"variants": variants[n]} if n in variants else {})}
                  for n, tier in (("core-1", "core"), ("edge-1", "edge"))],
        "links": [{"between": ["edge-1", "core-1"], "latency_ms": 1, "bandwidth_mbps": 1000}],
        "tenants": _tenants(), **extra})


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


# ---------------------------------------------------------------------------- pure


def test_keys_are_kept_hashed_and_a_bucket_refills_at_its_rate() -> None:
    key, stored = new_key()
    assert stored == hash_key(key) and key not in stored and stored.startswith("sha256:")
    bucket = TokenBucket(rate=2.0, burst=2.0)
    assert bucket.take(0.0) == 0.0 and bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(0.5)  # empty: one token in half a second
    assert bucket.take(0.5) == 0.0


def test_who_may_call_and_see_what() -> None:
    tenancy = Tenancy.of(_solo(Path("."), quota={"rps": 1, "concurrent": 1}).topology)
    assert tenancy.enabled and tenancy.private
    for header in (None, "", "Basic abc", "Bearer ", "Bearer nope"):
        with pytest.raises(Unauthorized):
            tenancy.authenticate(header)
    assert tenancy.authenticate(bearer("school")["Authorization"]) == "school"
    assert tenancy.visible("clinic", "digits") and not tenancy.visible("school", "digits")
    assert tenancy.is_operator(bearer("ops")["Authorization"])
    assert not tenancy.is_operator(bearer("clinic")["Authorization"])
    tenancy.admit("clinic", 0.0)
    with pytest.raises(Overloaded, match="in progress"):  # one at a time
        tenancy.admit("clinic", 0.0)
    tenancy.done("clinic")
    with pytest.raises(Overloaded, match="queries a second") as refused:
        tenancy.admit("clinic", 0.1)
    assert refused.value.retry_after_s == pytest.approx(0.9)
    assert tenancy.usage["clinic"].queries == 1 and tenancy.usage["clinic"].refused == 2
    assert not Tenancy().enabled and Tenancy().authenticate(None) is None  # an open mesh


# ---------------------------------------------------------------------------- on a node


async def test_every_protocol_needs_a_key_and_private_tasks_exist_only_for_their_owner(
        digits_home: Path, serving: Any, heldout: Any) -> None:
    images, labels = heldout
    rows = images[:2].astype(np.float32)
    async with serving(_solo(digits_home)) as (agent, server):
        url = str(server.make_url("")).rstrip("/")
        # msgpack over HTTP, through the SDK
        async with AsyncClient(url, api_key=KEYS["clinic"][0]) as clinic:
            r = await clinic.infer("digits", rows, min_accuracy=0.95)
            assert list(r.output.argmax(1)) == list(labels[:2])
            told = await clinic.feedback(r.request_id, r.output.argmax(1))
            assert told["correct"] == 2
        async with AsyncClient(url) as anonymous:
            with pytest.raises(Unauthorized, match="Bearer"):
                await anonymous.infer("digits", rows)
        async with AsyncClient(url, api_key="tm_not-a-key") as stranger:
            with pytest.raises(Unauthorized, match="not valid"):
                await stranger.infer("digits", rows)
        async with AsyncClient(url, api_key=KEYS["school"][0]) as school:
            with pytest.raises(UnknownTask) as private:
                await school.infer("digits", rows)
            with pytest.raises(UnknownTask) as missing:
                await school.infer("no-such-task", rows)
            # the very answer a task that does not exist gets, naming nothing of the clinic's
            assert private.value.message == missing.value.message.replace("no-such-task",
                                                                          "digits")
            assert "known tasks: none" in private.value.message
            with pytest.raises(Exception, match="no recent answer"):  # not its answer
                await school.feedback(r.request_id, 3)

        body = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                            "data": rows.ravel().tolist()}]}
        async with aiohttp.ClientSession() as http:
            for headers, path, status in (
                    ({}, "/v2/models/digits/infer", 401),
                    (bearer("school"), "/v2/models/digits/infer", 404),
                    (bearer("clinic"), "/v2/models/digits/infer", 200)):
                async with http.post(url + path, json=body, headers=headers) as resp:
                    assert resp.status == status, await resp.text()
            for headers, status in (({}, 401), (bearer("school"), 404),
                                    (bearer("clinic"), 200)):
                async with http.get(url + "/v2/models/digits", headers=headers) as resp:
                    assert resp.status == status
            # status and metrics: operators (and nodes) only
            for path in ("/v1/status", "/metrics"):
                for headers, status in (({}, 401), (bearer("clinic"), 403),
                                        (bearer("ops"), 200),
                                        (agent.peers.headers(OPERATOR), 200)):
                    async with http.get(url + path, headers=headers) as resp:
                        assert resp.status == status, (path, headers)
            async with http.get(url + "/v1/status", headers=bearer("ops")) as resp:
                usage = (await resp.json())["tenants"]
        assert usage["clinic"]["queries"] == 2 and usage["clinic"]["compute_s"] > 0
        assert usage["clinic"]["bytes_in"] == 2 * rows.nbytes
        assert "school" not in usage or usage["school"]["queries"] == 0

        # a client may not claim a tenant: the entry node sets it from the key
        claim = InferRequest(task="digits", tensors=[rows], tenant="clinic")
        with pytest.raises(Forbidden, match="identity: set by the entry node"):
            await agent.infer(claim, from_client=True, authorization=None)


async def test_the_stream_takes_the_key_in_its_hello(digits_home: Path, serving: Any,
                                                     heldout: Any) -> None:
    images, labels = heldout
    async with serving(_solo(digits_home)) as (agent, _server):
        async with StreamServer(agent, "127.0.0.1", 0) as stream:
            url = f"tcp://127.0.0.1:{stream.port}"

            def blocking() -> None:  # the blocking client, on a thread (the node's loop runs)
                with Client(url, api_key=KEYS["clinic"][0]) as clinic:
                    r = clinic.infer("digits", images[:1].astype(np.float32))
                    assert int(r.output.argmax()) == labels[0]
                with Client(url) as anonymous, pytest.raises(Unauthorized):
                    anonymous.infer("digits", images[:1].astype(np.float32))
                with Client(url, api_key=KEYS["school"][0]) as school, \
                        pytest.raises(UnknownTask):
                    school.infer("digits", images[:1].astype(np.float32))

            await asyncio.to_thread(blocking)
            async with AsyncClient(url, api_key=KEYS["clinic"][0]) as clinic:
                r = await clinic.infer("digits", images[1:2].astype(np.float32))
                assert int(r.output.argmax()) == labels[1]


async def test_a_quota_is_enforced_at_the_entry_with_retry_after(
        digits_home: Path, serving: Any, heldout: Any) -> None:
    images, _ = heldout
    config = _solo(digits_home, quota={"rps": 0.5, "burst": 2})
    async with serving(config) as (agent, _server):
        def query(i: int) -> InferRequest:
            return InferRequest(task="digits", tensors=[images[i:i + 1].astype(np.float32)],
                                slo=SLO(min_accuracy=0.95))
        auth = bearer("clinic")["Authorization"]
        for i in range(2):  # the burst
            await agent.infer(query(i), from_client=True, authorization=auth)
        with pytest.raises(Overloaded, match="queries a second") as refused:
            await agent.infer(query(2), from_client=True, authorization=auth)
        assert 0 < refused.value.retry_after_s <= 2.0
        # another tenant's quota is its own
        school = bearer("school")["Authorization"]
        with pytest.raises(UnknownTask):
            await agent.infer(query(3), from_client=True, authorization=school)
        assert agent.status()["tenants"]["clinic"] == {**agent.status()["tenants"]["clinic"],
                                                       "queries": 2, "refused": 1}


async def test_the_tenant_travels_to_the_node_that_serves_and_is_counted_there(
        digits_home: Path, memory_mesh: Any, heldout: Any) -> None:
    images, _ = heldout
    topology = _pair({"core-1": ["digits-cnn"], "edge-1": ["digits-linear"]})
    async with memory_mesh(topology, digits_home) as agents:
        req = InferRequest(task="digits", tensors=[images[:3].astype(np.float32)],
                           slo=SLO(min_accuracy=0.99))
        r = await agents["edge-1"].infer(req, from_client=True,
                                         authorization=bearer("clinic")["Authorization"])
        assert r.served_by.node == "core-1"
        core = agents["core-1"].status()["tenants"]["clinic"]
        edge = agents["edge-1"].status()["tenants"]["clinic"]
        assert core["compute_s"] > 0 and edge["compute_s"] == 0  # the core did the work
        assert edge["queries"] == 1 and edge["bytes_in"] == images[:3].astype(
            np.float32).nbytes


async def test_keys_added_and_revoked_at_the_core_hold_everywhere_without_a_restart(
        digits_home: Path, live_mesh: Any, heldout: Any) -> None:
    import time

    from mesh.remote import OPERATOR

    images, _ = heldout
    topology = _pair({}, membership={"heartbeat_interval_s": 0.05, "missed_heartbeats": 10,
                                     "stale_after_s": 2.0, "startup_grace_s": 1.0},
                     operators={"keys": [KEYS["ops"][1]]})
    async with live_mesh(topology, digits_home) as mesh:
        core, edge = mesh.agents["core-1"], mesh.agents["edge-1"]
        fresh, fresh_hash = new_key()
        query = InferRequest(task="digits", tensors=[images[:1].astype(np.float32)])

        async def accepted(key: str) -> bool:
            try:
                await edge.infer(InferRequest(task="digits", tensors=query.tensors),
                                 from_client=True, authorization=f"Bearer {key}")
            except Unauthorized:
                return False
            return True

        assert not await accepted(fresh)
        core_url = f"http://127.0.0.1:{mesh.ports['core-1']}"
        async with aiohttp.ClientSession() as http:
            async def post(body: dict[str, str], headers: dict[str, str]) -> int:
                async with http.post(core_url + "/v1/registry/keys", json=body,
                                     headers=headers) as resp:
                    return resp.status

            # only operators (an operator key, the mesh key) manage keys
            assert await post({"tenant": "school", "key_hash": fresh_hash},
                              bearer("school")) == 403
            assert await post({"tenant": "nobody", "key_hash": fresh_hash},
                              bearer("ops")) == 400
            assert await post({"tenant": "clinic", "key_hash": fresh}, bearer("ops")) == 400
            assert await post({"tenant": "clinic", "key_hash": fresh_hash},
                              core.peers.headers(OPERATOR)) == 200
            started = time.monotonic()
            while not await accepted(fresh):  # copied down with the registry
                assert time.monotonic() - started < 10, "the edge never took the new key"
                await asyncio.sleep(0.02)
            # revoked at the core: refused at the edge within a few heartbeats
            assert await post({"revoke": KEYS["clinic"][1]}, bearer("ops")) == 200
            started = time.monotonic()
            while await accepted(KEYS["clinic"][0]):
                assert time.monotonic() - started < 10, "the revoked key still works"
                await asyncio.sleep(0.02)

        assert await accepted(fresh)  # the tenant's other key still works
        assert edge.registry.keys[fresh_hash] == "clinic"
        assert KEYS["clinic"][1] in edge.registry.revoked


async def test_a_forwarded_tenant_is_signed_and_a_replayed_or_forged_one_refused(
        digits_home: Path, memory_mesh: Any, heldout: Any) -> None:
    import dataclasses
    import time

    from mesh.tenants import Identity
    from mesh.wire import decode_request, encode_request

    images, _ = heldout
    topology = _solo(digits_home).topology
    async with memory_mesh(topology, digits_home) as agents:
        node = agents["solo-1"]

        def forwarded(identity: Identity) -> InferRequest:
            """A query as a node sends it on: through the wire, identity and all."""
            req = InferRequest(task="digits", tensors=[images[:1].astype(np.float32)],
                               request_id="q-1", identity=identity, tenant=identity.tenant)
            return decode_request(encode_request(req))

        signed = Identity.sign(node.peers, "clinic", "q-1", time.time())
        r = await node.infer(forwarded(signed), from_client=False)  # trusted: signed by a node
        assert r.served_by.node == "solo-1"
        assert node.status()["tenants"]["clinic"]["compute_s"] > 0
        with pytest.raises(Forbidden, match="replayed"):  # the same signed identity again
            await node.infer(forwarded(signed), from_client=False)
        forged = dataclasses.replace(Identity.sign(node.peers, "clinic", "q-1", time.time()),
                                     tenant="school")  # a claim the signature does not cover
        with pytest.raises(Forbidden, match="not signed"):
            await node.infer(forwarded(forged), from_client=False)
        stale = Identity.sign(node.peers, "clinic", "q-1", time.time() - 60)
        with pytest.raises(Forbidden, match="expired"):
            await node.infer(forwarded(stale), from_client=False)
        assert node.replays.refused == 1


async def test_an_unmodified_triton_client_passes_its_key_as_a_header(
        digits_home: Path, serving: Any, heldout: Any) -> None:
    import tritonclient.http as tritonhttp
    from tritonclient.utils import InferenceServerException

    images, labels = heldout
    x = images[:2].astype(np.float32)
    async with serving(_solo(digits_home)) as (_agent, server):
        url = f"{server.host}:{server.port}"

        def infer(headers: dict[str, str]) -> np.ndarray:
            client = tritonhttp.InferenceServerClient(url)
            try:
                inp = tritonhttp.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                return client.infer("digits", [inp], headers=headers).as_numpy("probs")
            finally:
                client.close()

        probs = await asyncio.to_thread(infer, bearer("clinic"))
        assert list(probs.argmax(1)) == list(labels[:2])
        for headers, status in (({}, "401"), (bearer("school"), "404")):
            with pytest.raises(InferenceServerException) as refused:
                await asyncio.to_thread(infer, headers)
            assert status in str(refused.value.status()) or status in str(refused.value)


async def test_quotas_hold_under_concurrent_load_and_spare_the_other_tenants(
        heads_home: Path, serving: Any) -> None:
    """Two tenants at once over HTTP: acme may have 2 queries in progress and 3 a second
    (burst 6); what it sends beyond is refused 429 with Retry-After, while globex, with no
    quota, is answered every time. Artifacts and the device routes stay closed to both."""
    from mesh.variants.sentences import SentenceTokenizer
    from mesh.wire import decode_response, encode_request

    keys = {n: new_key() for n in ("acme", "globex")}
    topology = parse_topology({
        "name": "quota",
        "hardware": {"box": {"kind": "cpu", "threads": 1, "memory_mb": 2048}},
        "nodes": [{"name": "solo-1", "tier": "core", "hardware": "box",
                   "variants": ["minilm-onnx-fp32"]}],
        "tenants": [{"name": "acme", "keys": [keys["acme"][1]],
                     "quota": {"rps": 3, "burst": 6, "concurrent": 2}},
                    {"name": "globex", "keys": [keys["globex"][1]]}]})
    # 16 sentences a query (~0.1 s of compute): a wave's queries all arrive while the first
    # two still run
    ids, mask = SentenceTokenizer.from_home(heads_home).encode(["Will it snow tonight?"] * 16)
    config = AgentConfig(node="solo-1", topology=topology, home=heads_home, mesh_key=b"m" * 32)
    async with serving(config) as (agent, server), aiohttp.ClientSession() as http:
        url = str(server.make_url("")).rstrip("/")

        async def ask(tenant: str, i: int) -> tuple[int, str | None]:
            body = encode_request(InferRequest(task=f"{tenant}-topics", tensors=[ids, mask],
                                               request_id=f"{tenant}-{i}"))
            async with http.post(url + "/v1/infer", data=body, headers={
                    "Content-Type": "application/msgpack",
                    "Authorization": f"Bearer {keys[tenant][0]}"}) as resp:
                if resp.status == 200:
                    assert decode_response(await resp.read()).outputs[0].shape[0] == 16
                return resp.status, resp.headers.get("Retry-After")

        # in waves of 8 at once: at most 2 of acme's each time, and never more than the bucket
        acme: list[tuple[int, str | None]] = []
        globex: list[tuple[int, str | None]] = []
        for wave in range(3):
            got = await asyncio.gather(*(ask("acme", wave * 8 + i) for i in range(8)),
                                       *(ask("globex", wave * 8 + i) for i in range(4)))
            acme += got[:8]
            globex += got[8:]
            assert sum(status == 200 for status, _ in got[:8]) <= 2
        ok = sum(status == 200 for status, _ in acme)
        assert 2 <= ok <= 6
        refused = [retry for status, retry in acme if status != 200]
        assert len(refused) == 24 - ok and all(
            status in (200, 429) for status, _ in acme)
        assert all(retry is not None and float(retry) > 0 for retry in refused)
        assert [status for status, _ in globex] == [200] * 12  # untouched by acme's quota
        usage = agent.status()["tenants"]
        assert usage["acme"]["queries"] == ok and usage["acme"]["refused"] == 24 - ok
        # the same figures in the metrics, for operators (here: the mesh key's operator)
        async with http.get(url + "/metrics", headers=agent.peers.headers(OPERATOR)) as resp:
            scraped = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                       for line in (await resp.text()).splitlines()
                       if line.startswith("tiermesh_tenant_")}
        assert scraped['tiermesh_tenant_queries_total{tenant="acme"}'] == ok
        assert scraped['tiermesh_tenant_refused_total{tenant="acme"}'] == 24 - ok
        assert scraped['tiermesh_tenant_queries_total{tenant="globex"}'] == 12
        assert scraped['tiermesh_tenant_compute_seconds_total{tenant="globex"}'] > 0
        assert scraped['tiermesh_tenant_bytes_total{direction="in",tenant="globex"}'] == \
            12 * (ids.nbytes + mask.nbytes)

        sha = agent.registry.get("acme-topics-onnx-fp32").sha256
        for path, status in ((f"/v1/artifacts/{sha}", 403), ("/v1/device/acme-topics", 404)):
            async with http.get(url + path, headers={
                    "Authorization": f"Bearer {keys['globex'][0]}"}) as resp:
                assert resp.status == status, (path, await resp.text())
