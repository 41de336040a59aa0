"""The Python API: simulate one algorithm on one workload, get counts and predicted times."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np

from . import budget, engine
from .cost import MEMORY_LIMITERS, arithmetic_intensity, kernel_cost
from .errors import IosimError
from .hardware import Hardware, load_hardware
from .occupancy import occupancy
from .schedules import build_schedule
from .shape import AttentionShape
from .timing import fraction_bound, time_kernel
from .trace import build_trace

MODELS = ("two-level", "l2")
#: How predicted_time_s is computed: the timed replay (default) or the roofline bound.
TIME_MODELS = ("timed", "roofline")
COUNT_FIELDS = ("hbm_read_bytes", "hbm_write_bytes", "l2_read_bytes", "l2_write_bytes",
                "sram_read_bytes", "sram_write_bytes", "flops_tensor", "flops_scalar",
                "special_ops")


@dataclass
class KernelResult:
    """Counts, roofline terms and predicted time of one kernel (or of all, in ``totals``)."""

    name: str
    hbm_read_bytes: int = 0
    hbm_write_bytes: int = 0
    l2_read_bytes: int = 0
    l2_write_bytes: int = 0
    sram_read_bytes: int = 0
    sram_write_bytes: int = 0
    flops_tensor: int = 0
    flops_scalar: int = 0
    special_ops: int = 0  # exp/log evaluations (part of flops_scalar)
    tensor_path: str = "library"
    phase: str = "forward"  # the pass the kernel belongs to: "forward" or "backward"
    ctas: int = 0
    concurrent_ctas: int = 0
    l2_line_accesses: int = 0
    l2_dirty_end_bytes: int = 0  # dirty in L2 when the kernel ends: reaches HBM afterwards
    tensors: dict = field(default_factory=dict)  # tensor -> {"read_bytes", "write_bytes"}
    predicted_time_s: float = 0.0
    arithmetic_intensity: float = 0.0
    bound: str = ""  # the roofline's placement: "memory" or "compute"
    limiter: str = ""  # the roofline's limiting resource
    time_model: str = "timed"  # which model gave predicted_time_s
    timed_limiter: str = ""  # what bounded most CTA-time in the timed model
    occupancy: dict = field(default_factory=dict)  # resident CTAs/warps per SM and why
    time_breakdown: dict = field(default_factory=dict)  # timed model: share of CTA-time by limiter
    times_s: dict = field(default_factory=dict)
    # sampled (iosim.sampling): the HBM counts are estimates; ``intervals`` gives each one's
    # 95 % confidence interval, counter -> [low, high] bytes
    sampled: bool = False
    intervals: dict = field(default_factory=dict)

    @property
    def hbm_bytes(self) -> int:
        return self.hbm_read_bytes + self.hbm_write_bytes

    @property
    def flops(self) -> int:
        return self.flops_tensor + self.flops_scalar

    def to_dict(self) -> dict:
        """The fields as plain data; infinities and NaN (an arithmetic intensity with no HBM
        bytes) become None, so that ``json.dumps`` gives strict JSON."""
        from .results import _json_safe

        data = asdict(self)
        if not self.sampled:  # an exact result reads as it always did
            data.pop("sampled")
            data.pop("intervals")
        return _json_safe(data)


@dataclass
class SimulationResult:
    algorithm: str
    model: str
    hardware: Hardware
    shape: AttentionShape
    block_rows: int
    block_cols: int
    kernels: list
    totals: KernelResult
    time_model: str = "timed"
    timelines: dict = field(default_factory=dict, repr=False)  # kernel -> iosim.timing.TimedKernel
    pass_: str = "forward"  # "forward", "backward" or "both": which kernels are simulated
    sampled: bool = False  # some kernel's HBM counts were sampled (iosim.sampling)

    def to_dict(self) -> dict:
        """The result as plain data for ``json.dumps``: strict JSON (non-finite numbers, such
        as an infinite arithmetic intensity, become None)."""
        from .results import _json_safe

        shape = self.shape
        sampled = {"sampled": True} if self.sampled else {}
        return _json_safe({
            **sampled,
            "algorithm": self.algorithm, "pass": self.pass_, "model": self.model,
            "time_model": self.time_model,
            "hardware": self.hardware.name,
            "shape": {"batch": shape.batch, "heads": shape.heads, "seq_len": shape.seq_len,
                      "head_dim": shape.head_dim, "dtype": shape.dtype, "causal": shape.causal,
                      "kv_heads": shape.kv_heads, "kv_seq_len": shape.kv_seq_len,
                      "kv_lens": list(shape.kv_lens) if shape.kv_lens else None,
                      "dropout": shape.dropout},
            "block_rows": self.block_rows, "block_cols": self.block_cols,
            "totals": self.totals.to_dict(),
            "kernels": [k.to_dict() for k in self.kernels],
        })


def concurrent_ctas(occ, hardware: Hardware, n_ctas: int) -> int:
    """CTAs resident at once: SMs x the CTAs per SM that occupancy ``occ`` allows."""
    return max(1, min(n_ctas, hardware.sm_count * occ.ctas_per_sm))


def kernel_occupancies(trace, hardware: Hardware) -> list:
    """The occupancy (:mod:`iosim.occupancy`) of every kernel of ``trace``."""
    shape = trace.schedule.shape
    return [occupancy(kt.kernel, shape.head_dim, shape.seq_len, hardware)
            for kt in trace.kernels]


def check_time_model(time_model: str) -> str:
    """``time_model`` if it is one of :data:`TIME_MODELS`, else an IosimError."""
    if time_model not in TIME_MODELS:
        raise IosimError(f"unknown time model {time_model!r}; allowed: {', '.join(TIME_MODELS)}")
    return time_model


def check_model(model: str) -> str:
    """``model`` if it is one of :data:`MODELS`, else an IosimError naming the allowed ones."""
    if model not in MODELS:
        raise IosimError(f"unknown model {model!r}; allowed: {', '.join(MODELS)}")
    return model


def tile_traffic_by_tensor(kt, tensor_names, reps=None) -> dict:
    """Bytes of tiles each tensor moves between SRAM and the memory system (loads, stores);
    ``reps``: how many times each event runs (a compressed template), else once.

    Under the two-level model these are the HBM bytes; under the l2 model, the L2 requests."""
    nbytes = kt.rows * kt.row_bytes * (1 if reps is None else reps)
    traffic = {}
    for kind, key in ((engine.LOAD, "read_bytes"), (engine.STORE, "write_bytes")):
        chosen = kt.kind == kind
        per_tensor = np.bincount(kt.tensor[chosen], weights=nbytes[chosen],
                                 minlength=len(tensor_names))
        for name, value in zip(tensor_names, per_tensor):
            if value:
                traffic.setdefault(name, {"read_bytes": 0, "write_bytes": 0})[key] = int(value)
    return traffic


def l2_replay_key(kt, slots: int, hardware: Hardware) -> tuple:
    """Everything the L2 replay of kernel trace ``kt`` reads: a SHA-256 digest of its event
    columns (CTA offsets, kinds, addresses, tile geometry), the CTAs resident at once and the
    L2's geometry. Two kernels with one key replay to the same counts, event by event (the
    unfused pipelines' GEMMs and row kernels recur across algorithms and the causal flag)."""
    digest = hashlib.sha256()
    for column in (kt.cta_start, kt.kind, kt.addr, kt.rows, kt.row_bytes, kt.row_stride):
        column = np.ascontiguousarray(column)
        digest.update(f"{column.dtype.str}{column.shape}".encode())
        digest.update(column)
    return (int(slots), hardware.l2_sets, hardware.l2_associativity, hardware.l2_line_bytes,
            hardware.l2_sector_bytes, digest.hexdigest())


