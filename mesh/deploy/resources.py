"""A hardware class as Kubernetes resources: CPU, memory and accelerators.

- ``threads`` -> CPU (whole cores; the agent computes on that many threads).
- ``memory_mb`` -> memory, plus :data:`PROCESS_HEADROOM_MB` for the process
  itself: ``memory_mb`` is the agent's budget for loaded models, and the
  interpreter, aiohttp and the runtimes' own code come on top.
- ``accelerators`` -> a device-plugin resource. Only NVIDIA GPUs have one
  this renderer knows (``nvidia.com/gpu``, counted per GPU); a class of
  ``kind: cuda`` that lists none asks for one GPU. Any other accelerator
  type is an error naming the class and the type: Kubernetes would schedule
  the node without it.

Requests equal limits: a node's latency profile was measured on exactly its
class, so it should neither be squeezed nor burst (and the pod gets the
Guaranteed QoS class, last to be evicted).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh.topology import HardwareClass

__all__ = ["GPU_RESOURCE", "PROCESS_HEADROOM_MB", "KubernetesResources", "kubernetes_resources"]

GPU_RESOURCE = "nvidia.com/gpu"
#: What a node process holds besides its models: ~122 MiB RSS measured idle
#: (benchmarks/limits.py) plus the onnxruntime/torch code and buffers of a first load.
PROCESS_HEADROOM_MB = 256

#: Accelerator types (``hardware.X.accelerators[].type``, lower case) served by NVIDIA's
#: device plugin. Data-centre names, plus anything spelled ``nvidia-...`` or ``rtx...``.
NVIDIA_TYPES = frozenset({
    "a2", "a10", "a10g", "a16", "a30", "a40", "a100", "a800", "b100", "b200", "gb200", "gh200",
    "h100", "h200", "h800", "k80", "l4", "l40", "l40s", "p4", "p40", "p100", "t4", "v100",
    "jetson", "nvidia", "gpu",
})
_NVIDIA_PATTERN = re.compile(r"^(nvidia[-_].+|rtx.*|gtx.*|quadro.*|jetson[-_].+)$")


def is_nvidia(accelerator_type: str) -> bool:
    kind = accelerator_type.lower()
    return kind in NVIDIA_TYPES or bool(_NVIDIA_PATTERN.match(kind))


@dataclass(frozen=True)
class KubernetesResources:
    """A container's ``resources`` and whether it needs the CUDA image."""

    cpu: int
    memory_mb: int
    gpus: int

    @property
    def accelerated(self) -> bool:
        return self.gpus > 0

    def as_manifest(self) -> dict[str, dict[str, str]]:
        amounts = {"cpu": str(self.cpu), "memory": f"{self.memory_mb}Mi"}
        if self.gpus:
            amounts[GPU_RESOURCE] = str(self.gpus)
        return {"requests": dict(amounts), "limits": dict(amounts)}


def kubernetes_resources(name: str, hardware: HardwareClass) -> KubernetesResources | list[str]:
    """The resources of hardware class ``name``, or the reasons it has none (one per problem)."""
    problems = []
    gpus = 0
    for i, accelerator in enumerate(hardware.accelerators):
        if is_nvidia(accelerator.type):
            gpus += accelerator.count
        else:
            problems.append(
                f"hardware.{name}.accelerators[{i}].type: {accelerator.type!r} has no Kubernetes "
                f"device-plugin resource that mesh deploy knows (NVIDIA GPUs such as a10, a100, "
                f"h100, l4 and t4 map to {GPU_RESOURCE}); give the class a supported "
                "accelerator, or run its nodes with --target systemd")
    if problems:
        return problems
    if hardware.kind == "cuda" and gpus == 0:
        gpus = 1  # a CUDA class is an NVIDIA GPU machine even when it does not list the GPU
    return KubernetesResources(cpu=hardware.threads,
                               memory_mb=hardware.memory_mb + PROCESS_HEADROOM_MB, gpus=gpus)
