"""Validation: iosim's predictions beside what the H100 measured.

Reads the committed measurements (``experiments/data/h100/bench.json``: the ``gpu.bench``
harness's timings, with Nsight Compute DRAM bytes merged in) and, for every measured kernel,
simulates the same kernel (same algorithm, shape and block sizes) on the ``h100-measured`` preset,
whose figures come from the microbenchmarks in ``calibration.json`` — never from these
attention measurements. Nothing is fitted, so there is no training half: every measured kernel
is a test point.

Outputs (in the results folder): ``validation_kernels.csv`` (one row per measured kernel),
``validation_summary.csv`` (per algorithm: median and worst absolute percentage error of time
and DRAM bytes), ``validation_blocks.csv`` (per shape: Spearman rank correlation of predicted
and measured time across block-size pairs, and whether the predicted best pair is within 5% of
the measured best), the figures ``validation_time.png``, ``validation_bytes.png`` and
``validation_roofline.png``, and a report section.

Run alone: ``python -m experiments.validation [results_dir]``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import statistics
import sys
from pathlib import Path

import numpy as np

import iosim
from iosim.results import atomic_path, write_csv, write_text

DATA_DIR = Path(__file__).resolve().parent / "data" / "h100"
HARDWARE = "h100-measured"
BEST_PAIR_TOLERANCE = 0.05
LARGE_DATA_FACTOR = 4  # byte targets cover kernels whose data is at least 4x the L2
#: Shapes with N at or above this were held out while the timed model was developed (against
#: N <= 4096 only); their errors are reported apart.
HELD_OUT_SEQ_LEN = 8192


def load_bench(data_dir: Path = DATA_DIR) -> dict:
    """The harness's JSON document, checked against its schema."""
    from gpu.schema import validate

    path = data_dir / "bench.json"
    if not path.is_file():
        raise iosim.IosimError(f"no measurements at {path}; run the gpu.bench harness first")
    doc = json.loads(path.read_text())
    problems = validate(doc)
    if problems:
        raise iosim.IosimError(f"{path} does not follow the bench schema: {problems[0]}")
    return doc


def _shape(run: dict) -> iosim.AttentionShape:
    return iosim.AttentionShape(run["batch"], run["heads"], run["seq_len"], run["head_dim"],
                                "fp16", run["causal"], kv_heads=run.get("kv_heads"),
                                kv_seq_len=run.get("kv_seq_len"))


def _footprint_bytes(schedule, kernel) -> int:
    """Bytes of the distinct tensors a kernel touches (its data, as opposed to its traffic)."""
    from iosim.trace import tensor_layout

    shape = schedule.shape
    _, head_bytes = tensor_layout(schedule)
    sizes = {t.name: head_bytes[t.name] * (shape.batch_kv_heads if t.heads == "kv"
                                           else shape.batch_heads)
             for t in schedule.tensors}
    return sum(sizes[name] for name in kernel.tensors)


