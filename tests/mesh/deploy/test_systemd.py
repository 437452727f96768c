"""systemd units for nodes on bare machines."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from mesh.deploy import SystemdOptions, render_systemd
from mesh.errors import TopologyError
from mesh.topology import load_topology, parse_topology

ROOT = Path(__file__).resolve().parents[3]


def _unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(text)
    return parser


def test_a_unit_runs_the_node_as_its_own_user_and_restarts_it_on_failure() -> None:
    rendering = render_systemd(load_topology(ROOT / "topologies" / "local.yaml"), ["edge-1"])
    assert set(rendering.files) == {"tiermesh-edge-1.service", "edge-1.env"}
    unit = _unit(rendering.files["tiermesh-edge-1.service"])
    service = unit["Service"]
    assert service["ExecStart"] == (
        "/opt/tiermesh/bin/mesh --home ${TIERMESH_HOME} node run ${TIERMESH_TOPOLOGY} "
        "${TIERMESH_NODE} --tls-dir ${TIERMESH_TLS_DIR}")
    assert service["Restart"] == "on-failure"
    assert service["User"] == service["Group"] == "tiermesh"
    assert service["StateDirectory"] == "tiermesh"  # /var/lib/tiermesh, owned by the user
    assert service["EnvironmentFile"] == "/etc/tiermesh/edge-1.env"
    assert service["MemoryMax"] == f"{512 + 256}M"  # edge-cpu: 512 MB for models
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    env = dict(line.split("=", 1) for line in rendering.files["edge-1.env"].splitlines()
               if line and not line.startswith("#"))
    assert env == {"TIERMESH_TOPOLOGY": "/etc/tiermesh/topology.yaml", "TIERMESH_NODE": "edge-1",
                   "TIERMESH_HOME": "/var/lib/tiermesh", "TIERMESH_TLS_DIR": "/etc/tiermesh/tls"}
    assert rendering.warnings == ()  # local.yaml gives edge-1 and mid-1 their addresses


def test_by_default_every_edge_node_gets_a_unit() -> None:
    rendering = render_systemd(load_topology(ROOT / "topologies" / "local.yaml"))
    assert sorted(rendering.files) == ["edge-1.env", "edge-2.env", "tiermesh-edge-1.service",
                                       "tiermesh-edge-2.service"]


def test_nodes_without_addresses_are_rendered_with_a_warning_naming_them() -> None:
    rendering = render_systemd(load_topology(ROOT / "topologies" / "campus.yaml"), ["gym-gate"],
                               SystemdOptions(source="campus.yaml"))
    assert rendering.warnings == (
        "gym-gate: gym-gate, sports have no address in campus.yaml; give every node an address "
        "(docs/topology.md) before this node runs off this machine",)


def test_an_accelerator_machine_keeps_its_devices() -> None:
    topology = parse_topology({"name": "g", "hardware": {"gpu": {"kind": "cuda"}, "cpu": {}},
                               "nodes": [{"name": "a", "tier": "edge", "hardware": "gpu"},
                                         {"name": "b", "tier": "edge", "hardware": "cpu"}],
                               "links": [{"between": ["a", "b"], "latency_ms": 1,
                                          "bandwidth_mbps": 1}]})
    files = render_systemd(topology).files
    assert "PrivateDevices" not in _unit(files["tiermesh-a.service"])["Service"]
    assert _unit(files["tiermesh-b.service"])["Service"]["PrivateDevices"] == "yes"


def test_a_node_not_in_the_topology_is_an_error_naming_it() -> None:
    with pytest.raises(TopologyError, match="node 'edge-9' is not in the topology"):
        render_systemd(load_topology(ROOT / "topologies" / "local.yaml"), ["edge-1", "edge-9"])
