"""FlashAttention-2 forward order: one CTA per (batch·head, Q block of Br rows); Q_i is loaded
once, K/V blocks of Bc rows stream through SRAM, the output accumulator and the running max and
sum stay on chip, and O and the log-sum-exp L are written once. K and V tiles are
double-buffered in shared memory, as FlashAttention-2 does: (Br + 4·Bc)·d elements per CTA.
Each warp owns ``rows_per_warp`` query rows (default 16: one m16 tensor-core tile), so a CTA
has Br / rows_per_warp warps, and each warp reads the whole K and V tiles from shared memory.
Causal: the row blocks with the most work are launched first, as FlashAttention-2 does.
With ``q_in_registers`` each warp keeps its rows of Q in registers for the whole loop
(FlashAttention-2's ``Is_Q_in_regs``), instead of re-reading them from shared memory for every
K/V block."""
from __future__ import annotations

from ..schedule import (BufferSpec, CausalMask, Copy, Fill, Kernel, Load, LogSumExp, Loop, MatMul,
                        OnlineSoftmax, RowDivide, RowScale, Schedule, Store, TensorSpec)
from . import common

F32 = common.F32


def default_blocks(shape, sram_bytes: int, fits) -> tuple[int, int]:
    """FlashAttention-2's forward tiles: (128, 128) for d <= 64, (128, 64) for d <= 128, else
    (64, 64); the larger halved until the live tiles ``fits``."""
    d, n = shape.head_dim, shape.seq_len
    block_rows, block_cols = (128, 128) if d <= 64 else (128, 64) if d <= 128 else (64, 64)
    block_rows, block_cols = min(block_rows, n), min(block_cols, n)
    while not fits(block_rows, block_cols) and block_rows * block_cols > 1:
        if block_rows >= block_cols:
            block_rows = max(1, block_rows // 2)
        else:
            block_cols = max(1, block_cols // 2)
    return block_rows, block_cols


def build(shape, block_rows, block_cols, sram_bytes, rows_per_warp=None,
          q_in_registers=False) -> Schedule:
    e = shape.elem_bytes
    mask = (CausalMask("S", "i", "j"),) if shape.causal else ()
    # with q_in_registers each warp copies its rows of Q into registers once, and the QKᵀ
    # MMAs of every K/V block take them from there instead of re-reading shared memory
    q_operand = "Qr" if q_in_registers else "Qi"
    step = (Load("Kj", "K", "j", "d"), Load("Vj", "V", "j", "d"),
            MatMul("S", q_operand, "Kj", transpose_b=True, scaled=True)) + mask + (
            OnlineSoftmax("S", "P", "m", "l", "alpha"),
            RowScale("O", "alpha"),
            MatMul("O", "P", "Vj", accumulate=True))
    keep_q = (Copy("Qr", "Qi"),) if q_in_registers else ()
    body = (Load("Qi", "Q", "i", "d"),) + keep_q + (
            Fill("O", 0.0), Fill("m", float("-inf")),
            Fill("l", 0.0), Loop("j", step, causal_skip=True),
            RowDivide("O", "l"), LogSumExp("L", "m", "l"),
            Store("O", "O", "i", "d"), Store("L", "L", "i", "1"))
    fwd = Kernel(
        "flash2_fwd", grid=("i",), body=body,
        # K and V double-buffered: the next block's copy lands while this one is used
        buffers=(BufferSpec("Qi", "i", "d", e), BufferSpec("Kj", "j", "d", e, stages=2),
                 BufferSpec("Vj", "j", "d", e, stages=2),
                 BufferSpec("S", "i", "j", F32, "reg"), BufferSpec("P", "i", "j", F32, "reg"),
                 BufferSpec("O", "i", "d", F32, "reg"), BufferSpec("m", "i", "1", F32, "reg"),
                 BufferSpec("l", "i", "1", F32, "reg"), BufferSpec("alpha", "i", "1", F32, "reg"),
                 BufferSpec("L", "i", "1", F32, "reg"))
        + ((BufferSpec("Qr", "i", "d", e, "reg"),) if q_in_registers else ()),
        blocks={"i": block_rows, "j": block_cols}, row_var="i", col_var="j",
        tensor_path="mma_sync", warps=common.flash_warps(block_rows, rows_per_warp),
        longest_first=True)
    tensors = tuple(common.qkv_tensors(shape)) + (
        common.output_tensor(shape),
        TensorSpec("L", "N", "1", F32, "output", float32=True))
    return Schedule("flash2", shape, tensors, (fwd,), block_rows, block_cols,
                    notes="FlashAttention-2 loop order; O and log-sum-exp written once")
