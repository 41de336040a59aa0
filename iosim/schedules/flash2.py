"""FlashAttention-2 forward order: one CTA per (batch·head, Q block of Br rows); Q_i is loaded
once, K/V blocks of Bc rows stream through SRAM, the output accumulator and the running max and
sum stay on chip, and O and the log-sum-exp L are written once. K and V tiles are
double-buffered in shared memory, as FlashAttention-2 does: (Br + 4·Bc)·d elements per CTA.
Each warp owns ``rows_per_warp`` query rows (default 16: one m16 tensor-core tile), so a CTA
has Br / rows_per_warp warps, and each warp reads the whole K and V tiles from shared memory.
Causal: the row blocks with the most work are launched first, as FlashAttention-2 does.
With ``q_in_registers`` each warp keeps its rows of Q in registers for the whole loop
(FlashAttention-2's ``Is_Q_in_regs``), instead of re-reading them from shared memory for every
K/V block.

Backward (:func:`build_backward`): FlashAttention-2's three kernels (D = rowsum(dO ∘ O); one CTA
per K/V block recomputing S and P from L, dQ added into float32 HBM with atomics; dQ converted)."""
from __future__ import annotations

from ..schedule import BufferSpec, Copy, Kernel, Schedule, TensorSpec
from . import common

F32 = common.F32


#: FlashAttention-2's backward tiles (Br query rows, Bc key rows) for d <= 64, d <= 128 and
#: larger; FlashAttention-3's Hopper backward uses the same for 16-bit inputs.
BACKWARD_TILES = ((128, 128), (64, 128), (64, 64))


def table_tile(by_head_dim, head_dim: int) -> tuple[int, int]:
    """The (Br, Bc) of a table by head dimension (d <= 64, d <= 128, larger)."""
    return by_head_dim[0] if head_dim <= 64 else by_head_dim[1] if head_dim <= 128 \
        else by_head_dim[2]


def _table_blocks(shape, fits, by_head_dim, halve_rows_first: bool) -> tuple[int, int]:
    """The (Br, Bc) of ``by_head_dim`` (:func:`table_tile`) clipped to N, the larger (ties: rows
    if ``halve_rows_first``, else columns) halved until the live tiles ``fits``."""
    n = shape.seq_len
    block_rows, block_cols = table_tile(by_head_dim, shape.head_dim)
    block_rows, block_cols = min(block_rows, n), min(block_cols, n)
    while not fits(block_rows, block_cols) and block_rows * block_cols > 1:
        rows_first = block_rows > block_cols or (block_rows == block_cols and halve_rows_first)
        if rows_first:
            block_rows = max(1, block_rows // 2)
        else:
            block_cols = max(1, block_cols // 2)
    return block_rows, block_cols


def default_blocks(shape, sram_bytes: int, fits) -> tuple[int, int]:
    """FlashAttention-2's forward tiles: (128, 128) for d <= 64, (128, 64) for d <= 128, else
    (64, 64); the larger halved until the live tiles ``fits``."""
    return _table_blocks(shape, fits, ((128, 128), (128, 64), (64, 64)), halve_rows_first=True)


def build(shape, block_rows, block_cols, sram_bytes, rows_per_warp=None,
          q_in_registers=False) -> Schedule:
    e = shape.elem_bytes
    # with q_in_registers each warp copies its rows of Q into registers once, and the QKᵀ
    # MMAs of every K/V block take them from there instead of re-reading shared memory
    if q_in_registers:
        body = common.online_softmax_program(shape, "Qr", keep_q=(Copy("Qr", "Qi"),))
    else:
        body = common.online_softmax_program(shape)
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
        longest_first=True, spans=common.FUSED_SPANS)
    tensors = tuple(common.qkv_tensors(shape)) + (
        common.output_tensor(shape),
        TensorSpec("L", "N", "1", F32, "output", float32=True))
    return Schedule("flash2", shape, tensors, (fwd,), block_rows, block_cols,
                    notes="FlashAttention-2 loop order; O and log-sum-exp written once")


def default_backward_blocks(shape, sram_bytes: int, fits) -> tuple[int, int]:
    """The backward tiles (:data:`BACKWARD_TILES`: (128, 128) for d <= 64, (64, 128) for
    d <= 128, else (64, 64)); the larger halved until the live tiles ``fits``."""
    return _table_blocks(shape, fits, BACKWARD_TILES, halve_rows_first=False)


def build_backward(shape, block_rows, block_cols, sram_bytes, rows_per_warp=None) -> Schedule:
    """FlashAttention-2's backward (O and the log-sum-exp L saved by the forward pass), the three
    kernels of :func:`common.flash_backward` (``flash2_bwd_dot``, ``flash2_bwd``,
    ``flash2_bwd_convert``) on ``mma.sync``: each warp of the main kernel owns
    ``rows_per_warp`` rows of the K/V block.

    Shared memory: K, V, Q (double-buffered), dO and the P and dS tiles, as FlashAttention-2
    keeps them: ((2·Br + Br + 2·Bc)·d + 2·Br·Bc) elements plus L and D (float32)."""
    common.check_plain_backward(shape, "flash2")
    e = shape.elem_bytes
    buffers = (BufferSpec("Kj", "j", "d", e), BufferSpec("Vj", "j", "d", e),
               BufferSpec("Qi", "i", "d", e, stages=2), BufferSpec("dOi", "i", "d", e),
               BufferSpec("Li", "i", "1", F32), BufferSpec("Di", "i", "1", F32),
               BufferSpec("S", "i", "j", F32, "reg"), BufferSpec("P", "i", "j", e),
               BufferSpec("dP", "i", "j", F32, "reg"), BufferSpec("dS", "i", "j", e),
               BufferSpec("dQi", "i", "d", F32, "reg"), BufferSpec("dK", "j", "d", F32, "reg"),
               BufferSpec("dV", "j", "d", F32, "reg"))
    row_warps = common.flash_warps(block_rows, rows_per_warp)
    return common.flash_backward(
        "flash2", shape, block_rows, block_cols, buffers,
        dict(tensor_path="mma_sync", warps=common.flash_warps(block_cols, rows_per_warp)),
        row_kernels=dict(rows=block_rows, warps=row_warps),
        notes="FlashAttention-2 backward: K/V-block CTAs, S and P recomputed from L, dQ added "
              "into a float32 buffer with atomics")
