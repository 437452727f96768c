"""Placement: which variants each node hosts, with how many compute workers, and how that
follows the load. Pure: the registry, the topology, the observed load and the clock come in
as arguments; decisions come out (docs/placement.md).

Parts::

    catalogue.py    registry -> per (task, hardware profile): accuracy, latency, memory,
                    throughput; the front of variants worth hosting (the dominated are
                    not), also within what one node may host
    constraints.py  allow (``variants:``) and deny (``deny_variants:``) globs per node:
                    constraints the placement chooses within, not the placement
    resources.py    a hardware class's memory, accelerator memory and worker slots
    machines.py     Machine (the CPUs a node really has, the host it shares), CpuBudget:
                    the workers of one host's nodes within that host's CPUs
    base.py         the base placement: tiers (light at the edge, accurate inward, largest
                    on accelerators in the core), coverage of every task from every entry
                    node, tenants
    forecast.py     per (task, subtree) arrival rate: EWMA level x learned daily shape
    inputs.py       what a round is told: VariantLoad, LoadSnapshot, LoadReport (the wire form)
    meter.py        LoadMeter: a node's counts per variant and task -> smoothed rates
    scaling.py      Autoscaler.step(registry, load, now) -> Round: reconcile, measure, scale
    ladder.py       one round's actions: workers, replicas, faster variants or hardware,
                    scale-down, eviction, restore, all with hysteresis
    accuracy.py     scale_accuracy(): a cheaper variant that still meets min_accuracy
    model.py        Placement, PlacementDecision, Round (to_json for ``mesh status``)
    hosting.py      Hosting: what each node hosts (the placement; every node is managed)

Use::

    scaler = Autoscaler(topology)
    round_ = scaler.step(registry, LoadSnapshot(demand=..., served=...), now)
    round_.placement.variants("edge-1")   # {"digits-linear": 1, ...}
"""

from __future__ import annotations

from mesh.placement.accuracy import AccuracyChoice, ServingOption, scale_accuracy
from mesh.placement.base import BasePlan, base_placement, entry_nodes
from mesh.placement.catalogue import Catalogue, Option
from mesh.placement.constraints import Constraints, HostRule
from mesh.placement.forecast import ArrivalForecast, Forecaster
from mesh.placement.hosting import Hosting
from mesh.placement.inputs import LoadReport, LoadSnapshot, VariantLoad
from mesh.placement.machines import CpuBudget, Machine
from mesh.placement.meter import LoadMeter
from mesh.placement.model import Cause, DecisionKind, Placement, PlacementDecision, Round
from mesh.placement.resources import NodeResources, variant_memory_bytes
from mesh.placement.scaling import Autoscaler
from mesh.placement.tuning import Tuning

__all__ = [
    "AccuracyChoice",
    "ArrivalForecast",
    "Autoscaler",
    "BasePlan",
    "Catalogue",
    "Cause",
    "Constraints",
    "CpuBudget",
    "DecisionKind",
    "Forecaster",
    "HostRule",
    "Hosting",
    "LoadMeter",
    "LoadReport",
    "LoadSnapshot",
    "Machine",
    "NodeResources",
    "Option",
    "Placement",
    "PlacementDecision",
    "Round",
    "ServingOption",
    "Tuning",
    "VariantLoad",
    "base_placement",
    "entry_nodes",
    "scale_accuracy",
    "variant_memory_bytes",
]