def _ape(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured * 100.0


def load_registers(data_dir: Path = DATA_DIR) -> dict:
    """Registers per thread of the real flash kernels, as Nsight Compute reported them
    (``occupancy.json``): (algorithm, head_dim, block_rows, block_cols, warp_rows) ->
    registers. Empty without the file. (The unfused pipelines' kernels keep their estimate:
    cuBLAS and the row kernels pick their CTA shape per problem size, unlike the IR's.)"""
    path = data_dir / "occupancy.json"
    if not path.is_file():
        return {}
    table = {}
    for rec in json.loads(path.read_text()).get("records", []):
        registers = rec.get("launch__registers_per_thread")
        if registers and rec.get("algorithm") in ("flash1", "flash2"):
            key = (rec["algorithm"], rec["head_dim"], rec["block_rows"], rec["block_cols"],
                   rec.get("warp_rows"))
            table[key] = int(registers)
    return table


def occupancy_check(data_dir: Path = DATA_DIR, hardware: str = HARDWARE) -> list[dict]:
    """The occupancy calculator against Nsight Compute, per real flash kernel variant of
    ``occupancy.json``: resident warps per SM with the measured registers and with the
    estimated ones, beside ncu's theoretical and achieved occupancy (as warps per SM)."""
    from iosim.occupancy import occupancy as resident

    path = data_dir / "occupancy.json"
    if not path.is_file():
        return []
    doc = json.loads(path.read_text())
    hw = iosim.load_hardware(hardware)
    settings = doc["settings"]["shape"]
    table = []
    for rec in doc.get("records", []):
        if rec.get("algorithm") not in ("flash1", "flash2") or not rec.get("passed", True):
            continue
        shape = iosim.AttentionShape(settings["batch"], settings["heads"], settings["seq_len"],
                                     rec["head_dim"])
        schedule = iosim.build_schedule(rec["algorithm"], shape, rec["block_rows"],
                                        rec["block_cols"], hw.sram_bytes_per_block,
                                        rows_per_warp=rec["warp_rows"])
        kernel = next(k for k in schedule.kernels if k.tensor_path == "mma_sync")
        estimated = resident(kernel, shape.head_dim, shape.seq_len, hw)
        measured = resident(dataclasses.replace(
            kernel, registers_per_thread=int(rec["launch__registers_per_thread"])),
            shape.head_dim, shape.seq_len, hw)
        to_warps = hw.max_warps_per_sm / 100.0
        table.append({
            "algorithm": rec["algorithm"], "head_dim": rec["head_dim"],
            "pair": f"{rec['block_rows']}x{rec['block_cols']}", "warp_rows": rec["warp_rows"],
            "threads": rec["threads"], "model_threads": kernel.threads,
            "registers_ncu": int(rec["launch__registers_per_thread"]),
            "registers_estimated": estimated.registers_per_thread,
            "warps_per_sm_model": measured.warps_per_sm,
            "warps_per_sm_model_estimated_registers": estimated.warps_per_sm,
            "warps_per_sm_ncu_theoretical":
                rec["sm__maximum_warps_per_active_cycle_pct"] * to_warps,
            "warps_per_sm_ncu_achieved":
                rec["sm__warps_active.avg.pct_of_peak_sustained_active"] * to_warps,
            "limiter_model": measured.limiter})
    return table


def _declare_registers(schedule, run: dict, registers: dict):
    """The schedule with the real flash kernel's measured registers per thread declared."""
    key = (run["algorithm"], run["head_dim"], run["block_rows"], run["block_cols"],
           run.get("warp_rows"))
    kernels = tuple(dataclasses.replace(k, registers_per_thread=registers[key])
                    if k.tensor_path == "mma_sync" and key in registers else k
                    for k in schedule.kernels)
    return dataclasses.replace(schedule, kernels=kernels)


def predict(run: dict, hardware: str = HARDWARE, registers: dict | None = None,
            memo: dict | None = None) -> dict:
    """iosim's per-kernel predictions for one measured run, under both memory models and both
    time models. The schedule is the real kernel's: its block sizes, its rows per warp (hence
    warps per CTA) and, where ``registers`` has them, its measured registers per thread.
    ``memo``: L2 replays to reuse across the runs of one group (:func:`iosim.simulate.replay`)."""
    from iosim.simulate import simulate_trace
    from iosim.trace import COMPUTE as COMPUTE_EVENT, build_trace

    hw = iosim.load_hardware(hardware)
    if run["algorithm"] == "flash3":  # the Hopper kernel: its ring depth, warps and registers
        schedule = flash3_schedule(run, hw)
    elif run.get("kv_heads") is not None:  # an inference-shape kernel: as built
        schedule = inference_schedule(run, hw)
    else:
        rows_per_warp = run.get("warp_rows") if run["algorithm"] in ("flash1", "flash2") \
            else None
        schedule = iosim.build_schedule(run["algorithm"], _shape(run), run["block_rows"],
                                        run["block_cols"], hw.sram_bytes_per_block,
                                        rows_per_warp=rows_per_warp,
                                        q_in_registers=(run["algorithm"] == "flash2"
                                                        and bool(run.get("q_in_registers"))))
        schedule = _declare_registers(schedule, run, registers or {})
    trace = build_trace(schedule)  # one trace, replayed under both models
    l2 = simulate_trace(trace, hw, "l2", memo=memo)
    # of the two-level model only the HBM bytes are reported: every tile loaded or stored
    # (its replay's counts, without its timing)
    two = {kt.name: int((kt.rows * kt.row_bytes)[kt.kind != COMPUTE_EVENT].sum())
           for kt in trace.kernels}
    large = LARGE_DATA_FACTOR * l2.hardware.l2_bytes
    kernels = {}
    for k in l2.kernels:
        data = _footprint_bytes(schedule, k)
        occ = k.occupancy
        kernels[k.name] = {"predicted_time_s": k.times_s["timed"],
                           "predicted_time_roofline_s": k.times_s["roofline"],
                           "predicted_bound": k.bound, "predicted_limiter": k.limiter,
                           "timed_limiter": k.timed_limiter,
                           "model_warps_per_sm": occ["warps_per_sm"],
                           "model_ctas_per_sm": occ["ctas_per_sm"],
                           "model_registers": occ["registers_per_thread"],
                           "registers_measured": not occ["registers_estimated"],
                           "flops": k.flops,
                           "data_bytes": data, "large_data": data >= large,
                           "predicted_hbm_bytes_l2": k.hbm_bytes,
                           "predicted_hbm_bytes_two_level": two[k.name]}
    return {"block_rows": l2.block_rows, "block_cols": l2.block_cols, "kernels": kernels}


#: The run fields a prediction depends on (the shape, the tiling and the kernel's resources).
PREDICTION_FIELDS = ("algorithm", "batch", "heads", "seq_len", "head_dim", "causal", "kv_heads",
                     "kv_seq_len", "block_rows", "block_cols", "warp_rows", "q_in_registers",
                     "num_splits", "threads", "stages", "registers", "combine_registers",
                     "consumer_warpgroups", "consumer_regs", "producer_regs")


def _prediction_key(run: dict) -> tuple:
    return tuple(run.get(name) for name in PREDICTION_FIELDS)


#: The unfused pipelines: their GEMMs and row kernels recur, event for event, across the three
#: algorithms and both causal flags of one (B, H, N, d).
UNFUSED = ("standard", "hf", "megatron")


def _group_key(run: dict) -> tuple:
    """Runs that may share kernels' L2 replays (simulated together, one memo): an unfused
    pipeline's runs of one (B, H, N, d); a fused kernel's runs of one shape, tiling and split
    count (they differ in warps, registers or ring depth, which the L2 replay may not see)."""
    shape = ("batch", "heads", "seq_len", "head_dim", "kv_heads", "kv_seq_len")
    if run["algorithm"] in UNFUSED:
        return ("unfused",) + tuple(run.get(name) for name in shape)
    return tuple(run.get(name) for name in ("algorithm", "causal") + shape
                 + ("block_rows", "block_cols", "num_splits", "q_in_registers"))


def _cost(run: dict) -> float:
    """Rough relative cost of predicting ``run`` (its score-matrix area)."""
    return run["batch"] * run["heads"] * run["seq_len"] * (run.get("kv_seq_len")
                                                          or run["seq_len"])


def predict_group(runs: list[dict], hardware: str = HARDWARE,
                  registers: dict | None = None) -> list[dict]:
    """:func:`predict` of each of ``runs``, in order, with one memo of L2 replays: a kernel
    that recurs among them (see :func:`_group_key`) is replayed once."""
    memo = {} if len(runs) > 1 else None  # (a lone run has nothing to share: no digests)
    return [predict(run, hardware, registers, memo) for run in runs]


def _passing(doc: dict) -> list[dict]:
    """The runs of a bench document that passed and were timed."""
    return [r for r in doc["runs"] if r.get("passed") and r.get("time_s")]


def forward_jobs(runs: list[dict], registers: dict | None = None, source: str = "bench",
                 hardware: str = HARDWARE) -> list[tuple]:
    """The prediction jobs of ``runs`` for :func:`predict_all`: runs of one configuration (a
    sweep repeated, the same kernel in two sweeps) predicted once, runs whose kernels may recur
    (:func:`_group_key`) in one job."""
    unique = list({_prediction_key(r): r for r in runs}.values())
    groups = {}
    for run in unique:
        groups.setdefault(_group_key(run), []).append(run)
    return [(source, "forward", group, registers, hardware) for group in groups.values()]


def backward_jobs(runs: list[dict], source: str = "backward",
                  hardware: str = HARDWARE) -> list[tuple]:
    """The prediction jobs of the backward ``runs`` (one each) for :func:`predict_all`."""
    unique = list({_prediction_key(r): r for r in runs}.values())
    return [(source, "backward", [run], None, hardware) for run in unique]


def _run_job(job: tuple) -> list:
    _, kind, runs, registers, hardware = job
    if kind == "forward":
        return predict_group(runs, hardware, registers)
    return [predict_backward(run, hardware) for run in runs]


def _job_cost(job: tuple) -> float:
    # a backward pass moves about three times the forward's bytes
    return sum(_cost(r) for r in job[2]) * (3 if job[1] == "backward" else 1)


def predict_all(jobs: list[tuple], workers: int | None = None,
                progress: bool = False) -> dict:
    """Run the prediction jobs (:func:`forward_jobs`, :func:`backward_jobs`) over ``workers``
    processes (default: every core), the largest first so that no worker is left with a long
    one at the end; one progress bar over all their runs. Returns, per job source, the
    predictions by :func:`_prediction_key` of their runs."""
    from tqdm import tqdm

    from iosim.workers import process_pool

    workers = workers or os.cpu_count() or 1
    jobs = sorted(jobs, key=lambda job: -_job_cost(job))
    out = {job[0]: {} for job in jobs}
    bar = tqdm(total=sum(len(job[2]) for job in jobs), desc="validation", unit="run",
               file=sys.stderr, disable=not progress, leave=False)

    def keep(job, predictions):
        for run, prediction in zip(job[2], predictions):
            out[job[0]][_prediction_key(run)] = prediction
        bar.update(len(job[2]))

    try:
        if workers > 1 and len(jobs) > 1:
            with process_pool(min(workers, len(jobs))) as pool:
                futures = {pool.submit(_run_job, job): job for job in jobs}
                for future in concurrent.futures.as_completed(futures):
                    keep(futures[future], future.result())
        else:
            for job in jobs:
                keep(job, _run_job(job))
    finally:
        bar.close()
    return out


def compare(doc: dict, hardware: str = HARDWARE, workers: int | None = None,
            registers: dict | None = None, progress: bool = False,
            predictions: dict | None = None) -> list[dict]:
    """One row per measured kernel of every passing run: predictions beside measurements.

    The runs are simulated in parallel over ``workers`` processes (default: every core), unless
    ``predictions`` (:func:`predict_all`'s for these runs) already holds them."""
    runs = _passing(doc)
    if predictions is None:
        predictions = predict_all(forward_jobs(runs, registers, "doc", hardware), workers,
                                  progress).get("doc", {})
    keys = [_prediction_key(r) for r in runs]
    by_key = predictions
    predictions = [by_key[key] for key in keys]
    rows = []
    for run, prediction in zip(runs, predictions):
        for measured in run["kernels"]:
            name = measured["name"]
            if name not in prediction["kernels"]:
                continue
            timing = measured.get("time_s") or {}
            row = {"algorithm": run["algorithm"], "batch": run["batch"], "heads": run["heads"],
                   "seq_len": run["seq_len"], "head_dim": run["head_dim"],
                   "causal": run["causal"], "block_rows": prediction["block_rows"],
                   "block_cols": prediction["block_cols"], "kernel": name,
                   "held_out": run["seq_len"] >= HELD_OUT_SEQ_LEN,
                   "measured_time_s": timing.get("median"),
                   "ncu_duration_s": measured.get("ncu_duration_s"),
                   **prediction["kernels"][name], "measured_dram_bytes": None,
                   # the real kernel's resources, where the harness recorded them
                   "kernel_smem_bytes": run.get("smem_bytes"), "threads": run.get("threads"),
                   "warp_rows": run.get("warp_rows"), "stages": run.get("stages"),
                   "kv_heads": run.get("kv_heads", run["heads"]),
                   "kv_seq_len": run.get("kv_seq_len", run["seq_len"]),
                   "num_splits": run.get("num_splits"), "sweep": run.get("sweep")}
            if measured.get("dram_read_bytes") is not None:
                row["measured_dram_bytes"] = (measured["dram_read_bytes"]
                                              + measured["dram_write_bytes"])
            if row["measured_time_s"]:
                row["time_ape"] = _ape(row["predicted_time_s"], row["measured_time_s"])
                row["time_ape_roofline"] = _ape(row["predicted_time_roofline_s"],
                                                row["measured_time_s"])
            if row["measured_dram_bytes"]:
                row["bytes_ape_l2"] = _ape(row["predicted_hbm_bytes_l2"],
                                           row["measured_dram_bytes"])
                row["bytes_ape_two_level"] = _ape(row["predicted_hbm_bytes_two_level"],
                                                  row["measured_dram_bytes"])
            rows.append(row)
    return rows


def _stats(values) -> tuple:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None, 0
    return statistics.median(values), max(values), len(values)


def summarise(rows: list[dict]) -> list[dict]:
    """Per algorithm (and overall): median and worst APE of time (timed model, roofline beside
    it; all shapes, then the shapes below and at/above HELD_OUT_SEQ_LEN apart) and of DRAM
    bytes."""
    table = []
    for algorithm in list(iosim.ALGORITHMS) + ["all"]:
        mine = [r for r in rows if algorithm in ("all", r["algorithm"])]
        if not mine:
            continue
        t_med, t_max, t_n = _stats(r.get("time_ape") for r in mine)
        f_med, f_max, _ = _stats(r.get("time_ape_roofline") for r in mine)
        d_med, d_max, _ = _stats(r.get("time_ape") for r in mine if not r["held_out"])
        h_med, h_max, _ = _stats(r.get("time_ape") for r in mine if r["held_out"])
        large = [r for r in mine if r["large_data"]]
        b_med, b_max, b_n = _stats(r.get("bytes_ape_l2") for r in large)
        w_med, w_max, _ = _stats(r.get("bytes_ape_two_level") for r in large)
        table.append({"algorithm": algorithm, "kernels_timed": t_n,
                      "time_ape_median_pct": t_med, "time_ape_worst_pct": t_max,
                      "time_ape_median_pct_roofline": f_med,
                      "time_ape_worst_pct_roofline": f_max,
                      "time_ape_median_pct_dev": d_med, "time_ape_worst_pct_dev": d_max,
                      "time_ape_median_pct_held_out": h_med,
                      "time_ape_worst_pct_held_out": h_max,
                      "kernels_profiled_large": b_n,
                      "bytes_ape_median_pct_l2": b_med, "bytes_ape_worst_pct_l2": b_max,
                      "bytes_ape_median_pct_two_level": w_med,
                      "bytes_ape_worst_pct_two_level": w_max})
    return table


def occupancy(rows: list[dict]) -> list[dict]:
    """Time error of the flash kernels, timed model and roofline, against the warps the model
    keeps resident per SM (the occupancy calculator on the real kernel's warps, shared memory
    and, where measured, registers)."""
    groups = {}
    for r in rows:
        if r["algorithm"] in ("flash1", "flash2") and r.get("time_ape") is not None:
            groups.setdefault((r["algorithm"], r["model_warps_per_sm"]), []).append(r)
    return [{"algorithm": a, "resident_warps_per_sm": w, "kernels": len(v),
             "time_ape_median_pct": statistics.median(x["time_ape"] for x in v),
             "time_ape_worst_pct": max(x["time_ape"] for x in v),
             "time_ape_median_pct_roofline": statistics.median(x["time_ape_roofline"] for x in v),
             "time_ape_worst_pct_roofline": max(x["time_ape_roofline"] for x in v)}
            for (a, w), v in sorted(groups.items())]


def _rank_agreement(members: list[dict], key: str) -> tuple:
    """(Spearman rho, predicted best, measured best, slowdown of the predicted best) of the
    predictions in ``key`` against the measured times."""
    from scipy.stats import spearmanr

    predicted = [m[key] for m in members]
    measured = [m["measured_time_s"] for m in members]
    rho = spearmanr(predicted, measured).statistic if len(members) > 2 else (
        1.0 if (predicted[0] - predicted[1]) * (measured[0] - measured[1]) > 0 else -1.0)
    best_predicted = members[int(np.argmin(predicted))]
    best_measured = members[int(np.argmin(measured))]
    ratio = best_predicted["measured_time_s"] / best_measured["measured_time_s"]
    return float(rho), best_predicted, best_measured, ratio


def block_choice(rows: list[dict]) -> list[dict]:
    """Per (algorithm, shape) with several block pairs: does the model rank them right?
    The timed model's ranking, and the roofline's beside it."""
    groups = {}
    for r in rows:
        if r["algorithm"] in ("flash1", "flash2") and r["measured_time_s"]:
            key = (r["algorithm"], r["batch"], r["heads"], r["seq_len"], r["head_dim"],
                   r["causal"])
            groups.setdefault(key, []).append(r)
    table = []
    for key, members in sorted(groups.items()):
        if len(members) < 2:
            continue
        rho, best_predicted, best_measured, ratio = _rank_agreement(members, "predicted_time_s")
        rho_roof, _, _, ratio_roof = _rank_agreement(members, "predicted_time_roofline_s")
        table.append({"algorithm": key[0], "batch": key[1], "heads": key[2], "seq_len": key[3],
                      "head_dim": key[4], "causal": key[5], "pairs": len(members),
                      "held_out": key[3] >= HELD_OUT_SEQ_LEN,
                      "spearman": rho,
                      "predicted_best": f"{best_predicted['block_rows']}x{best_predicted['block_cols']}",
                      "measured_best": f"{best_measured['block_rows']}x{best_measured['block_cols']}",
                      "predicted_best_slowdown_pct": (ratio - 1) * 100,
                      "within_5pct": ratio <= 1 + BEST_PAIR_TOLERANCE,
                      "spearman_roofline": rho_roof,
                      "within_5pct_roofline": ratio_roof <= 1 + BEST_PAIR_TOLERANCE})
    return table


def _scatter(path: Path, rows, x_key, panels, label):
    """Predicted against measured, one log-log panel per (y key, title) in ``panels``; each
    algorithm in its colour and marker of ``experiments._common``, ``standard`` last with an
    open marker (its GEMMs are the same kernels as hf's and megatron's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._common import draw_order, scatter_style

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.6), squeeze=False)
    algorithms = draw_order(dict.fromkeys(r["algorithm"] for r in rows))
    for ax, (y_key, title) in zip(axes[0], panels):
        values = []
        for algorithm in algorithms:
            pts = [(r[x_key], r[y_key]) for r in rows
                   if r["algorithm"] == algorithm and r.get(x_key) and r.get(y_key)]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, alpha=0.8, **scatter_style(
                    algorithm, size=32, label=f"{algorithm} ({len(pts)})"))
                values += list(xs) + list(ys)
        if values:
            lo, hi = min(values) / 1.5, max(values) * 1.5
            ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="y = x", zorder=2)
            ax.fill_between([lo, hi], [lo / 1.25, hi / 1.25], [lo * 1.25, hi * 1.25],
                            color="0.85", zorder=0, label="±25%")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_title(title)
        ax.legend(fontsize=8, loc="upper left", title="algorithm (kernels)", title_fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150)
    plt.close(fig)


def _roofline(path: Path, rows, hardware: str):
    """The measured kernels (FLOPs over ncu's DRAM bytes and over CUDA-event time) under the
    roofs of ``hardware``, in the colours and markers of ``experiments._common``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._common import draw_order, scatter_style

    hw = iosim.load_hardware(hardware)
    bw = hw.hbm_bandwidth_bytes_per_s
    peak, scalar = hw.tensor_rate("fp16") / 1e12, hw.scalar_flops_per_s / 1e12
    ridge = peak * 1e12 / bw
    fig, ax = plt.subplots(figsize=(7.4, 5.2))
    points = {}
    for algorithm in draw_order(dict.fromkeys(r["algorithm"] for r in rows)):
        pts = [(r["flops"] / r["measured_dram_bytes"], r["flops"] / r["measured_time_s"] / 1e12)
               for r in rows if r["algorithm"] == algorithm and r.get("measured_dram_bytes")
               and r.get("measured_time_s") and r.get("flops")]
        if pts:
            points[algorithm] = pts
    intensities = [x for pts in points.values() for x, _ in pts] or [ridge]
    achieved = [y for pts in points.values() for _, y in pts] or [scalar]
    x_lo, x_hi = min(min(intensities), scalar * 1e12 / bw) / 2, max(max(intensities), ridge) * 2
    y_lo, y_hi = min(achieved) / 2, peak * 2.5
    ai = np.logspace(np.log10(x_lo), np.log10(x_hi), 200)
    ax.plot(ai, np.minimum(ai * bw / 1e12, peak), "k-",
            label=f"{hw.name} roof: HBM {bw / 1e12:.2f} TB/s, tensor {peak:.0f} TFLOP/s fp16")
    ax.plot(ai, np.minimum(ai * bw / 1e12, scalar), "k--", lw=0.8,
            label=f"CUDA-core roof ({scalar:.1f} TFLOP/s fp32)")
    ax.plot([ridge, ridge], [y_lo, peak], color="black", linestyle=":", linewidth=1)
    ax.annotate(f"ridge {ridge:.0f} FLOP/B", (ridge, peak), textcoords="offset points",
                xytext=(0, 6), fontsize=8, ha="center", va="bottom")
    for algorithm, pts in points.items():
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, alpha=0.8, **scatter_style(
            algorithm, size=32, label=f"{algorithm} ({len(pts)} measured)"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_xlabel("arithmetic intensity (FLOP per DRAM byte, ncu)")
    ax.set_ylabel("achieved TFLOP/s (FLOPs / CUDA-event time)")
    ax.set_title(f"Measured kernels on the {hw.name} roofline")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150)
    plt.close(fig)


def _markdown(table: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in table]
    return "\n".join(lines)


def _backward_summary(rows: list[dict]) -> list[dict]:
    """Per backward kernel (and all): median and worst APE of time and DRAM bytes."""
    table = []
    for kernel in sorted({r["kernel"] for r in rows}) + ["all"]:
        mine = [r for r in rows if kernel in ("all", r["kernel"])]
        t_med, t_max, n = _stats(r["time_ape"] for r in mine)
        f_med, _, _ = _stats(r["time_ape_roofline"] for r in mine)
        b_med, b_max, _ = _stats(r["bytes_ape_l2"] for r in mine)
        table.append({"kernel": kernel, "kernels": n, "time_ape_median_pct": t_med,
                      "time_ape_worst_pct": t_max, "time_ape_median_pct_roofline": f_med,
                      "bytes_ape_median_pct_l2": b_med, "bytes_ape_worst_pct_l2": b_max})
    return table


#: The backward measurements: the unfused standard backward and flash2's (mma.sync), and the
#: Hopper kernel's (flash3: wgmma, TMA), each file written by ``python -m gpu.backward``.
BACKWARD_FILES = ("bench_backward.json", "bench_backward_flash3.json")


def backward_runs(data_dir: Path = DATA_DIR) -> list[dict]:
    """The runs of :data:`BACKWARD_FILES` that :func:`compare_backward` compares (none without
    the files): every gradient within the error rule, the fused kernel's current version, dQ
    added in whatever order the CTAs arrive."""
    documents = [json.loads((data_dir / name).read_text()) for name in BACKWARD_FILES
                 if (data_dir / name).is_file()]
    runs = []
    for run in (run for doc in documents for run in doc.get("runs", [])):
        # every gradient within the error rule (a dQ added with atomics in whatever order the
        # CTAs arrive may differ in its last bits between runs: timed all the same)
        grads = run.get("grads") or {}
        within = grads and all(g["rel_error"] <= g["error_bound"] for g in grads.values())
        if not (run.get("passed") or within):
            continue
        if run["algorithm"] != "standard" and not run.get("threads"):
            continue  # a fused kernel's earlier version, recorded without its resources
        if "(deterministic)" in run.get("dq_accumulation", ""):
            continue  # dQ added in a fixed order (CTAs wait their turn): not what the IR models
        runs.append(run)
    return runs


def predict_backward(run: dict, hardware: str = HARDWARE) -> dict:
    """iosim's prediction for each kernel of one measured backward run (``pass_="backward"``;
    a fused kernel as built: its warps and registers): kernel name -> time under both time
    models and HBM bytes under the l2 model."""
    from iosim.simulate import simulate_schedule

    hw = iosim.load_hardware(hardware)
    schedule = iosim.build_schedule(run["algorithm"], _shape(run), run.get("block_rows"),
                                    run.get("block_cols"), hw.sram_bytes_per_block,
                                    pass_="backward")
    if run.get("threads"):  # the fused kernel as built: its warps and registers
        schedule = dataclasses.replace(schedule, kernels=tuple(
            _as_built(k, run) if k.name == f"{run['algorithm']}_bwd" else k
            for k in schedule.kernels))
    return {k.name: {"timed": k.times_s["timed"], "roofline": k.times_s["roofline"],
                     "hbm_bytes": k.hbm_bytes}
            for k in simulate_schedule(schedule, hardware=hw).kernels}


def compare_backward(data_dir: Path = DATA_DIR, hardware: str = HARDWARE,
                     predictions: dict | None = None, workers: int | None = None) -> list[dict]:
    """The backward kernels measured in :data:`BACKWARD_FILES` (the unfused standard backward,
    flash2's and flash3's), each beside iosim's prediction for the same kernel
    (``pass_="backward"``): time under both time models, DRAM bytes under the l2 model. The runs are simulated over ``workers``
    processes unless ``predictions`` (:func:`predict_all`'s for them) already holds them."""
    runs = backward_runs(data_dir)
    if predictions is None:
        predictions = predict_all(backward_jobs(runs, "backward", hardware),
                                  workers).get("backward", {})
    rows = []
    for run in runs:
        predicted = predictions[_prediction_key(run)]
        for measured in run["kernels"]:
            kernel = predicted.get(measured["name"])
            timing = measured.get("time_s") or {}
            if kernel is None or not timing.get("median"):
                continue
            row = {"algorithm": run["algorithm"], "batch": run["batch"], "heads": run["heads"],
                   "seq_len": run["seq_len"], "head_dim": run["head_dim"],
                   "causal": run["causal"], "kernel": measured["name"],
                   "measured_time_s": timing["median"],
                   "predicted_time_s": kernel["timed"],
                   "predicted_time_roofline_s": kernel["roofline"],
                   "time_ape": _ape(kernel["timed"], timing["median"]),
                   "time_ape_roofline": _ape(kernel["roofline"], timing["median"]),
                   "measured_dram_bytes": None, "bytes_ape_l2": None}
            if measured.get("dram_read_bytes") is not None:
                row["measured_dram_bytes"] = (measured["dram_read_bytes"]
                                              + measured["dram_write_bytes"])
                row["bytes_ape_l2"] = _ape(kernel["hbm_bytes"], row["measured_dram_bytes"])
            rows.append(row)
    return rows


#: The flash3 kernel's measurements (gpu/flash3.py), kept apart from bench.json.
FLASH3_FILE = "bench_flash3.json"


def load_flash3(data_dir: Path = DATA_DIR) -> dict | None:
    """The flash3 kernel's measurements (``bench_flash3.json``, the bench schema), or None when
    the file is absent."""
    from gpu.schema import validate

    path = data_dir / FLASH3_FILE
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    problems = validate(doc)
    if problems:
        raise iosim.IosimError(f"{path} does not follow the bench schema: {problems[0]}")
    return doc


def flash3_schedule(run: dict, hw):
    """The schedule of a measured flash3 kernel: its tiles and ring depth (``stages``), its warps
    (``consumer_warpgroups`` of 4 computing warps; the rest of ``threads`` the producer's) and
    its registers per thread after setmaxnreg (``consumer_regs``, ``producer_regs``; else the
    launch's ``registers`` for every warp), where the record gives them."""
    schedule = iosim.build_schedule("flash3", _shape(run), run["block_rows"], run["block_cols"],
                                    hw.sram_bytes_per_block, stages=run.get("stages") or 2)
    changes = {}
    groups, threads = run.get("consumer_warpgroups"), run.get("threads")
    if groups and threads:
        changes.update(warps=threads // 32, producer_warps=threads // 32 - 4 * groups)
    consumer, producer = run.get("consumer_regs"), run.get("producer_regs")
    if consumer and producer:
        changes.update(registers_per_thread=int(consumer),
                       producer_registers_per_thread=int(producer))
    elif run.get("registers"):
        changes.update(registers_per_thread=int(run["registers"]),
                       producer_registers_per_thread=int(run["registers"]))
    kernel = dataclasses.replace(schedule.kernels[0], **changes)
    return dataclasses.replace(schedule, kernels=(kernel,))


def flash3_choice(rows: list[dict]) -> list[dict]:
    """Per shape with several measured flash3 variants: does the model rank their tiles and
    ring depths (Br x Bc / stages) as measured? (As :func:`block_choice`, timed and roofline.)"""
    groups = {}
    for r in rows:
        if r["algorithm"] == "flash3" and r["measured_time_s"]:
            key = (r["batch"], r["heads"], r["seq_len"], r["head_dim"], r["causal"])
            groups.setdefault(key, []).append(r)
    table = []
    for key, members in sorted(groups.items()):
        if len(members) < 2:
            continue
        label = lambda m: f"{m['block_rows']}x{m['block_cols']}/{m.get('stages')}"  # noqa: E731
        rho, best_predicted, best_measured, ratio = _rank_agreement(members, "predicted_time_s")
        rho_roof, _, _, ratio_roof = _rank_agreement(members, "predicted_time_roofline_s")
        table.append({"batch": key[0], "heads": key[1], "seq_len": key[2], "head_dim": key[3],
                      "causal": key[4], "variants": len(members), "spearman": rho,
                      "predicted_best": label(best_predicted),
                      "measured_best": label(best_measured),
                      "predicted_best_slowdown_pct": (ratio - 1) * 100,
                      "within_5pct": ratio <= 1 + BEST_PAIR_TOLERANCE,
                      "spearman_roofline": rho_roof,
                      "within_5pct_roofline": ratio_roof <= 1 + BEST_PAIR_TOLERANCE})
    return table


def flash3_runs(doc: dict) -> list[dict]:
    """The flash3 runs of ``bench_flash3.json`` (the file also holds flash2 beside flash3 on the
    same shapes: the section is flash3's)."""
    return [r for r in doc["runs"] if r["algorithm"] == "flash3"]


def flash3_lines(data_dir: Path, results_dir: Path, workers: int | None = None,
                 predictions: dict | None = None) -> list[str]:
    """The report's flash3 section: each measured kernel of ``bench_flash3.json`` beside its
    prediction (timed and roofline) and the APE statistics of the other algorithms; a line
    saying the file is absent otherwise. Writes ``validation_flash3.csv`` when there is data."""
    lines = ["### FlashAttention-3 forward (Hopper: TMA producer, wgmma consumers)", ""]
    doc = load_flash3(data_dir)
    if doc is None:
        return lines + [f"(no {FLASH3_FILE} in the data folder: the flash3 kernel has not been "
                        "measured yet)", ""]
    rows = compare(dict(doc, runs=flash3_runs(doc)), workers=workers, progress=True,
                   predictions=predictions)
    if not rows:
        return lines + [f"({FLASH3_FILE} holds no passing, timed flash3 run)", ""]
    write_csv(results_dir / "validation_flash3.csv", rows)
    summary = [s for s in summarise(rows) if s["algorithm"] == "flash3"]
    choice = flash3_choice(rows)
    device = doc["device"]
    return lines + [
        f"Measured on {device.get('name')} (driver {device.get('driver')}, CUDA runtime "
        f"{device.get('cuda_runtime')}) on {doc['date']}; {len(rows)} kernels of "
        f"`gpu/flash3.cu`, each simulated as built (its tiles, ring depth, warpgroups and "
        f"registers) on `{HARDWARE}`. Not in the tables above.",
        "",
        _markdown(rows, ["batch", "heads", "seq_len", "head_dim", "causal", "block_rows",
                         "block_cols", "stages", "measured_time_s", "predicted_time_s",
                         "predicted_time_roofline_s", "time_ape", "time_ape_roofline",
                         "timed_limiter", "model_warps_per_sm"]),
        "",
        _markdown(summary, ["algorithm", "kernels_timed", "time_ape_median_pct",
                            "time_ape_worst_pct", "time_ape_median_pct_roofline",
                            "time_ape_worst_pct_roofline", "kernels_profiled_large",
                            "bytes_ape_median_pct_l2", "bytes_ape_worst_pct_l2"]),
        "",
        "Ranking the measured variants of each shape (Br x Bc / stages):",
        "",
        (_markdown(choice, ["batch", "heads", "seq_len", "head_dim", "causal", "variants",
                            "spearman", "predicted_best", "measured_best",
                            "predicted_best_slowdown_pct", "within_5pct", "spearman_roofline",
                            "within_5pct_roofline"])
         if choice else "(one variant per shape: nothing to rank)"),
        ""]


#: The inference-shape kernels' measurements (python -m gpu.inference): GQA prefill (flash2)
#: and split-KV decode (flash_decoding), kept apart from bench.json.
INFERENCE_FILE = "bench_inference.json"


def inference_schedule(run: dict, hw):
    """The schedule of a measured inference-shape kernel as built: its K/V heads and length,
    tiles (a split CTA's rows are the group's, however many the kernel pads them to), splits,
    warps (``threads``), K/V ring depth (``stages``) and registers per thread."""
    shape = _shape(run)
    options = {}
    block_rows = run["block_rows"]
    if run["algorithm"] == "flash_decoding":
        options["num_splits"] = run.get("num_splits") or 1
        options["sm_count"] = hw.sm_count
        block_rows = min(block_rows, shape.group_size * shape.seq_len)
    else:
        options["rows_per_warp"] = run.get("warp_rows")
        options["q_in_registers"] = bool(run.get("q_in_registers"))
    schedule = iosim.build_schedule(run["algorithm"], shape, block_rows, run["block_cols"],
                                    hw.sram_bytes_per_block, **options)
    kernels = []
    for kernel in schedule.kernels:
        if kernel.name != "flash_decoding_combine":
            kernel = _as_built(kernel, run)
        elif run.get("combine_registers"):  # the combine kernel: its own registers only
            kernel = dataclasses.replace(kernel,
                                         registers_per_thread=int(run["combine_registers"]))
        kernels.append(kernel)
    return dataclasses.replace(schedule, kernels=tuple(kernels))


def _as_built(kernel, run: dict):
    """``kernel`` with the resources the measured kernel's record gives: its warps
    (``threads``), registers per thread (a warp-specialised kernel's: its consumers' and its
    producer's after setmaxnreg) and ring depth (``stages``)."""
    changes = {}
    if run.get("consumer_regs"):
        changes["registers_per_thread"] = int(run["consumer_regs"])
        if run.get("producer_regs"):
            changes["producer_registers_per_thread"] = int(run["producer_regs"])
    elif run.get("registers"):
        changes["registers_per_thread"] = int(run["registers"])
    if run.get("threads"):
        changes["warps"] = int(run["threads"]) // 32
    if run.get("stages"):
        changes["buffers"] = tuple(dataclasses.replace(b, stages=int(run["stages"]))
                                   if b.stages > 1 else b for b in kernel.buffers)
    return dataclasses.replace(kernel, **changes)


def inference_lines(data_dir: Path, results_dir: Path, workers: int | None = None,
                    predictions: dict | None = None) -> list[str]:
    """The report's section on the inference-shape kernels of ``bench_inference.json``: each
    measured kernel beside its prediction (timed and roofline; DRAM bytes where profiled), the
    APE statistics per algorithm and sweep; a line saying the file is absent otherwise.
    Writes ``validation_inference.csv``."""
    lines = ["### Inference shapes: GQA prefill and split-KV decode", ""]
    path = data_dir / INFERENCE_FILE
    if not path.is_file():
        return lines + [f"(no {INFERENCE_FILE} in the data folder: the inference kernels have "
                        "not been measured yet)", ""]
    doc = json.loads(path.read_text())
    rows = compare(doc, workers=workers, progress=True, predictions=predictions)
    if not rows:
        return lines + [f"({INFERENCE_FILE} holds no passing, timed run)", ""]
    write_csv(results_dir / "validation_inference.csv", rows)
    summary = []
    for (algorithm, sweep), members in sorted(_group(rows, ("algorithm", "sweep")).items()):
        time_med, time_worst, timed = _stats([r.get("time_ape") for r in members])
        roof_med, roof_worst, _ = _stats([r.get("time_ape_roofline") for r in members])
        bytes_med, bytes_worst, profiled = _stats([r.get("bytes_ape_l2") for r in members])
        summary.append({"algorithm": algorithm, "sweep": sweep, "kernels_timed": timed,
                        "time_ape_median_pct": time_med, "time_ape_worst_pct": time_worst,
                        "time_ape_median_pct_roofline": roof_med,
                        "time_ape_worst_pct_roofline": roof_worst,
                        "kernels_profiled": profiled, "bytes_ape_median_pct_l2": bytes_med,
                        "bytes_ape_worst_pct_l2": bytes_worst})
    write_csv(results_dir / "validation_inference_summary.csv", summary)
    device = doc["device"]
    split = [r for r in rows if r["kernel"] == "flash_decoding_split" and r.get("time_ape")]
    return lines + [
        f"Measured on {device.get('name')} (driver {device.get('driver')}) on {doc['date']} "
        f"with `python -m gpu.inference`: {len(rows)} kernels (GQA prefill with `flash2`, "
        "split-KV decode with `flash_decoding`), each simulated as built (its K/V heads and "
        f"length, tiles, splits, warps, ring depth and registers) on `{HARDWARE}`. Not in "
        "the tables above.",
        "",
        _markdown(summary, ["algorithm", "sweep", "kernels_timed", "time_ape_median_pct",
                            "time_ape_worst_pct", "time_ape_median_pct_roofline",
                            "time_ape_worst_pct_roofline", "kernels_profiled",
                            "bytes_ape_median_pct_l2", "bytes_ape_worst_pct_l2"]),
        "",
        "The decode kernels at the target shape (B=16, H=32, H_kv=8, N_kv=32768, d=128):",
        "",
        _markdown([r for r in split if r["sweep"] == "decode_target"],
                  ["num_splits", "block_cols", "stages", "measured_time_s",
                   "predicted_time_s", "predicted_time_roofline_s", "time_ape",
                   "measured_dram_bytes", "predicted_hbm_bytes_l2", "timed_limiter"]),
        ""]


def _group(rows: list[dict], keys: tuple) -> dict:
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def _figure_lines(rows: list[dict], hardware: str) -> list[str]:
    """The three validation figures with their captions (counts from ``rows``)."""
    timed = sum(1 for r in rows if r.get("measured_time_s"))
    profiled = sum(1 for r in rows if r.get("measured_dram_bytes"))
    large = sum(1 for r in rows if r.get("measured_dram_bytes") and r["large_data"])
    captions = [
        ("validation_time.png",
         f"Predicted against measured time of every kernel timed on the H100 ({timed} kernels, "
         "CUDA events), log-log: left the timed model (`iosim.timing`, the default), right the "
         "roofline (`iosim.cost`) on the same counts. Black line: y = x; grey band: ±25%. "
         "`standard` is drawn last as open circles: its GEMMs are the same kernels as hf's and "
         "megatron's. Points below the line are predicted faster than measured."),
        ("validation_bytes.png",
         f"Predicted HBM bytes (l2 model) against the DRAM bytes Nsight Compute measured for "
         f"every profiled kernel ({profiled}), log-log, with y = x and a ±25% band; the error "
         f"table covers the {large} whose data is at least {LARGE_DATA_FACTOR}x the L2."),
        ("validation_roofline.png",
         f"Each measured kernel on the `{hardware}` roofline: FLOPs per DRAM byte (Nsight "
         "Compute) against achieved TFLOP/s (FLOPs over CUDA-event time), under the HBM and "
         "fp16 tensor-core roof, the fp32 CUDA-core roof (dashed) and the ridge point."),
    ]
    lines = []
    for name, caption in captions:
        lines += [f"![{caption}]({name})", "", f"*{caption}* ([{name}]({name}))", ""]
    return lines


def _mma_by_warps(data_dir: Path) -> dict:
    """The calibration's mma.sync rate against resident warps per SM, if it was measured."""
    path = data_dir / "calibration.json"
    if not path.is_file():
        return {}
    results = json.loads(path.read_text()).get("results", {})
    return results.get("mma_sync_by_resident_warps", {}).get("flops_per_s", {})


def main(results_dir: Path, data_dir: Path = DATA_DIR) -> str:
    """Write the validation tables and figures; return the report section (markdown)."""
    results_dir = Path(results_dir)
    results_dir.mkdir(exist_ok=True)  # the results folder itself; its parent must exist
    doc = load_bench(data_dir)
    registers = load_registers(data_dir)
    # every simulation of the section (bench, flash3, inference shapes, backward) in one pool,
    # the largest first: no worker waits for another between the parts
    jobs = forward_jobs(_passing(doc), registers, "bench") + backward_jobs(
        backward_runs(data_dir))
    flash3 = load_flash3(data_dir)
    if flash3 is not None:
        jobs += forward_jobs(_passing(dict(flash3, runs=flash3_runs(flash3))), None, "flash3")
    if (data_dir / INFERENCE_FILE).is_file():
        inference = json.loads((data_dir / INFERENCE_FILE).read_text())
        jobs += forward_jobs(_passing(inference), None, "inference")
    predictions = predict_all(jobs, progress=True)
    rows = compare(doc, registers=registers, predictions=predictions.get("bench", {}))
    summary = summarise(rows)
    blocks = block_choice(rows)
    resident = occupancy(rows)
    occ_check = occupancy_check(data_dir)
    backward = compare_backward(data_dir, predictions=predictions.get("backward", {}))
    mma_by_warps = _mma_by_warps(data_dir)
    write_csv(results_dir / "validation_kernels.csv", rows)
    write_csv(results_dir / "validation_occupancy.csv", resident)
    if occ_check:
        write_csv(results_dir / "validation_occupancy_check.csv", occ_check)
    if backward:
        write_csv(results_dir / "validation_backward.csv", backward)
    write_csv(results_dir / "validation_summary.csv", summary)
    write_csv(results_dir / "validation_blocks.csv", blocks)
    _scatter(results_dir / "validation_time.png", rows, "measured_time_s",
             [("predicted_time_s", "Kernel time: timed model vs H100 (CUDA events)"),
              ("predicted_time_roofline_s", "Kernel time: roofline vs H100")], "time (s)")
    _scatter(results_dir / "validation_bytes.png", rows, "measured_dram_bytes",
             [("predicted_hbm_bytes_l2", "HBM bytes: iosim l2 model vs ncu")], "DRAM bytes")
    _roofline(results_dir / "validation_roofline.png", rows, HARDWARE)
    device = doc["device"]
    within = sum(1 for b in blocks if b["within_5pct"])
    within_roof = sum(1 for b in blocks if b["within_5pct_roofline"])
    rhos = [b["spearman"] for b in blocks]
    rhos_roof = [b["spearman_roofline"] for b in blocks]
    section = [
        "## Validation against the H100",
        f"Measured on {device.get('name')} (driver {device.get('driver')}, CUDA runtime "
        f"{device.get('cuda_runtime')}, CuPy {device.get('cupy')}) on {doc['date']}; "
        f"{len(rows)} kernels compared with iosim's `{HARDWARE}` preset, whose every figure "
        "comes from the microbenchmarks in `calibration.json` (rates, latencies, the SM clock), "
        "never from these runs. Each kernel is simulated as the real one was built: its block "
        "sizes, its warps per CTA (`warp_rows`), whether it keeps Q in registers and, where "
        "Nsight Compute measured them "
        "(`occupancy.json`), its registers per thread. Byte errors cover kernels whose data is "
        f"at least {LARGE_DATA_FACTOR}x the L2. The timed model was developed against the "
        f"shapes with N < {HELD_OUT_SEQ_LEN}; the columns `held_out` give its error on "
        f"N >= {HELD_OUT_SEQ_LEN} apart.",
        "",
        "### Absolute percentage error per algorithm",
        "`time_ape_*`: the timed model (`iosim.timing`, the default); `*_roofline`: the roofline "
        "(`iosim.cost`) on the same counts.",
        "",
        _markdown(summary, ["algorithm", "kernels_timed", "time_ape_median_pct",
                            "time_ape_worst_pct", "time_ape_median_pct_roofline",
                            "time_ape_worst_pct_roofline", "time_ape_median_pct_dev",
                            "time_ape_worst_pct_dev", "time_ape_median_pct_held_out",
                            "time_ape_worst_pct_held_out"]),
        "",
        _markdown(summary, ["algorithm", "kernels_profiled_large",
                            "bytes_ape_median_pct_l2", "bytes_ape_worst_pct_l2",
                            "bytes_ape_median_pct_two_level", "bytes_ape_worst_pct_two_level"]),
        "",
        f"### Block-size choice: timed model {within} of {len(blocks)} shapes with the predicted "
        f"best pair within {BEST_PAIR_TOLERANCE:.0%} of the measured best (roofline: "
        f"{within_roof}); median Spearman {statistics.median(rhos) if rhos else float('nan'):.2f} "
        f"(roofline {statistics.median(rhos_roof) if rhos_roof else float('nan'):.2f})",
        _markdown(blocks, ["algorithm", "batch", "seq_len", "head_dim", "causal", "pairs",
                           "spearman", "predicted_best", "measured_best",
                           "predicted_best_slowdown_pct", "within_5pct", "spearman_roofline",
                           "within_5pct_roofline"]),
        "",
        "### Flash kernels: time error against the warps resident per SM",
        "Resident warps per SM from the occupancy calculator on the real kernel's warps, shared "
        "memory and registers. The roofline has no latency term, so its error grows where few "
        "warps are resident; the timed model charges each warp its unhidden latency and lets "
        "the resident warps queue for the pipes and the bandwidth.",
        "",
        _markdown(resident, ["algorithm", "resident_warps_per_sm", "kernels",
                             "time_ape_median_pct", "time_ape_worst_pct",
                             "time_ape_median_pct_roofline", "time_ape_worst_pct_roofline"]),
        "",
        "### The backward pass",
        "Each kernel of the standard backward measured on the H100 (`bench_backward.json`: "
        "cuBLAS GEMMs and our softmax-backward row kernel) and of our FlashAttention-2 "
        "backward (`gpu/flash2_bwd.cu`, the current version: 8 warps, 64 x 128 tiles, dQ "
        "added with float32 atomics) and of the same algorithm on Hopper "
        "(`bench_backward_flash3.json`: `gpu/flash3_bwd.cu`, a producer warpgroup with TMA and "
        "two wgmma consumer warpgroups of 64 keys each, dQ added by TMA reductions) beside "
        "iosim's prediction for the same kernel (`--pass backward`, flash2 or flash3; the fused "
        "kernel as built: its warps, registers and ring depth). Runs whose "
        "gradients all meet the error rule are compared (an atomically added dQ may differ "
        "in its last bits between runs); the variant that adds dQ in a fixed order (its CTAs "
        "wait their turn, which the schedule does not model) and the earlier version of the "
        "kernel are left out.",
        "",
        (_markdown(_backward_summary(backward),
                   ["kernel", "kernels", "time_ape_median_pct", "time_ape_worst_pct",
                    "time_ape_median_pct_roofline", "bytes_ape_median_pct_l2",
                    "bytes_ape_worst_pct_l2"])
         if backward else "(no backward measurements in the data folder)"),
        "",
        "### The occupancy calculator against Nsight Compute",
        "Resident warps per SM of every real flash kernel variant (B=4, H=16, N=4096): the "
        "model's with the registers ncu reported, with the registers it estimates from the "
        "register tiles, and ncu's theoretical and achieved occupancy as warps per SM. "
        "Achieved falls below theoretical where the grid is smaller than the GPU (flash1: one "
        "CTA per batch·head).",
        "",
        (_markdown(occ_check, ["algorithm", "head_dim", "pair", "warp_rows", "threads",
                               "model_threads", "registers_ncu", "registers_estimated",
                               "warps_per_sm_model", "warps_per_sm_model_estimated_registers",
                               "warps_per_sm_ncu_theoretical", "warps_per_sm_ncu_achieved",
                               "limiter_model"])
         if occ_check else "(no occupancy.json in the data folder)"),
        "",
        "For comparison, `mma.sync` alone (calibration: one CTA per SM, every warp with 8 "
        "independent accumulations in flight) reaches, in TFLOP/s by resident warps per SM: "
        + (", ".join(f"{w}: {f / 1e12:.0f}" for w, f in mma_by_warps.items())
           if mma_by_warps else "(not in this calibration file)")
        + ". The tensor cores themselves need few warps; the flash kernels' warps alternate "
        "dependent MMAs, ldmatrix loads and softmax arithmetic, and need more of them resident "
        "to hide those latencies.",
        "",
    ] + _figure_lines(rows, HARDWARE)
    section += flash3_lines(data_dir, results_dir, predictions=predictions.get("flash3", {}))
    section += inference_lines(data_dir, results_dir,
                               predictions=predictions.get("inference", {}))
    text = "\n".join(section) + "\n"
    write_text(results_dir / "validation.md", text)
    return text


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("results")
    print(main(out))
