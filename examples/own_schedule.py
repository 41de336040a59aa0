"""Write your own schedule: FlashAttention-2 with single-buffered K and V.

FlashAttention-2 double-buffers its K and V tiles in shared memory: while the warps work on
block j, the copy of block j+1 is already under way, so no load waits. That costs shared
memory: (Br + 4·Bc)·d elements per CTA instead of (Br + 2·Bc)·d. The question this example
asks of the model: what does single buffering (stages=1) cost, and where does the shared
memory it frees buy enough occupancy — or admit tiles that do not fit otherwise — to pay off?

The schedule is built here, in user code, from the IR classes of :mod:`iosim.schedule`; the
package is not modified. The steps read top to bottom, as the how-to
"Write your own schedule" (docs/howto/own-schedule.md) walks through them:

1. build the Schedule (``single_buffered_flash2``);
2. prove it computes attention with the numeric executor (``prove``);
3. count it: trace + replay + timed model (``count``);
4. compare it with the built-in flash2 at the same shape and tiles (``compare``);
5. explore its block sizes (``explore_blocks``).

Run it: ``python examples/own_schedule.py`` (about half a minute).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

import iosim
from iosim.errors import TilingError
from iosim.explore import candidate_sizes
from iosim.occupancy import BYTES_PER_REGISTER, REGISTER_OVERHEAD
from iosim.schedule import (BufferSpec, CausalMask, Fill, Kernel, Load, LogSumExp, Loop, MatMul,
                            OnlineSoftmax, RowDivide, RowScale, Schedule, Store, TensorSpec,
                            full_dims)
from iosim.simulate import simulate_schedule

#: Bytes of a float32: the output accumulator, scores and running statistics stay in float32.
F32_BYTES = 4
#: Query rows each warp owns: one m16 tensor-core tile, so a CTA has Br / 16 warps.
ROWS_PER_WARP = 16


# ---- 1. the schedule ------------------------------------------------------------------------

def single_buffered_flash2(shape: iosim.AttentionShape, block_rows: int, block_cols: int, *,
                           kv_stages: int = 1) -> Schedule:
    """FlashAttention-2's forward pass with K and V tiles kept in ``kv_stages`` shared-memory
    buffers each: 1 (single-buffered, this example's idea) or 2 (exactly the built-in flash2)."""
    n, e = shape.seq_len, shape.elem_bytes
    block_rows, block_cols = min(block_rows, n), min(block_cols, n)
    # Global tensors in HBM, (batch·head, rows, cols) each; extents are tokens: "N", "d", "1".
    tensors = (TensorSpec("Q", "N", "d", e, "input"), TensorSpec("K", "N", "d", e, "input"),
               TensorSpec("V", "N", "d", e, "input"), TensorSpec("O", "N", "d", e, "output"),
               TensorSpec("L", "N", "1", F32_BYTES, "output", float32=True))
    # On-chip tiles. "i" is the query-block variable (Br rows), "j" the key/value-block
    # variable (Bc rows). Shared memory ("smem", the default) counts against SRAM and
    # occupancy; registers ("reg") count against the register file.
    buffers = (BufferSpec("Qi", "i", "d", e),
               BufferSpec("Kj", "j", "d", e, stages=kv_stages),
               BufferSpec("Vj", "j", "d", e, stages=kv_stages),
               BufferSpec("S", "i", "j", F32_BYTES, "reg"),
               BufferSpec("P", "i", "j", F32_BYTES, "reg"),
               BufferSpec("O", "i", "d", F32_BYTES, "reg"),
               BufferSpec("m", "i", "1", F32_BYTES, "reg"),
               BufferSpec("l", "i", "1", F32_BYTES, "reg"),
               BufferSpec("alpha", "i", "1", F32_BYTES, "reg"),
               BufferSpec("L", "i", "1", F32_BYTES, "reg"))
    mask = (CausalMask("S", "i", "j"),) if shape.causal else ()
    step = (Load("Kj", "K", "j", "d"), Load("Vj", "V", "j", "d"),
            MatMul("S", "Qi", "Kj", transpose_b=True, scaled=True),   # S = QKᵀ/√d
            *mask,
            OnlineSoftmax("S", "P", "m", "l", "alpha"),               # P, new m and l
            RowScale("O", "alpha"),                                   # O *= e^(m_old - m_new)
            MatMul("O", "P", "Vj", accumulate=True))                  # O += P V
    body = (Load("Qi", "Q", "i", "d"),
            Fill("O", 0.0), Fill("m", float("-inf")), Fill("l", 0.0),
            Loop("j", step, causal_skip=True),
            RowDivide("O", "l"), LogSumExp("L", "m", "l"),
            Store("O", "O", "i", "d"), Store("L", "L", "i", "1"))
    kernel = Kernel("flash2_fwd", grid=("i",), body=body, buffers=buffers,
                    blocks={"i": block_rows, "j": block_cols}, row_var="i", col_var="j",
                    tensor_path="mma_sync", warps=-(-block_rows // ROWS_PER_WARP),
                    longest_first=True)
    name = "flash2" if kv_stages == 2 else f"flash2-kv{kv_stages}"
    return Schedule(name, shape, tensors, (kernel,), block_rows, block_cols,
                    notes=f"FlashAttention-2 with {kv_stages}-stage K and V tiles")


# ---- 2. prove it ----------------------------------------------------------------------------

def prove(schedule: Schedule, seed: int = 0) -> float:
    """Run ``schedule`` on random float64 inputs; return the largest absolute difference of its
    O and log-sum-exp L from reference attention (about 1e-15 when the program is right)."""
    shape = schedule.shape
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((shape.batch_heads, shape.seq_len, shape.head_dim))
               for _ in range(3))
    result = iosim.execute(schedule, q, k, v)
    out, row_max, row_sum = iosim.reference_attention(q, k, v, causal=shape.causal,
                                                      return_stats=True)
    lse = row_max + np.log(row_sum)
    return float(max(np.max(np.abs(result.output - out)),
                     np.max(np.abs(result.tensors["L"][..., 0] - lse))))


# ---- 3. count it ----------------------------------------------------------------------------

def count(schedule: Schedule, hardware="h100-measured", model: str = "l2"):
    """Bytes per level, FLOPs, occupancy and predicted time of ``schedule`` on ``hardware``
    (a preset name, TOML path or Hardware): an :class:`iosim.SimulationResult`."""
    return simulate_schedule(schedule, hardware=hardware, model=model)


# ---- 4. compare with the built-in flash2 ----------------------------------------------------

def compare(shape: iosim.AttentionShape, block_rows: int, block_cols: int,
            hardware="h100-measured", model: str = "l2") -> dict:
    """The built-in flash2 and the single-buffered variant at the same shape and tiles."""
    flash2 = iosim.simulate("flash2", shape, block_rows=block_rows, block_cols=block_cols,
                            hardware=hardware, model=model)
    single = count(single_buffered_flash2(shape, block_rows, block_cols), hardware, model)
    return {"flash2": flash2, "single-buffered": single}


def describe(results: dict) -> str:
    """One line per result: HBM bytes, shared memory per CTA, residency, predicted times."""
    lines = []
    for name, result in results.items():
        kernel, totals = result.kernels[0], result.totals
        occ = kernel.occupancy
        lines.append(
            f"{name:>16} ({result.block_rows}, {result.block_cols}): "
            f"HBM read {totals.hbm_read_bytes / 2**20:7.1f} MiB, "
            f"write {totals.hbm_write_bytes / 2**20:6.1f} MiB | "
            f"smem/CTA {occ['smem_bytes_per_cta'] / 1024:5.1f} KiB | "
            f"{occ['ctas_per_sm']} CTA x {occ['warps_per_cta']} warps per SM "
            f"({occ['limiter']}) | timed {totals.times_s['timed'] * 1e3:.3f} ms, "
            f"roofline {totals.times_s['roofline'] * 1e3:.3f} ms")
    return "\n".join(lines)


# ---- 5. explore block sizes -----------------------------------------------------------------

def registers_needed(kernel: Kernel, shape: iosim.AttentionShape) -> int:
    """Registers per thread the kernel's register tiles need before any cap: their bytes over
    4-byte registers and the CTA's threads, plus the overhead iosim.occupancy assumes. Where
    this exceeds what the occupancy calculator allotted, a real kernel spills to local memory,
    which the model does not charge for."""
    dims = full_dims(kernel, shape.head_dim, shape.seq_len)
    tile_bytes = sum(dims[b.rows] * dims[b.cols] * b.elem_bytes
                     for b in kernel.buffers if b.space == "reg")
    return -(-tile_bytes // (BYTES_PER_REGISTER * kernel.threads)) + REGISTER_OVERHEAD


@dataclass(frozen=True)
class BlockRow:
    """One (Br, Bc) of a block-size loop."""

    block_rows: int
    block_cols: int
    predicted_time_s: float
    hbm_bytes: int
    smem_bytes_per_cta: int
    ctas_per_sm: int
    occupancy_limiter: str
    registers_per_thread: int  # allotted by the occupancy calculator (capped)
    registers_needed: int  # what the register tiles need (uncapped)

    @property
    def spills(self) -> bool:
        """True when the register tiles need more registers than a thread was allotted."""
        return self.registers_needed > self.registers_per_thread


def explore_blocks(build, shape: iosim.AttentionShape, hardware="h100-measured",
                   model: str = "l2", sizes=None) -> list[BlockRow]:
    """Simulate ``build(shape, Br, Bc)`` for every pair of ``sizes`` (default: the explorer's
    powers of two up to N) that fits the SRAM and an SM; fastest first."""
    hw = iosim.load_hardware(hardware)
    sizes = candidate_sizes(shape.seq_len) if sizes is None else sizes
    rows = []
    for block_rows in sizes:
        for block_cols in sizes:
            schedule = build(shape, block_rows, block_cols)
            try:
                result = count(schedule, hw, model)
            except TilingError:   # tiles over the SRAM, or a CTA that fits no SM
                continue
            occ = result.kernels[0].occupancy
            rows.append(BlockRow(result.block_rows, result.block_cols,
                                 result.totals.predicted_time_s, result.totals.hbm_bytes,
                                 occ["smem_bytes_per_cta"], occ["ctas_per_sm"], occ["limiter"],
                                 occ["registers_per_thread"],
                                 registers_needed(schedule.kernels[0], shape)))
    return sorted(rows, key=lambda r: (r.predicted_time_s, r.hbm_bytes, r.block_rows,
                                       r.block_cols))


def main(shape=None, sizes=(32, 64, 128, 256), top: int = 6) -> None:
    shape = shape or iosim.AttentionShape(8, 16, 4096, 128, dtype="fp16")
    # 2. prove: small shapes, causal or not, block sizes that do not divide N
    for small in (iosim.AttentionShape(1, 2, 200, 64),
                  iosim.AttentionShape(1, 2, 200, 64, causal=True)):
        error = prove(single_buffered_flash2(small, 64, 48))
        print(f"executor vs reference, {small.describe()}: max |error| {error:.1e}")
    # 4. compare at flash2's default tiles, then at tiles where shared memory limits occupancy
    default = iosim.build_schedule("flash2", shape)
    for tiles in ((default.block_rows, default.block_cols), (64, 64)):
        print(describe(compare(shape, *tiles)))
    # 5. explore: both variants over the same candidate tiles
    flash2 = partial(single_buffered_flash2, kv_stages=2)
    for name, build in (("flash2", flash2), ("single-buffered", single_buffered_flash2)):
        rows = explore_blocks(build, shape, sizes=sizes)
        print(f"{name}: {len(rows)} pairs fit; fastest:")
        for r in rows[:top]:
            spill = (f"  spills: needs {r.registers_needed} registers, "
                     f"allotted {r.registers_per_thread}" if r.spills else "")
            print(f"  ({r.block_rows:3}, {r.block_cols:3}) {r.predicted_time_s * 1e3:.3f} ms  "
                  f"smem/CTA {r.smem_bytes_per_cta / 1024:5.1f} KiB  "
                  f"{r.ctas_per_sm} CTA/SM ({r.occupancy_limiter}){spill}")


if __name__ == "__main__":
    main()
