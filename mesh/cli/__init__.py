"""The ``mesh`` command line.

::

    mesh build                         train and register the bundled variants
    mesh up topologies/local.yaml      start every node (own process) with emulated links
    mesh node run TOPOLOGY NODE        run one node here, from its address in the topology
    mesh certs init | issue NODE       a mesh CA and node certificates (mutual TLS between nodes)
    mesh tenants new-key TENANT        an API key for a tenant, and the hash the topology stores
    mesh tenants key add|revoke ...    add or revoke an API key on a running mesh (at the core)
    mesh deploy render TOPOLOGY        Kubernetes manifests or a systemd unit from the topology
    mesh status [--json]               one row per node: tier, address, variants, queue, p50/p99
    mesh plan --task digits --from edge-1 --latency-ms 10
    mesh variants list [--task T]      the registered variants and their measurements
    mesh models add NAME --task T --model FILE --validation V.npz [--train T.npz]
                                       register a model; its variants are made, checked, measured
    mesh topology check FILE           validate and summarise a topology file
    mesh node stop|start|restart NAME  one node of the running local mesh (it rejoins by itself)
    mesh link list                     the running mesh's links (a--b): state, settings, traffic
    mesh link cut|heal NAME            cut a link (silence, not refusal) or heal it
    mesh link set NAME --latency-ms 30 --loss 0.01 --jitter-ms 5 --bandwidth-mbps 10
    mesh down                          stop every process of the mesh (also nodes restarted by hand)
    mesh demo                          all of the above with real queries

Every command takes ``--home`` (default ``.tiermesh``, or ``$TIERMESH_HOME``):
the folder holding the registry, the artifact store and the running mesh's state.
Errors are printed as one clear message and exit with status 1, never a traceback.
"""

from __future__ import annotations

import sys

from mesh.cli import (  # noqa: F401  (registers the commands)
    certs,
    deploy,
    link,
    models,
    node,
    run,
    tenants,
    topology,
    variants,
)
from mesh.cli.app import cli

__all__ = ["cli", "main"]


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="mesh")


if __name__ == "__main__":
    main(sys.argv[1:])
