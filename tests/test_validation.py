"""The validation comparison on synthetic measurements whose answers are known."""
import json

import pytest

import iosim
from experiments import validation


def _run(algorithm, n, causal=False, block=(None, None), kernels=()):
    return {"algorithm": algorithm, "batch": 1, "heads": 2, "seq_len": n, "head_dim": 64,
            "causal": causal, "block_rows": block[0], "block_cols": block[1],
            "rel_error": 1e-3, "rel_error_fp16_reference": 1e-3, "error_bound": 3e-3,
            "passed": True, "time_s": {"median": 1e-3, "min": 1e-3, "max": 1e-3},
            "tflops": 1.0, "kernels": list(kernels)}


def _kernel(name, time_s, dram=None):
    return {"name": name, "time_s": {"median": time_s, "min": time_s, "max": time_s},
            "dram_read_bytes": None if dram is None else dram // 2,
            "dram_write_bytes": None if dram is None else dram - dram // 2,
            "ncu_duration_s": None}


def _doc(runs):
    return {"schema": "iosim-gpu-bench/1", "date": "2026-11-25T00:00:00+00:00",
            "device": {"name": "test", "driver": "0", "cuda_runtime": 0, "cupy": "0",
                       "torch": None, "sm_count": 132, "l2_bytes": 50 << 20,
                       "smem_per_block_optin": 232448},
            "settings": {"dtype": "fp16", "warmup": 1, "repeats": 20, "input_sets": 3,
                         "ncu_cache_control": "all", "ncu_clock_control": "none"},
            "runs": runs, "baselines": []}


def _predicted(algorithm, n, block=(None, None), model="l2"):
    shape = iosim.AttentionShape(1, 2, n, 64)
    return iosim.simulate(algorithm, shape, block_rows=block[0], block_cols=block[1],
                          hardware=validation.HARDWARE, model=model)


def test_errors_are_measured_against_the_right_kernels():
    sim = _predicted("standard", 512)
    # measured = predicted x 1.25 (time) and x 0.8 (bytes): APE 20% and 25%
    kernels = [_kernel(k.name, k.predicted_time_s / 0.8, int(k.hbm_bytes / 0.8))
               for k in sim.kernels]
    rows = validation.compare(_doc([_run("standard", 512, kernels=kernels)]))
    assert [r["kernel"] for r in rows] == ["qk_gemm", "softmax", "pv_gemm"]
    for r in rows:
        assert r["time_ape"] == pytest.approx(20.0)
        assert r["bytes_ape_l2"] == pytest.approx(20.0, abs=1e-3)
    summary = {s["algorithm"]: s for s in validation.summarise(rows)}
    assert summary["standard"]["time_ape_median_pct"] == pytest.approx(20.0)
    assert summary["standard"]["kernels_timed"] == 3


def test_byte_errors_only_cover_kernels_larger_than_four_l2s():
    sim = _predicted("flash2", 512)  # 2 heads x 512 x 64 fp16: far below 4 x 50 MiB
    kernels = [_kernel("flash2_fwd", 1e-4, 10 * sim.totals.hbm_bytes)]
    rows = validation.compare(_doc([_run("flash2", 512, block=(64, 64), kernels=kernels)]))
    assert rows[0]["large_data"] is False
    summary = validation.summarise(rows)[0]
    assert summary["kernels_profiled_large"] == 0 and summary["bytes_ape_median_pct_l2"] is None


def test_block_choice_ranks_and_flags_the_best_pair():
    pairs = [(64, 64), (128, 64), (64, 128)]
    runs = []
    for i, pair in enumerate(pairs):
        predicted = _predicted("flash2", 1024, pair).kernels[0].predicted_time_s
        runs.append(_run("flash2", 1024, block=pair,
                         kernels=[_kernel("flash2_fwd", predicted * 2)]))  # same order
    rows = validation.compare(_doc(runs))
    (entry,) = validation.block_choice(rows)
    assert entry["pairs"] == 3
    assert entry["spearman"] == pytest.approx(1.0)
    assert entry["within_5pct"] and entry["predicted_best"] == entry["measured_best"]
    # reverse the measured order: the predicted best is now the measured worst
    for run in runs:
        run["kernels"][0]["time_s"] = {k: 1.0 / v for k, v in run["kernels"][0]["time_s"].items()}
    for run in runs:
        t = run["kernels"][0]["time_s"]
        t["min"], t["max"] = min(t.values()), max(t.values())
    entry = validation.block_choice(validation.compare(_doc(runs)))[0]
    assert entry["spearman"] == pytest.approx(-1.0)
    assert not entry["within_5pct"]