def replay(trace, hardware: Hardware, model: str,
           occupancies=None, memo: dict | None = None) -> list[tuple[dict, np.ndarray]]:
    """Run every kernel of ``trace`` through the engine: per kernel, its counter dict and each
    event's HBM bytes (read, plus written back by the evictions it caused). The L2 model keeps
    as many CTAs resident as ``occupancies`` (default: :func:`kernel_occupancies`) allow.

    ``memo`` (a dict the caller keeps, or None): L2 replays by :func:`l2_replay_key`; a kernel
    already replayed there is not replayed again (the same counts: the key holds all the replay
    reads)."""
    results = []
    if occupancies is None:
        occupancies = kernel_occupancies(trace, hardware)
    for kt, occ in zip(trace.kernels, occupancies):
        counts = np.zeros(len(engine.COUNTERS), dtype=np.int64)
        engine.sum_events(kt.kind, kt.rows, kt.row_bytes, kt.flops_tensor, kt.flops_scalar,
                          kt.sram_read, kt.sram_write, counts)
        slots = concurrent_ctas(occ, hardware, kt.n_ctas)
        if model == "l2":
            counts[engine.HBM_READ] = counts[engine.HBM_WRITE] = 0
            key = l2_replay_key(kt, slots, hardware) if memo is not None else None
            if key is not None and key in memo:
                l2_counts, hbm_by_event = memo[key]
            else:  # the replay adds to counters that sum_events leaves at 0
                l2_counts = np.zeros(len(engine.COUNTERS), dtype=np.int64)
                event_counts = np.zeros((kt.n_events, 2), dtype=np.int64)
                engine.replay_l2(kt.cta_start, kt.kind, kt.addr, kt.rows, kt.row_bytes,
                                 kt.row_stride, slots, hardware.l2_sets,
                                 hardware.l2_associativity, hardware.l2_line_bytes,
                                 hardware.l2_sector_bytes, l2_counts, event_counts)
                hbm_by_event = event_counts.sum(axis=1).astype(np.float64)
                if key is not None:
                    memo[key] = (l2_counts, hbm_by_event)
            counts += l2_counts
        else:  # two-level: every tile moved is HBM traffic
            hbm_by_event = np.where(kt.kind == engine.COMPUTE, 0.0,
                                    (kt.rows * kt.row_bytes).astype(np.float64))
        row = {name: int(counts[i]) for i, name in enumerate(engine.COUNTERS)}
        row.update(name=kt.name, ctas=kt.n_ctas, concurrent_ctas=slots, phase=kt.kernel.phase,
                   special_ops=int(kt.special_ops.sum()), tensor_path=kt.tensor_path,
                   tensors=tile_traffic_by_tensor(kt, trace.tensor_names))
        results.append((row, hbm_by_event))
    return results


