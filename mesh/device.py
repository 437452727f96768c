"""The device keeps working: a tiny variant of a task, held and run in the client's process.

``Client(urls, on_device=["digits"])`` (or ``on_device=True``: every task it
queries) asks an entry node for the task's device variant while the mesh is
reachable, downloads it, checks that it hashes to the sha256 the mesh named
(a copy that does not is refused with :class:`DeviceVariantRefused`), keeps it
in a cache directory and loads it with :mod:`mesh.runtimes` (onnxruntime, or
LiteRT for ``tflite``). When no entry node answers a query within its budget,
the client answers it here and says so: ``served_by`` is node ``"device"``,
tier ``"device"`` and the variant's name.

Which variant (:func:`choose`, the same rule on the node that describes it,
:mod:`nodes.device`): among the task's variants in a format this process can
run (``onnx``, ``tflite``), for a CPU, of at most ``max_bytes`` (64 MiB), the
most accurate, then the smallest: for digits the int8 TFLite CNN when LiteRT
is installed, else the int8 ONNX one.

Nodes serve it over HTTP::

    GET /v1/device/{task}?formats=onnx,tflite&max_bytes=N   its description (JSON)
    GET /v1/device/{task}/artifacts/{sha256}                its file

The cache (default ``~/.cache/tiermesh/device``, or ``$XDG_CACHE_HOME``) holds
each task's description and its artifacts by sha256 (:class:`~mesh.store.ArtifactStore`),
so a process started while the mesh is unreachable still holds what an earlier
one fetched; every copy is hashed again before it is loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import ssl as _ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import numpy as np

from mesh.durable import write_atomic
from mesh.errors import (
    ClientError,
    InputRejected,
    InvalidInput,
    MeshConnectionError,
    MeshError,
    error_from_payload,
)
from mesh.registry import TensorSpec, Variant
from mesh.store import ArtifactStore

__all__ = ["DEVICE_FORMATS", "MAX_DEVICE_BYTES", "DeviceVariant", "DeviceVariantRefused",
           "OnDevice", "choose", "eligible", "default_cache_dir", "runnable_formats"]

log = logging.getLogger("tiermesh.device")

#: Formats a client process can run, and the module each needs.
DEVICE_FORMATS: dict[str, str] = {"onnx": "onnxruntime", "tflite": "ai_edge_litert"}
#: The largest variant a device is given.
MAX_DEVICE_BYTES = 64 << 20
#: How long after a failed fetch the client waits before asking the mesh again.
REFETCH_AFTER_S = 30.0


class DeviceVariantRefused(ClientError):
    """A device variant's download did not hash to the sha256 the mesh named; nothing is kept."""


def eligible(variant: Variant, *, formats: Iterable[str] = DEVICE_FORMATS,
             max_bytes: int = MAX_DEVICE_BYTES) -> bool:
    """Whether a device may be given ``variant``: a whole model (a private head's artifact
    is only the head: it needs its base), in a format it runs, for a CPU, small enough."""
    return (not variant.base and variant.format in formats and variant.device == "cpu"
            and variant.size_bytes <= min(max_bytes, MAX_DEVICE_BYTES))


def choose(variants: Iterable[Variant], *, formats: Iterable[str] = DEVICE_FORMATS,
           max_bytes: int = MAX_DEVICE_BYTES) -> Variant | None:
    """The device variant among ``variants``: eligible, the most accurate, then the smallest."""
    formats = tuple(formats)
    found = [v for v in variants if eligible(v, formats=formats, max_bytes=max_bytes)]
    return min(found, key=lambda v: (-v.accuracy, v.size_bytes, v.name), default=None)


def runnable_formats() -> tuple[str, ...]:
    """The device formats whose runtime this process has installed."""
    return tuple(f for f, module in DEVICE_FORMATS.items() if importlib.util.find_spec(module))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tiermesh" / "device"


