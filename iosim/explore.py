"""The block-size explorer: simulate every (block_rows, block_cols) pair that fits the SRAM and
rank them by predicted time.

Candidate block sizes (``candidates=``):

* ``"pow2"`` (default): the powers of two 16, 32, 64, 128, 256 — the sizes real kernels use,
  since a tile must be a whole number of 16 x 16 tensor-core fragments and warps split it
  evenly. Sizes above N are dropped; when N < 256, N itself is added (a block holding every row).
* ``"mult16"``: every multiple of 16 from 16 up to min(N, 512) (plus N when N < 512) — a finer,
  slower sweep (up to 32 x 32 pairs).
* an iterable of positive integers: exactly those sizes (each clipped to N).

The same candidates are tried for block_rows (Br) and block_cols (Bc); pairs whose live tiles do
not fit ``sram_bytes`` per thread block (the schedule raises :class:`~iosim.errors.TilingError`)
are skipped. Each remaining pair is simulated, in worker processes when ``workers`` > 1, and the
rows come back sorted by predicted time, ties broken by HBM bytes (read + write), then by
(Br, Bc).
"""
from __future__ import annotations

import dataclasses
import operator
import os
from dataclasses import asdict, dataclass

from . import budget
from .errors import IosimError, TilingError
from .formatting import format_bytes, format_intensity, format_time, text_table
from .hardware import load_hardware
from .results import write_csv as _write_csv_rows
from .schedules import algorithm_module, build_schedule
from .schedules import STAGED
from .schedules.flash2 import table_tile
from .shape import AttentionShape
from .simulate import check_model, check_time_model
from .distribute import map_jobs

POW2_SIZES = (16, 32, 64, 128, 256)
MULT16_LIMIT = 512


@dataclass(frozen=True)
class BlockChoice:
    """One simulated (Br, Bc) pair: counts summed over the algorithm's kernels."""

    block_rows: int
    block_cols: int
    predicted_time_s: float
    hbm_read_bytes: int
    hbm_write_bytes: int
    l2_read_bytes: int
    l2_write_bytes: int
    flops_tensor: int
    flops_scalar: int
    flops: int
    arithmetic_intensity: float
    bound: str
    limiter: str
    sram_bytes_per_cta: int  # the largest of the kernels' live shared-memory tiles
    time_model: str  # which model predicted_time_s comes from
    predicted_time_roofline_s: float
    predicted_time_timed_s: float
    timed_limiter: str  # what bounded most CTA-time (timed model)
    warps_per_sm: int  # resident warps per SM of the slowest kernel (the occupancy)
    ctas_per_sm: int
    occupancy_limiter: str  # what limits that kernel's resident CTAs
    spills: bool  # its estimated registers were capped: a real kernel would spill
    stages: int = 0  # the K/V ring's shared-memory slots, where ranked (flash3); 0: not ranked
    num_splits: int = 1  # split-KV: the K/V splits per query block (1: none)

    @property
    def hbm_bytes(self) -> int:
        return self.hbm_read_bytes + self.hbm_write_bytes

    def to_dict(self) -> dict:
        return asdict(self)


CSV_COLUMNS = tuple(f.name for f in dataclasses.fields(BlockChoice))