def _finish(result: KernelResult, timed, hardware: Hardware, dtype: str, model: str,
            time_model: str) -> KernelResult:
    cost = kernel_cost(result, hardware, dtype, model)
    result.time_model = time_model
    result.predicted_time_s = timed.time_s if time_model == "timed" else cost.predicted_time_s
    result.arithmetic_intensity = arithmetic_intensity(result.flops, result.hbm_bytes)
    result.bound, result.limiter = cost.bound, cost.limiter
    result.timed_limiter = fraction_bound(timed.breakdown)
    result.occupancy = timed.occupancy.to_dict()
    result.time_breakdown = dict(timed.breakdown)
    result.times_s = {"timed": timed.time_s, "roofline": cost.predicted_time_s,
                      "hbm": cost.hbm_time_s, "l2": cost.l2_time_s, "sram": cost.sram_time_s,
                      "tensor": cost.tensor_time_s, "scalar": cost.scalar_time_s,
                      "special": cost.special_time_s,
                      "compute": cost.compute_time_s, "launch": cost.launch_time_s}
    return result


def _pass_of(kernels) -> str:
    phases = {k.phase for k in kernels}
    return "both" if len(phases) > 1 else phases.pop()


def simulate_trace(trace, hardware: Hardware, model: str = "l2",
                   time_model: str = "timed", memo: dict | None = None) -> SimulationResult:
    """Replay an already built trace (see :func:`iosim.trace.build_trace`) under ``model``.

    Lets a caller replay one trace under both models, or simulate a schedule that is not one of
    the attention algorithms (the op catalogue). Both time models always run (``times_s``
    carries both); ``time_model`` picks the one ``predicted_time_s`` reports. ``memo``: L2
    replays to reuse across calls (see :func:`replay`)."""
    check_model(model)
    check_time_model(time_model)
    schedule = trace.schedule
    shape = schedule.shape
    kernels, timelines = [], {}
    occupancies = kernel_occupancies(trace, hardware)
    for (row, hbm_by_event), kt, occ in zip(replay(trace, hardware, model, occupancies, memo),
                                            trace.kernels, occupancies):
        timed = time_kernel(kt, hbm_by_event, hardware, shape, occ)
        timelines[kt.name] = timed
        kernels.append(_finish(KernelResult(**row), timed, hardware, shape.dtype, model,
                               time_model))
    return _assemble(schedule, kernels, timelines, hardware, model, time_model)


