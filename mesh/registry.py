"""The variant registry: tasks -> variants, each with accuracy and profiles.

Every number in an entry was measured: accuracy on the family's held-out
split, latency per hardware class at several batch sizes. The registry is a
JSON file beside the artifact store (``<home>/registry.json``), written
atomically and durably (:mod:`mesh.durable`), so it survives crashes and
concurrent readers. :meth:`Registry.save` holds a lock on
``<home>/registry.lock`` while it re-reads the file and applies this
registry's own changes to it, so several processes registering variants at
once never lose each other's updates.

Variants the factory generated but refused (a conversion that failed, or one
that disagreed with the original) are kept apart in :attr:`Registry.rejected`
with the reason, so nothing ever routes to them but ``mesh variants list``
can still say why they are missing. Fields added after schema 1 all have
defaults, so older registry files load unchanged.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from mesh.durable import locked, remove_stale_temps, write_atomic
from mesh.errors import UnknownTask

__all__ = ["TensorSpec", "LatencyFit", "Profile", "compose_profile", "Variant", "Rejection",
           "Registry"]

REGISTRY_FILE = "registry.json"
LOCK_FILE = "registry.lock"
SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output. ``-1`` in ``shape`` is the batch (or any) dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TensorSpec:
        return cls(obj["name"], obj["dtype"], tuple(obj["shape"]))


@dataclass(frozen=True, slots=True)
class LatencyFit:
    """``latency(batch) = intercept_ms + per_row_ms * batch``, least squares over the measurements.

    ``max_error_frac`` is the worst relative gap between the line and a
    measured point: how far the linear model can be trusted.
    """

    intercept_ms: float
    per_row_ms: float
    max_error_frac: float

    def latency_ms(self, batch: int) -> float:
        return max(self.intercept_ms + self.per_row_ms * batch, 0.0)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LatencyFit:
        return cls(float(obj["intercept_ms"]), float(obj["per_row_ms"]),
                   float(obj["max_error_frac"]))


@dataclass(frozen=True, slots=True)
class Profile:
    """Latency of one variant on one hardware class, measured at several batch sizes.

    ``peak_memory_bytes`` is the resident memory a fresh process gains by
    loading the variant and running its largest batch (0: not measured);
    ``fit`` is the linear latency model checked against ``batch_ms``.
    """

    batch_ms: dict[int, float]
    cold_start_ms: float = 0.0
    peak_memory_bytes: int = 0
    fit: LatencyFit | None = None

    def latency_ms(self, batch: int) -> float:
        """Latency for ``batch`` items: measured points, linear in between and beyond."""
        exact = self.batch_ms.get(batch)
        if exact is not None:  # the usual case, and the hot path: no sorting
            return exact
        sizes = sorted(self.batch_ms)
        if len(sizes) == 1:
            return self.batch_ms[sizes[0]] * max(batch, 1) / sizes[0]
        i = bisect.bisect_left(sizes, batch)
        lo, hi = (sizes[0], sizes[1]) if i == 0 else (
            (sizes[-2], sizes[-1]) if i >= len(sizes) else (sizes[i - 1], sizes[i]))
        slope = (self.batch_ms[hi] - self.batch_ms[lo]) / (hi - lo)
        return max(self.batch_ms[lo] + slope * (batch - lo), 0.0)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "batch_ms": {str(k): v for k, v in sorted(self.batch_ms.items())},
            "cold_start_ms": self.cold_start_ms}
        if self.peak_memory_bytes:
            out["peak_memory_bytes"] = self.peak_memory_bytes
        if self.fit is not None:
            out["fit"] = asdict(self.fit)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Profile:
        fit = obj.get("fit")
        return cls({int(k): float(v) for k, v in obj["batch_ms"].items()},
                   float(obj.get("cold_start_ms", 0.0)),
                   int(obj.get("peak_memory_bytes", 0)),
                   LatencyFit.from_json(fit) if fit else None)


def compose_profile(base: Profile, head: Profile) -> Profile:
    """What a query on a base and a private head pays: their latencies added at the base's
    batch sizes, and the memory of both (what placement must find on a node that has
    neither loaded)."""
    batch_ms = {b: ms + head.latency_ms(b) for b, ms in base.batch_ms.items()}
    return Profile(batch_ms=batch_ms, cold_start_ms=base.cold_start_ms + head.cold_start_ms,
                   peak_memory_bytes=base.peak_memory_bytes + head.peak_memory_bytes)


@dataclass(frozen=True, slots=True)
class Variant:
    """One runnable artifact of a model family.

    Set by the variant factory (all optional): ``parent`` names the variant it
    was converted from ("" for an original), ``quantization`` says how an
    int8 variant was made ("static" or "dynamic"), ``device`` is where it
    runs ("cpu" or "cuda"), ``agreement`` holds its measured agreement with
    the original on the validation set, and ``assets`` maps the name of a
    file a client needs (a tokenizer) to its sha256 in the artifact store.
    A private head (``base`` set) has the head's artifact as ``sha256`` and
    runs on the features of the named base variant, loaded once per node for
    every head that shares it.
    """

    name: str
    task: str
    family: str
    arch: str
    format: str
    precision: str
    sha256: str
    size_bytes: int
    accuracy: float
    accuracy_metric: str
    macs: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int = 32
    profiles: dict[str, Profile] = field(default_factory=dict)
    build_key: str = ""
    parent: str = ""
    quantization: str = ""
    device: str = "cpu"
    agreement: dict[str, float] = field(default_factory=dict)
    assets: dict[str, str] = field(default_factory=dict)
    #: a private head on a shared base (mesh.variants.heads): the base variant whose output
    #: feeds this head's artifact ("" for a whole model); ``inputs`` are the base's
    base: str = ""
    #: the tenant that owns this variant: its task is private to that tenant ("" public)
    tenant: str = ""
    #: the head alone (``base`` set): latency at the factory's hardware class and the
    #: memory it adds to a loaded base; ``profiles`` hold base + head, what a query pays
    head_profile: Profile | None = None

    def profile_for(self, profile_key: str) -> Profile | None:
        """The profile for a hardware class; falls back on one of the same kind."""
        if profile_key in self.profiles:
            return self.profiles[profile_key]
        kind = profile_key.split("-", 1)[0]
        same_kind = sorted(k for k in self.profiles if k.startswith(kind + "-"))
        return self.profiles[same_kind[0]] if same_kind else None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["inputs"] = [asdict(t) | {"shape": list(t.shape)} for t in self.inputs]
        out["outputs"] = [asdict(t) | {"shape": list(t.shape)} for t in self.outputs]
        out["profiles"] = {k: p.to_json() for k, p in sorted(self.profiles.items())}
        for name in ("base", "tenant"):
            if not out[name]:
                del out[name]  # whole public models: their entries stay as they were
        if self.head_profile is None:
            del out["head_profile"]
        else:
            out["head_profile"] = self.head_profile.to_json()
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Variant:
        data = dict(obj)
        data["inputs"] = tuple(TensorSpec.from_json(t) for t in obj["inputs"])
        data["outputs"] = tuple(TensorSpec.from_json(t) for t in obj["outputs"])
        data["profiles"] = {k: Profile.from_json(p) for k, p in obj.get("profiles", {}).items()}
        head = obj.get("head_profile")
        data["head_profile"] = Profile.from_json(head) if head else None
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A variant the factory generated and refused, and why. Never routed to."""

    name: str
    task: str
    family: str
    format: str
    precision: str
    stage: str  # "convert" (conversion failed) or "agreement" (disagreed with the original)
    reason: str
    agreement: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Rejection:
        return cls(**obj)


