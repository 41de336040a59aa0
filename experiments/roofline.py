"""Roofline plots for the A100 and the measured H100: every kernel of every attention algorithm
(GPT-2 medium attention, causal, l2 model) and every operator of the catalogue, placed by
arithmetic intensity (FLOP per HBM byte, as the engine counts them) and attained FLOP/s (FLOPs
over predicted time), under the HBM roof, the tensor-core roof and the CUDA-core roof."""
from __future__ import annotations

import math
from pathlib import Path

from iosim import catalogue
from iosim.hardware import load_hardware
from iosim.results import markdown_table, save_figure, write_csv

from ._common import (COLORS, MARKERS, Section, SimJob, cli, close, is_quick,
                      parallel_map, simulate_many)
from .figure2_table import gpt2_medium

HARDWARE = ("a100-40gb", "h100-measured")
MODEL = "l2"
ALGORITHMS = ("standard", "hf", "megatron", "flash1", "flash2")
COLUMNS = ("hardware", "family", "name", "flops", "hbm_bytes", "arithmetic_intensity",
           "predicted_time_s", "attained_flops_per_s", "bound", "limiter")


def _count_operator(job) -> dict:
    name, hardware, quick = job
    kwargs = catalogue.QUICK_SIZES[name] if quick else {}
    op = catalogue.BUILDERS[name](**kwargs)
    r = catalogue.count(op, hardware, MODEL)
    return {"hardware": hardware, "family": "catalogue", "name": name,
            "workload": op.workload, "flops": r.flops, "hbm_bytes": r.hbm_bytes,
            "arithmetic_intensity": r.arithmetic_intensity,
            "predicted_time_s": r.predicted_time_s, "bound": r.bound, "limiter": r.limiter}


def points(quick: bool) -> list[dict]:
    shape = gpt2_medium(quick)
    jobs = [SimJob(alg, shape, hw, MODEL) for hw in HARDWARE for alg in ALGORITHMS]
    rows = []
    for job, res in zip(jobs, simulate_many(jobs, desc="roofline")):
        for k in res["kernels"]:
            rows.append({"hardware": job.hardware, "family": job.algorithm,
                         "name": f"{job.algorithm}:{k['name']}", "workload": shape.describe(),
                         "flops": k["flops"], "hbm_bytes": k["hbm_bytes"],
                         "arithmetic_intensity": k["arithmetic_intensity"],
                         "predicted_time_s": k["predicted_time_s"], "bound": k["bound"],
                         "limiter": k["limiter"]})
    rows += parallel_map(_count_operator, [(name, hw, quick) for hw in HARDWARE
                                           for name in catalogue.BUILDERS], desc="catalogue")
    for r in rows:
        t = r["predicted_time_s"]
        r["attained_flops_per_s"] = r["flops"] / t if t else 0.0
    return rows


def _merge_duplicates(rows: list[dict]) -> list[dict]:
    """One marker per distinct (intensity, FLOP/s) point; names of coinciding kernels joined."""
    merged: dict = {}
    for r in rows:
        key = (round(math.log10(r["arithmetic_intensity"]), 3),
               round(math.log10(r["attained_flops_per_s"]), 3), r["name"].split(":")[-1])
        if key in merged:
            merged[key]["families"].append(r["family"])
        else:
            merged[key] = dict(r, families=[r["family"]])
    return list(merged.values())


