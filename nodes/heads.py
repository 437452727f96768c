"""Private heads on a shared base: the base runs once per batch, each head on its own rows.

A private head (:mod:`mesh.variants.heads`) is a small model on the features
of a public base variant. On a node, every loaded head of one base shares
one :class:`SharedBase`: one base session per compute worker, and one
batcher per worker, whose batches hold the queries of every head (of every
tenant) that shares it. Each query carries its head's index as one extra
input column; a batch runs the base once on all its rows, then each head
present on its own rows, and each query gets its own head's output back.
Tenants share the base's memory and compute, never a head or an answer.

The base variant's own queries (``sentence-embedding`` for MiniLM), on a
node that hosts it and heads on it, run on the same instance as one more
"head" that answers with the features themselves: one copy of the base, and
its batches shared with the heads.

A tenant whose topology entry says ``share_base: false`` gets a base
instance of its own: instances are keyed by (base variant, owner), the owner
being "" for the shared one.

:class:`HeadPool` is what the agent sees of one head: it quacks like a
:class:`~nodes.workers.WorkerPool` (``submit``, ``depth``, ``idle``...).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mesh.registry import Variant
from mesh.runtimes import ModelRuntime
from nodes.batching import BatchResult
from nodes.workers import WorkerPool

__all__ = ["SharedBase", "HeadPool", "instance_key"]

#: told (variant, rows, compute ms) for each head's share of a batch
HeadObserver = Callable[[str, int, float], None]


def instance_key(head: Variant, isolated: frozenset[str]) -> tuple[str, str]:
    """The base instance ``head`` runs on: (base variant, owner), owner "" when shared."""
    return head.base, head.tenant if head.tenant in isolated else ""


@dataclass(frozen=True, slots=True)
class _Head:
    """A head's session; no runtime: the base variant itself, answering with its features."""

    name: str
    runtime: ModelRuntime | None
    session: Any
    width: int

    def run(self, features: np.ndarray) -> np.ndarray:
        if self.runtime is None:
            return features
        return self.runtime.run(self.session, [features])[0]


class SharedBase:
    """One loaded base variant and the heads that run on its features."""

    def __init__(self, key: tuple[str, str], base: Variant, memory_bytes: int) -> None:
        self.key = key
        self.base = base
        self.memory_bytes = memory_bytes
        #: index -> head; replaced whole on every change (the compute threads read it)
        self._heads: dict[int, _Head] = {}
        self._next = 0
        #: heads being loaded onto it: it is not closed while one is
        self.pending = 0
        self.pool: WorkerPool | None = None
        #: what opens one more session for another worker: (runtime, artifact path)
        self.opener: tuple[ModelRuntime, str] | None = None
        #: batches run, those that held more than one head, and rows by head (status)
        self.batches = 0
        self.mixed = 0
        self.rows: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def heads(self) -> list[str]:
        return sorted(h.name for h in self._heads.values())

    def add_head(self, name: str, runtime: ModelRuntime | None, session: Any, width: int) -> int:
        """A head (``runtime`` None: the base's own queries, answered with its features)."""
        index = self._next
        self._next += 1
        self._heads = {**self._heads, index: _Head(name, runtime, session, width)}
        return index

    def remove_head(self, name: str) -> bool:
        """Take ``name`` off; True when no head (loaded or loading) is left on it."""
        self._heads = {i: h for i, h in self._heads.items() if h.name != name}
        return not self._heads and not self.pending

    def make_run(self, runtime: ModelRuntime, session: Any, observe: HeadObserver | None
                 ) -> tuple[Callable[[list[np.ndarray]], list[np.ndarray]],
                            Callable[[int, float], None]]:
        """The batch function of one worker (its own base session) and its batch observer,
        which splits each batch's compute time among the heads by their rows."""
        last: dict[str, int] = {}

        def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
            *base_inputs, tags = inputs
            features = runtime.run(session, base_inputs)[0]
            heads = self._heads
            first = int(tags[0])
            if (tags == first).all():  # one head in this batch: no gathering
                head = heads[first]
                mix = {head.name: len(tags)}
                out = head.run(features)
            else:
                present = [int(t) for t in np.unique(tags)]
                width = max(heads[t].width for t in present)
                out = np.zeros((len(tags), width), np.float32)
                mix = {}
                for t in present:
                    head, rows = heads[t], tags == t
                    out[rows, :head.width] = head.run(features[rows])
                    mix[head.name] = int(rows.sum())
            last.clear()
            last.update(mix)
            with self._lock:
                self.batches += 1
                self.mixed += len(mix) > 1
                for name, n in mix.items():
                    self.rows[name] = self.rows.get(name, 0) + n
            return [out]

        def observer(rows: int, compute_ms: float) -> None:
            if observe is None or not rows:
                return
            for name, n in list(last.items()):
                observe(name, n, compute_ms * n / rows)

        return run, observer


class HeadPool:
    """One head's view of its shared base: what the agent and the manager call."""

    def __init__(self, shared: SharedBase, name: str, index: int, width: int) -> None:
        self.shared = shared
        self.name = name
        self._index = np.int32(index)
        self._width = width
        self._in_flight = 0
        self.served = 0

    @property
    def _pool(self) -> WorkerPool:
        assert self.shared.pool is not None, "a head is loaded only on a running base"
        return self.shared.pool

    @property
    def workers(self) -> int:
        return self._pool.workers

    @property
    def depth(self) -> int:
        return self._in_flight

    @property
    def idle(self) -> bool:
        return not self._in_flight

    @property
    def running(self) -> bool:
        return self.shared.pool is not None and self.shared.pool.running

    @property
    def batches(self) -> int:
        return self.shared.batches

    @property
    def cpu_share(self) -> float:
        return self._pool.cpu_share

    @property
    def slowdown(self) -> float:
        return self._pool.slowdown

    async def submit(self, inputs: list[np.ndarray], *, budget_ms: float | None = None,
                     offline: bool = False, alone: bool = False) -> BatchResult:
        """Through the base's workers, tagged with this head; its own output back."""
        rows = int(inputs[0].shape[0])
        tags = np.full(rows, self._index, np.int32)
        self._in_flight += 1
        try:
            result = await self._pool.submit([*inputs, tags], budget_ms=budget_ms,
                                             offline=offline, alone=alone)
        finally:
            self._in_flight -= 1
        self.served += 1
        out = result.outputs[0]
        if out.shape[1] != self._width:
            out = out[:, :self._width]
        return dataclasses.replace(result, outputs=[out])

    async def __aenter__(self) -> HeadPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None  # the base closes with its last head (ModelManager)
