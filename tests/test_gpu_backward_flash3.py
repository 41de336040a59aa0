"""Host-side logic of the flash3 backward (gpu/flash3_bwd.cu via gpu.flash3_bwd / gpu.backward): tiles, shared
memory, registers, the variant table, the harness wiring. CPU only (no CuPy, no GPU)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gpu import backward as BW
from gpu import flash3_bwd as F3B

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "gpu" / "flash3_bwd.cu"
DATA = ROOT / "experiments" / "data" / "h100" / "bench_backward_flash3.json"


def test_smem_bytes_layout():
    # K, V (128 x d) + stages x (Q, dO) (BR x d) + 2 x dS^T (128 x BR) fp16 + stages x (L, D) (BR fp32) + 1024 slack
    assert F3B.smem_bytes(128, 64, dq_tma=False) == 2 * 128 * (2 * 128 + 4 * 64) + 2 * 2 * 128 * 64 + 2 * 2 * 64 * 4 + 1024
    assert F3B.smem_bytes(128, 64) - F3B.smem_bytes(128, 64, dq_tma=False) == 2 * 64 * 64 * 4
    assert F3B.smem_bytes(64, 128) - F3B.smem_bytes(64, 128, dq_tma=False) == 2 * 64 * 64 * 4
    assert F3B.smem_bytes(64, 128, 3, False) == 2 * 64 * (2 * 128 + 6 * 128) + 2 * 2 * 128 * 128 + 3 * 2 * 128 * 4 + 1024
    assert F3B.smem_bytes(128, 64, 3) - F3B.smem_bytes(128, 64, 2) == 2 * 2 * 64 * 128 + 2 * 64 * 4


def test_smem_matches_source_offsets():
    """The kernel's shared-memory offsets (OFF_*) add up to what the host asks for."""
    src = SRC.read_text()
    for name in ("OFF_V", "OFF_Q", "OFF_DO", "OFF_DS", "OFF_LD"):
        assert re.search(rf"constexpr int {name} = ", src), name
    assert "OFF_LD + STAGES * 2 * BR * 4 + 1024" in src


def test_check_config():
    assert F3B.fits(64, 128) and F3B.fits(128, 64) and F3B.fits(64, 64)
    assert not F3B.fits(128, 128)                       # registers
    assert not F3B.fits(96, 64) and not F3B.fits(64, 32)
    assert not F3B.fits(128, 64, {"STAGES": 4}) or F3B.smem_bytes(128, 64, 4) <= F3B.SMEM_LIMIT_BYTES
    assert not F3B.fits(64, 128, {"STAGES": 4})         # 240 KB of shared memory
    assert not F3B.fits(64, 128, {"NOPE": 1})
    assert not F3B.fits(64, 128, {"PRODUCER_REGS": 32})  # 32 + 2 x 240 > 168 x 3 (setmaxnreg would wait forever)
    assert F3B.fits(64, 128, {"PRODUCER_REGS": 32, "CONSUMER_REGS": 232})
    with pytest.raises(ValueError):
        F3B.check_config(256, 64)


