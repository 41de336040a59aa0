"""Standard attention (the FlashAttention paper's Algorithm 0) as the seed counts it:
kernel 1 reads Q, K and writes S = scale·QKᵀ; kernel 2 reads S and writes P = softmax(S)
(with the causal mask applied there); kernel 3 reads P, V and writes O = PV."""
from __future__ import annotations

from ..schedule import CausalMask, Schedule, Softmax
from . import common

default_blocks = common.gemm_default_blocks


def build(shape, block_rows, block_cols, sram_bytes) -> Schedule:
    rows = common.rowwise_rows(shape, sram_bytes)
    softmax_ops = ((CausalMask("X", "i", "N"),) if shape.causal else ()) + (Softmax("X", "X"),)
    kernels = (
        common.qk_gemm(shape, block_rows, block_cols, scaled=True),
        common.rowwise_kernel("softmax", shape, rows, "S", "P", softmax_ops),
        common.pv_gemm(shape, block_rows, block_cols),
    )
    tensors = tuple(common.qkv_tensors(shape)) + (
        common.score_tensor("S", shape), common.score_tensor("P", shape),
        common.output_tensor(shape))
    return Schedule("standard", shape, tensors, kernels, block_rows, block_cols,
                    notes="GEMM tiles Br x Bc; softmax kernel holds whole rows of S")
