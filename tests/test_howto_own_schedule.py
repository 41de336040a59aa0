"""The how-to "Write your own schedule" (docs/howto/own-schedule.md): its example runs, its
schedule computes attention, and every claim the page makes about it holds."""
import importlib.util
import re
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import iosim
from iosim.simulate import COUNT_FIELDS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "own_schedule.py"
HOWTO = ROOT / "docs" / "howto" / "own-schedule.md"
HARDWARE = "h100-measured"
# the shape and tiles the how-to compares and explores at
SHAPE = iosim.AttentionShape(8, 16, 4096, 128, dtype="fp16")
DEFAULT_TILES = (128, 64)
SMEM_LIMITED_TILES = (64, 64)
SIZES = (32, 64, 128, 256)


def _load_example():
    spec = importlib.util.spec_from_file_location("own_schedule_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


ex = _load_example()


def _same_counts(a, b):
    return {f: (getattr(a, f), getattr(b, f)) for f in COUNT_FIELDS
            if getattr(a, f) != getattr(b, f)}


# ---- the executor proves the schedule ---------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 96), d=st.sampled_from([8, 16, 32]), heads=st.integers(1, 2),
       block_rows=st.integers(8, 64), block_cols=st.integers(8, 64), causal=st.booleans(),
       kv_stages=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1))
