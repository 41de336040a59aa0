"""What one op of a CTA program asks of an SM, in hardware-independent units.

The timing model (:mod:`iosim.timing`) turns these into cycles with a hardware spec. Per op,
for the whole CTA:

* ``mma``: tensor-core instructions (m16n8k16: 2·16·8·16 FLOP each);
* ``mma_chain``: the longest chain of dependent MMAs one warp runs (k / 16 accumulations into
  the same output fragment);
* ``smem_operand_bytes``: bytes the CTA's warps read from shared memory as MMA operands. A
  ``mma_sync`` kernel's warps split the rows of the output: each warp reads its own rows of A
  and **all** of B, so B is read once per warp. A library GEMM's warps tile the output in two
  dimensions (``GEMM_WARP_GRID``), so each operand is read by one row or column of warps. A
  ``wgmma`` kernel's consumer warpgroups (64 rows each) take their operands from shared memory
  themselves, once per warpgroup: each reads its own rows of A and all of B (no per-warp
  ldmatrix re-reads; an operand in registers, such as P, is not read at all);
* ``fp32``: warp instructions on the FP32 pipe (one per element per scalar FLOP);
* ``sfu``: warp instructions on the special-function unit (exp, log);
* ``depth``: dependent FP32 steps one warp waits through (a row reduction over n columns is
  log2(n) steps; an elementwise op is 1).
"""
from __future__ import annotations

import math

from . import schedule as sch

WARP_SIZE = 32
MMA_M, MMA_N, MMA_K = 16, 8, 16
MMA_FLOPS = 2 * MMA_M * MMA_N * MMA_K
#: Bytes one warp's ldmatrix.x4 moves from shared memory into registers: one operand fragment.
FRAGMENT_BYTES = 512
#: Warps of a library GEMM CTA tile its output as rows x columns of warps.
GEMM_WARP_GRID = (2, 4)

FIELDS = ("mma", "mma_chain", "smem_operand_bytes", "fp32", "sfu", "depth")

# ops whose rows are reduced (max and sum over the columns of the tile)
_ROW_REDUCTIONS = (sch.Softmax, sch.OnlineSoftmax, sch.BlockSoftmax, sch.RowDot)


def _reduced_buffer(op) -> str:
    """The buffer whose rows a row reduction reduces."""
    for attribute in ("scores", "src", "a"):
        if hasattr(op, attribute):
            return getattr(op, attribute)
    raise TypeError(f"{type(op).__name__} names no reduced buffer")  # pragma: no cover


def _buffer_bytes(buf, dims) -> int:
    return dims[buf.rows] * dims[buf.cols] * buf.elem_bytes


def op_work(op, dims: dict, buffers: dict, kernel) -> tuple:
    """The op's demands as a tuple in the order of :data:`FIELDS` (see the module docstring)."""
    flops_tensor, flops_scalar = op.flops(dims, buffers)
    special = op.special_ops(dims, buffers) if hasattr(op, "special_ops") else 0
    mma = chain = smem = 0
    if isinstance(op, sch.MatMul):
        a, b = buffers[op.a], buffers[op.b]
        mma = math.ceil(flops_tensor / MMA_FLOPS)
        chain = math.ceil(op.extents(dims, buffers)[2] / MMA_K)  # the contraction length k
        a_bytes = _buffer_bytes(a, dims) if a.space == "smem" else 0
        b_bytes = _buffer_bytes(b, dims) if b.space == "smem" else 0
        if kernel.tensor_path == "mma_sync" and kernel.warp_split == "keys":
            # each warp owns a slice of the keys (the column variable): an operand spanning
            # them is read once in all, the other by every warp; a contraction over the keys
            # is split too, each warp's chain a share of it
            keys = kernel.col_var
            a_split = keys in (a.rows, a.cols)
            b_split = keys in (b.rows, b.cols)
            smem = (a_bytes if a_split else kernel.warps * a_bytes) \
                + (b_bytes if b_split else kernel.warps * b_bytes)
            contraction = a.rows if op.transpose_a else a.cols
            if contraction == keys:
                chain = math.ceil(chain / kernel.warps)
        elif kernel.tensor_path == "mma_sync":
            smem = a_bytes + kernel.warps * b_bytes
        elif kernel.tensor_path == "wgmma":
            smem = a_bytes + kernel.consumer_warpgroups * b_bytes
        else:
            warp_rows, warp_cols = GEMM_WARP_GRID
            smem = a_bytes * warp_cols + b_bytes * warp_rows
    fp32 = math.ceil((flops_scalar - special) / WARP_SIZE)
    sfu = math.ceil(special / WARP_SIZE)
    depth = 0
    if flops_scalar:
        depth = 1
        if isinstance(op, _ROW_REDUCTIONS):
            cols = dims[buffers[_reduced_buffer(op)].cols]
            depth = 2 * max(1, math.ceil(math.log2(max(cols, 2)))) + 2
    return mma, chain, smem, fp32, sfu, depth
