"""HuggingFace-style unfused attention: GEMM, then separate scale, mask (causal only) and
softmax kernels, each a full pass over the N x N scores, then the second GEMM.
Dropout is left out (it would add one more read and write of P)."""
from __future__ import annotations

from ..schedule import CausalMask, Scale, Schedule, Softmax
from . import common

default_blocks = common.gemm_default_blocks


def build(shape, block_rows, block_cols, sram_bytes) -> Schedule:
    rows = common.rowwise_rows(shape, sram_bytes)
    kernels = [common.qk_gemm(shape, block_rows, block_cols, scaled=False),
               common.rowwise_kernel("scale", shape, rows, "S", "S_scaled", (Scale("X"),))]
    softmax_src = "S_scaled"
    tensors = list(common.qkv_tensors(shape)) + [common.score_tensor("S", shape),
                                                 common.score_tensor("S_scaled", shape)]
    if shape.causal:
        kernels.append(common.rowwise_kernel("mask", shape, rows, "S_scaled", "S_masked",
                                             (CausalMask("X", "i", "N"),)))
        tensors.append(common.score_tensor("S_masked", shape))
        softmax_src = "S_masked"
    kernels += [common.rowwise_kernel("softmax", shape, rows, softmax_src, "P",
                                      (Softmax("X", "X"),)),
                common.pv_gemm(shape, block_rows, block_cols)]
    tensors += [common.score_tensor("P", shape), common.output_tensor(shape)]
    return Schedule("hf", shape, tuple(tensors), tuple(kernels), block_rows, block_cols,
                    notes="separate scale, mask and softmax kernels; dropout left out")
