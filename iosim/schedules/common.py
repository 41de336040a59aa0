"""Pieces the attention schedules share: the global tensors, the GEMM kernels of the unfused
pipelines, and the row-block kernels between them."""
from __future__ import annotations

from ..errors import TilingError
from ..schedule import BufferSpec, Fill, Kernel, Load, Loop, MatMul, Store, TensorSpec
from ..shape import check_positive_int

#: Rows of S each row-wise (softmax, scale, mask) kernel's CTA handles, at most.
ROWWISE_ROWS_PER_CTA = 4

#: Default GEMM output tile of the unfused pipelines (cuBLAS-like 128 x 128).
GEMM_TILE = 128

#: Shared-memory stages of a library GEMM's k loop (copy of tile k+1 overlaps tile k's MMAs).
GEMM_STAGES = 2

#: Warps of a library GEMM CTA (a cuBLAS-class 128 x 128 tile runs 256 threads).
GEMM_WARPS = 8

#: Query rows each warp of a fused (mma.sync) kernel owns by default: one m16 tensor-core tile.
ROWS_PER_WARP = 16

#: A row-wise kernel's threads per row hold at most this many 16-byte vectors each ...
ROWWISE_VECTORS_PER_THREAD = 4
#: ... with 32 to 512 threads per row, and at most this many threads per CTA.
ROWWISE_THREADS_PER_ROW = (32, 512)
ROWWISE_MAX_THREADS = 1024

F32 = 4

#: A fused kernel's K/V block variable runs over the valid keys only: it skips the K/V blocks
#: a key-padding mask hides wholly, and its last block ends at the last valid key.
FUSED_SPANS = (("j", "L"),)


def qkv_tensors(shape) -> list[TensorSpec]:
    """Q (N x d per query head); K and V (N_kv x d per K/V head)."""
    e = shape.elem_bytes
    return [TensorSpec("Q", "N", "d", e, "input"),
            TensorSpec("K", "M", "d", e, "input", heads="kv"),
            TensorSpec("V", "M", "d", e, "input", heads="kv")]


def score_tensor(name: str, shape, elem_bytes: int | None = None) -> TensorSpec:
    """An N x N_kv matrix per query head (S, P, their gradients, a dropout mask)."""
    e = shape.elem_bytes if elem_bytes is None else elem_bytes
    return TensorSpec(name, "N", "M", e, "intermediate")


def workload_extents(shape) -> dict:
    """The whole-extent tokens of ``shape`` (see :mod:`iosim.schedule`)."""
    return {"N": shape.seq_len, "M": shape.kv_seq_len, "L": shape.kv_seq_len,
            "G": shape.group_size * shape.seq_len}


def stamp_extents(schedule):
    """``schedule`` with every kernel carrying its shape's extents (a kernel's own, such as a
    split-KV kernel's "S", kept)."""
    from dataclasses import replace

    base = workload_extents(schedule.shape)
    kernels = tuple(replace(k, extents=tuple(sorted({**base, **dict(k.extents)}.items())))
                    for k in schedule.kernels)
    return replace(schedule, kernels=kernels)


def check_plain_backward(shape, algorithm: str) -> None:
    """The backward schedules cover multi-head attention over N x N scores, unpadded and
    without dropout; refuse the rest with a message saying so."""
    extras = [what for what, present in (
        (f"kv_heads={shape.kv_heads}", shape.kv_heads != shape.heads),
        (f"kv_seq_len={shape.kv_seq_len}", shape.kv_seq_len != shape.seq_len),
        ("kv_lens", shape.kv_lens is not None), (f"dropout={shape.dropout:g}", shape.dropout))
        if present]
    if extras:
        raise TilingError(f"{algorithm}'s backward pass is modelled for kv_heads == heads, "
                          f"kv_seq_len == seq_len, no key padding and no dropout; got "
                          f"{', '.join(extras)} (simulate the forward pass for these shapes)")


def dropout_ops(shape, buffer: str, row_var: str, col_var: str, fused: bool) -> tuple:
    """The dropout op on the attention weights, if the shape has dropout: a fused kernel
    regenerates its mask from 8 random bits per weight; PyTorch's dropout kernel draws a float
    per weight and writes the mask ("keep") for the backward."""
    from ..schedule import Dropout

    if not shape.dropout:
        return ()
    if fused:
        return (Dropout(buffer, row_var, col_var, bits_per_element=8),)
    return (Dropout(buffer, row_var, col_var, bits_per_element=32, mask_out="keep"),)


