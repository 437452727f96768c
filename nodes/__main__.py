"""Run one node agent.

``python -m nodes --topology FILE --node NAME --home DIR`` (what ``mesh node run``
runs): the node listens where its ``address`` in the topology says and reaches
its neighbours at theirs; nothing else is needed on the host.

``python -m nodes --runtime RUN.json --node NAME`` (what ``mesh up`` runs): the
local testbed's run file says where each node listens and the URLs that reach
its neighbours through the link emulators (HTTP and ``tcp://`` stream URLs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from mesh.certs import CertificateError, with_tls
from mesh.errors import TopologyError
from mesh.runtimes import thread_env
from mesh.topology import load_topology
from nodes.agent import AgentConfig, NodeAgent
from nodes.app import make_app, runner_options
from nodes.identity import insecure_bind
from nodes.limits import NodeLimits
from nodes.membership import Membership
from nodes.stream import StreamServer


async def serve(config: AgentConfig, address: str) -> None:
    """Serve ``config``'s node on its HTTP and stream ports until SIGTERM or SIGINT.

    With ``config.tls`` both ports speak TLS and know nodes by certificate. Exits
    (``SystemExit``, with the reason and the fix) when the node would listen on a
    non-loopback address without TLS and without ``allow_insecure``, or when its TLS
    files are missing or broken; nothing has started then.
    """
    log = logging.getLogger("tiermesh.node")
    problem = insecure_bind(config.host, tls=config.tls is not None,
                            allow_insecure=config.allow_insecure)
    if problem is not None:
        raise SystemExit(f"cannot start node {config.node!r}: {problem}")
    server_tls = None
    if config.tls is not None:
        try:
            server_tls = config.tls.server_context()
        except CertificateError as exc:
            raise SystemExit(f"cannot start node {config.node!r}: {exc}") from None
        address = with_tls(address)
    elif config.allow_insecure and insecure_bind(config.host, tls=False, allow_insecure=False):
        log.warning("%s listens on %s without TLS (--insecure): anyone on that network can pose "
                    "as a node of this mesh", config.node, config.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with NodeAgent(config) as agent, Membership.for_agent(agent) as membership, \
            contextlib.AsyncExitStack() as stack:
        stream_address = None
        limits = NodeLimits.for_agent(agent)  # one large-body budget for both ports
        if config.stream_port is not None:  # open first, so /healthz means both are up
            stream = await stack.enter_async_context(
                StreamServer(agent, config.host, config.stream_port, limits=limits,
                             ssl=server_tls))
            stream_address = f"tcp://{config.host}:{stream.port}"
        app = make_app(agent, address=address, stream_address=stream_address, limits=limits)
        membership.add_routes(app)
        runner = web.AppRunner(app, access_log=None, **runner_options(config))
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.host, config.port, reuse_address=True,
                               ssl_context=server_tls)
            await site.start()
            log.info("%s (%s) serving on %s%s with %s", config.node, agent.spec.tier, address,
                     f" and {stream_address}" if stream_address else "",
                     ", ".join(sorted(agent.loaded)) or "no variants")
            await stop.wait()
        finally:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--runtime", type=Path, help="run file written by mesh up (testbed)")
    source.add_argument("--topology", type=Path,
                        help="topology file: the node listens where its address says and finds "
                             "its neighbours at theirs (mesh node run)")
    parser.add_argument("--node", required=True, help="which node of the topology to run")
    parser.add_argument("--home", type=Path, help="the node's home (with --topology)")
    parser.add_argument("--tls-dir", type=Path,
                        help="ca.pem, node.pem and node-key.pem: mutual TLS with the other nodes")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback address without TLS")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s {args.node} %(levelname)s %(name)s: %(message)s")
    try:
        config, address = (_from_run_file(args.runtime, args.node) if args.runtime
                           else _from_topology(args.topology, args.node, args.home))
        config = _secured(config, args.tls_dir, args.insecure)
    except (TopologyError, ValueError, OSError) as exc:
        print(f"cannot start node {args.node!r}: {exc}", file=sys.stderr)
        return 2
    # Runtimes loaded later (torch, LiteRT) size their thread pools from these.
    for key, value in thread_env(config.topology.hardware_of(args.node).threads).items():
        os.environ.setdefault(key, value)
    _run(serve(config, address))
    return 0


def _secured(config: AgentConfig, tls_dir: Path | None, insecure: bool) -> AgentConfig:
    """``config`` with the node's TLS files (``--tls-dir``) and ``--insecure``, if given."""
    options: dict[str, Any] = {}
    if tls_dir is not None:
        from mesh.certs import TlsFiles

        options["tls"] = TlsFiles(tls_dir / "ca.pem", tls_dir / "node.pem",
                                  tls_dir / "node-key.pem")
    if insecure:
        options["allow_insecure"] = True
    return dataclasses.replace(config, **options) if options else config


def _from_topology(path: Path, node: str, home: Path | None) -> tuple[AgentConfig, str]:
    """One node per host: everything from the topology file (``mesh node run``)."""
    topology = load_topology(path)
    config = AgentConfig.from_topology(topology, node, (home or Path(".tiermesh")).resolve())
    address = topology.nodes[node].address
    assert address is not None
    return config, address.http_url


def _from_run_file(path: Path, node: str) -> tuple[AgentConfig, str]:
    """The local testbed: ports and neighbour URLs (through the link emulators) from run.json."""
    run = json.loads(path.read_text())
    topology = load_topology(run["topology"])
    me = run["nodes"].get(node)
    if me is None:
        raise ValueError(f"node {node!r} is not in {path}")
    config = AgentConfig(
        node=node, topology=topology, home=Path(run["home"]),
        neighbours=me["neighbours"], host=me["host"], port=me["port"],
        stream_port=me.get("stream_port"), stream_neighbours=me.get("stream_neighbours", {}),
    )
    return config, f"http://{me['host']}:{me['port']}"


def _run(main: Coroutine[Any, Any, None]) -> None:
    """uvloop when installed: it takes ~70 us off every HTTP round trip (benchmarks/overhead.py)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


if __name__ == "__main__":
    sys.exit(main())
