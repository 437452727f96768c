"""Tiermesh: a managed, model-less inference serving mesh from edge to cloud.

Applications name a task and an SLO; the mesh picks the model variant, the
node and the hardware::

    from mesh import Client
    with Client("http://127.0.0.1:7101") as mesh:
        result = mesh.infer("digits", images, latency_ms=20, min_accuracy=0.95)
    print(result.served_by, result.latency_ms, result.slo_met)
"""

from mesh.client import AsyncClient, Client, Result
from mesh.device import DeviceVariantRefused
from mesh.errors import (
    Forbidden,
    InputRejected,
    InvalidInput,
    MeshConnectionError,
    MeshError,
    MeshTimeout,
    NoRoute,
    Overloaded,
    PayloadTooLarge,
    TopologyError,
    Unauthorized,
    Unavailable,
    UnknownTask,
    UpstreamError,
)
from mesh.failover import RetryPolicy
from mesh.wire import SLO, ServedBy

__all__ = [
    "Client",
    "AsyncClient",
    "Result",
    "RetryPolicy",
    "DeviceVariantRefused",
    "SLO",
    "ServedBy",
    "MeshError",
    "InvalidInput",
    "InputRejected",
    "Forbidden",
    "Unauthorized",
    "PayloadTooLarge",
    "UnknownTask",
    "TopologyError",
    "Overloaded",
    "Unavailable",
    "NoRoute",
    "UpstreamError",
    "MeshConnectionError",
    "MeshTimeout",
]
__version__ = "0.1.0"