def online_softmax_program(shape, q_operand: str = "Qi", keep_q: tuple = (),
                           within: str | None = None, out: str = "O", lse: str = "L") -> tuple:
    """FlashAttention-2's forward CTA program (flash2, flash3, flash_decoding): Q_i loaded once
    (then ``keep_q``, e.g. a copy into registers that ``q_operand`` names); O, m, l on chip;
    a loop over the K/V blocks (those inside the current ``within`` block only, for a split)
    of S = scale·Q Kᵀ [masked], the online softmax [dropout], O rescaled and O += P V; then
    O normalised and the log-sum-exp, stored to ``out`` and ``lse``."""
    from ..schedule import CausalMask, LogSumExp, OnlineSoftmax, RowDivide, RowScale

    mask = (CausalMask("S", "i", "j"),) if shape.causal else ()
    step = ((Load("Kj", "K", "j", "d"), Load("Vj", "V", "j", "d"),
             MatMul("S", q_operand, "Kj", transpose_b=True, scaled=True)) + mask
            + (OnlineSoftmax("S", "P", "m", "l", "alpha"),)
            + dropout_ops(shape, "P", "i", "j", fused=True)
            + (RowScale("O", "alpha"), MatMul("O", "P", "Vj", accumulate=True)))
    return ((Load("Qi", "Q", "i", "d"),) + tuple(keep_q)
            + (Fill("O", 0.0), Fill("m", float("-inf")), Fill("l", 0.0),
               Loop("j", step, causal_skip=True, within=within),
               RowDivide("O", "l"), LogSumExp("L", "m", "l"),
               Store("O", out, "i", "d"), Store("L", lse, "i", "1")))


def padding_ops(shape, buffer: str, col_var: str) -> tuple:
    """The key-padding mask of an unfused pipeline's scores, if the shape has one."""
    from ..schedule import KeyPaddingMask

    return (KeyPaddingMask(buffer, col_var),) if shape.kv_lens is not None else ()


