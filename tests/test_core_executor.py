"""The numeric executor runs each algorithm's schedule tile by tile; its output must be attention.

Expectations come from references written here (a row-by-row loop and a SciPy softmax), never
from iosim's own output. float16 runs earn their tolerance the flash-attention way: at most 2x the
error of a plain float16 NumPy implementation on the same inputs.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
from hypothesis import assume, given, strategies as st

import iosim
from iosim import AttentionShape, IosimError, TilingError, build_schedule, execute, run_attention

ALGORITHMS = sorted(iosim.ALGORITHMS)
EXACT_RTOL = 1e-10


# ---- independent references -------------------------------------------------------------------

def loop_attention(q, k, v, *, causal, scale, return_stats=False):
    """float64 attention, one query row at a time: the causal mask by truncating the key range
    (keys 0..r for row r), the softmax by subtracting that row's max. Last two axes are (N, d)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    lead = q.shape[:-2]
    n, d = q.shape[-2:]
    qf, kf, vf = (x.reshape(-1, n, d) for x in (q, k, v))
    out = np.empty_like(qf)
    row_max = np.empty(qf.shape[:2])
    row_sum = np.empty(qf.shape[:2])
    for h in range(qf.shape[0]):
        for r in range(n):
            keys = r + 1 if causal else n
            scores = np.array([scale * float(np.dot(qf[h, r], kf[h, c])) for c in range(keys)])
            top = scores.max()
            weights = np.exp(scores - top)
            total = weights.sum()
            out[h, r] = (weights[:, None] * vf[h, :keys]).sum(axis=0) / total
            row_max[h, r], row_sum[h, r] = top, total
    out = out.reshape(q.shape)
    if return_stats:
        return out, row_max.reshape(lead + (n,)), row_sum.reshape(lead + (n,))
    return out


