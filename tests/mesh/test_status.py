"""``mesh status`` as a person reads it: the nodes, their workers, the placement's decisions."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from mesh.status import decisions_table, status_table


def _row(node: str, tier: str, version: str | None, *, root: bool = False,
         decisions: list[dict[str, Any]] | None = None, workers: int = 1) -> dict[str, Any]:
    return {"node": node, "tier": tier, "address": f"http://{node}", "up": True,
            "variants": [{"name": "digits-linear", "loaded": True, "state": "loaded",
                          "workers": workers}],
            "queue_depth": 0, "requests": 5, "served_local": 5, "latency_ms": {},
            "placement": {"managed": True, "live": {
                "version": version, "root": root, "rounds": 42, "interval_s": 5.0,
                "decisions": decisions or []}}}


def _text(renderable: Any) -> str:
    console = Console(width=200, record=True)
    console.print(renderable)
    return console.export_text()


def test_status_shows_each_variants_workers_and_the_roots_latest_decisions() -> None:
    add = {"kind": "add-workers", "node": "edge-1", "variant": "digits-linear", "workers": 3,
           "cause": "load", "reason": "digits-linear on edge-1 is 90% busy over 1 worker(s)"}
    rows = [_row("core-1", "core", "abc.7", root=True, decisions=[add]),
            _row("edge-1", "edge", "abc.6", workers=3)]
    text = _text(status_table(rows))
    assert "digits-linear x3" in text and "digits-linear," not in text
    table = decisions_table(rows)
    assert table is not None
    text = _text(table)
    assert "add-workers" in text and "90% busy" in text
    assert "placement abc.7" in text and "42 rounds" in text
    assert "not yet adopted by edge-1" in text


def test_no_decisions_table_before_any_placement_was_heard() -> None:
    assert decisions_table([_row("edge-1", "edge", None)]) is None


def test_failures_show_ejected_peers_retries_and_degraded_answers() -> None:
    from mesh.status import failures_table

    quiet = _row("core-1", "core", "abc.7", root=True)
    quiet["failures"] = {"ejected": {}, "retries": {"spent_total": 0}, "degraded_answers": 0,
                         "recent": []}
    assert failures_table([quiet]) is None  # nothing has failed: no table
    edge = _row("edge-1", "edge", "abc.7")
    edge["failures"] = {
        "ejected": {"mid-1": {"ejected": True, "for_s": 3.5, "times": 2,
                              "reason": "5 failures in a row"}},
        "retries": {"retries": 4, "allowed": 12, "spent_total": 9, "refused_total": 1},
        "degraded_answers": 7,
        "recent": [{"at": 1.0, "peer": "mid-1", "reason": "forwarding to mid-1 failed"}]}
    table = failures_table([quiet, edge])
    assert table is not None
    text = _text(table)
    assert "mid-1 (out 3.5 s, x2)" in text and "4 of 12 (refused 1)" in text
    assert "7" in text and "forwarding to mid-1 failed" in text and "core-1" not in text


def test_one_tenants_usage_on_every_node_and_in_all() -> None:
    from mesh.status import tenant_table

    edge = _row("edge-1", "edge", "v")
    edge["tenants"] = {"clinic": {"queries": 5, "refused": 1, "compute_s": 0.0, "bytes_in": 1280,
                                  "bytes_out": 200, "cost": 0.002},
                       "school": {"queries": 99, "refused": 0, "compute_s": 0.5,
                                  "bytes_in": 1, "bytes_out": 1, "cost": 0.5}}
    core = _row("core-1", "core", "v")
    core["tenants"] = {"clinic": {"queries": 0, "refused": 0, "compute_s": 0.25, "bytes_in": 0,
                                  "bytes_out": 0, "cost": 0.0}}
    text = _text(tenant_table([edge, core], "clinic"))
    assert "tenant clinic" in text and "1280" in text and "0.25" in text
    assert "99" not in text  # nothing of another tenant
    total = next(line for line in text.splitlines() if "all" in line)
    assert "5" in total and "0.25" in total and "0.002" in total


def test_each_node_shows_its_real_cpus_beside_its_class_and_the_host_it_shares() -> None:
    rows = [_row("core-1", "core", "v", root=True), _row("edge-1", "edge", "v"),
            _row("edge-2", "edge", "v"), _row("old-1", "edge", "v")]
    for row, (hw, cores, cpus, host) in zip(rows, [
            ("core-cpu", 64, 2.0, "aaaaaaaa11"), ("edge-cpu", 4, 2.0, "aaaaaaaa11"),
            ("edge-cpu", 4, 1.5, "bbbbbbbb22"), ("edge-cpu", 4, None, None)], strict=True):
        row["hardware"] = hw
        if cpus is not None:
            row["machine"] = {"declared_cores": cores, "cpus": cpus, "host": host}
    text = _text(status_table(rows))
    # two nodes on one 2-CPU machine, whatever their classes declare: both say so
    assert "core-cpu: 64 cores, 2 CPUs real (host aaaaaaaa, shared)" in text
    assert "edge-cpu: 4 cores, 2 CPUs real (host aaaaaaaa, shared)" in text
    # a node alone on its machine: no host to point out
    assert "edge-cpu: 4 cores, 1.5 CPUs real" in text and "bbbbbbbb" not in text
    # a node of an older version reports no machine: its class alone
    assert text.count("edge-cpu") == 3
