"""The Numba replay engine against the plain Python reference (tests/reference_engine.py).

Random small workloads of every algorithm through tiny L2s must agree event for event (HBM bytes
read and written back by each event) and in every total; the two-level model must equal the
tile bytes of the schedule's Load/Store steps; hand-made traces check answers known by hand.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import iosim
from iosim import engine
from iosim import schedule as sch
from iosim.schedules import build_schedule
from iosim.shape import AttentionShape
from iosim.trace import build_trace

sys.path.insert(0, os.path.dirname(__file__))
from reference_engine import (COMPUTE, LOAD, STORE, interleaved_events,  # noqa: E402
                              reference_replay_l2)

BIG_SRAM_BYTES = 1 << 30  # any tiling fits: the block sizes are what the test draws
#: The engine tests are cheap (milliseconds an example): run several times the profile's count.
MANY = settings(max_examples=5 * settings.default.max_examples)
TOTALS = ("hbm_read_bytes", "hbm_write_bytes", "l2_read_bytes", "l2_write_bytes",
          "l2_line_accesses", "l2_dirty_end_bytes")


def numba_replay(cta_start, kind, addr, rows, row_bytes, row_stride, slots, n_sets, assoc,
                 line_bytes, sector_bytes):
    """engine.replay_l2 on plain lists; (totals dict, event_counts array)."""
    as64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    counts = np.zeros(len(engine.COUNTERS), dtype=np.int64)
    event_counts = np.zeros((len(kind), 2), dtype=np.int64)
    engine.replay_l2(as64(cta_start), np.asarray(kind, dtype=np.int8), as64(addr), as64(rows),
                     as64(row_bytes), as64(row_stride), slots, n_sets, assoc, line_bytes,
                     sector_bytes, counts, event_counts)
    totals = {name: int(counts[engine.COUNTERS.index(name)]) for name in TOTALS}
    return totals, event_counts


def assert_engines_agree(trace_columns, slots, n_sets, assoc, line_bytes, sector_bytes):
    args = (*trace_columns, slots, n_sets, assoc, line_bytes, sector_bytes)
    want_totals, want_events = reference_replay_l2(*args)
    got_totals, got_events = numba_replay(*args)
    want_events = np.asarray(want_events, dtype=np.int64).reshape(-1, 2)
    bad = np.flatnonzero((got_events != want_events).any(axis=1))
    assert bad.size == 0, (f"{bad.size} events differ, first {bad[0]}: numba "
                           f"{got_events[bad[0]].tolist()} vs reference "
                           f"{want_events[bad[0]].tolist()}")
    assert got_totals == want_totals
    return got_totals, got_events


def kernel_columns(kt):
    return (kt.cta_start, kt.kind, kt.addr, kt.rows, kt.row_bytes, kt.row_stride)


# ---- random workloads of every algorithm ---------------------------------------------------

l2_geometries = st.tuples(
    st.integers(2, 64),  # sets (any count: the hash reduces modulo it)
    st.integers(1, 8),  # ways
    st.sampled_from([64, 128]),  # line bytes
    st.just(32),  # sector bytes
)


@st.composite
def workloads(draw):
    algorithm = draw(st.sampled_from(sorted(iosim.ALGORITHMS)))
    n = draw(st.integers(1, 40))
    shape = AttentionShape(batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 2)),
                           seq_len=n, head_dim=draw(st.sampled_from([1, 4, 8, 16, 24])),
                           dtype=draw(st.sampled_from(["fp16", "fp32"])),
                           causal=draw(st.booleans()))
    block_rows = draw(st.none() | st.integers(1, n))
    block_cols = draw(st.none() | st.integers(1, n))
    return build_schedule(algorithm, shape, block_rows, block_cols, sram_bytes=BIG_SRAM_BYTES)


@MANY
@given(schedule=workloads(), geometry=l2_geometries, slots=st.integers(1, 8))
def test_replay_l2_matches_reference_on_schedules(schedule, geometry, slots):
    for kt in build_trace(schedule).kernels:
        assert_engines_agree(kernel_columns(kt), slots, *geometry)


@st.composite
def raw_traces(draw):
    """Arbitrary tiles (unaligned, line-crossing, overlapping) in a small address range."""
    n_ctas = draw(st.integers(0, 6))
    kind, addr, rows, row_bytes, row_stride, cta_start = [], [], [], [], [], [0]
    for _ in range(n_ctas):
        for _ in range(draw(st.integers(0, 6))):
            kind.append(draw(st.sampled_from([LOAD, LOAD, STORE, COMPUTE])))
            addr.append(draw(st.integers(0, 4096)))
            rows.append(draw(st.integers(0, 4)))
            row_bytes.append(draw(st.integers(0, 300)))
            row_stride.append(draw(st.integers(0, 700)))
        cta_start.append(len(kind))
    return cta_start, kind, addr, rows, row_bytes, row_stride


@MANY
@given(trace=raw_traces(), geometry=l2_geometries, slots=st.integers(1, 8))
def test_replay_l2_matches_reference_on_raw_traces(trace, geometry, slots):
    assert_engines_agree(trace, slots, *geometry)


@MANY
@given(trace=raw_traces(), slots=st.integers(1, 4),
       geometry=st.tuples(st.integers(1, 3), st.sampled_from([12, 16, 20, 24, 32]),
                          st.just(128), st.sampled_from([16, 32])))
def test_replay_l2_matches_reference_with_many_ways(trace, geometry, slots):
    """Wide sets (the H100's 16 ways and beyond), which a specialised path may serve."""
    assert_engines_agree(trace, slots, *geometry)


def test_replay_l2_matches_reference_on_h100_geometry():
    """The real preset's geometry (25 600 sets x 16 ways) on a small causal flash2 and standard."""
    hw = iosim.load_hardware("h100-measured")
    for algorithm in ("standard", "flash2"):
        shape = AttentionShape(2, 2, 256, 32, causal=True)
        schedule = build_schedule(algorithm, shape, 32, 32, sram_bytes=BIG_SRAM_BYTES)
        for kt in build_trace(schedule).kernels:
            assert_engines_agree(kernel_columns(kt), 40, hw.l2_sets, hw.l2_associativity,
                                 hw.l2_line_bytes, hw.l2_sector_bytes)


# ---- the two-level model -------------------------------------------------------------------

def schedule_tile_bytes(schedule):
    """HBM bytes loaded and stored per kernel, from the schedule's own Load/Store steps."""
    shape = schedule.shape
    tensors = schedule.tensor_map()
    out = []
    for kernel in schedule.kernels:
        loaded = stored = 0
        for point in sch.grid_points(kernel, shape.seq_len):
            for step in sch.walk(kernel, point, shape.seq_len, shape.head_dim, shape.causal):
                if isinstance(step.op, (sch.Load, sch.Store)):
                    tile = (step.dims[step.op.rows] * step.dims[step.op.cols]
                            * tensors[step.op.tensor].elem_bytes)
                    if isinstance(step.op, sch.Load):
                        loaded += tile
                    else:
                        stored += tile
        out.append((loaded * shape.batch_heads, stored * shape.batch_heads))
    return out


@given(schedule=workloads())
def test_sum_events_equals_schedule_tile_bytes(schedule):
    trace = build_trace(schedule)
    for kt, (loaded, stored) in zip(trace.kernels, schedule_tile_bytes(schedule)):
        counts = np.zeros(len(engine.COUNTERS), dtype=np.int64)
        engine.sum_events(kt.kind, kt.rows, kt.row_bytes, kt.flops_tensor, kt.flops_scalar,
                          kt.sram_read, kt.sram_write, counts)
        assert counts[engine.HBM_READ] == loaded
        assert counts[engine.HBM_WRITE] == stored
        assert counts[engine.FLOPS_TENSOR] == kt.flops_tensor.sum()
        assert counts[engine.SRAM_READ] == kt.sram_read.sum()


# ---- hand-made traces with known answers ----------------------------------------------------

def one_event_per_cta(events):
    """(kind, addr, rows, row_bytes, row_stride) per CTA -> trace columns."""
    kind, addr, rows, row_bytes, row_stride = (list(c) for c in zip(*events))
    return list(range(len(events) + 1)), kind, addr, rows, row_bytes, row_stride


def run_both(columns, slots=1, n_sets=4, assoc=2, line_bytes=128, sector_bytes=32):
    return assert_engines_agree(columns, slots, n_sets, assoc, line_bytes, sector_bytes)


def test_second_cta_reading_the_same_tile_hits():
    tile = (LOAD, 4096, 2, 256, 1024)  # 2 rows of 2 lines
    totals, events = run_both(one_event_per_cta([tile, tile]), slots=2, n_sets=8)
    assert events.tolist() == [[512, 0], [0, 0]]
    assert totals["hbm_read_bytes"] == 512
    assert totals["l2_read_bytes"] == 1024
    assert totals["l2_line_accesses"] == 8
    assert totals["hbm_write_bytes"] == 0


def test_dirty_line_is_written_back_once_on_eviction():
    # direct mapped, one set: every new line evicts the previous one
    columns = one_event_per_cta([(STORE, 0, 1, 128, 0), (LOAD, 128, 1, 128, 0),
                                 (LOAD, 0, 1, 128, 0), (LOAD, 128, 1, 128, 0)])
    totals, events = run_both(columns, n_sets=1, assoc=1)
    assert events.tolist() == [[0, 0], [128, 128], [128, 0], [128, 0]]
    assert totals["hbm_write_bytes"] == 128
    assert totals["hbm_read_bytes"] == 384


def test_dirty_data_left_at_the_end_is_counted_apart():
    totals, events = run_both(one_event_per_cta([(STORE, 64, 1, 96, 0)]))
    assert events.tolist() == [[0, 0]]
    assert totals["hbm_write_bytes"] == 0  # nothing was evicted while the kernel ran
    assert totals["l2_dirty_end_bytes"] == 96  # sectors 2, 3 and the next line's sector 0
    assert totals["l2_write_bytes"] == 96


def test_partial_sector_rows():
    # 10 bytes at 30: sectors 0 and 1 of line 0 -> 64 bytes from HBM
    totals, _ = run_both(one_event_per_cta([(LOAD, 30, 1, 10, 0)]))
    assert totals["hbm_read_bytes"] == 64 and totals["l2_line_accesses"] == 1
    # rows of 40 bytes at 100 and 200: line 0 sector 3, line 1 sector 0 | line 1 sectors 2, 3
    totals, _ = run_both(one_event_per_cta([(LOAD, 100, 2, 40, 100)]))
    assert totals["l2_line_accesses"] == 3
    assert totals["hbm_read_bytes"] == 4 * 32
    assert totals["l2_read_bytes"] == 4 * 32


def test_written_sectors_are_not_fetched_but_the_others_are():
    columns = one_event_per_cta([(STORE, 0, 1, 64, 0), (LOAD, 0, 1, 128, 0)])
    totals, events = run_both(columns)
    assert events.tolist() == [[0, 0], [64, 0]]
    assert totals["hbm_write_bytes"] == 0
    assert totals["l2_dirty_end_bytes"] == 64  # still dirty at the end


def test_replacement_is_true_lru_not_fifo():
    # one set of 2 ways: A B A C A -> C evicts B (least recently used), so the last A hits
    a, b, c = (LOAD, 0, 1, 128, 0), (LOAD, 128, 1, 128, 0), (LOAD, 256, 1, 128, 0)
    totals, events = run_both(one_event_per_cta([a, b, a, c, a]), n_sets=1, assoc=2)
    assert events[:, 0].tolist() == [128, 128, 0, 128, 0]
    assert totals["hbm_read_bytes"] == 3 * 128


def test_round_robin_order_with_compute_turns_and_refills():
    # CTA 0: 3 events; CTA 1: 1 event; CTA 2: none; CTA 3: 2 events; 2 slots
    cta_start = [0, 3, 4, 4, 6]
    assert list(interleaved_events(cta_start, 2)) == [0, 3, 1, 4, 2, 5]
    assert list(interleaved_events(cta_start, 1)) == [0, 1, 2, 3, 4, 5]
    assert list(interleaved_events(cta_start, 8)) == [0, 3, 4, 1, 5, 2]
    # the engine follows that order. In a 1-way cache, one slot runs A, B, A, A (B evicts A, so
    # the second A misses again); two slots run A (CTA 1), A, A (CTA 3), B: one miss for A.
    kind = [COMPUTE, LOAD, LOAD, LOAD, LOAD, COMPUTE]
    addr = [0, 0, 512, 0, 0, 0]
    columns = (cta_start, kind, addr, [1] * 6, [128] * 6, [0] * 6)
    _, events = run_both(columns, slots=1, n_sets=1, assoc=1)
    assert events[:, 0].tolist() == [0, 128, 128, 128, 0, 0]
    _, events = run_both(columns, slots=2, n_sets=1, assoc=1)
    assert events[:, 0].tolist() == [0, 0, 128, 128, 0, 0]


def test_empty_tiles_touch_nothing():
    columns = one_event_per_cta([(LOAD, 40, 3, 0, 128), (STORE, 0, 0, 64, 0),
                                 (LOAD, 0, 1, 32, 0)])
    totals, events = run_both(columns, slots=2)
    assert events.tolist() == [[0, 0], [0, 0], [32, 0]]
    assert totals["l2_line_accesses"] == 1


def test_empty_kernel():
    totals, events = run_both(([0], [], [], [], [], []))
    assert events.shape == (0, 2) and set(totals.values()) == {0}


@pytest.mark.parametrize("algorithm", ["standard", "flash2"])
def test_simulate_l2_totals_equal_reference(algorithm):
    """simulate()'s l2 numbers, kernel by kernel, are the reference replay's."""
    hw = iosim.load_hardware("h100-measured")
    shape = AttentionShape(1, 2, 128, 32)
    result = iosim.simulate(algorithm, shape, block_rows=32, block_cols=32, hardware=hw)
    schedule = build_schedule(algorithm, shape, 32, 32, sram_bytes=hw.sram_bytes_per_block)
    for kernel, kt in zip(result.kernels, build_trace(schedule).kernels):
        want, _ = reference_replay_l2(*kernel_columns(kt), kernel.concurrent_ctas, hw.l2_sets,
                                      hw.l2_associativity, hw.l2_line_bytes,
                                      hw.l2_sector_bytes)
        for name in TOTALS:
            assert getattr(kernel, name) == want[name], name
