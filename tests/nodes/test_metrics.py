"""GET /metrics: Prometheus text with what an operator needs to see."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh import AsyncClient, InvalidInput
from nodes.agent import AgentConfig


async def _scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted label items: value}."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _value(samples: dict[str, Any], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


async def test_requests_batches_queues_and_memory_are_exported(
        digits_home: Path, serving: Any, heldout: Any, edge_and_core: Any) -> None:
    images, _ = heldout
    topology = edge_and_core
    async with serving(AgentConfig(node="core-1", topology=topology, home=digits_home)
                       ) as (_, core_server):
        core_url = str(core_server.make_url("")).rstrip("/")
        config = AgentConfig(node="edge-1", topology=topology, home=digits_home,
                             neighbours={"core-1": core_url})
        async with serving(config) as (_, edge_server):
            url = str(edge_server.make_url("")).rstrip("/")
            async with AsyncClient(url) as client:
                local = [await client.infer("digits", images[i:i + 1], latency_ms=50)
                         for i in range(3)]
                far = await client.infer("digits", images[:4], min_accuracy=0.99)
                with pytest.raises(InvalidInput):
                    await client.infer("digits", np.zeros((1, 65), np.float32))
            edge = await _scrape(url)
        core = await _scrape(core_url)

    assert {r.served_by.node for r in local} == {"edge-1"} and far.served_by.node == "core-1"
    variant = local[0].served_by.variant
    ok = edge["tiermesh_requests_total"]
    assert sum(v for k, v in ok.items() if ("outcome", "ok") in k and ("tier", "edge") in k) == 3
    assert _value(edge, "tiermesh_requests_total", task="digits", variant="digits-cnn",
                  tier="core", outcome="ok") == 1
    assert _value(edge, "tiermesh_requests_total", task="digits", variant="", tier="",
                  outcome="invalid_input") == 1
    assert _value(edge, "tiermesh_request_latency_seconds_count", task="digits", variant="digits-cnn",
                  tier="core", outcome="ok") == 1
    assert _value(edge, "tiermesh_forwarded_requests_total", destination="core-1",
                  next_hop="core-1", transport="http") == 1
    assert _value(edge, "tiermesh_batch_size_rows_count", variant=variant) >= 1
    assert _value(core, "tiermesh_batch_size_rows_sum", variant="digits-cnn") == 4
    assert _value(core, "tiermesh_requests_total", task="digits", variant="digits-cnn",
                  tier="core", outcome="ok") == 1
    for name in ("digits-linear", "digits-mlp"):
        assert _value(edge, "tiermesh_queue_depth", variant=name) == 0
        assert _value(edge, "tiermesh_variant_loaded", variant=name) == 1
        assert _value(edge, "tiermesh_variant_memory_bytes", variant=name) > 0
        assert _value(edge, "tiermesh_variant_loads_total", variant=name, outcome="loaded") == 1
    assert _value(edge, "tiermesh_model_memory_budget_bytes") == 256 * 1024 * 1024
