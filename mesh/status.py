"""A running mesh's status: fetched from every node's ``/v1/status``, drawn as a table.

Shared by ``mesh status`` and ``mesh demo`` (so neither imports the other).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from rich.table import Table

from mesh.errors import MeshError
from mesh.peers import KEY_FILE

__all__ = ["fetch_status", "mesh_status", "status_table", "decisions_table", "failures_table",
           "tenant_table", "fmt_ms"]


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


async def fetch_status(nodes: dict[str, dict[str, str]], ssl: Any = None,
                       headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every node's status (``up`` False, with what the run file says, for one that is down).

    ``ssl``: the context for nodes that serve TLS (:func:`mesh.certs.ca_context`).
    ``headers``: how the caller proves it may read status on a mesh with tenants (the
    mesh key's operator token, or ``Authorization: Bearer <operator key>``).
    """
    import aiohttp

    async def one(session: aiohttp.ClientSession, name: str, info: dict[str, str]
                  ) -> dict[str, Any]:
        try:
            async with session.get(info["address"] + "/v1/status", headers=headers,
                                   ssl=ssl if ssl is not None else True) as resp:
                body = await resp.json()
                body["up"] = resp.status == 200
                return body
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return {"node": name, "tier": info["tier"], "address": info["address"],
                    "stream_address": info.get("stream_address"), "up": False}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        return list(await asyncio.gather(*(one(session, n, i) for n, i in nodes.items())))


def mesh_status(home: Path) -> list[dict[str, Any]]:
    """The status of the mesh running from ``home``; raises :class:`MeshError` when none is.
    Signed with the home's mesh key as the operator (status is for operators once the
    mesh has tenants)."""
    from mesh.remote import OPERATOR, key_from
    from mesh.testbed.local import read_state

    state = read_state(home / "run")
    if state is None:
        raise MeshError(f"no mesh is running from {home}; start one with 'mesh up TOPOLOGY'")
    headers = key_from(home, None).headers(OPERATOR) \
        if (home / KEY_FILE).is_file() and state.client_ssl() is None else None
    return asyncio.run(fetch_status(state.nodes, state.client_ssl(), headers))


def status_table(rows: list[dict[str, Any]]) -> Table:
    """One row per node: tier, hardware (the class, the cores it declares and the CPUs the
    node really has; the host when nodes share one), address, up or down, variants loaded
    (``xN``: N compute workers), queue, requests, latencies."""
    table = Table(title="mesh status")
    hosts: dict[str, int] = {}
    for row in rows:
        host = (row.get("machine") or {}).get("host") if row.get("up") else None
        if host:
            hosts[host] = hosts.get(host, 0) + 1
    shared = sorted(h for h, n in hosts.items() if n > 1)
    for col in ("node", "tier", "hardware", "address", "state", "variants", "queue", "requests",
                "served here", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right" if col in (
            "queue", "requests", "served here", "p50 ms", "p99 ms") else "left")
    order = {"core": 0, "intermediate": 1, "edge": 2}
    for row in sorted(rows, key=lambda r: (order.get(r.get("tier", ""), 3), r["node"])):
        if not row["up"]:
            table.add_row(row["node"], row.get("tier", "?"), row.get("hardware", ""),
                          row.get("address", ""), "[red]down[/red]", "", "", "", "", "", "")
            continue
        loaded = [v["name"] + (f" x{v['workers']}" if v.get("workers", 1) > 1 else "")
                  + (f" (on {v['base']})" if v.get("base") else "")
                  for v in row["variants"] if v.get("loaded")]
        # the bases loaded for private heads: once for all who share, once per isolated owner
        loaded += [f"{b['base']} [dim](base of {len(b['heads'])} head(s)"
                   + (f", {b['owner']}'s own" if b["owner"] else ", shared") + ")[/dim]"
                   for b in row.get("shared_bases") or []]
        broken = [v["name"] for v in row["variants"] if v.get("state") == "unavailable"]
        variants = ", ".join(loaded) + (f" [red](failed: {', '.join(broken)})[/red]" if broken else "")
        short = [f"{v} live {f['live']:.3f} < {f['promised']:.3f}"
                 for v, f in (row.get("live_accuracy") or {}).items() if f.get("below_promise")]
        if short:
            variants += f" [red](below promise: {'; '.join(short)})[/red]"
        lat = row.get("latency_ms", {})
        unreachable = row.get("unreachable") or []
        state = "[green]up[/green]" + (
            f" [yellow](cannot reach {', '.join(unreachable)})[/yellow]" if unreachable else "")
        table.add_row(row["node"], row["tier"], _hardware(row, shared), row["address"], state,
                      variants or "-", str(row["queue_depth"]), str(row["requests"]),
                      str(row["served_local"]), fmt_ms(lat.get("p50")), fmt_ms(lat.get("p99")))
    return table