def candidate_sizes(seq_len: int, candidates="pow2") -> list[int]:
    """The block sizes to try for a sequence of ``seq_len`` (see the module docstring)."""
    if isinstance(candidates, str):
        if candidates == "pow2":
            sizes = {s for s in POW2_SIZES if s <= seq_len}
            if seq_len < POW2_SIZES[-1]:
                sizes.add(seq_len)
        elif candidates == "mult16":
            limit = min(seq_len, MULT16_LIMIT)
            sizes = set(range(16, limit + 1, 16))
            if seq_len < MULT16_LIMIT:
                sizes.add(seq_len)
        else:
            raise IosimError(f"unknown candidates {candidates!r}; allowed: 'pow2', 'mult16' or "
                             "an iterable of positive integers")
        return sorted(sizes)
    try:
        values = list(candidates)
    except TypeError:
        raise IosimError(f"candidates must be 'pow2', 'mult16' or an iterable of positive "
                         f"integers, got {candidates!r}") from None
    sizes = set()
    for v in values:
        if isinstance(v, bool):
            raise IosimError(f"candidate block sizes must be positive integers, got {v!r}")
        try:
            v = operator.index(v)
        except TypeError:
            raise IosimError(f"candidate block sizes must be positive integers, got {v!r}") \
                from None
        if v < 1:
            raise IosimError(f"candidate block sizes must be positive integers, got {v}")
        sizes.add(min(v, seq_len))
    if not sizes:
        raise IosimError("candidates is empty; give at least one block size")
    return sorted(sizes)


#: Split counts the explorer tries for a split-KV algorithm (with the heuristic's choice).
SPLIT_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128)


def fitting_pairs(algorithm: str, shape: AttentionShape, hardware, sizes: list[int],
                  rows_per_warp=None, pass_: str = "forward") -> list[tuple[int, int, int]]:
    """(Br, Bc, SRAM bytes per CTA) of every candidate pair whose schedule fits the hardware's
    SRAM per thread block and whose CTAs fit an SM (warps, registers: the occupancy rules)."""
    return [(br, bc, need) for (br, bc, _), (need, _) in
            _fitting_schedules(algorithm, shape, hardware, sizes, sizes, rows_per_warp, pass_)]


def _split_options(algorithm, shape, hardware, num_splits) -> list:
    """The num_splits values to rank: [None] for an algorithm without splits; the given one;
    else SPLIT_CANDIDATES and the heuristic's choice (None)."""
    from .schedules import SPLIT_KV

    if algorithm not in SPLIT_KV:
        if num_splits is not None:
            raise IosimError(f"num_splits applies to {', '.join(SPLIT_KV)} only, "
                             f"not {algorithm!r}")
        return [None]
    return [num_splits] if num_splits is not None else [None, *SPLIT_CANDIDATES]


def _fitting_schedules(algorithm, shape, hardware, row_sizes, col_sizes, rows_per_warp, pass_,
                       splits=(None,)) -> list:
    """((Br, Bc, splits), (SRAM bytes per CTA, schedule)) of every fitting choice, sorted
    (sizes clipped to their extents, and split counts giving the same effective splits, give
    each choice once; ``splits`` is 1 for an algorithm without them)."""
    from .occupancy import occupancy
    from .schedules import SPLIT_KV

    found = {}
    for br in row_sizes:
        for bc in col_sizes:
            for split in splits:
                extra = ({"num_splits": split, "sm_count": hardware.sm_count}
                         if algorithm in SPLIT_KV else {})
                try:
                    schedule = build_schedule(algorithm, shape, br, bc,
                                              sram_bytes=hardware.sram_bytes_per_block,
                                              rows_per_warp=rows_per_warp, pass_=pass_, **extra)
                    for kernel in schedule.kernels:
                        occupancy(kernel, shape.head_dim, shape.seq_len, hardware)
                except TilingError:
                    continue
                need = max(k.smem_bytes(shape.head_dim, shape.seq_len)
                           for k in schedule.kernels)
                effective = dict(schedule.kernels[0].extents).get("S", 1)
                key = (schedule.block_rows, schedule.block_cols, effective)
                found.setdefault(key, (need, schedule))
    return sorted(found.items(), key=lambda item: item[0])