def _assemble(schedule, kernels, timelines, hardware, model, time_model) -> SimulationResult:
    """The result of the kernels' results: totals over them (they run one after another)."""
    totals = KernelResult(name="total", ctas=sum(k.ctas for k in kernels),
                          concurrent_ctas=max(k.concurrent_ctas for k in kernels))
    for name in COUNT_FIELDS + ("l2_line_accesses", "l2_dirty_end_bytes"):
        setattr(totals, name, sum(getattr(k, name) for k in kernels))
    for k in kernels:  # each tensor's bytes over all kernels
        for tensor, moved in k.tensors.items():
            into = totals.tensors.setdefault(tensor, {"read_bytes": 0, "write_bytes": 0})
            into["read_bytes"] += moved["read_bytes"]
            into["write_bytes"] += moved["write_bytes"]
    totals.sampled = any(k.sampled for k in kernels)
    for name in sorted({name for k in kernels for name in k.intervals}):
        # a sum of estimates: the ends of the kernels' intervals add up (a wider interval
        # than the sum's own, on the safe side); an exact kernel adds its count to both
        totals.intervals[name] = [
            sum(k.intervals[name][end] if name in k.intervals else getattr(k, name)
                for k in kernels) for end in (0, 1)]
    totals.predicted_time_s = sum(k.predicted_time_s for k in kernels)
    totals.time_model = time_model
    totals.tensor_path = kernels[0].tensor_path if len({k.tensor_path for k in kernels}) == 1 \
        else "mixed"
    # the kernels run one after another: every time term adds up
    totals.times_s = {name: sum(k.times_s[name] for k in kernels) for name in kernels[0].times_s}
    timed_by_limiter = {}
    for k in kernels:
        for name, share in k.time_breakdown.items():
            if name != "sm_idle":
                timed_by_limiter[name] = timed_by_limiter.get(name, 0.0) + share * k.times_s["timed"]
    totals.timed_limiter = max(timed_by_limiter, key=timed_by_limiter.get) if timed_by_limiter \
        else ""
    totals.arithmetic_intensity = arithmetic_intensity(totals.flops, totals.hbm_bytes)
    time_by_limiter = {}
    for k in kernels:
        time_by_limiter[k.limiter] = time_by_limiter.get(k.limiter, 0.0) + k.predicted_time_s
    totals.limiter = max(time_by_limiter, key=time_by_limiter.get)
    totals.bound = "memory" if totals.limiter in MEMORY_LIMITERS else "compute"
    return SimulationResult(algorithm=schedule.algorithm, model=model, hardware=hardware,
                            shape=schedule.shape, block_rows=schedule.block_rows,
                            block_cols=schedule.block_cols, kernels=kernels, totals=totals,
                            time_model=time_model, timelines=timelines,
                            pass_=_pass_of(kernels), sampled=totals.sampled)


