"""CPU-only tests of the GPU harness's pure-Python parts (NumPy only; no CuPy, no GPU)."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from gpu import ncu as NCU
from gpu import reference as R
from gpu import schema as S
from gpu import sweep as SW
from gpu import kernels as K

DATA = Path(__file__).resolve().parents[1] / "experiments" / "data" / "h100"


def _qkv(rng, B=1, H=2, N=7, d=4, dtype=np.float16):
    return tuple(rng.standard_normal((B, H, N, d)).astype(dtype) for _ in range(3))


# ------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_naive_loop(causal):
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, B=2, H=2, N=9, d=5)
    ref = R.attention_reference(q, k, v, causal)
    naive = R.attention_naive_loop(q, k, v, causal)
    assert ref.dtype == np.float64
    np.testing.assert_allclose(ref, naive, rtol=1e-12, atol=1e-12)


def test_reference_causal_first_row_is_v0_and_differs_from_full():
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, N=6, d=3)
    ref_c = R.attention_reference(q, k, v, True)
    ref_f = R.attention_reference(q, k, v, False)
    # row 0 under the causal mask attends only to key 0
    np.testing.assert_allclose(ref_c[:, :, 0, :], v[:, :, 0, :].astype(np.float64), rtol=0, atol=1e-12)
    assert not np.allclose(ref_c, ref_f)
    # last row sees every key: same as non-causal
    np.testing.assert_allclose(ref_c[:, :, -1, :], ref_f[:, :, -1, :], rtol=1e-12, atol=1e-12)


def test_reference_custom_scale():
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, N=5, d=4)
    a = R.attention_reference(q, k, v, False, scale=0.3)
    b = R.attention_naive_loop(q, k, v, False, scale=0.3)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_fp16_plain_error_is_small_but_nonzero():
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, N=64, d=32)
    ref = R.attention_reference(q, k, v, False)
    o16 = R.attention_fp16_plain(q, k, v, False)
    err = R.rel_error(o16, ref)
    assert o16.dtype == np.float16
    assert 1e-5 < err < 5e-3


# ------------------------------------------------------------------------------------------- error rule
def test_error_bound_rule():
    assert R.error_bound(1e-3) == pytest.approx(2e-3 + 1e-4)
    ok = R.check_error(2.0e-3, 1e-3)
    assert ok["passed"] is True and ok["error_bound"] == pytest.approx(2.1e-3)
    over = R.check_error(2.2e-3, 1e-3)
    assert over["passed"] is False
    edge = R.check_error(2.1e-3 * (1 - 1e-12), 1e-3)
    assert edge["passed"] is True


def test_nan_output_fails():
    ref = np.ones((1, 1, 4, 2))
    out = np.ones((1, 1, 4, 2), dtype=np.float16)
    out[0, 0, 2, 1] = np.nan
    e = R.rel_error(out, ref)
    assert math.isinf(e)
    chk = R.check_error(e, 1e-3)
    assert chk["passed"] is False and chk["rel_error"] is None
    out[0, 0, 2, 1] = np.inf
    assert R.check_error(R.rel_error(out, ref), 1e-3)["passed"] is False
    assert R.check_error(None, 1e-3)["passed"] is False
    assert R.check_error(float("nan"), 1e-3)["passed"] is False


def test_rel_error_values():
    ref = np.array([3.0, 4.0])
    assert R.rel_error(np.array([3.0, 4.0], dtype=np.float16), ref) == 0.0
    assert R.rel_error(np.array([3.0, 4.5]), ref) == pytest.approx(0.5 / 5.0)


# ------------------------------------------------------------------------------------------- schema
def _valid_doc():
    kern = lambda n: {"name": n, "time_s": {"median": 1e-3, "min": 9e-4, "max": 2e-3},  # noqa: E731
                      "dram_read_bytes": 1.0e6, "dram_write_bytes": None, "ncu_duration_s": None}
    shape = dict(batch=8, heads=16, seq_len=4096, head_dim=128, causal=False)
    runs = []
    for alg in S.ALGORITHM_KERNELS:
        flash = alg.startswith("flash")
        runs.append(dict(shape, algorithm=alg, block_rows=128 if flash else None, block_cols=64 if flash else None,
                         rel_error=3e-4, rel_error_fp16_reference=7e-4, error_bound=1.5e-3, passed=True,
                         time_s={"median": 2e-3, "min": 1.9e-3, "max": 2.5e-3}, tflops=300.0,
                         kernels=[kern(n) for n in S.expected_kernels(alg, False)]))
    return {"schema": S.SCHEMA, "date": "2026-11-25T17:00:00+00:00",
            "device": {k: None for k in S.DEVICE_KEYS},
            "settings": {"dtype": "fp16", "warmup": 3, "repeats": 20, "input_sets": 3,
                         "ncu_cache_control": "all", "ncu_clock_control": "none"},
            "runs": runs,
            "baselines": [dict(shape, name="torch_sdpa", time_s={"median": 1e-3, "min": 1e-3, "max": 1e-3},
                               tflops=600.0)]}


def test_schema_accepts_valid_document():
    doc = _valid_doc()
    assert S.validate(doc) == []
    S.assert_valid(doc)


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.pop("schema"), "schema"),
    (lambda d: d["device"].pop("l2_bytes"), "device.l2_bytes"),
    (lambda d: d["settings"].pop("repeats"), "settings.repeats"),
    (lambda d: d["runs"][0].pop("rel_error"), "rel_error missing"),
    (lambda d: d["runs"][0]["kernels"].pop(1), "kernels names"),
    (lambda d: d["runs"][0].update(rel_error=1.0), "not within error_bound"),
    (lambda d: d["runs"][3].update(block_rows=None), "block_rows must be a positive integer"),
    (lambda d: d["runs"][0].update(block_rows=64), "must be null"),
    (lambda d: d["runs"][0].update(algorithm="xformers"), "unknown"),
    (lambda d: d["runs"][0]["time_s"].update(min=1.0), "min <= median <= max"),
    (lambda d: d["runs"][0]["kernels"][0].update(dram_read_bytes=-5), "non-negative"),
    (lambda d: d["baselines"][0].update(name="cudnn"), "baselines[0].name"),
])
def test_schema_rejects(mutate, needle):
    doc = _valid_doc()
    mutate(doc)
    errs = S.validate(doc)
    assert any(needle in e for e in errs), errs
    with pytest.raises(ValueError):
        S.assert_valid(doc)


def test_hf_causal_needs_mask_kernel():
    assert S.expected_kernels("hf", True) == ["qk_gemm", "scale", "mask", "softmax", "pv_gemm"]
    assert S.expected_kernels("hf", False) == ["qk_gemm", "scale", "softmax", "pv_gemm"]
    for alg in S.ALGORITHM_KERNELS:
        for c in (False, True):
            assert K.kernel_names(alg, c) == S.expected_kernels(alg, c)


def test_attention_flops():
    assert S.attention_flops(8, 16, 4096, 128, False) == 4 * 8 * 16 * 4096 ** 2 * 128
    assert S.attention_flops(8, 16, 4096, 128, True) == 2 * 8 * 16 * 4096 ** 2 * 128


def test_write_json_atomic(tmp_path):
    p = tmp_path / "sub" / "x.json"
    S.write_json_atomic(p, {"a": float("nan"), "b": [1.0, float("inf")], "c": "ok"})
    assert json.loads(p.read_text()) == {"a": None, "b": [1.0, None], "c": "ok"}
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]  # no temporary file left behind


@pytest.mark.skipif(not (DATA / "bench.json").exists(), reason="no committed H100 data")
def test_committed_h100_data_is_valid():
    doc = json.loads((DATA / "bench.json").read_text())
    assert S.validate(doc) == []
    assert doc["runs"] and all(r["passed"] for r in doc["runs"])
    assert {r["algorithm"] for r in doc["runs"]} == set(S.ALGORITHM_KERNELS)
    assert {b["name"] for b in doc["baselines"]} == set(S.BASELINES)
    # ncu numbers were attached to the profiled runs
    prof = [k for r in doc["runs"] for k in r["kernels"] if k["dram_read_bytes"] is not None]
    assert len(prof) > 100


# ------------------------------------------------------------------------------------------- sweep
def test_full_sweep_definition():
    groups = SW.configs("full")
    shapes = [{k: g[0][k] for k in S.SHAPE_KEYS} for g in groups]
    grid = [s for s in shapes if not (s["batch"] == 8 and s["seq_len"] == 4096)]
    assert len(grid) == len(SW.SEQ_LENS) * len(SW.HEAD_DIMS) * 2
    for s in grid:
        assert s["batch"] * s["seq_len"] == 16384 and s["heads"] == 16
    for d in (64, 128):
        for c in (False, True):
            assert dict(batch=8, heads=16, seq_len=4096, head_dim=d, causal=c) in shapes
    for g in groups:
        algs = {c["algorithm"] for c in g}
        assert algs == set(SW.ALGORITHMS)
        for c in g:
            if c["algorithm"] in SW.FLASH:
                smem = K.flash_smem_bytes(c["algorithm"], c["block_rows"], c["block_cols"], c["head_dim"])
                assert smem <= 227 * 1024
                assert c["block_rows"] % 16 == 0 and c["block_cols"] % 16 == 0
            else:
                assert c["block_rows"] is None and c["block_cols"] is None
    # several block pairs per shape for flash2
    assert all(len([c for c in g if c["algorithm"] == "flash2"]) >= 4 for g in groups)


def test_block_pairs_and_smem():
    assert K.flash_smem_bytes("flash2", 128, 64, 128) == 2 * 128 * (128 + 4 * 64)
    assert K.flash_fits("flash2", 128, 128, 128)            # 160 KiB
    assert K.flash_fits("flash2", 256, 128, 128)            # 192 KiB
    assert not K.flash_fits("flash2", 256, 256, 128)        # 320 KiB
    assert not K.flash_fits("flash1", 128, 60, 64)          # not a multiple of 16
    for d in (64, 128):
        assert SW.pairs_for("flash2", d) == SW.BLOCK_PAIRS


def test_softmax_launch_shape_covers_row():
    for n in (1, 7, 8, 200, 512, 1000, 4096, 16384, 32768):
        tpr, vpt = K.softmax_launch_shape(n)
        assert tpr * vpt * 8 >= n and vpt in (1, 2, 4, 8) and 32 <= tpr <= 512
    with pytest.raises(ValueError):
        K.softmax_launch_shape(65536)


def test_ncu_sweep_is_noncausal_and_covers_all_n():
    groups = SW.configs("ncu")
    assert all(not g[0]["causal"] for g in groups)
    for d in (64, 128):
        assert {g[0]["seq_len"] for g in groups if g[0]["head_dim"] == d} == set(SW.SEQ_LENS)


# ------------------------------------------------------------------------------------------- ncu CSV
CSV_HEADER = ('"ID","Process ID","Process Name","Host Name","thread Domain:Push/Pop_Range:PL_Type:PL_Value:CLR_Type:'
              'Color:Msg_Type:Msg","Id:Domain:Start/Stop_Range:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg",'
              '"Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name",'
              '"Metric Name","Metric Unit","Metric Value"')


def _rows(kid, name, grid, rd, wr, ns, unit_b="byte"):
    pre = (f'"{kid}","898","python3.12","127.0.0.1","898  ""<default domain>:iosim_prof:none"" ","",'
           f'"{name}","1","7","(256, 1, 1)","{grid}","0","9.0","Command line profiler metrics",')
    return [pre + f'"dram__bytes_read.sum","{unit_b}","{rd}"',
            pre + f'"dram__bytes_write.sum","{unit_b}","{wr}"',
            pre + f'"gpu__time_duration.sum","ns","{ns}"']


def _sample_csv():
    lines = ["==WARNING== Note: Running with unmodified GPU clocks.", "==PROF== Connected to process 898", CSV_HEADER]
    lines += _rows(0, "iosim_marker", "(2, 1, 1)", "2,560", "0", "2,240")                       # tag 1
    lines += _rows(1, "nvjet_sm90_hsh_128x256_64x4_2x1_v_bz_coopA_TNN", "(2, 66, 1)", "67,377,664", "243,701,760", "122,016")
    lines += _rows(2, "softmax", "(4096, 1, 1)", "268,516,096", "249,840,384", "248,192")
    lines += _rows(3, "nvjet_sm90_pv", "(1, 64, 1)", "302,019,584", "25,926,400", "116,704")
    lines += _rows(4, "cublasLt::splitKreduce_kernel", "(8, 1, 1)", "1,000", "2,000", "3,000")
    lines += _rows(5, "iosim_marker", "(3, 1, 1)", "0", "0", "2,000")                           # tag 2
    lines += _rows(6, "flash2_fwd", "(32, 512, 1)", "100.5", "25.25", "162,944", unit_b="Mbyte")
    lines += _rows(7, "iosim_marker", "(1, 1, 1)", "0", "0", "2,000")                           # tag 0: warm-up
    lines += _rows(8, "flash2_fwd", "(32, 512, 1)", "1", "1", "1")
    return "\n".join(lines) + "\n==PROF== Disconnected from process 898\n"


def test_ncu_parse_units_and_order():
    ks = NCU.parse_csv(_sample_csv())
    assert [k["id"] for k in ks] == list(range(9))
    assert ks[2]["base"] == "softmax"
    assert ks[2]["dram_read_bytes"] == 268516096.0
    assert ks[2]["duration_s"] == pytest.approx(248192e-9)
    assert ks[6]["dram_read_bytes"] == pytest.approx(100.5e6) and ks[6]["dram_write_bytes"] == pytest.approx(25.25e6)
    assert NCU.grid_x(ks[0]["grid"]) == 2
    assert NCU.base_name("void flash_fwd_kernel<Flash_fwd_traits<128>, true>(Params)") == "flash_fwd_kernel"


def test_ncu_segments_and_attribution():
    segs = NCU.segments(NCU.parse_csv(_sample_csv()))
    assert sorted(segs) == [1, 2]          # tag 0 (warm-up) dropped
    att = NCU.attribute(segs[1], ["qk_gemm", "softmax", "pv_gemm"])
    assert att["qk_gemm"]["dram_write_bytes"] == 243701760.0 and att["qk_gemm"]["launches"] == 1
    assert att["softmax"]["dram_read_bytes"] == 268516096.0
    # the split-K reduction after the PV GEMM is summed into pv_gemm
    assert att["pv_gemm"]["launches"] == 2
    assert att["pv_gemm"]["dram_read_bytes"] == 302019584.0 + 1000.0
    assert att["pv_gemm"]["ncu_duration_s"] == pytest.approx((116704 + 3000) * 1e-9)
    f = NCU.attribute(segs[2], ["flash2_fwd"])
    assert f["flash2_fwd"]["dram_read_bytes"] == pytest.approx(100.5e6)


def test_ncu_attribution_mismatch_raises():
    segs = NCU.segments(NCU.parse_csv(_sample_csv()))
    with pytest.raises(ValueError):
        NCU.attribute(segs[2], ["qk_gemm", "softmax", "pv_gemm"])   # softmax missing
    with pytest.raises(ValueError):
        NCU.attribute(segs[1], ["flash2_fwd"])                      # library kernels not expected


def test_parse_csv_without_header_is_empty():
    assert NCU.parse_csv("==PROF== nothing profiled\n") == []


def test_build_ncu_doc_and_merge():
    from gpu import bench as BN

    shape = dict(batch=2, heads=4, seq_len=1024, head_dim=64, causal=False)
    manifest = [dict(shape, algorithm="standard", block_rows=None, block_cols=None, tag=1,
                     expected=["qk_gemm", "softmax", "pv_gemm"]),
                dict(shape, algorithm="flash2", block_rows=128, block_cols=64, tag=2, expected=["flash2_fwd"])]
    doc = BN.build_ncu_doc(_sample_csv(), manifest, {})
    assert doc["problems"] == [] and len(doc["runs"]) == 2
    bench = _valid_doc()
    for r in bench["runs"]:
        r.update(shape)
    bench["runs"][-1].update(block_rows=128, block_cols=64)
    n = BN.merge_ncu(bench, doc)
    assert n == 2
    std = [r for r in bench["runs"] if r["algorithm"] == "standard"][0]
    assert std["kernels"][1]["dram_read_bytes"] == 268516096.0
    assert std["kernels"][2]["dram_read_bytes"] == 302019584.0 + 1000.0
    assert S.validate(bench) == []


# ------------------------------------------------------------------------------------------- imports
def test_gpu_package_imports_without_cupy():
    import subprocess

    code = ("import sys; sys.modules['cupy'] = None; sys.modules['torch'] = None\n"
            "import gpu, gpu.bench, gpu.kernels, gpu.calibrate, gpu.sanitize, gpu.sass, gpu.tune, gpu.ncu\n"
            "print('ok')")
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(root)))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


def test_kernel_sources_are_self_contained():
    src = K._source("flash2.cu", {"HEAD_DIM": 64, "BR": 128, "BC": 64})
    assert '#include "common.cuh"' not in src and "#pragma once" not in src
    assert src.index("#define BC 64") < src.index("#ifndef HEAD_DIM")
    assert "mma.sync.aligned.m16n8k16" in src and "ldmatrix" in src and "cp.async" in src


# ------------------------------------------------------------------------------------------- occupancy (ncu)
from gpu import occupancy as OCC  # noqa: E402
from gpu import calibrate as CAL  # noqa: E402


def _occ_rows(kid, name, grid, block, regs, dyn, static, lims, theo, ach, waves, ns):
    pre = (f'"{kid}","898","python3","127.0.0.1","898  ""<default domain>:iosim_prof:none"" ","",'
           f'"{name}","1","7","{block}","{grid}","0","9.0","Command line profiler metrics",')
    vals = [("launch__registers_per_thread", "register/thread", regs), ("launch__block_size", "", block[1:].split(",")[0]),
            ("launch__grid_size", "", grid), ("launch__shared_mem_per_block_dynamic", "byte", dyn),
            ("launch__shared_mem_per_block_static", "byte", static),
            ("launch__occupancy_limit_registers", "block", lims[0]),
            ("launch__occupancy_limit_shared_mem", "block", lims[1]),
            ("launch__occupancy_limit_warps", "block", lims[2]), ("launch__occupancy_limit_blocks", "block", lims[3]),
            ("sm__maximum_warps_per_active_cycle_pct", "%", theo),
            ("sm__warps_active.avg.pct_of_peak_sustained_active", "%", ach),
            ("launch__waves_per_multiprocessor", "", waves), ("gpu__time_duration.sum", "nsecond", ns)]
    rows = []
    for metric, unit, v in vals:
        if metric == "launch__grid_size":
            v = v.strip("()").split(",")[0].strip()
        rows.append(pre + f'"{metric}","{unit}","{v}"')
    return rows


def _occ_csv():
    lines = ["==PROF== Connected to process 898", "d=64: fp16 reference error 4.5e-04", CSV_HEADER]
    lines += _occ_rows(0, "iosim_marker", "(2, 1, 1)", "(32, 1, 1)", 16, 0, 0, (64, 32, 64, 32), 100, 3.1, 0.01, 1900)
    lines += _occ_rows(1, "flash2_fwd", "(32, 64, 1)", "(128, 1, 1)", 255, "81,920", 0, (2, 2, 16, 32), 12.5, 12.1,
                       "7.76", "1,234,567")
    lines += _occ_rows(2, "iosim_marker", "(1, 1, 1)", "(32, 1, 1)", 16, 0, 0, (64, 32, 64, 32), 100, 3.1, 0.01, 1900)
    lines += _occ_rows(3, "iosim_marker", "(3, 1, 1)", "(32, 1, 1)", 16, 0, 0, (64, 32, 64, 32), 100, 3.1, 0.01, 1900)
    lines += _occ_rows(4, "nvjet_sm90_hsh_256x128_64x4_2x1_v_bz_coopB_TNT", "(2, 66, 1)", "(384, 1, 1)", 168,
                       "213,000", 0, (1, 1, 5, 32), 9.38, 9.2, "1.03", "1,600,000")
    lines += _occ_rows(5, "softmax", "(32768, 1, 1)", "(512, 1, 1)", 128, 0, 0, (1, 32, 4, 32), 25, 23.4, "248.24",
                       "3,470,000")
    lines += _occ_rows(6, "nvjet_sm90_pv", "(1, 64, 1)", "(384, 1, 1)", 168, "213,000", 0, (1, 1, 5, 32), 9.38, 9.0,
                       "0.48", "1,590,000")
    lines += _occ_rows(7, "iosim_marker", "(1, 1, 1)", "(32, 1, 1)", 16, 0, 0, (64, 32, 64, 32), 100, 3.1, 0.01, 1900)
    return "\n".join(lines) + "\n==PROF== Disconnected from process 898\n"


def _occ_manifest():
    flash = dict(algorithm="flash2", head_dim=64, block_rows=64, block_cols=64, warp_rows=32, q_in_registers=True,
                 threads=64, smem_bytes=40960, expected=["flash2_fwd"], tag=1, rel_error=2.5e-4,
                 rel_error_fp16_reference=4.5e-4, error_bound=1.0e-3, passed=True)
    std = dict(algorithm="standard", head_dim=64, block_rows=None, block_cols=None, warp_rows=None,
               q_in_registers=None, expected=["qk_gemm", "softmax", "pv_gemm"], tag=2, rel_error=5e-4,
               rel_error_fp16_reference=4.5e-4, error_bound=1.0e-3, passed=True)
    failed = dict(algorithm="flash1", head_dim=64, block_rows=64, block_cols=64, warp_rows=16, q_in_registers=True,
                  expected=["flash1_fwd"], tag=None, reason="check failed")
    return [flash, std, failed]


def test_occupancy_csv_parse():
    ks = NCU.parse_metrics_csv(_occ_csv())
    assert [k["base"] for k in ks] == ["iosim_marker", "flash2_fwd", "iosim_marker", "iosim_marker",
                                      "nvjet_sm90_hsh_256x128_64x4_2x1_v_bz_coopB_TNT", "softmax", "nvjet_sm90_pv",
                                      "iosim_marker"]
    m = ks[1]["metrics"]
    assert set(OCC.METRICS) <= set(m)
    assert m["launch__registers_per_thread"] == 255 and m["launch__block_size"] == 128
    assert m["launch__grid_size"] == 32 and m["launch__shared_mem_per_block_dynamic"] == 81920
    assert m["sm__maximum_warps_per_active_cycle_pct"] == 12.5
    assert m["gpu__time_duration.sum"] == pytest.approx(1.234567e-3)
    assert NCU.parse_metrics_csv("no csv here\n") == []


def test_occupancy_records_from_csv_and_manifest():
    recs, problems, n = OCC.build_records(_occ_csv(), _occ_manifest())
    assert n == 8
    assert len(problems) == 1 and "flash1" in problems[0]          # the failed check is reported, not profiled
    assert [(r["algorithm"], r["kernel"]) for r in recs] == [
        ("flash2", "flash2_fwd"), ("standard", "qk_gemm"), ("standard", "softmax"), ("standard", "pv_gemm")]
    f = recs[0]
    assert (f["threads"], f["smem_bytes"], f["warp_rows"], f["q_in_registers"]) == (64, 40960, 32, True)
    assert f["launch__occupancy_limit_registers"] == 2 and f["sm__warps_active.avg.pct_of_peak_sustained_active"] == 12.1
    qk = recs[1]
    assert qk["threads"] == 384 and qk["smem_bytes"] == 213000            # unfused: from ncu (dynamic + static)
    assert qk["kernel_name"].startswith("nvjet") and recs[3]["kernel_name"] == "nvjet_sm90_pv"
    assert recs[2]["launch__waves_per_multiprocessor"] == pytest.approx(248.24)
    doc = {"schema": OCC.SCHEMA, "date": "x", "device": {k: None for k in S.DEVICE_KEYS},
           "settings": {"shape": OCC.SHAPE, "ncu_command": "ncu", "metrics": list(OCC.METRICS)}, "records": recs}
    assert OCC.validate(doc) == []
    bad = json.loads(json.dumps(doc))
    bad["records"][0]["launch__registers_per_thread"] = None
    bad["records"][1]["passed"] = False
    errs = OCC.validate(bad)
    assert any("registers_per_thread" in e for e in errs) and any("did not pass" in e for e in errs)


def test_occupancy_labels_need_the_expected_kernels():
    segs = NCU.segments(NCU.parse_metrics_csv(_occ_csv()))
    with pytest.raises(ValueError):
        OCC.label_kernels(segs[2], ["flash2_fwd"])                 # cuBLAS kernels where a flash kernel belongs
    with pytest.raises(ValueError):
        OCC.label_kernels(segs[1], ["qk_gemm", "softmax", "pv_gemm"])


def test_occupancy_variants_cover_the_sweep():
    vs = OCC.variants()
    for d in (64, 128):
        for alg in SW.FLASH:
            got = {(v["block_rows"], v["block_cols"]) for v in vs if v["algorithm"] == alg and v["head_dim"] == d}
            assert got == set(SW.pairs_for(alg, d))
        for v in vs:
            if v["algorithm"] == "flash2" and v["head_dim"] == d:
                wm, qreg = K.flash2_tiling(d, v["block_rows"], v["block_cols"])
                assert (v["warp_rows"], v["q_in_registers"]) == (16 * wm, bool(qreg))
        assert {v["algorithm"] for v in vs if v["block_rows"] is None and v["head_dim"] == d} == set(OCC.UNFUSED)


def test_occupancy_imports_without_cupy():
    import subprocess

    code = "import sys; sys.modules['cupy'] = None; sys.modules['torch'] = None\nimport gpu.occupancy\nprint('ok')"
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(root)))
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


# ------------------------------------------------------------------------------------------- calibration (new keys)
def test_cycle_chain_is_one_cycle():
    for n in (1, 2, 7, 1000):
        nxt, first = CAL.cycle_chain(n, seed=n)
        seen, i = set(), first
        for _ in range(n):
            seen.add(i)
            i = int(nxt[i])
        assert i == first and seen == set(range(n))


def test_calibration_to_seconds_and_merge():
    res = {"dram_latency": {"cycles": 800.0, "latency_s": None},
           "barrier": {"cycles": {"4": 20.0, "8": 30.0}, "latency_s": None},
           "mma_sync_by_chains": {"cycles_per_mma": {"1": 32.0, "8": 8.0}, "latency_s_per_mma": None},
           "sm_clock": {"hz": 2.0e9}}
    CAL.to_seconds(res, 2.0e9)
    assert res["dram_latency"]["latency_s"] == pytest.approx(4e-7)
    assert res["barrier"]["latency_s"] == {"4": pytest.approx(1e-8), "8": pytest.approx(1.5e-8)}
    assert res["mma_sync_by_chains"]["latency_s_per_mma"]["8"] == pytest.approx(4e-9)
    old = {"schema": "iosim-gpu-calibration/1", "date": "old", "device": {"name": "A"}, "settings": {},
           "results": {"d2d_copy": {"bytes_per_s": 1.0}}}
    new = {"schema": "iosim-gpu-calibration/1", "date": "new", "device": {"name": "B"}, "settings": {"x": 1},
           "results": {"d2d_copy": {"bytes_per_s": 2.0}, **res}}
    m = CAL.merge_calibration(old, new)
    assert m["results"]["d2d_copy"] == {"bytes_per_s": 1.0}                  # kept: the preset comes from it
    assert m["reruns_of_existing_results"][-1]["results"]["d2d_copy"] == {"bytes_per_s": 2.0}
    again = CAL.merge_calibration(m, dict(new, date="newer"))  # an earlier rerun is kept
    assert [r["date"] for r in again["reruns_of_existing_results"]] == ["new", "newer"]
    assert set(m["settings"]["added_results"][-1]["keys"]) == set(res)
    assert m["settings"]["added_results"][-1]["device"] == {"name": "B"} and old["results"].keys() == {"d2d_copy"}
    with pytest.raises(ValueError):
        CAL.merge_calibration(old, {"schema": "other"})


def test_committed_calibration_has_the_latency_results():
    doc = json.loads((DATA / "calibration.json").read_text())
    assert doc["schema"] == "iosim-gpu-calibration/1"
    r = doc["results"]
    for key in CAL.LATENCY_KEYS:
        assert key in r and "error" not in r[key], key
    hz = r["sm_clock"]["hz"]
    assert 0.8e9 < hz < 2.2e9 and r["sm_clock"]["method"]
    for key in ("dram_latency", "l2_latency", "smem_latency", "mma_sync_latency", "fp32_latency", "ex2_latency"):
        e = r[key]
        assert e["method"] and e["cycles"] > 0 and e["latency_s"] == pytest.approx(e["cycles"] / hz)
        rep = e["cycles_repeats"]
        assert rep["min"] <= rep["median"] <= rep["max"] and rep["median"] == e["cycles"]
    assert r["l2_latency"]["cycles"] < r["dram_latency"]["cycles"]
    assert r["smem_latency"]["cycles"] < r["l2_latency"]["cycles"]
    for w in ("4", "8", "16"):
        assert r["barrier"]["cycles"][w] > 0
        assert r["barrier"]["latency_s"][w] == pytest.approx(r["barrier"]["cycles"][w] / hz)
    ch = r["mma_sync_by_chains"]["cycles_per_mma"]
    assert set(ch) == {"1", "2", "4", "8"} and ch["1"] == r["mma_sync_latency"]["cycles"]
    bw = r["dram_bandwidth_by_bytes_in_flight"]["bytes_per_s"]
    keys = [int(b) for b in bw]                                            # 512 B .. >= 128 KiB per SM
    assert keys == [512 << i for i in range(len(keys))] and keys[-1] >= 128 << 10
    assert all(0 < v < 5e12 for v in bw.values())
    # the results the h100-measured preset is generated from are untouched by the merge
    assert "d2d_copy" in r and doc["reruns_of_existing_results"][0]["results"]["d2d_copy"]


def test_committed_occupancy_is_valid():
    doc = json.loads((DATA / "occupancy.json").read_text())
    assert OCC.validate(doc) == []
    assert doc["settings"]["shape"] == OCC.SHAPE
    got = {(r["algorithm"], r["head_dim"], r["block_rows"], r["block_cols"]) for r in doc["records"]}
    want = {(v["algorithm"], v["head_dim"], v["block_rows"], v["block_cols"]) for v in OCC.variants()}
    assert got == want
    for r in doc["records"]:
        assert 0 < r["sm__warps_active.avg.pct_of_peak_sustained_active"] <= 100.5
        assert 0 < r["sm__maximum_warps_per_active_cycle_pct"] <= 100
        assert r["launch__registers_per_thread"] <= 255
        if r["algorithm"] in SW.FLASH:
            assert r["launch__block_size"] == r["threads"]
            assert r["launch__shared_mem_per_block_dynamic"] == r["smem_bytes"]


# ------------------------------------------------------------------------------- backward data (bench_backward)
def test_committed_bench_backward_is_well_formed():
    import iosim
    from gpu import backward as BW

    doc = json.loads((DATA / "bench_backward.json").read_text())
    assert BW.validate(doc) == []
    assert doc["device"]["name"] and doc["schema"] == BW.SCHEMA
    # every run passes the whole rule, except dQ's bitwise reproducibility under flash2's unordered atomicAdd
    unordered = [r for r in doc["runs"] if "unordered" in r.get("dq_accumulation", "")]
    assert all(r["passed"] for r in doc["runs"] if r not in unordered)
    assert all(r["grads"]["dk"]["passed"] and r["grads"]["dv"]["passed"] for r in unordered)
    have = {(r["batch"], r["heads"], r["seq_len"], r["head_dim"], r["causal"]) for r in doc["runs"]}
    assert {(8, 16, 4096, 64, False), (8, 16, 4096, 128, False)} <= have
    for r in doc["runs"]:
        br, bc = r.get("block_rows", 64), r.get("block_cols", 64)
        sched = iosim.build_schedule(r["algorithm"], iosim.AttentionShape(r["batch"], r["heads"], r["seq_len"],
                                                                          r["head_dim"], causal=r["causal"]),
                                     br, bc, pass_="backward")
        assert [k["name"] for k in r["kernels"]] == [k.name for k in sched.kernels]
        # per-kernel medians add up to about the whole backward's median
        assert sum(k["time_s"]["median"] for k in r["kernels"]) == pytest.approx(r["time_s"]["median"], rel=0.05)
        for g in ("dq", "dk", "dv"):
            c = r["grads"][g]
            assert c["rel_error"] is not None and c["rel_error"] <= 2 * c["rel_error_fp16_reference"] + 1e-4
            assert c["stable_across_runs"] is True or (r in unordered and g == "dq")
        assert r["baselines"]["sdpa"]["time_s"]["n"] >= 10


def test_backward_validate_catches_problems():
    from gpu import backward as BW

    doc = json.loads((DATA / "bench_backward.json").read_text())
    bad = json.loads(json.dumps(doc))
    bad["runs"][0]["kernels"][0]["name"] = "dv"
    bad["runs"][0]["grads"]["dq"]["rel_error"] = 1.0
    probs = BW.validate(bad)
    assert any("kernel names" in p for p in probs) and any("grads.dq" in p for p in probs)
    assert BW.validate({"schema": "x"})


def test_backward_reference_numpy_matches_iosim():
    from gpu import backward as BW
    from iosim.reference import reference_attention_backward

    rng = np.random.default_rng(5)
    q, k, v, do = (rng.standard_normal((2, 2, 11, 4)).astype(np.float16) for _ in range(4))
    for causal in (False, True):
        got = BW.attention_backward_reference(q, k, v, do, causal)
        want = reference_attention_backward(q, k, v, do, causal=causal)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
        plain = BW.backward_fp16_plain(q, k, v, do, causal)
        for a, b in zip(plain, got):
            assert np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b) < 5e-3


def test_flash2_backward_kernel_names_match_simulator():
    from gpu import backward as BW
    from iosim import AttentionShape, build_schedule

    src = (Path(K.__file__).parent / "flash2_bwd.cu").read_text()
    for name in BW.KERNEL_NAMES["flash2"]:
        assert f"\n{name}(" in src
    assert K.FLASH2_BWD_KERNEL_NAMES == BW.KERNEL_NAMES["flash2"]
    schedule = build_schedule("flash2", AttentionShape(1, 1, 256, 64), pass_="backward")
    assert [k.name for k in schedule.kernels] == BW.KERNEL_NAMES["flash2"]
    # K, V + double-buffered Q, dO (fp16) + one or two dS^T (fp16) + double-buffered L, D rows (fp32)
    assert K.flash2_bwd_smem_bytes(64, 64, 128, False) == 2 * 128 * (2 * 64 + 4 * 64) + 2 * 64 * 64 + 16 * 64
    assert K.flash2_bwd_smem_bytes(64, 64, 128) == 2 * 128 * (2 * 64 + 4 * 64) + 4 * 64 * 64 + 16 * 64
