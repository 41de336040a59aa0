"""Host-side logic of the flash2 backward (gpu/flash2_bwd.cu via gpu.kernels / gpu.backward) and its committed
measurements (experiments/data/h100/bench_backward.json). CPU only."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gpu import backward as BW
from gpu import kernels as K

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "experiments" / "data" / "h100" / "bench_backward.json"
SRC = ROOT / "gpu" / "flash2_bwd.cu"


def test_blocks_ok():
    assert K.flash2_bwd_blocks_ok(64, 128, 64) and K.flash2_bwd_blocks_ok(64, 128, 128)
    assert K.flash2_bwd_blocks_ok(32, 128, 64) and K.flash2_bwd_blocks_ok(64, 64, 128)
    assert not K.flash2_bwd_blocks_ok(16, 128, 64)      # dS^T swizzle needs rows of 4 or 8k chunks
    assert not K.flash2_bwd_blocks_ok(128, 64, 64)      # BR > BC
    assert not K.flash2_bwd_blocks_ok(64, 48, 64)       # 3 warps do not split into 4 row groups
    assert not K.flash2_bwd_blocks_ok(128, 128, 256)    # shared memory


def test_smem_bytes_layout():
    # K, V (BC x d) + 2 x (Q, dO) (BR x d) fp16 + 2 dS^T (BC x BR) fp16 + 2 x (L, D) (BR) fp32
    assert K.flash2_bwd_smem_bytes(64, 128, 64) == 2 * 64 * (2 * 128 + 4 * 64) + 2 * 2 * 128 * 64 + 2 * 2 * 4 * 64
    assert K.flash2_bwd_smem_bytes(64, 128, 64, False) == K.flash2_bwd_smem_bytes(64, 128, 64) - 2 * 128 * 64


def test_source_defaults_match_host_defaults():
    src = SRC.read_text()
    br = int(re.search(r"#define BR (\d+)", src).group(1))
    bc = int(re.search(r"#define BC (\d+)", src).group(1))
    assert (br, bc) in K.FLASH2_BWD_DEFAULT_BLOCKS.values()
    assert re.search(r"#define PIPE_DQ 1\b", src) and re.search(r"#define FUSE_SDP 0\b", src)
    for name in K.FLASH2_BWD_KERNEL_NAMES:
        assert f"\n{name}(" in src


def test_flash2_config_env(tmp_path, monkeypatch):
    monkeypatch.delenv("IOSIM_FLASH2_BWD_CONFIG", raising=False)
    assert BW.flash2_config(64) is None
    p = tmp_path / "best.json"
    p.write_text(json.dumps({"64": [64, 128, {"FUSE_SDP": 0}]}))
    monkeypatch.setenv("IOSIM_FLASH2_BWD_CONFIG", str(p))
    assert BW.flash2_config(64) == (64, 128, {"FUSE_SDP": 0})
    assert BW.flash2_config(128) is None


def test_pick_best_variants():
    t = lambda m: {"median": m, "min": m, "max": m, "n": 10}  # noqa: E731
    res = [{"variant": "sdpa", "head_dim": 64, "time_s": t(1.0)},
           {"variant": "flash2", "head_dim": 64, "block_rows": 64, "block_cols": 128, "defines": {},
            "checks_passed": True, "time_s": t(3.0)},
           {"variant": "flash2", "head_dim": 64, "block_rows": 32, "block_cols": 128, "defines": {"A": 1},
            "checks_passed": False, "time_s": t(2.0)},   # faster but failed its checks
           {"variant": "flash2", "head_dim": 64, "block_rows": 64, "block_cols": 64, "defines": {"B": 0},
            "checks_passed": True, "time_s": t(2.5)},
           {"variant": "flash2", "head_dim": 128, "block_rows": 64, "block_cols": 128, "defines": {},
            "error": "CompileException"}]
    assert BW.pick_best_variants(res) == {"64": [64, 64, {"B": 0}]}


def _new_flash2_runs(doc):
    return [r for r in doc["runs"] if r["algorithm"] == "flash2" and r.get("threads") is not None]


@pytest.mark.skipif(not DATA.exists(), reason="no committed backward data")
def test_committed_flash2_records():
    doc = json.loads(DATA.read_text())
    assert BW.validate(doc) == []
    new = _new_flash2_runs(doc)
    assert len(new) >= 16
    for r in new:   # tiles, warps and resources recorded for the simulator
        for key in ("block_rows", "block_cols", "threads", "registers", "smem_bytes"):
            assert isinstance(r[key], int), key
        assert r["threads"] == 32 * r["block_cols"] // 16
        assert r["smem_bytes"] == K.flash2_bwd_smem_bytes(r["block_rows"], r["block_cols"], r["head_dim"],
                                                          bool(r["defines"].get("PIPE_DQ", 1)))
        for g in BW.GRADS:   # every gradient within the error bound; dK, dV always bitwise stable
            c = r["grads"][g]
            assert c["rel_error"] <= c["error_bound"]
        assert r["grads"]["dk"]["passed"] and r["grads"]["dv"]["passed"]
        if "K/V blocks in blockIdx.x order" in r["dq_accumulation"]:
            assert r["passed"]
    # faster than the first (BC = 64, 4 warps) kernel's records at the target shape, same error rule
    old = [r for r in doc["runs"] if r["algorithm"] == "flash2" and r.get("threads") is None]
    for r in new:
        if r["seq_len"] == 4096:
            same = [o for o in old if (o["seq_len"], o["head_dim"], o["causal"], o["dq_accumulation"]) ==
                    (r["seq_len"], r["head_dim"], r["causal"], r["dq_accumulation"])]
            assert same and r["time_s"]["median"] < min(o["time_s"]["median"] for o in same)


@pytest.mark.skipif(not DATA.exists(), reason="no committed backward data")
def test_committed_flash2_ncu_and_sanitizers():
    doc = json.loads(DATA.read_text())
    target = [r for r in _new_flash2_runs(doc) if r["seq_len"] == 4096 and r["batch"] == 8
              and "unordered" in r["dq_accumulation"]]
    with_bytes = [r for r in target if all("dram_read_bytes" in k for k in r["kernels"])]
    assert {(r["head_dim"], r["causal"]) for r in with_bytes} >= {(64, False), (128, False)}
    for r in with_bytes:
        main = r["kernels"][1]
        assert main["name"] == "flash2_bwd"
        # at least Q, K, V, dO read once; at least dK, dV written once
        assert main["dram_read_bytes"] >= 4 * 2 * r["batch"] * r["heads"] * r["seq_len"] * r["head_dim"] * 0.9
    san = doc["settings"]["sanitizers_flash2"]["results"]
    assert {x["tool"] for x in san} == {"memcheck", "racecheck"}
    for x in san:
        assert x["rc"] == 0 and x["checks"] == x["checks_passed"] > 0
    assert any("0 errors" in s for x in san for s in x["summary"])
