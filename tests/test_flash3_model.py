"""The flash3 schedule (FlashAttention-3's forward on Hopper) and what the model does with its
asynchrony: the executor's proof, the producer/consumer occupancy, wgmma work, the overlapped
softmax, the K/V ring's stages, the explorer and the validation hook. Expected values come from
hand counts and independent references written here, never from the code's own output."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import iosim
from iosim import AttentionShape, IosimError, TilingError, build_schedule, execute
from iosim import work
from iosim.occupancy import occupancy, registers_needed
from iosim.simulate import replay, simulate_schedule
from iosim.timing import cta_demands
from iosim.trace import build_trace

H100 = iosim.load_hardware("h100-measured")


def loop_attention(q, k, v, causal):
    """float64 attention one query row at a time (keys 0..r for row r when causal), with each
    row's log-sum-exp. q, k, v: (heads, N, d)."""
    heads, n, d = q.shape
    out = np.empty((heads, n, d))
    lse = np.empty((heads, n))
    for h in range(heads):
        for r in range(n):
            keys = r + 1 if causal else n
            scores = np.array([np.dot(q[h, r], k[h, c]) for c in range(keys)]) / np.sqrt(d)
            top = scores.max()
            weights = np.exp(scores - top)
            out[h, r] = weights @ v[h, :keys] / weights.sum()
            lse[h, r] = top + np.log(weights.sum())
    return out, lse


# ---- the schedule: the same math as flash2, proven by the executor ---------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 70), d=st.integers(1, 24), heads=st.integers(1, 3),
       causal=st.booleans(), stages=st.sampled_from([2, 3]), seed=st.integers(0, 2**31),
       br=st.integers(1, 80), bc=st.integers(1, 80))
def test_the_executor_proves_flash3_is_attention(n, d, heads, causal, stages, seed, br, bc):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((heads, n, d)) for _ in range(3))
    schedule = build_schedule("flash3", AttentionShape(1, heads, n, d, causal=causal), br, bc,
                              stages=stages)
    result = execute(schedule, q, k, v)
    expected, lse = loop_attention(q, k, v, causal)
    np.testing.assert_allclose(result.tensors["O"], expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.tensors["L"][..., 0], lse, rtol=1e-10, atol=1e-12)


