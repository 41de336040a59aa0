"""Streamed and sampled simulation (iosim.sampling) against the exact replay of every event.

The streamed replay generates each event from the one-head template: its counts must equal
those of the all-heads trace replayed by the engine. The sampled replay estimates the HBM
bytes: within 1 % of the exact replay on a grid of shapes up to N = 65536, its 95 % interval
covering the exact value, and it must actually have sampled (skipped events) on the long
shapes, or the comparison proves nothing.
"""
import json
import subprocess
import sys
import tracemalloc

import pytest

import iosim
from iosim import sampling
from iosim.hardware import load_hardware
from iosim.schedules import build_schedule
from iosim.simulate import COUNT_FIELDS, simulate, simulate_trace
from iosim.trace import build_trace

H100 = load_hardware("h100-measured")
COUNTS = COUNT_FIELDS + ("l2_line_accesses", "l2_dirty_end_bytes", "ctas", "concurrent_ctas")


def _schedule(algorithm, shape, pass_="forward", **kw):
    extra = {"sm_count": H100.sm_count} if algorithm == "flash_decoding" else {}
    return build_schedule(algorithm, shape, kw.get("br"), kw.get("bc"),
                          sram_bytes=H100.sram_bytes_per_block, pass_=pass_, **extra)


@pytest.mark.parametrize("algorithm, shape, pass_", [
    ("flash2", iosim.AttentionShape(2, 4, 2048, 128), "forward"),
    ("flash2", iosim.AttentionShape(1, 4, 1024, 64, causal=True), "both"),
    ("standard", iosim.AttentionShape(2, 4, 1024, 64), "forward"),
    ("flash3", iosim.AttentionShape(2, 4, 2048, 128), "forward"),
    ("flash2", iosim.AttentionShape(2, 8, 1024, 64, kv_heads=2), "forward"),
    ("flash_decoding", iosim.AttentionShape(4, 8, 1, 128, kv_seq_len=8192), "forward"),
])
@pytest.mark.parametrize("model", ["l2", "two-level"])
def test_streamed_replay_counts_what_the_all_heads_trace_counts(algorithm, shape, pass_,
                                                                 model):
    schedule = _schedule(algorithm, shape, pass_)
    full = simulate_trace(build_trace(schedule), H100, model)
    streamed = sampling.simulate_streamed(schedule, H100, model, "timed", sample=False)
    assert not streamed.sampled
    for name in COUNTS:
        assert getattr(streamed.totals, name) == getattr(full.totals, name), name
    for mine, theirs in zip(streamed.kernels, full.kernels):
        assert mine.tensors == theirs.tensors
        for name in COUNTS:
            assert getattr(mine, name) == getattr(theirs, name), (mine.name, name)
        # the timed model sees each template event's mean HBM bytes over the heads instead
        # of each head's own: the same time to well within a percent
        assert mine.predicted_time_s == pytest.approx(theirs.predicted_time_s, rel=2e-3)


# (algorithm, B, H, N, d, causal, Br, Bc): long enough (in waves or heads) for the sampler
# to skip a middle, up to N = 65536
GRID = [
    ("flash2", 8, 16, 4096, 128, False, 64, 64),
    ("flash2", 8, 16, 4096, 128, False, 32, 32),
    ("flash2", 4, 16, 8192, 128, True, None, None),
    ("flash2", 4, 16, 16384, 64, False, None, None),
    ("flash2", 1, 32, 65536, 16, True, None, None),
    ("standard", 4, 16, 2048, 64, False, None, None),
]


@pytest.mark.parametrize("algorithm, b, h, n, d, causal, br, bc", GRID)
def test_sampled_within_one_percent_of_exact(algorithm, b, h, n, d, causal, br, bc):
    shape = iosim.AttentionShape(b, h, n, d, causal=causal)
    kw = dict(block_rows=br, block_cols=bc, max_memory_bytes=None, max_seconds=None)
    exact = simulate(algorithm, shape, exact=True, **kw)
    sampled = simulate(algorithm, shape, exact=False, **kw)
    assert not exact.sampled
    assert sampled.sampled, "the shape is long enough: some kernel must have been sampled"
    for name in ("hbm_read_bytes", "hbm_write_bytes", "l2_dirty_end_bytes"):
        want, got = getattr(exact.totals, name), getattr(sampled.totals, name)
        assert got == pytest.approx(want, rel=0.01), name
    for name in ("hbm_read_bytes", "hbm_write_bytes"):
        low, high = sampled.totals.intervals[name]
        assert low <= getattr(exact.totals, name) <= high, (name, low, high)
    # what sampling does not estimate is exact
    for name in ("l2_read_bytes", "l2_write_bytes", "sram_read_bytes", "flops_tensor",
                 "flops_scalar", "l2_line_accesses"):
        assert getattr(sampled.totals, name) == getattr(exact.totals, name), name
    assert sampled.totals.predicted_time_s == pytest.approx(exact.totals.predicted_time_s,
                                                            rel=0.01)