@dataclass(frozen=True, slots=True)
class DeviceVariant:
    """What a node says about a task's device variant (``GET /v1/device/{task}``)."""

    task: str
    name: str
    format: str
    precision: str
    sha256: str
    size_bytes: int
    #: Measured held-out accuracy, as in the registry.
    accuracy: float
    accuracy_metric: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, variant: Variant) -> DeviceVariant:
        return cls(variant.task, variant.name, variant.format, variant.precision, variant.sha256,
                   variant.size_bytes, variant.accuracy, variant.accuracy_metric,
                   variant.inputs, variant.outputs)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "name": self.name, "format": self.format,
                "precision": self.precision, "sha256": self.sha256,
                "size_bytes": self.size_bytes, "accuracy": self.accuracy,
                "accuracy_metric": self.accuracy_metric,
                "inputs": [_spec(t) for t in self.inputs], "outputs": [_spec(t) for t in self.outputs],
                "artifact": f"/v1/device/{quote(self.task, safe='')}/artifacts/{self.sha256}"}

    @classmethod
    def from_json(cls, obj: Any) -> DeviceVariant:
        """Raises :class:`ClientError` for a description that is not one."""
        try:
            sha256 = str(obj["sha256"])
            if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
                raise ValueError("sha256")
            return cls(str(obj["task"]), str(obj["name"]), str(obj["format"]),
                       str(obj["precision"]), sha256, int(obj["size_bytes"]),
                       float(obj["accuracy"]), str(obj["accuracy_metric"]),
                       tuple(TensorSpec.from_json(t) for t in obj["inputs"]),
                       tuple(TensorSpec.from_json(t) for t in obj["outputs"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ClientError(f"not a device variant description ({exc})") from None


def _spec(tensor: TensorSpec) -> dict[str, Any]:
    return {"name": tensor.name, "dtype": tensor.dtype, "shape": list(tensor.shape)}


class _Held:
    """A loaded device variant; runs one batch at a time (LiteRT sessions are not shareable)."""

    def __init__(self, variant: DeviceVariant, path: Path, threads: int) -> None:
        from mesh.runtimes import runtime_for

        self.variant = variant
        self.runtime = runtime_for(variant.format)
        self.session = self.runtime.load(str(path), threads=threads)
        self._lock = threading.Lock()
        # two warm-up batches (1 and 8 rows) price a run: the time kept for it in a budget
        one = self._timed(1)
        eight = self._timed(8)
        self.intercept_s = one
        self.per_row_s = max(eight - one, 0.0) / 7

    def _timed(self, rows: int) -> float:
        inputs = [np.zeros([rows if d < 0 else d for d in spec.shape], dtype=spec.dtype)
                  for spec in self.variant.inputs]
        started = time.perf_counter()
        self.run(inputs)
        return time.perf_counter() - started

    def predict_s(self, rows: int) -> float:
        return self.intercept_s + self.per_row_s * max(rows - 1, 0)

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            return self.runtime.run(self.session, inputs)


class OnDevice:
    """The device variants one client holds. ``tasks``: True for any task, or their names.

    :meth:`ensure` fetches (blocking I/O; the asyncio client runs it in a thread),
    :meth:`run` answers. Thread-safe.
    """

    #: Time kept for a device answer beyond its predicted run: scheduling, conversions.
    MARGIN_S = 0.002

    def __init__(self, tasks: bool | str | Sequence[str], *, cache_dir: str | Path | None = None,
                 formats: Sequence[str] | None = None, max_bytes: int = MAX_DEVICE_BYTES,
                 threads: int = 1, headers: Mapping[str, str] | None = None) -> None:
        """``headers``: sent with every fetch (the client's ``Authorization``)."""
        self.headers = dict(headers or {})
        if isinstance(tasks, str):
            tasks = [tasks]
        if not isinstance(tasks, bool) and (not tasks or not all(
                isinstance(t, str) and t for t in tasks)):
            raise ClientError("on_device: True (every task), or task names such as ['digits'], "
                              f"got {tasks!r}")
        self.tasks: frozenset[str] | None = None if tasks is True else frozenset(tasks)  # type: ignore[arg-type]
        self.formats = tuple(formats) if formats is not None else runnable_formats()
        unknown = [f for f in self.formats if f not in DEVICE_FORMATS]
        if unknown or not self.formats:
            raise ClientError(f"on_device: cannot run formats {unknown or 'none'}; a device runs "
                              f"{', '.join(DEVICE_FORMATS)} (pip install 'tiermesh[device]')")
        self.max_bytes = max_bytes
        self.threads = threads
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.store = ArtifactStore(self.cache_dir / "store")
        self._held: dict[str, _Held] = {}
        #: task -> (when the last fetch failed, why)
        self._failed: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def wants(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks

    def held(self, task: str) -> DeviceVariant | None:
        held = self._held.get(task)
        return held.variant if held is not None else None

    def why_not(self, task: str) -> str:
        """Why ``task`` has no device variant here, in words."""
        if not self.wants(task):
            return f"on_device does not include task {task!r}"
        failed = self._failed.get(task)
        return failed[1] if failed else f"the device variant of {task!r} was never fetched"

    def reserve_s(self, task: str, rows: int) -> float:
        """How long of a query's budget to keep for answering it here (0: nothing held)."""
        held = self._held.get(task)
        return 0.0 if held is None else 2 * held.predict_s(rows) + self.MARGIN_S

    # ---------------------------------------------------------------- fetching

    def ensure(self, task: str, entries: Sequence[str], *, ssl: _ssl.SSLContext | None,
               timeout_s: float, now: float | None = None, force: bool = False) -> None:
        """Hold ``task``'s device variant if it can be had: from the cache, else from the
        first entry that gives it. Never raises for an unreachable mesh (it records why; a
        later call tries again after :data:`REFETCH_AFTER_S`); ``force``: try now, and
        raise what stopped it."""
        if not self.wants(task) or task in self._held:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            if task in self._held:
                return
            failed = self._failed.get(task)
            if not force and failed is not None and now - failed[0] < REFETCH_AFTER_S:
                return
            try:
                held = self._obtain(task, entries, ssl=ssl, timeout_s=timeout_s)
            except MeshError as exc:
                self._failed[task] = (now, exc.message)
                if force or isinstance(exc, DeviceVariantRefused):
                    log.warning("device variant of %r: %s", task, exc.message)
                if force:
                    raise
                return
            self._held[task] = held
            self._failed.pop(task, None)

    def _obtain(self, task: str, entries: Sequence[str], *, ssl: _ssl.SSLContext | None,
                timeout_s: float) -> _Held:
        problems: list[str] = []
        for url in entries:
            base = _base(url, ssl)
            try:
                variant = self._describe(base, task, ssl=ssl, timeout_s=timeout_s)
                if not self.store.verify(variant.sha256):
                    self._download(base, variant, ssl=ssl, timeout_s=timeout_s)
            except DeviceVariantRefused:
                raise
            except MeshError as exc:
                if not exc.retryable and not isinstance(exc, ClientError) and exc.status != 404:
                    raise  # the mesh's own answer (the task is unknown, ...): the same everywhere
                problems.append(f"{url}: {exc.message}")
                continue
            write_atomic(self._description_path(task), json.dumps(variant.to_json()))
            return self._load(variant)
        cached = self._cached(task)
        if cached is not None:
            return cached
        raise ClientError(f"could not fetch the device variant of {task!r}: "
                          + ("; ".join(problems) or "no entry node to ask"))

    def _describe(self, base: str, task: str, *, ssl: _ssl.SSLContext | None,
                  timeout_s: float) -> DeviceVariant:
        query = urlencode({"formats": ",".join(self.formats), "max_bytes": self.max_bytes})
        with _get(f"{base}/v1/device/{quote(task, safe='')}?{query}", ssl, timeout_s,
                  self.headers) as resp:
            variant = DeviceVariant.from_json(json.loads(resp.read()))
        if variant.task != task or variant.format not in self.formats:
            raise ClientError(f"the device variant described for {task!r} is not one this "
                              f"client asked for ({variant.task!r}, {variant.format})")
        return variant

    def _download(self, base: str, variant: DeviceVariant, *, ssl: _ssl.SSLContext | None,
                  timeout_s: float) -> None:
        """Stream the artifact in, hashing it; keep it only if it hashes to its name."""
        digest, size = hashlib.sha256(), 0
        url = f"{base}/v1/device/{quote(variant.task, safe='')}/artifacts/{variant.sha256}"
        with self.store.pending(variant.sha256) as pending, \
                _get(url, ssl, timeout_s, self.headers) as resp:
            while chunk := resp.read(1 << 16):
                size += len(chunk)
                if size > min(self.max_bytes, MAX_DEVICE_BYTES):
                    raise DeviceVariantRefused(
                        f"device variant {variant.name} from {base}: over {size - 1} bytes, "
                        f"more than the {variant.size_bytes} described; refused")
                digest.update(chunk)
                pending.write(chunk)
            if digest.hexdigest() != variant.sha256:
                raise DeviceVariantRefused(
                    f"device variant {variant.name} from {base}: the {size} bytes received "
                    f"hash to {digest.hexdigest()[:12]}, not to {variant.sha256[:12]} as the "
                    "mesh said; refused (nothing was kept)")
            pending.commit()

    def _description_path(self, task: str) -> Path:
        return self.cache_dir / "tasks" / f"{quote(task, safe='')}.json"

    def _cached(self, task: str) -> _Held | None:
        """What an earlier fetch left in the cache, if it is intact."""
        try:
            variant = DeviceVariant.from_json(json.loads(self._description_path(task).read_text()))
        except (OSError, ValueError, ClientError):
            return None
        if variant.format not in self.formats or not self.store.verify(variant.sha256):
            return None
        return self._load(variant)

    def _load(self, variant: DeviceVariant) -> _Held:
        try:
            return _Held(variant, self.store.path(variant.sha256), self.threads)
        except MeshError:
            raise
        except Exception as exc:  # noqa: BLE001 - any runtime's failure to open the file
            raise ClientError(f"device variant {variant.name} could not be loaded: {exc}") from None

    # ---------------------------------------------------------------- answering

    def run(self, task: str, inputs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], DeviceVariant]:
        """Answer here. Raises :class:`InvalidInput` for inputs that do not fit the variant,
        :class:`InputRejected` when it fails on them."""
        held = self._held[task]
        specs = held.variant.inputs
        if len(inputs) != len(specs):
            raise InvalidInput(f"task {task!r} takes {len(specs)} input tensor(s), got {len(inputs)}")
        arrays = []
        for i, (x, spec) in enumerate(zip(inputs, specs, strict=True)):
            array = np.asarray(x)
            if array.ndim != len(spec.shape) or any(
                    d >= 0 and d != n for d, n in zip(spec.shape, array.shape, strict=True)):
                raise InvalidInput(f"tensors[{i}]: shape {list(array.shape)} does not fit "
                                   f"{spec.name} {list(spec.shape)}")
            if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
                raise InvalidInput(f"tensors[{i}]: dtype {array.dtype} does not fit "
                                   f"{spec.name} ({spec.dtype})")
            arrays.append(np.ascontiguousarray(array, dtype=spec.dtype))
        try:
            return held.run(arrays), held.variant
        except Exception as exc:  # noqa: BLE001 - the runtime's own error, in words
            raise InputRejected(f"the device variant {held.variant.name} could not run this "
                                f"input: {exc}") from None


def _base(url: str, ssl: _ssl.SSLContext | None) -> str:
    parts = urlsplit(url)
    scheme = "https" if ssl is not None else parts.scheme
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _get(url: str, ssl: _ssl.SSLContext | None, timeout_s: float,
         headers: Mapping[str, str] | None = None) -> Any:
    """An open response to ``GET url``; raises :class:`MeshError` (the node's, or a
    :class:`ClientError` when it cannot be reached)."""
    try:
        request = urllib.request.Request(url, headers=dict(headers or {}))  # noqa: S310 - http(s) only
        return urllib.request.urlopen(request, timeout=timeout_s, context=ssl)  # noqa: S310
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read()[:4096]
        finally:
            exc.close()
        try:
            payload: Any = json.loads(body)
        except ValueError:
            payload = body.decode(errors="replace")
        raise error_from_payload(exc.code, payload) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MeshConnectionError(f"cannot reach {urlsplit(url).netloc}: {reason}") from None
