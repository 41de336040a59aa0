"""Float64 attention reference and the error rule (pure NumPy; the same code runs on CuPy arrays via ``xp``).

Error rule: a kernel passes when every output element is finite and
    rel_error = ||O - ref|| / ||ref||  <=  2 * rel_error_fp16_reference + 1e-4,
where rel_error_fp16_reference is the relative error, against the same float64 reference, of a plain float16
matmul-softmax-matmul implementation on the same inputs.
"""
from __future__ import annotations

import math

import numpy as np

ERROR_FACTOR = 2.0
ERROR_SLACK = 1e-4


def softmax_rows(s, keep=None, xp=np):
    """The stable row softmax of scores ``s`` (set to -inf where ``keep`` is False, when
    given), in ``s``'s dtype: subtract each row's max, exponentiate, divide by the row sum.
    Works in place on ``s`` (pass a temporary; N x N in float64 is large) and returns it."""
    if keep is not None:
        s = xp.where(keep, s, -xp.inf)
    s -= s.max(axis=1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=1, keepdims=True)
    return s


def attention_reference(q, k, v, causal: bool, scale: float | None = None, xp=np):
    """softmax(scale * q k^T [causal mask]) v in float64, computed one (b, h) slice at a time.

    q, k, v: arrays (B, H, N, d) of any float dtype (NumPy or, with ``xp=cupy``, CuPy). Returns float64.
    """
    B, H, N, d = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out = xp.empty((B, H, N, d), dtype=xp.float64)
    if causal:
        keep = xp.tril(xp.ones((N, N), dtype=bool))
    for b in range(B):
        for h in range(H):
            qq = q[b, h].astype(xp.float64)
            kk = k[b, h].astype(xp.float64)
            vv = v[b, h].astype(xp.float64)
            p = softmax_rows((qq @ kk.T) * scale, keep if causal else None, xp)
            out[b, h] = p @ vv
            del p
    return out


def attention_naive_loop(q, k, v, causal: bool, scale: float | None = None):
    """Scalar-loop reference (slow; tests only): one query row at a time with Python floats."""
    B, H, N, d = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out = np.zeros((B, H, N, d), dtype=np.float64)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                jmax = i + 1 if causal else N
                scores = [scale * sum(float(q[b, h, i, t]) * float(k[b, h, j, t]) for t in range(d))
                          for j in range(jmax)]
                m = max(scores)
                w = [math.exp(s - m) for s in scores]
                z = sum(w)
                for t in range(d):
                    out[b, h, i, t] = sum(w[j] * float(v[b, h, j, t]) for j in range(jmax)) / z
    return out


def attention_fp16_plain(q, k, v, causal: bool, scale: float | None = None, xp=np):
    """A plain float16 matmul-softmax-matmul (S and P rounded to fp16, fp32 accumulation), as frameworks do."""
    B, H, N, d = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out = xp.empty((B, H, N, d), dtype=xp.float16)
    if causal:
        keep = xp.tril(xp.ones((N, N), dtype=bool))
    for b in range(B):
        for h in range(H):
            s = (q[b, h].astype(xp.float32) @ k[b, h].astype(xp.float32).T).astype(xp.float16)
            s = (s.astype(xp.float32) * scale).astype(xp.float16).astype(xp.float32)
            p = softmax_rows(s, keep if causal else None, xp).astype(xp.float16)
            out[b, h] = (p.astype(xp.float32) @ v[b, h].astype(xp.float32)).astype(xp.float16)
    return out


def rel_error(out, ref, xp=np) -> float:
    """||out - ref|| / ||ref|| in float64; +inf when ``out`` holds any non-finite value."""
    o = out.astype(xp.float64)
    if not bool(xp.isfinite(o).all()):
        return math.inf
    num = float(xp.sqrt(xp.sum((o - ref) ** 2)))
    den = float(xp.sqrt(xp.sum(ref ** 2)))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def error_bound(rel_error_fp16_reference: float) -> float:
    return ERROR_FACTOR * float(rel_error_fp16_reference) + ERROR_SLACK


def check_error(rel_err: float, rel_error_fp16_reference: float) -> dict:
    """The pass/fail record of one kernel check (NaN and inf fail)."""
    bound = error_bound(rel_error_fp16_reference)
    ok = (rel_err is not None and math.isfinite(rel_err) and math.isfinite(bound) and rel_err <= bound)
    return {"rel_error": (float(rel_err) if rel_err is not None and math.isfinite(rel_err) else None),
            "rel_error_fp16_reference": float(rel_error_fp16_reference),
            "error_bound": float(bound), "passed": bool(ok)}