def test_a_short_kernel_is_replayed_whole_even_when_sampling_is_asked_for():
    shape = iosim.AttentionShape(1, 2, 1024, 64)
    result = simulate("flash2", shape, exact=False)
    assert not result.sampled
    assert result.totals.hbm_read_bytes == simulate("flash2", shape).totals.hbm_read_bytes


def test_default_samples_only_above_the_threshold(monkeypatch):
    shape = iosim.AttentionShape(8, 16, 4096, 128)
    schedule = _schedule("flash2", shape)
    # 1.6 M events: streamed (above 1 M), every event replayed (below 4 M)
    assert sampling.sampling_mode(schedule, None) == (True, False)
    assert sampling.sampling_mode(schedule, True) == (True, False)
    assert sampling.sampling_mode(schedule, False) == (True, True)
    small = _schedule("flash2", iosim.AttentionShape(2, 4, 2048, 64))
    assert sampling.sampling_mode(small, None) == (False, False)  # the all-heads trace
    monkeypatch.setattr(sampling, "STREAM_ABOVE_EVENTS", 1000)
    monkeypatch.setattr(sampling, "SAMPLE_ABOVE_EVENTS", 1000)
    assert sampling.sampling_mode(schedule, None) == (True, True)
    assert sampling.sampling_mode(schedule, True) == (True, False)
    assert simulate("flash2", shape).sampled
    assert not simulate("flash2", shape, exact=True).sampled


def test_exact_must_be_a_bool_or_none():
    with pytest.raises(iosim.IosimError, match="exact"):
        simulate("flash2", iosim.AttentionShape(1, 1, 256, 64), exact="yes")


def test_json_says_sampled_with_an_interval_per_count():
    shape = iosim.AttentionShape(8, 16, 4096, 128)
    data = simulate("flash2", shape, exact=False).to_dict()
    json.dumps(data)
    assert data["sampled"] is True
    low, high = data["totals"]["intervals"]["hbm_read_bytes"]
    assert low <= data["totals"]["hbm_read_bytes"] <= high
    assert data["kernels"][0]["sampled"] is True
    exact = simulate("flash2", shape, exact=True).to_dict()
    assert "sampled" not in exact and "intervals" not in exact["totals"]


def test_cli_exact_flag():
    args = [sys.executable, "-m", "iosim", "simulate", "--algorithm", "flash2", "--batch", "1",
            "--heads", "2", "--seq-len", "512", "--head-dim", "64", "--json"]
    exact = subprocess.run(args + ["--exact"], capture_output=True, text=True, timeout=300)
    assert exact.returncode == 0, exact.stderr
    plain = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert "sampled" not in json.loads(exact.stdout)
    assert json.loads(exact.stdout)["totals"] == json.loads(plain.stdout)["totals"]


def _peak_bytes(batch):
    shape = iosim.AttentionShape(batch, 8, 2048, 64)
    simulate("flash2", shape, exact=True)  # warm (imports, Numba) outside the measurement
    tracemalloc.start()
    try:
        result = sampling.simulate_streamed(_schedule("flash2", shape), H100, "l2", "timed",
                                            sample=False)
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_streamed_memory_does_not_grow_with_the_heads():
    small, _ = _peak_bytes(2)  # 16 heads
    large, result = _peak_bytes(16)  # 128 heads: 8x the events
    assert result.totals.ctas == 16 * 8 * 16
    # one head's events and a few numbers per CTA: the per-CTA part grows, the rest does not
    assert large < 1.5 * small
    # the all-heads trace of the large shape alone is more than the streamed peak
    tracemalloc.start()
    try:
        build_trace(_schedule("flash2", iosim.AttentionShape(16, 8, 2048, 64)))
        trace_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert trace_peak > 3 * large


def test_cli_table_ends_with_the_intervals_of_a_sampled_run(capsys):
    from iosim.cli import main

    args = ["simulate", "--algorithm", "flash2", "--batch", "32", "--heads", "16", "--seq-len",
            "4096", "--head-dim", "128"]  # 6.4 M events: sampled by default
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("sampled") and "hbm read" in out.splitlines()[-1]
    assert main(args + ["--exact"]) == 0
    assert "sampled" not in capsys.readouterr().out


def test_explore_samples_its_pairs_and_ranks_as_the_exact_replay():
    from iosim.explore import explore

    shape = iosim.AttentionShape(8, 16, 4096, 128)
    kw = dict(workers=1, progress=False, candidates=[64, 128])
    default = explore("flash2", shape, **kw)
    exact = explore("flash2", shape, exact=True, **kw)
    assert [(r.block_rows, r.block_cols) for r in default] == \
        [(r.block_rows, r.block_cols) for r in exact]
    for mine, theirs in zip(default, exact):
        assert mine.hbm_bytes == pytest.approx(theirs.hbm_bytes, rel=0.01)
        assert mine.predicted_time_s == pytest.approx(theirs.predicted_time_s, rel=0.01)
