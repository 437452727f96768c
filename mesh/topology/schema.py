"""The topology file schema: pydantic models whose field names are the YAML keys.

Everything here validates one field at a time; cross-references (a node's
hardware class, a link's ends, a group's parents, a tenant's node globs) are
checked by :mod:`mesh.topology.load`, which also expands ``groups``.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "host_refusal",
    "TIERS",
    "TIER_RANK",
    "Tier",
    "NAME_PATTERN",
    "Accelerator",
    "HardwareClass",
    "TierSpec",
    "Node",
    "NodeAddress",
    "Link",
    "Spread",
    "GroupLink",
    "Group",
    "Tenant",
    "MembershipSpec",
    "PlacementSpec",
    "Quota",
    "Operators",
    "TopologyFile",
]

TIERS: tuple[str, ...] = ("edge", "intermediate", "core")
#: Position of a tier from the devices outwards; parents sit in a higher (or the same) tier.
TIER_RANK: dict[str, int] = {tier: i for i, tier in enumerate(TIERS)}
Tier = Literal["edge", "intermediate", "core"]
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def host_refusal(allow: tuple[str, ...] | list[str] | None, deny: tuple[str, ...] | list[str],
                 variant: str, base: str = "") -> str | None:
    """Why a node with ``allow`` globs (None: no allow list) and ``deny`` globs may not host
    ``variant``; None when it may. Deny wins; an allow list must match. A private head's
    ``base`` is matched as well as its own name (a head may go where its base may)."""
    names = (variant, base) if base else (variant,)
    denied = next((p for p in deny for n in names if fnmatch.fnmatchcase(n, p)), None)
    if denied is not None:
        return f"denied by {denied!r}"
    if allow is not None and not any(fnmatch.fnmatchcase(n, p) for p in allow for n in names):
        return f"not in the allow list {list(allow)}"
    return None


class Accelerator(_Schema):
    """One kind of accelerator in a machine (``{type: t4, count: 1, memory_mb: 16384}``)."""

    type: str = Field(min_length=1)
    count: int = Field(1, ge=1, le=64)
    memory_mb: int = Field(0, ge=0)


class HardwareClass(_Schema):
    """A kind of machine, shared by every node that names it.

    ``threads`` is what one node agent may use for compute (and selects the
    latency profile); ``cores`` is what the machine has. ``power_w`` is the
    draw while computing, so energy per inference is ``power_w`` x compute
    time plus the fixed ``energy_per_inference_j``.
    """

    kind: Literal["cpu", "cuda"] = "cpu"
    threads: int = Field(1, ge=1, le=256)
    cores: int | None = Field(None, ge=1, le=4096)
    memory_mb: int = Field(1024, ge=64)
    accelerators: tuple[Accelerator, ...] = ()
    cost_per_hour: float = Field(0.0, ge=0)
    power_w: float = Field(0.0, ge=0, le=100_000)
    energy_per_inference_j: float = Field(0.0, ge=0)

    @property
    def profile_key(self) -> str:
        """The key under which variant latencies for this class are stored."""
        return f"{self.kind}-{self.threads}t"



#: A variant name or a glob over names (``digits-*``): the entries of ``variants`` and
#: ``deny_variants``.
VariantGlob = Annotated[str, Field(min_length=1)]


class TierSpec(_Schema):
    """Defaults for the nodes of one tier (a node's own keys win)."""

    description: str = ""
    variants: tuple[VariantGlob, ...] | None = None
    deny_variants: tuple[VariantGlob, ...] | None = None
    max_queue: int | None = Field(None, ge=1)


class NodeAddress(_Schema):
    """Where a node listens and how its neighbours and clients reach it."""

    #: A host name or IP address that the node's neighbours can reach.
    host: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:\-\[\]]+$")
    http_port: int = Field(ge=1, le=65535)
    stream_port: int = Field(ge=1, le=65535)
    #: The address the node binds (default: ``host``); ``0.0.0.0`` only when said here.
    bind: str | None = Field(None, min_length=1, max_length=253)

    @property
    def bind_host(self) -> str:
        return self.bind or self.host

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.http_port}"

    @property
    def stream_url(self) -> str:
        return f"tcp://{_url_host(self.host)}:{self.stream_port}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class Node(_Schema):
    name: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN)
    tier: Tier
    hardware: str
    #: The allow list: variant names or globs this node may host; missing = its group's, else
    #: its tier's; none anywhere = every variant. Placement chooses what it hosts within it.
    variants: tuple[VariantGlob, ...] | None = None
    #: The deny list: variants this node must never host, whatever ``variants`` says;
    #: missing = its group's, else its tier's.
    deny_variants: tuple[VariantGlob, ...] | None = None
    max_queue: int | None = Field(None, ge=1)
    #: The node it reports to; missing = derived (the nearest linked node of a higher tier).
    parent: str | None = None
    #: Where it runs (``mesh node run``); missing = wherever ``mesh up`` puts it.
    address: NodeAddress | None = None

    def allows(self, variant: str, base: str = "") -> bool:
        """Whether this node's constraints let it host ``variant`` (:func:`host_refusal`).
        What it does host is placement's choice within them (:mod:`mesh.placement`)."""
        return host_refusal(self.variants, self.deny_variants or (), variant, base) is None



class Link(_Schema):
    between: tuple[str, str]
    latency_ms: float = Field(ge=0, le=60_000)
    bandwidth_mbps: float = Field(gt=0)
    loss: float = Field(0.0, ge=0, lt=1)


#: A number, or ``[low, high]`` spread evenly over the replicas that share a parent.
Spread = float | tuple[float, float]


