"""One error tree for the whole mesh.

Every error a user can see is a :class:`MeshError`. Each class knows the HTTP
status it maps to and whether a caller may retry it, so the node's HTTP
middleware is the only place that turns errors into responses and the SDK is
the only place that turns responses back into errors::

    MeshError                       500  base; never raised bare
    ├── InvalidInput                400  bad shapes, dtypes, fields, msgpack
    │   ├── PayloadTooLarge         413  body or tensor over the node's cap
    │   ├── UnknownTask             404  no variant anywhere serves this task
    │   └── InputRejected           422  valid by the task's spec, but the variant could not run it
    ├── Forbidden                   403  a field only mesh nodes may set (a route), or a peer's bad token
    ├── Unauthorized                401  no API key, or one the mesh does not know (tenants)
    ├── TopologyError               ---  a topology file failed validation (CLI only)
    ├── ArtifactNotFound            404  no artifact with that sha256 here or upstream
    ├── AnswerNotFound              404  feedback for an answer this node does not hold
    ├── Overloaded                  429  queue full here; retry after a pause
    ├── Unavailable                 503  node or variant not ready; retry elsewhere
    │   ├── NoRoute                 503  nothing reachable can serve the query
    │   ├── RuntimeMissing          503  no runtime for a variant's format here (install its extra)
    │   └── CannotMeetDeadline      503  admitting it here would miss its deadline; place it elsewhere
    ├── UpstreamError               502  a forwarded hop failed
    └── ClientError                 ---  raised only by the SDK, never sent
        ├── MeshConnectionError         also a ConnectionError
        └── MeshTimeout                 also a TimeoutError

Messages name the field, the value and the fix. They never include another
tenant's names or internal file paths.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "MeshError",
    "InvalidInput",
    "PayloadTooLarge",
    "UnknownTask",
    "InputRejected",
    "Forbidden",
    "Unauthorized",
    "TopologyError",
    "ArtifactNotFound",
    "AnswerNotFound",
    "Overloaded",
    "Unavailable",
    "NoRoute",
    "CannotMeetDeadline",
    "RuntimeMissing",
    "UpstreamError",
    "ClientError",
    "MeshConnectionError",
    "MeshTimeout",
    "error_from_payload",
]


class MeshError(Exception):
    """Base of every Tiermesh error."""

    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def to_payload(self) -> dict[str, Any]:
        """The wire form: ``{"type": ..., "message": ..., "retryable": ...}``."""
        payload: dict[str, Any] = {
            "type": type(self).__name__,
            "message": self.message,
            "retryable": self.retryable,
        }
        if self.retry_after_s is not None:
            payload["retry_after_s"] = self.retry_after_s
        return payload


class InvalidInput(MeshError):
    status = 400


class PayloadTooLarge(InvalidInput):
    status = 413


class UnknownTask(InvalidInput):
    status = 404


class InputRejected(InvalidInput):
    """The variant failed on this input alone (run by itself, after its batch failed)."""

    status = 422


class Forbidden(MeshError):
    status = 403


class Unauthorized(MeshError):
    """No API key, or one the mesh does not know (or has revoked)."""

    status = 401


class TopologyError(MeshError):
    """A topology file is invalid; ``errors`` holds one line per problem."""

    status = 400

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {e}" for e in errors)
        super().__init__(f"{source}: {len(errors)} error(s)\n{lines}")


class ArtifactNotFound(MeshError):
    status = 404


class AnswerNotFound(MeshError):
    """Feedback for an answer this node does not hold (too old, or another entry's)."""

    status = 404


class Overloaded(MeshError):
    status = 429
    retryable = True


class Unavailable(MeshError):
    status = 503
    retryable = True


class NoRoute(Unavailable):
    pass


class RuntimeMissing(Unavailable):
    """No runtime for a variant's format on this node (unknown, or its extra not installed)."""


class CannotMeetDeadline(Unavailable):
    """Refused at admission: this node's queue and batch model say the query would be late."""


class UpstreamError(MeshError):
    status = 502
    retryable = True


class ClientError(MeshError):
    """Raised by the SDK itself (the request never got an answer)."""


class MeshConnectionError(ClientError, ConnectionError):
    retryable = True


class MeshTimeout(ClientError, TimeoutError):
    retryable = True


_BY_NAME: dict[str, type[MeshError]] = {
    cls.__name__: cls
    for cls in (
        MeshError,
        InvalidInput,
        PayloadTooLarge,
        UnknownTask,
        Unauthorized,
        InputRejected,
        Forbidden,
        ArtifactNotFound,
        AnswerNotFound,
        Overloaded,
        Unavailable,
        NoRoute,
        CannotMeetDeadline,
        RuntimeMissing,
        UpstreamError,
    )
}

_BY_STATUS: dict[int, type[MeshError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Forbidden,
    404: UnknownTask,
    422: InputRejected,
    413: PayloadTooLarge,
    429: Overloaded,
    503: Unavailable,
    502: UpstreamError,
}


def error_from_payload(status: int, payload: Any) -> MeshError:
    """Rebuild the error a node sent; unknown shapes fall back on the status."""
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            cls = _BY_NAME.get(str(err.get("type")), _BY_STATUS.get(status, MeshError))
            retry = err.get("retry_after_s")
            return cls(
                str(err.get("message", f"HTTP {status}")),
                retry_after_s=float(retry) if isinstance(retry, (int, float)) else None,
            )
    return _BY_STATUS.get(status, MeshError)(f"HTTP {status}: {str(payload)[:200]}")
