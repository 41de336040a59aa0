"""Reference attention in float64: softmax(Q Kᵀ · scale) V, the stable way; with grouped K/V
heads, a KV cache longer than the queries (causal mask aligned at the end), a key-padding mask
and dropout. Also the counter-based dropout mask every schedule regenerates."""
from __future__ import annotations

import numpy as np

_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def dropout_keep(seed: int, head, row, col, p: float) -> np.ndarray:
    """Whether dropout keeps the attention weight of (query head, query row, key column): a
    counter-based draw (the SplitMix64 finaliser of the element's coordinates and ``seed``),
    so any tile of it can be regenerated anywhere, as fused kernels do with Philox. Arrays
    broadcast; each element is kept with probability 1 − p."""
    with np.errstate(over="ignore"):
        x = ((np.asarray(head, dtype=np.uint64) << np.uint64(42))
             ^ (np.asarray(row, dtype=np.uint64) << np.uint64(21))
             ^ np.asarray(col, dtype=np.uint64))
        x = x + np.uint64(seed) * _GOLDEN + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
        x = x ^ (x >> np.uint64(31))
    uniform = (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return uniform >= p


def _masked_scores(q, k, scale, causal, kv_lens, group):
    """scale·QKᵀ over (B, H, N, N_kv) (or the last two axes), K shared by groups of query
    heads, with the causal mask aligned at the end and the key-padding mask applied."""
    if group > 1:
        k = np.repeat(k, group, axis=-3)
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    n, m = s.shape[-2:]
    if causal:
        visible = np.arange(m)[None, :] <= np.arange(n)[:, None] + (m - n)
        s = np.where(visible, s, -np.inf)
    if kv_lens is not None:
        lens = np.asarray(kv_lens).reshape((-1,) + (1,) * (s.ndim - 1))
        s = np.where(np.arange(m) < lens, s, -np.inf)
    return s


def reference_attention(q, k, v, *, causal: bool = False, scale: float | None = None,
                        return_stats: bool = False, kv_lens=None, dropout: float = 0.0,
                        seed: int = 0):
    """float64 attention over the last two axes. q is (..., N, d); k and v (..., N_kv, d), with
    H / H_kv query heads per K/V head when given as (B, H, N, d) and (B, H_kv, N_kv, d).
    ``kv_lens``: valid keys per batch element (key padding); ``dropout``: the probability of
    zeroing a weight, with the mask of :func:`dropout_keep` (``seed``). With ``return_stats``
    also the row max and the row sum of exp(s - max) of the scaled (and masked) scores."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[-3] // k.shape[-3] if q.ndim >= 3 else 1
    s = _masked_scores(q, k, scale, causal, kv_lens, group)
    row_max = s.max(axis=-1, keepdims=True)
    p = np.exp(s - row_max)
    row_sum = p.sum(axis=-1, keepdims=True)
    p = p / row_sum
    if dropout:
        heads = np.arange(int(np.prod(q.shape[:-2]))).reshape(q.shape[:-2] + (1, 1))
        keep = dropout_keep(seed, heads, np.arange(s.shape[-2])[:, None],
                            np.arange(s.shape[-1])[None, :], dropout)
        p = np.where(keep, p / (1.0 - dropout), 0.0)
    out = np.matmul(p, np.repeat(v, group, axis=-3) if group > 1 else v)
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
    s = _masked_scores(q, k, scale, causal, kv_lens=None, group=1)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = np.matmul(p, v)
    d_v = np.matmul(np.swapaxes(p, -1, -2), d_out)
    d_p = np.matmul(d_out, np.swapaxes(v, -1, -2))
    d_s = p * (d_p - (d_out * out).sum(axis=-1, keepdims=True))
    d_q = np.matmul(d_s, k) * scale
    d_k = np.matmul(np.swapaxes(d_s, -1, -2), q) * scale
    return d_q, d_k, d_v
