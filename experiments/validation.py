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
                                "fp16", run["causal"])


def _footprint_bytes(schedule, kernel) -> int:
    """Bytes of the distinct tensors a kernel touches (its data, as opposed to its traffic)."""
    shape = schedule.shape
    extents = {"N": shape.seq_len, "d": shape.head_dim, "1": 1}
    sizes = {t.name: extents[t.rows] * extents[t.cols] * t.elem_bytes * shape.batch_heads
             for t in schedule.tensors}
    return sum(sizes[name] for name in kernel.tensors)


def _ape(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured * 100.0


def predict(run: dict, hardware: str = HARDWARE) -> dict:
    """iosim's per-kernel predictions for one measured run, under both memory models."""
    from iosim.simulate import simulate_trace
    from iosim.trace import build_trace

    hw = iosim.load_hardware(hardware)
    schedule = iosim.build_schedule(run["algorithm"], _shape(run), run["block_rows"],
                                    run["block_cols"], hw.sram_bytes_per_block)
    trace = build_trace(schedule)  # one trace, replayed under both models
    sims = {model: simulate_trace(trace, hw, model) for model in ("l2", "two-level")}
    l2, two = sims["l2"], {k.name: k for k in sims["two-level"].kernels}
    large = LARGE_DATA_FACTOR * l2.hardware.l2_bytes
    kernels = {}
    for k in l2.kernels:
        data = _footprint_bytes(schedule, k)
        kernels[k.name] = {"predicted_time_s": k.predicted_time_s, "predicted_bound": k.bound,
                           "predicted_limiter": k.limiter, "flops": k.flops,
                           "data_bytes": data, "large_data": data >= large,
                           "predicted_hbm_bytes_l2": k.hbm_bytes,
                           "predicted_hbm_bytes_two_level": two[k.name].hbm_bytes}
    return {"block_rows": l2.block_rows, "block_cols": l2.block_cols, "kernels": kernels}


def compare(doc: dict, hardware: str = HARDWARE, workers: int | None = None) -> list[dict]:
    """One row per measured kernel of every passing run: predictions beside measurements.

    The runs are simulated in parallel over ``workers`` processes (default: every core)."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    runs = [r for r in doc["runs"] if r.get("passed") and r.get("time_s")]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(runs) > 1:
        # the largest first, so that no worker is left with a long one at the end
        order = sorted(range(len(runs)), key=lambda i: -runs[i]["batch"] * runs[i]["seq_len"] ** 2)
        with ProcessPoolExecutor(workers) as pool:
            done = dict(zip(order, pool.map(partial(predict, hardware=hardware),
                                            [runs[i] for i in order])))
        predictions = [done[i] for i in range(len(runs))]
    else:
        predictions = [predict(r, hardware) for r in runs]
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
                   "measured_time_s": timing.get("median"),
                   "ncu_duration_s": measured.get("ncu_duration_s"),
                   **prediction["kernels"][name], "measured_dram_bytes": None,
                   # the real kernel's resources, where the harness recorded them
                   "kernel_smem_bytes": run.get("smem_bytes"), "threads": run.get("threads")}
            if measured.get("dram_read_bytes") is not None:
                row["measured_dram_bytes"] = (measured["dram_read_bytes"]
                                              + measured["dram_write_bytes"])
            if row["measured_time_s"]:
                row["time_ape"] = _ape(row["predicted_time_s"], row["measured_time_s"])
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
    """Per algorithm (and overall): median and worst APE of time and of DRAM bytes."""
    table = []
    for algorithm in list(iosim.ALGORITHMS) + ["all"]:
        mine = [r for r in rows if algorithm in ("all", r["algorithm"])]
        if not mine:
            continue
        t_med, t_max, t_n = _stats(r.get("time_ape") for r in mine)
        large = [r for r in mine if r["large_data"]]
        b_med, b_max, b_n = _stats(r.get("bytes_ape_l2") for r in large)
        w_med, w_max, _ = _stats(r.get("bytes_ape_two_level") for r in large)
        table.append({"algorithm": algorithm, "kernels_timed": t_n,
                      "time_ape_median_pct": t_med, "time_ape_worst_pct": t_max,
                      "kernels_profiled_large": b_n,
                      "bytes_ape_median_pct_l2": b_med, "bytes_ape_worst_pct_l2": b_max,
                      "bytes_ape_median_pct_two_level": w_med,
                      "bytes_ape_worst_pct_two_level": w_max})
    return table


def occupancy(rows: list[dict], sram_bytes_per_sm: int, sm_count: int) -> list[dict]:
    """Time error of the flash kernels against the warps the real kernel keeps on an SM
    (CTAs per SM as its shared memory and its grid allow, times its warps per CTA): the cost
    model has no latency-hiding term, so it misses most where few warps are resident."""
    groups = {}
    for r in rows:
        if r["algorithm"] in ("flash1", "flash2") and r.get("kernel_smem_bytes") \
                and r.get("threads") and r.get("time_ape") is not None:
            grid = r["batch"] * r["heads"]  # flash1: one CTA per batch·head
            if r["algorithm"] == "flash2":
                grid *= math.ceil(r["seq_len"] / r["block_rows"])
            ctas = max(1, min(sram_bytes_per_sm // r["kernel_smem_bytes"],
                              math.ceil(grid / sm_count)))
            warps = ctas * r["threads"] // 32
            groups.setdefault((r["algorithm"], warps), []).append(r["time_ape"])
    return [{"algorithm": a, "resident_warps_per_sm": w, "kernels": len(v),
             "time_ape_median_pct": statistics.median(v), "time_ape_worst_pct": max(v)}
            for (a, w), v in sorted(groups.items())]


def block_choice(rows: list[dict]) -> list[dict]:
    """Per (algorithm, shape) with several block pairs: does the model rank them right?"""
    from scipy.stats import spearmanr

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
        predicted = [m["predicted_time_s"] for m in members]
        measured = [m["measured_time_s"] for m in members]
        rho = spearmanr(predicted, measured).statistic if len(members) > 2 else (
            1.0 if (predicted[0] - predicted[1]) * (measured[0] - measured[1]) > 0 else -1.0)
        best_predicted = members[int(np.argmin(predicted))]
        best_measured = members[int(np.argmin(measured))]
        ratio = best_predicted["measured_time_s"] / best_measured["measured_time_s"]
        table.append({"algorithm": key[0], "batch": key[1], "heads": key[2], "seq_len": key[3],
                      "head_dim": key[4], "causal": key[5], "pairs": len(members),
                      "spearman": float(rho),
                      "predicted_best": f"{best_predicted['block_rows']}x{best_predicted['block_cols']}",
                      "measured_best": f"{best_measured['block_rows']}x{best_measured['block_cols']}",
                      "predicted_best_slowdown_pct": (ratio - 1) * 100,
                      "within_5pct": ratio <= 1 + BEST_PAIR_TOLERANCE})
    return table


def _scatter(path: Path, rows, x_key, y_key, label, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    markers = {"standard": "o", "hf": "s", "megatron": "^", "flash1": "D", "flash2": "*"}
    values = []
    for algorithm, marker in markers.items():
        pts = [(r[x_key], r[y_key]) for r in rows
               if r["algorithm"] == algorithm and r.get(x_key) and r.get(y_key)]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, marker=marker, label=algorithm, alpha=0.75, s=28)
            values += list(xs) + list(ys)
    if values:
        lo, hi = min(values) / 1.5, max(values) * 1.5
        ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="y = x")
        ax.fill_between([lo, hi], [lo / 1.25, hi / 1.25], [lo * 1.25, hi * 1.25],
                        color="0.85", zorder=0, label="±25%")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"measured {label}")
    ax.set_ylabel(f"predicted {label}")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _roofline(path: Path, rows, hardware: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hw = iosim.load_hardware(hardware)
    fig, ax = plt.subplots(figsize=(7, 5))
    ai = np.logspace(-1, 4, 200)
    bw, peak = hw.hbm_bandwidth_bytes_per_s, hw.tensor_rate("fp16")
    ax.plot(ai, np.minimum(ai * bw, peak) / 1e12, "k-", label=f"{hw.name} roof (fp16 tensor)")
    ax.plot(ai, np.minimum(ai * bw, hw.scalar_flops_per_s) / 1e12, "k--", lw=0.8,
            label="CUDA-core fp32 roof")
    markers = {"standard": "o", "hf": "s", "megatron": "^", "flash1": "D", "flash2": "*"}
    for algorithm, marker in markers.items():
        pts = [(r["flops"] / r["measured_dram_bytes"], r["flops"] / r["measured_time_s"] / 1e12)
               for r in rows if r["algorithm"] == algorithm and r.get("measured_dram_bytes")
               and r.get("measured_time_s")]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, marker=marker, label=f"{algorithm} (measured)", alpha=0.75, s=28)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per DRAM byte, ncu)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"Measured kernels on the {hw.name} roofline")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _markdown(table: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in table]
    return "\n".join(lines)


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
    doc = load_bench(data_dir)
    rows = compare(doc)
    summary = summarise(rows)
    blocks = block_choice(rows)
    hw = iosim.load_hardware(HARDWARE)
    resident = occupancy(rows, hw.sram_bytes_per_sm, hw.sm_count)
    mma_by_warps = _mma_by_warps(data_dir)
    write_csv(results_dir / "validation_kernels.csv", rows)
    write_csv(results_dir / "validation_occupancy.csv", resident)
    write_csv(results_dir / "validation_summary.csv", summary)
    write_csv(results_dir / "validation_blocks.csv", blocks)
    _scatter(results_dir / "validation_time.png", rows, "measured_time_s", "predicted_time_s",
             "time (s)", "Kernel time: iosim (l2 model) vs H100 (CUDA events)")
    _scatter(results_dir / "validation_bytes.png", rows, "measured_dram_bytes",
             "predicted_hbm_bytes_l2", "DRAM bytes", "HBM bytes: iosim l2 model vs ncu")
    _roofline(results_dir / "validation_roofline.png", rows, HARDWARE)
    device = doc["device"]
    within = sum(1 for b in blocks if b["within_5pct"])
    section = [
        "## Validation against the H100",
        f"Measured on {device.get('name')} (driver {device.get('driver')}, CUDA runtime "
        f"{device.get('cuda_runtime')}, CuPy {device.get('cupy')}) on {doc['date']}; "
        f"{len(rows)} kernels compared with iosim's `{HARDWARE}` preset. Byte errors cover "
        f"kernels whose data is at least {LARGE_DATA_FACTOR}x the L2.",
        "",
        "### Absolute percentage error per algorithm",
        _markdown(summary, ["algorithm", "kernels_timed", "time_ape_median_pct",
                            "time_ape_worst_pct", "kernels_profiled_large",
                            "bytes_ape_median_pct_l2", "bytes_ape_worst_pct_l2",
                            "bytes_ape_median_pct_two_level", "bytes_ape_worst_pct_two_level"]),
        "",
        f"### Block-size choice ({within} of {len(blocks)} shapes: predicted best pair within "
        f"{BEST_PAIR_TOLERANCE:.0%} of the measured best)",
        _markdown(blocks, ["algorithm", "batch", "seq_len", "head_dim", "causal", "pairs",
                           "spearman", "predicted_best", "measured_best",
                           "predicted_best_slowdown_pct", "within_5pct"]),
        "",
        "### Flash kernels: time error against the warps resident per SM",
        "The real kernel's shared memory (double-buffered K/V tiles) and warps per CTA, as the "
        "harness recorded them, set how many warps an SM holds. The cost model has no "
        "latency-hiding term, so its error grows where few warps are resident.",
        "",
        _markdown(resident, ["algorithm", "resident_warps_per_sm", "kernels",
                             "time_ape_median_pct", "time_ape_worst_pct"]),
        "",
        "For comparison, `mma.sync` alone (calibration: one CTA per SM, every warp with 8 "
        "independent accumulations in flight) reaches, in TFLOP/s by resident warps per SM: "
        + (", ".join(f"{w}: {f / 1e12:.0f}" for w, f in mma_by_warps.items())
           if mma_by_warps else "(not in this calibration file)")
        + ". The tensor cores themselves need few warps; the flash kernels' warps alternate "
        "dependent MMAs, ldmatrix loads and softmax arithmetic, and need more of them resident "
        "to hide those latencies.",
        "",
        "![time](validation_time.png) ![bytes](validation_bytes.png) "
        "![roofline](validation_roofline.png)",
    ]
    text = "\n".join(section) + "\n"
    write_text(results_dir / "validation.md", text)
    return text


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("results")
    print(main(out))
