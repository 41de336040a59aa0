"""The backward pass: schedules in the same IR, run by the same executor, counted by the same
trace and engine.

The gradients are checked against ``iosim.reference.reference_attention_backward``, which is
itself checked here against central finite differences of reference attention. FLOP and HBM
counts are checked against formulas written out by hand below (loops over the blocks, never
iosim's own walker).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import iosim
from iosim import AttentionShape, IosimError, build_schedule, execute
from iosim import schedule as sch
from iosim import work
from iosim.reference import reference_attention, reference_attention_backward
from iosim.simulate import simulate_trace
from iosim.trace import LOAD, STORE, build_trace

BACKWARD_ALGORITHMS = ("flash1", "flash2", "flash3", "hf", "megatron", "standard")
EXACT = 1e-10
GRADS = ("dQ", "dK", "dV")


def _problem(rng, bh, n, d, big=None):
    q, k, v, d_out = (rng.standard_normal((bh, n, d)) for _ in range(4))
    if big:  # scores spread over [-big, big]
        s = np.einsum("hrd,hcd->hrc", q, k) / math.sqrt(d)
        q = q * (big / np.abs(s).max())
    return q, k, v, d_out


def _assert_gradients(result_tensors, expected, bounds, what=""):
    for name, exp, bound in zip(GRADS, expected, bounds):
        got = np.asarray(result_tensors[name], dtype=np.float64)
        assert got.shape == exp.shape
        assert np.all(np.isfinite(got)), (what, name)
        # (plus the smallest normal float64: below it, gradients made of underflowed P are
        # subnormal and have fewer significant bits)
        excess = np.abs(got - exp) - EXACT * (np.abs(exp) + bound) - np.finfo(np.float64).tiny
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        assert np.all(excess <= 0), (what, name, worst, got[worst], exp[worst], bound[worst])


def _bounds(q, k, v, d_out, causal):
    """Per element of dQ, dK, dV: the summed magnitudes of the terms that make it up (how
    large the rounding of an exact float64 computation of it can be: an exactly-zero gradient
    at N = 1 is a cancellation of terms this large)."""
    q, k, v, d_out = (np.asarray(x, dtype=np.float64) for x in (q, k, v, d_out))
    scale = 1 / math.sqrt(q.shape[-1])
    s = np.einsum("...rd,...cd->...rc", q, k) * scale
    if causal:
        n = s.shape[-1]
        s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = p @ v
    a_do, a_v, a_q, a_k = (np.abs(x) for x in (d_out, v, q, k))
    d_p = a_do @ np.swapaxes(a_v, -1, -2)
    d_s = p * (d_p + (a_do * np.abs(out)).sum(axis=-1, keepdims=True))
    return (scale * d_s @ a_k, scale * np.swapaxes(d_s, -1, -2) @ a_q,
            np.swapaxes(p, -1, -2) @ a_do)


# ---- the reference gradient is the gradient ------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_reference_backward_matches_finite_differences(causal):
    rng = np.random.default_rng(1)
    n, d, step = 7, 3, 1e-6
    q, k, v, d_out = (x[0] for x in _problem(rng, 1, n, d))
    expected = reference_attention_backward(q, k, v, d_out, causal=causal)

    def loss(q_, k_, v_):
        return float((reference_attention(q_, k_, v_, causal=causal) * d_out).sum())

    for which, grad in enumerate(expected):
        args = [q, k, v]
        numeric = np.zeros_like(grad)
        for index in np.ndindex(grad.shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][index] += step
            minus[which][index] -= step
            numeric[index] = (loss(*plus) - loss(*minus)) / (2 * step)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


# ---- the executor's gradients ----------------------------------------------------------------

@st.composite
def backward_problems(draw, max_n=40, max_d=12):
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, max_d))
    bh = draw(st.integers(1, 2))
    big = draw(st.sampled_from([None, None, 1e4]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # block sizes: small ones, ones that do not divide N, and the whole sequence
    block = st.one_of(st.integers(1, max(1, min(n, 9))), st.just(n), st.integers(n, n + 5))
    return dict(arrays=_problem(rng, bh, n, d, big), n=n, d=d, bh=bh, big=big,
                causal=draw(st.booleans()), algorithm=draw(st.sampled_from(BACKWARD_ALGORITHMS)),
                block_rows=draw(block), block_cols=draw(block))


@given(backward_problems())
def test_gradients_equal_the_reference(p):
    q, k, v, d_out = p["arrays"]
    shape = AttentionShape(1, p["bh"], p["n"], p["d"], dtype="fp32", causal=p["causal"])
    expected = reference_attention_backward(q, k, v, d_out, causal=p["causal"])
    both = build_schedule(p["algorithm"], shape, p["block_rows"], p["block_cols"], pass_="both")
    result = execute(both, q, k, v, d_out)
    bounds = _bounds(q, k, v, d_out, p["causal"])
    _assert_gradients(result.tensors, expected, bounds, f"{p['algorithm']} both")
    np.testing.assert_allclose(result.output, reference_attention(q, k, v, causal=p["causal"]),
                               rtol=EXACT, atol=EXACT)
    # the backward alone, fed what the forward saved
    backward = build_schedule(p["algorithm"], shape, p["block_rows"], p["block_cols"],
                              pass_="backward")
    forward = execute(build_schedule(p["algorithm"], shape, p["block_rows"], p["block_cols"]),
                      q, k, v)
    saved = {t.name: forward.tensors[t.name] for t in backward.tensors
             if t.name in forward.tensors and t.name not in ("Q", "K", "V")}
    _assert_gradients(execute(backward, q, k, v, d_out, saved=saved).tensors, expected, bounds,
                      f"{p['algorithm']} backward")


@pytest.mark.parametrize("algorithm", BACKWARD_ALGORITHMS)
@pytest.mark.parametrize("kind", ["signed", "all_high", "all_low"])
@pytest.mark.parametrize("causal", [False, True])
def test_extreme_logits_give_exact_finite_gradients(algorithm, kind, causal):
    rng = np.random.default_rng(11)
    n, d = 12, 6
    q, k, v, d_out = (x[0] for x in _problem(rng, 1, n, d))
    scale = 1 / math.sqrt(d)
    if kind == "signed":
        q = q * (1e4 / np.abs(q @ k.T * scale).max())
    else:  # every score near +1e4 or -1e4: exp(s) alone overflows or underflows
        big = math.sqrt(1e4 / scale)
        q[:, 0] = big if kind == "all_high" else -big
        k[:, 0] = big
    assert np.abs(q @ k.T * scale).max() > 9e3
    shape = AttentionShape(1, 1, n, d, dtype="fp32", causal=causal)
    expected = reference_attention_backward(q, k, v, d_out, causal=causal)
    with np.errstate(over="raise"):
        result = execute(build_schedule(algorithm, shape, 5, 4, pass_="both"),
                         q[None], k[None], v[None], d_out[None])
    _assert_gradients({g: result.tensors[g][0] for g in GRADS}, expected,
                      _bounds(q, k, v, d_out, causal), algorithm)


@pytest.mark.parametrize("algorithm", BACKWARD_ALGORITHMS)
def test_float32_gradients_are_float32_and_close(algorithm):
    rng = np.random.default_rng(4)
    q, k, v, d_out = (x.astype(np.float32) for x in _problem(rng, 2, 19, 8))
    shape = AttentionShape(1, 2, 19, 8, dtype="fp32", causal=True)
    result = execute(build_schedule(algorithm, shape, 8, 4, pass_="both"), q, k, v, d_out)
    expected = reference_attention_backward(q, k, v, d_out, causal=True)
    for name, exp in zip(GRADS, expected):
        assert result.tensors[name].dtype == np.float32
        err = np.linalg.norm(result.tensors[name] - exp) / np.linalg.norm(exp)
        assert err < 1e-5, (name, err)


# ---- FLOPs, counted by hand -------------------------------------------------------------------

def _trace_flops(schedule):
    trace = build_trace(schedule)
    return (sum(int(kt.flops_tensor.sum()) for kt in trace.kernels),
            sum(int(kt.flops_scalar.sum()) for kt in trace.kernels),
            sum(int(kt.special_ops.sum()) for kt in trace.kernels))


def _visited_tiles(n, br, bc, causal):
    """(rows, cols) of every (Q block, K/V block) tile a causal-skipping loop visits."""
    tiles = []
    for j in range(math.ceil(n / bc)):
        for i in range(math.ceil(n / br)):
            if causal and j * bc > (i + 1) * br - 1:
                continue
            tiles.append((min(br, n - i * br), min(bc, n - j * bc)))
    return tiles


@pytest.mark.parametrize("n, d, br, bc", [(64, 16, 16, 32), (50, 8, 16, 7), (33, 5, 33, 33)])
@pytest.mark.parametrize("causal", [False, True])
def test_unfused_backward_flops(n, d, br, bc, causal):
    bh = 3
    shape = AttentionShape(1, bh, n, d, dtype="fp16", causal=causal)
    gemm = 2 * n * n * d  # one N x N x d matmul
    softmax_backward = 2 * n * n + 2 * n * n  # D = rowsum(P ∘ dP); P ∘ (dP − D)
    extra = {"standard": 0, "megatron": n * n,  # megatron's fused scale
             "hf": n * n + (n * n if causal else 0)}  # scale backward (+ mask backward)
    for algorithm, more in extra.items():
        schedule = build_schedule(algorithm, shape, br, bc, pass_="backward")
        tensor, scalar, special = _trace_flops(schedule)
        # dV = Pᵀ dO, dP = dO Vᵀ, dQ = dS K, dK = dSᵀ Q: causal or not, the unfused GEMMs do
        # all N² of each
        assert tensor == bh * 4 * gemm, algorithm
        assert scalar == bh * (softmax_backward + more), algorithm
        assert special == 0
        forward = build_schedule(algorithm, shape, br, bc)
        both = build_schedule(algorithm, shape, br, bc, pass_="both")
        assert _trace_flops(both) == tuple(a + b for a, b in zip(_trace_flops(forward),
                                                                 (tensor, scalar, special)))


@pytest.mark.parametrize("n, d, br, bc", [(64, 16, 16, 32), (50, 8, 16, 7), (33, 5, 8, 33),
                                          (17, 4, 1, 3)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("algorithm", ["flash2", "flash3"])
def test_flash2_backward_flops(n, d, br, bc, causal, algorithm):
    bh = 2
    shape = AttentionShape(1, bh, n, d, dtype="fp16", causal=causal)
    tiles = _visited_tiles(n, br, bc, causal)
    # per visited tile: S = QKᵀ, dV += Pᵀ dO, dP = dO Vᵀ, dQ_i = dS K, dK += dSᵀ Q
    tensor = sum(5 * 2 * r * c * d for r, c in tiles)
    # per tile: P = exp(S − L) (2 per element), dS = P ∘ (dP − D) (2), the causal mask (1)
    scalar = sum((4 + (1 if causal else 0)) * r * c for r, c in tiles)
    # D = rowsum(dO ∘ O): 2 per element; dK ·= scale; dQ = scale·accumulator
    scalar += 2 * n * d + n * d + n * d
    special = sum(r * c for r, c in tiles)  # one exp per recomputed P element
    # flash3: the same algorithm on Hopper, the same FLOPs
    got = _trace_flops(build_schedule(algorithm, shape, br, bc, pass_="backward"))
    assert got == (bh * tensor, bh * scalar, bh * special)
    if not causal:
        assert tensor == 10 * n * n * d  # one more N² d matmul than the unfused backward


@pytest.mark.parametrize("n, d, br, bc", [(64, 16, 16, 32), (50, 8, 16, 7), (17, 4, 1, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash1_backward_flops(n, d, br, bc, causal):
    bh = 2
    shape = AttentionShape(1, bh, n, d, dtype="fp16", causal=causal)
    tiles = _visited_tiles(n, br, bc, causal)
    tensor = sum(5 * 2 * r * c * d for r, c in tiles)  # S, dV, dP, dQ, dK
    # per tile: m + log l (2 per row), P (2 per element), D = rowsum(dO ∘ O) (2 per element of
    # O_i, every K/V block), dS (2 per element), the causal mask (1 per element)
    scalar = sum(2 * r + (4 + (1 if causal else 0)) * r * c + 2 * r * d for r, c in tiles)
    special = sum(r * c + r for r, c in tiles)  # exp per element, log per row
    got = _trace_flops(build_schedule("flash1", shape, br, bc, pass_="backward"))
    assert got == (bh * tensor, bh * scalar, bh * special)


# ---- HBM bytes under the two-level model: iosim.closed_form's backward forms, checked against
# the engine tensor by tensor in tests/test_closed_form.py -----------------------------------


# ---- the atomic add in the trace; the l2 replay of forward + backward ------------------------

def test_accumulating_store_is_a_load_then_a_store_of_the_same_tile():
    shape = AttentionShape(1, 1, 32, 8, dtype="fp16")
    schedule = build_schedule("flash2", shape, 16, 16, pass_="backward")
    trace = build_trace(schedule)
    kt = next(k for k in trace.kernels if k.name == "flash2_bwd")
    accum = trace.tensor_names.index("dQaccum")
    loads = np.flatnonzero((kt.kind == LOAD) & (kt.tensor == accum))
    stores = np.flatnonzero((kt.kind == STORE) & (kt.tensor == accum))
    assert len(loads) == len(stores) == 4  # 2 K/V blocks x 2 Q blocks
    assert np.array_equal(loads + 1, stores)
    for column in ("addr", "rows", "row_bytes", "row_stride"):
        assert np.array_equal(getattr(kt, column)[loads], getattr(kt, column)[stores])
    # fire-and-forget: no barrier, no exposed latency
    head_loads = np.flatnonzero((kt.head["kind"] == LOAD) & (kt.tensor[:len(kt.head["kind"])]
                                                               == accum))
    assert np.all(kt.head["prefetched"][head_loads] == 1)
    assert np.all(kt.head["sync"][head_loads] == 0)


@pytest.mark.parametrize("algorithm", BACKWARD_ALGORITHMS)
@pytest.mark.parametrize("causal", [False, True])
def test_both_passes_replay_under_the_l2_model(algorithm, causal):
    shape = AttentionShape(2, 2, 256, 64, dtype="fp16", causal=causal)
    forward = build_schedule(algorithm, shape)
    backward = build_schedule(algorithm, shape, pass_="backward")
    both = build_schedule(algorithm, shape, pass_="both")
    assert [k.phase for k in both.kernels] == (["forward"] * len(forward.kernels)
                                               + ["backward"] * len(backward.kernels))
    assert [k.name for k in both.kernels] == ([k.name for k in forward.kernels]
                                              + [k.name for k in backward.kernels])
    names = [t.name for t in both.tensors]
    assert len(names) == len(set(names)) and set(names) >= {"dO", "dQ", "dK", "dV"}
    result = simulate_trace(build_trace(both), iosim.load_hardware("h100-measured"), "l2")
    assert [k.name for k in result.kernels] == [k.name for k in both.kernels]
    assert all(k.predicted_time_s > 0 for k in result.kernels)
    assert result.totals.hbm_read_bytes > 0 and result.totals.flops_tensor > 0


def test_flash2_trades_flops_for_bytes_over_both_passes():
    # the paper's Figure 2 trade: more FLOPs (the backward's recomputation), far fewer bytes
    shape = AttentionShape(1, 2, 1024, 64, dtype="fp16")
    hw = iosim.load_hardware("h100-measured")
    totals = {alg: simulate_trace(build_trace(build_schedule(alg, shape, pass_="both")), hw,
                                  "l2").totals for alg in ("standard", "flash2")}
    assert totals["flash2"].flops_tensor > totals["standard"].flops_tensor
    hbm = {alg: t.hbm_read_bytes + t.hbm_write_bytes for alg, t in totals.items()}
    assert hbm["flash2"] * 5 < hbm["standard"]


# ---- the new ops' counts ----------------------------------------------------------------------

def test_transposed_a_matmul_counts():
    buffers = {"A": sch.BufferSpec("A", "i", "j", 2), "B": sch.BufferSpec("B", "i", "d", 2),
               "C": sch.BufferSpec("C", "j", "d", 4, "reg")}
    dims = {"i": 16, "j": 48, "d": 8, "N": 64, "1": 1}
    op = sch.MatMul("C", "A", "B", transpose_a=True, accumulate=True)
    assert op.extents(dims, buffers) == (48, 8, 16)  # C (j x d) = Aᵀ (j x i) @ B (i x d)
    assert op.flops(dims, buffers) == (2 * 48 * 8 * 16, 0)
    kernel = sch.Kernel("k", grid=(), body=(), buffers=tuple(buffers.values()),
                        blocks={"i": 16, "j": 48}, tensor_path="mma_sync")
    mma, chain, *_ = work.op_work(op, dims, buffers, kernel)
    assert mma == 2 * 48 * 8 * 16 // work.MMA_FLOPS and chain == 1  # k = 16


def test_backward_op_counts():
    buffers = {"P": sch.BufferSpec("P", "i", "j", 2), "G": sch.BufferSpec("G", "i", "j", 4),
               "D": sch.BufferSpec("D", "i", "1", 4, "reg"),
               "L": sch.BufferSpec("L", "i", "1", 4, "reg")}
    dims = {"i": 4, "j": 8, "d": 2, "N": 8, "1": 1}
    assert sch.RowDot("D", "P", "G").flops(dims, buffers) == (0, 64)
    assert sch.SoftmaxBackward("G", "P", "G", "D").flops(dims, buffers) == (0, 64)
    recompute = sch.RecomputeProbs("P", "G", "L")
    assert recompute.flops(dims, buffers) == (0, 64)
    assert recompute.special_ops(dims, buffers) == 32
    kernel = sch.Kernel("k", grid=(), body=(), buffers=tuple(buffers.values()), blocks={})
    depth = work.op_work(sch.RowDot("D", "P", "G"), dims, buffers, kernel)[-1]
    assert depth == 2 * 3 + 2  # a row reduction over 8 columns


# ---- refusals ---------------------------------------------------------------------------------

SHAPE = AttentionShape(1, 1, 16, 4, dtype="fp32")


@pytest.mark.parametrize("bad", ["backwards", "fwd", "", None, 1, ["both"]])
def test_unknown_pass_is_refused_naming_the_allowed_ones(bad):
    with pytest.raises(IosimError, match=r"unknown pass .*allowed: forward, backward, both"):
        build_schedule("flash2", SHAPE, pass_=bad)


@pytest.mark.parametrize("pass_", ["backward", "both"])
def test_algorithm_without_a_backward_is_refused(pass_, monkeypatch):
    import types

    from iosim import schedules

    # every algorithm with a backward is covered (forward-only ones: flash3, ...)
    assert {name for name, module in schedules.ALGORITHMS.items()
            if hasattr(module, "build_backward")} == set(BACKWARD_ALGORITHMS)
    forward_only = types.SimpleNamespace(build=schedules.flash2.build,
                                         default_blocks=schedules.flash2.default_blocks)
    monkeypatch.setitem(schedules.ALGORITHMS, "fwd_only", forward_only)
    with pytest.raises(IosimError, match=r"fwd_only has no backward schedule yet.*flash2"):
        build_schedule("fwd_only", SHAPE, pass_=pass_)
    assert build_schedule("fwd_only", SHAPE).kernels  # the forward still builds


def test_execute_checks_d_out_and_saved_tensors():
    rng = np.random.default_rng(0)
    q, k, v, d_out = _problem(rng, 1, 16, 4)
    with pytest.raises(IosimError, match=r"backward kernels: pass d_out"):
        execute(build_schedule("flash2", SHAPE, 4, 4, pass_="both"), q, k, v)
    with pytest.raises(IosimError, match=r"no backward kernels"):
        execute(build_schedule("flash2", SHAPE, 4, 4), q, k, v, d_out)
    with pytest.raises(IosimError, match=r"d_out must have the shape of q"):
        execute(build_schedule("flash2", SHAPE, 4, 4, pass_="both"), q, k, v, d_out[:, :3])
    with pytest.raises(IosimError, match=r"reads O, L, which no kernel of it writes"):
        execute(build_schedule("flash2", SHAPE, 4, 4, pass_="backward"), q, k, v, d_out)
    with pytest.raises(IosimError, match=r"reads P, which no kernel"):
        execute(build_schedule("standard", SHAPE, 4, 4, pass_="backward"), q, k, v, d_out)
    with pytest.raises(IosimError, match=r"saved tensor 'X' is not one of"):
        execute(build_schedule("standard", SHAPE, 4, 4, pass_="backward"), q, k, v, d_out,
                saved={"X": q})
    with pytest.raises(IosimError, match=r"saved tensor 'P' must have shape"):
        execute(build_schedule("standard", SHAPE, 4, 4, pass_="backward"), q, k, v, d_out,
                saved={"P": q})


def test_backward_defaults_fit_the_sram():
    shape = AttentionShape(1, 1, 4096, 128, dtype="fp16")
    sram = iosim.load_hardware("h100-measured").sram_bytes_per_block
    for pass_ in ("backward", "both"):
        schedule = build_schedule("flash2", shape, pass_=pass_)
        assert all(k.smem_bytes(128, 4096) <= sram for k in schedule.kernels)
    assert (schedule.block_rows, schedule.block_cols) == (64, 128)  # FlashAttention-2's


# ---- float16: an earned tolerance ------------------------------------------------------------

def plain_fp16_backward(q, k, v, d_out, *, causal):
    """The low-precision baseline: the forward and the autograd-order backward, every op in
    float16 NumPy."""
    h = np.float16
    scale = h(1 / math.sqrt(q.shape[-1]))
    s = (q @ np.swapaxes(k, -1, -2)) * scale
    if causal:
        n = s.shape[-1]
        s = np.where(np.arange(n)[None, :] > np.arange(n)[:, None], h(-np.inf), s)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    d_v = np.swapaxes(p, -1, -2) @ d_out
    d_p = d_out @ np.swapaxes(v, -1, -2)
    d_s = p * (d_p - (p * d_p).sum(axis=-1, keepdims=True))
    d_q = (d_s @ k) * scale
    d_k = (np.swapaxes(d_s, -1, -2) @ q) * scale
    assert all(x.dtype == np.float16 for x in (p, d_s, d_q, d_k, d_v))
    return d_q, d_k, d_v


@given(backward_problems(max_n=48, max_d=16))
def test_float16_gradients_at_most_twice_plain_float16(p):
    q, k, v, d_out = p["arrays"]
    if p["big"]:  # ±1e4 logits do not survive a float16 S in the baseline; keep them moderate
        q = q * (8 / p["big"])
    q, k, v, d_out = (x.astype(np.float16) for x in (q, k, v, d_out))
    shape = AttentionShape(1, p["bh"], p["n"], p["d"], dtype="fp16", causal=p["causal"])
    schedule = build_schedule(p["algorithm"], shape, p["block_rows"], p["block_cols"],
                              pass_="both")
    result = execute(schedule, q, k, v, d_out)
    expected = reference_attention_backward(q, k, v, d_out, causal=p["causal"])
    plain = plain_fp16_backward(q, k, v, d_out, causal=p["causal"])
    # flash-attention's rule on the largest error (as its gradient tests measure it): at most
    # twice the plain float16 one, plus 1e-3 of the largest term the gradient sums (two float16
    # ulps of it). The floor is relative to the terms, not to the gradient: a gradient is a
    # difference of terms (dP − D), and where it cancels to near 0 (N = 1, 2) FlashAttention's
    # D = rowsum(dO ∘ O), from the float16 O, is not the D of the baseline's own P and dP.
    bounds = _bounds(q, k, v, d_out, p["causal"])
    for name, exp, base, bound in zip(GRADS, expected, plain, bounds):
        got = np.asarray(result.tensors[name], dtype=np.float64)
        assert np.all(np.isfinite(got))
        error, plain_error = np.abs(got - exp).max(), np.abs(base - exp).max()
        assert error <= 2 * plain_error + 1e-3 * bound.max(), (name, error, plain_error)


# ---- the array-level entry point -------------------------------------------------------------

@pytest.mark.parametrize("algorithm", BACKWARD_ALGORITHMS)
def test_run_attention_backward_keeps_shape_and_dtype(algorithm):
    from iosim.executor import run_attention_backward

    rng = np.random.default_rng(9)
    q, k, v, d_out = (rng.standard_normal((2, 3, 11, 4)) for _ in range(4))
    grads = run_attention_backward(q, k, v, d_out, algorithm=algorithm, causal=True,
                                   block_rows=4, block_cols=3, scale=0.7)
    expected = reference_attention_backward(q, k, v, d_out, causal=True, scale=0.7)
    for got, exp in zip(grads, expected):
        assert got.shape == q.shape and got.dtype == q.dtype
        np.testing.assert_allclose(got, exp, rtol=1e-9, atol=1e-12)
    grads32 = run_attention_backward(*(x[0, 0].astype(np.float32) for x in (q, k, v, d_out)),
                                     algorithm=algorithm)
    assert all(g.dtype == np.float32 and g.shape == (11, 4) for g in grads32)
    with pytest.raises(IosimError, match=r"d_out must have the shape and dtype of q"):
        run_attention_backward(q, k, v, d_out[..., :2], algorithm=algorithm)
    bad = d_out.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(IosimError, match=r"d_out contains NaN"):
        run_attention_backward(q, k, v, bad, algorithm=algorithm)
