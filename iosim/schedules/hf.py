"""HuggingFace-style unfused attention: GEMM, then separate scale, mask (causal only) and
softmax kernels, each a full pass over the N x N scores, then the second GEMM.
Dropout is left out (it would add one more read and write of P).

Backward (:func:`build_backward`): its own, not standard's, because autograd runs hf's separate
mask and scale backward kernels as full N x N passes too."""
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


def build_backward(shape, block_rows, block_cols, sram_bytes) -> Schedule:
    """HuggingFace-style backward as autograd runs it, P saved: dV = Pᵀ dO and dP = dO Vᵀ
    (GEMMs); softmax backward (gradient of the softmax's input); if causal, the mask's
    backward (a full pass that zeroes the masked gradients: they are already 0, since P is);
    the scale's backward (a full pass multiplying by the scale); dQ = dS K and dK = dSᵀ Q
    (unscaled GEMMs). One or two more N x N passes than standard's backward."""
    rows_src = "dS_masked" if shape.causal else "dS_scaled"
    middle = [common.softmax_backward_kernel("softmax_backward", shape, sram_bytes, "P", "dP",
                                             rows_src)]
    grads = [rows_src]
    if shape.causal:
        middle.append(common.backward_rowwise_kernel(
            "mask_backward", shape, sram_bytes, "dS_masked", "dS_scaled",
            (CausalMask("X", "i", "N", value=0.0),)))
        grads.append("dS_scaled")
    middle.append(common.backward_rowwise_kernel("scale_backward", shape, sram_bytes,
                                                 "dS_scaled", "dS", (Scale("X"),)))
    grads.append("dS")
    return common.unfused_backward(
        "hf", shape, block_rows, block_cols, sram_bytes, middle=tuple(middle),
        scores_grad="dS", scaled_gemms=False, score_grads=tuple(grads),
        notes="backward: separate softmax, mask and scale backward kernels; dropout left out")
