"""The timed model: per-op warp work, the lone warp's latency, the queueing of resident warps,
dispatch in waves, and what occupancy does to predicted time."""
import math

import numpy as np
import pytest

import iosim
from iosim import work
from iosim.simulate import replay
from iosim.timing import LIMITERS, _duration, cta_demands, dispatch
from iosim.trace import build_trace

H100 = iosim.load_hardware("h100-measured")


def _trace(br=128, bc=64, n=512, d=128, rows_per_warp=None, causal=False):
    shape = iosim.AttentionShape(1, 1, n, d, "fp16", causal)
    schedule = iosim.build_schedule("flash2", shape, br, bc, rows_per_warp=rows_per_warp)
    return schedule, build_trace(schedule)


def test_matmul_work_counts_per_warp_operand_rereads():
    schedule, trace = _trace(128, 64, d=128)
    kt = trace.kernels[0].head
    qk = np.flatnonzero((kt["mma"] > 0) & (kt["mma_chain"] == 128 // work.MMA_K))[0]
    pv = np.flatnonzero((kt["mma"] > 0) & (kt["mma_chain"] == 64 // work.MMA_K))[0]
    # S = Q Kᵀ: 2·128·64·128 FLOP in m16n8k16 MMAs; Q once, K once per warp (8 warps)
    assert kt["mma"][qk] == 2 * 128 * 64 * 128 // work.MMA_FLOPS
    assert kt["smem_operand_bytes"][qk] == 128 * 128 * 2 + 8 * 64 * 128 * 2
    # O += P V: P lives in registers, V read once per warp
    assert kt["smem_operand_bytes"][pv] == 8 * 64 * 128 * 2
    # the online softmax: one exp per score and per row on the SFU, a reduction tree's depth
    soft = np.flatnonzero(kt["sfu"] > 0)[0]
    assert kt["sfu"][soft] == math.ceil((128 * 64 + 128) / 32)
    assert kt["depth"][soft] == 2 * 6 + 2  # max and sum over 64 columns, then exp and update
    # K and V are double-buffered: their loads are issued ahead; Q's is not
    loads = np.flatnonzero(kt["kind"] == 0)
    full = trace.kernels[0]
    tensors = [trace.tensor_names[t] for t in full.tensor[loads]]
    prefetched = dict(zip(tensors, kt["prefetched"][loads]))
    assert prefetched == {"Q": 0, "K": 1, "V": 1}


def test_a_lone_warp_waits_for_each_fragment_and_the_mma_pipe():
    schedule, trace = _trace(64, 64, d=64, rows_per_warp=64)  # one warp per CTA
    kt = trace.kernels[0]
    (row, hbm) = replay(trace, H100, "two-level")[0]
    demand = cta_demands(kt, hbm, H100, "fp16")
    per_smsp = H100.sm_count * H100.sub_partitions_per_sm * H100.clock_hz
    mma_issue = work.MMA_FLOPS / (H100.tensor_rate("fp16", "mma_sync") / per_smsp)
    # per CTA (= per warp here): every MMA on the tensor pipe
    first = slice(kt.head["cta_start"][0], kt.head["cta_start"][1])
    assert demand["tensor_cycles"][0] == pytest.approx(kt.head["mma"][first].sum() * mma_issue)
    assert len(demand["tensor_cycles"]) == kt.n_ctas
    # the QK matmul alone: fragments x smem latency + MMAs x issue, then the MMA latency
    qk = np.flatnonzero(kt.head["mma_chain"] == 64 // work.MMA_K)[0]
    frags = kt.head["smem_operand_bytes"][qk] / work.FRAGMENT_BYTES
    mmas = kt.head["mma"][qk]
    expected = max(frags * H100.smem_latency_cycles + mmas * mma_issue,
                   kt.head["mma_chain"][qk] * H100.mma_latency_cycles) + H100.mma_latency_cycles
    one_op = cta_demands(_only(kt, qk), np.zeros(1), H100, "fp16")
    assert one_op["latency_cycles"][0] + one_op["tensor_cycles"][0] == pytest.approx(expected)
    assert one_op["tensor_cycles"][0] == pytest.approx(mmas * mma_issue)


def test_a_load_not_issued_ahead_waits_for_dram_as_far_as_it_misses():
    schedule, trace = _trace(64, 64, d=64)
    kt = trace.kernels[0]
    q_load = int(np.flatnonzero((kt.head["kind"] == 0) & (kt.head["prefetched"] == 0))[0])
    tile = kt.head["rows"][q_load] * kt.head["row_bytes"][q_load]
    hits = cta_demands(_only(kt, q_load), np.zeros(1), H100, "fp16")
    misses = cta_demands(_only(kt, q_load), np.array([tile / 2]), H100, "fp16")
    barrier = H100.barrier_cycles
    assert hits["latency_cycles"][0] == pytest.approx(H100.l2_latency_cycles + barrier)
    assert misses["latency_cycles"][0] == pytest.approx(
        H100.l2_latency_cycles + barrier
        + 0.5 * (H100.dram_latency_cycles - H100.l2_latency_cycles))
    assert misses["exposed_hbm_bytes"][0] == tile / 2 and misses["exposed_l2_bytes"][0] == tile


def _only(kt, e):
    """A one-event, one-CTA, one-head copy of kernel trace ``kt`` (its head's event ``e``)."""
    import dataclasses

    head = {name: value[e:e + 1] for name, value in kt.head.items() if name != "cta_start"}
    head["cta_start"] = np.array([0, 1])
    return dataclasses.replace(kt, cta_start=np.array([0, 1]), kind=head["kind"], head=head,
                               heads=1)


def _one_cta(latency=0.0, pipes=(0.0, 0.0, 0.0), smem=0.0, l2=0.0, hbm=0.0):
    return (np.array([latency]), np.array([pipes], dtype=float), np.array([smem]),
            np.array([l2]), np.array([hbm]), np.array([0.0]), np.array([0.0]))


def test_one_warp_alone_takes_its_latency_plus_its_service():
    lat, pipes, smem, l2, hbm, el2, ehbm = _one_cta(latency=5e-6, pipes=(2e-6, 1e-6, 0.5e-6),
                                                    smem=1e-6)
    terms = np.zeros(len(LIMITERS))
    d, lim = _duration(0, 1, 132, lat, pipes, smem, l2, hbm, el2, ehbm, 1, 4, 7e12, 3e12, 2e11,
                       terms)
    assert d == pytest.approx(5e-6 + 2e-6 + 1e-6 + 0.5e-6 + 1e-6)
    assert LIMITERS[lim] == "latency"


def test_many_warps_on_one_pipe_approach_its_throughput_bound():
    # 64 warps, 16 per sub-partition, each needing 1 µs of tensor pipe and 1 µs of waiting:
    # the sub-partition's pipe is the bottleneck, 16 µs per round
    lat, pipes, smem, l2, hbm, el2, ehbm = _one_cta(latency=1e-6, pipes=(1e-6, 0.0, 0.0))
    terms = np.zeros(len(LIMITERS))
    d, lim = _duration(0, 16, 132, lat, pipes, smem, l2, hbm, el2, ehbm, 4, 4, 7e12, 3e12,
                       2e11, terms)
    assert 16e-6 <= d <= 17e-6 and LIMITERS[lim] == "tensor"
    # two warps per sub-partition hide each other's latency only partly (queueing)
    d2, _ = _duration(0, 2, 132, lat, pipes, smem, l2, hbm, el2, ehbm, 4, 4, 7e12, 3e12,
                      2e11, terms)
    assert 2e-6 < d2 < 3e-6


def test_bandwidth_is_shared_by_the_busy_sms():
    lat, pipes, smem, l2, hbm, el2, ehbm = _one_cta(hbm=1e6)
    terms = np.zeros(len(LIMITERS))
    full, lim = _duration(0, 1, 132, lat, pipes, smem, l2, hbm, el2, ehbm, 4, 4, 1e15, 3e12,
                          1e12, terms)
    assert full == pytest.approx(1e6 / (3e12 / 132)) and LIMITERS[lim] == "hbm"
    alone, _ = _duration(0, 1, 1, lat, pipes, smem, l2, hbm, el2, ehbm, 4, 4, 1e15, 3e12,
                         1e11, terms)
    assert alone == pytest.approx(1e6 / 1e11)  # one SM: capped by its own port


def test_dispatch_runs_waves_and_fills_the_tail():
    n_sms, slots, n = 4, 2, 19
    latency = np.full(n, 1e-6)
    zeros = np.zeros(n)
    sm = np.zeros(n, dtype=np.int64)
    start, end = np.zeros(n), np.zeros(n)
    limiter = np.zeros(n, dtype=np.int64)
    span = dispatch(n_sms, slots, latency, np.zeros((n, 3)), zeros, zeros, zeros, zeros, zeros,
                    1, 4, 1e12, 1e12, 1e11, sm, start, end, limiter)
    # 19 CTAs of 1 µs on 8 slots: 3 waves
    assert span == pytest.approx(3e-6)
    assert list(sm[:8]) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert np.all(end - start == pytest.approx(1e-6))
    assert np.count_nonzero(start == 2e-6) == 3  # the tail: 3 CTAs in the last wave


def test_fewer_resident_warps_mean_more_time_for_the_same_work():
    shape = iosim.AttentionShape(4, 16, 2048, 128)
    low = iosim.simulate("flash2", shape, block_rows=64, block_cols=128).kernels[0]
    high = iosim.simulate("flash2", shape, block_rows=64, block_cols=64).kernels[0]
    assert low.occupancy["warps_per_sm"] < high.occupancy["warps_per_sm"]
    # same FLOPs (to the rescale), the roofline barely tells them apart ...
    assert low.times_s["roofline"] == pytest.approx(high.times_s["roofline"], rel=0.05)
    # ... the timed model charges the lower occupancy for its unhidden latency
    assert low.times_s["timed"] > 1.3 * high.times_s["timed"]
    assert low.timed_limiter == "latency"


def test_time_models_and_the_breakdown():
    shape = iosim.AttentionShape(2, 4, 1024, 64)
    timed = iosim.simulate("standard", shape)
    roof = iosim.simulate("standard", shape, time_model="roofline")
    for t, r in zip(timed.kernels, roof.kernels):
        assert t.predicted_time_s == t.times_s["timed"] and t.time_model == "timed"
        assert r.predicted_time_s == r.times_s["roofline"] == t.times_s["roofline"]
        shares = {k: v for k, v in t.time_breakdown.items() if k != "sm_idle"}
        assert set(shares) == set(LIMITERS) and sum(shares.values()) == pytest.approx(1.0)
        assert 0.0 <= t.time_breakdown["sm_idle"] < 1.0
    assert timed.totals.times_s["timed"] == pytest.approx(
        sum(k.times_s["timed"] for k in timed.kernels))
    with pytest.raises(iosim.IosimError, match="unknown time model"):
        iosim.simulate("standard", shape, time_model="cycle-accurate")


def test_causal_flash2_launches_the_longest_row_blocks_first():
    schedule, trace = _trace(64, 64, n=512, causal=True)
    kt = trace.kernels[0]
    events_per_cta = np.diff(kt.cta_start)
    assert events_per_cta[0] == events_per_cta.max()
    assert np.all(np.diff(events_per_cta) <= 0)
    # the executor runs the same order and still gets attention right
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 512, 128)) for _ in range(3))
    out = iosim.run_attention(q, k, v, algorithm="flash2", causal=True, block_rows=64,
                              block_cols=64)
    ref = iosim.reference_attention(q, k, v, causal=True)
    assert np.max(np.abs(out - ref)) < 1e-10


def test_back_to_back_loads_wait_once_as_a_group():
    from iosim.timing import _load_groups

    kind = np.array([2, 0, 0, 0, 2, 0, 1, 0, 0])  # compute, 3 loads, compute, load, store, 2 loads
    groups = _load_groups(kind == 0, np.array([0, 7, 9]))  # a second CTA starts at event 7
    loads = np.flatnonzero(kind == 0)
    assert list(groups[loads]) == [0, 0, 0, 1, 2, 2]
    # flash1's inner step loads Q_i, O_i, l_i, m_i back to back: one wait per step, not four
    shape = iosim.AttentionShape(1, 1, 256, 64)
    schedule = iosim.build_schedule("flash1", shape, 64, 64)
    trace = build_trace(schedule)
    kt = trace.kernels[1]
    (row, hbm) = replay(trace, H100, "two-level")[1]
    demand = cta_demands(kt, hbm, H100, "fp16")
    h = kt.head
    steps = 4 * 4  # (N / Bc) x (N / Br) inner steps of the one CTA
    exposed = int(np.count_nonzero((h["kind"] == 0) & (h["prefetched"] == 0)))
    assert exposed == 2 * 4 + 4 * steps  # K, V per outer step; Q, O, l, m per inner step
    # every tile misses under the two-level model: one DRAM latency per group of loads
    compute = cta_demands(kt, np.zeros_like(hbm), H100, "fp16")["latency_cycles"][0]
    # a Q/O/l/m group per inner step; each outer step's K/V loads join its first inner group
    groups = steps
    assert demand["latency_cycles"][0] - compute == pytest.approx(
        groups * (H100.dram_latency_cycles - H100.l2_latency_cycles))


def test_bandwidth_is_shared_by_demand_not_in_equal_parts():
    from iosim.timing import shared_bandwidth_bytes

    equal = np.full(10, 1000.0)
    # equal CTAs: each is charged its own bytes (the equal share is all there is)
    np.testing.assert_allclose(shared_bandwidth_bytes(equal, 4, 1.0, 10.0), equal)
    # pairs where one CTA misses (2000 bytes from DRAM) and its neighbour hits (0): with the
    # pair resident together, both are charged the pair's mean, not the misser its own bytes
    pairs = np.tile([2000.0, 0.0], 4)
    charged = shared_bandwidth_bytes(pairs, 8, 1.0, 10.0)
    np.testing.assert_allclose(charged, 1000.0)
    # ... but never less than its own bytes at the SM's own cap (here 4x the equal share)
    charged = shared_bandwidth_bytes(np.array([8000.0, 0, 0, 0]), 4, 1.0, 4.0)
    np.testing.assert_allclose(charged, [2000.0, 2000.0, 2000.0, 2000.0])
    charged = shared_bandwidth_bytes(np.array([8000.0, 0, 0, 0]), 4, 1.0, 2.0)
    np.testing.assert_allclose(charged[0], 4000.0)


@pytest.mark.parametrize("algorithm, engine", [("flash2", "l2_reduction_bytes_per_s"),
                                               ("flash3", "tma_reduction_bytes_per_s")])
def test_an_accumulating_store_takes_the_l2_at_the_measured_reduction_rate(algorithm, engine):
    import dataclasses

    hw = iosim.load_hardware("h100-measured")
    plain = dataclasses.replace(hw, l2_reduction_bytes_per_s=None,
                                tma_reduction_bytes_per_s=None)
    # reductions 8x slower than the L2 reads: a read + write pair costs 4x its plain bytes
    slow = dataclasses.replace(plain, **{engine: hw.l2_bandwidth_bytes_per_s / 8})
    shape = iosim.AttentionShape(2, 2, 512, 64)
    trace = build_trace(iosim.build_schedule(algorithm, shape, pass_="backward"))
    for kt in trace.kernels:
        hbm = np.zeros(len(kt.kind))
        base = cta_demands(kt, hbm, plain, shape.dtype)
        more = cta_demands(kt, hbm, slow, shape.dtype)
        h = kt.head
        reduction = (h["reduction"] > 0) * (h["rows"] * h["row_bytes"])
        starts = h["cta_start"]
        per_cta = np.add.reduceat(reduction, starts[:-1]) if len(reduction) else reduction
        expected = base["l2_bytes"] + 3 * np.tile(per_cta, kt.heads)
        np.testing.assert_allclose(more["l2_bytes"], expected, err_msg=kt.name)
        assert (per_cta.sum() > 0) == (kt.name == f"{algorithm}_bwd")  # dQ's atomic adds only
        for key in base:
            if key != "l2_bytes":
                np.testing.assert_array_equal(more[key], base[key])
    # the other engine's rate leaves this kernel alone
    other = ({"tma_reduction_bytes_per_s": hw.l2_bandwidth_bytes_per_s / 8,
              "l2_reduction_bytes_per_s": None} if algorithm == "flash2" else
             {"l2_reduction_bytes_per_s": hw.l2_bandwidth_bytes_per_s / 8,
              "tma_reduction_bytes_per_s": hw.l2_bandwidth_bytes_per_s / 2})
    kt = trace.kernels[1]
    np.testing.assert_allclose(
        cta_demands(kt, np.zeros(len(kt.kind)), dataclasses.replace(plain, **other),
                    shape.dtype)["l2_bytes"],
        cta_demands(kt, np.zeros(len(kt.kind)), plain, shape.dtype)["l2_bytes"])
