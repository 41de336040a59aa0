"""The timed model: a kernel's run time from its tile program replayed per CTA on modelled SMs.

Where the roofline (:mod:`iosim.cost`) divides a kernel's totals by rates, this model follows
the kernel the way the GPU runs it, in three steps.

1. **One warp alone** (per CTA, in SM clock cycles, from :mod:`iosim.work` and the spec's
   latencies). A ``mma_sync`` MatMul loads each operand fragment from shared memory and waits
   for it before the MMAs that use it (``fragments x smem latency + MMAs x issue interval``,
   at least its dependent chain ``k/16 x MMA latency``); a library GEMM is software-pipelined
   (its loads hide behind its MMAs). Scalar work issues on the FP32 pipe and exp/log on the
   special-function unit, plus the latency of its dependent steps (a row reduction's tree).
   A tile load waits for its bytes (the L2 latency, or the DRAM latency for the share of its
   bytes that the L2 replay says miss) unless its buffer has several stages: then it was
   issued one iteration ahead and its latency hides behind the previous iteration. The first
   load of a group ends in a CTA-wide barrier.
2. **Resident warps hide each other's latency** (the MWP/CWP argument of Hong and Kim, in
   queueing form): the ``k·W`` warps resident on an SM (``k`` CTAs of ``W`` warps, as
   :mod:`iosim.occupancy` allows) cycle through their programs in a closed queueing network:
   each waits out its latencies (a delay) and queues at the shared stations — its
   sub-partition's tensor, FP32 and special-function pipes (shared with the warps pinned to the
   same warp scheduler), the SM's shared memory, and the SM's share of L2 and HBM bandwidth for
   the loads it waits for. Mean value analysis gives the cycle time: a CTA's duration. Few
   warps: the lone warp's latency; many: the busiest station's throughput; in between, the
   queueing a ``max()`` of the two would miss. Loads issued ahead block no warp but still take
   bandwidth, so a CTA lasts at least its SM's bytes over the SM's bandwidth share (bandwidth
   is the chip's, shared by demand among the SMs holding CTAs: a CTA is charged the mean bytes
   of the CTAs resident with it, or its own at the SM's cap; :func:`shared_bandwidth_bytes`).
3. **CTAs are dispatched in launch order** to SMs as slots free up (``occupancy`` slots per
   SM): waves, the tail and causal imbalance come out of this, and the kernel ends when its
   last CTA does. The launch overhead is added.

Every figure comes from the hardware spec (``h100-measured``: the microbenchmarks of
``gpu/calibrate.py``); nothing is fitted to the attention kernels it predicts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import work
from ._numba import njit_cached
from .occupancy import occupancy

LOAD, STORE, COMPUTE = 0, 1, 2

#: In the mean value analysis, the share of its service a job in service still has ahead of it
#: when another arrives, taken off the queue the arrival sees: 1/2 for deterministic service
#: (exponential service, MVA's textbook case, would leave all of it: 0).
DETERMINISTIC_RESIDUAL = 0.5

#: Names of the terms a CTA's duration is the maximum of, in the order of ``cta_limiter``.
LIMITERS = ("latency", "tensor", "fp32", "sfu", "smem", "l2", "hbm")


@dataclass
class TimedKernel:
    """The timed model's result for one kernel."""

    time_s: float  # first CTA start to last CTA end, plus the launch overhead
    occupancy: object  # iosim.occupancy.Occupancy
    breakdown: dict  # limiter -> fraction of CTA-time it bounded; "sm_idle": idle SM fraction
    cta_sm: np.ndarray = field(repr=False)  # per CTA: SM it ran on
    cta_start_s: np.ndarray = field(repr=False)
    cta_end_s: np.ndarray = field(repr=False)
    cta_limiter: np.ndarray = field(repr=False)  # index into LIMITERS


def _repetitions(head: dict) -> np.ndarray:
    """How many times each event of one head runs: a compressed template's repetitions
    (:mod:`iosim.trace_fast`), else once each."""
    if "reps" in head:
        return head["reps"].astype(np.float64)
    return np.ones(len(head["kind"]))


def _per_cta(values: np.ndarray, cta_start: np.ndarray) -> np.ndarray:
    """Sum of ``values`` over each CTA's events (CTAs with no events get 0)."""
    cums = np.concatenate(([0.0], np.cumsum(values, dtype=np.float64)))
    return cums[cta_start[1:]] - cums[cta_start[:-1]]