def scipy_attention(q, k, v, *, causal, scale):
    """float64 attention via scipy.special.softmax with the mask as -inf scores."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    s = np.einsum("...rd,...cd->...rc", q, k) * scale
    if causal:
        n = s.shape[-1]
        above = np.arange(n)[None, :] > np.arange(n)[:, None]
        s = np.where(above, -np.inf, s)
    return np.einsum("...rc,...cd->...rd", scipy.special.softmax(s, axis=-1), v)


def plain_fp16_attention(q, k, v, *, causal, scale):
    """The low-precision baseline: matmul, softmax and matmul all in float16 NumPy."""
    assert q.dtype == k.dtype == v.dtype == np.float16
    s = (q @ np.swapaxes(k, -1, -2)) * np.float16(scale)
    if causal:
        n = s.shape[-1]
        above = np.arange(n)[None, :] > np.arange(n)[:, None]
        s = np.where(above, np.float16(-np.inf), s)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    out = p @ v
    assert s.dtype == e.dtype == p.dtype == out.dtype == np.float16
    return out


def rel_err(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


# ---- strategies --------------------------------------------------------------------------------

@st.composite
def block_size(draw, n):
    """1, a divisor of n, anything in 1..n, exactly n, or larger than n."""
    divisors = [x for x in range(1, n + 1) if n % x == 0]
    return draw(st.one_of(st.just(1), st.sampled_from(divisors), st.integers(1, n), st.just(n),
                          st.integers(n + 1, n + 40)))


@st.composite
def problems(draw, max_n=70, max_d=24, dtype=np.float64, algorithms=ALGORITHMS):
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, max_d))
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 2))
    two_d = b == 1 and h == 1 and draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shape = (n, d) if two_d else (b, h, n, d)
    q, k, v = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    return dict(algorithm=draw(st.sampled_from(algorithms)), q=q, k=k, v=v,
                causal=draw(st.booleans()), block_rows=draw(block_size(n)),
                block_cols=draw(block_size(n)))


# ---- the references agree with each other ---------------------------------------------------

@given(problems(algorithms=["standard"]), st.one_of(st.none(), st.floats(0.01, 10.0)))
def test_reference_attention_matches_independent_references(p, scale):
    q, k, v, causal = p["q"], p["k"], p["v"], p["causal"]
    effective = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    expected, exp_max, exp_sum = loop_attention(q, k, v, causal=causal, scale=effective,
                                                return_stats=True)
    assert rel_err(scipy_attention(q, k, v, causal=causal, scale=effective),
                   expected) <= EXACT_RTOL
    out, row_max, row_sum = iosim.reference_attention(q, k, v, causal=causal, scale=scale,
                                                      return_stats=True)
    assert out.shape == q.shape and out.dtype == np.float64
    assert rel_err(out, expected) <= EXACT_RTOL
    np.testing.assert_allclose(row_max, exp_max, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(row_sum, exp_sum, rtol=1e-12)


def test_loop_reference_on_a_hand_computed_case():
    # scores of row 0 and row 1 are [0, ln 3]: softmax [1/4, 3/4]; V = [1, 5] -> 1/4 + 15/4 = 4.
    q = np.array([[1.0], [1.0]])
    k = np.array([[0.0], [math.log(3.0)]])
    v = np.array([[1.0], [5.0]])
    np.testing.assert_allclose(loop_attention(q, k, v, causal=False, scale=1.0), [[4.0], [4.0]])
    np.testing.assert_allclose(loop_attention(q, k, v, causal=True, scale=1.0), [[1.0], [4.0]])


# ---- every algorithm computes attention --------------------------------------------------------

@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("causal, expected", [(False, [[4.0], [4.0]]), (True, [[1.0], [4.0]])])
def test_hand_computed_case(algorithm, causal, expected):
    q = np.array([[1.0], [1.0]])
    k = np.array([[0.0], [math.log(3.0)]])
    v = np.array([[1.0], [5.0]])
    for blocks in [(1, 1), (2, 2), (1, 2), (2, 1), (5, 7)]:
        out = run_attention(q, k, v, algorithm=algorithm, causal=causal, scale=1.0,
                            block_rows=blocks[0], block_cols=blocks[1])
        np.testing.assert_allclose(out, expected, rtol=1e-12)


@given(problems())
def test_run_attention_equals_float64_attention(p):
    q, k, v = p["q"], p["k"], p["v"]
    before = [x.copy() for x in (q, k, v)]
    out = run_attention(q, k, v, algorithm=p["algorithm"], causal=p["causal"],
                        block_rows=p["block_rows"], block_cols=p["block_cols"])
    assert out.shape == q.shape and out.dtype == np.float64
    expected = loop_attention(q, k, v, causal=p["causal"], scale=1.0 / math.sqrt(q.shape[-1]))
    assert rel_err(out, expected) <= EXACT_RTOL
    for x, y in zip((q, k, v), before):
        np.testing.assert_array_equal(x, y)  # inputs left untouched


@given(problems(max_n=40), st.floats(0.01, 10.0))
def test_custom_scale(p, scale):
    q, k, v = p["q"], p["k"], p["v"]
    out = run_attention(q, k, v, algorithm=p["algorithm"], causal=p["causal"], scale=scale,
                        block_rows=p["block_rows"], block_cols=p["block_cols"])
    expected = loop_attention(q, k, v, causal=p["causal"], scale=scale)
    assert rel_err(out, expected) <= EXACT_RTOL


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_scale_changes_the_result(algorithm):
    # guards against a scale= that is accepted and then ignored
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((9, 5)) for _ in range(3))
    out = run_attention(q, k, v, algorithm=algorithm, scale=3.0, block_rows=4, block_cols=3)
    default = loop_attention(q, k, v, causal=False, scale=1 / math.sqrt(5))
    assert rel_err(out, default) > 1e-3
    assert rel_err(out, loop_attention(q, k, v, causal=False, scale=3.0)) <= EXACT_RTOL


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_heads_are_independent_and_in_order(algorithm):
    # (B, H, N, d): each (b, h) slice must be attention over that slice alone
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 3, 11, 4)) for _ in range(3))
    out = run_attention(q, k, v, algorithm=algorithm, causal=True, block_rows=4, block_cols=5)
    for b in range(2):
        for h in range(3):
            expected = loop_attention(q[b, h], k[b, h], v[b, h], causal=True, scale=0.5)
            assert rel_err(out[b, h], expected) <= EXACT_RTOL


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_keeps_input_dtype(algorithm, dtype):
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 13, 6)).astype(dtype) for _ in range(3))
    out = run_attention(q, k, v, algorithm=algorithm, block_rows=4, block_cols=4)
    assert out.dtype == dtype and out.shape == q.shape
    tol = EXACT_RTOL if dtype == np.float64 else 1e-5
    assert rel_err(out, loop_attention(q, k, v, causal=False, scale=1 / math.sqrt(6))) <= tol


# ---- running statistics after the last block equal the global ones ---------------------------

@st.composite
def flash_problems(draw):
    n = draw(st.integers(1, 50))
    d = draw(st.integers(1, 16))
    bh = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, k, v = (rng.standard_normal((bh, n, d)) for _ in range(3))
    return dict(q=q, k=k, v=v, n=n, d=d, bh=bh, causal=draw(st.booleans()),
                block_rows=draw(block_size(n)), block_cols=draw(block_size(n)))


def _expected_stats(p):
    _, row_max, row_sum = loop_attention(p["q"], p["k"], p["v"], causal=p["causal"],
                                         scale=1 / math.sqrt(p["d"]), return_stats=True)
    return row_max, row_sum


@given(flash_problems())
def test_flash1_running_max_and_sum_are_global(p):
    shape = AttentionShape(1, p["bh"], p["n"], p["d"], dtype="fp32", causal=p["causal"])
    schedule = build_schedule("flash1", shape, p["block_rows"], p["block_cols"])
    result = execute(schedule, p["q"], p["k"], p["v"])
    row_max, row_sum = _expected_stats(p)
    np.testing.assert_allclose(result.tensors["m"][:, :, 0], row_max, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.tensors["l"][:, :, 0], row_sum, rtol=1e-12)
    assert rel_err(result.output, loop_attention(p["q"], p["k"], p["v"], causal=p["causal"],
                                                 scale=1 / math.sqrt(p["d"]))) <= EXACT_RTOL


@given(flash_problems())
def test_flash2_running_max_and_sum_are_global(p):
    shape = AttentionShape(p["bh"], 1, p["n"], p["d"], dtype="fp32", causal=p["causal"])
    schedule = build_schedule("flash2", shape, p["block_rows"], p["block_cols"])
    result = execute(schedule, p["q"], p["k"], p["v"], capture=("m", "l"))
    row_max, row_sum = _expected_stats(p)
    np.testing.assert_allclose(result.captured["m"], row_max, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.captured["l"], row_sum, rtol=1e-12)
    # the log-sum-exp FlashAttention-2 writes for the backward pass
    np.testing.assert_allclose(result.tensors["L"][:, :, 0], row_max + np.log(row_sum),
                               rtol=1e-12, atol=1e-12)


# ---- stable softmax: logits up to +-1e4 ------------------------------------------------------

def _large_logit_inputs(kind, n=12, d=6, seed=11):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((n, d)) for _ in range(3))
    scale = 1 / math.sqrt(d)
    if kind == "signed":  # scores spread over [-1e4, 1e4]
        s = (q @ k.T) * scale
        q = q * (1e4 / np.abs(s).max())
    else:  # every score near +1e4 or near -1e4: exp(s) alone overflows or underflows
        big = math.sqrt(1e4 / scale)
        q[:, 0] = big if kind == "all_high" else -big
        k[:, 0] = big
    s = (q @ k.T) * scale
    if kind == "signed":
        assert s.max() > 1e3 and s.min() < -1e3 and np.isclose(np.abs(s).max(), 1e4)
    else:
        assert np.all(np.abs(np.abs(s) - 1e4) < 20)
    return q, k, v


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("kind", ["signed", "all_high", "all_low"])
@pytest.mark.parametrize("causal", [False, True])
def test_large_logits_are_stable(algorithm, kind, causal):
    q, k, v = _large_logit_inputs(kind)
    expected = loop_attention(q, k, v, causal=causal, scale=1 / math.sqrt(6))
    assert np.all(np.isfinite(expected))
    with np.errstate(over="raise"):
        out = run_attention(q, k, v, algorithm=algorithm, causal=causal, block_rows=5,
                            block_cols=4)
    assert np.all(np.isfinite(out))
    assert rel_err(out, expected) <= EXACT_RTOL
    out32 = run_attention(*(x.astype(np.float32) for x in (q, k, v)), algorithm=algorithm,
                          causal=causal, block_rows=5, block_cols=4)
    assert out32.dtype == np.float32 and np.all(np.isfinite(out32))


# ---- float16: an earned tolerance ------------------------------------------------------------

@given(problems(max_n=64, max_d=24, dtype=np.float16))
def test_float16_error_at_most_twice_plain_float16(p):
    q, k, v, causal = p["q"], p["k"], p["v"], p["causal"]
    scale = 1 / math.sqrt(q.shape[-1])
    expected = loop_attention(q, k, v, causal=causal, scale=scale)  # float64 on the fp16 values
    out = run_attention(q, k, v, algorithm=p["algorithm"], causal=causal,
                        block_rows=p["block_rows"], block_cols=p["block_cols"])
    assert out.dtype == np.float16 and out.shape == q.shape
    assert np.all(np.isfinite(out))
    plain = plain_fp16_attention(q, k, v, causal=causal, scale=scale)
    assume(np.all(np.isfinite(plain)))
    assert rel_err(out, expected) <= 2 * rel_err(plain, expected) + 1e-3


# ---- bad inputs ------------------------------------------------------------------------------

def _qkv(shape=(6, 4), dtype=np.float64):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(shape).astype(dtype) for _ in range(3)]


@pytest.mark.parametrize("bad", [0, -1, 2.5, 3.0, True, "4", [2]])
@pytest.mark.parametrize("which", ["block_rows", "block_cols"])
def test_bad_block_sizes_are_refused(which, bad):
    q, k, v = _qkv()
    with pytest.raises(IosimError, match=rf"{which} must be a positive integer"):
        run_attention(q, k, v, algorithm="flash2", **{which: bad})


def test_block_sizes_accept_numpy_integers():
    q, k, v = _qkv()
    out = run_attention(q, k, v, algorithm="flash2", block_rows=np.int64(4),
                        block_cols=np.int32(3))
    assert rel_err(out, loop_attention(q, k, v, causal=False, scale=0.5)) <= EXACT_RTOL


@pytest.mark.parametrize("make, pattern", [
    (lambda q, k, v: (q, k[:5], v), r"same shape"),
    (lambda q, k, v: (q, k, v[:, :3]), r"same shape"),
    (lambda q, k, v: (q, k.astype(np.float32), v), r"same dtype"),
    (lambda q, k, v: (q.astype(np.float16), k, v), r"same dtype"),
    (lambda q, k, v: (q.astype(np.int64), k, v), r"q must be a float16, float32 or float64"),
    (lambda q, k, v: (q, k.astype(bool), v), r"k must be a float16, float32 or float64"),
    (lambda q, k, v: (q, k, v.astype(np.complex128)), r"v must be a float16, float32 or float64"),
    (lambda q, k, v: (q[0], k[0], v[0]), r"shape \(N, d\) or \(B, H, N, d\)"),
    (lambda q, k, v: (q[None], k[None], v[None]), r"shape \(N, d\) or \(B, H, N, d\)"),
    (lambda q, k, v: (q[None, None, None], k[None, None, None], v[None, None, None]),
     r"shape \(N, d\) or \(B, H, N, d\)"),
    (lambda q, k, v: (q[:0], k[:0], v[:0]), r"empty dimension.*>= 1"),
    (lambda q, k, v: (q[:, :0], k[:, :0], v[:, :0]), r"empty dimension.*>= 1"),
    (lambda q, k, v: (np.zeros((1, 0, 6, 4)),) * 3, r"empty dimension.*>= 1"),
])
def test_bad_arrays_are_refused(make, pattern):
    q, k, v = make(*_qkv())
    with pytest.raises(IosimError, match=pattern):
        run_attention(q, k, v, algorithm="standard")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_non_finite_inputs_are_refused(which, value):
    arrays = _qkv()
    arrays[which][2, 1] = value
    name = "qkv"[which]
    with pytest.raises(IosimError, match=rf"{name} contains NaN or infinite values"):
        run_attention(*arrays, algorithm="flash1")


def test_unknown_algorithm_is_refused_naming_the_allowed_ones():
    q, k, v = _qkv()
    with pytest.raises(IosimError, match=r"unknown algorithm 'flash9'; allowed:") as info:
        run_attention(q, k, v, algorithm="flash9")
    for name in iosim.ALGORITHMS:
        assert name in str(info.value)
    with pytest.raises(IosimError, match=r"unknown algorithm"):
        run_attention(q, k, v, algorithm=["flash2"])


@pytest.mark.parametrize("scale", [0, 0.0, -1.0, -1e-9, np.nan, np.inf, "0.5", 1 + 0j])
def test_non_positive_or_non_finite_scale_is_refused(scale):
    q, k, v = _qkv()
    with pytest.raises(IosimError, match=r"scale must be a positive finite number"):
        run_attention(q, k, v, algorithm="hf", scale=scale)


def test_numpy_scalar_scale_is_accepted():
    q, k, v = _qkv()
    out = run_attention(q, k, v, algorithm="flash2", scale=np.float32(0.5))
    assert rel_err(out, loop_attention(q, k, v, causal=False, scale=0.5)) <= 1e-7


def test_block_pair_too_large_for_sram():
    # flash2 keeps Q_i and double-buffered K_j, V_j tiles in shared memory:
    # (Br + 2·2·Bc)·d elements of fp16.
    n = d = 256
    need = (256 + 4 * 256) * d * 2
    available = iosim.load_hardware("h100-measured").sram_bytes_per_block
    assert need > available
    q, k, v = _qkv((n, d), np.float16)
    with pytest.raises(TilingError, match=rf"needs {need} bytes .*{available} bytes are available"):
        run_attention(q, k, v, algorithm="flash2", block_rows=256, block_cols=256)
    # same through build_schedule with an explicit SRAM size
    shape = AttentionShape(1, 1, 64, 16, dtype="fp16")
    need_small = (32 + 4 * 32) * 16 * 2
    with pytest.raises(TilingError, match=rf"needs {need_small} bytes.*1000 bytes are available"):
        build_schedule("flash2", shape, 32, 32, sram_bytes=1000)
    # and it is an IosimError, hence a ValueError
    assert issubclass(TilingError, IosimError) and issubclass(IosimError, ValueError)


def test_default_blocks_fit_where_given_blocks_do_not():
    shape = AttentionShape(1, 1, 256, 256, dtype="fp16")
    schedule = build_schedule("flash2", shape)
    sram = iosim.load_hardware("h100-measured").sram_bytes_per_block
    assert (schedule.block_rows + 4 * schedule.block_cols) * 256 * 2 <= sram  # K, V double-buffered