def test_flash3_in_float16_earns_its_tolerance():
    """At most 2x the error of a plain float16 implementation, against float64."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 96, 32)).astype(np.float16) for _ in range(3))
    expected, _ = loop_attention(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    s = (q @ np.swapaxes(k, -1, -2)) * np.float16(1 / np.sqrt(32))
    s = np.where(np.arange(96)[None, :] > np.arange(96)[:, None], np.float16(-np.inf), s)
    p = np.exp(s - s.max(-1, keepdims=True))
    plain = (p / p.sum(-1, keepdims=True)) @ v
    schedule = build_schedule("flash3", AttentionShape(1, 2, 96, 32, "fp16", causal=True), 64, 32)
    out = execute(schedule, q, k, v).tensors["O"]

    def err(x):
        return np.linalg.norm(x.astype(np.float64) - expected) / np.linalg.norm(expected)

    assert err(out) <= 2 * err(plain)


def test_the_kernel_says_what_is_asynchronous():
    shape = AttentionShape(1, 1, 1024, 128)
    kernel = build_schedule("flash3", shape, 128, 64, stages=3).kernels[0]
    assert (kernel.tensor_path, kernel.copy_engine, kernel.overlap_softmax) == ("wgmma", "tma",
                                                                                  True)
    # one producer warpgroup and one consumer warpgroup per 64 query rows
    assert (kernel.producer_warps, kernel.consumer_warpgroups, kernel.warps) == (4, 2, 12)
    stages = {b.name: b.stages for b in kernel.buffers}
    assert stages["Kj"] == stages["Vj"] == 3 and stages["Qi"] == 1
    # Q once, K and V in 3 slots each, fp16: (128 + 2·3·64)·128·2 bytes
    assert kernel.smem_bytes(128, 1024) == (128 + 2 * 3 * 64) * 128 * 2
    assert build_schedule("flash3", shape, 192, 64).kernels[0].consumer_warpgroups == 3


@pytest.mark.parametrize("d, causal, expected", [
    # FlashAttention-3's forward tiles for 16-bit inputs (hopper/tile_size.h)
    (64, False, (192, 192)), (64, True, (192, 128)), (128, False, (128, 176)),
    (128, True, (128, 128)), (256, False, (128, 80))])
def test_default_tiles_are_flashattention3s(d, causal, expected):
    schedule = build_schedule("flash3", AttentionShape(1, 1, 4096, d, causal=causal))
    assert (schedule.block_rows, schedule.block_cols) == expected


def test_three_stages_lower_the_default_block_cols_until_the_ring_fits():
    # d = 128, Br = 128: (128 + 6·Bc)·256 bytes <= 232448 holds for Bc <= 130: 128 (from 176
    # in steps of 16)
    schedule = build_schedule("flash3", AttentionShape(1, 1, 4096, 128), stages=3)
    assert (schedule.block_rows, schedule.block_cols) == (128, 128)


@pytest.mark.parametrize("bad", [1, 4, 2.0, True, "3"])
def test_stages_are_two_or_three(bad):
    with pytest.raises(IosimError, match=r"stages must be one of 2, 3"):
        build_schedule("flash3", AttentionShape(1, 1, 256, 64), 128, 64, stages=bad)


def test_stages_apply_to_flash3_only():
    with pytest.raises(IosimError, match=r"stages applies to flash3 only, not 'flash2'"):
        build_schedule("flash2", AttentionShape(1, 1, 256, 64), stages=3)


@pytest.mark.parametrize("d, tiles", [(64, (128, 128)), (128, (64, 128))])
def test_flash3_backward_is_flash2s_algorithm_on_a_warp_specialised_cta(d, tiles):
    shape = AttentionShape(2, 2, 1024, d)
    ours = build_schedule("flash3", shape, pass_="backward", stages=3)
    theirs = build_schedule("flash2", shape, *tiles, pass_="backward")
    assert (ours.block_rows, ours.block_cols) == tiles  # FlashAttention-3's backward tiles
    main = ours.kernels[1]
    assert [k.name for k in ours.kernels] == ["flash3_bwd_dot", "flash3_bwd",
                                              "flash3_bwd_convert"]
    # a producer warpgroup and one consumer warpgroup per 64 keys, wgmma, TMA, a 3-slot ring
    assert (main.warps, main.producer_warps, main.consumer_warpgroups) == (12, 4, 2)
    assert (main.tensor_path, main.copy_engine) == ("wgmma", "tma")
    assert {b.name: b.stages for b in main.buffers if b.stages > 1} == {
        "Qi": 3, "dOi": 3, "Li": 3, "Di": 3, "dS": 2}
    # the same ops in the same order as flash2's backward, so the same bytes and FLOPs
    assert main.body == theirs.kernels[1].body
    for model in ("two-level", "l2"):
        a, b = (iosim.simulate(alg, shape, block_rows=tiles[0], block_cols=tiles[1],
                               model=model, pass_="backward").totals
                for alg in ("flash3", "flash2"))
        assert (a.hbm_read_bytes, a.flops_tensor, a.flops_scalar) == \
            (b.hbm_read_bytes, b.flops_tensor, b.flops_scalar)
        # and the tensor cores run it faster
        assert a.predicted_time_s < b.predicted_time_s


def test_flash3_moves_the_bytes_flash2_moves():
    shape = AttentionShape(2, 2, 512, 64)
    counts = {alg: iosim.simulate(alg, shape, block_rows=128, block_cols=64,
                                  model="two-level").totals for alg in ("flash2", "flash3")}
    assert counts["flash3"].hbm_read_bytes == counts["flash2"].hbm_read_bytes
    assert counts["flash3"].hbm_write_bytes == counts["flash2"].hbm_write_bytes
    assert counts["flash3"].flops_tensor == counts["flash2"].flops_tensor


# ---- occupancy: producer and consumer registers -----------------------------------------------

def test_producer_registers_let_the_consumers_have_240():
    """FlashAttention-3's split: 4 producer warps at 24 registers, 8 consumer warps at 240:
    128·24 + 256·240 = 64 512 of 65 536 registers, one CTA per SM. Counted at 240, the
    producers would not fit: 12 warps x 7680 = 92 160."""
    kernel = build_schedule("flash3", AttentionShape(1, 1, 4096, 128), 128, 176).kernels[0]
    occ = occupancy(kernel, 128, 4096, H100)
    assert (occ.registers_per_thread, occ.producer_registers_per_thread) == (240, 24)
    assert occ.ctas_per_sm == 1 and occ.warps_per_sm == 12
    with pytest.raises(TilingError, match="limited by registers"):
        occupancy(dataclasses.replace(kernel, producer_registers_per_thread=None), 128, 4096,
                  H100)


def test_each_kind_of_warp_is_allocated_its_own_registers():
    kernel = build_schedule("flash3", AttentionShape(1, 1, 4096, 64), 64, 64).kernels[0]
    kernel = dataclasses.replace(kernel, registers_per_thread=96,
                                 producer_registers_per_thread=24)
    # per CTA: 4 consumer warps x 96·32 + 4 producer warps x 24·32 = 15 360 registers: 4 CTAs
    # (shared memory would allow (233472 // (40960 + 1024)) = 5, warps 8)
    occ = occupancy(kernel, 64, 4096, H100)
    assert occ.limits["registers"] == 65536 // 15360 == 4
    assert occ.ctas_per_sm == 4 and occ.limiter == "registers"
    uniform = dataclasses.replace(kernel, producer_registers_per_thread=None)
    assert occupancy(uniform, 64, 4096, H100).limits["registers"] == 65536 // (8 * 3072) == 2


def test_estimated_registers_split_the_tiles_over_the_consumer_threads():
    kernel = build_schedule("flash3", AttentionShape(1, 1, 4096, 64), 64, 64).kernels[0]
    # S (fp32) + P (fp16) + O (fp32) + m, l, alpha, L: 64·64·(4 + 2 + 4) + 4·64·4 bytes over
    # the 128 consumer threads, plus 32 of overhead
    tiles = 64 * 64 * (4 + 2 + 4) + 4 * 64 * 4
    assert registers_needed(kernel, 64, 4096) == -(-tiles // 4 // 128) + 32
    assert registers_needed(dataclasses.replace(kernel, producer_warps=0), 64, 4096) == \
        -(-tiles // 4 // 256) + 32


def test_producer_warps_must_leave_a_computing_warp():
    kernel = build_schedule("flash3", AttentionShape(1, 1, 256, 64), 64, 64).kernels[0]
    with pytest.raises(TilingError, match="at least one warp must compute"):
        occupancy(dataclasses.replace(kernel, producer_warps=8), 64, 256, H100)


# ---- wgmma work and the timed model ----------------------------------------------------------

def _head(schedule):
    trace = build_trace(schedule)
    return trace, trace.kernels[0]


def test_wgmma_reads_its_operands_once_per_warpgroup():
    schedule = build_schedule("flash3", AttentionShape(1, 1, 512, 64), 128, 64)
    _, kt = _head(schedule)
    h = kt.head
    mmas = np.flatnonzero(h["mma"] > 0)[:2]  # the first tile's QKᵀ, then its PV
    qk, pv = mmas
    # S = Q Kᵀ: Q (128 x 64) once, K (64 x 64) once per consumer warpgroup (2)
    assert h["smem_operand_bytes"][qk] == 128 * 64 * 2 + 2 * 64 * 64 * 2
    # O += P V: P in registers, V once per warpgroup
    assert h["smem_operand_bytes"][pv] == 2 * 64 * 64 * 2
    assert h["mma"][qk] == 2 * 128 * 64 * 64 // work.MMA_FLOPS


def _lone_chain(demand):
    return (demand["latency_cycles"] + demand["tensor_cycles"] + demand["fp32_cycles"]
            + demand["sfu_cycles"])


def _flash3_demands(schedule, hardware):
    trace = build_trace(schedule)
    (_, hbm), = replay(trace, hardware, "two-level")
    occ = occupancy(schedule.kernels[0], 64, 1024, hardware)
    return cta_demands(trace.kernels[0], hbm, hardware, "fp16", occ)


def test_wgmma_and_exp_overlap_as_the_spec_measured():
    schedule = build_schedule("flash3", AttentionShape(1, 1, 1024, 64), 128, 128)
    full = _flash3_demands(schedule, dataclasses.replace(H100, wgmma_sfu_overlap=1.0,
                                                         wgmma_fp32_overlap=1.0))
    half = _flash3_demands(schedule, dataclasses.replace(H100, wgmma_sfu_overlap=0.5,
                                                         wgmma_fp32_overlap=0.75))
    # the tensor pipe is held for the exp and FP32 work that does not overlap
    np.testing.assert_allclose(half["tensor_cycles"], full["tensor_cycles"]
                               + 0.5 * full["sfu_cycles"] + 0.25 * full["fp32_cycles"])
    np.testing.assert_array_equal(half["sfu_cycles"], full["sfu_cycles"])
    np.testing.assert_array_equal(half["fp32_cycles"], full["fp32_cycles"])


def test_the_overlapped_softmax_shortens_the_lone_chain_but_not_the_pipes():
    shape = AttentionShape(1, 1, 1024, 64)
    schedule = build_schedule("flash3", shape, 128, 128)
    serial = dataclasses.replace(schedule, kernels=(dataclasses.replace(
        schedule.kernels[0], overlap_softmax=False),))
    demands = {}
    overlapping = dataclasses.replace(H100, wgmma_sfu_overlap=1.0,
                                      wgmma_fp32_overlap=1.0)  # the pipes apart
    for name, s in (("overlap", schedule), ("serial", serial)):
        demands[name] = _flash3_demands(s, overlapping)
    for pipe in ("tensor_cycles", "fp32_cycles", "sfu_cycles", "smem_bytes"):
        np.testing.assert_array_equal(demands["overlap"][pipe], demands["serial"][pipe])
    # per K/V tile, the shorter of (MMAs, softmax + rescale) is hidden: at least each tile's
    # share of the smaller pipe time, 8 tiles per CTA here
    saved = _lone_chain(demands["serial"]) - _lone_chain(demands["overlap"])
    smaller = np.minimum(demands["serial"]["tensor_cycles"],
                         demands["serial"]["fp32_cycles"] + demands["serial"]["sfu_cycles"])
    assert np.all(saved >= smaller * (8 - 1) / 8)
    assert np.all(_lone_chain(demands["overlap"]) >= np.maximum(
        demands["serial"]["tensor_cycles"],
        demands["serial"]["fp32_cycles"] + demands["serial"]["sfu_cycles"]))
    times = {name: simulate_schedule(s, hardware=H100).totals.times_s["timed"]
             for name, s in (("overlap", schedule), ("serial", serial))}
    assert times["overlap"] < times["serial"]


def test_flash3s_lone_chain_is_shorter_than_flash2s_on_the_same_tiles():
    shape = AttentionShape(1, 1, 1024, 64)
    chains = {}
    for alg in ("flash2", "flash3"):
        s = build_schedule(alg, shape, 128, 128)
        trace = build_trace(s)
        (_, hbm), = replay(trace, H100, "two-level")
        occ = occupancy(s.kernels[0], 64, 1024, H100)
        assert occ.warps_per_cta - occ.producer_warps == 8  # the same computing warps
        chains[alg] = _lone_chain(cta_demands(trace.kernels[0], hbm, H100, "fp16", occ))
    assert np.all(chains["flash3"] < chains["flash2"])


def _bandwidth_starved(factor):
    return dataclasses.replace(H100, l2_bandwidth_bytes_per_s=H100.l2_bandwidth_bytes_per_s
                               / factor, hbm_bandwidth_bytes_per_s=H100.hbm_bandwidth_bytes_per_s
                               / factor)


@pytest.mark.parametrize("d, bc", [(64, 64), (64, 128), (128, 64)])
@pytest.mark.parametrize("factor", [1, 4])
def test_more_stages_are_never_slower_when_bandwidth_bound(d, bc, factor):
    hw = _bandwidth_starved(factor)
    shape = AttentionShape(2, 8, 2048, d)
    times = {}
    for stages in (2, 3):
        schedule = build_schedule("flash3", shape, 128, bc, stages=stages)
        occ = occupancy(schedule.kernels[0], d, 2048, hw)
        assert occ.ctas_per_sm == 1  # the same occupancy: registers, not shared memory
        times[stages] = simulate_schedule(schedule, hardware=hw).totals.times_s["timed"]
    assert times[3] <= times[2] * (1 + 1e-12)


def test_a_deeper_ring_hides_the_copy_when_the_ring_runs_dry():
    """With a quarter of the bandwidth, a 2-slot ring waits for each tile's copy; a third slot
    hides most of it."""
    hw = _bandwidth_starved(4)
    shape = AttentionShape(2, 8, 2048, 64)
    times = {stages: simulate_schedule(build_schedule("flash3", shape, 64, 64, stages=stages),
                                       hardware=hw).totals.times_s["timed"]
             for stages in (2, 3)}
    assert times[3] < 0.95 * times[2]


# ---- the explorer and the command line --------------------------------------------------------

def test_the_explorer_ranks_tiles_and_stages_together(tmp_path):
    from iosim.explore import explore, format_ranking, write_csv

    shape = AttentionShape(1, 4, 512, 64)
    rows = explore("flash3", shape, workers=1, progress=False, candidates=[64, 128])
    choices = {(r.block_rows, r.block_cols, r.stages) for r in rows}
    # Br: multiples of 64 only, and FlashAttention-3's own tile at d = 64 (192 x 192) added;
    # every (Br, Bc) with both ring depths: all fit ((192 + 2·3·192)·64·2 bytes at most)
    assert choices == {(br, bc, s) for br in (64, 128, 192) for bc in (64, 128, 192)
                       for s in (2, 3)}
    times = [r.predicted_time_s for r in rows]
    assert times == sorted(times)
    table = format_ranking(rows)
    assert "stages" in table.splitlines()[0]
    path = tmp_path / "rank.csv"
    write_csv(rows, path)
    header = path.read_text().splitlines()[0].split(",")
    assert "stages" in header


def test_the_cli_takes_stages(capsys):
    from iosim.cli import main

    argv = ["simulate", "--algorithm", "flash3", "--seq-len", "256", "--head-dim", "64",
            "--block-rows", "128", "--block-cols", "64", "--json"]
    assert main(argv + ["--stages", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["algorithm"] == "flash3" and out["kernels"][0]["name"] == "flash3_fwd"
    assert main(["simulate", "--algorithm", "flash2", "--seq-len", "256", "--head-dim", "64",
                 "--stages", "3"]) == 2
    assert "stages applies to flash3 only" in capsys.readouterr().err


# ---- validation: the hook reads bench_flash3.json when present --------------------------------

def _flash3_doc(runs):
    return {"schema": "iosim-gpu-bench/1", "date": "2026-11-26T00:00:00+00:00",
            "device": {"name": "synthetic", "driver": "0", "cuda_runtime": 0, "cupy": "0",
                       "torch": None, "sm_count": 132, "l2_bytes": 50 << 20,
                       "smem_per_block_optin": 232448},
            "settings": {"dtype": "fp16", "warmup": 1, "repeats": 5, "input_sets": 1,
                         "ncu_cache_control": "all", "ncu_clock_control": "none"},
            "runs": runs, "baselines": []}


def _flash3_run(bc, stages, time_s, n=1024):
    return {"algorithm": "flash3", "batch": 1, "heads": 4, "seq_len": n, "head_dim": 64,
            "causal": False, "block_rows": 128, "block_cols": bc, "stages": stages,
            "consumer_warpgroups": 2, "threads": 384, "smem_bytes": 0, "registers": 168,
            "producer_regs": 40, "consumer_regs": 232, "rel_error": 1e-3,
            "rel_error_fp16_reference": 1e-3, "error_bound": 3e-3, "passed": True,
            "time_s": {"median": time_s, "min": time_s, "max": time_s}, "tflops": 1.0,
            "kernels": [{"name": "flash3_fwd",
                         "time_s": {"median": time_s, "min": time_s, "max": time_s},
                         "dram_read_bytes": None, "dram_write_bytes": None,
                         "ncu_duration_s": None}]}


def test_the_validation_hook_compares_flash3_measurements(tmp_path):
    from experiments import validation

    hw = iosim.load_hardware(validation.HARDWARE)
    runs = []
    for bc, stages in ((64, 2), (128, 3)):
        run = _flash3_run(bc, stages, 1.0)
        schedule = validation.flash3_schedule(run, hw)
        kernel = schedule.kernels[0]
        # the record's warps and registers are the model's
        assert (kernel.warps, kernel.producer_warps) == (12, 4)
        assert (kernel.registers_per_thread, kernel.producer_registers_per_thread) == (232, 40)
        assert {b.name: b.stages for b in kernel.buffers}["Kj"] == stages
        predicted = simulate_schedule(schedule, hardware=hw).kernels[0].times_s["timed"]
        run = _flash3_run(bc, stages, predicted / 0.8)  # measured 1.25x: APE 20%
        runs.append(run)
    # the file may hold flash2 runs beside flash3's: the section is flash3's
    flash2 = dict(_flash3_run(64, None, 1e-3), algorithm="flash2")
    flash2["kernels"] = [dict(flash2["kernels"][0], name="flash2_fwd")]
    data = tmp_path / "data"
    data.mkdir()
    (data / validation.FLASH3_FILE).write_text(json.dumps(_flash3_doc(runs + [flash2])))
    lines = validation.flash3_lines(data, tmp_path, workers=1)
    written = (tmp_path / "validation_flash3.csv").read_text().splitlines()
    assert len(written) == 1 + 2 and all(",flash3," in "," + line for line in written[1:])
    rows = validation.compare(validation.load_flash3(data), workers=1)[:2]
    assert [r["stages"] for r in rows] == [2, 3]
    for r in rows:
        assert r["time_ape"] == pytest.approx(20.0)
        assert r["time_ape_roofline"] >= 0
    text = "\n".join(lines)
    assert "| flash3 | 2 | 20 | 20 |" in text
    # both measured 1.25x their prediction: ranked alike, the predicted best is the measured best
    (choice,) = validation.flash3_choice(rows)
    assert choice["spearman"] == pytest.approx(1.0) and choice["within_5pct"]
    assert choice["predicted_best"] == choice["measured_best"]
    assert "| 1 | 4 | 1024 | 64 | False | 2 | 1 |" in text
    assert (tmp_path / "validation_flash3.csv").stat().st_size > 0


def test_the_validation_hook_says_when_the_file_is_absent(tmp_path):
    from experiments import validation

    text = "\n".join(validation.flash3_lines(tmp_path, tmp_path))
    assert "no bench_flash3.json" in text
    assert not (tmp_path / "validation_flash3.csv").exists()


def test_wgmma_rate_follows_the_resident_warpgroups():
    shape = AttentionShape(1, 1, 1024, 64)
    schedule = build_schedule("flash3", shape, 192, 128)  # 3 consumer warpgroups
    flat = dataclasses.replace(H100, wgmma_rate_by_warpgroups=())
    slower = dataclasses.replace(H100, wgmma_rate_by_warpgroups=(1.0, 1.0, 0.5))
    base, halved = (_flash3_demands(schedule, hw) for hw in (flat, slower))
    # 3 warpgroups resident per SM at half the rate: every MMA takes twice the pipe time
    exp_part = ((1.0 - H100.wgmma_sfu_overlap) * base["sfu_cycles"]
                + (1.0 - H100.wgmma_fp32_overlap) * base["fp32_cycles"])
    np.testing.assert_allclose(halved["tensor_cycles"] - exp_part,
                               2 * (base["tensor_cycles"] - exp_part))
    assert H100.wgmma_rate_factor(99) == H100.wgmma_rate_by_warpgroups[-1]
    assert flat.wgmma_rate_factor(3) == 1.0


def test_wgmma_rate_by_warpgroups_is_checked(tmp_path):
    from pathlib import Path

    text = (Path(iosim.__file__).parent / "presets" / "h100-measured.toml").read_text()
    bad = text.replace("wgmma_rate_by_warpgroups = [", "wgmma_rate_by_warpgroups = [0, ")
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    with pytest.raises(IosimError, match=r"wgmma_rate_by_warpgroups\[0\]"):
        iosim.load_hardware(str(path))


def test_explore_ranks_flash3_backward_tiles_in_whole_warpgroups_of_keys():
    from iosim.explore import explore

    shape = AttentionShape(1, 4, 1024, 64)
    rows = explore("flash3", shape, pass_="backward", workers=1, progress=False,
                   candidates=[32, 64, 128])
    assert rows and all(r.block_cols % 64 == 0 for r in rows)  # 64 keys per warpgroup
    assert {r.block_rows for r in rows} >= {32, 64}  # the Q block from the sizes
    best = rows[0]
    schedule = build_schedule("flash3", shape, best.block_rows, best.block_cols,
                              stages=best.stages, pass_="backward")
    assert schedule.kernels[1].name == "flash3_bwd"
    from iosim.simulate import simulate_schedule

    assert best.predicted_time_s == pytest.approx(
        simulate_schedule(schedule).totals.predicted_time_s, rel=1e-9)