def cta_demands(kt, hbm_by_event: np.ndarray, hardware, dtype: str, occ=None) -> dict:
    """Per-CTA demands of one kernel trace: the lone warp's cycles and what the CTA asks of
    each shared resource. ``hbm_by_event``: HBM bytes (read + written back) of each event.

    What does not depend on the L2 replay is worked out on one batch·head's events
    (``kt.head``) and repeated for the others; only the HBM bytes and the loads' latencies
    (L2 or DRAM, as the replay says) are taken per event.

    A warp-specialised kernel (``producer_warps`` > 0) is timed by its computing warps: its
    producer warps only issue copies (see :func:`_async_adjustments`, which also needs ``occ``,
    the kernel's occupancy, for the bandwidth its copies share)."""
    kernel = kt.kernel
    warps = kernel.warps - getattr(kernel, "producer_warps", 0)
    hw = hardware
    clock = hw.clock_hz
    per_smsp = hw.sm_count * hw.sub_partitions_per_sm * clock
    mma_rate = hw.tensor_rate(dtype, kt.tensor_path)
    if kt.tensor_path == "wgmma":  # the rate with this many consumer warpgroups per SM
        mma_rate *= hw.wgmma_rate_factor((occ.ctas_per_sm if occ is not None else 1)
                                         * kernel.consumer_warpgroups)
    mma_issue = work.MMA_FLOPS / (mma_rate / per_smsp)  # cycles per MMA on one sub-partition
    fp32_issue = work.WARP_SIZE / (hw.scalar_flops_per_s / 2 / per_smsp)  # FMA = 2 FLOP
    sfu_issue = work.WARP_SIZE / (hw.special_ops_per_s / per_smsp)

    h = kt.head
    is_compute = h["kind"] == COMPUTE
    is_load = h["kind"] == LOAD
    tile_bytes = (h["rows"] * h["row_bytes"]).astype(np.float64)
    reps = _repetitions(h)

    # ---- one warp alone, cycles (one batch·head's events) ----
    mma_w = h["mma"] / warps
    frag_w = h["smem_operand_bytes"] / warps / work.FRAGMENT_BYTES
    tensor_w = mma_w * mma_issue
    has_mma = h["mma"] > 0
    if kt.tensor_path == "mma_sync":
        mma_alone = np.maximum(frag_w * hw.smem_latency_cycles + tensor_w,
                               h["mma_chain"] * hw.mma_latency_cycles)
    elif kt.tensor_path == "wgmma":  # operands fetched by the tensor core; one completion wait
        mma_alone = tensor_w + hw.wgmma_latency_cycles - hw.mma_latency_cycles
    else:  # software-pipelined library GEMM: loads hide behind the MMAs
        mma_alone = tensor_w + hw.smem_latency_cycles
    mma_alone = np.where(has_mma, mma_alone + hw.mma_latency_cycles, 0.0)
    fp32_w = h["fp32"] / warps * fp32_issue
    sfu_w = h["sfu"] / warps * sfu_issue
    scalar_alone = (fp32_w + sfu_w + h["depth"] * hw.fp32_latency_cycles
                    + np.where(h["sfu"] > 0, hw.special_latency_cycles, 0.0))
    # loads not issued ahead wait at least the L2 latency (the DRAM part is added below);
    # back-to-back loads are in flight together, so a group of them waits once
    exposed = is_load & (h["prefetched"] == 0)
    starts = h["cta_start"]
    group = _load_groups(is_load, starts)
    exposed_events = np.flatnonzero(exposed)
    _, first = np.unique(group[exposed_events], return_index=True)
    waits = np.zeros(len(is_load), dtype=bool)
    waits[exposed_events[first]] = True  # the first exposed load of each group
    latency = (np.where(is_compute, mma_alone + scalar_alone - tensor_w - fp32_w - sfu_w, 0.0)
               + np.where(waits, hw.l2_latency_cycles, 0.0)
               + h["sync"] * hw.barrier_cycles)
    if getattr(kernel, "overlap_softmax", False) or getattr(kernel, "producer_warps", 0):
        latency = latency + _async_adjustments(
            kt, hbm_by_event, hw, occ, mma_alone, scalar_alone, latency,
            np.where(is_compute, tensor_w + fp32_w + sfu_w, 0.0), tile_bytes)
    # shared-memory bytes the SM moves for the CTA: MMA operands (with per-warp re-reads),
    # other ops' buffers, and tiles copied in or out
    smem_bytes = np.where(has_mma, h["smem_operand_bytes"],
                          h["sram_read"] + h["sram_write"]).astype(np.float64)
    # the L2 bandwidth a tile takes: its bytes, but an accumulating store's read and write (a
    # reduction at the L2) at the spec's measured reduction rate where it gives one
    l2_tile_bytes = tile_bytes * _reduction_weight(h, kernel, hw)
    heads = kt.heads

    def per_cta(values):
        return np.tile(_per_cta(values * reps, starts), heads)

    # wgmma and exp, wgmma and FP32 work on one SM overlap only partly (the spec's measured
    # wgmma_sfu_overlap, wgmma_fp32_overlap): the tensor pipe is held for the rest of that work
    coupled = ((1.0 - hw.wgmma_sfu_overlap) * sfu_w + (1.0 - hw.wgmma_fp32_overlap) * fp32_w
               if kt.tensor_path == "wgmma" else 0.0)
    demand = {
        "latency_cycles": per_cta(latency),
        "tensor_cycles": per_cta(np.where(is_compute, tensor_w + coupled, 0.0)),
        "fp32_cycles": per_cta(np.where(is_compute, fp32_w, 0.0)),
        "sfu_cycles": per_cta(np.where(is_compute, sfu_w, 0.0)),
        "smem_bytes": per_cta(smem_bytes),
        "l2_bytes": per_cta(np.where(is_compute, 0.0, l2_tile_bytes)),
        "exposed_l2_bytes": per_cta(np.where(exposed, tile_bytes, 0.0)),
    }
    # ---- what the L2 replay decides, event by event ----
    n_ctas = kt.n_ctas
    demand["hbm_bytes"] = _per_cta(hbm_by_event * np.tile(reps, heads), kt.cta_start)
    per_head_events = len(h["kind"])
    head_events = np.flatnonzero(exposed)
    events = (head_events[None, :]
              + per_head_events * np.arange(heads, dtype=np.int64)[:, None]).ravel()
    ctas = (np.searchsorted(starts, head_events, side="right") - 1)[None, :] \
        + (len(starts) - 1) * np.arange(heads, dtype=np.int64)[:, None]
    ctas = ctas.ravel()
    hbm = hbm_by_event[events]
    loaded = np.tile(tile_bytes[head_events], heads)
    runs = np.tile(reps[head_events], heads)
    miss = np.minimum(np.divide(hbm, loaded, out=np.zeros_like(hbm), where=loaded > 0), 1.0)
    demand["exposed_hbm_bytes"] = np.bincount(ctas, weights=hbm * runs, minlength=n_ctas)
    # a group waits for DRAM as long as its worst-missing load does
    n_groups = int(group.max()) + 1 if len(group) else 0
    groups = (group[head_events][None, :]
              + n_groups * np.arange(heads, dtype=np.int64)[:, None]).ravel()
    worst = np.zeros(n_groups * heads)
    np.maximum.at(worst, groups, miss * (hw.dram_latency_cycles - hw.l2_latency_cycles))
    group_cta = np.zeros(n_groups * heads, dtype=np.int64)
    group_cta[groups] = ctas
    group_runs = np.zeros(n_groups * heads)
    group_runs[groups] = runs  # a group's loads run as many times each
    demand["latency_cycles"] += np.bincount(group_cta, weights=worst * group_runs,
                                            minlength=n_ctas)
    return demand


