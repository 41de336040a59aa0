"""Streamed and sampled simulation of long kernels (the SMARTS / SimPoint idea), in memory
independent of B·H and of the sequence length.

**Streaming.** The events of all batch·heads are never held: :func:`_walk` (Numba) generates
each event from the one-head **compressed** template (:mod:`iosim.trace_fast`: an innermost
loop's middle iterations kept once, with a repetition count and an address step) and the head's
address offsets as the interleaved order of the L2 model reaches it (``slots`` CTAs resident,
one event each in turn, as :func:`iosim.engine.interleave`), and runs it through the same L2 as
:func:`iosim.engine.replay_l2`: the counts are identical. FLOPs, SRAM bytes and L2 request
bytes are summed from the template exactly (each event times its repetitions). The timed model
gets one head's CTA demands, computed with each template event's mean HBM bytes over the heads
and repetitions, repeated for every head (:func:`iosim.timing.time_kernel`'s ``demand``).
Memory: the compressed template (flash2 at N = 2^20: 213 k events for 805 M), plus a few
numbers per CTA and per head.

**Sampling.** The order in which events run does not depend on the cache, and a long kernel
settles into a steady state. :func:`replay_kernel` replays a **prefix** segment by segment (a
segment: the resident CTAs' events, one wave, or at most :data:`SEGMENT_MAX_EVENTS` of them
when CTAs are long) until the state is steady, skips the **middle** (the order still advances,
the cache does not run), replays the **tail** (the last wave's events, after a warm-up from the
L2 state the prefix left: its lines stand in for those of the skipped waves and are aged out by
the warm-up), and extrapolates the middle:

* with many heads (:data:`HEAD_SAMPLING_MIN_HEADS`) and whole-wave segments the sampling unit
  is a **head**: steady once the finished heads' HBM read bytes have a 95 % interval within
  :data:`HEAD_TOLERANCE` of their mean (the heads of the first wave left out); the middle's
  reads are each template event's mean over the replayed heads times the heads it was not
  replayed for;
* otherwise a **segment**: steady once two blocks of :data:`STEADY_SEGMENTS` segments agree in
  HBM bytes read per L2 request byte, class by class (tensor x load/store; the classes every
  segment requested); the middle's reads are its exact L2 request bytes per class times the
  steady segments' ratios (a class they never requested, such as the Q tiles a long CTA loads
  once: its ratio over every segment replayed);
* HBM writes through **dirty episodes**: every sector made dirty is written back once (evicted,
  or after the kernel), so the writes during the kernel are the episodes (prefix and tail
  measured, the middle's from the steady segments' episodes per byte stored, or every replayed
  segment's when the steady ones stored nothing) less the dirty bytes left at the end (the
  tail's final state).

The prefix is steady only after it moved :data:`STEADY_TURNOVERS` times the L2's capacity
through HBM (before that no line has been evicted). Each estimate carries a Student-t 95 %
interval: over the steady heads (reads) or segments (writes, widened by the spread of the dirty
bytes held). A kernel too short for the skip to pay, or that never settles (causal CTAs
launched longest first shrink wave after wave), is replayed whole (exact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import engine
from ._numba import njit_cached
from .engine import (_CHUNK_ACCESSES, _DIRTY_SHIFT, _MAX_PACKED_WAYS, _POPCOUNT, _SECTOR_MASK,
                     _chunk_scratch, _initial_order, _log2, _row_lines, _run_move_to_front,
                     _run_packed)

LOAD, STORE, COMPUTE = 0, 1, 2

#: Simulations with more trace events than this (over all heads) are streamed: replayed from
#: the one-head compressed template (memory independent of B·H and, but for a few numbers per
#: CTA, of the sequence length), with the same counts as the all-heads trace. Below it the
#: all-heads trace is built and replayed (about 300 bytes an event at the peak: 1 M events stay
#: well under 1 GB). Sampled too above SAMPLE_ABOVE_EVENTS unless ``exact``
#: (see :func:`sampling_mode`).
STREAM_ABOVE_EVENTS = 1_000_000
#: The sampled replay's threshold (the largest shape the tests and experiments ran before
#: sampling existed had 3.2 M events).
SAMPLE_ABOVE_EVENTS = 4_000_000


@dataclass
class SampleStats:
    """What the sampled replay of one kernel measured and estimated."""

    segments: int  # segments (waves) of the prefix replayed before the steady state
    covered_share: float  # share of the events replayed (the tail's warm-up included)
    intervals: dict = field(default_factory=dict)  # counter -> (low, high), 95 %


# ---- the walker --------------------------------------------------------------------------------
@njit_cached
def _walk(t_start, kind, tensor, addr, rows, row_bytes, row_stride, reps, addr_step,
          body_offset, body_len, cls, offsets, n_heads,
          stop, replay, measure_from, n_sets, assoc, line_bytes, sector_bytes, state,
          order_of_set, slot_cta, slot_te, slot_rep, slot_end, slot_head, cursor, cls_counts,
          tmpl_hbm, tmpl_read, tmpl_n, head_read):
    """Advance the interleaved event order of ``n_heads`` heads running the template (CTAs at
    ``t_start``; head h's addresses are the template's plus ``offsets[h, tensor]``) up to
    position ``stop``, from where the last call left it (``cursor``: position, next CTA, active
    slots; the slot arrays; the cache ``state`` and ``order_of_set``). With ``replay`` the
    events run through the cache; events at positions >= ``measure_from`` then add their HBM
    bytes read, written back and their L2 request bytes to ``cls_counts[cls[e]]`` (columns 0,
    1, 2), their HBM bytes to ``tmpl_hbm[e]`` (those read also to ``tmpl_read[e]``;
    ``tmpl_n[e]`` counting them) and their HBM bytes read to ``head_read[head]``. Without
    ``replay`` the order only advances (a skip). The template is compressed
    (:mod:`iosim.trace_fast`): a slot runs template event ``slot_te`` for the ``slot_rep``-th
    time, at ``addr + slot_rep * addr_step``, and goes back to its iteration's first event
    until it ran ``reps`` times."""
    cph = t_start.shape[0] - 1
    n_ctas = cph * n_heads
    n_slots = slot_cta.shape[0]
    flat_state = state.reshape(state.shape[0] * state.shape[1])
    line_shift = _log2(line_bytes)
    sector_shift = _log2(sector_bytes)
    inv_sets = 1.0 / n_sets
    chunk_line, chunk_bits, chunk_set, chunk_event = _chunk_scratch(kind, rows, row_bytes,
                                                                    line_bytes)
    capacity = chunk_line.shape[0]
    # the chunk's events: their HBM bytes, template event and whether measured
    event_counts = np.zeros((capacity, 2), dtype=np.int64)
    ev_te = np.empty(capacity, dtype=np.int64)
    ev_head = np.empty(capacity, dtype=np.int64)
    ev_measured = np.zeros(capacity, dtype=np.bool_)
    full_mask = (1 << (line_bytes >> sector_shift)) - 1
    line_offset_mask = line_bytes - 1
    pos = cursor[0]
    next_cta = cursor[1]
    active = cursor[2]
    n = 0  # line accesses in the chunk
    n_ev = 0  # events in the chunk
    s = cursor[3]  # the slot whose turn is next
    while active > 0 and pos < stop:
        c = slot_cta[s]
        if c >= 0:
            te = slot_te[s]
            while te >= slot_end[s]:  # this CTA is done: the slot takes the next one
                if next_cta < n_ctas:
                    c = next_cta
                    next_cta += 1
                    local = c % cph
                    te = t_start[local]
                    slot_rep[s] = 0
                    slot_end[s] = t_start[local + 1]
                    slot_head[s] = c // cph
                else:
                    c = -1
                    break
            slot_cta[s] = c
            if c < 0:
                active -= 1
            else:
                rep = slot_rep[s]
                if reps[te] > 1 and body_offset[te] == body_len[te] - 1 and rep + 1 < reps[te]:
                    slot_te[s] = te - body_offset[te]  # the next repetition of the iteration
                    slot_rep[s] = rep + 1
                else:
                    slot_te[s] = te + 1
                    if reps[te] > 1 and body_offset[te] == body_len[te] - 1:
                        slot_rep[s] = 0
                p = pos
                pos += 1
                k = kind[te]
                if replay and k != COMPUTE and row_bytes[te] > 0:
                    is_write = k == STORE
                    full_bits = ((full_mask | (full_mask << _DIRTY_SHIFT)) if is_write
                                 else full_mask)
                    a0 = addr[te] + rep * addr_step[te] + offsets[slot_head[s], tensor[te]]
                    request = 0
                    for r in range(rows[te]):
                        start = a0 + r * row_stride[te]
                        n, touched = _row_lines(start, start + row_bytes[te], full_bits, n_ev,
                                                n, chunk_line, chunk_bits, chunk_set,
                                                chunk_event, n_sets, inv_sets, line_shift,
                                                sector_shift, line_offset_mask)
                        request += touched
                    event_counts[n_ev, 0] = 0
                    event_counts[n_ev, 1] = 0
                    ev_te[n_ev] = te
                    ev_head[n_ev] = slot_head[s]
                    ev_measured[n_ev] = p >= measure_from
                    if p >= measure_from:
                        cls_counts[cls[te], 2] += request * sector_bytes
                    n_ev += 1
                    if n >= _CHUNK_ACCESSES:
                        _run_chunk(n, n_ev, chunk_line, chunk_bits, chunk_set, chunk_event,
                                   state, flat_state, order_of_set, assoc, sector_bytes,
                                   event_counts, ev_te, ev_head, ev_measured, cls,
                                   cls_counts, tmpl_hbm, tmpl_read, tmpl_n, head_read)
                        n = 0
                        n_ev = 0
        s += 1
        if s == n_slots:
            s = 0
    if n_ev > 0:
        _run_chunk(n, n_ev, chunk_line, chunk_bits, chunk_set, chunk_event, state, flat_state,
                   order_of_set, assoc, sector_bytes, event_counts, ev_te, ev_head,
                   ev_measured, cls, cls_counts, tmpl_hbm, tmpl_read, tmpl_n, head_read)
    cursor[0] = pos
    cursor[1] = next_cta
    cursor[2] = active
    cursor[3] = s


@njit_cached
def _run_chunk(n, n_ev, chunk_line, chunk_bits, chunk_set, chunk_event, state, flat_state,
               order_of_set, assoc, sector_bytes, event_counts, ev_te, ev_head, ev_measured,
               cls, cls_counts, tmpl_hbm, tmpl_read, tmpl_n, head_read):
    """Run a chunk of line accesses through the cache; credit the measured events."""
    if assoc <= _MAX_PACKED_WAYS:
        _run_packed(n, chunk_line, chunk_bits, chunk_set, chunk_event, flat_state,
                    order_of_set, assoc, sector_bytes, event_counts)
    else:
        _run_move_to_front(n, chunk_line, chunk_bits, chunk_set, chunk_event, state,
                           sector_bytes, event_counts)
    for i in range(n_ev):
        if ev_measured[i]:
            te = ev_te[i]
            cls_counts[cls[te], 0] += event_counts[i, 0]
            cls_counts[cls[te], 1] += event_counts[i, 1]
            tmpl_hbm[te] += event_counts[i, 0] + event_counts[i, 1]
            tmpl_read[te] += event_counts[i, 0]
            tmpl_n[te] += 1
            head_read[ev_head[i]] += event_counts[i, 0]


@njit_cached
def _dirty_bytes(state, sector_bytes):
    """Dirty bytes held by the cache ``state``."""
    dirty = 0
    for i in range(state.shape[0]):
        for j in range(state.shape[1]):
            if state[i, j] >= 0:
                dirty += _POPCOUNT[(state[i, j] >> _DIRTY_SHIFT) & _SECTOR_MASK] * sector_bytes
    return dirty


@njit_cached
def _event_lines(kind, addr, rows, row_bytes, row_stride, reps, addr_step, line_bytes,
                 sector_bytes, lines, sectors):
    """Per template event, over its ``reps`` repetitions: the L2 lines it touches and its L2
    request bytes (touched sectors). A repetition's addresses move by ``addr_step``, so its
    lines depend on where the step leaves it within a line: one of at most line_bytes /
    gcd(step, line_bytes) cases, each counted once and weighted by its repetitions."""
    line_shift = _log2(line_bytes)
    sector_shift = _log2(sector_bytes)
    for e in range(kind.shape[0]):
        lines[e] = 0
        sectors[e] = 0
        if kind[e] == COMPUTE or row_bytes[e] <= 0:
            continue
        step = addr_step[e] % line_bytes
        period = 1
        while (period * step) % line_bytes != 0:
            period += 1
        cases = min(period, reps[e])
        for k in range(cases):
            weight = (reps[e] - k + period - 1) // period  # repetitions k, k + period, ...
            a0 = addr[e] + k * addr_step[e]
            for r in range(rows[e]):
                start = a0 + r * row_stride[e]
                end = start + row_bytes[e]
                lines[e] += weight * (((end - 1) >> line_shift) - (start >> line_shift) + 1)
                sectors[e] += weight * ((((end - 1) >> sector_shift) - (start >> sector_shift)
                                         + 1) * sector_bytes)


# ---- templates without the all-heads trace ----------------------------------------------------
@dataclass
class HeadTemplates:
    """One kernel's one-head template and what places it for every head."""

    kernel: object
    template: dict  # every column (iosim.trace) of one batch·head's compressed events
    # (iosim.trace_fast: "reps", "addr_step", ...), and "cta_start"
    heads: int
    offsets: np.ndarray  # (heads, tensors + 1): byte offset of each tensor per head (0: compute)


