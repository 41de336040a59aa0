"""Reference attention in float64: softmax(Q Kᵀ · scale) V, the stable way."""
from __future__ import annotations

import numpy as np


def reference_attention(q, k, v, *, causal: bool = False, scale: float | None = None,
                        return_stats: bool = False):
    """float64 attention over the last two axes. With ``return_stats`` also the row max and the
    row sum of exp(s - max) of the scaled (and masked) scores."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    if causal:
        n = s.shape[-1]
        s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
    row_max = s.max(axis=-1, keepdims=True)
    p = np.exp(s - row_max)
    row_sum = p.sum(axis=-1, keepdims=True)
    out = np.matmul(p / row_sum, v)
    if return_stats:
        return out, row_max[..., 0], row_sum[..., 0]
    return out


def reference_attention_backward(q, k, v, d_out, *, causal: bool = False,
                                 scale: float | None = None):
    """float64 gradients (dQ, dK, dV) of attention over the last two axes, given the output's
    gradient ``d_out``: with S = scale·QKᵀ (masked), P = softmax(S), O = PV:
    dV = Pᵀ dO; dP = dO Vᵀ; dS = P ∘ (dP − rowsum(dO ∘ O)); dQ = scale·dS K; dK = scale·dSᵀ Q."""
    q, k, v, d_out = (np.asarray(x, dtype=np.float64) for x in (q, k, v, d_out))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    if causal:
        n = s.shape[-1]
        s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = np.matmul(p, v)
    d_v = np.matmul(np.swapaxes(p, -1, -2), d_out)
    d_p = np.matmul(d_out, np.swapaxes(v, -1, -2))
    d_s = p * (d_p - (d_out * out).sum(axis=-1, keepdims=True))
    d_q = np.matmul(d_s, k) * scale
    d_k = np.matmul(np.swapaxes(d_s, -1, -2), q) * scale
    return d_q, d_k, d_v