def _reduction_weight(head: dict, kernel, hw) -> np.ndarray | float:
    """Per event, the factor its bytes take of the L2's bandwidth: 1, but for the two events
    (a read and a write) of a reduction, l2 bandwidth / (2 x the reduction rate of the
    kernel's copy engine) where the spec measured one (:meth:`Hardware.reduction_rate`)."""
    rate = hw.reduction_rate(getattr(kernel, "copy_engine", "cp.async"))
    if rate is None or "reduction" not in head:
        return 1.0
    return np.where(head["reduction"] > 0, hw.l2_bandwidth_bytes_per_s / (2.0 * rate), 1.0)


def _all_demands(kt, hbm_by_event, hardware, dtype, occ) -> dict:
    """:func:`cta_demands` of every run of heads that shares a program (one run without a
    key-padding mask), joined in launch order."""
    parts = [cta_demands(group, hbm_by_event[first:first + group.n_events], hardware, dtype,
                         occ) for group, first in kt.groups()]
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _tiles(is_load: np.ndarray, cta_start: np.ndarray) -> np.ndarray:
    """Per event, the index of its *tile*: a run of loads and the ops after it, up to the next
    load (a new tile also at each CTA's first event). In a flash kernel's loop, one K/V block."""
    new = is_load.copy()
    new[1:] &= ~is_load[:-1]
    firsts = cta_start[:-1][cta_start[:-1] < len(is_load)]
    new[firsts] = True
    return np.cumsum(new) - 1


