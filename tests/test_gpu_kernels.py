"""GPU tests of the CUDA kernels (need CuPy and a CUDA device; skipped elsewhere, e.g. in CI)."""
from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy", reason="CuPy is not installed (the GPU kernels need CuPy and a CUDA device)")
try:
    _NDEV = cp.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001 - no driver / no device
    _NDEV = 0
if _NDEV == 0:
    pytest.skip("no CUDA device visible to CuPy", allow_module_level=True)
if cp.cuda.Device().compute_capability < "80":
    pytest.skip("the kernels use mma.sync m16n8k16 / cp.async (sm_80+); built for sm_90", allow_module_level=True)

from gpu import kernels as K  # noqa: E402
from gpu import reference as R  # noqa: E402

SHAPES = [(1, 2, 200, 64), (1, 2, 200, 128), (2, 2, 256, 64), (1, 3, 130, 128)]


def _inputs(B, H, N, d, seed):
    rs = cp.random.RandomState(seed)
    return tuple(rs.standard_normal((B, H, N, d), dtype=cp.float32).astype(cp.float16) for _ in range(3))


def _check(alg, shape, causal, br=None, bc=None, seed=0):
    B, H, N, d = shape
    q, k, v = _inputs(B, H, N, d, seed)
    ref = R.attention_reference(q, k, v, causal, xp=cp)
    e16 = R.rel_error(R.attention_fp16_plain(q, k, v, causal, xp=cp), ref, xp=cp)
    out = cp.full((B, H, N, d), float("nan"), dtype=cp.float16)
    p = K.make_pipeline(alg, shape, causal, br, bc)
    p.run(q, k, v, out)
    cp.cuda.runtime.deviceSynchronize()
    assert bool(cp.isfinite(out).all()), "some output elements were not written"
    chk = R.check_error(R.rel_error(out, ref, xp=cp), e16)
    assert chk["passed"], chk
    return p, out, ref


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alg", ["standard", "megatron", "hf"])
def test_unfused(alg, shape, causal):
    _check(alg, shape, causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pair", [(64, 64), (128, 64), (128, 32), (64, 128)])
@pytest.mark.parametrize("alg", ["flash1", "flash2"])
def test_flash(alg, pair, shape, causal):
    _check(alg, shape, causal, *pair)


@pytest.mark.parametrize("wm, qreg", [(1, 1), (2, 1), (2, 0)])
def test_flash2_warp_tilings(wm, qreg):
    B, H, N, d = 1, 2, 200, 64
    q, k, v = _inputs(B, H, N, d, 5)
    ref = R.attention_reference(q, k, v, True, xp=cp)
    e16 = R.rel_error(R.attention_fp16_plain(q, k, v, True, xp=cp), ref, xp=cp)
    out = cp.full((B, H, N, d), float("nan"), dtype=cp.float16)
    p = K.make_pipeline("flash2", (B, H, N, d), True, 128, 64, wm=wm, qreg=qreg)
    p.run(q, k, v, out)
    assert R.check_error(R.rel_error(out, ref, xp=cp), e16)["passed"]


@pytest.mark.parametrize("causal", [False, True])
def test_flash2_logsumexp(causal):
    B, H, N, d = 1, 2, 200, 64
    q, k, v = _inputs(B, H, N, d, 7)
    p, _, _ = _check("flash2", (B, H, N, d), causal, 64, 64, seed=7)
    s = cp.einsum("bhnd,bhmd->bhnm", q.astype(cp.float64), k.astype(cp.float64)) / math.sqrt(d)
    if causal:
        s = cp.where(cp.tril(cp.ones((N, N), dtype=bool)), s, -cp.inf)
    mx = s.max(axis=-1, keepdims=True)
    lse = (mx + cp.log(cp.exp(s - mx).sum(axis=-1, keepdims=True)))[..., 0]
    assert float(cp.abs(p.L - lse).max()) < 1e-3


def test_softmax_rows_sum_to_one():
    B, H, N, d = 1, 1, 1000, 64   # N not a multiple of 8: scalar path
    q, k, v = _inputs(B, H, N, d, 3)
    p = K.make_pipeline("standard", (B, H, N, d), False)
    out = cp.empty((B, H, N, d), dtype=cp.float16)
    p.run(q, k, v, out)
    sums = p.P.astype(cp.float64).sum(axis=-1)
    assert float(cp.abs(sums - 1).max()) < 5e-3


def test_results_are_deterministic():
    B, H, N, d = 1, 2, 256, 128
    q, k, v = _inputs(B, H, N, d, 11)
    p = K.make_pipeline("flash2", (B, H, N, d), False, 128, 32)
    a = cp.empty((B, H, N, d), dtype=cp.float16)
    b = cp.empty_like(a)
    p.run(q, k, v, a)
    p.run(q, k, v, b)
    assert bool((a == b).all())


# ------------------------------------------------------------------------------------ standard backward
from gpu import backward as BW  # noqa: E402

BWD_SHAPES = [(1, 2, 200, 64), (2, 2, 256, 128), (1, 3, 130, 64), (1, 1, 1000, 64)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", BWD_SHAPES)
def test_standard_backward(shape, causal):
    B, H, N, d = shape
    rs = cp.random.RandomState(21 + N)
    q, k, v, do = (rs.standard_normal(shape, dtype=cp.float32).astype(cp.float16) for _ in range(4))
    _, P = BW.forward_P(q, k, v, causal)
    refs = BW.attention_backward_reference(q, k, v, do, causal, xp=cp)
    e16 = [R.rel_error(g, r, xp=cp) for g, r in zip(BW.backward_fp16_plain(q, k, v, do, causal, xp=cp), refs)]
    chk, grads = BW.check_backward(q, k, v, do, P, refs, e16, causal)
    assert chk["passed"], chk
    assert all(bool(cp.isfinite(g).all()) for g in grads)


def test_softmax_backward_kernel_rows():
    B, H, N, d = 1, 2, 264, 64
    rs = cp.random.RandomState(3)
    s = rs.standard_normal((B, H, N, N), dtype=cp.float32)
    P = (cp.exp(s) / cp.exp(s).sum(-1, keepdims=True)).astype(cp.float16)
    dP = rs.standard_normal((B, H, N, N), dtype=cp.float32).astype(cp.float16)
    bw = BW.StandardBackward((B, H, N, d))
    dS = cp.full((B, H, N, N), float("nan"), dtype=cp.float16)
    bw.softmax_backward(P, dP, dS)
    p64, g64 = P.astype(cp.float64), dP.astype(cp.float64)
    want = p64 * (g64 - (p64 * g64).sum(-1, keepdims=True))
    assert float(cp.abs(dS.astype(cp.float64) - want).max()) < 2e-3


def test_backward_reference_matches_iosim_reference():
    from iosim.reference import reference_attention_backward

    rs = cp.random.RandomState(4)
    q, k, v, do = (rs.standard_normal((1, 2, 33, 16), dtype=cp.float32).astype(cp.float16) for _ in range(4))
    for causal in (False, True):
        got = BW.attention_backward_reference(q, k, v, do, causal, xp=cp)
        want = reference_attention_backward(*(cp.asnumpy(x) for x in (q, k, v, do)), causal=causal)
        for g, w in zip(got, want):
            assert float(cp.abs(g - cp.asarray(w)).max()) < 1e-10


# ------------------------------------------------------------------------------------ flash2 backward
FLASH2_BWD_SHAPES = [(1, 2, 128, 64), (1, 2, 128, 128), (1, 2, 200, 64), (1, 2, 200, 128), (1, 3, 130, 64),
                     (2, 2, 256, 128), (1, 1, 1000, 64)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", FLASH2_BWD_SHAPES)
@pytest.mark.parametrize("ordered", [False, True])
def test_flash2_backward(shape, causal, ordered):
    """dQ, dK, dV of flash2_bwd_dot / flash2_bwd / flash2_bwd_convert (O, L from the flash2 forward) against the
    float64 gradient: <= 2x the plain fp16 backward's error + 1e-4, NaN-poisoned outputs, two identical runs."""
    B, H, N, d = shape
    rs = cp.random.RandomState(77 + N + d)
    q, k, v, do = (rs.standard_normal(shape, dtype=cp.float32).astype(cp.float16) for _ in range(4))
    saved = BW.forward_saved("flash2", q, k, v, causal)
    refs = BW.attention_backward_reference(q, k, v, do, causal, xp=cp)
    e16 = [R.rel_error(g, r, xp=cp) for g, r in zip(BW.backward_fp16_plain(q, k, v, do, causal, xp=cp), refs)]
    chk, grads = BW.check_backward(q, k, v, do, saved, refs, e16, causal, algorithm="flash2", ordered=ordered)
    assert all(bool(cp.isfinite(g).all()) for g in grads)
    if ordered:  # deterministic dQ: the whole rule, bitwise-identical reruns included
        assert chk["passed"], chk
    else:        # unordered fp32 atomicAdd: dQ may differ in the last bit run to run (as FA2); dK, dV may not
        g = chk["grads"]
        assert all(g[n]["rel_error"] is not None and g[n]["rel_error"] <= g[n]["error_bound"] for n in BW.GRADS), chk
        assert g["dk"]["passed"] and g["dv"]["passed"], chk


def test_flash2_backward_dot_kernel():
    B, H, N, d = 1, 2, 70, 128
    rs = cp.random.RandomState(5)
    o, do = (rs.standard_normal((B, H, N, d), dtype=cp.float32).astype(cp.float16) for _ in range(2))
    bw = K.Flash2Backward((B, H, N, d))
    bw.dQacc.fill(float("nan"))
    np = pytest.importorskip("numpy")
    bw.sem.fill(7)
    bw.k_dot(((B * H * N + 3) // 4,), (128,), (o, do, bw.Dv, bw.dQacc, bw.sem, np.int64(B * H * N), np.int32(N)))
    assert bool((bw.sem == 0).all())
    want = (o.astype(cp.float64) * do.astype(cp.float64)).sum(-1)
    assert float(cp.abs(bw.Dv - want).max()) < 1e-3
    assert bool((bw.dQacc == 0).all())


# ---- flash3 (gpu/flash3.cu: wgmma, TMA, warp specialisation; sm_90a only) ----
_SM90 = cp.cuda.Device().compute_capability == "90"
FLASH3_PAIRS = [(128, 128), (128, 64), (192, 128), (128, 192)]


def _flash3_pairs(d):
    from gpu import flash3 as F3
    return [p for p in FLASH3_PAIRS if F3.fits(p[0], p[1], d)]


@pytest.mark.skipif(not _SM90, reason="flash3 is built for sm_90a (Hopper) only")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES + [(1, 2, 1000, 64), (2, 1, 333, 128)])
def test_flash3(shape, causal):
    for br, bc in _flash3_pairs(shape[3]):
        p, out, _ = _check("flash3", shape, causal, br, bc, seed=br + bc)
        q, k, v = _inputs(*shape, br + bc)
        again = cp.full_like(out, float("nan"))
        p.run(q, k, v, again)
        assert bool((again == out).all()), "flash3 is not deterministic"


@pytest.mark.skipif(not _SM90, reason="flash3 is built for sm_90a (Hopper) only")
@pytest.mark.parametrize("causal", [False, True])
def test_flash3_logsumexp_matches_flash2(causal):
    B, H, N, d = 1, 2, 200, 128
    p3, _, _ = _check("flash3", (B, H, N, d), causal, 128, 128, seed=7)
    q, k, v = _inputs(B, H, N, d, 7)
    s = cp.einsum("bhnd,bhmd->bhnm", q.astype(cp.float64), k.astype(cp.float64)) / math.sqrt(d)
    if causal:
        s = cp.where(cp.tril(cp.ones((N, N), dtype=bool)), s, -cp.inf)
    mx = s.max(axis=-1, keepdims=True)
    lse = (mx + cp.log(cp.exp(s - mx).sum(axis=-1, keepdims=True)))[..., 0]
    assert float(cp.abs(p3.L - lse).max()) < 1e-3


@pytest.mark.parametrize("defines", [{"FUSE_SDP": 0}, {"PIPE_DQ": 0}, {"KV_REGS": 0, "P_F32": 0}])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_flash2_backward_variants(defines, d, causal):
    """flash2_bwd.cu's switches (FUSE_SDP, PIPE_DQ, KV_REGS / P_F32) give gradients within the error rule."""
    for br, bc in ((64, 128), (32, 128)):
        chk = BW.flash2_variant_check(br, bc, defines, (1, 2, 200, d), causal, 99 + d)
        assert chk["passed"], (br, bc, defines, chk)


# ---- flash3 backward (gpu/flash3_bwd.cu: wgmma, TMA, warp specialisation; sm_90a only) ----
FLASH3_BWD_SHAPES = [(1, 2, 200, 64), (1, 2, 200, 128), (1, 2, 256, 64), (1, 2, 256, 128), (2, 1, 333, 128),
                     (1, 1, 1000, 64), (1, 2, 128, 64)]


@pytest.mark.skipif(not _SM90, reason="flash3_bwd is built for sm_90a (Hopper) only")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", FLASH3_BWD_SHAPES)
def test_flash3_backward(shape, causal):
    """dQ, dK, dV of flash2_bwd_dot / flash3_bwd / flash2_bwd_convert (O, L from the flash2 forward) against the
    float64 gradient: <= 2x the plain fp16 backward's error + 1e-4, NaN-poisoned outputs; dK, dV identical on a
    second run (dQ: unordered fp32 atomics, as flash2's default)."""
    B, H, N, d = shape
    rs = cp.random.RandomState(91 + N + d)
    q, k, v, do = (rs.standard_normal(shape, dtype=cp.float32).astype(cp.float16) for _ in range(4))
    saved = BW.forward_saved("flash3", q, k, v, causal)
    refs = BW.attention_backward_reference(q, k, v, do, causal, xp=cp)
    e16 = [R.rel_error(g, r, xp=cp) for g, r in zip(BW.backward_fp16_plain(q, k, v, do, causal, xp=cp), refs)]
    chk, grads = BW.check_backward(q, k, v, do, saved, refs, e16, causal, algorithm="flash3")
    assert all(bool(cp.isfinite(g).all()) for g in grads)
    g = chk["grads"]
    assert all(g[n]["rel_error"] is not None and g[n]["rel_error"] <= g[n]["error_bound"] for n in BW.GRADS), chk
    assert g["dk"]["passed"] and g["dv"]["passed"], chk


@pytest.mark.skipif(not _SM90, reason="flash3_bwd is built for sm_90a (Hopper) only")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_flash3_backward_variants(d, causal):
    """Every entry of flash3_bwd.VARIANTS gives gradients within the error rule."""
    from gpu import flash3_bwd as F3B

    for br, bc, defines in F3B.VARIANTS[d]:
        chk = BW.flash2_variant_check(br, bc, defines, (1, 2, 200, d), causal, 19 + d, algorithm="flash3")
        assert chk["passed"], (br, bc, defines, chk)
