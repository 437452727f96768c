"""Node-agent fixtures: a private digits-only home, and agents served on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestServer, unused_port

from mesh.placement import Machine
from mesh.registry import Registry
from mesh.runtimes import runtime_for
from mesh.runtimes.onnx import OnnxRuntime
from mesh.store import ArtifactStore
from mesh.topology import parse_topology
from mesh.transport import MemoryTransport
from nodes.agent import AgentConfig, NodeAgent
from nodes.answers import answer
from nodes.app import make_app
from nodes.membership import Membership


class ProbeOnnx(OnnxRuntime):
    """The real onnxruntime backend, counting loads; every run waits while ``gate`` is clear.

    Handed to agents and model managers as their runtime lookup (:meth:`lookup`).
    """

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        #: when set, only runs of these artifact paths wait at the gate
        self.only: set[str] | None = None
        self._paths: dict[int, str] = {}

    def load(self, path: str, *, threads: int) -> Any:
        self.loads.append(path)
        session = super().load(path, threads=threads)
        self._paths[id(session)] = path
        return session

    def run(self, session: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if self.only is None or self._paths.get(id(session)) in self.only:
            self.gate.wait(10)
        return super().run(session, inputs)


    def lookup(self, fmt: str) -> Any:
        """The runtime for ``fmt``: this probe for ONNX, the real one for the others."""
        return self if fmt == "onnx" else runtime_for(fmt)


@pytest.fixture
def onnx_probe() -> ProbeOnnx:
    """Nodes that :func:`serving` starts in this test load ONNX through a :class:`ProbeOnnx`."""
    return ProbeOnnx()


CLASSIC_DIGITS = ("digits-linear", "digits-mlp", "digits-cnn")


@pytest.fixture
def digits_home(built_home: Path, tmp_path: Path) -> Path:
    """A private home holding the classic digits variants: safe to damage, quick to copy."""
    registry = Registry.load(built_home)
    source = ArtifactStore(built_home / "store")
    home = tmp_path / "home"
    store = ArtifactStore(home / "store")
    # the three classic members: the tests here reason about their sizes and accuracies
    keep = Registry({n: v for n, v in registry.variants.items() if n in CLASSIC_DIGITS})
    for variant in keep.variants.values():
        store.put_bytes(source.read(variant.sha256))
    keep.save(home)
    return home


def solo(variants: list[str], **node: Any) -> dict[str, Any]:
    """A one-node topology document."""
    hardware = {"kind": "cpu", "threads": 1, "memory_mb": 1024}
    hardware.update(node.pop("hardware", {}))
    return {"name": "solo", "hardware": {"box": hardware},
            "nodes": [{"name": "solo-1", "tier": "edge", "hardware": "box", "variants": variants,
                       **node}]}


@pytest.fixture
def solo_config(digits_home: Path) -> Callable[..., AgentConfig]:
    """``solo_config(["digits-*"], max_queue=4, options={...})`` -> an AgentConfig."""

    def make(variants: list[str], *, options: dict[str, Any] | None = None, **node: Any
             ) -> AgentConfig:
        return AgentConfig(node="solo-1", topology=parse_topology(solo(variants, **node)),
                           home=digits_home, **(options or {}))

    return make


@pytest.fixture
def serving(request: pytest.FixtureRequest
            ) -> Callable[..., contextlib.AbstractAsyncContextManager[Any]]:
    """``async with serving(config) as (agent, server)``: an agent on a loopback HTTP server.

    Keyword arguments go to :class:`NodeAgent`; in a test that uses ``onnx_probe`` the
    agent runs ONNX through it.
    """
    probe = request.getfixturevalue("onnx_probe") if "onnx_probe" in request.fixturenames \
        else None

    @contextlib.asynccontextmanager
    async def run(config: AgentConfig, **options: Any
                  ) -> AsyncIterator[tuple[NodeAgent, TestServer]]:
        if probe is not None:
            options.setdefault("runtimes", probe.lookup)
        async with NodeAgent(config, **options) as agent:
            server = TestServer(make_app(agent, address="test"))
            await server.start_server()
            try:
                yield agent, server
            finally:
                await server.close()

    return run


@pytest.fixture
def edge_and_core() -> Any:
    """Two nodes one 1 ms link apart: the edge hosts linear and MLP, the core the CNN."""
    return parse_topology({
        "name": "pair",
        "hardware": {"box": {"kind": "cpu", "threads": 1, "memory_mb": 256}},
        "nodes": [{"name": "core-1", "tier": "core", "hardware": "box", "variants": ["digits-cnn"]},
                  {"name": "edge-1", "tier": "edge", "hardware": "box",
                   "variants": ["digits-linear", "digits-mlp"]}],
        "links": [{"between": ["edge-1", "core-1"], "latency_ms": 1, "bandwidth_mbps": 1000}],
    })


@pytest.fixture
def memory_mesh() -> Callable[..., contextlib.AbstractAsyncContextManager[dict[str, NodeAgent]]]:
    """``async with memory_mesh(topology, home) as agents``: every node of ``topology`` as an
    agent in this process, neighbours wired by in-memory transports (no socket at all).

    ``frozen={"core-1"}`` makes those nodes take queries and never answer (a set the test
    may change meanwhile: a link cut, then healed). ``runtimes``: node name -> its runtime
    lookup (a node whose disk is broken), for the nodes it names.
    """

    @contextlib.asynccontextmanager
    async def run(topology: Any, home: Path, *, frozen: frozenset[str] | set[str] = frozenset(),
                  runtimes: dict[str, Any] | None = None,
                  **config: Any) -> AsyncIterator[dict[str, NodeAgent]]:
        agents: dict[str, NodeAgent] = {}
        never = asyncio.Event()

        def wire(name: str) -> MemoryTransport:
            async def handle(body: bytes) -> tuple[int, bytes]:
                if name in frozen:
                    await never.wait()
                reply = await answer(agents[name], body, from_client=False)
                return reply.status, reply.body
            return MemoryTransport(handle)

        async with contextlib.AsyncExitStack() as stack:
            for name in topology.nodes:
                transports = {n: wire(n) for n in topology.neighbours(name)}
                agent = NodeAgent(AgentConfig(node=name, topology=topology, home=home, **config),
                                  transports=transports,
                                  runtimes=(runtimes or {}).get(name, runtime_for))
                agents[name] = await stack.enter_async_context(agent)
            yield agents

    return run


class LiveMesh:
    """Real agents with real membership on loopback HTTP; each node can be restarted."""

    def __init__(self, topology: Any, home: Path, clock: Callable[[], float],
                 machines: dict[str, Machine] | None = None) -> None:
        self.topology, self.home, self.clock = topology, home, clock
        #: what some nodes report as their machine (nodes standing for separate machines);
        #: the others measure this one
        self.machines = machines or {}
        self.ports = {n: unused_port() for n in topology.nodes}
        self.agents: dict[str, NodeAgent] = {}
        self._stacks: dict[str, contextlib.AsyncExitStack] = {}

    async def start(self, name: str) -> NodeAgent:
        """Start ``name``: the core from the built home, others from an empty one of their
        own (they copy the registry and pull the artifacts they host through their parent)."""
        home = self.home if name == "core-1" else self.home.parent / f"home-{name}"
        home.mkdir(exist_ok=True)
        neighbours = {n: f"http://127.0.0.1:{self.ports[n]}"
                      for n in self.topology.neighbours(name)}
        config = AgentConfig(node=name, topology=self.topology, home=home,
                             neighbours=neighbours, mesh_key=b"k" * 32)
        stack = contextlib.AsyncExitStack()
        agent = await stack.enter_async_context(NodeAgent(config, placement_clock=self.clock,
                                                          machine=self.machines.get(name)))
        membership = await stack.enter_async_context(Membership.for_agent(agent))
        app = make_app(agent, address=f"http://127.0.0.1:{self.ports[name]}")
        membership.add_routes(app)
        server = TestServer(app, port=self.ports[name])
        await server.start_server()
        stack.push_async_callback(server.close)
        self._stacks[name], self.agents[name] = stack, agent
        return agent

    async def stop(self, name: str) -> None:
        await self._stacks.pop(name).aclose()
        del self.agents[name]

    async def close(self) -> None:
        for name in reversed(list(self._stacks)):
            await self.stop(name)


@pytest.fixture
def live_mesh() -> Callable[..., contextlib.AbstractAsyncContextManager[LiveMesh]]:
    """``async with live_mesh(topology, home, clock) as mesh``: core-1, then edge-1, as
    real agents with membership on loopback HTTP (``clock``: the placement's time;
    ``machines``: node -> the machine it reports, for nodes standing for other machines)."""

    @contextlib.asynccontextmanager
    async def run(topology: Any, home: Path, clock: Callable[[], float] = time.time,
                  machines: dict[str, Machine] | None = None) -> AsyncIterator[LiveMesh]:
        mesh = LiveMesh(topology, home, clock, machines)
        try:
            for name in ("core-1", "edge-1"):  # the parent first: the edge copies its registry
                await mesh.start(name)
            yield mesh
        finally:
            await mesh.close()

    return run