def _simulate_choice(job) -> BlockChoice:
    """One fitting choice (its schedule, already built: tiles, splits or ring depth baked in),
    simulated and summed over its kernels."""
    from .simulate import simulate_schedule

    schedule, hw, model, time_model, need, exact, splits, stages = job
    result = simulate_schedule(schedule, hardware=hw, model=model, time_model=time_model,
                               max_memory_bytes=None, max_seconds=None, exact=exact)
    total = result.totals
    occ = max(result.kernels, key=lambda k: k.times_s["timed"]).occupancy
    return BlockChoice(
        block_rows=schedule.block_rows, block_cols=schedule.block_cols,
        predicted_time_s=total.predicted_time_s, hbm_read_bytes=total.hbm_read_bytes,
        hbm_write_bytes=total.hbm_write_bytes, l2_read_bytes=total.l2_read_bytes,
        l2_write_bytes=total.l2_write_bytes, flops_tensor=total.flops_tensor,
        flops_scalar=total.flops_scalar, flops=total.flops,
        arithmetic_intensity=total.arithmetic_intensity, bound=total.bound,
        limiter=total.limiter, sram_bytes_per_cta=need, time_model=time_model,
        predicted_time_roofline_s=total.times_s["roofline"],
        predicted_time_timed_s=total.times_s["timed"], timed_limiter=total.timed_limiter,
        warps_per_sm=occ["warps_per_sm"], ctas_per_sm=occ["ctas_per_sm"],
        occupancy_limiter=occ["limiter"],
        spills=any(k.occupancy.get("spills") for k in result.kernels), num_splits=splits,
        stages=stages)


def rank_key(row: BlockChoice):
    """Sort key: predicted time, then HBM bytes, then (Br, Bc, splits, ring depth)."""
    return (row.predicted_time_s, row.hbm_bytes, row.block_rows, row.block_cols,
            row.num_splits, row.stages)


def explore(algorithm: str, shape: AttentionShape, *, hardware="h100-measured",
            sram_bytes=None, model: str = "l2", workers=None, progress: bool = True,
            candidates=None, time_model: str = "timed", rows_per_warp=None,
            pass_: str = "forward", scheduler: str | None = None, stages=None, num_splits=None,
            max_memory_bytes=budget.DEFAULT_MAX_MEMORY_BYTES,
            max_seconds=budget.DEFAULT_MAX_SECONDS, exact=None) -> list[BlockChoice]:
    """Simulate every candidate (Br, Bc) pair that fits the SRAM; fastest first. Block rows
    run over the query rows (a split-KV kernel's: the group's), block columns over the keys;
    a split-KV algorithm (flash_decoding) also ranks ``num_splits`` (when not given: 1 to 128
    in powers of two and FlashAttention's heuristic's choice; choices giving the same
    effective splits are simulated once).

    ``hardware``: preset name, TOML path or :class:`Hardware`; ``sram_bytes`` overrides its SRAM
    per thread block; ``model``: "l2" or "two-level"; ``workers``: processes (default
    ``os.cpu_count()``; 1 runs in this process); ``progress``: a tqdm bar on stderr;
    ``candidates``: see the module docstring (None means "pow2"); ``time_model``: "timed"
    (default) or "roofline", the prediction the pairs are ranked by; ``rows_per_warp``
    (flash1, flash2): query rows per warp, hence warps per CTA; ``pass_``: "forward",
    "backward" or "both" (the block sizes of the pass's kernels); ``scheduler``: where the pairs
    run (:mod:`iosim.distribute`: local processes by default, "local" for a Dask LocalCluster,
    or a Dask scheduler address); ``max_memory_bytes`` (of the
    pairs simulated at once, one per worker) and ``max_seconds`` (of the whole ranking) bound the
    estimated cost (:mod:`iosim.budget`; None: no limit); ``exact``: None (default) samples
    each pair of over :data:`SAMPLE_PAIRS_ABOVE_EVENTS` trace events (:mod:`iosim.sampling`),
    True replays every event of every pair. Raises :class:`IosimError` for bad
    input, when no pair fits, or (:class:`~iosim.budget.BudgetError`) when the estimate exceeds
    the budget."""
    algorithm_module(algorithm)
    check_time_model(time_model)
    if not isinstance(shape, AttentionShape):
        raise IosimError(f"shape must be an iosim.AttentionShape, got {type(shape).__name__}")
    check_model(model)
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise IosimError(f"workers must be a positive integer, got {workers!r}")
    hw = load_hardware(hardware)
    if sram_bytes is not None:
        hw = hw.with_sram(sram_bytes)
    if algorithm in STAGED:  # flash3: the ring depth ranked with the tiles
        return _explore_stages(algorithm, shape, hw, model, time_model, workers, progress,
                               candidates, scheduler, stages, max_memory_bytes, max_seconds,
                               exact, pass_)
    kind = "pow2" if candidates is None else candidates
    row_extent = getattr(algorithm_module(algorithm), "row_extent", lambda s: s.seq_len)(shape)
    row_sizes = candidate_sizes(row_extent, kind)
    col_sizes = candidate_sizes(shape.kv_seq_len, kind)
    sizes = sorted(set(row_sizes) | set(col_sizes))
    fitting = _fitting_schedules(algorithm, shape, hw, row_sizes, col_sizes, rows_per_warp,
                                 pass_, _split_options(algorithm, shape, hw, num_splits))
    if not fitting:
        raise IosimError(
            f"no (block_rows, block_cols) pair from sizes {sizes} fits {algorithm} at "
            f"{shape.describe()} in {hw.sram_bytes_per_block} bytes of SRAM per thread block; "
            "raise --sram-bytes or try smaller candidate sizes")
    jobs = [(schedule, hw, model, time_model, need, pair_exact(schedule, exact), splits, 0)
            for (_, _, splits), (need, schedule) in fitting]
    return _rank(algorithm, shape, jobs, workers, scheduler, progress, max_memory_bytes,
                 max_seconds)


