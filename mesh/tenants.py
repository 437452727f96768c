"""Tenants: who is calling, what they may see, how much they may ask. Pure, time passed in.

A tenant is declared in the topology's ``tenants`` section (its nodes and tasks,
as the planner has long used them) with, for applications to authenticate:

* ``keys``: its API keys, stored hashed (``sha256:<hex>``; ``mesh tenants
  new-key`` makes one and prints the line to paste). A client sends the key
  itself as ``Authorization: Bearer <key>``; only its hash is ever compared.
* ``quota``: ``rps`` (a token bucket of ``burst`` tokens, refilled at ``rps``
  a second) and ``concurrent`` (queries in progress at once), enforced at the
  entry node: 429 with ``Retry-After`` beyond them.
* ``private``: task globs only this tenant can see or call. To every other
  caller a private task does not exist: 404, the very answer a task that
  does not exist gets. The tasks of a tenant's private heads
  (``mesh models add --base ... --tenant T``) are private to it as well: the
  registry names their owner.

``operators`` (top level) lists the keys that may read status and metrics and
run admin commands. A mesh that declares no key at all is open, as before.

:class:`Tenancy` answers for one topology; the agent asks it once per query
(a dict lookup of the key's hash, a bucket update).
"""

from __future__ import annotations

import fnmatch
import hashlib
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import Forbidden, InvalidInput, Overloaded, Unauthorized

__all__ = ["KEY_PREFIX", "hash_key", "new_key", "TokenBucket", "TenantRules", "Tenancy",
           "Usage", "Identity", "ReplayGuard"]

#: what every key this mesh issues starts with (so a key pasted in the wrong place is seen)
KEY_PREFIX = "tm_"
_HASH = "sha256:"


def hash_key(key: str) -> str:
    """The stored form of an API key: ``sha256:<hex>``."""
    return _HASH + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A new random API key and its stored hash."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` held; time comes in as ``now``."""

    rate: float
    burst: float
    _tokens: float = -1.0
    _at: float = 0.0

    def take(self, now: float) -> float:
        """Take one token: 0.0 when it was there, else the seconds until one will be."""
        if self._tokens < 0:  # first use: a full bucket
            self._tokens, self._at = self.burst, now
        elapsed = max(now - self._at, 0.0)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate if self.rate > 0 else float("inf")


@dataclass(frozen=True, slots=True)
class TenantRules:
    """One tenant's keys (hashed), quota and private tasks."""

    name: str
    key_hashes: frozenset[str] = frozenset()
    rps: float | None = None
    burst: float | None = None
    concurrent: int | None = None
    private: tuple[str, ...] = ()

    def owns(self, task: str) -> bool:
        return any(fnmatch.fnmatchcase(task, p) for p in self.private)


@dataclass
class Usage:
    """What one tenant used on one node."""

    queries: int = 0
    refused: int = 0
    compute_s: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    cost: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"queries": self.queries, "refused": self.refused,
                "compute_s": round(self.compute_s, 6), "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "cost": round(self.cost, 9)}


