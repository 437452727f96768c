"""Run one node agent: ``python -m nodes --runtime RUN.json --node NAME``.

``RUN.json`` is written by the testbed (``mesh up``): the topology file, the
home directory (registry + artifact store), and for every node its listen
address and the URLs that reach its neighbours through the link emulator;
optionally ``stream_port`` for its own msgpack stream (:mod:`mesh.stream`) and
``stream_neighbours``, the ``tcp://`` addresses of its neighbours' streams,
over which it forwards queries (HTTP to a neighbour without one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from mesh.errors import TopologyError
from mesh.runtimes import thread_env
from mesh.topology import load_topology
from nodes.agent import AgentConfig, NodeAgent
from nodes.app import make_app, runner_options
from nodes.limits import NodeLimits
from nodes.membership import Membership
from nodes.stream import StreamServer


async def serve(config: AgentConfig, address: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log = logging.getLogger("tiermesh.node")
    async with NodeAgent(config) as agent, Membership.for_agent(agent) as membership, \
            contextlib.AsyncExitStack() as stack:
        stream_address = None
        limits = NodeLimits.for_agent(agent)  # one large-body budget for both ports
        if config.stream_port is not None:  # open first, so /healthz means both are up
            stream = await stack.enter_async_context(
                StreamServer(agent, config.host, config.stream_port, limits=limits))
            stream_address = f"tcp://{config.host}:{stream.port}"
        app = make_app(agent, address=address, stream_address=stream_address, limits=limits)
        membership.add_routes(app)
        runner = web.AppRunner(app, access_log=None, **runner_options(config))
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
            await site.start()
            log.info("%s (%s) serving on %s%s with %s", config.node, agent.spec.tier, address,
                     f" and {stream_address}" if stream_address else "",
                     ", ".join(sorted(agent.loaded)) or "no variants")
            await stop.wait()
        finally:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes", description=__doc__)
    parser.add_argument("--runtime", required=True, type=Path, help="run file written by mesh up")
    parser.add_argument("--node", required=True, help="which node of the topology to run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s {args.node} %(levelname)s %(name)s: %(message)s")
    run = json.loads(args.runtime.read_text())
    try:
        topology = load_topology(run["topology"])
    except TopologyError as exc:
        print(exc, file=sys.stderr)
        return 2
    me = run["nodes"].get(args.node)
    if me is None:
        print(f"node {args.node!r} is not in {args.runtime}", file=sys.stderr)
        return 2
    config = AgentConfig(
        node=args.node, topology=topology, home=Path(run["home"]),
        neighbours=me["neighbours"], host=me["host"], port=me["port"],
        stream_port=me.get("stream_port"), stream_neighbours=me.get("stream_neighbours", {}),
    )
    # Runtimes loaded later (torch, LiteRT) size their thread pools from these.
    for key, value in thread_env(topology.hardware_of(args.node).threads).items():
        os.environ.setdefault(key, value)
    _run(serve(config, f"http://{me['host']}:{me['port']}"))
    return 0


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