def _rank(algorithm, shape, jobs, workers, scheduler, progress, max_memory_bytes,
          max_seconds) -> list[BlockChoice]:
    """The jobs (of :func:`_simulate_choice`) checked against the budget, simulated and
    ranked."""
    parallel = min(workers, len(jobs))
    _check_budget(algorithm, shape, [job[0] for job in jobs], parallel, max_memory_bytes,
                  max_seconds)
    rows = map_jobs(_simulate_choice, jobs, workers=parallel, scheduler=scheduler,
                    progress=progress, desc=f"{algorithm} {shape.describe()}")
    return sorted(rows, key=rank_key)


#: A ranking needs each pair to about a percent, not its exact bytes: by default (``exact`` None)
#: the explorer samples every pair of more trace events than this (iosim.sampling), which
#: single simulations do only above iosim.sampling.SAMPLE_ABOVE_EVENTS.
SAMPLE_PAIRS_ABOVE_EVENTS = 250_000


def pair_exact(schedule, exact):
    """The ``exact`` a pair is simulated with: the explorer's own, or by default (None) False
    (sampled where long enough) above :data:`SAMPLE_PAIRS_ABOVE_EVENTS` events, else None."""
    if exact is not None:
        return exact
    return False if budget.estimate(schedule).events > SAMPLE_PAIRS_ABOVE_EVENTS else None


#: FlashAttention-3's Br: whole consumer warpgroups (wgmma is 64 rows high).
STAGED_ROW_MULTIPLE = 64