def flash_warps(block_rows: int, rows_per_warp=None) -> int:
    """Warps per CTA of a fused kernel whose warps own ``rows_per_warp`` query rows each."""
    rows_per_warp = ROWS_PER_WARP if rows_per_warp is None else check_positive_int(
        "rows_per_warp", rows_per_warp, "a positive integer (query rows per warp, e.g. 16 or 32)")
    return max(1, -(-block_rows // rows_per_warp))


def rowwise_warps(shape, rows: int) -> int:
    """Warps of a row-wise kernel's CTA: each row is split over a power of two of threads
    (32 to 512) that hold at most ROWWISE_VECTORS_PER_THREAD 16-byte vectors of it each, up to
    ROWWISE_MAX_THREADS per CTA (past that, each thread holds more)."""
    vectors = max(1, -(-shape.kv_seq_len * shape.elem_bytes // 16))
    low, high = ROWWISE_THREADS_PER_ROW
    threads = low
    while threads * ROWWISE_VECTORS_PER_THREAD < vectors and threads < high:
        threads *= 2
    return max(1, min(rows * threads, ROWWISE_MAX_THREADS) // 32)


#: What each block size counts, for messages.
BLOCK_MEANING = {"block_rows": "query rows per block (Br)",
                 "block_cols": "key/value columns per block (Bc)"}


def check_block(name: str, value, seq_len: int) -> int:
    """A block size: a positive integer; larger than N is clipped to N (a block cannot be
    longer than the sequence). :func:`iosim.schedules.build_schedule` names the size the caller
    gave, and what it was clipped to, in any error that follows."""
    meaning = BLOCK_MEANING.get(name, "elements per block")
    value = check_positive_int(name, value, f"a positive integer ({meaning})")
    return min(value, seq_len)


def clipped_note(given: dict, seq_len: int) -> str:
    """``block_rows=100000 (clipped to N=4096)``-style text for the sizes in ``given``
    (name -> the value the caller gave), for messages about the clipped tiling."""
    return ", ".join(f"{name}={value} (clipped to N={seq_len})" for name, value in given.items())


def gemm_default_blocks(shape, sram_bytes: int, fits) -> tuple[int, int]:
    """A cuBLAS-like 128 x 128 output tile, halved until the operand tiles ``fits``."""
    block = min(GEMM_TILE, shape.seq_len, shape.kv_seq_len)
    while block > 1 and not fits(block, block):
        block //= 2
    return block, block


def qk_gemm(shape, block_rows: int, block_cols: int, scaled: bool) -> Kernel:
    """S = [scale·] Q Kᵀ as a tiled GEMM: one CTA per (Br x Bc) output tile of S."""
    e = shape.elem_bytes
    body = (Load("Qi", "Q", "i", "d"), Load("Kj", "K", "j", "d"),
            MatMul("S", "Qi", "Kj", transpose_b=True, scaled=scaled),
            Store("S", "S", "i", "j"))
    buffers = (BufferSpec("Qi", "i", "d", e), BufferSpec("Kj", "j", "d", e),
               BufferSpec("S", "i", "j", F32, "reg"))
    return Kernel("qk_gemm", grid=("i", "j"), body=body, buffers=buffers,
                  blocks={"i": block_rows, "j": block_cols}, row_var="i", col_var="j",
                  warps=GEMM_WARPS)


def pv_gemm(shape, block_rows: int, block_cols: int) -> Kernel:
    """O = P V as a tiled GEMM: one CTA per Br rows of O, streaming P and V blocks of Bc."""
    return nn_gemm("pv_gemm", shape, block_rows, block_cols, out="O", scores="P", operand="V",
                   phase="forward")


def rowwise_rows(shape, sram_bytes: int, row_tiles: int = 1) -> int:
    """Rows per CTA of a row-wise kernel: up to ROWWISE_ROWS_PER_CTA whole rows of S in SRAM."""
    row_bytes = shape.kv_seq_len * shape.elem_bytes * row_tiles
    rows = min(ROWWISE_ROWS_PER_CTA, sram_bytes // row_bytes, shape.seq_len)
    if rows < 1:
        raise TilingError(
            f"a row of S ({row_bytes} bytes at N_kv={shape.kv_seq_len}) does not fit the "
            f"{sram_bytes} bytes of SRAM per thread block that the unfused softmax needs; "
            "use a shorter sequence or more SRAM")
    return rows


def rowwise_kernel(name: str, shape, rows: int, src: str, dst: str, ops: tuple) -> Kernel:
    """A kernel that reads whole rows of ``src``, applies ``ops`` on buffer "X" (in place)
    and writes them to ``dst``: one CTA per ``rows`` rows."""
    e = shape.elem_bytes
    body = (Load("X", src, "i", "M"),) + tuple(ops) + (Store("X", dst, "i", "M"),)
    return Kernel(name, grid=("i",), body=body, buffers=(BufferSpec("X", "i", "M", e),),
                  blocks={"i": rows}, row_var="i", col_var="M", warps=rowwise_warps(shape, rows))


def dropout_kernel(shape, rows: int, src: str, dst: str) -> Kernel:
    """PyTorch's dropout on the attention weights: reads rows of ``src``, writes the dropped,
    rescaled weights to ``dst`` and the keep mask (1 byte per weight) to "dropout_mask"."""
    from dataclasses import replace

    kernel = rowwise_kernel("dropout", shape, rows, src, dst,
                            dropout_ops(shape, "X", "i", "M", fused=False))
    return replace(kernel, body=kernel.body + (Store("keep", "dropout_mask", "i", "M"),),
                   buffers=kernel.buffers + (BufferSpec("keep", "i", "M", 1, "reg"),))


def output_tensor(shape, float32: bool = False) -> TensorSpec:
    return TensorSpec("O", "N", "d", F32 if float32 else shape.elem_bytes, "output",
                      float32=float32)


def gemm_rowwise_gemm(algorithm: str, shape, block_rows: int, block_cols: int,
                      sram_bytes: int, *, scaled_gemm: bool, middle: str, middle_ops: tuple,
                      notes: str):
    """The three-kernel pipeline: S = [scale·]QKᵀ; one row-wise kernel ``middle`` applying
    ``middle_ops`` to whole rows of S and writing P; O = PV."""
    from ..schedule import Schedule

    rows = rowwise_rows(shape, sram_bytes)
    kernels = (qk_gemm(shape, block_rows, block_cols, scaled=scaled_gemm),
               rowwise_kernel(middle, shape, rows, "S", "P", middle_ops))
    return finish_unfused(algorithm, shape, block_rows, block_cols, rows, kernels,
                          (score_tensor("S", shape),), notes)


def finish_unfused(algorithm: str, shape, block_rows: int, block_cols: int, rows: int,
                   kernels: tuple, score_tensors: tuple, notes: str):
    """An unfused pipeline's kernels up to P, then (with dropout) PyTorch's dropout kernel,
    then O = P V; its tensors."""
    from ..schedule import Schedule

    probs = "P"
    extra = ()
    if shape.dropout:
        kernels += (dropout_kernel(shape, rows, "P", "Pd"),)
        probs = "Pd"
        extra = (score_tensor("Pd", shape), score_tensor("dropout_mask", shape, elem_bytes=1))
    kernels += (nn_gemm("pv_gemm", shape, block_rows, block_cols, out="O", scores=probs,
                        operand="V", phase="forward"),)
    tensors = (tuple(qkv_tensors(shape)) + tuple(score_tensors) + (score_tensor("P", shape),)
               + extra + (output_tensor(shape),))
    return Schedule(algorithm, shape, tensors, kernels, block_rows, block_cols, notes=notes)


# ---- the unfused backward pass (autograd order, with P saved by the forward pass) ------------

def grad_tensors(shape) -> list[TensorSpec]:
    """dO (the gradient of the output, an input of the backward pass) and dQ, dK, dV."""
    e = shape.elem_bytes
    return [TensorSpec("dO", "N", "d", e, "input"), TensorSpec("dQ", "N", "d", e, "output"),
            TensorSpec("dK", "M", "d", e, "output", heads="kv"),
            TensorSpec("dV", "M", "d", e, "output", heads="kv")]


def nt_gemm(name: str, shape, block_rows: int, block_cols: int, out: str, a: str, b: str,
            scaled: bool = False) -> Kernel:
    """out = [scale·] a bᵀ (out N x N, a and b N x d) as a tiled GEMM: one CTA per (Br x Bc)
    output tile (the forward's S = QKᵀ, the backward's dP = dO Vᵀ)."""
    e = shape.elem_bytes
    body = (Load("Ai", a, "i", "d"), Load("Bj", b, "j", "d"),
            MatMul("C", "Ai", "Bj", transpose_b=True, scaled=scaled), Store("C", out, "i", "j"))
    buffers = (BufferSpec("Ai", "i", "d", e), BufferSpec("Bj", "j", "d", e),
               BufferSpec("C", "i", "j", F32, "reg"))
    return Kernel(name, grid=("i", "j"), body=body, buffers=buffers,
                  blocks={"i": block_rows, "j": block_cols}, row_var="i", col_var="j",
                  warps=GEMM_WARPS, phase="backward")


def nn_gemm(name: str, shape, block_rows: int, block_cols: int, out: str, scores: str,
            operand: str, scaled: bool = False, phase: str = "backward") -> Kernel:
    """out = [scale·] scores @ operand (scores N x N, operand and out N x d): one CTA per Br
    rows of out, streaming Bc-wide blocks of the scores' rows and Bc rows of the operand
    (the backward's dQ = scale·dS K; the forward's O = PV). A library GEMM pipelines its k
    loop: the next tiles are copied in while these are multiplied (GEMM_STAGES buffers each)."""
    e = shape.elem_bytes
    body = (Fill("C", 0.0),
            Loop("j", (Load("Aij", scores, "i", "j"), Load("Bj", operand, "j", "d"),
                       MatMul("C", "Aij", "Bj", accumulate=True, scaled=scaled))),
            Store("C", out, "i", "d"))
    buffers = (BufferSpec("Aij", "i", "j", e, stages=GEMM_STAGES),
               BufferSpec("Bj", "j", "d", e, stages=GEMM_STAGES),
               BufferSpec("C", "i", "d", F32, "reg"))
    return Kernel(name, grid=("i",), body=body, buffers=buffers,
                  blocks={"i": block_rows, "j": block_cols}, row_var="i", col_var="j",
                  warps=GEMM_WARPS, phase=phase)


def tn_gemm(name: str, shape, block_rows: int, block_cols: int, out: str, scores: str,
            operand: str, scaled: bool = False) -> Kernel:
    """out = [scale·] scoresᵀ @ operand (scores N x N, operand and out N x d): one CTA per Bc
    rows of out (columns of the scores), streaming Br-high blocks of the scores' columns and Br
    rows of the operand (the backward's dV = Pᵀ dO and dK = scale·dSᵀ Q)."""
    e = shape.elem_bytes
    body = (Fill("C", 0.0),
            Loop("i", (Load("Aij", scores, "i", "j"), Load("Bi", operand, "i", "d"),
                       MatMul("C", "Aij", "Bi", transpose_a=True, accumulate=True,
                              scaled=scaled))),
            Store("C", out, "j", "d"))
    buffers = (BufferSpec("Aij", "i", "j", e, stages=GEMM_STAGES),
               BufferSpec("Bi", "i", "d", e, stages=GEMM_STAGES),
               BufferSpec("C", "j", "d", F32, "reg"))
    return Kernel(name, grid=("j",), body=body, buffers=buffers,
                  blocks={"i": block_rows, "j": block_cols}, row_var="i", col_var="j",
                  warps=GEMM_WARPS, phase="backward")


def softmax_backward_kernel(name: str, shape, sram_bytes: int, probs: str, grad: str,
                            out: str, extra_ops: tuple = ()) -> Kernel:
    """Autograd's softmax backward on whole rows: reads rows of P and dP, computes
    D = rowsum(P ∘ dP) and out = P ∘ (dP − D) [then ``extra_ops`` on it, e.g. megatron's
    fused scale], writes rows of ``out``: one CTA per up to ROWWISE_ROWS_PER_CTA rows."""
    from ..schedule import RowDot, SoftmaxBackward

    rows = rowwise_rows(shape, sram_bytes, row_tiles=2)
    e = shape.elem_bytes
    body = (Load("P", probs, "i", "M"), Load("G", grad, "i", "M"), RowDot("D", "P", "G"),
            SoftmaxBackward("G", "P", "G", "D")) + tuple(extra_ops) + (Store("G", out, "i", "M"),)
    buffers = (BufferSpec("P", "i", "M", e), BufferSpec("G", "i", "M", e),
               BufferSpec("D", "i", "1", F32, "reg"))
    return Kernel(name, grid=("i",), body=body, buffers=buffers, blocks={"i": rows},
                  row_var="i", col_var="M", warps=rowwise_warps(shape, rows), phase="backward")


def backward_rowwise_kernel(name: str, shape, sram_bytes: int, src: str, dst: str,
                            ops: tuple) -> Kernel:
    """A backward elementwise kernel over whole rows (hf's mask and scale backward)."""
    from dataclasses import replace

    rows = rowwise_rows(shape, sram_bytes)
    return replace(rowwise_kernel(name, shape, rows, src, dst, ops), phase="backward")


def unfused_backward(algorithm: str, shape, block_rows: int, block_cols: int,
                     sram_bytes: int, *, middle: tuple, scores_grad: str, scaled_gemms: bool,
                     score_grads: tuple, notes: str):
    """The unfused pipelines' backward with P saved: dV = Pᵀ dO; dP = dO Vᵀ; the row-wise
    kernels ``middle`` (softmax backward, then any scale/mask backward) end in
    ``scores_grad``; dQ = [scale·] dS K; dK = [scale·] dSᵀ Q. ``score_grads``: the names of the
    N x N gradient tensors the middle kernels write."""
    from ..schedule import Schedule

    kernels = (tn_gemm("dv_gemm", shape, block_rows, block_cols, "dV", "P", "dO"),
               nt_gemm("dp_gemm", shape, block_rows, block_cols, "dP", "dO", "V"),
               *middle,
               nn_gemm("dq_gemm", shape, block_rows, block_cols, "dQ", scores_grad, "K",
                       scaled=scaled_gemms),
               tn_gemm("dk_gemm", shape, block_rows, block_cols, "dK", scores_grad, "Q",
                       scaled=scaled_gemms))
    grads = grad_tensors(shape)
    tensors = (tuple(qkv_tensors(shape)) + (score_tensor("P", shape), grads[0],
                                            score_tensor("dP", shape))
               + tuple(score_tensor(name, shape) for name in score_grads) + tuple(grads[1:]))
    return Schedule(algorithm, shape, tensors, kernels, block_rows, block_cols, notes=notes)


def flash_backward(algorithm: str, shape, block_rows: int, block_cols: int, buffers: tuple,
                   main: dict, row_kernels: dict, notes: str):
    """FlashAttention-2's backward algorithm (O and the log-sum-exp L saved by the forward
    pass) as three kernels named after ``algorithm``:

    1. ``<algorithm>_bwd_dot``: one CTA per ``row_kernels["rows"]`` rows; D = rowsum(dO ∘ O)
       to HBM (float32), and the float32 dQ accumulator zeroed;
    2. ``<algorithm>_bwd``: one CTA per Bc rows of K/V (dK, dV accumulate on chip), looping
       over the Q blocks of Br rows (causal: only those on or below the diagonal): S = scale·Q
       Kᵀ and P = exp(S − L) recomputed; dV += Pᵀ dO; dP = dO Vᵀ; dS = P ∘ (dP − D); dQ_i +=
       dS K added into the float32 accumulator in HBM (atomics: the L2's read-modify-write);
       dK += dSᵀ Q; at the end dK ·= scale, and dK, dV written once. ``buffers`` and ``main``
       (Kernel fields: warps, tensor path, producer, ...) say how the CTA runs it;
    3. ``<algorithm>_bwd_convert``: dQ = scale·accumulator, in the input dtype."""
    from ..schedule import (CausalMask, RecomputeProbs, RowDot, Scale, Schedule,
                            SoftmaxBackward)

    e = shape.elem_bytes
    rows_only = {"i": row_kernels["rows"]}
    aux = dict(blocks=rows_only, row_var="i", tensor_path=main["tensor_path"],
               warps=row_kernels["warps"], phase="backward")
    dot = Kernel(
        f"{algorithm}_bwd_dot", grid=("i",),
        body=(Load("Oi", "O", "i", "d"), Load("dOi", "dO", "i", "d"), RowDot("Di", "dOi", "Oi"),
              Store("Di", "D", "i", "1"), Fill("dQi", 0.0), Store("dQi", "dQaccum", "i", "d")),
        buffers=(BufferSpec("Oi", "i", "d", e, "reg"), BufferSpec("dOi", "i", "d", e, "reg"),
                 BufferSpec("Di", "i", "1", F32, "reg"), BufferSpec("dQi", "i", "d", F32, "reg")),
        **aux)
    mask = (CausalMask("S", "i", "j"),) if shape.causal else ()
    step = (Load("Qi", "Q", "i", "d"), Load("dOi", "dO", "i", "d"), Load("Li", "L", "i", "1"),
            Load("Di", "D", "i", "1"),
            MatMul("S", "Qi", "Kj", transpose_b=True, scaled=True)) + mask + (
            RecomputeProbs("P", "S", "Li"),
            MatMul("dV", "P", "dOi", transpose_a=True, accumulate=True),
            MatMul("dP", "dOi", "Vj", transpose_b=True),
            SoftmaxBackward("dS", "P", "dP", "Di"),
            MatMul("dQi", "dS", "Kj"),
            Store("dQi", "dQaccum", "i", "d", accumulate=True),
            MatMul("dK", "dS", "Qi", transpose_a=True, accumulate=True))
    kernel = Kernel(
        f"{algorithm}_bwd", grid=("j",),
        body=(Load("Kj", "K", "j", "d"), Load("Vj", "V", "j", "d"), Fill("dK", 0.0),
              Fill("dV", 0.0), Loop("i", step, causal_skip=True), Scale("dK"),
              Store("dK", "dK", "j", "d"), Store("dV", "dV", "j", "d")),
        buffers=buffers, blocks={"i": block_rows, "j": block_cols}, row_var="i", col_var="j",
        phase="backward", **main)
    convert = Kernel(
        f"{algorithm}_bwd_convert", grid=("i",),
        body=(Load("dQi", "dQaccum", "i", "d"), Scale("dQi"), Store("dQi", "dQ", "i", "d")),
        buffers=(BufferSpec("dQi", "i", "d", F32, "reg"),), **aux)
    grads = grad_tensors(shape)
    tensors = tuple(qkv_tensors(shape)) + (
        output_tensor(shape), TensorSpec("L", "N", "1", F32, "output", float32=True),
        grads[0], TensorSpec("D", "N", "1", F32, "intermediate", float32=True),
        TensorSpec("dQaccum", "N", "d", F32, "intermediate", float32=True)) + tuple(grads[1:])
    return Schedule(algorithm, shape, tensors, (dot, kernel, convert), block_rows, block_cols,
                    notes=notes)
