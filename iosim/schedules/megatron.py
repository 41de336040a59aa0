"""Megatron-LM style attention: the two GEMMs around one fused scale-mask-softmax kernel."""
from __future__ import annotations

from ..schedule import CausalMask, Scale, Schedule, Softmax
from . import common

default_blocks = common.gemm_default_blocks


def build(shape, block_rows, block_cols, sram_bytes) -> Schedule:
    rows = common.rowwise_rows(shape, sram_bytes)
    fused = ((Scale("X"),) + ((CausalMask("X", "i", "N"),) if shape.causal else ())
             + (Softmax("X", "X"),))
    kernels = (
        common.qk_gemm(shape, block_rows, block_cols, scaled=False),
        common.rowwise_kernel("scale_mask_softmax", shape, rows, "S", "P", fused),
        common.pv_gemm(shape, block_rows, block_cols),
    )
    tensors = tuple(common.qkv_tensors(shape)) + (
        common.score_tensor("S", shape), common.score_tensor("P", shape),
        common.output_tensor(shape))
    return Schedule("megatron", shape, tensors, kernels, block_rows, block_cols,
                    notes="fused scale-mask-softmax kernel; dropout left out")
