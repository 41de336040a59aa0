"""HuggingFace-style unfused attention: GEMM, then separate scale, mask (causal or key padding)
and softmax kernels, each a full pass over the N x N_kv scores, [dropout,] then the second GEMM.

Backward (:func:`build_backward`): its own, not standard's, because autograd runs hf's separate
mask and scale backward kernels as full N x N passes too."""
from __future__ import annotations

from ..schedule import CausalMask, Scale, Softmax
from . import common

default_blocks = common.gemm_default_blocks


def build(shape, block_rows, block_cols, sram_bytes) -> Schedule:
    rows = common.rowwise_rows(shape, sram_bytes)
    kernels = [common.qk_gemm(shape, block_rows, block_cols, scaled=False),
               common.rowwise_kernel("scale", shape, rows, "S", "S_scaled", (Scale("X"),))]
    softmax_src = "S_scaled"
    tensors = list(common.qkv_tensors(shape)) + [common.score_tensor("S", shape),
                                                 common.score_tensor("S_scaled", shape)]
    mask = common.padding_ops(shape, "X", "M") + (
        (CausalMask("X", "i", "M"),) if shape.causal else ())
    if mask:
        kernels.append(common.rowwise_kernel("mask", shape, rows, "S_scaled", "S_masked", mask))
        tensors.append(common.score_tensor("S_masked", shape))
        softmax_src = "S_masked"
    kernels.append(common.rowwise_kernel("softmax", shape, rows, softmax_src, "P",
                                         (Softmax("X", "X"),)))
    return common.finish_unfused("hf", shape, block_rows, block_cols, rows, tuple(kernels),
                                 tuple(tensors[3:]), notes="separate scale, mask and softmax "
                                 "kernels; dropout, if any, a kernel of its own")


def build_backward(shape, block_rows, block_cols, sram_bytes) -> Schedule:
    """HuggingFace-style backward as autograd runs it, P saved: dV = Pᵀ dO and dP = dO Vᵀ
    (GEMMs); softmax backward (gradient of the softmax's input); if causal, the mask's
    backward (a full pass that zeroes the masked gradients: they are already 0, since P is);
    the scale's backward (a full pass multiplying by the scale); dQ = dS K and dK = dSᵀ Q
    (unscaled GEMMs). One or two more N x N passes than standard's backward."""
    common.check_plain_backward(shape, "hf")
    rows_src = "dS_masked" if shape.causal else "dS_scaled"
    middle = [common.softmax_backward_kernel("softmax_backward", shape, sram_bytes, "P", "dP",
                                             rows_src)]
    grads = [rows_src]
    if shape.causal:
        middle.append(common.backward_rowwise_kernel(
            "mask_backward", shape, sram_bytes, "dS_masked", "dS_scaled",
            (CausalMask("X", "i", "M", value=0.0),)))
        grads.append("dS_scaled")
    middle.append(common.backward_rowwise_kernel("scale_backward", shape, sram_bytes,
                                                 "dS_scaled", "dS", (Scale("X"),)))
    grads.append("dS")
    return common.unfused_backward(
        "hf", shape, block_rows, block_cols, sram_bytes, middle=tuple(middle),
        scores_grad="dS", scaled_gemms=False, score_grads=tuple(grads),
        notes="backward: separate softmax, mask and scale backward kernels; dropout left out")
