"""What a simulation will cost, estimated before anything is built, and a budget to refuse it.

The trace of a schedule has one event per op per CTA run; it is built for one batch·head
(:mod:`iosim.trace_fast`) and repeated with NumPy for the others, then replayed. The estimate
counts the events from the program's structure alone (loops times their trip counts, halved
for causal skipping), without walking it, and turns them into memory and seconds with the
per-event figures below (measured on this project's 2-core development machine with
``benchmarks/timing_cost.py``; rough by design: they say whether a run takes seconds or
hours, and whether it fits in memory).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import IosimError
from .schedule import Loop, n_blocks

#: Bytes each event of the full trace occupies at the peak (its columns, the replay's per-event
#: counts, the timing model's per-event HBM bytes, and NumPy temporaries while tiling): the
#: explorer example's largest pair (flash2 16 x 16, 59 M events) peaked at 5.9 GB.
BYTES_PER_EVENT = 100
#: Bytes each event of the one-head template occupies while it is built (NumPy columns and
#: their temporaries, iosim.trace_fast).
BYTES_PER_TEMPLATE_EVENT = 200
#: Seconds per template event (built with NumPy: 395 k events in 0.023 s for flash2 16 x 16 at
#: N = 4096, benchmarks/trace_speed.py) and per trace event (tiling, the L2 replay and the
#: timed model).
SECONDS_PER_TEMPLATE_EVENT = 1e-7
SECONDS_PER_EVENT = 3e-7
#: A streamed simulation (iosim.sampling) holds the one-head *compressed* template (an
#: innermost loop's iterations kept three times at most; with the timed model's per-event
#: arrays of one head) and a few arrays per CTA, never the all-heads events; each event it
#: replays costs the walker 6e-8 s (16 x 16 tiles) to 2.6e-7 s (64 x 128 tiles)
#: (benchmarks/sampling_speed.py): the larger figure, an upper bound. A sampled run replays a
#: prefix, a warm-up and a tail of each kernel (about SAMPLED_SEGMENTS segments of at most
#: iosim.sampling.SEGMENT_MAX_EVENTS) and walks the rest without replaying it, at
#: SECONDS_PER_SKIPPED_EVENT (flash2 N = 1,048,576: 420 M events in 1.5 s).
BYTES_PER_STREAMED_TEMPLATE_EVENT = 400
BYTES_PER_CTA = 200
SECONDS_PER_STREAMED_EVENT = 2.6e-7
SECONDS_PER_SKIPPED_EVENT = 4e-9
SAMPLED_SEGMENTS = 16

def _half_the_memory() -> int:
    """Half of this machine's physical memory (8 GiB where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


#: A simulation estimated to take longer says its estimate on stderr before it starts, where
#: ``announce`` is set (``iosim simulate`` sets it; a sweep's workers leave it off).
ANNOUNCE_ABOVE_SECONDS = 10.0
announce = False

#: Default budget of one simulation (or of the simulations an explorer runs at once).
DEFAULT_MAX_MEMORY_BYTES = _half_the_memory()
DEFAULT_MAX_SECONDS = 1800.0


class BudgetError(IosimError):
    """A simulation would exceed its memory or time budget."""


@dataclass(frozen=True)
class CostEstimate:
    events: int  # trace events over all batch·heads
    template_events: int  # events of one batch·head, built in Python
    memory_bytes: float
    seconds: float

    def describe(self) -> str:
        return (f"about {self.events:.3g} trace events, {self.memory_bytes / 2**30:.3g} GiB "
                f"of memory and {_duration(self.seconds)}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.3g} h"


def _events(body, kernel, dims: dict, causal: bool, compressed: bool = False) -> float:
    """Events of one run of ``body``; ``compressed``: in a compressed template (an innermost
    loop's iterations kept three times at most, :mod:`iosim.trace_fast`)."""
    count = 0.0
    for item in body:
        if isinstance(item, Loop):
            trips = n_blocks(dims[kernel.span(item.var)], kernel.blocks[item.var])
            if item.within is not None:
                trips = min(trips, kernel.blocks[item.within] // kernel.blocks[item.var])
            if causal and item.causal_skip:
                trips = (trips + 1) / 2
            if compressed and not any(isinstance(i, Loop) for i in item.body):
                trips = min(trips, 3)
            count += trips * _events(item.body, kernel, dims, causal, compressed)
        else:
            count += 1
    return count


def estimate(schedule, streamed: bool = False, sampled: bool = False) -> CostEstimate:
    """The cost of simulating ``schedule`` (see the module docstring); ``streamed``: by
    :func:`iosim.sampling.simulate_streamed` (memory independent of B·H), ``sampled`` too."""
    from .sampling import SEGMENT_MAX_EVENTS

    shape = schedule.shape
    template = events = ctas_all = compressed = replayed = 0.0
    for kernel in schedule.kernels:
        dims = kernel.base_dims(shape.head_dim, shape.seq_len)
        ctas = math.prod(n_blocks(dims[kernel.span(var)], kernel.blocks[var])
                         for var in kernel.grid)
        one_head = ctas * _events(kernel.body, kernel, dims, shape.causal)
        # a padding mask builds one template per distinct valid length (bounded by this)
        template += one_head * (1 if shape.kv_lens is None else len(set(shape.kv_lens)))
        heads = shape.batch_kv_heads if kernel.heads == "kv" else shape.batch_heads
        events += one_head * heads
        ctas_all += ctas * heads
        compressed += ctas * _events(kernel.body, kernel, dims, shape.causal, True)
        replayed += min(one_head * heads, SAMPLED_SEGMENTS * SEGMENT_MAX_EVENTS)
    if streamed:
        seconds = (replayed * SECONDS_PER_STREAMED_EVENT + events * SECONDS_PER_SKIPPED_EVENT
                   if sampled else events * SECONDS_PER_STREAMED_EVENT)
        return CostEstimate(
            events=int(events), template_events=int(compressed),
            memory_bytes=(compressed * BYTES_PER_STREAMED_TEMPLATE_EVENT
                          + ctas_all * BYTES_PER_CTA),
            seconds=seconds + compressed * SECONDS_PER_TEMPLATE_EVENT)
    return CostEstimate(
        events=int(events), template_events=int(template),
        memory_bytes=events * BYTES_PER_EVENT + template * BYTES_PER_TEMPLATE_EVENT,
        seconds=events * SECONDS_PER_EVENT + template * SECONDS_PER_TEMPLATE_EVENT)


def check(schedule, max_memory_bytes=DEFAULT_MAX_MEMORY_BYTES,
          max_seconds=DEFAULT_MAX_SECONDS, streamed: bool = False,
          sampled: bool = False) -> CostEstimate:
    """The estimate, or a :class:`BudgetError` saying it and how to go on when it exceeds
    ``max_memory_bytes`` or ``max_seconds`` (None: no limit)."""
    cost = estimate(schedule, streamed, sampled)
    over = []
    if max_memory_bytes is not None and cost.memory_bytes > max_memory_bytes:
        over.append(f"memory budget {max_memory_bytes / 2**30:.3g} GiB")
    if max_seconds is not None and cost.seconds > max_seconds:
        over.append(f"time budget {_duration(max_seconds)}")
    if over:
        raise BudgetError(
            f"simulating {schedule.algorithm} at {schedule.shape.describe()} would take "
            f"{cost.describe()}, over the {' and the '.join(over)}; use a smaller batch, "
            "fewer heads or a shorter sequence (the bytes per head scale with B·H), or raise "
            "the budget (--max-memory-gb, --max-minutes; in Python max_memory_bytes=, "
            "max_seconds=) if the machine has it")
    return cost
