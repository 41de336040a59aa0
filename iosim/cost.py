"""The cost model: counts -> arithmetic intensity, roofline bound and predicted time per kernel.

A kernel's predicted time is the roofline maximum of the time each resource needs, plus the
launch overhead:

* HBM: (hbm_read + hbm_write) / HBM bandwidth
* L2: (l2_read + l2_write) / L2 bandwidth (the ``l2`` model only)
* SRAM: (sram_read + sram_write) / shared-memory bandwidth
* compute: tensor-core FLOPs at the dtype's matmul rate (the library-GEMM rate, or the
  warp-level ``mma.sync`` rate for kernels that use it, as FlashAttention 1 and 2 do), plus
  scalar FLOPs (max, sum, rescale, mask) at the CUDA-core rate, plus exp/log evaluations at the
  special-function-unit rate — added, not overlapped, as they issue from the same warps —
  divided by the fraction of SMs the grid keeps busy (``sm_utilization``: a grid of fewer CTAs
  than SMs, or a ragged last wave, leaves SMs idle).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MEMORY_LIMITERS = ("hbm", "l2", "sram")


@dataclass(frozen=True)
class Cost:
    hbm_time_s: float
    l2_time_s: float
    sram_time_s: float
    tensor_time_s: float
    scalar_time_s: float
    special_time_s: float
    launch_time_s: float
    sm_utilization: float

    @property
    def compute_time_s(self) -> float:
        return ((self.tensor_time_s + self.scalar_time_s + self.special_time_s)
                / self.sm_utilization)

    @property
    def memory_time_s(self) -> float:
        return max(self.hbm_time_s, self.l2_time_s, self.sram_time_s)

    @property
    def predicted_time_s(self) -> float:
        return max(self.memory_time_s, self.compute_time_s) + self.launch_time_s

    @property
    def limiter(self) -> str:
        """The resource whose time is the roofline maximum."""
        times = {"hbm": self.hbm_time_s, "l2": self.l2_time_s, "sram": self.sram_time_s,
                 "compute": self.compute_time_s}
        name = max(times, key=times.get)
        if name == "compute":
            return "tensor" if self.tensor_time_s >= (self.scalar_time_s
                                                      + self.special_time_s) else "scalar"
        return name

    @property
    def bound(self) -> str:
        return "memory" if self.limiter in MEMORY_LIMITERS else "compute"


def sm_utilization(ctas: int, sm_count: int) -> float:
    """Busy fraction of the SMs over the kernel's waves of (at least) one CTA per SM."""
    if ctas <= 0:
        return 1.0
    waves = math.ceil(ctas / sm_count)
    return ctas / (waves * sm_count)


def kernel_cost(counts, hardware, dtype: str, model: str) -> Cost:
    """The roofline terms of one kernel's counts (an object with the counter attributes,
    ``special_ops`` and ``tensor_path`` among them)."""
    hbm = counts.hbm_read_bytes + counts.hbm_write_bytes
    l2 = counts.l2_read_bytes + counts.l2_write_bytes if model == "l2" else 0
    sram = counts.sram_read_bytes + counts.sram_write_bytes
    return Cost(
        hbm_time_s=hbm / hardware.hbm_bandwidth_bytes_per_s,
        l2_time_s=l2 / hardware.l2_bandwidth_bytes_per_s,
        sram_time_s=sram / hardware.sram_bandwidth_bytes_per_s,
        tensor_time_s=counts.flops_tensor / hardware.tensor_rate(dtype, counts.tensor_path),
        scalar_time_s=(counts.flops_scalar - counts.special_ops) / hardware.scalar_flops_per_s,
        special_time_s=counts.special_ops / hardware.special_ops_per_s,
        launch_time_s=hardware.launch_overhead_s,
        sm_utilization=sm_utilization(counts.ctas, hardware.sm_count))


def arithmetic_intensity(flops: float, hbm_bytes: float) -> float:
    """FLOP per HBM byte (inf for an op that moves no bytes)."""
    return flops / hbm_bytes if hbm_bytes else math.inf