class Registry:
    """Variants by name, persisted as JSON. Not thread-safe within a process.

    Across processes, :meth:`save` merges: it writes this registry's own
    changes (:meth:`add`, :meth:`reject`, :meth:`remove_family`, and whatever
    the constructor was given) onto the file as it is when saving, so that
    changes other processes saved since this one was loaded are kept. The
    last change to one variant name wins.

    Every save that changes something raises :attr:`version` by one. A node
    reports the version it serves; a child whose parent holds a newer one pulls
    the parent's :meth:`to_document` and :meth:`adopt` s it, so the core's
    registry (the mesh's) reaches every node.
    """

    def __init__(self, variants: dict[str, Variant] | None = None,
                 rejected: dict[str, Rejection] | None = None) -> None:
        self.variants: dict[str, Variant] = {}
        self.rejected: dict[str, Rejection] = {}
        #: tenants' API keys added on a running mesh: hash (``sha256:...``) -> tenant; and the
        #: hashes revoked (they win over the topology's keys too). Copied down the tree with
        #: the variants, so every entry node knows them (mesh.tenants)
        self.keys: dict[str, str] = {}
        self.revoked: set[str] = set()
        #: raised by one by every save that changes the file (0: never saved)
        self.version = 0
        #: changes not saved yet, in order: ("add", Variant) / ("reject", Rejection) /
        #: ("remove_family", family)
        self._changes: list[tuple[str, Any]] = []
        for variant in (variants or {}).values():
            self.add(variant)
        for rejection in (rejected or {}).values():
            self.reject(rejection)

    # ---------------------------------------------------------------- queries
    def tasks(self) -> list[str]:
        return sorted({v.task for v in self.variants.values()})

    def owners(self) -> dict[str, str]:
        """Task -> the tenant that owns it, for the tasks of tenants' private variants."""
        return {v.task: v.tenant for v in self.variants.values() if v.tenant}

    def for_task(self, task: str) -> list[Variant]:
        found = [v for v in self.variants.values() if v.task == task]
        if not found:
            known = ", ".join(self.tasks()) or "none"
            raise UnknownTask(f"task {task!r} is not registered (known tasks: {known})")
        return sorted(found, key=lambda v: v.name)

    def get(self, name: str) -> Variant:
        try:
            return self.variants[name]
        except KeyError:
            raise KeyError(f"variant {name!r} is not registered") from None

    # ---------------------------------------------------------------- changes
    def add(self, variant: Variant) -> None:
        self._apply("add", variant)
        self._changes.append(("add", variant))

    def reject(self, rejection: Rejection) -> None:
        """Record a refused variant; it replaces an accepted one of the same name."""
        self._apply("reject", rejection)
        self._changes.append(("reject", rejection))

    def remove_family(self, family: str) -> list[str]:
        """Drop every accepted and rejected variant of ``family``; return the names dropped."""
        gone = self._apply("remove_family", family)
        self._changes.append(("remove_family", family))
        return gone

    def remove_model(self, family: str) -> list[str]:
        """Remove model ``family`` (:meth:`remove_family`), refusing with ``ValueError``
        one that is not registered or that tenants' private heads still sit on."""
        if not any(v.family == family for v in (*self.variants.values(),
                                                 *self.rejected.values())):
            families = sorted({v.family for v in self.variants.values()})
            raise ValueError(f"model {family!r} is not registered (models: "
                             f"{', '.join(families) or 'none'})")
        mine = {n for n, v in self.variants.items() if v.family == family}
        heads = sorted({v.family for v in self.variants.values()
                        if v.base in mine and v.family != family})
        if heads:
            raise ValueError(f"model {family!r} is the base of private heads ("
                             f"{', '.join(heads)}): remove them first")
        return self.remove_family(family)

    def add_key(self, key_hash: str, tenant: str) -> None:
        """An API key (its hash) for ``tenant``; a revoked hash stays revoked."""
        self._apply("add_key", (key_hash, tenant))
        self._changes.append(("add_key", (key_hash, tenant)))

    def revoke_key(self, key_hash: str) -> None:
        """Revoke an API key (its hash), wherever it was declared."""
        self._apply("revoke_key", key_hash)
        self._changes.append(("revoke_key", key_hash))

    def with_accuracy(self, accuracy: Mapping[str, float]) -> Registry:
        """This registry with the accuracies in ``accuracy`` (variant name -> top-1) in
        place of the measured ones, at the same version: what a node plans with once
        feedback has measured live accuracy. For planning only; it has no changes to save."""
        planned = Registry()
        planned.variants = {n: replace(v, accuracy=accuracy.get(n, v.accuracy))
                            for n, v in self.variants.items()}
        planned.rejected = dict(self.rejected)
        planned.keys, planned.revoked = dict(self.keys), set(self.revoked)
        planned.version = self.version
        return planned

    def _apply(self, kind: str, arg: Any) -> list[str]:
        if kind == "add_key":
            self.keys[arg[0]] = arg[1]
            return []
        if kind == "revoke_key":
            self.revoked.add(arg)
            return []
        if kind == "add":
            self.variants[arg.name] = arg
            self.rejected.pop(arg.name, None)
            return []
        if kind == "reject":
            self.variants.pop(arg.name, None)
            self.rejected[arg.name] = arg
            return []
        gone = sorted(n for n, v in self.variants.items() if v.family == arg)
        gone += sorted(n for n, r in self.rejected.items() if r.family == arg)
        for name in gone:
            self.variants.pop(name, None)
            self.rejected.pop(name, None)
        return gone

    # ---------------------------------------------------------------- persistence
    @classmethod
    def load(cls, home: str | Path) -> Registry:
        """The registry saved in ``home`` (empty when there is none).

        Raises ``ValueError`` (not JSON) or ``KeyError`` / ``TypeError`` (a field
        missing or of the wrong kind) when the file was damaged by hand.
        """
        registry = cls()
        registry._take(_read(Path(home) / REGISTRY_FILE))
        return registry

    def _take(self, doc: _Doc) -> None:
        self.variants, self.rejected, self.version = doc.variants, doc.rejected, doc.version
        self.keys, self.revoked = doc.keys, doc.revoked

    def save(self, home: str | Path) -> Path:
        """Apply this registry's changes to the file in ``home`` under its lock; return its path.

        Afterwards this registry holds what the file holds (its changes plus
        everyone else's). Raises ``OSError`` when ``home`` is not writable.
        """
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        path = home / REGISTRY_FILE
        with locked(home / LOCK_FILE):
            # Under the lock nobody else writes the registry: leftovers are from dead writers.
            remove_stale_temps(home)
            current = Registry()
            current._take(_read(path))
            for kind, arg in self._changes:
                current._apply(kind, arg)
            if self._changes or not path.exists():
                current.version += 1
                write_atomic(path, json.dumps(current.to_document(), indent=2))
        self.variants, self.rejected, self.version = (current.variants, current.rejected,
                                                      current.version)
        self.keys, self.revoked = current.keys, current.revoked
        self._changes.clear()
        return path

    def to_document(self) -> dict[str, Any]:
        """The registry as its file holds it (what a parent sends a child)."""
        doc = {"schema": SCHEMA_VERSION, "version": self.version,
               "variants": {n: v.to_json() for n, v in sorted(self.variants.items())},
               "rejected": {n: r.to_json() for n, r in sorted(self.rejected.items())}}
        if self.keys or self.revoked:
            doc["keys"] = dict(sorted(self.keys.items()))
            doc["revoked"] = sorted(self.revoked)
        return doc

    @classmethod
    def from_document(cls, doc: Any) -> Registry:
        """A registry from :meth:`to_document`'s form; raises ``ValueError`` naming the fault."""
        if not isinstance(doc, dict) or not isinstance(doc.get("variants"), dict):
            raise ValueError("registry: not a registry document (no variants map)")
        version = doc.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"registry.version: must be a non-negative integer, got {version!r}")
        registry = cls()
        try:
            registry.variants = {n: Variant.from_json(v) for n, v in doc["variants"].items()}
            registry.rejected = {n: Rejection.from_json(r)
                                 for n, r in (doc.get("rejected") or {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"registry: a variant entry is malformed ({exc})") from None
        registry.keys, registry.revoked = _keys(doc)
        registry.version = version
        return registry

    def adopt(self, home: str | Path) -> bool:
        """Make this registry (a parent's, with its version) the one in ``home``, unless the
        file there is already as new. Atomic and durable; True when it was written."""
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        path = home / REGISTRY_FILE
        with locked(home / LOCK_FILE):
            remove_stale_temps(home)
            held = _read(path).version
            if path.exists() and held >= self.version:
                return False
            write_atomic(path, json.dumps(self.to_document(), indent=2))
        self._changes.clear()
        return True


class _Doc(NamedTuple):
    variants: dict[str, Variant]
    rejected: dict[str, Rejection]
    version: int
    keys: dict[str, str]
    revoked: set[str]


def _keys(data: Mapping[str, Any]) -> tuple[dict[str, str], set[str]]:
    """The tenants' keys and revocations in a registry document; ``ValueError`` if malformed."""
    keys, revoked = data.get("keys") or {}, data.get("revoked") or []
    if not isinstance(keys, dict) or not all(
            isinstance(h, str) and isinstance(t, str) for h, t in keys.items()) \
            or not isinstance(revoked, list) or not all(isinstance(h, str) for h in revoked):
        raise ValueError("registry: keys must map key hashes to tenants, revoked list hashes")
    return dict(keys), set(revoked)


def _read(path: Path) -> _Doc:
    if not path.exists():
        return _Doc({}, {}, 0, {}, set())
    data = json.loads(path.read_text())
    return _Doc({name: Variant.from_json(v) for name, v in data.get("variants", {}).items()},
                {name: Rejection.from_json(r) for name, r in data.get("rejected", {}).items()},
                # a file from before versions, with variants in it, is the first version
                int(data.get("version", 1 if data.get("variants") else 0)), *_keys(data))
