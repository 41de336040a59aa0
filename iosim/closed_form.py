"""Closed-form HBM traffic of each schedule under the two-level model, as a cross-check.

These are the FlashAttention paper's counts (Algorithm 0's eight accesses; Theorem 2's
Θ(N²d²/M) for FlashAttention) written out exactly for the tilings iosim uses, for non-causal
shapes whose block sizes divide N. The engine never uses them: the tests check that the engine's
two-level counts equal them, kernel by kernel and tensor by tensor.

The backward's forms (:func:`backward_hbm_traffic`: FlashAttention-2's backward, the paper's
Algorithm 4 with Theorem 5's Θ(N²d²/M), and the unfused pipelines' autograd order) cover every
shape: any N, causal or not.

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
    log-sum-exp written once. With grouped K/V heads or a KV cache (N_kv keys), every query
    head still reads its K/V head's N_kv x d once per Q block (the two-level model has no
    L2 to share them across the group)."""
    t_r = _check_kv(shape, block_rows, block_cols, shape.seq_len)
    n, d, e, bh = shape.seq_len, shape.head_dim, shape.elem_bytes, shape.batch_heads
    qo = n * d * e * bh
    kv = shape.kv_seq_len * d * e * bh
    return {"flash2_fwd": {"reads": {"Q": qo, "K": t_r * kv, "V": t_r * kv},
                           "writes": {"O": qo, "L": n * F32 * bh}}}


def _check_kv(shape, block_rows: int, block_cols: int, rows: int) -> int:
    """Row blocks of ``rows`` query rows, for a non-causal, unpadded shape whose blocks
    divide the query rows and the keys."""
    if shape.causal or shape.kv_lens is not None or rows % block_rows \
            or shape.kv_seq_len % block_cols:
        raise IosimError("closed forms cover non-causal, unpadded shapes whose block sizes "
                         f"divide N (the query rows) and N_kv; got rows={rows}, "
                         f"N_kv={shape.kv_seq_len}, Br={block_rows}, Bc={block_cols}, "
                         f"causal={shape.causal}")
    return rows // block_rows


def flash_decoding(shape, block_rows, block_cols, num_splits=None, sm_count=None) -> dict:
    """Split-KV: per K/V head, each of the Tr = G/Br row blocks (G = group_size · N query
    rows) and S splits is a CTA that reads its Q rows and its split's K/V blocks: Q is read S
    times, K and V Tr times; the partial output (float32, G x d) and log-sum-exp are written
    once per split and read once by the combine kernel, which writes O and L. One split:
    O and L are written directly, no combine. ``num_splits`` None: the schedule's default
    (the heuristic for ``sm_count`` SMs, default the h100-measured preset's)."""
    from .hardware import load_hardware
    from .schedules.flash_decoding import default_num_splits, split_size

    rows = shape.group_size * shape.seq_len
    t_r = _check_kv(shape, block_rows, block_cols, rows)
    if num_splits is None:
        sm_count = load_hardware("h100-measured").sm_count if sm_count is None else sm_count
        num_splits = default_num_splits(shape, block_rows, block_cols, sm_count)
    _, splits = split_size(shape, block_cols, num_splits)
    d, e, bkv = shape.head_dim, shape.elem_bytes, shape.batch_kv_heads
    q = rows * d * e * bkv
    kv = shape.kv_seq_len * d * e * bkv
    lse = rows * F32 * bkv
    if splits == 1:
        return {"flash_decoding_split": {"reads": {"Q": q, "K": t_r * kv, "V": t_r * kv},
                                         "writes": {"O": q, "L": lse}}}
    part, part_lse = splits * rows * d * F32 * bkv, splits * lse
    return {"flash_decoding_split": {"reads": {"Q": splits * q, "K": t_r * kv, "V": t_r * kv},
                                     "writes": {"Opart": part, "Lpart": part_lse}},
            "flash_decoding_combine": {"reads": {"Opart": part, "Lpart": part_lse},
                                       "writes": {"O": q, "L": lse}}}


CLOSED_FORMS = {"standard": standard, "hf": hf, "megatron": megatron, "flash1": flash1,
                "flash2": flash2}


def flash3(shape, block_rows, block_cols) -> dict:
    """FlashAttention-3's forward moves what FlashAttention-2's does (the same loop order; its
    producer copies the same tiles): Q once, K and V once per Q block, O and L written once."""
    return {"flash3_fwd": flash2(shape, block_rows, block_cols)["flash2_fwd"]}


CLOSED_FORMS["flash3"] = flash3
CLOSED_FORMS["flash_decoding"] = flash_decoding


