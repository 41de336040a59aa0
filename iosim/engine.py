"""The replay engine: Numba loops over a kernel's event arrays (see :mod:`iosim.trace`).

Two memory models:

* ``two_level`` — the FlashAttention paper's: HBM and an SRAM per thread block. Every tile that
  enters SRAM is HBM read bytes; every tile written back is HBM write bytes.
* ``l2`` — CTAs run concurrently (``slots`` at a time, a finishing CTA's slot taking the next CTA
  in launch order) and their tile accesses interleave, one tile per CTA in turn; a
  set-associative, LRU, write-back, write-allocate L2 with line/sector granularity sits between
  SRAM and HBM. HBM reads are the sectors that miss; HBM writes are dirty sectors evicted or
  flushed at the end of the kernel. The L2 starts each kernel cold and is flushed at its end,
  as Nsight Compute's default cache control does when it measures a kernel.

Counter layout of the ``counts`` array every function fills (int64): see ``COUNTERS``.
"""
from __future__ import annotations

import numpy as np
from numba import njit

COUNTERS = ("hbm_read_bytes", "hbm_write_bytes", "l2_read_bytes", "l2_write_bytes",
            "sram_read_bytes", "sram_write_bytes", "flops_tensor", "flops_scalar",
            "l2_line_accesses")
HBM_READ, HBM_WRITE, L2_READ, L2_WRITE, SRAM_READ, SRAM_WRITE, FLOPS_TENSOR, FLOPS_SCALAR, \
    LINE_ACCESSES = range(len(COUNTERS))

LOAD, STORE, COMPUTE = 0, 1, 2

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


@njit(cache=True)
def sum_events(kind, rows, row_bytes, flops_tensor, flops_scalar, sram_read, sram_write,
               counts):
    """The two-level model and the FLOP/SRAM counts common to both models."""
    for e in range(kind.shape[0]):
        nbytes = rows[e] * row_bytes[e]
        if kind[e] == LOAD:
            counts[HBM_READ] += nbytes
        elif kind[e] == STORE:
            counts[HBM_WRITE] += nbytes
        counts[FLOPS_TENSOR] += flops_tensor[e]
        counts[FLOPS_SCALAR] += flops_scalar[e]
        counts[SRAM_READ] += sram_read[e]
        counts[SRAM_WRITE] += sram_write[e]


@njit(cache=True, inline="always")
def _set_of(line, n_sets, inv_sets):
    """Hash a line number to a set: XOR-fold the upper bits into the lower ones (as GPUs hash
    L2 addresses, so that power-of-two strides spread over the sets) and reduce modulo the set
    count. Neighbouring lines stay in neighbouring sets, which keeps the replay cache-friendly.
    The modulo goes through a float reciprocal (``inv_sets`` = 1/n_sets), much cheaper than an
    integer division, corrected to the exact remainder."""
    folded = line ^ (line >> 11) ^ (line >> 19)
    r = folded - np.int64(folded * inv_sets) * n_sets
    if r < 0:
        r += n_sets
    elif r >= n_sets:
        r -= n_sets
    return r


# Each set keeps its ways in recency order (most recent first), so the least recently used
# way is always the last. A way's state packs its line number (tag), dirty sectors and valid sectors into one int64:
# tag << 16 | dirty << 8 | valid. An empty way holds -1, whose tag (-1) matches no line.
_TAG_SHIFT = 16
_DIRTY_SHIFT = 8
_SECTOR_MASK = 0xFF


