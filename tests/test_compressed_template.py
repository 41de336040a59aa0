"""Compressed one-head templates (iosim.trace_fast, ``compress=True``) and what the streamed
replay (iosim.sampling) does with them at long sequence lengths.

A compressed template keeps an innermost loop's first, second (standing for every middle
iteration, with a repetition count and an address step) and last iteration. Written out again
it must be the full template, column by column; the timed model's per-CTA demands must be
those of the full template; the budget must count its events before it is built; and the
sampled replay with segments inside long waves must stay within 1 % of the exact replay.
"""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import iosim
from iosim import budget, sampling, trace_fast
from iosim.hardware import load_hardware
from iosim.occupancy import occupancy
from iosim.schedules import build_schedule
from iosim.simulate import simulate
from iosim.timing import cta_demands
from iosim.trace import _COLUMNS, KernelTrace, tensor_addressing

H100 = load_hardware("h100-measured")
ALGORITHMS = ["standard", "hf", "megatron", "flash1", "flash2", "flash3", "flash_decoding"]


def _templates(schedule):
    """Per kernel: (kernel, full columns, full CTA starts, compressed columns, their starts)."""
    _, ids, base, _ = tensor_addressing(schedule)
    out = []
    for kernel in schedule.kernels:
        full, starts = trace_fast.head_template(kernel, schedule, base, ids)
        packed, packed_starts = trace_fast.head_template(kernel, schedule, base, ids,
                                                         compress=True)
        out.append((kernel, full, starts, packed, packed_starts))
    return out


@st.composite
def schedules(draw):
    algorithm = draw(st.sampled_from(ALGORITHMS + ["backward"]))
    causal = draw(st.booleans())
    seq_len = draw(st.integers(1, 400))
    head_dim = draw(st.sampled_from([8, 16, 64]))
    if algorithm == "backward":
        shape = iosim.AttentionShape(draw(st.integers(1, 2)), draw(st.integers(1, 2)), seq_len,
                                     head_dim, causal=causal)
        return build_schedule(draw(st.sampled_from(["flash1", "flash2", "standard"])), shape,
                              draw(st.integers(1, 64)), draw(st.integers(1, 64)),
                              sram_bytes=1 << 22, pass_="backward")
    kv_heads = draw(st.integers(1, 2))
    kv_seq_len = draw(st.integers(seq_len if causal else 1, 500))
    shape = iosim.AttentionShape(draw(st.integers(1, 2)), kv_heads * draw(st.integers(1, 3)),
                                 seq_len, head_dim, causal=causal, kv_heads=kv_heads,
                                 kv_seq_len=kv_seq_len)
    rows = shape.group_size * seq_len if algorithm == "flash_decoding" else seq_len
    options = {"num_splits": draw(st.integers(1, 8))} if algorithm == "flash_decoding" else {}
    return build_schedule(algorithm, shape, draw(st.integers(1, min(rows, 128))),
                          draw(st.integers(1, min(kv_seq_len, 128))), sram_bytes=1 << 22,
                          **options)


@settings(max_examples=60, deadline=None)
@given(schedule=schedules())
def test_a_compressed_template_written_out_is_the_full_template(schedule):
    for kernel, full, starts, packed, packed_starts in _templates(schedule):
        out, out_starts = trace_fast.expand_template(packed, packed_starts)
        np.testing.assert_array_equal(out_starts, starts, kernel.name)
        for column in full:
            np.testing.assert_array_equal(out[column], full[column], f"{kernel.name} {column}")
        assert int(packed["reps"].sum()) == len(full["kind"])


def test_long_loops_are_compressed_to_three_iterations():
    shape = iosim.AttentionShape(1, 1, 65536, 128)
    schedule = build_schedule("flash2", shape, 128, 64)
    (kernel, full, starts, packed, packed_starts), = _templates(schedule)
    loop, = [item for item in kernel.body if isinstance(item, iosim.schedule.Loop)]
    per_iteration = len(loop.body)  # the K/V loop's ops (no accumulating store)
    assert packed["reps"].max() == 1024 - 2  # 1024 K/V blocks per CTA
    # every CTA keeps its prologue and epilogue and three iterations of its K/V loop
    np.testing.assert_array_equal(np.diff(starts) - np.diff(packed_starts),
                                  (1024 - 3) * per_iteration)
    assert len(packed["kind"]) * 200 < len(full["kind"])


