"""A stated roofline: predicted step time from FLOPs, HBM bytes and collective bytes on a named GPU and network.

Per micro-batch on one rank: max(executed FLOPs / (peak · gemm_efficiency), frozen-weight bytes read / HBM)
(every frozen weight is read twice, forward and input gradient, three times under full recompute), plus the
tensor-parallel collectives (not overlapped: they sit between the GEMMs). Per step: m micro-batches times the
pipeline's bubble (1 + (pp − 1)/(vp · m)), plus the data-parallel gradient collectives (exposed: one per step,
after the last backward) and ZeRO-3's parameter gathers beyond what the compute hides. A collective takes its
bus bytes over the link of its axis: NVLink inside a node, the per-GPU network share across nodes.

Datasheet figures (dense, no sparsity): NVIDIA H100 SXM5 (989 TFLOP/s bf16, 3.35 TB/s HBM3, NVLink 4 at 450
GB/s per direction), H100 PCIe (756) and NVL (835), H200 SXM (989, 4.8 TB/s, 141 GB), A100 SXM4 (312, 2.04 TB/s for 80 GB, 1.56 TB/s for 40 GB,
NVLink 3 at 300 GB/s per direction), L40S (362, 864 GB/s, PCIe Gen4 x16 at 32 GB/s per direction). Networks:
one 400 Gb/s NDR InfiniBand NIC per GPU (50 GB/s) on H100/H200 nodes (DGX H100), 200 Gb/s HDR (25 GB/s) on
A100 nodes (DGX A100). Efficiencies are assumptions, stated: large bf16 GEMMs reach ~75% of the dense peak, NCCL
~80% of a link's bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float
    """Dense bf16 FLOP/s."""
    hbm_bytes: float
    """Memory in bytes."""
    hbm_bandwidth: float
    """Bytes/s."""
    nvlink: float
    """Intra-node bytes/s per direction per GPU."""
    network: float
    """Inter-node bytes/s per GPU."""
    per_node: int = 8
    gemm_efficiency: float = 0.75
    link_efficiency: float = 0.80
    reserved: float = 3 * 2**30
    """Bytes not available to tensors: CUDA context, NCCL buffers, allocator fragmentation (an assumption)."""

    @property
    def usable_bytes(self) -> float:
        return self.hbm_bytes - self.reserved


GB = 1e9
GPUS = {
    "h100-80gb": Gpu("h100-80gb", 989e12, 80 * 2**30, 3.35e12, 450 * GB, 50 * GB),
    "h200-141gb": Gpu("h200-141gb", 989e12, 141 * 2**30, 4.8e12, 450 * GB, 50 * GB),
    "a100-80gb": Gpu("a100-80gb", 312e12, 80 * 2**30, 2.04e12, 300 * GB, 25 * GB),
    "a100-40gb": Gpu("a100-40gb", 312e12, 40 * 2**30, 1.56e12, 300 * GB, 25 * GB),
    "l40s-48gb": Gpu("l40s-48gb", 362e12, 48 * 2**30, 0.864e12, 32 * GB, 25 * GB),
    # H100 PCIe (756 TFLOP/s, 80 GB HBM2e at 2.0 TB/s) and H100 NVL (835, 94 GB HBM3 at 3.9 TB/s): NVLink bridges
    # join pairs at 300 GB/s per direction (per_node 2: larger groups take the network figure)
    "h100-pcie": Gpu("h100-pcie", 756e12, 80 * 2**30, 2.0e12, 300 * GB, 50 * GB, per_node=2),
    "h100-nvl": Gpu("h100-nvl", 835e12, 94 * 2**30, 3.9e12, 300 * GB, 50 * GB, per_node=2),
}

DEVICE_NAMES = (("H200", "h200-141gb"), ("H100 NVL", "h100-nvl"), ("H100 PCIe", "h100-pcie"), ("H100", "h100-80gb"),
                ("A100-SXM4-40GB", "a100-40gb"), ("A100-PCIE-40GB", "a100-40gb"), ("A100", "a100-80gb"),
                ("L40S", "l40s-48gb"))
"""(substring of ``torch.cuda.get_device_name``, GPUS key); the first match wins (the profiler's peak)."""


def gpu_from_device_name(device_name: str) -> Gpu | None:
    """The table's GPU whose name ``device_name`` (as torch reports it) contains, or None."""
    return next((GPUS[key] for sub, key in DEVICE_NAMES if sub in device_name), None)


def get_gpu(name: str) -> Gpu:
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[name]


def link_bandwidth(gpu: Gpu, axis: str, tp: int, pp: int, world: int) -> float:
    """Effective bytes/s of a collective on ``axis``: NVLink when its group fits in one node, else the network.
    Ranks are ordered tensor fastest, then data, then pipeline (megatron's default order)."""
    span = {"tensor": tp, "data": world // pp, "pipeline": world}[axis]
    return gpu.link_efficiency * (gpu.nvlink if span <= gpu.per_node else gpu.network)
