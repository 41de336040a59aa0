"""Host-side (CPU-only) parts of the Hopper flash3 kernel: tile choices, shared-memory sizes, TMA tensor-map
fields, compile-time defines, and how the harness names and validates flash3 runs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpu import flash3 as F3
from gpu import kernels as K
from gpu import schema as S
from gpu import sweep as SW

CU = (Path(__file__).resolve().parents[1] / "gpu" / "flash3.cu").read_text()


def test_tensor_map_fields_describe_a_3d_fp16_tensor_in_128_byte_panels():
    f = F3.tensor_map_fields(batch_heads=128, seq_len=4096, head_dim=128, box_rows=128)
    assert f["rank"] == 3
    assert f["global_dim"] == (128, 4096, 128)              # d innermost, then N, then B*H
    assert f["global_strides_bytes"] == (256, 4096 * 256)   # one row of 128 fp16 = 256 B; one head = N rows
    assert f["box_dim"] == (64, 128, 1)                     # 64 fp16 = 128 B: one swizzle row
    assert f["box_bytes"] == 128 * 128
    assert f["swizzle"] == 3 and f["data_type"] == 6        # CU_TENSOR_MAP_SWIZZLE_128B, FLOAT16
    assert f["oob_fill"] == 0                                # rows past N read as zeros
    g = F3.tensor_map_fields(batch_heads=3, seq_len=200, head_dim=64, box_rows=192)
    assert g["global_dim"] == (64, 200, 3) and g["global_strides_bytes"] == (128, 200 * 128)
    assert g["box_dim"] == (64, 192, 1)


@pytest.mark.parametrize("kw, match", [
    (dict(batch_heads=1, seq_len=64, head_dim=96, box_rows=64), "multiple of 64"),
    (dict(batch_heads=1, seq_len=64, head_dim=64, box_rows=320), "256 rows"),
    (dict(batch_heads=0, seq_len=64, head_dim=64, box_rows=64), "batch_heads"),
    (dict(batch_heads=1, seq_len=64.0, head_dim=64, box_rows=64), "seq_len"),
])
def test_tensor_map_fields_reject_what_tma_cannot_do(kw, match):
    with pytest.raises(ValueError, match=match):
        F3.tensor_map_fields(**kw)


def test_shared_memory_bytes():
    # Q (128 x 128 fp16 = 32 KiB) + 2 stages of K and V (4 x 128 x 128 fp16 = 128 KiB) + 1 KiB alignment slack
    assert F3.smem_bytes(128, 128, 2) == 32768 + 131072 + 1024
    # d = 64, 3 consumer warpgroups: Q 192 x 64 (24 KiB) + 2 x (K, V) of 128 x 64 (64 KiB) + 1 KiB
    assert F3.smem_bytes(64, 128, 2, block_rows=192) == 24576 + 65536 + 1024
    assert K.flash_smem_bytes("flash3", 128, 128, 128) == F3.smem_bytes(128, 128, F3.default_stages(128, 128))


@pytest.mark.parametrize("d, br, bc, st, match", [
    (96, 128, 128, 2, "head_dim"),
    (128, 64, 128, 2, "block_rows"),
    (128, 128, 32, 2, "block_cols"),
    (128, 128, 128, 1, "at least 2"),
    (128, 128, 192, 2, "head_dim 64 only"),
    (128, 128, 128, 4, "shared"),   # 32 KiB + 4 x 64 KiB > 227 KiB
    (128, 192, 128, 2, "spills"),
    (64, 192, 192, 2, "spills"),   # 3 consumer warpgroups at d=128: S + O + P = 160 registers, the whole budget
])
def test_check_config_rejects(d, br, bc, st, match):
    with pytest.raises(ValueError, match=match):
        F3.check_config(d, br, bc, st)
    assert not F3.fits(br, bc, d, st)


def test_three_stages_fit_at_d128_but_four_do_not():
    assert F3.fits(128, 128, 128, 3)           # 32 KiB + 3 x 64 KiB + 1 KiB = 225 KiB <= 227 KiB
    assert not F3.fits(128, 128, 128, 4)


def test_register_budgets_fill_but_do_not_exceed_the_register_file():
    for ncwg, (producer, consumer) in F3.REGS.items():
        assert producer % 8 == 0 and consumer % 8 == 0       # setmaxnreg takes multiples of 8
        total = 128 * producer + 128 * ncwg * consumer
        assert 60000 < total <= 65536, (ncwg, total)
        # ... and the kernel source uses the same numbers
        assert f"NCWG == 3 ? {F3.REGS[3][0]} : {F3.REGS[2][0]}" in CU
        assert f"NCWG == 3 ? {F3.REGS[3][1]} : {F3.REGS[2][1]}" in CU


def test_defines_name_only_the_non_default_choices():
    assert F3.defines(128, 128, 2) == {"HEAD_DIM": 128, "BC": 128, "STAGES": 2}
    assert F3.defines(64, 128, 3, pingpong=0, block_rows=192) == {
        "HEAD_DIM": 64, "BC": 128, "STAGES": 3, "PINGPONG": 0, "NCWG": 3}
    assert F3.threads(128) == 384 and F3.threads(192) == 512


def test_source_defaults_match_the_host_defaults():
    def default(name):
        return int(re.search(rf"#ifndef {name}\n#define {name} (\d+)", CU).group(1))

    assert default("NCWG") == F3.CONSUMER_WARPGROUPS
    assert default("BC") == 128 and default("STAGES") == 2 and default("PINGPONG") == 1


def test_sweep_and_schema_know_flash3():
    groups = SW.configs("target", ["flash3"])
    assert len(groups) == 4                                   # d 64/128, causal or not
    pairs = {(c["block_rows"], c["block_cols"]) for g in groups for c in g}
    assert pairs and all(F3.fits(br, bc, 64) or F3.fits(br, bc, 128) for br, bc in pairs)
    assert "flash3" not in SW.ALGORITHMS                       # runs only when named
    assert S.expected_kernels("flash3", True) == ["flash3_fwd"]
    run = {"batch": 1, "heads": 1, "seq_len": 8, "head_dim": 64, "causal": False, "algorithm": "flash3",
           "block_rows": 128, "block_cols": 128, "rel_error": 1e-4, "rel_error_fp16_reference": 1e-4,
           "error_bound": 3e-4, "passed": True, "time_s": None, "tflops": None,
           "kernels": [{"name": "flash3_fwd", "time_s": None, "dram_read_bytes": None, "dram_write_bytes": None,
                        "ncu_duration_s": None}]}
    doc = {"schema": S.SCHEMA, "date": "2026-11-26", "device": dict.fromkeys(S.DEVICE_KEYS),
           "settings": dict.fromkeys(S.SETTINGS_KEYS), "runs": [run], "baselines": []}
    assert S.validate(doc) == []
    bad = dict(run, block_rows=None)
    assert any("block_rows" in e for e in S.validate(dict(doc, runs=[bad])))


DATA = Path(__file__).resolve().parents[1] / "experiments" / "data" / "h100"


def test_committed_flash3_data_is_valid_and_complete():
    import json

    doc = json.loads((DATA / "bench_flash3.json").read_text())
    assert S.validate(doc) == []
    assert doc["runs"] and all(r["passed"] for r in doc["runs"])
    assert {r["algorithm"] for r in doc["runs"]} == {"flash2", "flash3"}
    assert {b["name"] for b in doc["baselines"]} >= {"torch_sdpa"}
    for r in doc["runs"]:
        if r["algorithm"] != "flash3":
            continue
        for key in ("block_rows", "block_cols", "stages", "consumer_warpgroups", "threads", "smem_bytes",
                    "registers"):
            assert r[key] is not None, key
        assert r["threads"] == 128 * (r["consumer_warpgroups"] + 1) and r["block_rows"] == 64 * r["consumer_warpgroups"]
        assert r["smem_bytes"] == F3.smem_bytes(r["head_dim"], r["block_cols"], r["stages"], r["block_rows"])
        k = r["kernels"][0]
        if k["dram_read_bytes"] is not None:   # ncu: at least Q, K and V (fp16) are read once from DRAM
            qkv = 3 * r["batch"] * r["heads"] * r["seq_len"] * r["head_dim"] * 2
            assert k["dram_read_bytes"] >= 0.99 * qkv
    assert any(r["algorithm"] == "flash3" and r["kernels"][0]["dram_read_bytes"] for r in doc["runs"])
    san = json.loads((DATA / "sanitizers_flash3.json").read_text())
    assert {x["tool"] for x in san["results"]} == {"memcheck", "racecheck"}
    assert all(x["error_count"] == 0 and x["all_outputs_passed"] for x in san["results"])
    sass = json.loads((DATA / "sass_flash3.json").read_text())
    for e in sass["entries"]:
        assert e["returncode"] == 0 and e["spill_store_bytes"] == 0 and e["spill_load_bytes"] == 0
        if "sass_counts" in e:
            assert e["sass_counts"]["HGMMA"] > 0 and e["sass_counts"]["LDL"] == 0 and e["sass_counts"]["STL"] == 0
            # the main loop's softmax sits between wait_group 1 and wait_group 0 (under the PV wgmma):
            # one exponential per S element of the thread (block_cols / 2) plus the two rescale factors
            assert e["mufu_ex2_between_wait1_and_wait0"] == e["variant"]["BC"] // 2 + 2
