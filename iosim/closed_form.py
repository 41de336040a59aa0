"""Closed-form HBM traffic of each schedule under the two-level model, as a cross-check.

These are the FlashAttention paper's counts (Algorithm 0's eight accesses; Theorem 2's
Θ(N²d²/M) for FlashAttention) written out exactly for the tilings iosim uses, for non-causal
shapes whose block sizes divide N. The engine never uses them: the tests check that the engine's
two-level counts equal them, kernel by kernel and tensor by tensor.

Each function returns ``{kernel name: {"reads": {tensor: bytes}, "writes": {tensor: bytes}}}``.
"""
from __future__ import annotations

from .errors import IosimError

F32 = 4


def _check(shape, block_rows: int, block_cols: int) -> tuple[int, int]:
    n = shape.seq_len
    if shape.causal or n % block_rows or n % block_cols:
        raise IosimError("closed forms cover non-causal shapes whose block sizes divide N; got "
                         f"N={n}, Br={block_rows}, Bc={block_cols}, causal={shape.causal}")
    return n // block_rows, n // block_cols


def _gemms(shape, block_rows, block_cols):
    t_r, t_c = _check(shape, block_rows, block_cols)
    n, d, e, bh = shape.seq_len, shape.head_dim, shape.elem_bytes, shape.batch_heads
    qkv = n * d * e * bh
    scores = n * n * e * bh
    return {
        # every (i, j) output tile loads Q_i and K_j: Q is read Tc times, K Tr times
        "qk_gemm": {"reads": {"Q": t_c * qkv, "K": t_r * qkv}, "writes": {"S": scores}},
        # every row block of O streams all of P's row block and all of V
        "pv_gemm": {"reads": {"P": scores, "V": t_r * qkv}, "writes": {"O": qkv}},
    }, scores


def standard(shape, block_rows, block_cols) -> dict:
    """Algorithm 0: read Q, K, write S; read S, write P; read P, V, write O."""
    gemms, scores = _gemms(shape, block_rows, block_cols)
    return {"qk_gemm": gemms["qk_gemm"],
            "softmax": {"reads": {"S": scores}, "writes": {"P": scores}},
            "pv_gemm": gemms["pv_gemm"]}


def megatron(shape, block_rows, block_cols) -> dict:
    gemms, scores = _gemms(shape, block_rows, block_cols)
    return {"qk_gemm": gemms["qk_gemm"],
            "scale_mask_softmax": {"reads": {"S": scores}, "writes": {"P": scores}},
            "pv_gemm": gemms["pv_gemm"]}


def hf(shape, block_rows, block_cols) -> dict:
    gemms, scores = _gemms(shape, block_rows, block_cols)
    return {"qk_gemm": gemms["qk_gemm"],
            "scale": {"reads": {"S": scores}, "writes": {"S_scaled": scores}},
            "softmax": {"reads": {"S_scaled": scores}, "writes": {"P": scores}},
            "pv_gemm": gemms["pv_gemm"]}


def flash1(shape, block_rows, block_cols) -> dict:
    """Algorithm 1: K, V read once; Q, O, l, m read and O, l, m written once per K/V block
    (Tc = N/Bc times) — with Bc = M/4d that is Θ(N²d²/M)."""
    _, t_c = _check(shape, block_rows, block_cols)
    n, d, e, bh = shape.seq_len, shape.head_dim, shape.elem_bytes, shape.batch_heads
    out, stat = n * d * F32 * bh, n * F32 * bh
    return {
        "flash1_init": {"reads": {}, "writes": {"O": out, "l": stat, "m": stat}},
        "flash1_fwd": {
            "reads": {"K": n * d * e * bh, "V": n * d * e * bh, "Q": t_c * n * d * e * bh,
                      "O": t_c * out, "l": t_c * stat, "m": t_c * stat},
            "writes": {"O": t_c * out, "l": t_c * stat, "m": t_c * stat}},
    }


def flash2(shape, block_rows, block_cols) -> dict:
    """FlashAttention-2: Q read once, K and V once per Q block (Tr = N/Br times), O and the
    log-sum-exp written once."""
    t_r, _ = _check(shape, block_rows, block_cols)
    n, d, e, bh = shape.seq_len, shape.head_dim, shape.elem_bytes, shape.batch_heads
    qkv = n * d * e * bh
    return {"flash2_fwd": {"reads": {"Q": qkv, "K": t_r * qkv, "V": t_r * qkv},
                           "writes": {"O": qkv, "L": n * F32 * bh}}}


CLOSED_FORMS = {"standard": standard, "hf": hf, "megatron": megatron, "flash1": flash1,
                "flash2": flash2}


def hbm_traffic(algorithm: str, shape, block_rows: int, block_cols: int) -> dict:
    """Closed-form per-kernel, per-tensor HBM bytes of ``algorithm`` (two-level model)."""
    try:
        form = CLOSED_FORMS[algorithm]
    except KeyError:
        raise IosimError(f"no closed form for {algorithm!r}; have: "
                         f"{', '.join(CLOSED_FORMS)}") from None
    return form(shape, block_rows, block_cols)
