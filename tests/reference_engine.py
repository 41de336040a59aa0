"""A deliberately plain pure-Python L2 replay, the oracle the Numba engine is tested against.

Written apart from :mod:`iosim.engine` and as simply as possible, so that a bug in one is
unlikely to be the same bug in the other. It models the same thing:

* CTAs run ``slots`` at a time. In every round each slot, in slot order, runs one event (a
  LOAD, a STORE or a COMPUTE — a COMPUTE event moves no bytes but still takes the slot's turn)
  of its CTA. A slot whose CTA has no event left first takes the next CTA in launch order (the
  new CTA's first event runs in that same turn); when none is left the slot stays idle.
* A tile is ``rows`` row segments of ``row_bytes`` bytes, ``row_stride`` apart from ``addr``.
  Each row touches a run of sectors (none if ``row_bytes`` is 0); the sectors of one row that
  fall in one line are one L2 line access (rows are processed in order, lines in increasing
  address within a row).
* The L2 is set-associative with true LRU replacement. The set of a line number is
  ``(line ^ (line >> 11) ^ (line >> 19)) % n_sets`` (this hash is part of the model). Every line
  keeps which of its sectors are valid and which are dirty.
* A read access fetches from HBM the touched sectors that are not valid. A write access makes
  the touched sectors valid and dirty without fetching anything (write-allocate at sector
  granularity). A miss on a full set evicts the least recently used line; its dirty sectors are
  written back to HBM and counted on the event whose access caused the eviction.
* The L2 starts cold; at the end the dirty sectors of every resident line are written back
  (counted in the totals, not on any event).
"""
from __future__ import annotations

from collections import OrderedDict

LOAD, STORE, COMPUTE = 0, 1, 2


def set_index(line: int, n_sets: int) -> int:
    """The set a line number maps to: XOR-fold of the upper bits, then modulo the set count."""
    return (line ^ (line >> 11) ^ (line >> 19)) % n_sets


def interleaved_events(cta_start, slots: int):
    """Yield event indices in the order the resident CTAs run them (round robin by slot)."""
    n_ctas = len(cta_start) - 1
    # each slot is [cta, next event] or None once idle
    slot_list = [[c, cta_start[c]] for c in range(min(slots, n_ctas))]
    next_cta = len(slot_list)
    while any(slot is not None for slot in slot_list):
        for i in range(len(slot_list)):
            slot = slot_list[i]
            if slot is None:
                continue
            cta, event = slot
            while event >= cta_start[cta + 1]:  # this CTA is finished
                if next_cta < n_ctas:
                    cta, event = next_cta, cta_start[next_cta]
                    next_cta += 1
                else:
                    cta = None
                    break
            if cta is None:
                slot_list[i] = None
                continue
            slot_list[i] = [cta, event + 1]
            yield event


def line_accesses_of_row(start: int, nbytes: int, line_bytes: int, sector_bytes: int):
    """The (line number, set of sector indices within the line) accesses of one row segment."""
    accesses = []
    if nbytes <= 0:  # an empty row touches nothing
        return accesses
    first_sector = start // sector_bytes
    last_sector = (start + nbytes - 1) // sector_bytes
    sectors_per_line = line_bytes // sector_bytes
    for sector in range(first_sector, last_sector + 1):
        line = sector // sectors_per_line
        if not accesses or accesses[-1][0] != line:
            accesses.append((line, set()))
        accesses[-1][1].add(sector % sectors_per_line)
    return accesses


class PlainL2:
    """Sets of ``OrderedDict`` line -> {"valid": set, "dirty": set}, least recent first."""

    def __init__(self, n_sets: int, assoc: int, line_bytes: int, sector_bytes: int):
        self.n_sets, self.assoc = n_sets, assoc
        self.line_bytes, self.sector_bytes = line_bytes, sector_bytes
        self.sets = [OrderedDict() for _ in range(n_sets)]

    def access(self, line: int, sectors: set, is_write: bool) -> tuple[int, int]:
        """One line access; returns (HBM bytes read, HBM bytes written back by an eviction)."""
        lines = self.sets[set_index(line, self.n_sets)]
        written_back = 0
        if line in lines:
            lines.move_to_end(line)  # now the most recently used
        else:
            if len(lines) == self.assoc:
                _, victim = lines.popitem(last=False)  # the least recently used
                written_back = len(victim["dirty"]) * self.sector_bytes
            lines[line] = {"valid": set(), "dirty": set()}
        state = lines[line]
        read = 0
        if is_write:
            state["valid"] |= sectors
            state["dirty"] |= sectors
        else:
            read = len(sectors - state["valid"]) * self.sector_bytes
            state["valid"] |= sectors
        return read, written_back

    def flush(self) -> int:
        """Write back every dirty sector; returns the bytes written."""
        total = 0
        for lines in self.sets:
            for state in lines.values():
                total += len(state["dirty"]) * self.sector_bytes
            lines.clear()
        return total


def reference_replay_l2(cta_start, kind, addr, rows, row_bytes, row_stride, slots: int,
                        n_sets: int, assoc: int, line_bytes: int, sector_bytes: int):
    """Replay one kernel's events through a cold L2.

    Returns ``(totals, event_counts)``: totals is a dict with hbm_read_bytes, hbm_write_bytes,
    l2_read_bytes, l2_write_bytes, l2_line_accesses and l2_dirty_end_bytes (dirty data still in
    the L2 at the end, written back only after the kernel); event_counts a list with one
    [HBM bytes read, HBM bytes written back] pair per event."""
    cta_start = [int(x) for x in cta_start]
    l2 = PlainL2(n_sets, assoc, line_bytes, sector_bytes)
    totals = dict(hbm_read_bytes=0, hbm_write_bytes=0, l2_read_bytes=0, l2_write_bytes=0,
                  l2_line_accesses=0, l2_dirty_end_bytes=0)
    event_counts = [[0, 0] for _ in range(len(kind))]
    for e in interleaved_events(cta_start, slots):
        if kind[e] == COMPUTE:
            continue
        is_write = kind[e] == STORE
        for r in range(int(rows[e])):
            start = int(addr[e]) + r * int(row_stride[e])
            for line, sectors in line_accesses_of_row(start, int(row_bytes[e]), line_bytes,
                                                      sector_bytes):
                totals["l2_line_accesses"] += 1
                touched = len(sectors) * sector_bytes
                if is_write:
                    totals["l2_write_bytes"] += touched
                else:
                    totals["l2_read_bytes"] += touched
                read, written_back = l2.access(line, sectors, is_write)
                event_counts[e][0] += read
                event_counts[e][1] += written_back
    for read, written_back in event_counts:
        totals["hbm_read_bytes"] += read
        totals["hbm_write_bytes"] += written_back
    totals["l2_dirty_end_bytes"] = l2.flush()
    return totals, event_counts
