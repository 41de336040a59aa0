"""Megatron-LM style attention: the two GEMMs around one fused scale-mask-softmax kernel.

Backward (:func:`build_backward`): standard's kernels, with the fused kernel's backward applying
the scale (so the dQ and dK GEMMs are unscaled): the same bytes and GEMM FLOPs as standard's."""
from __future__ import annotations

from ..schedule import CausalMask, Scale, Schedule, Softmax
from . import common

default_blocks = common.gemm_default_blocks


def build(shape, block_rows, block_cols, sram_bytes) -> Schedule:
    mask = common.padding_ops(shape, "X", "M") + (
        (CausalMask("X", "i", "M"),) if shape.causal else ())
    return common.gemm_rowwise_gemm(
        "megatron", shape, block_rows, block_cols, sram_bytes, scaled_gemm=False,
        middle="scale_mask_softmax", middle_ops=(Scale("X"),) + mask + (Softmax("X", "X"),),
        notes="fused scale-mask-softmax kernel; dropout, if any, a kernel of its own")


def build_backward(shape, block_rows, block_cols, sram_bytes) -> Schedule:
    """Megatron's backward, P saved: as standard's (dV and dP GEMMs; one row-wise kernel;
    dQ and dK GEMMs), except that the fused scale-mask-softmax backward kernel applies the
    scale (dS = scale·P ∘ (dP − rowsum(P ∘ dP)), the gradient of the unscaled QKᵀ), so the
    dQ and dK GEMMs are unscaled. Same HBM traffic and GEMM FLOPs as standard's backward."""
    common.check_plain_backward(shape, "megatron")
    return common.unfused_backward(
        "megatron", shape, block_rows, block_cols, sram_bytes,
        middle=(common.softmax_backward_kernel("scale_mask_softmax_backward", shape,
                                               sram_bytes, "P", "dP", "dS",
                                               extra_ops=(Scale("G"),)),),
        scores_grad="dS", scaled_gemms=False, score_grads=("dS",),
        notes="backward: fused scale-mask-softmax backward kernel; dropout left out")