def _async_adjustments(kt, hbm_by_event, hw, occ, mma_alone, scalar_alone, latency, pipe,
                       tile_bytes) -> np.ndarray:
    """What an asynchronous kernel changes in a lone warp's latency, per event (one
    batch·head's events; added to the latency of each tile's first event). ``latency`` and
    ``pipe``: each event's latency and pipe cycles as one warp sees them, before this.

    * ``overlap_softmax``: per tile, the MMAs (the next QKᵀ, this PV) run while the warp does
      the softmax and the rescale, so the tile's chain is max(MMA, scalar) plus its barrier,
      not the sum: the shorter of the two is taken off. The pipes still see all the work.
    * a producer (``producer_warps`` > 0) copies a ring tile ``stages - 1`` tiles ahead. The
      copy takes the L2 latency (DRAM's for the share of the kernel's ring bytes that miss) plus
      its bytes over the SM's bandwidth share (``occ.ctas_per_sm`` CTAs on every SM sharing the
      L2 and HBM bandwidth); the consumers wait only for what is left of it after
      ``stages - 1`` tiles of their own work: max(0, copy - (stages - 1) x tile chain)."""
    kernel = kt.kernel
    h = kt.head
    is_load, is_compute = h["kind"] == LOAD, h["kind"] == COMPUTE
    reps = _repetitions(h)
    starts = h["cta_start"]
    tile = _tiles(is_load, starts)
    n_tiles = int(tile.max()) + 1 if len(tile) else 0
    has_mma = h["mma"] > 0
    mma_part = np.bincount(tile, weights=np.where(is_compute & has_mma, mma_alone, 0.0),
                           minlength=n_tiles)
    scalar_part = np.bincount(tile, weights=np.where(is_compute & ~has_mma, scalar_alone, 0.0),
                              minlength=n_tiles)
    credit = (np.minimum(mma_part, scalar_part) if getattr(kernel, "overlap_softmax", False)
              else np.zeros(n_tiles))
    first = np.flatnonzero(np.diff(tile, prepend=-1) != 0)  # each tile's first event
    change = np.zeros(n_tiles)
    change -= credit
    if getattr(kernel, "producer_warps", 0):
        ring = is_load & (h["prefetched"] > 0)
        stages = max((b.stages for b in kernel.buffers if b.stages > 1), default=1)
        ring_bytes = np.bincount(tile, weights=np.where(ring, tile_bytes, 0.0),
                                 minlength=n_tiles)
        # the share of the ring's bytes that miss the L2, over every batch·head
        per_head = len(h["kind"])
        ring_events = (np.flatnonzero(ring)[None, :]
                       + per_head * np.arange(kt.heads, dtype=np.int64)[:, None]).ravel()
        runs = np.tile(reps[ring], kt.heads)
        loaded = float(np.dot(np.tile(tile_bytes[ring], kt.heads), runs))
        miss = (min(1.0, float(np.dot(hbm_by_event[ring_events], runs)) / loaded) if loaded
                else 0.0)
        ctas_per_sm = occ.ctas_per_sm if occ is not None else 1
        active = max(1, min(hw.sm_count, kt.n_ctas))
        cap = hw.sram_bandwidth_bytes_per_s / hw.sm_count
        l2_share = min(hw.l2_bandwidth_bytes_per_s / active, cap) / hw.clock_hz  # bytes/cycle
        hbm_share = min(hw.hbm_bandwidth_bytes_per_s / active, cap) / hw.clock_hz
        copy = (hw.l2_latency_cycles + miss * (hw.dram_latency_cycles - hw.l2_latency_cycles)
                + ctas_per_sm * np.maximum(ring_bytes / l2_share, miss * ring_bytes / hbm_share))
        # the consumers' own chain per tile: its latency and pipe time as one warp sees them
        chain = np.bincount(tile, weights=latency + pipe, minlength=n_tiles) - credit
        wait = np.maximum(0.0, copy - (stages - 1) * chain)
        change += np.where(ring_bytes > 0, wait, 0.0)
    out = np.zeros(len(tile))
    out[first] = change
    return out