def plot(rows: list[dict], hardware: str, path: Path) -> None:
    hw = load_hardware(hardware)
    bw, tensor, scalar = hw.hbm_bandwidth_bytes_per_s, hw.tensor_rate("fp16"), \
        hw.scalar_flops_per_s
    import matplotlib.pyplot as plt

    fig, (ax, key_ax) = plt.subplots(1, 2, figsize=(12.6, 7.4),
                                     gridspec_kw={"width_ratios": [2.7, 1]})
    ax.grid(True, alpha=0.3)
    x_lo, x_hi = 0.05, 2e4
    xs = [x_lo * (x_hi / x_lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(x * bw, tensor) for x in xs], color="black", linewidth=1.6,
            label=f"HBM roof ({bw / 1e12:.2f} TB/s) / tensor-core roof "
                  f"({tensor / 1e12:.0f} TFLOP/s fp16)")
    ax.plot(xs, [min(x * bw, scalar) for x in xs], color="gray", linewidth=1.2,
            linestyle="--", label=f"CUDA-core roof ({scalar / 1e12:.1f} TFLOP/s fp32)")
    ridge, scalar_ridge = tensor / bw, scalar / bw
    ax.axvline(ridge, color="black", linestyle=":", linewidth=1)
    ax.annotate(f"ridge point {ridge:.0f} FLOP/B", (ridge, tensor), textcoords="offset points",
                xytext=(0, 12), fontsize=8, ha="center")
    ax.axvline(scalar_ridge, color="gray", linestyle=":", linewidth=1)
    ax.annotate(f"CUDA-core ridge\n{scalar_ridge:.1f} FLOP/B", (scalar_ridge, scalar),
                textcoords="offset points", xytext=(6, -28), fontsize=8, color="dimgray")
    shown = [r for r in rows if r["hardware"] == hardware and r["flops"] > 0
             and r["hbm_bytes"] > 0 and r["attained_flops_per_s"] > 0]
    seen_families = set()
    key_lines = []
    merged = sorted(_merge_duplicates(shown),
                    key=lambda r: (r["arithmetic_intensity"], r["attained_flops_per_s"]))
    offsets = ((-4, 7), (6, -10), (-12, -10), (7, 5))
    for i, r in enumerate(merged, 1):
        family = r["families"][0]
        label = None if family in seen_families else (
            "op catalogue" if family == "catalogue" else family)
        seen_families.add(family)
        ax.scatter(r["arithmetic_intensity"], r["attained_flops_per_s"], s=42,
                   marker=MARKERS[family], color=COLORS[family], edgecolor="black",
                   linewidth=0.5, zorder=3, label=label)
        ax.annotate(str(i), (r["arithmetic_intensity"], r["attained_flops_per_s"]),
                    textcoords="offset points", xytext=offsets[i % len(offsets)], fontsize=7,
                    fontweight="bold", ha="center", va="center", zorder=4)
        kernel = r["name"].split(":")[-1]
        who = "op catalogue" if family == "catalogue" else ", ".join(r["families"])
        key_lines.append(f"{i:>2}  {kernel} [{who}]\n     {r['arithmetic_intensity']:.3g} "
                         f"FLOP/B, {r['attained_flops_per_s'] / 1e12:.3g} TFLOP/s, "
                         f"{r['limiter']}")
    key_ax.axis("off")
    key_ax.text(0.0, 1.0, "\n".join(key_lines), va="top", ha="left", family="monospace",
                fontsize=8.4, transform=key_ax.transAxes)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(min(scalar, min((r["attained_flops_per_s"] for r in shown), default=scalar))
                / 20, tensor * 3)
    ax.set_xlabel("arithmetic intensity (FLOP per HBM byte)")
    ax.set_ylabel("attained FLOP/s (FLOPs / predicted time)")
    ax.set_title(f"Roofline, {hw.name}: attention kernels (GPT-2 medium, causal, l2 model) "
                 "and the op catalogue", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    close(fig)


def main(results_dir: Path, quick: bool | None = None) -> list[Section]:
    quick = is_quick(quick)
    results_dir = Path(results_dir)
    rows = points(quick)
    write_csv(results_dir / "roofline_points.csv", rows, COLUMNS + ("workload",))
    figures = []
    for hw in HARDWARE:
        name = f"roofline_{hw}.png"
        plot(rows, hw, results_dir / name)
        figures.append((name, f"Roofline of {hw} with every attention kernel and catalogue op"))
    table = [{"hardware": r["hardware"], "kernel / op": r["name"],
              "GFLOP": f"{r['flops'] / 1e9:.3g}", "HBM GB": f"{r['hbm_bytes'] / 1e9:.3g}",
              "FLOP/B": ("inf" if math.isinf(r["arithmetic_intensity"])
                         else f"{r['arithmetic_intensity']:.3g}"),
              "time ms": f"{r['predicted_time_s'] * 1e3:.3g}",
              "TFLOP/s": f"{r['attained_flops_per_s'] / 1e12:.3g}",
              "bound (limiter)": f"{r['bound']} ({r['limiter']})"} for r in rows]
    ops = sorted({r["workload"] for r in rows if r["family"] == "catalogue"})
    shape = gpt2_medium(quick)
    body = f"""Attention kernels: {shape.describe()}, {MODEL} model, default block sizes; each
kernel is one point. Operators of the catalogue (`iosim.catalogue`, counted by the same
engine): large matmul, small-d matmul (the QKᵀ shape), ReLU, dropout, row sum, softmax,
LayerNorm, BatchNorm (workloads: {'; '.join(ops)}). Arithmetic intensity is FLOPs (tensor +
CUDA core) over HBM bytes as the engine counts them — under the l2 model, output still dirty in
L2 when a kernel ends is not that kernel's HBM writes (as Nsight Compute measures a kernel), so
an op whose output is not much larger than the L2 sits right of its two-level place (ReLU at
about 0.28 FLOP/B rather than 0.25; the small-d matmul near 90-100 rather than 32); kernels that do no arithmetic (flash1's
init) have no place on a log axis and are only in the table. A point below the HBM roof is held
back by another resource (the L2 or SRAM bandwidth, CUDA-core or special-function work in a
tensor-core kernel, idle SMs, or — for the flash kernels — the lower warp-level `mma.sync`
tensor rate the cost model gives them), as its `limiter` says.

{markdown_table(table)}
"""
    return [Section("Roofline: attention kernels and the op catalogue", body, figures=figures,
                    data=["roofline_points.csv"])]


if __name__ == "__main__":
    cli(main, "roofline")