def hbm_traffic(algorithm: str, shape, block_rows: int, block_cols: int, **options) -> dict:
    """Closed-form per-kernel, per-tensor HBM bytes of ``algorithm`` (two-level model);
    ``options``: flash_decoding's ``num_splits``."""
    try:
        form = CLOSED_FORMS[algorithm]
    except KeyError:
        raise IosimError(f"no closed form for {algorithm!r}; have: "
                         f"{', '.join(CLOSED_FORMS)}") from None
    return form(shape, block_rows, block_cols, **options)


# ---- the backward pass ------------------------------------------------------------------------
#
# Unlike the forward's forms above, these cover every shape: N need not be a multiple of the
# blocks, and causal shapes too (the fused kernels skip the K/V-block x Q-block tiles above the
# diagonal; the unfused GEMMs and row-wise kernels move all N² of every score tensor either way).
# They count the backward's kernels alone (what the forward saved, O, L or P, is read back).


def _blocks(shape, block_rows: int, block_cols: int) -> tuple[int, int]:
    n = shape.seq_len
    if block_rows < 1 or block_cols < 1:
        raise IosimError(f"block sizes must be positive; got Br={block_rows}, Bc={block_cols}")
    block_rows, block_cols = min(block_rows, n), min(block_cols, n)
    return block_rows, block_cols