def _load_groups(is_load: np.ndarray, cta_start: np.ndarray) -> np.ndarray:
    """Per event, the index of its group of back-to-back loads (a new group at each load that
    follows a non-load or starts a CTA); meaningful for loads only."""
    starts_group = is_load.copy()
    starts_group[1:] &= ~is_load[:-1]
    starts_group[cta_start[:-1][cta_start[:-1] < len(is_load)]] = is_load[
        cta_start[:-1][cta_start[:-1] < len(is_load)]]
    return np.cumsum(starts_group) - 1


@njit_cached
def _heap_push(heap_t, heap_s, n, t, s):
    i = n
    heap_t[i] = t
    heap_s[i] = s
    while i > 0:
        parent = (i - 1) // 2
        if heap_t[parent] <= heap_t[i]:
            break
        heap_t[parent], heap_t[i] = heap_t[i], heap_t[parent]
        heap_s[parent], heap_s[i] = heap_s[i], heap_s[parent]
        i = parent
    return n + 1


@njit_cached
def _heap_pop(heap_t, heap_s, n):
    t = heap_t[0]
    s = heap_s[0]
    n -= 1
    heap_t[0] = heap_t[n]
    heap_s[0] = heap_s[n]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= n:
            break
        child = left
        if left + 1 < n and heap_t[left + 1] < heap_t[left]:
            child = left + 1
        if heap_t[i] <= heap_t[child]:
            break
        heap_t[child], heap_t[i] = heap_t[i], heap_t[child]
        heap_s[child], heap_s[i] = heap_s[i], heap_s[child]
        i = child
    return t, s, n


@njit_cached
def _duration(c, k, active_sms, latency_s, pipe_s, smem_s, l2_bytes, hbm_bytes, exposed_l2,
              exposed_hbm, warps, sub_partitions, l2_bw, hbm_bw, sm_bw_cap, terms):
    """A CTA's duration with ``k`` CTAs on its SM and ``active_sms`` SMs busy (see the module
    docstring, step 2), by mean value analysis of a closed queueing network: each warp of a
    sub-partition cycles through its program, waiting out its latencies (a delay) and queueing
    at the shared stations (its sub-partition's tensor, FP32 and SFU pipes; the SM's shared
    memory; the SM's share of L2 and HBM bandwidth for the loads it waits for). Loads issued
    ahead do not block a warp but still take bandwidth: the CTA takes at least its SM's bytes
    over its bandwidth share. Fills ``terms`` (each limiter's part) and returns the duration
    and the index of the limiter."""
    resident_warps = k * warps
    l2_share = min(l2_bw / active_sms, sm_bw_cap)
    hbm_share = min(hbm_bw / active_sms, sm_bw_cap)
    # per-warp service demands; the first three stations are a sub-partition's own pipes
    # (shared by the warps pinned to it), the others are the SM's
    demand = np.empty(6)
    demand[0] = pipe_s[c, 0]
    demand[1] = pipe_s[c, 1]
    demand[2] = pipe_s[c, 2]
    demand[3] = smem_s[c] / warps
    demand[4] = exposed_l2[c] / warps / l2_share
    demand[5] = exposed_hbm[c] / warps / hbm_share
    # of the other resident warps, the share pinned to the same sub-partition as this one
    per_smsp = (resident_warps + sub_partitions - 1) // sub_partitions
    mates = (per_smsp - 1) / (resident_warps - 1) if resident_warps > 1 else 0.0
    queue = np.zeros(6)  # customers at each station, over the whole SM
    busy = np.zeros(6)  # utilisation of each station
    residence = np.zeros(6)
    cycle = latency_s[c]
    for n in range(1, resident_warps + 1):
        cycle = latency_s[c]
        for i in range(6):
            # an arriving warp finds the queue of its own sub-partition at a pipe station;
            # service is deterministic (a pipe's issue interval, a transfer's bytes over a
            # rate), so the one in service has half its time left on average
            share = mates if i < 3 else 1.0
            seen = share * (queue[i] - DETERMINISTIC_RESIDUAL * busy[i])
            residence[i] = demand[i] * (1.0 + max(seen, 0.0))
            cycle += residence[i]
        if cycle <= 0.0:
            break
        throughput = n / cycle
        for i in range(6):
            queue[i] = throughput * residence[i]
            busy[i] = throughput * demand[i]
    # LIMITERS: latency, tensor, fp32, sfu, smem, l2, hbm
    terms[0] = latency_s[c]
    for i in range(4):
        terms[1 + i] = residence[i]
    terms[5] = residence[4]
    terms[6] = residence[5]
    duration = cycle
    best = 0
    for i in range(7):
        if terms[i] > terms[best]:
            best = i
    # no station serves faster than its rate: the busiest one's throughput bounds the cycle
    for i in range(6):
        bound = (per_smsp if i < 3 else resident_warps) * demand[i]
        if bound > duration:
            duration = bound
            best = 1 + i
    l2_floor = k * l2_bytes[c] / l2_share
    hbm_floor = k * hbm_bytes[c] / hbm_share
    if l2_floor > duration:
        duration = l2_floor
        best = 5
    if hbm_floor > duration:
        duration = hbm_floor
        best = 6
    return duration, best