def simulate(algorithm: str, shape: AttentionShape, *, block_rows=None, block_cols=None,
             hardware="h100-measured", sram_bytes=None, model: str = "l2",
             time_model: str = "timed", rows_per_warp=None, pass_: str = "forward",
             num_splits=None, max_memory_bytes=budget.DEFAULT_MAX_MEMORY_BYTES,
             max_seconds=budget.DEFAULT_MAX_SECONDS, exact=None) -> SimulationResult:
    """Count bytes per memory level and FLOPs of ``algorithm`` on ``shape``, and predict time.

    ``hardware`` is a preset name, a TOML path or a :class:`Hardware`; ``sram_bytes`` overrides
    its SRAM per thread block (the paper's M); ``model`` is "l2" (default) or "two-level";
    ``time_model`` is "timed" (default: the per-CTA replay of :mod:`iosim.timing`) or
    "roofline" (:mod:`iosim.cost`); ``rows_per_warp`` (flash1, flash2) sets the warps per CTA;
    ``pass_`` is "forward" (default), "backward" or "both" (the forward's kernels, then the
    backward's; totals over all); ``num_splits`` (flash_decoding) splits the K/V sequence
    (default: FlashAttention's heuristic for the hardware's SMs).
    Before building anything the cost is estimated (:mod:`iosim.budget`); past
    ``max_memory_bytes`` or ``max_seconds`` (None: no limit) a
    :class:`~iosim.budget.BudgetError` says the estimate and how to go on.
    ``exact``: None (default) replays every event of a simulation up to
    :data:`iosim.sampling.SAMPLE_ABOVE_EVENTS` trace events and samples a larger one (see
    :mod:`iosim.sampling`: HBM counts estimated with a confidence interval, ``result.sampled``);
    True always replays every event; False samples whenever the kernel is long enough. Above
    :data:`iosim.sampling.STREAM_ABOVE_EVENTS` events the replay is streamed from one head's
    events (memory independent of B·H; the same counts)."""
    if not isinstance(shape, AttentionShape):
        raise IosimError(f"shape must be an iosim.AttentionShape, got {type(shape).__name__}")
    check_model(model)
    check_time_model(time_model)
    hw = load_hardware(hardware)
    if sram_bytes is not None:
        hw = hw.with_sram(sram_bytes)
    from .schedules import SPLIT_KV

    splits = ({"num_splits": num_splits, "sm_count": hw.sm_count} if algorithm in SPLIT_KV
              else {"num_splits": num_splits} if num_splits is not None else {})
    schedule = build_schedule(algorithm, shape, block_rows, block_cols,
                              sram_bytes=hw.sram_bytes_per_block, rows_per_warp=rows_per_warp,
                              pass_=pass_, **splits)
    return simulate_schedule(schedule, hardware=hw, model=model, time_model=time_model,
                             max_memory_bytes=max_memory_bytes, max_seconds=max_seconds,
                             exact=exact)


def simulate_schedule(schedule, *, hardware="h100-measured", model: str = "l2",
                      time_model: str = "timed",
                      max_memory_bytes=budget.DEFAULT_MAX_MEMORY_BYTES,
                      max_seconds=budget.DEFAULT_MAX_SECONDS, exact=None) -> SimulationResult:
    """Simulate a schedule built by hand (see the how-to "Write your own schedule"): refuse it
    when its tiles do not fit the hardware's SRAM per thread block or its estimated cost exceeds
    the budget, then trace and replay it as :func:`simulate` does (``exact`` as there)."""
    from . import sampling

    from .schedule import Schedule

    if not isinstance(schedule, Schedule):
        raise IosimError(f"schedule must be an iosim.schedule.Schedule, got "
                         f"{type(schedule).__name__}")
    check_model(model)
    check_time_model(time_model)
    hw = load_hardware(hardware)
    schedule.check_fits(hw.sram_bytes_per_block)
    if exact not in (None, True, False):
        raise IosimError(f"exact must be None, True or False, got {exact!r}")
    streamed, sampled = sampling.sampling_mode(schedule, exact)
    cost = budget.check(schedule, max_memory_bytes, max_seconds, streamed=streamed,
                        sampled=sampled)
    if budget.announce and cost.seconds > budget.ANNOUNCE_ABOVE_SECONDS:  # before a long run
        import sys

        print(f"iosim: simulating {schedule.algorithm} at {schedule.shape.describe()}: "
              f"estimated {cost.describe()}{' (sampled)' if sampled else ''}",
              file=sys.stderr, flush=True)
    if streamed:
        return sampling.simulate_streamed(schedule, hw, model, time_model, sample=sampled)
    return simulate_trace(build_trace(schedule), hw, model, time_model)