@dataclass
class Tenancy:
    """Every tenant of a mesh, and what the entry node checks per query."""

    tenants: Mapping[str, TenantRules] = field(default_factory=dict)
    operator_hashes: frozenset[str] = frozenset()
    revoked: frozenset[str] = frozenset()
    #: task -> the tenant that owns it (its private heads, as the registry says)
    owners: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_hash: dict[str, str] = {}
        for rules in self.tenants.values():
            for h in rules.key_hashes:
                self._by_hash[h] = rules.name
        self._buckets: dict[str, TokenBucket] = {}
        self._running: dict[str, int] = {}
        #: task -> the tenants it is private to (none: public), as :meth:`visible` found it
        self._claimants: dict[str, frozenset[str]] = {}
        self.usage: dict[str, Usage] = {}
        #: whether any tenant has private tasks (else every task is public): read per query
        self.private = bool(self.owners) or any(rules.private for rules in self.tenants.values())

    @classmethod
    def of(cls, topology: Any, *, keys: Mapping[str, str] | None = None,
           revoked: Iterable[str] = (), owners: Mapping[str, str] | None = None) -> Tenancy:
        """From a :class:`~mesh.topology.Topology`'s tenants and operators, plus ``keys``
        (hash -> tenant) added on the running mesh and the hashes ``revoked`` there (the
        registry's: :attr:`mesh.registry.Registry.keys`). A key for a tenant the topology
        does not declare is ignored. ``owners``: task -> tenant for the tenants' private
        heads (:meth:`mesh.registry.Registry.owners`)."""
        added: dict[str, set[str]] = {}
        for key_hash, tenant in (keys or {}).items():
            added.setdefault(tenant, set()).add(key_hash)
        rules = {}
        for t in topology.tenants.values():
            quota = t.quota
            rules[t.name] = TenantRules(
                t.name, frozenset(t.keys) | frozenset(added.get(t.name, ())),
                quota.rps if quota is not None else None,
                quota.burst if quota is not None else None,
                quota.concurrent if quota is not None else None,
                tuple(t.private))
        return cls(rules, frozenset(topology.operator_keys), frozenset(revoked),
                   dict(owners or {}))

    def carry_over(self, before: Tenancy) -> Tenancy:
        """This tenancy, keeping what ``before`` counted (usage, quota buckets, queries in
        progress): for a registry that added or revoked keys on a running node."""
        self.usage, self._buckets, self._running = before.usage, before._buckets, before._running
        return self

    # ------------------------------------------------------------------ who

    @property
    def enabled(self) -> bool:
        """Whether callers must present a key (some tenant or operator has one)."""
        return bool(self._by_hash) or bool(self.operator_hashes)

    def authenticate(self, authorization: str | None) -> str | None:
        """The tenant an ``Authorization`` header names; None on an open mesh (no keys).
        Raises :class:`Unauthorized` for a missing, unknown or revoked key."""
        if not self.enabled:
            return None
        hashed = _hashed_bearer(authorization)
        if hashed is None:
            raise Unauthorized("Authorization: send 'Bearer <API key>' (this mesh has tenants)")
        tenant = self._by_hash.get(hashed)
        if tenant is None or hashed in self.revoked:
            raise Unauthorized("Authorization: this API key is not valid here (unknown or "
                               "revoked)")
        return tenant

    def is_operator(self, authorization: str | None) -> bool:
        """Whether ``authorization`` carries an operator key (always True on an open mesh)."""
        if not self.enabled:
            return True
        hashed = _hashed_bearer(authorization)
        return hashed is not None and hashed in self.operator_hashes \
            and hashed not in self.revoked

    # ------------------------------------------------------------------ what
    def visible(self, tenant: str | None, task: str) -> bool:
        """Whether ``tenant`` (None: an open mesh's caller) may see and call ``task``."""
        claimants = self._claimants.get(task)
        if claimants is None:
            claimants = self._claim(task)
        return not claimants or claimants == {tenant}

    def _claim(self, task: str) -> frozenset[str]:
        """The tenants ``task`` is private to (its head's owner, or the tenants whose
        ``private`` globs match it), worked out once per task (read on every query)."""
        owner = self.owners.get(task)
        found = frozenset({owner}) if owner is not None else frozenset(
            rules.name for rules in self.tenants.values() if rules.private and rules.owns(task))
        if len(self._claimants) < 100_000:  # tasks asked about are registered ones: bounded
            self._claimants[task] = found
        return found

    def visible_tasks(self, tenant: str | None, tasks: Iterable[str]) -> list[str]:
        return [t for t in tasks if self.visible(tenant, t)]

    # ------------------------------------------------------------------ how much
    def admit(self, tenant: str | None, now: float) -> None:
        """Count one query in; raises :class:`Overloaded` (429, ``Retry-After``) beyond its
        quota. Pair every admitted query with :meth:`done`."""
        if tenant is None:
            return
        rules = self.tenants.get(tenant)
        usage = self.usage.setdefault(tenant, Usage())
        if rules is None:
            usage.queries += 1
            self._running[tenant] = self._running.get(tenant, 0) + 1
            return
        running = self._running.get(tenant, 0)
        if rules.concurrent is not None and running >= rules.concurrent:
            usage.refused += 1
            raise Overloaded(f"quota: {running} of your queries are in progress, your limit is "
                             f"{rules.concurrent}; retry shortly", retry_after_s=0.05)
        if rules.rps is not None:
            bucket = self._buckets.get(tenant)
            if bucket is None:
                bucket = self._buckets[tenant] = TokenBucket(
                    rules.rps, rules.burst if rules.burst is not None else max(rules.rps, 1.0))
            wait = bucket.take(now)
            if wait > 0:
                usage.refused += 1
                raise Overloaded(f"quota: over your {rules.rps:g} queries a second; retry "
                                 f"after {wait:.2f} s", retry_after_s=max(wait, 0.001))
        usage.queries += 1
        self._running[tenant] = running + 1

    def done(self, tenant: str | None) -> None:
        if tenant is not None:
            self._running[tenant] = max(self._running.get(tenant, 1) - 1, 0)

    def account(self, tenant: str | None, *, compute_s: float = 0.0, bytes_in: int = 0,
                bytes_out: int = 0, cost: float = 0.0) -> None:
        """Add to ``tenant``'s usage on this node."""
        if tenant is None:
            return
        usage = self.usage.setdefault(tenant, Usage())
        usage.compute_s += compute_s
        usage.bytes_in += bytes_in
        usage.bytes_out += bytes_out
        usage.cost += cost


