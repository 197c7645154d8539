"""The GPUs a layout can be planned for: memory, peak throughput and the bandwidths a rank sees.

Bandwidths are per GPU and per direction, as NCCL's bus bandwidth counts them: ``intra_node`` over
NVLink/NVSwitch (PCIe where there is none), ``inter_node`` the GPU's share of the node's network (one
400 Gb/s NDR InfiniBand port per H100/H200, 200 Gb/s HDR per A100, 100 Gb/s Ethernet per L40S/A10G).
Peak dense TFLOP/s come from the table the trainer's MFU uses (``gptscale.parallel.devices.PEAK_TFLOPS``).
These are assumptions, listed in docs/planning.md; a cluster with other links gets its own entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptscale.config.schema import ClusterConfig, Precision
from gptscale.parallel.devices import PEAK_TFLOPS

GiB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int  # the total torch.cuda reports, rounded down
    peak_key: str  # row of PEAK_TFLOPS
    intra_node_gbps: float  # GB/s per GPU, one direction
    inter_node_gbps: float

    def peak_flops(self, precision: Precision) -> float:
        return PEAK_TFLOPS[self.peak_key][precision.value] * 1e12


GPUS = {
    "h100": Gpu("H100 SXM 80GB", 79 * GiB, "H100 SXM", 450.0, 50.0),
    "h200": Gpu("H200 SXM 141GB", 139 * GiB, "H200", 450.0, 50.0),
    "a100": Gpu("A100 SXM 80GB", 79 * GiB, "A100", 300.0, 25.0),
    "a100-40": Gpu("A100 SXM 40GB", 39 * GiB, "A100", 300.0, 25.0),
    "l40s": Gpu("L40S 48GB", 44 * GiB, "L40S", 32.0, 12.5),
    "a10g": Gpu("A10G 24GB", 22 * GiB, "A10G", 16.0, 6.25),
}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: Gpu

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def link(self, stride: int, size: int) -> str:
        """The link the collectives of a group of ``size`` ranks ``stride`` apart cross.

        Megatron-core numbers ranks tensor-parallel innermost, then data (and expert), then pipeline
        outermost, so such a group lies in the block of ``stride * size`` consecutive ranks: every group stays
        within a node when that block divides a node (tp=8 on 8-GPU nodes), and some cross nodes otherwise.
        """
        block = stride * size
        return "intra-node" if size == 1 or self.nodes == 1 or self.gpus_per_node % block == 0 else "inter-node"


def cluster_of(config: ClusterConfig) -> Cluster:
    """The cluster ``cluster.*`` describes, or a ValueError naming the field."""
    if config.gpu not in GPUS:
        raise ValueError(
            f"cluster.gpu={config.gpu!r} is not a known GPU; choose one of {', '.join(GPUS)} (gptscale/plan/cluster.py)"
        )
    for name in ("nodes", "gpus_per_node"):
        if getattr(config, name) < 1:
            raise ValueError(f"cluster.{name}={getattr(config, name)} must be at least 1")
    return Cluster(config.nodes, config.gpus_per_node, GPUS[config.gpu])
