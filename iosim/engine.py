"""The replay engine: Numba loops over a kernel's event arrays (see :mod:`iosim.trace`).

Two memory models:

* ``two_level`` — the FlashAttention paper's: HBM and an SRAM per thread block. Every tile that
  enters SRAM is HBM read bytes; every tile written back is HBM write bytes.
* ``l2`` — CTAs run concurrently (``slots`` at a time, a finishing CTA's slot taking the next CTA
  in launch order) and their tile accesses interleave, one tile per CTA in turn; a
  set-associative, LRU, write-back, write-allocate L2 with line/sector granularity sits between
  SRAM and HBM. HBM reads are the sectors that miss; HBM writes are the dirty sectors evicted
  while the kernel runs. Dirty sectors still in the L2 when the kernel ends reach HBM only
  afterwards: they are counted apart, as ``l2_dirty_end_bytes``. The L2 starts each kernel
  cold, as Nsight Compute's default cache control makes it when it measures a kernel (ncu's
  ``dram__bytes_write`` for a kernel likewise misses what is still dirty at its end).

Counter layout of the ``counts`` array every function fills (int64): see ``COUNTERS``.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

from ._numba import njit_cached

COUNTERS = ("hbm_read_bytes", "hbm_write_bytes", "l2_read_bytes", "l2_write_bytes",
            "sram_read_bytes", "sram_write_bytes", "flops_tensor", "flops_scalar",
            "l2_line_accesses", "l2_dirty_end_bytes")
HBM_READ, HBM_WRITE, L2_READ, L2_WRITE, SRAM_READ, SRAM_WRITE, FLOPS_TENSOR, FLOPS_SCALAR, \
    LINE_ACCESSES, L2_DIRTY_END = range(len(COUNTERS))

LOAD, STORE, COMPUTE = 0, 1, 2

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


@njit_cached
def sum_events(kind, rows, row_bytes, flops_tensor, flops_scalar, sram_read, sram_write,
               counts, reps=None):
    """The two-level model and the FLOP/SRAM counts common to both models; ``reps``: how many
    times each event runs (a compressed template, :mod:`iosim.trace_fast`), else once."""
    for e in range(kind.shape[0]):
        w = 1 if reps is None else reps[e]
        nbytes = rows[e] * row_bytes[e] * w
        if kind[e] == LOAD:
            counts[HBM_READ] += nbytes
        elif kind[e] == STORE:
            counts[HBM_WRITE] += nbytes
        counts[FLOPS_TENSOR] += flops_tensor[e] * w
        counts[FLOPS_SCALAR] += flops_scalar[e] * w
        counts[SRAM_READ] += sram_read[e] * w
        counts[SRAM_WRITE] += sram_write[e] * w


@njit_cached(inline="always")
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


@njit_cached(inline="always")
def _row_lines(start, end, full_bits, event, n, chunk_line, chunk_bits, chunk_set, chunk_event,
               n_sets, inv_sets, line_shift, sector_shift, line_offset_mask):
    """Append the line accesses of one row segment [start, end) of an event to the chunk at
    ``n``: every line whole first (a loop that vectorises), then the sectors the row leaves
    out of its first and last lines taken off. Returns the new ``n`` and the sectors the row
    touches (its L2 request)."""
    first_line = start >> line_shift
    count = ((end - 1) >> line_shift) - first_line + 1
    for j in range(count):
        chunk_line[n + j] = first_line + j
        chunk_bits[n + j] = full_bits
        chunk_set[n + j] = _set_of(first_line + j, n_sets, inv_sets)
        chunk_event[n + j] = event
    keep = ~((1 << ((start & line_offset_mask) >> sector_shift)) - 1)
    chunk_bits[n] &= keep & (keep << _DIRTY_SHIFT | _SECTOR_MASK)
    n += count
    keep = (2 << (((end - 1) & line_offset_mask) >> sector_shift)) - 1
    chunk_bits[n - 1] &= keep | (keep << _DIRTY_SHIFT)
    return n, ((end - 1) >> sector_shift) - (start >> sector_shift) + 1


# A way's contents pack its line number (tag), dirty sectors and valid sectors into one int64:
# tag << 16 | dirty << 8 | valid. An empty way holds -1, whose tag (-1) matches no line.
# ``state`` is 2-D (set, way): a set's ways are one contiguous row. With at most 16 ways that row
# is scanned by one vector compare (``_match``); a loop over a flat array with a computed index
# had Numba's negative-index wraparound turn the scan into AVX-512 gathers, several times slower.
_TAG_SHIFT = 16
_DIRTY_SHIFT = 8
_SECTOR_MASK = 0xFF

# Recency (true LRU). With at most 16 ways, ways never move: each set's recency order is one
# int64, a list of way numbers in 4-bit fields, most recently used first (field p holds the way
# at recency position p). A miss takes the way in the last field (the least recently used;
# empty ways start last, so they fill before any line is evicted) and shifts the list up one
# field; a hit finds its way's field with a SWAR zero-nibble search and moves it to the front
# with two masks and a shift. With more ways, each set's ways are themselves kept in recency
# order (the last is the least recently used) and moved to the front on every access.
_MAX_PACKED_WAYS = 16
_WAY_BITS = 4
_NIBBLE_ONES = np.int64(0x1111111111111111)
_NIBBLE_HIGHS = np.int64(0x8888888888888888 - (1 << 64))
_NIBBLE = np.int64(0xF)

# The replay runs in two passes over chunks of the access stream (which events run in which
# order does not depend on the cache's contents): the first computes each line access's line,
# sector bits and set (and the L2 byte totals); the second runs them through the cache,
# prefetching the set
# ``_PREFETCH_AHEAD`` accesses ahead so that its row is in the host's cache when it is needed.
_CHUNK_ACCESSES = 4096
_PREFETCH_AHEAD = 16


@intrinsic
def _prefetch(typingctx, arr, index):
    """Hint the host CPU to fetch ``arr[index]`` into its caches (``llvm.prefetch``)."""
    if not isinstance(arr, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]],
                                       wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        # read, highest temporal locality, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, index), codegen


def _make_match(width):
    """An intrinsic ``match(ways, index, line)``: an int64 whose bit w is set where
    ``ways[index + w] >> _TAG_SHIFT == line``, for w < ``width``: the tag scan of a whole set as
    one vector compare (LLVM vector IR; with AVX-512, two loads-and-shifts and two compares for
    16 ways), where a loop over a runtime way count vectorised only 4 wide."""
    @intrinsic
    def match(typingctx, arr, index, line):
        if not (isinstance(arr, types.Array) and arr.dtype == types.int64
                and arr.layout == "C" and isinstance(index, types.Integer)
                and isinstance(line, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]],
                                           wraparound=False)
            i64 = ir.IntType(64)
            vec = ir.VectorType(i64, width)
            ways = builder.load(builder.bitcast(ptr, vec.as_pointer()), align=8)
            tags = builder.ashr(ways, ir.Constant(vec, [_TAG_SHIFT] * width))
            want = context.cast(builder, args[2], sig.args[2], types.int64)
            i32 = ir.IntType(32)
            undef = ir.Constant(vec, ir.Undefined)
            one = builder.insert_element(undef, want, ir.Constant(i32, 0))
            splat = builder.shuffle_vector(one, undef,
                                           ir.Constant(ir.VectorType(i32, width), [0] * width))
            eq = builder.icmp_signed("==", tags, splat)
            return builder.zext(builder.bitcast(eq, ir.IntType(width)), i64)
        return types.int64(arr, index, line), codegen
    return match

_match4 = _make_match(4)
_match8 = _make_match(8)
_match16 = _make_match(16)


@njit_cached
def _initial_order(assoc):
    """The recency list of a cold set: way p at position p (so the last way is taken first)."""
    order = np.int64(0)
    for p in range(min(assoc, _MAX_PACKED_WAYS)):
        order |= np.int64(p) << (_WAY_BITS * p)
    return order


@njit_cached
def _log2(n):
    shift = 0
    while (1 << shift) < n:
        shift += 1
    return shift


@njit_cached
def interleave(cta_start, slots):
    """The order in which the events run: ``slots`` CTAs at a time, one event each in turn;
    a slot whose CTA is done takes the next CTA in launch order (and runs its first event in
    that same turn)."""
    n_ctas = cta_start.shape[0] - 1
    n_slots = min(slots, n_ctas)
    order = np.empty(cta_start[n_ctas] - cta_start[0] if n_ctas > 0 else 0, dtype=np.int64)
    slot_cta = np.empty(n_slots, dtype=np.int64)
    slot_event = np.empty(n_slots, dtype=np.int64)
    for s in range(n_slots):
        slot_cta[s] = s
        slot_event[s] = cta_start[s]
    next_cta = n_slots
    active = n_slots
    n = 0
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
            order[n] = e
            n += 1
    return order[:n]


@njit_cached(inline="always")
def _match(flat_state, set_index, assoc, line):
    """Bit w set where way w of the set holds ``line`` (at most one does)."""
    if assoc == 16:
        return _match16(flat_state, set_index * 16, line)
    if assoc == 8:
        return _match8(flat_state, set_index * 8, line)
    if assoc == 4:
        return _match4(flat_state, set_index * 4, line)
    matches = 0
    for w in range(assoc):
        if (flat_state[set_index * assoc + w] >> _TAG_SHIFT) == line:
            matches = np.int64(1) << w
    return matches


@njit_cached
def _run_packed(n, chunk_line, chunk_bits, chunk_set, chunk_event, flat_state, order_of_set,
                assoc, sector_bytes, event_counts):
    """Pass 2 with at most 16 ways: ``n`` line accesses through the cache, recency kept in
    ``order_of_set`` (see the note on recency above)."""
    popcount = _POPCOUNT
    if assoc >= _MAX_PACKED_WAYS:
        order_mask = np.int64(-1)
    else:
        order_mask = (np.int64(1) << (_WAY_BITS * assoc)) - 1
    lru_shift = _WAY_BITS * (assoc - 1)
    for i in range(n):
        if i + _PREFETCH_AHEAD < n:
            _prefetch(flat_state, chunk_set[i + _PREFETCH_AHEAD] * assoc)
        line = chunk_line[i]
        set_index = chunk_set[i]
        matches = _match(flat_state, set_index, assoc, line)
        order = order_of_set[set_index]
        if matches == 0:  # miss: the way in the last field is the LRU one; evict its line
            pos = (order >> lru_shift) & _NIBBLE
            order_of_set[set_index] = ((order << _WAY_BITS) | pos) & order_mask
            way = set_index * assoc + pos
            old = flat_state[way]
            if old >= 0:
                old_dirty = (old >> _DIRTY_SHIFT) & _SECTOR_MASK
                if old_dirty != 0:
                    event_counts[chunk_event[i], 1] += popcount[old_dirty] * sector_bytes
            cur = line << _TAG_SHIFT
        else:  # hit: move the way's field to the front
            pos = trailing_zeros(matches)
            x = order ^ (pos * _NIBBLE_ONES)
            field = trailing_zeros((x - _NIBBLE_ONES) & ~x & _NIBBLE_HIGHS) & ~3
            ahead = (np.int64(1) << field) - 1
            order_of_set[set_index] = ((order & ~(ahead | (_NIBBLE << field)))
                                       | ((order & ahead) << _WAY_BITS) | pos)
            way = set_index * assoc + pos
            cur = flat_state[way]
        bits = chunk_bits[i]
        if bits >> _DIRTY_SHIFT == 0:  # a read: fetch the sectors not valid
            missing = bits & ~cur & _SECTOR_MASK
            if missing != 0:
                event_counts[chunk_event[i], 0] += popcount[missing] * sector_bytes
        flat_state[way] = cur | bits


@njit_cached
def _run_move_to_front(n, chunk_line, chunk_bits, chunk_set, chunk_event, state, sector_bytes,
                       event_counts):
    """Pass 2 with more than 16 ways: each set's ways kept in recency order, moved to front."""
    popcount = _POPCOUNT
    assoc = state.shape[1]
    for i in range(n):
        line = chunk_line[i]
        ways = state[chunk_set[i]]
        pos = assoc - 1  # the least recently used, unless the line is here
        hit = False
        for w in range(assoc):
            if (ways[w] >> _TAG_SHIFT) == line:
                pos = w
                hit = True
        if hit:
            cur = ways[pos]
        else:
            old = ways[pos]
            if old >= 0:
                old_dirty = (old >> _DIRTY_SHIFT) & _SECTOR_MASK
                if old_dirty != 0:
                    event_counts[chunk_event[i], 1] += popcount[old_dirty] * sector_bytes
            cur = line << _TAG_SHIFT
        bits = chunk_bits[i]
        if bits >> _DIRTY_SHIFT == 0:  # a read: fetch the sectors not valid
            missing = bits & ~cur & _SECTOR_MASK
            if missing != 0:
                event_counts[chunk_event[i], 0] += popcount[missing] * sector_bytes
        for w in range(pos, 0, -1):
            ways[w] = ways[w - 1]
        ways[0] = cur | bits