@pytest.mark.parametrize("algorithm, shape, pass_", [
    ("flash2", iosim.AttentionShape(2, 2, 1000, 64), "forward"),
    ("flash2", iosim.AttentionShape(1, 2, 1024, 64, causal=True), "both"),
    ("flash1", iosim.AttentionShape(1, 2, 700, 64, causal=True), "both"),
    ("flash3", iosim.AttentionShape(1, 2, 2048, 128), "forward"),
    ("standard", iosim.AttentionShape(1, 2, 1024, 64), "both"),
    ("flash_decoding", iosim.AttentionShape(2, 8, 1, 128, kv_heads=2, kv_seq_len=5000),
     "forward"),
])
def test_the_timed_model_sees_the_same_ctas_in_a_compressed_template(algorithm, shape,
                                                                     pass_):
    extra = {"sm_count": H100.sm_count} if algorithm == "flash_decoding" else {}
    schedule = build_schedule(algorithm, shape, None, None, sram_bytes=H100.sram_bytes_per_block,
                              pass_=pass_, **extra)
    rng = np.random.default_rng(7)
    for kernel, full, starts, packed, packed_starts in _templates(schedule):
        occ = occupancy(kernel, shape.head_dim, shape.seq_len, H100)
        # HBM bytes per repetition of each compressed event (as the streamed replay gives
        # them: their mean), the same for every repetition in the full template
        tile = (packed["rows"] * packed["row_bytes"]).astype(float)
        hbm = np.where(packed["kind"] == 2, 0.0, tile * rng.uniform(0, 1, len(tile)))
        index = trace_fast.expand_template(
            {**packed, "order": np.arange(len(hbm))}, packed_starts)[0]["order"]
        demands = []
        for columns, cta_start, per_event in ((packed, packed_starts, hbm),
                                              (full, starts, hbm[index])):
            head = dict(columns, cta_start=cta_start)
            kt = KernelTrace(name=kernel.name, cta_start=cta_start,
                             smem_bytes_per_cta=kernel.smem_bytes(shape.head_dim,
                                                                  shape.seq_len),
                             kernel=kernel, tensor_path=kernel.tensor_path, head=head, heads=1,
                             **{c: columns[c] for c in _COLUMNS})
            demands.append(cta_demands(kt, per_event, H100, shape.dtype, occ))
        for key in demands[0]:
            np.testing.assert_allclose(demands[0][key], demands[1][key], rtol=1e-9,
                                       err_msg=f"{kernel.name} {key}")


@pytest.mark.parametrize("algorithm, shape", [
    ("flash2", iosim.AttentionShape(1, 3, 5000, 64)),
    ("flash1", iosim.AttentionShape(2, 1, 3000, 128)),
    ("standard", iosim.AttentionShape(1, 2, 2048, 64)),
    ("flash_decoding", iosim.AttentionShape(4, 8, 1, 128, kv_heads=2, kv_seq_len=20000)),
])
def test_the_budget_counts_the_compressed_events_before_they_are_built(algorithm, shape):
    extra = {"sm_count": H100.sm_count} if algorithm == "flash_decoding" else {}
    schedule = build_schedule(algorithm, shape, None, None, sram_bytes=H100.sram_bytes_per_block,
                              **extra)
    built = sum(len(packed["kind"]) for *_, packed, _ in _templates(schedule))
    # exact where every CTA runs every block; a split-KV CTA's last split is shorter than
    # the estimate's (the splits' mean length)
    rel = 0.05 if algorithm == "flash_decoding" else 0
    assert budget.estimate(schedule, streamed=True).template_events == pytest.approx(built,
                                                                                     rel=rel)


@pytest.mark.parametrize("algorithm, n, d, blocks", [
    ("flash2", 131072, 64, (None, None)),
    ("flash2", 65536, 128, (64, 64)),
    ("flash3", 131072, 128, (None, None)),
])
def test_segments_inside_long_waves_sample_within_one_percent(monkeypatch, algorithm, n, d,
                                                              blocks):
    # one head, a few waves of long CTAs: with segments much shorter than a wave the steady
    # state is found inside the first wave, as at N = 10^6 with the default segment (an L2
    # of 4 MiB: K and V pass through it many times, as they pass through 50 MiB at N = 10^6)
    monkeypatch.setattr(sampling, "SEGMENT_MAX_EVENTS", 100_000)
    shape = iosim.AttentionShape(1, 1, n, d)
    unit = H100.l2_line_bytes * H100.l2_associativity
    small_l2 = dataclasses.replace(H100, l2_bytes=4 * 2**20 // unit * unit)
    kw = dict(max_memory_bytes=None, max_seconds=None, hardware=small_l2,
              block_rows=blocks[0], block_cols=blocks[1])
    exact = simulate(algorithm, shape, exact=True, **kw)
    sampled = simulate(algorithm, shape, exact=False, **kw)
    assert sampled.sampled and not exact.sampled
    for name in ("hbm_read_bytes", "hbm_write_bytes"):
        want, got = getattr(exact.totals, name), getattr(sampled.totals, name)
        assert got == pytest.approx(want, rel=0.01), name
        low, high = sampled.totals.intervals[name]
        assert low <= got <= high
    assert sampled.totals.l2_read_bytes == exact.totals.l2_read_bytes
    assert sampled.totals.predicted_time_s == pytest.approx(exact.totals.predicted_time_s,
                                                            rel=0.01)


def test_a_long_context_streams_in_memory_independent_of_its_length():
    # the template of N = 2^20 is a few hundred thousand events (the full one: 805 M)
    shape = iosim.AttentionShape(1, 1, 1 << 20, 128)
    schedule = build_schedule("flash2", shape, 128, 64)
    cost = budget.estimate(schedule, streamed=True, sampled=True)
    assert cost.events > 8e8
    assert cost.template_events < 3e5
    assert cost.memory_bytes < 2**30
    assert sampling.sampling_mode(schedule, None) == (True, True)