def head_templates(schedule) -> list[HeadTemplates] | None:
    """Per kernel, its one-head template and per-head address offsets; None with a key-padding
    mask (its batch elements run different templates: the caller replays exactly)."""
    from . import trace_fast
    from .trace import tensor_addressing, tensor_heads

    shape = schedule.shape
    if shape.kv_lens is not None:
        return None
    _, tensor_ids, base, stride_by_id = tensor_addressing(schedule)
    out = []
    for kernel in schedule.kernels:
        heads = shape.batch_kv_heads if kernel.heads == "kv" else shape.batch_heads
        columns, starts = trace_fast.head_template(kernel, schedule, base, tensor_ids,
                                                   compress=True)
        columns = dict(columns)
        columns["cta_start"] = starts
        head_index = np.arange(heads, dtype=np.int64)
        offsets = np.ascontiguousarray(tensor_heads(schedule, kernel, head_index) * stride_by_id)
        out.append(HeadTemplates(kernel=kernel, template=columns, heads=heads, offsets=offsets))
    return out


def sampling_mode(schedule, exact) -> tuple[bool, bool]:
    """(streamed, sampled): how :func:`iosim.simulate.simulate_schedule` simulates
    ``schedule``. ``exact=True``: every event replayed, streamed above
    :data:`STREAM_ABOVE_EVENTS`; ``exact=False``: streamed and sampled wherever a kernel is long
    enough; None (default): streamed above STREAM_ABOVE_EVENTS, sampled too above
    :data:`SAMPLE_ABOVE_EVENTS`. A key-padding mask (batch elements with different templates)
    is never streamed."""
    if schedule.shape.kv_lens is not None:
        return False, False
    if exact is False:
        return True, True
    from .budget import estimate

    events = estimate(schedule).events
    return events > STREAM_ABOVE_EVENTS, exact is None and events > SAMPLE_ABOVE_EVENTS