def test_executor_output_equals_reference(n, d, heads, block_rows, block_cols, causal,
                                          kv_stages, seed):
    shape = iosim.AttentionShape(1, heads, n, d, causal=causal)
    schedule = ex.single_buffered_flash2(shape, block_rows, block_cols, kv_stages=kv_stages)
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((heads, n, d)) for _ in range(3))
    result = iosim.execute(schedule, q, k, v)
    out, row_max, row_sum = iosim.reference_attention(q, k, v, causal=causal,
                                                      return_stats=True)
    assert result.output.dtype == np.float64
    np.testing.assert_allclose(result.output, out, rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.tensors["L"][..., 0], row_max + np.log(row_sum),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_prove_as_the_howto_runs_it(causal):
    seed = int(np.random.SeedSequence().generate_state(1)[0])  # fresh inputs every run
    schedule = ex.single_buffered_flash2(iosim.AttentionShape(1, 2, 200, 64, causal=causal),
                                         64, 48)
    assert ex.prove(schedule, seed=seed) < 1e-10, f"seed {seed}"


# ---- counts: the claims of section 4 ----------------------------------------------------------

@pytest.mark.parametrize("model", ["two-level", "l2"])
def test_two_stages_reproduce_builtin_flash2(model):
    builtin = iosim.simulate("flash2", SHAPE, block_rows=DEFAULT_TILES[0],
                             block_cols=DEFAULT_TILES[1], hardware=HARDWARE, model=model)
    ours = ex.count(ex.single_buffered_flash2(SHAPE, *DEFAULT_TILES, kv_stages=2), HARDWARE,
                    model)
    assert _same_counts(builtin.totals, ours.totals) == {}
    assert builtin.totals.times_s == ours.totals.times_s
    assert builtin.kernels[0].occupancy == ours.kernels[0].occupancy


@pytest.mark.parametrize("tiles", [(16, 16), (32, 64), (64, 64), (128, 64), (96, 80)])
@pytest.mark.parametrize("causal", [False, True])
def test_single_buffering_moves_the_same_bytes_under_two_level(tiles, causal):
    shape = iosim.AttentionShape(2, 2, 512, 64, causal=causal)
    double = ex.count(ex.single_buffered_flash2(shape, *tiles, kv_stages=2), HARDWARE,
                      "two-level")
    single = ex.count(ex.single_buffered_flash2(shape, *tiles), HARDWARE, "two-level")
    assert _same_counts(double.totals, single.totals) == {}
    assert single.totals.times_s["roofline"] == double.totals.times_s["roofline"]
    freed = 2 * tiles[1] * shape.head_dim * shape.elem_bytes
    assert (double.kernels[0].occupancy["smem_bytes_per_cta"]
            - single.kernels[0].occupancy["smem_bytes_per_cta"]) == freed


def test_at_default_tiles_single_buffering_is_slower_same_bytes_same_residency():
    assert (iosim.build_schedule("flash2", SHAPE).block_rows,
            iosim.build_schedule("flash2", SHAPE).block_cols) == DEFAULT_TILES
    results = ex.compare(SHAPE, *DEFAULT_TILES, hardware=HARDWARE)
    flash2, single = results["flash2"], results["single-buffered"]
    assert _same_counts(flash2.totals, single.totals) == {}
    f_occ, s_occ = flash2.kernels[0].occupancy, single.kernels[0].occupancy
    assert f_occ["smem_bytes_per_cta"] - s_occ["smem_bytes_per_cta"] == 32 * 1024
    assert f_occ["ctas_per_sm"] == s_occ["ctas_per_sm"] == 1
    assert f_occ["limiter"] == s_occ["limiter"] == "registers"
    assert single.totals.times_s["roofline"] == flash2.totals.times_s["roofline"]
    assert single.totals.times_s["timed"] > 1.05 * flash2.totals.times_s["timed"]
    text = ex.describe(results)
    assert "single-buffered (128, 64)" in text and "flash2 (128, 64)" in text


def test_where_smem_limits_single_buffering_keeps_more_ctas_and_is_faster():
    results = ex.compare(SHAPE, *SMEM_LIMITED_TILES, hardware=HARDWARE)
    flash2, single = results["flash2"], results["single-buffered"]
    f_occ, s_occ = flash2.kernels[0].occupancy, single.kernels[0].occupancy
    assert f_occ["limiter"] == "smem" and f_occ["ctas_per_sm"] == 2
    assert s_occ["ctas_per_sm"] == 3
    assert single.totals.hbm_read_bytes == flash2.totals.hbm_read_bytes
    assert single.totals.flops == flash2.totals.flops
    assert single.totals.times_s["timed"] < 0.95 * flash2.totals.times_s["timed"]


# ---- the block-size loop: section 5 -----------------------------------------------------------

@pytest.fixture(scope="module")
def explored():
    flash2 = partial(ex.single_buffered_flash2, kv_stages=2)
    return {"flash2": ex.explore_blocks(flash2, SHAPE, HARDWARE, sizes=SIZES),
            "single": ex.explore_blocks(ex.single_buffered_flash2, SHAPE, HARDWARE, sizes=SIZES)}


def test_block_size_loop_rows_are_sorted_by_time_and_fit(explored):
    sram = iosim.load_hardware(HARDWARE).sram_bytes_per_block
    for rows in explored.values():
        times = [r.predicted_time_s for r in rows]
        assert times == sorted(times) and len(rows) > 0
        assert all(r.smem_bytes_per_cta <= sram for r in rows)
        assert len({(r.block_rows, r.block_cols) for r in rows}) == len(rows)


def test_single_buffering_admits_tiles_double_buffering_cannot_fit(explored):
    fits = {name: {(r.block_rows, r.block_cols) for r in rows} for name, rows in explored.items()}
    assert len(fits["flash2"]) == 12 and len(fits["single"]) == 16
    assert fits["flash2"] < fits["single"]
    assert {(256, 256), (128, 256)} <= fits["single"] - fits["flash2"]


def test_block_size_verdict(explored):
    single, flash2 = explored["single"], explored["flash2"]
    # the fastest row overall is single-buffered (256, 256), and it would spill
    assert (single[0].block_rows, single[0].block_cols) == (256, 256)
    assert single[0].predicted_time_s < flash2[0].predicted_time_s
    assert single[0].spills
    # every Br = 256 row (16 warps) would spill; the (128, 64) default does not
    for rows in explored.values():
        assert all(r.spills for r in rows if r.block_rows == 256)
        assert not any(r.spills for r in rows if (r.block_rows, r.block_cols) == (128, 64))
    # among the rows that fit their registers, flash2's best beats the single-buffered best
    best_flash2 = next(r for r in flash2 if not r.spills)
    best_single = next(r for r in single if not r.spills)
    assert (best_flash2.block_rows, best_flash2.block_cols) == (64, 32)
    assert (best_single.block_rows, best_single.block_cols) == (64, 64)
    assert best_flash2.predicted_time_s < best_single.predicted_time_s


def test_registers_needed_matches_the_occupancy_estimate_below_the_cap():
    from iosim.occupancy import estimate_registers

    hw = iosim.load_hardware(HARDWARE)
    kernel = ex.single_buffered_flash2(SHAPE, *DEFAULT_TILES).kernels[0]
    need = ex.registers_needed(kernel, SHAPE)
    assert need == estimate_registers(kernel, SHAPE.head_dim, SHAPE.seq_len, hw)
    assert need < hw.max_registers_per_thread


# ---- the page and the example agree -----------------------------------------------------------

def test_every_python_block_of_the_howto_is_quoted_from_the_example():
    example = [line.strip() for line in EXAMPLE.read_text().splitlines()]
    blocks = re.findall(r"```python\n(.*?)```", HOWTO.read_text(), flags=re.S)
    assert len(blocks) >= 5
    for block in blocks:
        lines = [line.strip() for line in block.strip("\n").splitlines()]
        starts = [i for i, line in enumerate(example) if line == lines[0]]
        assert any(example[i:i + len(lines)] == lines for i in starts), block[:200]


def test_main_runs_on_a_small_shape(capsys):
    ex.main(shape=iosim.AttentionShape(1, 2, 256, 64), sizes=(64, 128))
    out = capsys.readouterr().out
    errors = [float(x) for x in re.findall(r"max \|error\| (\S+)", out)]
    assert len(errors) == 2 and max(errors) < 1e-10
    assert "flash2: 4 pairs fit" in out and "single-buffered: 4 pairs fit" in out
