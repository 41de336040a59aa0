"""Standard attention (the FlashAttention paper's Algorithm 0) as the seed counts it:
kernel 1 reads Q, K and writes S = scale·QKᵀ; kernel 2 reads S and writes P = softmax(S)
(with the causal mask applied there); kernel 3 reads P, V and writes O = PV."""
from __future__ import annotations

from ..schedule import CausalMask, Schedule, Softmax
from . import common

default_blocks = common.gemm_default_blocks


def build(shape, block_rows, block_cols, sram_bytes) -> Schedule:
    mask = (CausalMask("X", "i", "N"),) if shape.causal else ()
    return common.gemm_rowwise_gemm(
        "standard", shape, block_rows, block_cols, sram_bytes, scaled_gemm=True,
        middle="softmax", middle_ops=mask + (Softmax("X", "X"),),
        notes="GEMM tiles Br x Bc; softmax kernel holds whole rows of S")
