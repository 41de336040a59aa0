"""Standard attention (the FlashAttention paper's Algorithm 0) as the seed counts it:
kernel 1 reads Q, K and writes S = scale·QKᵀ; kernel 2 reads S and writes P = softmax(S)
(with the causal mask applied there); kernel 3 reads P, V and writes O = PV.

Backward (:func:`build_backward`): autograd's order with P saved, five kernels (four GEMMs and a
softmax-backward row kernel)."""
from __future__ import annotations

from ..schedule import CausalMask, Schedule, Softmax
from . import common

default_blocks = common.gemm_default_blocks


def build(shape, block_rows, block_cols, sram_bytes) -> Schedule:
    mask = common.padding_ops(shape, "X", "M") + (
        (CausalMask("X", "i", "M"),) if shape.causal else ())
    return common.gemm_rowwise_gemm(
        "standard", shape, block_rows, block_cols, sram_bytes, scaled_gemm=True,
        middle="softmax", middle_ops=mask + (Softmax("X", "X"),),
        notes="GEMM tiles Br x Bc; softmax kernel holds whole rows of S")


def build_backward(shape, block_rows, block_cols, sram_bytes) -> Schedule:
    """The backward pass as autograd runs it, P saved by the forward pass: five kernels,
    dV = Pᵀ dO (GEMM); dP = dO Vᵀ (GEMM); softmax backward, dS = P ∘ (dP − rowsum(P ∘ dP))
    (whole rows; rowsum(P ∘ dP) equals FlashAttention's rowsum(dO ∘ O)); dQ = scale·dS K and
    dK = scale·dSᵀ Q (GEMMs, the scale in their epilogue). The causal mask needs no backward
    kernel: P is 0 where it masked, so dS is too."""
    common.check_plain_backward(shape, "standard")
    return common.unfused_backward(
        "standard", shape, block_rows, block_cols, sram_bytes,
        middle=(common.softmax_backward_kernel("softmax_backward", shape, sram_bytes,
                                               "P", "dP", "dS"),),
        scores_grad="dS", scaled_gemms=True, score_grads=("dS",),
        notes="backward: GEMM tiles Br x Bc; softmax-backward kernel holds whole rows of P, dP")