# ---- one kernel ------------------------------------------------------------------------------
def _t_quantile(dof: int) -> float:
    """The two-sided 95 % Student-t quantile for ``dof`` degrees of freedom."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
             9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
             16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}
    if dof in table:
        return table[dof]
    if dof > 30:
        return 1.96 + 2.4 / dof
    return table[max(k for k in table if k < dof)]


@dataclass
class KernelReplay:
    """The engine's counters of one kernel and each template event's HBM bytes."""

    counts: dict  # iosim.engine.COUNTERS -> value (HBM ones estimated when sampled)
    hbm_by_template_event: np.ndarray  # float64, the mean over heads (the same for every head)
    stats: SampleStats | None = None  # None: every event was replayed


class _Walker:
    """The resumable state of :func:`_walk` over one kernel."""

    def __init__(self, ht: HeadTemplates, hardware, slots: int, cls: np.ndarray, n_cls: int):
        t = ht.template
        self.ht, self.hw, self.cls = ht, hardware, cls
        self.starts = np.ascontiguousarray(t["cta_start"], dtype=np.int64)
        self.tensor = np.ascontiguousarray(t["tensor"], dtype=np.int64)
        cph = len(self.starts) - 1
        n_ctas = cph * ht.heads
        n_slots = max(1, min(slots, n_ctas))
        self.state = np.full((hardware.l2_sets, hardware.l2_associativity), -1, dtype=np.int64)
        self.order = np.full(hardware.l2_sets if hardware.l2_associativity <= _MAX_PACKED_WAYS
                             else 0, _initial_order(hardware.l2_associativity), dtype=np.int64)
        first = np.arange(n_slots, dtype=np.int64)
        self.slot_cta = first.copy()
        self.slot_te = self.starts[first % cph].copy()
        self.slot_rep = np.zeros(n_slots, dtype=np.int64)
        self.slot_end = self.starts[first % cph + 1].copy()
        self.slot_head = first // cph
        self.cursor = np.array([0, n_slots, n_slots, 0], dtype=np.int64)
        self.n_cls = n_cls
        self.tmpl_hbm = np.zeros(len(t["kind"]), dtype=np.float64)
        self.tmpl_read = np.zeros(len(t["kind"]), dtype=np.float64)
        self.tmpl_n = np.zeros(len(t["kind"]), dtype=np.int64)
        self.head_read = np.zeros(ht.heads, dtype=np.float64)
        self.cph = cph

    @property
    def pos(self) -> int:
        return int(self.cursor[0])

    def cold(self) -> None:
        self.state[:, :] = -1
        self.order[:] = _initial_order(self.hw.l2_associativity)

    def run(self, stop: int, replay: bool = True, measure_from: int = 0) -> np.ndarray:
        """Advance to position ``stop``; per class: HBM read, written back, L2 request bytes
        of the events measured (positions >= ``measure_from``)."""
        t, hw = self.ht.template, self.hw
        counts = np.zeros((self.n_cls, 3), dtype=np.int64)
        if stop > self.pos:
            _walk(self.starts, t["kind"], self.tensor, t["addr"], t["rows"], t["row_bytes"],
                  t["row_stride"], t["reps"], t["addr_step"], t["body_offset"], t["body_len"],
                  self.cls, self.ht.offsets, self.ht.heads, stop, replay,
                  measure_from, hw.l2_sets, hw.l2_associativity, hw.l2_line_bytes,
                  hw.l2_sector_bytes, self.state, self.order, self.slot_cta, self.slot_te,
                  self.slot_rep, self.slot_end, self.slot_head, self.cursor, counts,
                  self.tmpl_hbm,
                  self.tmpl_read, self.tmpl_n, self.head_read)
        return counts

    def heads_done(self) -> int:
        """Heads whose every CTA has finished: 0 .. this - 1."""
        running = self.slot_cta[self.slot_cta >= 0]
        oldest = int(running.min()) if len(running) else self.ht.heads * self.cph
        return oldest // self.cph

    def dirty_bytes(self) -> int:
        return int(_dirty_bytes(self.state, self.hw.l2_sector_bytes))


#: Steady state: the segments replayed are compared in two blocks of STEADY_SEGMENTS, the last
#: ones and those before; the state is steady when the blocks' HBM bytes read per L2 request
#: byte (class by class, :func:`_steady`) agree within STEADY_TOLERANCE (a block spans the
#: short patterns some streams repeat, e.g. one wave in eight starting a new head at the same
#: place), with at least MIN_SEGMENTS replayed.
STEADY_SEGMENTS = 4
STEADY_TOLERANCE = 0.003
MIN_SEGMENTS = 2 * STEADY_SEGMENTS + 1
#: The prefix is steady only after it moved this many times the L2's capacity through HBM.
STEADY_TURNOVERS = 1.0
#: A segment is one wave's events, but at most this many: the CTAs of a long sequence run so
#: many K/V blocks each that the steady state is reached inside the first wave (each segment
#: then covers some of the resident CTAs' loop iterations), and a wave would cost seconds.
SEGMENT_MAX_EVENTS = 1 << 22
#: Warm-up before the replayed tail, from the steady state's L2: at least this many segments
#: (waves) and this many times the L2's capacity moved through HBM.
TAIL_WARMUP_SEGMENTS = 2
TAIL_WARMUP_TURNOVERS = 1.0


def _ratio(segments, weights) -> float:
    """HBM bytes read per L2 request byte over ``segments``, class by class, weighted by
    ``weights`` (each class's share of the kernel's requests; 0 for a class left out): a
    segment's mix of classes may change (one that starts CTAs loads their Q tiles) while each
    class's ratio holds."""
    total = np.sum(segments, axis=0)
    ratio = np.divide(total[:, 0], total[:, 2], out=np.zeros(len(weights)),
                      where=total[:, 2] > 0)
    return float(ratio @ weights)