class GroupLink(_Schema):
    """The link from every replica of a group to its parent."""

    latency_ms: Spread
    bandwidth_mbps: Spread
    loss: Spread = 0.0


class Group(_Schema):
    """Many identical nodes, expanded at load time into ``{name}-{start}``, ``{name}-{start+1}``...

    Give ``count`` (replicas shared out in contiguous blocks over the
    parents) or ``per_parent`` (that many under each parent).
    """

    name: str = Field(min_length=1, max_length=50, pattern=NAME_PATTERN)
    tier: Tier
    hardware: str
    parents: tuple[str, ...] = Field(min_length=1)
    count: int | None = Field(None, ge=1, le=1_000_000)
    per_parent: int | None = Field(None, ge=1, le=100_000)
    start: int = Field(1, ge=0)
    variants: tuple[VariantGlob, ...] | None = None
    deny_variants: tuple[VariantGlob, ...] | None = None
    max_queue: int | None = Field(None, ge=1)
    link: GroupLink


KEY_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"


class Quota(_Schema):
    """How much one tenant may ask of the mesh, enforced at the entry node."""

    #: queries a second (a token bucket refilled at this rate)
    rps: float | None = Field(None, gt=0)
    #: tokens the bucket holds (a burst allowed above ``rps``); default: ``rps`` (at least 1)
    burst: float | None = Field(None, ge=1)
    #: queries in progress at once
    concurrent: int | None = Field(None, ge=1)


def _key_hashes(value: tuple[str, ...]) -> tuple[str, ...]:
    for i, h in enumerate(value):
        if not re.match(KEY_HASH_PATTERN, h):
            raise ValueError(f"[{i}]: store an API key's hash ('sha256:' and 64 hex digits), "
                             "never the key itself; `mesh tenants new-key` prints both")
    return value


class Tenant(_Schema):
    """Who may use the mesh, where their queries may run (glob patterns), and, for
    applications to authenticate, their API keys (hashed), quota and private tasks."""

    name: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN)
    nodes: tuple[str, ...] = ("*",)
    tasks: tuple[str, ...] = ("*",)
    #: hashes of its API keys (``sha256:<hex>``)
    keys: tuple[str, ...] = ()
    quota: Quota | None = None
    #: task globs only this tenant may see or call
    private: tuple[str, ...] = ()
    #: its private heads may share a base instance with other tenants' (false: a base
    #: instance of its own on every node, more memory, nothing computed beside others)
    share_base: bool = True

    _check_keys = field_validator("keys")(_key_hashes)

    def may_use(self, node: str) -> bool:
        return any(fnmatch.fnmatchcase(node, p) for p in self.nodes)

    def may_run(self, task: str) -> bool:
        return any(fnmatch.fnmatchcase(task, p) for p in self.tasks)


class MembershipSpec(_Schema):
    """Heartbeats and failure detection.

    A node sends its load to its parent every ``heartbeat_interval_s``; a
    parent counts a child down after ``missed_heartbeats`` intervals without
    one (``down_after_s``), and a child counts its parent down after as long
    without an answer. Load reports older than ``stale_after_s`` are ignored.
    A peer never heard from at all gets ``startup_grace_s`` more, so nodes of
    a mesh that start one after another do not call each other down.
    """

    heartbeat_interval_s: float = Field(0.5, gt=0, le=60)
    missed_heartbeats: int = Field(3, ge=1, le=100)
    stale_after_s: float = Field(5.0, gt=0, le=3600)
    startup_grace_s: float = Field(10.0, ge=0, le=3600)

    @property
    def down_after_s(self) -> float:
        return self.heartbeat_interval_s * self.missed_heartbeats


class PlacementSpec(_Schema):
    """How the mesh manages its placement (docs/placement.md).

    The root of the hierarchy runs a placement round every ``interval_s``
    from the load reported up the tree, and the nodes carry out what it
    decides (variants hosted, compute workers each). ``tuning`` overrides
    thresholds of :class:`mesh.placement.Tuning` by name (``hold_s``,
    ``scale_up_util``, ...); ``day_s`` is the length of the daily shape the
    arrival forecasts learn (compressed in benchmarks); ``managed: false``
    turns live rounds off (the base placement stays).
    """

    managed: bool = True
    interval_s: float = Field(5.0, gt=0, le=3600)
    day_s: float = Field(86_400.0, gt=0)
    tuning: dict[str, float] = {}

    @field_validator("tuning")
    @classmethod
    def _known_tunables(cls, value: dict[str, float]) -> dict[str, float]:
        from mesh.placement.tuning import Tuning  # the one definition of the tunables

        try:
            Tuning(**value)
        except TypeError as exc:
            known = ", ".join(sorted(Tuning.__dataclass_fields__))
            raise ValueError(f"unknown tunable ({exc}); known: {known}") from None
        return value


class Operators(_Schema):
    """Who may read status and metrics and run admin commands on a mesh with tenants."""

    keys: tuple[str, ...] = ()

    _check_keys = field_validator("keys")(_key_hashes)


class TopologyFile(_Schema):
    name: str = Field(min_length=1)
    tiers: dict[Tier, TierSpec] = {}
    hardware: dict[str, HardwareClass] = Field(min_length=1)
    nodes: list[Node] = []
    groups: list[Group] = []
    links: list[Link] = []
    tenants: list[Tenant] = []
    membership: MembershipSpec = MembershipSpec()
    placement: PlacementSpec = PlacementSpec()
    operators: Operators = Operators()
    #: What a kWh costs (USD); turns energy per inference into money for ``cheapest``.
    energy_cost_per_kwh: float = Field(0.15, ge=0)