@njit_cached
def _chunk_scratch(kind, rows, row_bytes, line_bytes):
    """Scratch for one chunk of line accesses (a chunk ends after the event that fills it):
    _CHUNK_ACCESSES plus the most lines one event can touch. Returns (line, sector bits to set
    in the line's state, set (unsigned: no negative-index wraparound), event) arrays."""
    line_shift = _log2(line_bytes)
    most = 0
    for e in range(kind.shape[0]):
        if kind[e] != COMPUTE:
            most = max(most, rows[e] * (((row_bytes[e] + line_bytes - 1) >> line_shift) + 1))
    capacity = _CHUNK_ACCESSES + most
    return (np.empty(capacity, dtype=np.int64), np.empty(capacity, dtype=np.int64),
            np.empty(capacity, dtype=np.uint64), np.empty(capacity, dtype=np.int64))


@njit_cached
def replay_l2(cta_start, kind, addr, rows, row_bytes, row_stride, slots, n_sets, assoc,
              line_bytes, sector_bytes, counts, event_counts):
    """Replay one kernel through a cold L2; add its traffic to ``counts``.

    ``event_counts[e]`` receives the HBM bytes read (column 0) and written back (column 1) by
    event e; dirty data left at the end goes to ``counts[L2_DIRTY_END]``, not to an event."""
    popcount = _POPCOUNT
    state = np.full((n_sets, assoc), -1, dtype=np.int64)
    flat_state = state.reshape(n_sets * assoc)
    packed = assoc <= _MAX_PACKED_WAYS
    order_of_set = np.full(n_sets if packed else 0, _initial_order(assoc), dtype=np.int64)
    line_shift = _log2(line_bytes)
    sector_shift = _log2(sector_bytes)
    inv_sets = 1.0 / n_sets

    chunk_line, chunk_bits, chunk_set, chunk_event = _chunk_scratch(kind, rows, row_bytes,
                                                                    line_bytes)
    full_mask = (1 << (line_bytes >> sector_shift)) - 1
    line_offset_mask = line_bytes - 1

    event_order = interleave(cta_start, slots)
    hbm_read = 0
    hbm_write = 0
    l2_read = 0
    l2_write = 0
    line_accesses = 0
    next_event = 0
    while next_event < event_order.shape[0]:
        # pass 1: the line accesses of the next events, in order
        n = 0
        while next_event < event_order.shape[0] and n < _CHUNK_ACCESSES:
            e = event_order[next_event]
            next_event += 1
            event_counts[e, 0] = 0
            event_counts[e, 1] = 0
            k = kind[e]
            if k == COMPUTE or row_bytes[e] <= 0:  # an empty tile touches no line
                continue
            is_write = k == STORE
            # a read fetches the sectors it touches; a write marks them valid and dirty
            full_bits = (full_mask | (full_mask << _DIRTY_SHIFT)) if is_write else full_mask
            for r in range(rows[e]):
                start = addr[e] + r * row_stride[e]
                n, touched = _row_lines(start, start + row_bytes[e], full_bits, e, n,
                                        chunk_line, chunk_bits, chunk_set, chunk_event, n_sets,
                                        inv_sets, line_shift, sector_shift, line_offset_mask)
                if is_write:
                    l2_write += touched * sector_bytes
                else:
                    l2_read += touched * sector_bytes
        line_accesses += n
        # pass 2: run them through the cache
        if packed:
            _run_packed(n, chunk_line, chunk_bits, chunk_set, chunk_event, flat_state,
                        order_of_set, assoc, sector_bytes, event_counts)
        else:
            _run_move_to_front(n, chunk_line, chunk_bits, chunk_set, chunk_event, state,
                               sector_bytes, event_counts)
    for e in range(event_order.shape[0]):
        hbm_read += event_counts[event_order[e], 0]
        hbm_write += event_counts[event_order[e], 1]
    dirty_end = 0
    for i in range(n_sets):  # end of kernel: what is still dirty reaches HBM later
        for w in range(assoc):
            if state[i, w] >= 0:
                dirty_end += popcount[(state[i, w] >> _DIRTY_SHIFT) & _SECTOR_MASK] * sector_bytes
    counts[HBM_READ] += hbm_read
    counts[HBM_WRITE] += hbm_write
    counts[L2_READ] += l2_read
    counts[L2_WRITE] += l2_write
    counts[LINE_ACCESSES] += line_accesses
    counts[L2_DIRTY_END] += dirty_end
