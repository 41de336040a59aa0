"""GQA prefill and split-KV decode (gpu/inference.py, gpu/decode.cu, flash2.cu GQA=1).

The first part is CPU-only (host-side logic: split ranges, shape checks, the GQA reference); the GPU tests at the
end carry the ``gpu`` marker and skip without CuPy or a CUDA device.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gpu import inference as I
from gpu import reference as R

DATA = Path(__file__).resolve().parents[1] / "experiments" / "data" / "h100" / "bench_inference.json"


# --------------------------------------------------------------------------------------------- CPU only
@pytest.mark.parametrize("M", [1, 63, 64, 65, 1000, 4096, 32768, 32769])
@pytest.mark.parametrize("bc", [32, 64])
@pytest.mark.parametrize("splits", [1, 2, 3, 4, 7, 16, 32, 100])
def test_split_ranges_tile_the_kv_sequence(M, bc, splits):
    ranges = I.split_ranges(M, bc, splits)
    c = math.ceil(math.ceil(M / bc) / splits)
    assert 1 <= len(ranges) <= splits
    assert ranges[0][0] == 0 and ranges[-1][1] == M
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
        assert a1 == b0                       # contiguous, no overlap
    for s, (a, b) in enumerate(ranges):
        assert a < b                          # every launched split holds keys
        assert a == s * c * bc                # split s starts at block s*c
        assert b - a <= c * bc


def test_effective_splits_match_the_simulator():
    from iosim.schedules import flash_decoding as FD

    for M in (1, 100, 4096, 5000, 32768):
        for bc in (32, 64, 128):
            for s in (1, 2, 3, 5, 8, 32, 64):
                per, eff = FD.split_size(SimpleNamespace(kv_seq_len=M), bc, s)
                assert I.blocks_per_split(M, bc, s) == per
                assert I.effective_splits(M, bc, s) == eff


def test_target_shape_bytes_by_hand():
    t = I.DECODE_TARGET
    b = I.decode_bytes(t["batch"], t["heads"], t["kv_heads"], t["seq_len"], t["kv_seq_len"], t["head_dim"], 1)
    assert b["kv_bytes"] == 2 * 16 * 8 * 32768 * 128 * 2          # K and V, fp16: 2 GiB
    assert b["kv_bytes"] == 2 ** 31
    assert b["partial_bytes"] == 0
    b8 = I.decode_bytes(16, 32, 8, 1, 32768, 128, 8)
    assert b8["partial_bytes"] == 16 * 32 * 8 * (128 + 1) * 4     # O_part + L_part, fp32
    assert b8["total_bytes"] == b["total_bytes"] + 2 * b8["partial_bytes"]


@pytest.mark.parametrize("bad", [dict(heads=32, kv_heads=6), dict(head_dim=96), dict(batch=0),
                                 dict(seq_len=10, kv_seq_len=5, causal=True), dict(kv_heads=True)])
def test_check_shape_rejects(bad):
    args = dict(batch=1, heads=32, kv_heads=8, seq_len=1, kv_seq_len=100, head_dim=128, causal=False)
    args.update(bad)
    with pytest.raises(ValueError):
        I.check_shape(**args)


def test_check_shape_group():
    assert I.check_shape(1, 32, 8, 1, 100, 128) == 4
    assert I.check_shape(1, 32, 1, 16, 100, 64, causal=True) == 32


def test_decode_tiling_and_smem():
    t = I.decode_tiling(128, 4, 64, 4)
    assert (t["threads"], t["block_rows"], t["rowsplit"]) == (128, 16, False)
    assert t["smem_bytes"] == 2 * 128 * 16 + 4 * 2 * 64 * 128 * 2    # Q tile + 4 x (K, V) tiles
    t = I.decode_tiling(128, 64, 64, 4)                                # 64 rows: warps split the rows
    assert (t["block_rows"], t["rowsplit"]) == (64, True)
    assert t["smem_bytes"] == 2 * 128 * 64 + 4 * 2 * 64 * 128 * 2
    assert not I.decode_tiling(64, 16)["rowsplit"] and I.decode_tiling(64, 17)["rowsplit"]
    with pytest.raises(ValueError):
        I.decode_tiling(128, 4, 40)
    with pytest.raises(ValueError):
        I.decode_tiling(128, 4, 64, 1)
    assert I.decode_grid(16, 8, 4, 1, 32) == (32, 8, 16)                      # split fastest
    assert I.decode_grid(2, 2, 4, 16, 3, 16) == (3, 2 * 4, 2)                 # 64 rows in chunks of 16
    assert I.decode_grid(2, 2, 4, 16, 3, 64) == (3, 2, 2)                     # ... or of 64 (ROWSPLIT)


@pytest.mark.parametrize("N, M", [(1, 1), (1, 9), (4, 10), (7, 7), (3, 40)])
def test_causal_keep_and_visible_pairs(N, M):
    keep = I.causal_keep(N, M)
    for r in range(N):
        for c in range(M):
            assert keep[r, c] == (c <= r + M - N)
    assert I.visible_pairs(N, M, True) == int(keep.sum())
    assert I.visible_pairs(N, M, False) == N * M


def test_flops_convention():
    assert I.attention_flops_gqa(2, 4, 8, 8, 64, True) == 4 * 2 * 4 * 8 * 8 * 64 / 2     # bench's N^2/2
    assert I.attention_flops_gqa(2, 4, 1, 100, 64, True) == 4 * 2 * 4 * 100 * 64


def test_sets_for():
    l2 = 50 * 2 ** 20
    assert I.sets_for(2 ** 31, l2) == 2
    assert I.sets_for(16 * 2 ** 20, l2) == 13            # >= 4 x L2 in all
    assert I.sets_for(10 ** 6, l2) == 32                 # capped
    assert I.sets_for(15 * 10 ** 9, l2) == 1             # one set when two would pass 20 GB


def _gqa_qkv(rng, B, H, Hk, N, M, d):
    q = rng.standard_normal((B, H, N, d)).astype(np.float16)
    k = rng.standard_normal((B, Hk, M, d)).astype(np.float16)
    v = rng.standard_normal((B, Hk, M, d)).astype(np.float16)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
def test_gqa_reference_equals_mha_reference_on_expanded_kv(causal):
    rng = np.random.default_rng(3)
    q, k, v = _gqa_qkv(rng, 2, 6, 2, 9, 9, 8)
    ref = I.gqa_reference(q, k, v, causal, np)
    mha = R.attention_reference(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1), causal)
    np.testing.assert_allclose(ref, mha, rtol=1e-12, atol=1e-12)


def test_gqa_reference_end_aligned_causal_by_rows():
    rng = np.random.default_rng(4)
    B, H, Hk, N, M, d = 1, 4, 2, 3, 7, 5
    q, k, v = _gqa_qkv(rng, B, H, Hk, N, M, d)
    ref = I.gqa_reference(q, k, v, True, np)
    for h in range(H):
        for r in range(N):
            c = r + M - N + 1      # keys 0 .. r + M - N
            s = q[0, h, r].astype(np.float64) @ k[0, h // 2, :c].astype(np.float64).T / math.sqrt(d)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(ref[0, h, r], (p / p.sum()) @ v[0, h // 2, :c].astype(np.float64),
                                       rtol=1e-10, atol=1e-12)


def test_gqa_reference_fp16_plain_is_close_but_not_exact():
    rng = np.random.default_rng(5)
    q, k, v = _gqa_qkv(rng, 1, 4, 1, 2, 300, 64)
    ref = I.gqa_reference(q, k, v, False, np)
    o16 = I.gqa_reference(q, k, v, False, np, fp16_plain=True)
    assert o16.dtype == np.float16
    e = R.rel_error(o16, ref)
    assert 1e-5 < e < 5e-3


def _decode_run(num_splits, names):
    return dict(batch=1, heads=4, seq_len=1, head_dim=64, causal=False, algorithm="flash_decoding",
                kv_heads=1, kv_seq_len=100, num_splits=num_splits, block_rows=16, block_cols=64,
                rel_error=1e-4, rel_error_fp16_reference=1e-4, error_bound=3e-4, passed=True,
                time_s={"median": 1e-5, "min": 1e-5, "max": 2e-5}, tflops=0.1,
                kernels=[{"name": n, "time_s": None, "dram_read_bytes": None, "dram_write_bytes": None,
                          "ncu_duration_s": None} for n in names])


def _doc(runs):
    dev = {k: 1 for k in ("name", "driver", "cuda_runtime", "cupy", "torch", "sm_count", "l2_bytes",
                          "smem_per_block_optin")}
    st = {k: 1 for k in ("dtype", "warmup", "repeats", "input_sets", "ncu_cache_control", "ncu_clock_control")}
    return {"schema": "iosim-gpu-bench/1", "date": "2026-11-26", "device": dev, "settings": st, "runs": runs,
            "baselines": []}


def test_validate_decode_kernel_lists():
    assert I.validate(_doc([_decode_run(1, ["flash_decoding_split"])])) == []
    assert I.validate(_doc([_decode_run(2, I.DECODE_KERNELS)])) == []
    assert I.validate(_doc([_decode_run(1, I.DECODE_KERNELS)]))          # no combine with one split
    assert I.validate(_doc([_decode_run(4, ["flash_decoding_split"])]))
    bad = _decode_run(2, I.DECODE_KERNELS)
    bad["rel_error"] = 1.0                                                   # passed but over the bound
    assert I.validate(_doc([bad]))


def test_sanitize_knows_the_inference_targets():
    from gpu import sanitize as SZ

    kernels, shapes = SZ._inference_target("flash_decoding")
    assert kernels == I.DECODE_KERNELS and shapes
    assert SZ._inference_target("flash2") is None


@pytest.mark.skipif(not DATA.exists(), reason="no committed bench_inference.json yet")
def test_committed_data():
    doc = json.loads(DATA.read_text())
    assert I.validate(doc) == []
    runs = doc["runs"]
    assert runs and all(r["passed"] for r in runs)
    copy = doc["copy_bandwidth"]["bytes_per_s"]
    for r in runs:
        if r["algorithm"] == "flash_decoding" and r.get("achieved_bytes_per_s"):
            # the bandwidth is the bytes that must move over the median time, as a fraction of the copy rate
            assert r["achieved_bytes_per_s"] == pytest.approx(r["total_bytes"] / r["time_s"]["median"])
            assert r["fraction_of_copy_bandwidth"] == pytest.approx(r["achieved_bytes_per_s"] / copy)
    target = [r for r in runs if r.get("sweep") == "decode_target"]
    assert sorted(r["num_splits"] for r in target) == I.SPLITS_TARGET


# ------------------------------------------------------------------------------------------------- GPU
def _cupy():
    cp = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001
        n = 0
    if n == 0:
        pytest.skip("no CUDA device visible to CuPy")
    return cp


def _check(cp, pipe, shape, seed):
    q, k, v = I.make_inputs(shape, 1, seed)[0]
    ref = I.gqa_reference(q, k, v, shape["causal"], cp)
    e16 = R.rel_error(I.gqa_reference(q, k, v, shape["causal"], cp, fp16_plain=True), ref, xp=cp)
    out = cp.full(q.shape, float("nan"), dtype=cp.float16)
    pipe.run(q, k, v, out)
    cp.cuda.runtime.deviceSynchronize()
    assert bool(cp.isfinite(out).all()), "some output rows were not written"
    chk = R.check_error(R.rel_error(out, ref, xp=cp), e16)
    assert chk["passed"], chk
    lse = I.lse_error(q, k, pipe.L, shape["causal"])
    assert lse < 2e-3, lse
    return out, (q, k, v)


DECODE_SHAPES = [(2, 8, 2, 1, 1000, 128, False), (1, 32, 8, 1, 4096, 128, False), (2, 8, 2, 1, 333, 64, False),
                 (1, 4, 1, 4, 200, 64, True), (1, 8, 2, 16, 130, 128, True), (1, 4, 4, 3, 65, 128, True),
                 (1, 32, 1, 2, 100, 64, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2, 5, 16])
@pytest.mark.parametrize("shp", DECODE_SHAPES)
def test_flash_decoding(shp, splits):
    cp = _cupy()
    shape = dict(zip(("batch", "heads", "kv_heads", "seq_len", "kv_seq_len", "head_dim", "causal"), shp))
    p = I.FlashDecoding(shape, splits)
    out, (q, k, v) = _check(cp, p, shape, seed=splits + shp[4])
    again = cp.full(q.shape, float("nan"), dtype=cp.float16)
    p.run(q, k, v, again)
    assert bool((again == out).all())                                       # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("rowsplit", [False, True])
@pytest.mark.parametrize("stages, bc", [(2, 16), (3, 32), (6, 64), (3, 128)])
def test_flash_decoding_tilings(stages, bc, rowsplit):
    cp = _cupy()
    shape = dict(batch=2, heads=8, kv_heads=2, seq_len=3, kv_seq_len=777, head_dim=128, causal=True)
    _check(cp, I.FlashDecoding(shape, 3, block_cols=bc, stages=stages, rowsplit=rowsplit), shape, seed=bc)


PREFILL_SHAPES = [(1, 4, 1, 200, 200, 64), (2, 8, 2, 130, 130, 128), (1, 4, 2, 100, 300, 128),
                  (1, 6, 3, 256, 256, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pair", [(64, 64), (128, 32), (128, 64)])
@pytest.mark.parametrize("shp", PREFILL_SHAPES)
def test_flash2_gqa(shp, pair, causal):
    cp = _cupy()
    shape = dict(zip(("batch", "heads", "kv_heads", "seq_len", "kv_seq_len", "head_dim"), shp), causal=causal)
    _check(cp, I.Flash2GQA(shape, *pair), shape, seed=shp[3])


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_flash2_gqa_build_equals_mha_build_at_group_one(causal):
    cp = _cupy()
    shape = dict(batch=1, heads=4, kv_heads=4, seq_len=300, kv_seq_len=300, head_dim=128, causal=causal)
    q, k, v = I.make_inputs(shape, 1, 9)[0]
    outs = []
    for gqa in (True, False):
        o = cp.full(q.shape, float("nan"), dtype=cp.float16)
        I.Flash2GQA(shape, 128, 32, gqa=gqa).run(q, k, v, o)
        outs.append(o)
    assert bool((outs[0] == outs[1]).all())
