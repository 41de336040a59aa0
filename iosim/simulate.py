"""The Python API: simulate one algorithm on one workload, get counts and predicted times."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from . import engine
from .cost import MEMORY_LIMITERS, arithmetic_intensity, kernel_cost
from .errors import IosimError
from .hardware import Hardware, load_hardware
from .schedules import build_schedule
from .shape import AttentionShape
from .trace import build_trace

MODELS = ("two-level", "l2")
COUNT_FIELDS = ("hbm_read_bytes", "hbm_write_bytes", "l2_read_bytes", "l2_write_bytes",
                "sram_read_bytes", "sram_write_bytes", "flops_tensor", "flops_scalar",
                "special_ops")


@dataclass
class KernelResult:
    """Counts, roofline terms and predicted time of one kernel (or of all, in ``totals``)."""

    name: str
    hbm_read_bytes: int = 0
    hbm_write_bytes: int = 0
    l2_read_bytes: int = 0
    l2_write_bytes: int = 0
    sram_read_bytes: int = 0
    sram_write_bytes: int = 0
    flops_tensor: int = 0
    flops_scalar: int = 0
    special_ops: int = 0  # exp/log evaluations (part of flops_scalar)
    tensor_path: str = "library"
    ctas: int = 0
    concurrent_ctas: int = 0
    l2_line_accesses: int = 0
    l2_dirty_end_bytes: int = 0  # dirty in L2 when the kernel ends: reaches HBM afterwards
    tensors: dict = field(default_factory=dict)  # tensor -> {"read_bytes", "write_bytes"}
    predicted_time_s: float = 0.0
    arithmetic_intensity: float = 0.0
    bound: str = ""
    limiter: str = ""
    times_s: dict = field(default_factory=dict)

    @property
    def hbm_bytes(self) -> int:
        return self.hbm_read_bytes + self.hbm_write_bytes

    @property
    def flops(self) -> int:
        return self.flops_tensor + self.flops_scalar

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SimulationResult:
    algorithm: str
    model: str
    hardware: Hardware
    shape: AttentionShape
    block_rows: int
    block_cols: int
    kernels: list
    totals: KernelResult

    def to_dict(self) -> dict:
        shape = self.shape
        return {
            "algorithm": self.algorithm, "model": self.model, "hardware": self.hardware.name,
            "shape": {"batch": shape.batch, "heads": shape.heads, "seq_len": shape.seq_len,
                      "head_dim": shape.head_dim, "dtype": shape.dtype, "causal": shape.causal},
            "block_rows": self.block_rows, "block_cols": self.block_cols,
            "totals": self.totals.to_dict(),
            "kernels": [k.to_dict() for k in self.kernels],
        }


def concurrent_ctas(smem_bytes_per_cta: int, hardware: Hardware, n_ctas: int) -> int:
    """CTAs resident at once: SMs x CTAs per SM as the shared memory each needs allows."""
    per_sm = hardware.max_ctas_per_sm
    if smem_bytes_per_cta > 0:
        per_sm = min(per_sm, hardware.sram_bytes_per_sm // smem_bytes_per_cta)
    return max(1, min(n_ctas, hardware.sm_count * max(1, per_sm)))


def check_model(model: str) -> str:
    """``model`` if it is one of :data:`MODELS`, else an IosimError naming the allowed ones."""
    if model not in MODELS:
        raise IosimError(f"unknown model {model!r}; allowed: {', '.join(MODELS)}")
    return model


def tile_traffic_by_tensor(kt, tensor_names) -> dict:
    """Bytes of tiles each tensor moves between SRAM and the memory system (loads, stores).

    Under the two-level model these are the HBM bytes; under the l2 model, the L2 requests."""
    nbytes = kt.rows * kt.row_bytes
    traffic = {}
    for kind, key in ((engine.LOAD, "read_bytes"), (engine.STORE, "write_bytes")):
        chosen = kt.kind == kind
        per_tensor = np.bincount(kt.tensor[chosen], weights=nbytes[chosen],
                                 minlength=len(tensor_names))
        for name, value in zip(tensor_names, per_tensor):
            if value:
                traffic.setdefault(name, {"read_bytes": 0, "write_bytes": 0})[key] = int(value)
    return traffic


def replay(trace, hardware: Hardware, model: str) -> list[dict]:
    """Run every kernel of ``trace`` through the engine; per-kernel counter dicts."""
    results = []
    for kt in trace.kernels:
        counts = np.zeros(len(engine.COUNTERS), dtype=np.int64)
        engine.sum_events(kt.kind, kt.rows, kt.row_bytes, kt.flops_tensor, kt.flops_scalar,
                          kt.sram_read, kt.sram_write, counts)
        slots = concurrent_ctas(kt.smem_bytes_per_cta, hardware, kt.n_ctas)
        if model == "l2":
            counts[engine.HBM_READ] = counts[engine.HBM_WRITE] = 0
            event_counts = np.zeros((kt.n_events, 2), dtype=np.int64)
            engine.replay_l2(kt.cta_start, kt.kind, kt.addr, kt.rows, kt.row_bytes,
                             kt.row_stride, slots, hardware.l2_sets,
                             hardware.l2_associativity, hardware.l2_line_bytes,
                             hardware.l2_sector_bytes, counts, event_counts)
        row = {name: int(counts[i]) for i, name in enumerate(engine.COUNTERS)}
        row.update(name=kt.name, ctas=kt.n_ctas, concurrent_ctas=slots,
                   special_ops=int(kt.special_ops.sum()), tensor_path=kt.tensor_path,
                   tensors=tile_traffic_by_tensor(kt, trace.tensor_names))
        results.append(row)
    return results


def _finish(result: KernelResult, hardware: Hardware, dtype: str, model: str) -> KernelResult:
    cost = kernel_cost(result, hardware, dtype, model)
    result.predicted_time_s = cost.predicted_time_s
    result.arithmetic_intensity = arithmetic_intensity(result.flops, result.hbm_bytes)
    result.bound, result.limiter = cost.bound, cost.limiter
    result.times_s = {"hbm": cost.hbm_time_s, "l2": cost.l2_time_s, "sram": cost.sram_time_s,
                      "tensor": cost.tensor_time_s, "scalar": cost.scalar_time_s,
                      "special": cost.special_time_s,
                      "compute": cost.compute_time_s, "launch": cost.launch_time_s}
    return result


def simulate_trace(trace, hardware: Hardware, model: str = "l2") -> SimulationResult:
    """Replay an already built trace (see :func:`iosim.trace.build_trace`) under ``model``.

    Lets a caller replay one trace under both models, or simulate a schedule that is not one of
    the attention algorithms (the op catalogue)."""
    check_model(model)
    schedule = trace.schedule
    shape = schedule.shape
    rows = replay(trace, hardware, model)
    kernels = [_finish(KernelResult(**row), hardware, shape.dtype, model) for row in rows]
    totals = KernelResult(name="total", ctas=sum(k.ctas for k in kernels))
    for name in COUNT_FIELDS + ("l2_line_accesses", "l2_dirty_end_bytes"):
        setattr(totals, name, sum(getattr(k, name) for k in kernels))
    totals.predicted_time_s = sum(k.predicted_time_s for k in kernels)
    totals.arithmetic_intensity = arithmetic_intensity(totals.flops, totals.hbm_bytes)
    time_by_limiter = {}
    for k in kernels:
        time_by_limiter[k.limiter] = time_by_limiter.get(k.limiter, 0.0) + k.predicted_time_s
    totals.limiter = max(time_by_limiter, key=time_by_limiter.get)
    totals.bound = "memory" if totals.limiter in MEMORY_LIMITERS else "compute"
    return SimulationResult(algorithm=schedule.algorithm, model=model, hardware=hardware,
                            shape=shape, block_rows=schedule.block_rows,
                            block_cols=schedule.block_cols, kernels=kernels, totals=totals)


def simulate(algorithm: str, shape: AttentionShape, *, block_rows=None, block_cols=None,
             hardware="h100-measured", sram_bytes=None, model: str = "l2") -> SimulationResult:
    """Count bytes per memory level and FLOPs of ``algorithm`` on ``shape``, and predict time.

    ``hardware`` is a preset name, a TOML path or a :class:`Hardware`; ``sram_bytes`` overrides
    its SRAM per thread block (the paper's M); ``model`` is "l2" (default) or "two-level"."""
    if not isinstance(shape, AttentionShape):
        raise IosimError(f"shape must be an iosim.AttentionShape, got {type(shape).__name__}")
    check_model(model)
    hw = load_hardware(hardware)
    if sram_bytes is not None:
        hw = hw.with_sram(sram_bytes)
    schedule = build_schedule(algorithm, shape, block_rows, block_cols,
                              sram_bytes=hw.sram_bytes_per_block)
    return simulate_trace(build_trace(schedule), hw, model)