def staged_candidates(algorithm: str, shape: AttentionShape, sizes: list[int],
                      stages=None, pass_: str = "forward") -> list[tuple[int, int, int]]:
    """The (Br, Bc, stages) a staged algorithm (flash3) is ranked over: the block its consumer
    warpgroups split (the forward's Br, the backward's Bc; both with ``pass_`` "both") every
    whole number of warpgroups it runs (64, 128, 192: up to ``MAX_CONSUMER_WARPGROUPS``; N
    itself when N < 64), the other from ``sizes``, each plus the pass's default tile; every ring
    depth it allows (or just ``stages``). Whether each fits is left to
    :func:`_explore_stages`."""
    module = algorithm_module(algorithm)
    default_rows, default_cols = (module.fa3_tile(shape.head_dim, shape.causal)
                                  if pass_ == "forward" else
                                  table_tile(module.BACKWARD_TILES, shape.head_dim))
    n = shape.seq_len
    whole = {STAGED_ROW_MULTIPLE * g for g in range(1, module.MAX_CONSUMER_WARPGROUPS + 1)}
    whole = {s for s in whole if s <= n} or {n}
    rows = set(whole) if pass_ != "backward" else set(sizes)
    cols = set(whole) if pass_ != "forward" else set(sizes)
    rows.add(min(default_rows, n))
    cols.add(min(default_cols, n))
    depths = module.STAGES if stages is None else (module.check_stages(stages),)
    return [(br, bc, s) for br in sorted(rows) for bc in sorted(cols) for s in depths]


def _explore_stages(algorithm, shape, hw, model, time_model, workers, progress, candidates,
                    scheduler, stages, max_memory_bytes, max_seconds,
                    exact=None, pass_="forward") -> list[BlockChoice]:
    """:func:`explore` for a staged algorithm (flash3): every (Br, Bc, stages) of
    :func:`staged_candidates` whose tiles fit the SRAM and whose CTA fits an SM, simulated and
    ranked together (ties: HBM bytes, Br, Bc, then the shallower ring)."""
    from .occupancy import occupancy

    sizes = candidate_sizes(shape.seq_len, "pow2" if candidates is None else candidates)
    fitting = {}
    for br, bc, depth in staged_candidates(algorithm, shape, sizes, stages, pass_):
        try:
            schedule = build_schedule(algorithm, shape, br, bc,
                                      sram_bytes=hw.sram_bytes_per_block, stages=depth,
                                      pass_=pass_)
            for kernel in schedule.kernels:
                occupancy(kernel, shape.head_dim, shape.seq_len, hw)
        except TilingError:
            continue
        need = max(k.smem_bytes(shape.head_dim, shape.seq_len) for k in schedule.kernels)
        fitting.setdefault((schedule.block_rows, schedule.block_cols, depth), (need, schedule))
    if not fitting:
        raise IosimError(
            f"no (block_rows, block_cols, stages) from sizes {sizes} fits {algorithm} at "
            f"{shape.describe()} in {hw.sram_bytes_per_block} bytes of SRAM per thread block; "
            "raise --sram-bytes or try smaller candidate sizes")
    jobs = [(schedule, hw, model, time_model, need, pair_exact(schedule, exact), 1, depth)
            for (_, _, depth), (need, schedule) in sorted(fitting.items())]
    return _rank(algorithm, shape, jobs, workers, scheduler, progress, max_memory_bytes,
                 max_seconds)


def _check_budget(algorithm, shape, schedules, parallel, max_memory_bytes,
                  max_seconds) -> None:
    """Refuse a ranking whose estimated memory (the ``parallel`` costliest pairs at once) or
    time (all pairs over ``parallel`` workers) exceeds the budget, before simulating any."""
    from .sampling import sampling_mode

    costs = sorted((budget.estimate(schedule,
                                    streamed=sampling_mode(schedule, pair_exact(schedule,
                                                                                None))[0])
                    for schedule in schedules), key=lambda c: -c.memory_bytes)
    memory = sum(c.memory_bytes for c in costs[:parallel])
    seconds = sum(c.seconds for c in costs) / parallel
    over = []
    if max_memory_bytes is not None and memory > max_memory_bytes:
        over.append(f"{memory / 2**30:.3g} GiB of memory over the budget of "
                    f"{max_memory_bytes / 2**30:.3g} GiB")
    if max_seconds is not None and seconds > max_seconds:
        over.append(f"{seconds / 60:.3g} min over the budget of {max_seconds / 60:.3g} min")
    if over:
        raise budget.BudgetError(
            f"ranking {len(schedules)} block pairs of {algorithm} at {shape.describe()} would take "
            f"{' and '.join(over)} ({parallel} at a time); use a smaller batch, fewer heads or "
            "a shorter sequence (the ranking rarely changes with B·H), fewer --workers, or "
            "raise the budget (--max-memory-gb, --max-minutes)")