def _hashed_bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 512:
        return None
    return hash_key(token)


# --------------------------------------------------------------------------- identity on the wire


@dataclass(frozen=True, slots=True)
class Identity:
    """The tenant an entry node established, as it travels with a forwarded query: signed
    by the forwarding node (HMAC under the mesh key, :meth:`mesh.peers.PeerKey.sign`) over
    the tenant, the request id, an expiry and a nonce of its own, so that a node further
    along trusts it without ever seeing the tenant's key, and refuses it replayed."""

    tenant: str
    expires: float
    nonce: str
    signature: str

    #: how long a signed identity is good for (a hop never takes longer)
    TTL_S = 30.0

    @staticmethod
    def message(tenant: str, request_id: str, expires: float, nonce: str) -> bytes:
        return f"{tenant}|{request_id}|{expires:.3f}|{nonce}".encode()

    @classmethod
    def sign(cls, key: Any, tenant: str, request_id: str, now: float) -> Identity:
        """``key``: a :class:`~mesh.peers.PeerKey`; ``now``: wall-clock seconds."""
        expires = round(now + cls.TTL_S, 3)
        nonce = secrets.token_hex(8)
        return cls(tenant, expires, nonce,
                   key.sign(cls.message(tenant, request_id, expires, nonce)))

    def to_wire(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "exp": self.expires, "nonce": self.nonce,
                "sig": self.signature}

    @classmethod
    def from_wire(cls, obj: Any) -> Identity:
        """Raises :class:`InvalidInput` naming what is malformed."""
        if not isinstance(obj, dict):
            raise InvalidInput("identity: must be a map with tenant, exp, nonce and sig")
        tenant, exp, nonce, sig = obj.get("tenant"), obj.get("exp"), obj.get("nonce"), \
            obj.get("sig")
        if not isinstance(tenant, str) or not 0 < len(tenant) <= 63 \
                or isinstance(exp, bool) or not isinstance(exp, int | float) \
                or not isinstance(nonce, str) or not 0 < len(nonce) <= 64 \
                or not isinstance(sig, str) or len(sig) > 128:
            raise InvalidInput("identity: tenant, exp (seconds), nonce and sig (set by mesh "
                               "nodes only)")
        return cls(tenant, float(exp), nonce, sig)

    def check(self, key: Any, request_id: str, now: float, guard: ReplayGuard) -> None:
        """Raise :class:`Forbidden` unless this identity is signed by the mesh (``key``;
        None where certificates already vouch for the hop), unexpired and seen here for
        the first time."""
        if key is not None and not key.signed(
                self.message(self.tenant, request_id, self.expires, self.nonce), self.signature):
            raise Forbidden("identity: not signed by a node of this mesh")
        if now > self.expires:
            raise Forbidden("identity: expired; the entry node signs a query's tenant for "
                            f"{self.TTL_S:g} s")
        guard.first_use(self.nonce, self.expires, now)


class ReplayGuard:
    """The nonces of the signed identities a node has seen, until they expire: a query
    replayed with a signed identity already used here is refused."""

    def __init__(self, *, max_entries: int = 200_000) -> None:
        self._seen: dict[str, float] = {}
        self.max_entries = max_entries
        self.refused = 0

    def first_use(self, nonce: str, expires: float, now: float) -> None:
        if nonce in self._seen:
            self.refused += 1
            raise Forbidden("identity: replayed (this signed identity was used here already)")
        if len(self._seen) >= self.max_entries:
            self._seen = {n: e for n, e in self._seen.items() if e >= now}
            if len(self._seen) >= self.max_entries:  # still full of live ones: refuse, safely
                raise Overloaded("identity: too many queries in flight to check for replays",
                                 retry_after_s=1.0)
        self._seen[nonce] = expires