def visited_q_rows(n: int, block_rows: int, block_cols: int, causal: bool) -> int:
    """Rows of Q a fused backward's K/V loop visits, summed over its Tc = ⌈N/Bc⌉ K/V blocks:
    every K/V block visits all N rows, Tc·N in all; causal, the K/V block j (first key j·Bc)
    skips the Q blocks that end before it, the first ⌊j·Bc/Br⌋ of them, so it visits
    N − Br·⌊j·Bc/Br⌋ rows (Tc·N − Bc·Tc(Tc−1)/2 when Br divides Bc)."""
    t_c = -(-n // block_cols)
    if not causal:
        return t_c * n
    return sum(n - block_rows * (j * block_cols // block_rows) for j in range(t_c))


def flash2_backward(shape, block_rows, block_cols) -> dict:
    """FlashAttention-2's backward: D = rowsum(dO ∘ O) reads O, dO once and writes D (and
    zeroes the float32 dQ accumulator); the K/V-block kernel reads K, V once and writes dK, dV
    once, and per visited (Q block, K/V block) tile reads Q_i, dO_i, L_i, D_i and adds dS K into
    the accumulator (a read and a write of its float32 tile); the convert reads it once and
    writes dQ. With q = the visited Q rows (Tc·N non-causal) that is
    (2·Nd·e + 4N + 4Nd) + (2·Nd·e + q·(2d·e + 8 + 8d) + 2·Nd·e) + (4Nd + Nd·e) bytes per head:
    Θ(N²d/Bc), no N x N tensor."""
    block_rows, block_cols = _blocks(shape, block_rows, block_cols)
    n, d, e, bh = shape.seq_len, shape.head_dim, shape.elem_bytes, shape.batch_heads
    q = visited_q_rows(n, block_rows, block_cols, shape.causal)
    nd = n * d * e * bh
    return {
        "flash2_bwd_dot": {"reads": {"O": nd, "dO": nd},
                           "writes": {"D": n * F32 * bh, "dQaccum": n * d * F32 * bh}},
        "flash2_bwd": {"reads": {"K": nd, "V": nd, "Q": q * d * e * bh, "dO": q * d * e * bh,
                                 "L": q * F32 * bh, "D": q * F32 * bh,
                                 "dQaccum": q * d * F32 * bh},
                       "writes": {"dQaccum": q * d * F32 * bh, "dK": nd, "dV": nd}},
        "flash2_bwd_convert": {"reads": {"dQaccum": n * d * F32 * bh}, "writes": {"dQ": nd}},
    }


def flash1_backward(shape, block_rows, block_cols) -> dict:
    """The paper's Algorithm 4: dQ zeroed in HBM (float32); K, V read and dK, dV written once;
    per visited tile Q_i, dO_i (input dtype), O_i (float32, as the forward left it), l_i, m_i
    read and dQ_i read and written back (float32). Non-causal that is Tc = ⌈N/Bc⌉ passes over
    the Q side, N·d·(2e + 12) + 8N bytes each: with Bc = Θ(M/d), Theorem 5's Θ(N²d²/M)."""
    block_rows, block_cols = _blocks(shape, block_rows, block_cols)
    n, d, e, bh = shape.seq_len, shape.head_dim, shape.elem_bytes, shape.batch_heads
    q = visited_q_rows(n, block_rows, block_cols, shape.causal)
    nd = n * d * e * bh
    return {
        "flash1_bwd_init": {"reads": {}, "writes": {"dQ": n * d * F32 * bh}},
        "flash1_bwd": {"reads": {"K": nd, "V": nd, "Q": q * d * e * bh, "O": q * d * F32 * bh,
                                 "dO": q * d * e * bh, "dQ": q * d * F32 * bh,
                                 "l": q * F32 * bh, "m": q * F32 * bh},
                       "writes": {"dQ": q * d * F32 * bh, "dK": nd, "dV": nd}},
    }


def _unfused_backward(shape, block_rows, block_cols, middle) -> dict:
    """The autograd-order backward with P saved: dV = Pᵀ dO (one CTA per Bc rows of dV reads
    all of P and dO once per Bc block: Tc times); dP = dO Vᵀ (every Br x Bc tile reads dO_i and
    V_j: dO Tc times, V Tr times); the row-wise kernels ``middle`` ((name, reads, writes) of
    N x N tensors); dQ = dS K (dS once, K Tr times); dK = dSᵀ Q (dS once, Q Tc times)."""
    block_rows, block_cols = _blocks(shape, block_rows, block_cols)
    n, d, e, bh = shape.seq_len, shape.head_dim, shape.elem_bytes, shape.batch_heads
    t_r, t_c = -(-n // block_rows), -(-n // block_cols)
    nd, nn = n * d * e * bh, n * n * e * bh
    forms = {"dv_gemm": {"reads": {"P": nn, "dO": t_c * nd}, "writes": {"dV": nd}},
             "dp_gemm": {"reads": {"dO": t_c * nd, "V": t_r * nd}, "writes": {"dP": nn}}}
    for name, reads, writes in middle:
        forms[name] = {"reads": {t: nn for t in reads}, "writes": {t: nn for t in writes}}
    forms["dq_gemm"] = {"reads": {"dS": nn, "K": t_r * nd}, "writes": {"dQ": nd}}
    forms["dk_gemm"] = {"reads": {"dS": nn, "Q": t_c * nd}, "writes": {"dK": nd}}
    return forms


def standard_backward(shape, block_rows, block_cols) -> dict:
    """Autograd's backward of Algorithm 0, P saved: P read twice (dV GEMM, softmax backward),
    dP written and read once, dS written once and read twice (dQ and dK GEMMs): 7·N²·e bytes
    per head of N x N traffic, causal or not, besides the GEMMs' Θ(N²d/B) operand reads."""
    return _unfused_backward(shape, block_rows, block_cols,
                             [("softmax_backward", ("P", "dP"), ("dS",))])


def megatron_backward(shape, block_rows, block_cols) -> dict:
    """As standard's: the fused scale-mask-softmax backward is the one row-wise kernel."""
    return _unfused_backward(shape, block_rows, block_cols,
                             [("scale_mask_softmax_backward", ("P", "dP"), ("dS",))])


def hf_backward(shape, block_rows, block_cols) -> dict:
    """Standard's, plus a full N x N pass for the scale's backward (and, causal, one more for
    the mask's): each reads and writes N²·e bytes per head more."""
    if shape.causal:
        middle = [("softmax_backward", ("P", "dP"), ("dS_masked",)),
                  ("mask_backward", ("dS_masked",), ("dS_scaled",)),
                  ("scale_backward", ("dS_scaled",), ("dS",))]
    else:
        middle = [("softmax_backward", ("P", "dP"), ("dS_scaled",)),
                  ("scale_backward", ("dS_scaled",), ("dS",))]
    return _unfused_backward(shape, block_rows, block_cols, middle)


def flash3_backward(shape, block_rows, block_cols) -> dict:
    """FlashAttention's backward on Hopper moves what FlashAttention-2's does (the same
    algorithm; its producer copies the same tiles, its row kernels the same rows)."""
    return {name.replace("flash2", "flash3"): form
            for name, form in flash2_backward(shape, block_rows, block_cols).items()}


BACKWARD_CLOSED_FORMS = {"standard": standard_backward, "hf": hf_backward,
                         "megatron": megatron_backward, "flash1": flash1_backward,
                         "flash2": flash2_backward, "flash3": flash3_backward}


def backward_hbm_traffic(algorithm: str, shape, block_rows: int, block_cols: int) -> dict:
    """Closed-form per-kernel, per-tensor HBM bytes of ``algorithm``'s backward pass (two-level
    model), any N, causal or not."""
    try:
        form = BACKWARD_CLOSED_FORMS[algorithm]
    except KeyError:
        raise IosimError(f"no closed form for {algorithm!r}'s backward; have: "
                         f"{', '.join(BACKWARD_CLOSED_FORMS)}") from None
    return form(shape, block_rows, block_cols)


def by_tensor(forms: dict) -> tuple[dict, dict]:
    """(reads, writes): each tensor's bytes summed over the kernels of ``forms``."""
    reads, writes = {}, {}
    for kernel in forms.values():
        for into, part in ((reads, kernel["reads"]), (writes, kernel["writes"])):
            for tensor, nbytes in part.items():
                into[tensor] = into.get(tensor, 0) + nbytes
    return reads, writes