def format_ranking(rows) -> str:
    """A plain-text table of ranked rows: rank, Br, Bc, time, HBM, L2, GFLOP, FLOP/B, bound."""
    if not rows:
        return "(no block sizes)"
    header = ("rank", "Br", "Bc", "splits", "predicted", "roofline", "warps/SM", "occupancy by",
              "timed limiter", "HBM read", "HBM write", "L2 r+w", "GFLOP", "FLOP/B",
              "roofline bound", "SRAM/CTA")
    table = []
    for rank, r in enumerate(rows, 1):
        ai = r.arithmetic_intensity
        table.append((str(rank), str(r.block_rows), str(r.block_cols), str(r.num_splits),
                      format_time(r.predicted_time_s), format_time(r.predicted_time_roofline_s),
                      str(r.warps_per_sm) + (" spills" if r.spills else ""),
                      f"{r.occupancy_limiter} ({r.ctas_per_sm} CTA)",
                      r.timed_limiter, format_bytes(r.hbm_read_bytes),
                      format_bytes(r.hbm_write_bytes),
                      format_bytes(r.l2_read_bytes + r.l2_write_bytes), f"{r.flops / 1e9:.2f}",
                      format_intensity(ai), f"{r.bound} ({r.limiter})",
                      f"{r.sram_bytes_per_cta / 1024:.1f} KiB"))
    if any(r.stages for r in rows):  # a ring depth was ranked (flash3): show it after Bc
        at = header.index("Bc") + 1
        header = header[:at] + ("stages",) + header[at:]
        table = [row[:at] + (str(r.stages),) + row[at:] for row, r in zip(table, rows)]
    return text_table(header, table)


def spill_warning(rows) -> str | None:
    """A warning naming the ranked pairs whose register tiles exceed the registers a thread can
    have (the timed model does not charge the spills); None when there are none."""
    spilling = [f"{r.block_rows}x{r.block_cols}" for r in rows if r.spills]
    if not spilling:
        return None
    return (f"warning: {', '.join(spilling[:8])}{', ...' if len(spilling) > 8 else ''} would "
            "spill registers (their register tiles exceed what a thread can hold); the "
            "prediction does not charge spills, so these rank better than they would run")


def occupancy_warning(rows) -> str | None:
    """A warning when the ranked pairs keep different numbers of warps resident per SM: their
    times then hinge on latency hiding, the part of the model least certain; None otherwise."""
    levels = sorted({r.warps_per_sm for r in rows})
    if len(levels) < 2:
        return None
    low = [f"{r.block_rows}x{r.block_cols}" for r in rows if r.warps_per_sm == levels[0]]
    return (f"warning: the pairs differ in occupancy ({', '.join(map(str, levels))} resident "
            f"warps per SM); the fewest ({levels[0]}: {', '.join(low[:6])}"
            f"{', ...' if len(low) > 6 else ''}) hide latency least, and their ranking rests on "
            "the timed model's latency terms: measure the close calls")


def write_csv(rows, path) -> None:
    """Write every ranked row (in rank order, with a ``rank`` column) to ``path`` atomically."""
    records = []
    for rank, r in enumerate(rows, 1):
        if not isinstance(r, BlockChoice):
            raise IosimError(f"write_csv expects rows from explore(), got {type(r).__name__}")
        records.append({"rank": rank, **r.to_dict()})
    _write_csv_rows(path, records, columns=("rank",) + CSV_COLUMNS)