#: With at least HEAD_SAMPLING_MIN_HEADS heads the sampling unit is a head: the state is
#: steady when the HBM bytes read by the last heads finished (at least MIN_STEADY_HEADS, those
#: of the first wave left out) have a 95 % interval of their mean within HEAD_TOLERANCE of it.
HEAD_SAMPLING_MIN_HEADS = 16
MIN_STEADY_HEADS = 8
HEAD_TOLERANCE = 0.002
HEAD_MAX_L2_SHARE = 0.25


def _steady_heads(walker, first: int, capacity_bytes: float):
    """The per-head HBM read bytes of the steady heads finished so far, or None while they
    are too few or too spread (see HEAD_TOLERANCE), or while a head reads more than
    HEAD_MAX_L2_SHARE of the L2: heads that large share the L2 with their neighbours by how
    their CTAs fall into waves, which changes from head to head, and are not alike."""
    done = walker.heads_done()
    x = walker.head_read[first:done]
    if len(x) < MIN_STEADY_HEADS:
        return None
    mean = float(x.mean())
    if mean > HEAD_MAX_L2_SHARE * capacity_bytes:
        return None
    half = _t_quantile(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return x if mean > 0 and half <= HEAD_TOLERANCE * mean else None


def _steady(segments, request_by_cls) -> bool:
    """Whether the last 2 x STEADY_SEGMENTS segments are steady: the classes every one of them
    requested (weighted by their share of the kernel's requests) have the same HBM read bytes
    per request byte in the last STEADY_SEGMENTS and in those before, within
    STEADY_TOLERANCE, and the segments' own ratios are tight enough for their mean's 95 %
    interval to be as close."""
    if len(segments) < MIN_SEGMENTS:
        return False
    window = segments[-2 * STEADY_SEGMENTS:]
    common = np.all([c[:, 2] > 0 for c in window], axis=0)
    weights = np.where(common, request_by_cls, 0.0)
    if weights.sum() <= 0:
        return False
    weights = weights / weights.sum()
    last = _ratio(window[STEADY_SEGMENTS:], weights)
    before = _ratio(window[:STEADY_SEGMENTS], weights)
    mean = (last + before) / 2
    if not (mean > 0 and abs(last - before) <= STEADY_TOLERANCE * mean):
        return False
    ratios = [_ratio([c], weights) for c in window]
    half = _t_quantile(len(ratios) - 1) * float(np.std(ratios, ddof=1)) / math.sqrt(len(ratios))
    return half <= STEADY_TOLERANCE * mean


def _tail_plan(segment, wave, pos, n_positions, moved_per_position, capacity_bytes):
    """(warm-up start, tail start) positions of the tail replay after a steady prefix ending at
    ``pos``, or None when skipping to it would save less than half of what is left. The tail
    is a wave's events (the last wave, partial or not, whose fewer CTAs share less); the
    warm-up is at least TAIL_WARMUP_SEGMENTS and long enough to move TAIL_WARMUP_TURNOVERS
    times the L2's capacity through HBM at the steady rate (``moved_per_position``): the
    stand-in lines are then gone, as the lines of the skipped waves would be."""
    warm = TAIL_WARMUP_SEGMENTS * segment
    if moved_per_position > 0:
        warm = max(warm, int(TAIL_WARMUP_TURNOVERS * capacity_bytes / moved_per_position))
    tail_begin = n_positions - wave
    warm_begin = tail_begin - warm
    if warm_begin - pos < (n_positions - pos) / 2:
        return None
    return warm_begin, tail_begin


def replay_kernel(ht: HeadTemplates, hardware, slots: int, sample: bool) -> KernelReplay:
    """The L2 replay of one kernel from its template, in bounded memory: every event (exact)
    or, with ``sample``, a prefix replayed wave by wave until the steady state, the tail after a
    warm-up, and the middle extrapolated (see the module docstring)."""
    t = ht.template
    kind = t["kind"]
    n_tensors = ht.offsets.shape[1] - 1
    cls = np.where(kind == COMPUTE, 0, t["tensor"].astype(np.int64) * 2 + (kind == STORE))
    n_cls = 2 * max(n_tensors, 1)
    lines = np.zeros(len(kind), dtype=np.int64)
    request = np.zeros(len(kind), dtype=np.int64)
    reps = t["reps"]
    _event_lines(kind, t["addr"], t["rows"], t["row_bytes"], t["row_stride"], reps,
                 t["addr_step"], hardware.l2_line_bytes, hardware.l2_sector_bytes, lines,
                 request)  # over every repetition
    heads = ht.heads
    per_head = int(reps.sum())  # the events one head runs
    n_positions = per_head * heads
    exact_counts = {
        "l2_read_bytes": int(request[kind == LOAD].sum()) * heads,
        "l2_write_bytes": int(request[kind == STORE].sum()) * heads,
        "l2_line_accesses": int(lines.sum()) * heads,
    }
    request_by_cls = np.bincount(cls, weights=request, minlength=n_cls) * heads
    if n_positions == 0:  # no CTA, no event: nothing reaches the L2
        counts = dict(exact_counts, hbm_read_bytes=0, hbm_write_bytes=0, l2_dirty_end_bytes=0)
        return KernelReplay(counts=counts, hbm_by_template_event=np.zeros(len(kind)))
    walker = _Walker(ht, hardware, slots, cls, n_cls)
    cph = len(t["cta_start"]) - 1
    n_slots = len(walker.slot_cta)
    # a segment: one wave's events (the resident CTAs' mean events each), or at most
    # SEGMENT_MAX_EVENTS of them
    wave = max(1, int(round(n_slots * per_head / max(cph, 1))))
    segment = min(wave, SEGMENT_MAX_EVENTS)
    is_store_cls = np.arange(n_cls) % 2 == 1
    # many heads: a head is the sampling unit (the heads the first wave ran are left out of
    # the steady ones); few: a wave, by HBM bytes per L2 request byte
    head_mode = heads >= HEAD_SAMPLING_MIN_HEADS and segment == wave
    first_steady_head = -(-n_slots // cph) + 1
    steady_heads = None
    # per segment: class counts; dirty sectors made (episodes); dirty bytes held at its end
    segments, episodes, held = [], [], []
    turned_over = None  # the first segment after the L2 turned over
    capacity_bytes = hardware.l2_sets * hardware.l2_associativity * hardware.l2_line_bytes
    replayed = np.zeros((n_cls, 3), dtype=np.int64)
    dirty_before = 0
    plan = None
    while walker.pos < n_positions:
        c = walker.run(min(n_positions, walker.pos + segment))
        dirty = walker.dirty_bytes()
        # dirty sectors made in the segment: those written back in it plus the change in
        # the dirty bytes held (each dirty sector is written back once: evicted, or at the end)
        episodes.append(c[:, 1].sum() + dirty - dirty_before)
        dirty_before = dirty
        held.append(dirty)
        segments.append(c)
        replayed += c
        if not sample:
            continue
        # steady only once the L2 has filled and turned over (before that no line has been
        # evicted and every dirty line stays: the state would not stand in for a later one)
        if replayed[:, 0].sum() + sum(episodes) < STEADY_TURNOVERS * capacity_bytes:
            continue
        if turned_over is None:
            turned_over = len(segments) - 1
        steady_heads = (_steady_heads(walker, first_steady_head, capacity_bytes)
                        if head_mode else None)
        if (steady_heads is not None and len(segments) > TAIL_WARMUP_SEGMENTS) or (
                not head_mode and _steady(segments, request_by_cls)):
            moved = (replayed[:, 0].sum() + sum(episodes)) / walker.pos
            plan = _tail_plan(segment, wave, walker.pos, n_positions, moved, capacity_bytes)
            if plan is not None:
                break
    counts = dict(exact_counts)
    if plan is None:  # every event replayed
        counts["hbm_read_bytes"] = int(replayed[:, 0].sum())
        counts["hbm_write_bytes"] = int(replayed[:, 1].sum())
        counts["l2_dirty_end_bytes"] = walker.dirty_bytes()
        read_by_cls = replayed[:, 0].astype(np.float64)
        write_by_cls = replayed[:, 1].astype(np.float64)
        stats = None
    else:
        middle_begin = walker.pos
        warm_begin, tail_begin = plan
        # skip the middle; the L2 keeps the steady state's lines: they stand in for the lines
        # the skipped waves would have left (as many, as old, as many of them dirty), which
        # the tail's warm-up ages and evicts as the full replay would
        walker.run(warm_begin, replay=False)
        walker.run(tail_begin, measure_from=n_positions)
        dirty_tail_begin = walker.dirty_bytes()
        tail_counts = walker.run(n_positions, measure_from=tail_begin)
        dirty_end = walker.dirty_bytes()
        counts["l2_dirty_end_bytes"] = dirty_end
        tail_episodes = tail_counts[:, 1].sum() + dirty_end - dirty_tail_begin
        edges = replayed + tail_counts
        rest = np.maximum(request_by_cls - edges[:, 2], 0.0)  # the middle's request bytes
        n_steady = len(segments) - 1 if head_mode else 2 * STEADY_SEGMENTS
        steady = np.stack(segments[-n_steady:])
        steady_episodes = np.asarray(episodes[-n_steady:], dtype=np.float64)
        l2_k = steady[:, :, 2].astype(np.float64)
        pooled_l2 = l2_k.sum(axis=0)
        # per steady segment, an estimate of the whole kernel's count
        read_ratio = np.divide(steady[:, :, 0], l2_k, out=np.zeros_like(l2_k), where=l2_k > 0)
        pooled_read = np.divide(steady[:, :, 0].sum(axis=0), pooled_l2, out=np.zeros(n_cls),
                                where=pooled_l2 > 0)
        # a class the steady segments never requested (the Q tiles a CTA loads once, at its
        # start, when the segments are parts of long waves): its ratio over every segment
        # replayed, the first wave's and the tail's
        over_all = np.divide(edges[:, 0], edges[:, 2], out=np.zeros(n_cls),
                             where=edges[:, 2] > 0)
        pooled_read = np.where(pooled_l2 > 0, pooled_read, over_all)
        read_ratio = np.where(l2_k > 0, read_ratio, pooled_read[None, :])
        def t_interval(per_k):  # the mean of per-segment estimates, and its 95 % half-width
            return float(per_k.mean()), (_t_quantile(len(per_k) - 1) * float(per_k.std(ddof=1))
                                         / math.sqrt(len(per_k)))

        reads = t_interval(edges[:, 0].sum() + read_ratio @ rest)
        if head_mode:
            # the middle's events are the template's, run by the heads not replayed there: each
            # template event's mean HBM read bytes over the replayed heads, times the heads it
            # was not replayed for; the interval from the spread of the steady heads' bytes
            seen = walker.tmpl_n > 0
            missing = np.where(seen, heads * reps - walker.tmpl_n, 0)
            middle = float(np.sum(walker.tmpl_read[seen] / walker.tmpl_n[seen] * missing[seen]))
            unseen = float(np.sum(np.where(seen, 0.0, request * pooled_read[cls]))) * heads
            mean, half = t_interval(steady_heads)
            reads = (float(edges[:, 0].sum()) + middle + unseen,
                     half * float(missing.sum()) / max(per_head, 1))
        store_k = l2_k[:, is_store_cls].sum(axis=1)
        store_rest = rest[is_store_cls].sum()
        # dirty bytes made per byte stored: pooled over the steady segments (a segment may
        # store nothing: its CTAs all in their loops), spread over those that store
        stores = store_k > 0
        pooled_episodes = (float(steady_episodes[stores].sum() / store_k[stores].sum())
                           if stores.any() else 0.0)
        if not stores.any():  # the steady segments stored nothing (the O tiles a CTA writes
            # at its end): the dirty bytes made per byte stored over every segment replayed
            stored = float(edges[is_store_cls, 2].sum())
            pooled_episodes = ((sum(episodes) + tail_episodes) / stored) if stored else 0.0
        # the dirty bytes made: the prefix's, the middle's (estimated) and the tail's; all but
        # those left at the end were written back during the kernel
        writes = (float(sum(episodes) + pooled_episodes * store_rest + tail_episodes
                        - dirty_end), 0.0)
        if stores.sum() > 1:
            per_k = steady_episodes[stores] / store_k[stores] * store_rest
            writes = (writes[0], t_interval(per_k)[1])
        # the dirty bytes left at the end come from the stand-in state: as uncertain as the
        # dirty bytes held from one steady segment to the next
        since = held[turned_over:]
        dirty_half = (_t_quantile(len(since) - 1) * float(np.std(since, ddof=1))
                      if len(since) > 1 else 0.0)
        writes = (writes[0], math.hypot(writes[1], dirty_half))
        intervals = {}
        for name, (mean, half) in (("hbm_read_bytes", reads), ("hbm_write_bytes", writes)):
            counts[name] = int(round(mean))
            intervals[name] = (max(mean - half, 0.0), mean + half)
        pooled_write = np.divide(steady[:, :, 1].sum(axis=0), pooled_l2, out=np.zeros(n_cls),
                                 where=pooled_l2 > 0)
        read_by_cls = edges[:, 0] + pooled_read * rest
        write_by_cls = edges[:, 1] + pooled_write * rest
        covered = (middle_begin + n_positions - warm_begin) / n_positions
        stats = SampleStats(segments=len(segments), covered_share=min(1.0, covered),
                            intervals=intervals)
    # each template event's HBM bytes read and written back (per repetition): the mean over
    # the heads and repetitions where it was replayed, else its request bytes times its
    # class's ratio; when sampled, each part scaled to the estimated total (the replayed heads
    # include the cold start's, which evict nothing and so write nothing back)
    seen = walker.tmpl_n > 0
    n_seen = np.maximum(walker.tmpl_n, 1)
    parts = []
    for by_cls, mean in ((read_by_cls, walker.tmpl_read / n_seen),
                         (write_by_cls, (walker.tmpl_hbm - walker.tmpl_read) / n_seen)):
        ratio = np.divide(by_cls, request_by_cls, out=np.zeros(n_cls),
                          where=request_by_cls > 0)
        part = np.where(seen, mean, np.where(kind == COMPUTE, 0.0, request / reps * ratio[cls]))
        parts.append(part)
    if stats is not None:
        for part, name in zip(parts, ("hbm_read_bytes", "hbm_write_bytes")):
            total = float(np.dot(part, reps)) * heads
            if total > 0:
                part *= counts[name] / total
    hbm = parts[0] + parts[1]
    return KernelReplay(counts=counts, hbm_by_template_event=hbm, stats=stats)


# ---- a whole simulation ----------------------------------------------------------------------
def _one_head_trace(ht: HeadTemplates, schedule, all_heads: bool):
    """A :class:`~iosim.trace.KernelTrace` of the template (one head's events) for the timed
    model: with ``all_heads`` its CTAs are every head's (``cta_start`` over all heads, as
    :func:`iosim.trace.build_trace` gives it; the event columns stay one head's)."""
    from .trace import _COLUMNS, KernelTrace

    t = ht.template
    shape = schedule.shape
    starts = t["cta_start"]
    heads = ht.heads if all_heads else 1
    per_head = len(t["kind"])
    cta_start = np.append((starts[:-1][None, :]
                           + per_head * np.arange(heads, dtype=np.int64)[:, None]).ravel(),
                          per_head * heads).astype(np.int64)
    if heads == 1:
        columns = {c: t[c] for c in _COLUMNS}
    else:  # the timed model reads one head's columns (``head``): placeholders of every
        # head's length that take no memory
        columns = {c: np.broadcast_to(np.zeros(1, dtype=t[c].dtype), (per_head * heads,))
                   for c in _COLUMNS}
    return KernelTrace(name=ht.kernel.name, cta_start=cta_start,
                       smem_bytes_per_cta=ht.kernel.smem_bytes(shape.head_dim, shape.seq_len),
                       kernel=ht.kernel, tensor_path=ht.kernel.tensor_path, head=t,
                       heads=heads, **columns)


def _timed(ht: HeadTemplates, schedule, hbm_by_template_event, hardware, occ):
    """The timed model of a kernel whose heads all see ``hbm_by_template_event``: one head's
    CTA demands, repeated for every head (memory: one head's events)."""
    from .timing import cta_demands, time_kernel

    shape = schedule.shape
    full = _one_head_trace(ht, schedule, all_heads=True)
    cph = len(ht.template["cta_start"]) - 1
    if getattr(ht.kernel, "producer_warps", 0) and ht.heads > 1 and cph < hardware.sm_count:
        # a producer's copies share the bandwidth of the SMs every head's CTAs keep busy, which
        # one head's CTAs alone would understate: the all-heads events (O(events) memory)
        return time_kernel(full, np.tile(hbm_by_template_event, ht.heads), hardware, shape,
                           occ)
    one = _one_head_trace(ht, schedule, all_heads=False)
    part = cta_demands(one, hbm_by_template_event, hardware, shape.dtype, occ)
    demand = {key: np.tile(value, ht.heads) for key, value in part.items()}
    return time_kernel(full, None, hardware, shape, occ, demand=demand)


def simulate_streamed(schedule, hardware, model: str, time_model: str, sample: bool = True):
    """:func:`iosim.simulate.simulate_schedule` without the all-heads trace: each kernel's
    one-head template is replayed for every head by :func:`replay_kernel` (sampled when
    ``sample`` and it is long enough), FLOPs, SRAM and L2 request bytes summed from the template
    exactly, and the timed model run on one head's demands repeated."""
    from .occupancy import occupancy
    from .simulate import KernelResult, _assemble, _finish, concurrent_ctas, \
        tile_traffic_by_tensor

    shape = schedule.shape
    names = tuple(t.name for t in schedule.tensors)
    kernels, timelines = [], {}
    for ht in head_templates(schedule):
        t, heads = ht.template, ht.heads
        occ = occupancy(ht.kernel, shape.head_dim, shape.seq_len, hardware)
        n_ctas = (len(t["cta_start"]) - 1) * heads
        slots = concurrent_ctas(occ, hardware, n_ctas)
        reps = t["reps"]
        counts = np.zeros(len(engine.COUNTERS), dtype=np.int64)  # over every repetition
        engine.sum_events(t["kind"], t["rows"], t["row_bytes"], t["flops_tensor"],
                          t["flops_scalar"], t["sram_read"], t["sram_write"], counts, reps)
        row = {name: int(counts[i]) * heads for i, name in enumerate(engine.COUNTERS)}
        stats = None
        if model == "l2":
            replayed = replay_kernel(ht, hardware, slots, sample)
            row.update(replayed.counts)
            hbm = replayed.hbm_by_template_event
            stats = replayed.stats
        else:  # two-level: every tile moved is HBM traffic
            hbm = np.where(t["kind"] == COMPUTE, 0.0,
                           (t["rows"] * t["row_bytes"]).astype(np.float64))
        one = _one_head_trace(ht, schedule, all_heads=False)
        tensors = {name: {key: value * heads for key, value in moved.items()}
                   for name, moved in tile_traffic_by_tensor(one, names, reps).items()}
        row.update(name=ht.kernel.name, ctas=n_ctas, concurrent_ctas=slots,
                   phase=ht.kernel.phase, special_ops=int(np.dot(t["special_ops"], reps)) * heads,
                   tensor_path=ht.kernel.tensor_path, tensors=tensors,
                   sampled=stats is not None,
                   intervals={k: [float(lo), float(hi)] for k, (lo, hi)
                              in (stats.intervals.items() if stats else ())})
        timed = _timed(ht, schedule, hbm, hardware, occ)
        timelines[ht.kernel.name] = timed
        kernels.append(_finish(KernelResult(**row), timed, hardware, shape.dtype, model,
                               time_model))
    return _assemble(schedule, kernels, timelines, hardware, model, time_model)
