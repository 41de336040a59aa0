"""AttentionShape validation and the schedules as data: tiling really tiles.

Tile counts are derived here from the block sizes alone (ceil divisions and a brute-force check of
which (row block, column block) tiles hold any unmasked score), then compared with what
``iosim.schedule.walk`` yields.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from hypothesis import given, strategies as st

import iosim
from iosim import AttentionShape, IosimError, build_schedule
from iosim.schedule import Load, Store, grid_points, walk


# ---- AttentionShape ----------------------------------------------------------------------------

def test_shape_fields_and_derived_values():
    shape = AttentionShape(2, 3, 128, 64, dtype="bf16", causal=True)
    assert (shape.batch, shape.heads, shape.seq_len, shape.head_dim) == (2, 3, 128, 64)
    assert shape.batch_heads == 6
    assert shape.elem_bytes == 2
    assert shape.causal is True
    assert shape.softmax_scale == pytest.approx(0.125)
    assert shape.matmul_flops() == 4 * 6 * 128 * 128 * 64
    assert AttentionShape(1, 1, 4, 4).dtype == "fp16"
    assert AttentionShape(1, 1, 4, 4).causal is False
    assert {AttentionShape(1, 1, 4, 4, dtype=t).elem_bytes for t in ("fp16", "bf16")} == {2}
    assert AttentionShape(1, 1, 4, 4, dtype="fp32").elem_bytes == 4
    assert "N=128" in shape.describe() and "causal" in shape.describe()


def test_shape_accepts_numpy_integers_as_ints():
    shape = AttentionShape(np.int64(2), np.int32(1), np.int64(8), np.uint8(4))
    for value in (shape.batch, shape.heads, shape.seq_len, shape.head_dim):
        assert type(value) is int


def test_shape_is_frozen():
    shape = AttentionShape(1, 1, 8, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        shape.seq_len = 16


@pytest.mark.parametrize("field", ["batch", "heads", "seq_len", "head_dim"])
@pytest.mark.parametrize("bad", [0, -1, -128, 2.0, 2.5, True, False, "8", None])
def test_shape_refuses_bad_sizes(field, bad):
    sizes = dict(batch=1, heads=1, seq_len=8, head_dim=4)
    sizes[field] = bad
    with pytest.raises(IosimError, match=rf"{field} must be a positive integer, got {re.escape(repr(bad))}"):
        AttentionShape(**sizes)


@given(st.integers(max_value=0))
def test_shape_refuses_any_non_positive_seq_len(n):
    with pytest.raises(IosimError, match=r"seq_len must be a positive integer"):
        AttentionShape(1, 1, n, 4)


@pytest.mark.parametrize("dtype", ["float16", "fp64", "FP16", "int8", "", None])
def test_shape_refuses_unknown_dtype(dtype):
    with pytest.raises(IosimError, match=rf"unknown dtype {re.escape(repr(dtype))}; allowed: fp16, bf16, fp32"):
        AttentionShape(1, 1, 8, 4, dtype=dtype)


@pytest.mark.parametrize("causal", [2, -1, "yes", None])
def test_shape_refuses_non_boolean_causal(causal):
    with pytest.raises(IosimError, match=r"causal must be True or False"):
        AttentionShape(1, 1, 8, 4, causal=causal)


# ---- build_schedule ----------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", sorted(iosim.ALGORITHMS))
def test_schedule_names_its_algorithm_and_clips_blocks_to_n(algorithm):
    shape = AttentionShape(1, 1, 10, 4)
    schedule = build_schedule(algorithm, shape, 64, 3)
    assert schedule.algorithm == algorithm
    assert schedule.shape == shape
    assert (schedule.block_rows, schedule.block_cols) == (10, 3)


@pytest.mark.parametrize("algorithm", sorted(iosim.ALGORITHMS))
@pytest.mark.parametrize("bad", [0, -3, 1.5, 2.0, True, "2"])
def test_build_schedule_refuses_bad_blocks(algorithm, bad):
    shape = AttentionShape(1, 1, 10, 4)
    with pytest.raises(IosimError, match=r"block_rows must be a positive integer"):
        build_schedule(algorithm, shape, bad, 2)
    with pytest.raises(IosimError, match=r"block_cols must be a positive integer"):
        build_schedule(algorithm, shape, 2, bad)


def test_build_schedule_refuses_unknown_algorithm():
    with pytest.raises(IosimError, match=r"unknown algorithm 'flash9'; allowed: .*flash2"):
        build_schedule("flash9", AttentionShape(1, 1, 8, 4))


@pytest.mark.parametrize("algorithm", sorted(iosim.ALGORITHMS))
def test_default_blocks_fit_the_default_sram(algorithm):
    sram = iosim.load_hardware("h100-measured").sram_bytes_per_block
    for n, d in [(1, 1), (100, 64), (1024, 128), (4096, 256)]:
        schedule = build_schedule(algorithm, AttentionShape(1, 1, n, d))
        assert 1 <= schedule.block_rows <= n and 1 <= schedule.block_cols <= n
        schedule.check_fits(sram)  # raises if not


# ---- tiling actually tiles --------------------------------------------------------------------

def tiles_with_unmasked_scores(n, br, bc, causal):
    """(row block, column block) pairs holding at least one score the causal mask keeps."""
    pairs = set()
    for i in range(math.ceil(n / br)):
        for j in range(math.ceil(n / bc)):
            rows = range(i * br, min((i + 1) * br, n))
            cols = range(j * bc, min((j + 1) * bc, n))
            if not causal or any(c <= r for r in rows for c in cols):
                pairs.add((i, j))
    return pairs


def loads_of(kernel, point, n, d, causal, tensor):
    """(block index of every variable, tile extents) of each Load of ``tensor``, copied at the
    moment walk yields it."""
    return [(dict(step.index), dict(step.dims)) for step in walk(kernel, point, n, d, causal)
            if isinstance(step.op, Load) and step.op.tensor == tensor]


@st.composite
def tilings(draw):
    n = draw(st.integers(1, 70))
    br = draw(st.one_of(st.just(1), st.integers(1, n), st.integers(n + 1, n + 10)))
    bc = draw(st.one_of(st.just(1), st.integers(1, n), st.integers(n + 1, n + 10)))
    return n, br, bc, draw(st.integers(1, 8)), draw(st.booleans())


@given(tilings())
def test_flash2_loads_k_once_per_tile(tiling):
    n, br, bc, d, causal = tiling
    schedule = build_schedule("flash2", AttentionShape(1, 1, n, d, causal=causal), br, bc)
    br, bc = min(br, n), min(bc, n)
    (kernel,) = schedule.kernels
    points = grid_points(kernel, n)
    assert points == [{"i": i} for i in range(math.ceil(n / br))]  # one CTA per Q block
    seen = []
    for point in points:
        q_loads = loads_of(kernel, point, n, d, causal, "Q")
        assert len(q_loads) == 1 and q_loads[0][1]["i"] == min(br, n - point["i"] * br)
        for index, dims in loads_of(kernel, point, n, d, causal, "K"):
            j = index["j"]
            assert dims["j"] == min(bc, n - j * bc)  # the last block is the remainder
            seen.append((point["i"], j))
    expected = tiles_with_unmasked_scores(n, br, bc, causal)
    assert len(seen) == len(set(seen)) == len(expected)
    assert set(seen) == expected
    if not causal:
        assert len(seen) == math.ceil(n / br) * math.ceil(n / bc)


@given(tilings())
def test_flash1_loads_each_k_block_once_and_visits_every_tile(tiling):
    n, br, bc, d, causal = tiling
    schedule = build_schedule("flash1", AttentionShape(1, 1, n, d, causal=causal), br, bc)
    br, bc = min(br, n), min(bc, n)
    kernel = schedule.kernels[-1]
    points = grid_points(kernel, n)
    assert points == [{}]  # one CTA per (batch, head)
    k_loads = loads_of(kernel, {}, n, d, causal, "K")
    assert [index["j"] for index, _ in k_loads] == list(range(math.ceil(n / bc)))
    assert sum(dims["j"] for _, dims in k_loads) == n  # the K blocks cover the sequence once
    q_loads = loads_of(kernel, {}, n, d, causal, "Q")
    visited = [(index["i"], index["j"]) for index, _ in q_loads]
    assert len(visited) == len(set(visited))
    assert set(visited) == tiles_with_unmasked_scores(n, br, bc, causal)


@given(tilings())
def test_unfused_gemms_tile_the_score_matrix(tiling):
    n, br, bc, d, causal = tiling
    schedule = build_schedule("standard", AttentionShape(1, 1, n, d, causal=causal), br, bc)
    br, bc = min(br, n), min(bc, n)
    qk = schedule.kernels[0]
    points = grid_points(qk, n)
    assert len(points) == math.ceil(n / br) * math.ceil(n / bc)
    area = 0
    for point in points:
        stores = [(dict(s.index), dict(s.dims)) for s in walk(qk, point, n, d, causal)
                  if isinstance(s.op, Store) and s.op.tensor == "S"]
        assert len(stores) == 1
        area += stores[0][1]["i"] * stores[0][1]["j"]
    assert area == n * n  # every score written exactly once


def test_walk_steps_keep_their_own_block_index():
    schedule = build_schedule("flash2", AttentionShape(1, 1, 10, 4), 4, 3)
    (kernel,) = schedule.kernels
    steps = list(walk(kernel, {"i": 0}, 10, 4, False))
    k_steps = [s for s in steps if isinstance(s.op, Load) and s.op.tensor == "K"]
    assert [s.index["j"] for s in k_steps] == [0, 1, 2, 3]
    assert [s.dims["j"] for s in k_steps] == [3, 3, 3, 1]


@pytest.mark.parametrize("sram", ["x", 0, -5, 1.5])
def test_build_schedule_refuses_bad_sram_bytes(sram):
    with pytest.raises(IosimError, match=r"sram_bytes"):
        build_schedule("flash2", AttentionShape(1, 1, 8, 4), sram_bytes=sram)