def test_register_budget_matches_source():
    src = SRC.read_text()
    assert f"#define PRODUCER_REGS {F3B.PRODUCER_REGS}" in src and f"#define CONSUMER_REGS {F3B.CONSUMER_REGS}" in src
    assert "__launch_bounds__(THREADS, 1)" in src
    assert F3B.LAUNCH_REGS == (65536 // F3B.THREADS) // 8 * 8
    assert 128 * F3B.PRODUCER_REGS + 256 * F3B.CONSUMER_REGS <= F3B.LAUNCH_REGS * F3B.THREADS


def test_variant_table_valid():
    assert F3B.validate_variants() == []
    assert set(F3B.VARIANTS) == {64, 128}
    bad = {64: [(64, 128, {})], 128: [(64, 128, {}), (128, 128, {}), (64, 128, {})]}
    errs = F3B.validate_variants(bad)
    assert any("not the default" in e for e in errs) and any("registers" in e for e in errs)
    assert any("duplicate" in e for e in errs)


def test_default_blocks_match_source():
    src = SRC.read_text()
    assert re.search(r"#define BR \(HEAD_DIM == 64 \? 128 : 64\)", src)
    assert F3B.DEFAULT_BLOCK_ROWS == {64: 128, 128: 64}
    assert f"constexpr int BC = {F3B.BLOCK_COLS};" in src
    assert f"\n{F3B.KERNEL_NAME}(" in src
    assert F3B.dq_split(128, 64) == 1 and F3B.dq_split(64, 128) == 0


def test_harness_wiring():
    assert BW.KERNEL_NAMES["flash3"] == F3B.KERNEL_NAMES == ["flash3_bwd_dot", "flash3_bwd", "flash3_bwd_convert"]
    assert "flash3" in BW.FUSED
    assert BW.fused_variants("flash3") == F3B.VARIANTS or F3B.EXTRA_VARIANTS_ENV in __import__("os").environ
    assert BW.fused_variants("flash2") is BW.FLASH2_VARIANTS
    src = SRC.read_text()
    for name in F3B.KERNEL_NAMES:
        assert f"\n{name}(" in src


def test_flash3_config_env(tmp_path, monkeypatch):
    monkeypatch.delenv("IOSIM_FLASH3_BWD_CONFIG", raising=False)
    assert BW.flash2_config(64, "flash3") is None
    p = tmp_path / "best.json"
    p.write_text(json.dumps({"128": [64, 128, {"DQ_V4": 0}]}))
    monkeypatch.setenv("IOSIM_FLASH3_BWD_CONFIG", str(p))
    assert BW.flash2_config(128, "flash3") == (64, 128, {"DQ_V4": 0})
    assert BW.flash2_config(128) is None or "IOSIM_FLASH2_BWD_CONFIG" in __import__("os").environ


def test_pick_best_flash3_variant():
    t = lambda m: {"median": m, "min": m, "max": m, "n": 10}  # noqa: E731
    res = [{"variant": "flash3", "head_dim": 64, "block_rows": 128, "block_cols": 128, "defines": {},
            "checks_passed": True, "time_s": t(2.0)},
           {"variant": "flash3", "head_dim": 64, "block_rows": 64, "block_cols": 128, "defines": {},
            "checks_passed": False, "time_s": t(1.0)},
           {"variant": "flash2", "head_dim": 64, "block_rows": 64, "block_cols": 128, "defines": {},
            "checks_passed": True, "time_s": t(0.5)}]
    assert BW.pick_best_variants(res, "flash3") == {"64": [128, 128, {}]}


def test_hopper_header_inlined():
    from gpu import kernels as K

    src = K._source("flash3_bwd.cu", {"HEAD_DIM": 64})
    assert '#include "' not in src and "wgmma_ss_tt_n64" in src and "mbar_expect_tx" in src
    fwd = K._source("flash3.cu", {"HEAD_DIM": 64})
    assert '#include "' not in fwd and "wgmma_rs_n64_tb" in fwd


@pytest.mark.skipif(not DATA.exists(), reason="no flash3 backward measurements committed yet")
def test_committed_flash3_backward_data():
    doc = json.loads(DATA.read_text())
    assert BW.validate(doc) == []
    runs = [r for r in doc["runs"] if r["algorithm"] == "flash3"]
    assert runs
    for r in runs:
        assert [k["name"] for k in r["kernels"]] == F3B.KERNEL_NAMES
        for g in ("dq", "dk", "dv"):
            c = r["grads"][g]
            assert c["rel_error"] <= c["error_bound"]
        assert r["grads"]["dk"]["passed"] and r["grads"]["dv"]["passed"]
        assert r["baselines"]["sdpa"]["time_s"]["n"] >= 10
        assert sum(k["time_s"]["median"] for k in r["kernels"]) == pytest.approx(r["time_s"]["median"], rel=0.05)


def test_flash3_backward_kernel_names_and_tiles_match_the_simulator():
    from iosim import AttentionShape, build_schedule

    for d in F3B.HEAD_DIMS:
        schedule = build_schedule("flash3", AttentionShape(1, 1, 4096, d), pass_="backward")
        assert [k.name for k in schedule.kernels] == F3B.KERNEL_NAMES
        # the simulator's default tiles are the kernel's: Br per head dimension, Bc keys
        assert (schedule.block_rows, schedule.block_cols) == (F3B.DEFAULT_BLOCK_ROWS[d],
                                                              F3B.BLOCK_COLS)
        main = schedule.kernels[1]
        assert main.warps * 32 == F3B.THREADS
        assert main.consumer_warpgroups == F3B.CONSUMER_WARPGROUPS


def test_fused_backward_runs_hand_the_saved_tensors_to_their_kernels():
    calls = []

    class Impl:
        br, bc, kernel_names = 64, 128, ("a_dot", "a", "a_convert")

        def run(self, *args, events=None):
            calls.append((args, events))

        def free(self):
            calls.append("free")

    run = BW._FusedBackwardRun()
    run._adopt(Impl(), (2, 3, 256, 64), ordered=1)
    assert (run.B, run.H, run.N, run.d, run.block_rows, run.block_cols) == (2, 3, 256, 64, 64, 128)
    assert run.kernel_names == ["a_dot", "a", "a_convert"] and run.ordered is True
    run.run("q", "k", "v", "do", ("o", "L"), "dq", "dk", "dv", events=[1])
    run.free()
    assert calls == [(("q", "k", "v", "o", "L", "do", "dq", "dk", "dv"), [1]), "free"]