def test_main_writes_tables_figures_and_a_section(tmp_path):
    sim = _predicted("megatron", 512)
    kernels = [_kernel(k.name, k.predicted_time_s, k.hbm_bytes) for k in sim.kernels]
    data = tmp_path / "data"
    data.mkdir()
    (data / "bench.json").write_text(json.dumps(_doc([_run("megatron", 512, kernels=kernels)])))
    section = validation.main(tmp_path / "results", data_dir=data)
    for name in ("validation_kernels.csv", "validation_summary.csv", "validation_blocks.csv",
                 "validation_time.png", "validation_bytes.png", "validation_roofline.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0
    assert "| megatron | 3 | 0 |" in section


def test_a_malformed_bench_file_is_refused(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(iosim.IosimError, match="does not follow the bench schema"):
        validation.load_bench(tmp_path)


def test_occupancy_groups_flash_errors_by_the_models_resident_warps():
    def row(algorithm, warps, ape, roof):
        return {"algorithm": algorithm, "model_warps_per_sm": warps, "time_ape": ape,
                "time_ape_roofline": roof}
    rows = [row("flash2", 4, 10.0, 60.0), row("flash2", 4, 20.0, 70.0),
            row("flash2", 8, 5.0, 30.0), row("standard", 16, 5.0, 5.0),
            row("flash1", 8, 12.0, 50.0)]
    table = validation.occupancy(rows)
    by_key = {(t["algorithm"], t["resident_warps_per_sm"]): t for t in table}
    assert by_key[("flash2", 4)]["kernels"] == 2
    assert by_key[("flash2", 4)]["time_ape_median_pct"] == 15.0
    assert by_key[("flash2", 4)]["time_ape_median_pct_roofline"] == 65.0
    assert by_key[("flash2", 8)]["time_ape_worst_pct"] == 5.0
    assert ("flash1", 8) in by_key
    assert all(t["algorithm"] != "standard" for t in table)


def test_measured_registers_are_declared_on_the_matching_flash_kernel(tmp_path):
    (tmp_path / "occupancy.json").write_text(json.dumps({"records": [
        {"algorithm": "flash2", "kernel": "flash2_fwd", "head_dim": 64, "block_rows": 64,
         "block_cols": 64, "warp_rows": 16, "launch__registers_per_thread": 200},
        {"algorithm": "standard", "kernel": "softmax", "launch__registers_per_thread": 40}]}))
    registers = validation.load_registers(tmp_path)
    assert registers == {("flash2", 64, 64, 64, 16): 200}
    run = _run("flash2", 512, block=(64, 64))
    run["warp_rows"] = 16
    prediction = validation.predict(run, registers=registers)["kernels"]["flash2_fwd"]
    assert prediction["model_registers"] == 200 and prediction["registers_measured"]
    run["warp_rows"] = 32  # another variant: the registers are estimated
    prediction = validation.predict(run, registers=registers)["kernels"]["flash2_fwd"]
    assert not prediction["registers_measured"]


def test_rows_carry_both_time_models_and_the_held_out_flag():
    sim = _predicted("flash2", 512, (64, 64))
    kernels = [_kernel("flash2_fwd", sim.kernels[0].times_s["roofline"])]
    (row,) = validation.compare(_doc([_run("flash2", 512, block=(64, 64), kernels=kernels)]))
    assert row["time_ape_roofline"] == pytest.approx(0.0, abs=1e-9)
    assert row["time_ape"] == pytest.approx(
        abs(row["predicted_time_s"] - row["measured_time_s"]) / row["measured_time_s"] * 100)
    assert row["held_out"] is False


def test_the_occupancy_calculator_agrees_with_nsight_compute_on_every_real_kernel():
    table = validation.occupancy_check()
    assert len(table) >= 20  # every flash variant of the sweep, d = 64 and 128
    for row in table:
        assert row["model_threads"] == row["threads"]
        assert row["warps_per_sm_model"] == pytest.approx(row["warps_per_sm_ncu_theoretical"])
        assert row["warps_per_sm_ncu_achieved"] <= row["warps_per_sm_ncu_theoretical"] + 0.5


def test_every_measured_backward_kernel_meets_its_prediction():
    rows = validation.compare_backward()
    runs = validation.backward_runs()
    assert len(rows) == sum(len(r["kernels"]) for r in runs)  # every kernel matched by name
    standard = {"dv_gemm", "dp_gemm", "softmax_backward", "dq_gemm", "dk_gemm"}
    fused = {f"{alg}_bwd{part}" for alg in ("flash2", "flash3")
             for part in ("_dot", "", "_convert")}
    assert standard | fused == {r["kernel"] for r in rows}
    summary = {s["kernel"]: s for s in validation._backward_summary(rows)}
    # the backward's bytes are counted as exactly as the forward's (median within 5%)
    assert summary["all"]["bytes_ape_median_pct_l2"] < 5