@njit_cached
def dispatch(n_sms, slots_per_sm, latency_s, pipe_s, smem_s, l2_bytes, hbm_bytes, exposed_l2,
             exposed_hbm, warps, sub_partitions, l2_bw, hbm_bw, sm_bw_cap,
             cta_sm, cta_start, cta_end, cta_limiter):
    """CTAs in launch order onto ``n_sms`` SMs of ``slots_per_sm`` slots each: the first
    fill every slot (round-robin over the SMs), each later one takes the slot that frees first
    (the SM whose CTA ends earliest). Fills the per-CTA arrays; returns the kernel's end."""
    n = latency_s.shape[0]
    terms = np.zeros(7)
    resident = np.zeros(n_sms, dtype=np.int64)
    first = min(n, n_sms * slots_per_sm)
    for c in range(first):
        resident[c % n_sms] += 1
    active = 0
    for s in range(n_sms):
        if resident[s] > 0:
            active += 1
    heap_t = np.empty(first + 1)
    heap_s = np.empty(first + 1, dtype=np.int64)
    heap_c = 0
    for c in range(first):
        s = c % n_sms
        d, lim = _duration(c, resident[s], active, latency_s, pipe_s, smem_s, l2_bytes,
                           hbm_bytes, exposed_l2, exposed_hbm, warps, sub_partitions, l2_bw,
                           hbm_bw, sm_bw_cap, terms)
        cta_sm[c] = s
        cta_start[c] = 0.0
        cta_end[c] = d
        cta_limiter[c] = lim
        heap_c = _heap_push(heap_t, heap_s, heap_c, d, s)
    end = 0.0
    for c in range(first, n):
        t, s, heap_c = _heap_pop(heap_t, heap_s, heap_c)
        d, lim = _duration(c, resident[s], active, latency_s, pipe_s, smem_s, l2_bytes,
                           hbm_bytes, exposed_l2, exposed_hbm, warps, sub_partitions, l2_bw,
                           hbm_bw, sm_bw_cap, terms)
        cta_sm[c] = s
        cta_start[c] = t
        cta_end[c] = t + d
        cta_limiter[c] = lim
        heap_c = _heap_push(heap_t, heap_s, heap_c, t + d, s)
    for c in range(n):
        if cta_end[c] > end:
            end = cta_end[c]
    return end


def shared_bandwidth_bytes(bytes_per_cta: np.ndarray, resident: int, fair_share: float,
                           sm_cap: float) -> np.ndarray:
    """Per CTA, the bytes its SM's bandwidth floor is charged with. L2 and HBM bandwidth is
    the whole chip's, shared by demand: an SM whose CTAs move more bytes than the others (a
    CTA that misses where its neighbour hits) takes more than an equal share, up to the SM's
    own cap. So a CTA's floor is the mean bytes of the ``resident`` CTAs around it in launch
    order (those running at the same time) at the equal ``fair_share``, or its own bytes at
    the SM's cap, whichever is longer: with equal CTAs, its own bytes at the equal share."""
    n = len(bytes_per_cta)
    sums = np.concatenate(([0.0], np.cumsum(bytes_per_cta, dtype=np.float64)))
    index = np.arange(n)
    first = np.maximum(0, index - resident + 1)
    last = np.minimum(n, np.maximum(index + 1, resident))
    mean = (sums[last] - sums[first]) / (last - first)
    return np.maximum(mean, bytes_per_cta * min(1.0, fair_share / sm_cap))


