"""What a node can give its variants (memory, accelerator memory, worker slots) and what a
variant takes from it (memory, compute time per query).

A node's memory for models is its hardware class's ``memory_mb``. A variant
made for ``cuda`` needs an accelerator and counts against the accelerators'
memory; everything else counts against the host's. A variant's memory is
its profile's measured peak, else its file size times ``size_factor``
(what the node's model manager assumes too). Each worker beyond the first
takes ``worker_memory_frac`` of that again.

A node may run ``cores // threads`` compute workers at once (at least one):
each worker runs batches with the class's ``threads`` intra-op threads, the
figure its latency profile was measured with.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.registry import Profile, Variant
from mesh.topology import HardwareClass

__all__ = ["MIB", "NodeResources", "variant_memory_bytes", "hosted_bytes", "service_ms"]

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class NodeResources:
    """One hardware class as placement sees it."""

    profile_key: str
    memory_bytes: int
    accelerator_bytes: int
    #: compute workers the node may run at once
    slots: int
    #: it has an accelerator (or is a cuda class): where the largest variants go
    accelerated: bool
    #: intra-op threads (CPUs) each worker runs with
    threads: int = 1

    @classmethod
    def of(cls, hardware: HardwareClass) -> NodeResources:
        cores = hardware.cores if hardware.cores is not None else hardware.threads
        accel = sum(a.count * a.memory_mb for a in hardware.accelerators) * MIB
        return cls(profile_key=hardware.profile_key, memory_bytes=hardware.memory_mb * MIB,
                   accelerator_bytes=accel, slots=max(1, cores // hardware.threads),
                   accelerated=bool(hardware.accelerators) or hardware.kind == "cuda",
                   threads=max(1, hardware.threads))

    def can_run(self, variant: Variant) -> bool:
        """A cuda variant needs an accelerated node; anything else runs anywhere."""
        return variant.device != "cuda" or self.accelerated

    def on_accelerator(self, variant: Variant) -> bool:
        """Whether ``variant``'s memory counts against the accelerators' rather than the host's."""
        return variant.device == "cuda" and self.accelerator_bytes > 0


def variant_memory_bytes(variant: Variant, profile: Profile | None, size_factor: float) -> int:
    """Memory one loaded instance takes: the profiled peak when measured, else size x factor."""
    if profile is not None and profile.peak_memory_bytes > 0:
        return profile.peak_memory_bytes
    return int(variant.size_bytes * size_factor)


def hosted_bytes(memory_bytes: int, workers: int, worker_memory_frac: float) -> int:
    """Memory of a variant hosted with ``workers`` workers."""
    return int(memory_bytes * (1 + max(workers - 1, 0) * worker_memory_frac))


def service_ms(variant: Variant, profile: Profile, *, capacity_batch: int,
               batch_overhead_ms: float, rows: float = 1.0) -> float:
    """Worker time one query of ``rows`` rows takes when batched at the capacity batch size.

    This is the inverse of a worker's throughput: busy = rate x service.
    """
    batch = max(1, min(capacity_batch, variant.max_batch))
    return (profile.latency_ms(batch) + batch_overhead_ms) / batch * rows