def _hardware(row: dict[str, Any], shared: list[str]) -> str:
    """``edge-cpu: 4 cores, 2 CPUs real (host 90090c7d, shared)``: the class and what it
    declares, beside the CPUs the node measured and, when nodes share a machine, which one
    (as the placement's decisions name it)."""
    text = str(row.get("hardware", ""))
    machine = row.get("machine")
    if not isinstance(machine, dict) or machine.get("cpus") is None:
        return text  # an older node: only its class
    text += f": {machine.get('declared_cores', '?')} cores, {machine['cpus']:g} CPUs real"
    if machine.get("host") in shared:
        text += f" (host {str(machine['host'])[:8]}, shared)"
    return text


def decisions_table(rows: list[dict[str, Any]], *, last: int = 12) -> Table | None:
    """The placement now in force and the root's latest decisions, with their reasons
    (None when no node has heard a live placement yet)."""
    live = [r["placement"]["live"] for r in rows
            if r.get("up") and isinstance((r.get("placement") or {}).get("live"), dict)]
    root = next((p for p in live if p.get("root")), None)
    source = root or next((p for p in live if p.get("decisions")), None)
    if source is None or not source.get("version"):
        return None
    behind = sorted(r["node"] for r in rows if r.get("up") and (r.get("placement") or {})
                    .get("live", {}).get("version") not in (None, source["version"]))
    caption = (f"placement {source['version']}, round every {source.get('interval_s', 0):g} s"
               + (f", {source.get('rounds', 0)} rounds" if root else "")
               + (f"; not yet adopted by {', '.join(behind)}" if behind else ""))
    table = Table(title="placement: latest decisions", caption=caption)
    for col in ("kind", "node", "variant", "workers", "cause", "reason"):
        table.add_column(col, justify="right" if col == "workers" else "left",
                         overflow="fold")
    for d in source.get("decisions", [])[-last:]:
        table.add_row(str(d.get("kind", "")), str(d.get("node", "")), str(d.get("variant", "")),
                      str(d.get("workers", "")), str(d.get("cause", "")), str(d.get("reason", "")))
    return table


def failures_table(rows: list[dict[str, Any]]) -> Table | None:
    """Per node that has seen any: peers it ejected (or holds on probation), retries spent
    against its budget, answers degraded by a failure, and its latest failure (None when
    no node has seen a failure)."""
    table = Table(title="failures")
    for col in ("node", "ejected peers", "retries (window)", "degraded answers",
                "latest failure"):
        table.add_column(col, overflow="fold")
    shown = False
    for row in sorted(rows, key=lambda r: r["node"]):
        f = row.get("failures") if row.get("up") else None
        if not f:
            continue
        ejected = f.get("ejected") or {}
        retries = f.get("retries") or {}
        recent = f.get("recent") or []
        if not (ejected or recent or f.get("degraded_answers") or retries.get("spent_total")):
            continue
        shown = True
        peers = ", ".join(f"{p} ({'out ' + str(e['for_s']) + ' s' if e.get('ejected') else 'probation'}"
                          f", x{e.get('times', 1)})" for p, e in ejected.items()) or "-"
        spent = (f"{retries.get('retries', 0)} of {retries.get('allowed', 0)} "
                 f"(refused {retries.get('refused_total', 0)})")
        last = recent[-1] if recent else None
        table.add_row(row["node"], peers, spent, str(f.get("degraded_answers", 0)),
                      f"{last['peer']}: {last['reason']}" if last else "-")
    return table if shown else None


def tenant_table(rows: list[dict[str, Any]], tenant: str) -> Table:
    """One tenant's usage on every node (and in all): what ``mesh status --tenant`` shows."""
    table = Table(title=f"tenant {tenant}: usage per node")
    cols = ("queries", "refused", "compute_s", "bytes_in", "bytes_out", "cost")
    table.add_column("node")
    for col in cols:
        table.add_column(col.replace("_", " "), justify="right")
    total = dict.fromkeys(cols, 0.0)
    for row in sorted(rows, key=lambda r: r["node"]):
        usage = (row.get("tenants") or {}).get(tenant) if row.get("up") else None
        if not usage:
            continue
        for col in cols:
            total[col] += usage.get(col, 0)
        table.add_row(row["node"], *(_fmt(usage.get(col, 0)) for col in cols))
    table.add_row("[bold]all[/bold]", *(_fmt(total[col]) for col in cols))
    return table


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) and not value.is_integer() else \
        str(int(value))