def time_kernel(kt, hbm_by_event: np.ndarray, hardware, shape, occ=None,
                demand=None) -> TimedKernel:
    """Run the timed model on one kernel trace of a workload of ``shape`` (see the module
    docstring). ``hbm_by_event``: each event's HBM bytes, read and written back; ``occ``: the
    kernel's occupancy, when the caller has it already; ``demand``: every CTA's demands
    (:func:`cta_demands`' dict) when the caller has them (a streamed replay, which holds one
    head's events only: :mod:`iosim.sampling`); ``hbm_by_event`` is then not used."""
    hw = hardware
    if occ is None:
        occ = occupancy(kt.kernel, shape.head_dim, shape.seq_len, hw)
    if demand is None:
        demand = _all_demands(kt, hbm_by_event, hw, shape.dtype, occ)
    clock = hw.clock_hz
    n = kt.n_ctas
    pipe = np.stack([demand["tensor_cycles"], demand["fp32_cycles"],
                     demand["sfu_cycles"]], axis=1) / clock
    smem_per_sm = hw.sram_bandwidth_bytes_per_s / hw.sm_count
    cta_sm = np.zeros(n, dtype=np.int64)
    start = np.zeros(n)
    end = np.zeros(n)
    limiter = np.zeros(n, dtype=np.int64)
    if n:
        resident = hw.sm_count * occ.ctas_per_sm
        active = min(hw.sm_count, n)
        dispatch(hw.sm_count, occ.ctas_per_sm, demand["latency_cycles"] / clock,
                 np.ascontiguousarray(pipe), demand["smem_bytes"] / smem_per_sm,
                 shared_bandwidth_bytes(demand["l2_bytes"], resident,
                                        hw.l2_bandwidth_bytes_per_s / active, smem_per_sm),
                 shared_bandwidth_bytes(demand["hbm_bytes"], resident,
                                        hw.hbm_bandwidth_bytes_per_s / active, smem_per_sm),
                 demand["exposed_l2_bytes"],
                 demand["exposed_hbm_bytes"],
                 occ.warps_per_cta - getattr(occ, "producer_warps", 0),  # the computing warps
                 hw.sub_partitions_per_sm,
                 hw.l2_bandwidth_bytes_per_s, hw.hbm_bandwidth_bytes_per_s, smem_per_sm,
                 cta_sm, start, end, limiter)
    span = float(end.max()) if n else 0.0
    busy = end - start
    breakdown = {name: 0.0 for name in LIMITERS}
    total = float(busy.sum())
    if total > 0:
        by = np.bincount(limiter, weights=busy, minlength=len(LIMITERS))
        breakdown = {name: float(by[i] / total) for i, name in enumerate(LIMITERS)}
    # SM time left idle: SM-seconds with no CTA resident over all SM-seconds of the span
    idle = 0.0
    if span > 0:
        covered = np.zeros(hw.sm_count)
        order = np.lexsort((start, cta_sm))
        _covered_time(cta_sm[order], start[order], end[order], covered)
        idle = float(1.0 - covered.sum() / (hw.sm_count * span))
    breakdown["sm_idle"] = idle
    return TimedKernel(time_s=span + hw.launch_overhead_s, occupancy=occ, breakdown=breakdown,
                       cta_sm=cta_sm, cta_start_s=start, cta_end_s=end, cta_limiter=limiter)


@njit_cached
def _covered_time(sm, start, end, covered):
    """Per SM, the length of the union of its CTAs' [start, end) intervals (sorted by SM,
    then start)."""
    i = 0
    n = sm.shape[0]
    while i < n:
        s = sm[i]
        lo = start[i]
        hi = end[i]
        i += 1
        while i < n and sm[i] == s:
            if start[i] > hi:
                covered[s] += hi - lo
                lo = start[i]
                hi = end[i]
            elif end[i] > hi:
                hi = end[i]
            i += 1
        covered[s] += hi - lo


def fraction_bound(breakdown: dict) -> str:
    """The limiter that bounded the largest share of CTA-time."""
    names = [n for n in LIMITERS if n in breakdown]
    return max(names, key=lambda n: breakdown[n]) if names else ""


