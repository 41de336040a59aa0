"""FlashAttention (Dao et al., 2022), Algorithm 1 order: one CTA per (batch, head); the outer
loop streams K/V blocks of Bc rows, the inner loop visits every Q block of Br rows and reads and
writes back its O, l, m in HBM. O, l and m are kept in float32 between steps.

A first kernel initialises O = 0, l = 0, m = -inf in HBM (Algorithm 1, line 2).

Backward (:func:`build_backward`): the paper's Algorithm 4, in the same loop order."""
from __future__ import annotations

from ..schedule import (BlockSoftmax, BufferSpec, CausalMask, Fill, Flash1Merge, Kernel, Load,
                        LogSumExp, Loop, MatMul, RecomputeProbs, RowDot, Schedule, SoftmaxBackward,
                        Store, TensorSpec)
from . import common

F32 = common.F32


def default_blocks(shape, sram_bytes: int, fits) -> tuple[int, int]:
    """The paper's choice Bc = M/(4d), Br = min(Bc, d) with M in elements (here
    floor(sram_bytes / (4·d·elem_bytes))), Bc lowered until the live tiles ``fits``."""
    d, n = shape.head_dim, shape.seq_len
    block_cols = max(1, sram_bytes // (4 * d * shape.elem_bytes))
    while block_cols > 1 and not fits(min(block_cols, d, n), min(block_cols, n)):
        block_cols -= 1
    return min(block_cols, d, n), min(block_cols, n)


def build(shape, block_rows, block_cols, sram_bytes, rows_per_warp=None) -> Schedule:
    e = shape.elem_bytes
    init = Kernel(
        "flash1_init", grid=("i",),
        body=(Fill("Oi", 0.0), Fill("li", 0.0), Fill("mi", float("-inf")),
              Store("Oi", "O", "i", "d"), Store("li", "l", "i", "1"), Store("mi", "m", "i", "1")),
        buffers=(BufferSpec("Oi", "i", "d", F32, "reg"), BufferSpec("li", "i", "1", F32, "reg"),
                 BufferSpec("mi", "i", "1", F32, "reg")),
        blocks={"i": block_rows}, row_var="i", warps=common.flash_warps(block_rows, rows_per_warp))
    mask = (CausalMask("S", "i", "j"),) if shape.causal else ()
    inner = (Load("Qi", "Q", "i", "d"), Load("Oi", "O", "i", "d"), Load("li", "l", "i", "1"),
             Load("mi", "m", "i", "1"),
             MatMul("S", "Qi", "Kj", transpose_b=True, scaled=True)) + mask + (
             BlockSoftmax("S", "P", "m_blk", "l_blk"),) + common.dropout_ops(
             shape, "P", "i", "j", fused=True) + (
             MatMul("PV", "P", "Vj"),
             Flash1Merge("Oi", "PV", "mi", "li", "m_blk", "l_blk"),
             Store("Oi", "O", "i", "d"), Store("li", "l", "i", "1"), Store("mi", "m", "i", "1"))
    fwd = Kernel(
        "flash1_fwd", grid=(),
        body=(Loop("j", (Load("Kj", "K", "j", "d"), Load("Vj", "V", "j", "d"),
                         Loop("i", inner, causal_skip=True))),),
        buffers=(BufferSpec("Kj", "j", "d", e), BufferSpec("Vj", "j", "d", e),
                 BufferSpec("Qi", "i", "d", e), BufferSpec("Oi", "i", "d", F32),
                 BufferSpec("li", "i", "1", F32), BufferSpec("mi", "i", "1", F32),
                 BufferSpec("S", "i", "j", F32, "reg"), BufferSpec("P", "i", "j", F32, "reg"),
                 BufferSpec("PV", "i", "d", F32, "reg"),
                 BufferSpec("m_blk", "i", "1", F32, "reg"),
                 BufferSpec("l_blk", "i", "1", F32, "reg")),
        blocks={"i": block_rows, "j": block_cols}, row_var="i", col_var="j",
        tensor_path="mma_sync", warps=common.flash_warps(block_rows, rows_per_warp),
        spans=common.FUSED_SPANS)
    tensors = tuple(common.qkv_tensors(shape)) + (
        common.output_tensor(shape, float32=True),
        TensorSpec("l", "N", "1", F32, "intermediate", float32=True),
        TensorSpec("m", "N", "1", F32, "intermediate", float32=True))
    return Schedule("flash1", shape, tensors, (init, fwd), block_rows, block_cols,
                    notes="Algorithm 1 loop order; O, l, m round-trip HBM in float32")


def build_backward(shape, block_rows, block_cols, sram_bytes, rows_per_warp=None) -> Schedule:
    """FlashAttention's backward, the paper's Algorithm 4 (no dropout), with O, l and m saved by
    the forward pass. A first kernel zeroes dQ in HBM (float32, like the forward's O). Then one
    CTA per (batch, head): the outer loop loads a K/V block and keeps dK_j, dV_j on chip; the
    inner loop visits every Q block (causal: those on or below the diagonal), loads Q_i, O_i,
    dO_i, dQ_i, l_i, m_i, recomputes S = scale·Q_i K_jᵀ and P, then dV_j += Pᵀ dO_i,
    dP = dO_i V_jᵀ, D_i = rowsum(dO_i ∘ O_i) (recomputed every K/V block, as the algorithm
    does), dS = P ∘ (dP − D_i), dQ_i += scale·dS K_j (written back to HBM), dK_j += scale·dSᵀ Q_i;
    dK_j and dV_j are written once. P is recomputed as exp(S − (m + log l)), the same as the
    algorithm's diag(l)⁻¹ exp(S − m) with one log per row instead of a divide per element.
    The algorithm's zeroing of dK and dV in HBM is left out: both are overwritten whole."""
    common.check_plain_backward(shape, "flash1")
    e = shape.elem_bytes
    warps = common.flash_warps(block_rows, rows_per_warp)
    init = Kernel(
        "flash1_bwd_init", grid=("i",),
        body=(Fill("dQi", 0.0), Store("dQi", "dQ", "i", "d")),
        buffers=(BufferSpec("dQi", "i", "d", F32, "reg"),),
        blocks={"i": block_rows}, row_var="i", warps=warps, phase="backward")
    mask = (CausalMask("S", "i", "j"),) if shape.causal else ()
    inner = (Load("Qi", "Q", "i", "d"), Load("Oi", "O", "i", "d"), Load("dOi", "dO", "i", "d"),
             Load("dQi", "dQ", "i", "d"), Load("li", "l", "i", "1"), Load("mi", "m", "i", "1"),
             MatMul("S", "Qi", "Kj", transpose_b=True, scaled=True)) + mask + (
             LogSumExp("Li", "mi", "li"), RecomputeProbs("P", "S", "Li"),
             MatMul("dV", "P", "dOi", transpose_a=True, accumulate=True),
             MatMul("dP", "dOi", "Vj", transpose_b=True),
             RowDot("Di", "dOi", "Oi"),
             SoftmaxBackward("dS", "P", "dP", "Di"),
             MatMul("dQi", "dS", "Kj", accumulate=True, scaled=True),
             Store("dQi", "dQ", "i", "d"),
             MatMul("dK", "dS", "Qi", transpose_a=True, accumulate=True, scaled=True))
    bwd = Kernel(
        "flash1_bwd", grid=(),
        body=(Loop("j", (Load("Kj", "K", "j", "d"), Load("Vj", "V", "j", "d"), Fill("dK", 0.0),
                         Fill("dV", 0.0), Loop("i", inner, causal_skip=True),
                         Store("dK", "dK", "j", "d"), Store("dV", "dV", "j", "d"))),),
        buffers=(BufferSpec("Kj", "j", "d", e), BufferSpec("Vj", "j", "d", e),
                 BufferSpec("Qi", "i", "d", e), BufferSpec("Oi", "i", "d", F32),
                 BufferSpec("dOi", "i", "d", e), BufferSpec("dQi", "i", "d", F32),
                 BufferSpec("li", "i", "1", F32), BufferSpec("mi", "i", "1", F32),
                 BufferSpec("Li", "i", "1", F32, "reg"), BufferSpec("Di", "i", "1", F32, "reg"),
                 BufferSpec("S", "i", "j", F32, "reg"), BufferSpec("P", "i", "j", F32, "reg"),
                 BufferSpec("dP", "i", "j", F32, "reg"), BufferSpec("dS", "i", "j", F32, "reg"),
                 BufferSpec("dK", "j", "d", F32, "reg"), BufferSpec("dV", "j", "d", F32, "reg")),
        blocks={"i": block_rows, "j": block_cols}, row_var="i", col_var="j",
        tensor_path="mma_sync", warps=warps, phase="backward")
    grads = common.grad_tensors(shape)
    tensors = tuple(common.qkv_tensors(shape)) + (
        common.output_tensor(shape, float32=True),
        TensorSpec("l", "N", "1", F32, "intermediate", float32=True),
        TensorSpec("m", "N", "1", F32, "intermediate", float32=True),
        grads[0], TensorSpec("dQ", "N", "d", F32, "output", float32=True), grads[2], grads[3])
    return Schedule("flash1", shape, tensors, (init, bwd), block_rows, block_cols,
                    notes="Algorithm 4 loop order; dQ round-trips HBM in float32")
