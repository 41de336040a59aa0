"""Megatron-LM style attention: the two GEMMs around one fused scale-mask-softmax kernel."""
from __future__ import annotations

from ..schedule import CausalMask, Scale, Schedule, Softmax
from . import common

default_blocks = common.gemm_default_blocks


def build(shape, block_rows, block_cols, sram_bytes) -> Schedule:
    mask = (CausalMask("X", "i", "N"),) if shape.causal else ()
    return common.gemm_rowwise_gemm(
        "megatron", shape, block_rows, block_cols, sram_bytes, scaled_gemm=False,
        middle="scale_mask_softmax", middle_ops=(Scale("X"),) + mask + (Softmax("X", "X"),),
        notes="fused scale-mask-softmax kernel; dropout left out")