@njit(cache=True)
def replay_l2(cta_start, kind, addr, rows, row_bytes, row_stride, slots, n_sets, assoc,
              line_bytes, sector_bytes, counts, event_counts):
    """Replay one kernel through a cold L2; add its traffic to ``counts``.

    ``event_counts[e]`` receives the HBM bytes read (column 0) and written back (column 1) by
    event e; write-backs at the final flush are not attributed to an event."""
    popcount = _POPCOUNT
    n_lines = n_sets * assoc
    state = np.full(n_lines, -1, dtype=np.int64)
    line_shift = 0
    while (1 << line_shift) < line_bytes:
        line_shift += 1
    sector_shift = 0
    while (1 << sector_shift) < sector_bytes:
        sector_shift += 1
    n_ctas = cta_start.shape[0] - 1
    n_slots = min(slots, n_ctas)
    slot_cta = np.empty(n_slots, dtype=np.int64)
    slot_event = np.empty(n_slots, dtype=np.int64)
    for s in range(n_slots):
        slot_cta[s] = s
        slot_event[s] = cta_start[s]
    next_cta = n_slots
    active = n_slots
    inv_sets = 1.0 / n_sets
    hbm_read = 0
    hbm_write = 0
    l2_read = 0
    l2_write = 0
    line_accesses = 0
    while active > 0:
        for s in range(n_slots):
            c = slot_cta[s]
            if c < 0:
                continue
            e = slot_event[s]
            while e >= cta_start[c + 1]:  # this CTA is done: the slot takes the next one
                if next_cta < n_ctas:
                    c = next_cta
                    next_cta += 1
                    e = cta_start[c]
                else:
                    c = -1
                    break
            slot_cta[s] = c
            if c < 0:
                active -= 1
                continue
            slot_event[s] = e + 1
            k = kind[e]
            if k == COMPUTE:
                continue
            is_write = k == STORE
            event_read = 0
            event_write = 0
            for r in range(rows[e]):
                start = addr[e] + r * row_stride[e]
                end = start + row_bytes[e]
                first_line = start >> line_shift
                last_line = (end - 1) >> line_shift
                for line in range(first_line, last_line + 1):
                    line_start = line << line_shift
                    lo = max(start, line_start) - line_start
                    hi = min(end, line_start + line_bytes) - 1 - line_start
                    s0 = lo >> sector_shift
                    s1 = hi >> sector_shift
                    mask = ((1 << (s1 + 1)) - 1) ^ ((1 << s0) - 1)
                    line_accesses += 1
                    # look the line up in its set, whose ways are kept most recent first
                    base = _set_of(line, n_sets, inv_sets) * assoc
                    hit = -1  # a sum over the ways (at most one matches) vectorises
                    for w in range(assoc):
                        hit += (w + 1) * ((state[base + w] >> _TAG_SHIFT) == line)
                    if hit < 0:  # miss: the last way is the least recently used; evict it
                        pos = assoc - 1
                        old = state[base + pos]
                        if old >= 0:
                            old_dirty = (old >> _DIRTY_SHIFT) & _SECTOR_MASK
                            if old_dirty != 0:
                                event_write += popcount[old_dirty] * sector_bytes
                        cur = line << _TAG_SHIFT
                    else:
                        pos = hit
                        cur = state[base + pos]
                    nbytes = popcount[mask] * sector_bytes
                    if is_write:
                        cur |= mask | (mask << _DIRTY_SHIFT)
                        l2_write += nbytes
                    else:
                        missing = mask & ~cur & _SECTOR_MASK
                        if missing != 0:
                            event_read += popcount[missing] * sector_bytes
                        cur |= mask
                        l2_read += nbytes
                    for w in range(pos, 0, -1):  # move to the front
                        state[base + w] = state[base + w - 1]
                    state[base] = cur
            event_counts[e, 0] = event_read
            event_counts[e, 1] = event_write
            hbm_read += event_read
            hbm_write += event_write
    for w in range(n_lines):  # end of kernel: write back what is dirty
        if state[w] >= 0:
            hbm_write += popcount[(state[w] >> _DIRTY_SHIFT) & _SECTOR_MASK] * sector_bytes
    counts[HBM_READ] += hbm_read
    counts[HBM_WRITE] += hbm_write
    counts[L2_READ] += l2_read
    counts[L2_WRITE] += l2_write
    counts[LINE_ACCESSES] += line_accesses
