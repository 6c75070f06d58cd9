"""Accelerators the planner knows: memory, dense bf16 peak (train.throughput's table, the MFU's
denominator) and the bandwidth a collective reaches between GPUs of one node and across nodes."""
from __future__ import annotations

from dataclasses import dataclass

from rae_scale.train.throughput import _PEAK_FLOPS  # one table of peaks: what metrics.jsonl's MFU divides by

INTER_NODE_BUS_GBPS = 40.0  # achievable NCCL bus bandwidth per GPU over 400 Gb/s InfiniBand (one NIC per GPU)


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    peak_key: str  # key of train.throughput._PEAK_FLOPS
    bus_gbps: float  # achievable NCCL bus bandwidth per GPU inside a node (GB/s)

    @property
    def peak_flops(self) -> float:
        return _PEAK_FLOPS[self.peak_key]


GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM 80GB", 80, "H100", 360.0),  # NVLink 4: 450 GB/s per direction
    "h200": GPU("H200 SXM 141GB", 141, "H200", 360.0),
    "a100": GPU("A100 SXM 80GB", 80, "A100", 230.0),  # NVLink 3: 300 GB/s per direction
    "a100-40": GPU("A100 SXM 40GB", 40, "A100", 230.0),
    "l40s": GPU("L40S 48GB (PCIe)", 48, "L40S", 20.0),
    "a10": GPU("A10 24GB (PCIe)", 24, "A10", 12.0),
}


def get_gpu(name: str) -> GPU:
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


def bus_bandwidth(gpu: GPU, gpus: int, gpus_per_node: int) -> float:
    """Bytes/s a ring collective reaches per GPU: the node's links, or the network when it spans nodes."""
    gbps = gpu.bus_gbps if gpus <= gpus_per_node else min(gpu.bus_gbps, INTER_NODE_BUS_GBPS)
    return gbps * 1e9
