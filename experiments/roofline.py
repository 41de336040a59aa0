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

from ._common import (Section, SimJob, cli, close, draw_order, is_quick, label,
                      parallel_map, place_labels, scatter_style, simulate_many)
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


def _positive(r: dict) -> bool:
    return r["flops"] > 0 and r["hbm_bytes"] > 0 and r["attained_flops_per_s"] > 0


def _coords(r: dict) -> tuple:
    return (round(math.log10(r["arithmetic_intensity"]), 3),
            round(math.log10(r["attained_flops_per_s"]), 3))


def numbering(rows: list[dict]) -> list[dict]:
    """One numbered entry per kernel or op, the same numbers on every hardware's plot.

    Kernels of one name from several algorithms (standard's, hf's and megatron's ``qk_gemm``)
    share an entry when they coincide on every hardware. Entries are numbered by their place on
    the first hardware's plot (intensity, then FLOP/s). Each entry: ``number``, ``kernel``,
    ``families`` and ``names`` (the rows' ``name`` values)."""
    shown = [r for r in rows if _positive(r)]
    coords: dict = {}  # (family, name) -> {hardware: coords}
    for r in shown:
        coords.setdefault((r["family"], r["name"]), {})[r["hardware"]] = _coords(r)
    groups: dict = {}  # (kernel, coordinates on every hardware) -> [(family, name), ...]
    for (family, name), where in coords.items():
        kernel = name.split(":")[-1]
        key = (kernel, tuple(sorted(where.items())))
        groups.setdefault(key, []).append((family, name))
    first = HARDWARE[0]
    by_name = {(r["hardware"], r["name"]): r for r in shown}

    def place(key):
        members = groups[key]
        r = by_name.get((first, members[0][1])) or next(
            by_name[(hw, members[0][1])] for hw in HARDWARE if (hw, members[0][1]) in by_name)
        return (r["arithmetic_intensity"], r["attained_flops_per_s"], key[0])

    entries = []
    for number, key in enumerate(sorted(groups, key=place), 1):
        members = groups[key]
        entries.append({"number": number, "kernel": key[0],
                        "families": [f for f, _ in members], "names": [n for _, n in members]})
    return entries


def _join_close(spots: list[dict], decades: float = 0.03) -> list[dict]:
    """Spots whose markers overlap (within ``decades`` on both log axes) share one label."""
    joined: list[dict] = []
    for spot in spots:
        x, y = (math.log10(v) for v in spot["xy"])
        for other in joined:
            ox, oy = (math.log10(v) for v in other["xy"])
            if abs(x - ox) <= decades and abs(y - oy) <= decades:
                other["numbers"] = sorted(other["numbers"] + spot["numbers"])
                break
        else:
            joined.append(dict(spot))
    return joined


def plot(rows: list[dict], hardware: str, path: Path, entries: list[dict] | None = None) -> None:
    """The roofline of ``hardware`` with its rows as points, numbered as in ``entries`` (from
    :func:`numbering`; computed from ``rows`` if not given), names in a key beside it."""
    hw = load_hardware(hardware)
    tera = 1e12
    bw, tensor, scalar = hw.hbm_bandwidth_bytes_per_s, hw.tensor_rate("fp16") / tera, \
        hw.scalar_flops_per_s / tera
    import matplotlib.pyplot as plt

    entries = numbering(rows) if entries is None else entries
    shown = {r["name"]: r for r in rows if r["hardware"] == hardware and _positive(r)}
    fig, (ax, key_ax) = plt.subplots(1, 2, figsize=(12.6, 7.4),
                                     gridspec_kw={"width_ratios": [2.7, 1]})
    ax.grid(True, alpha=0.3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ridge, scalar_ridge = tensor * tera / bw, scalar * tera / bw
    intensities = [r["arithmetic_intensity"] for r in shown.values()] or [scalar_ridge, ridge]
    attained = [r["attained_flops_per_s"] / tera for r in shown.values()] or [scalar]
    x_lo = min(min(intensities), scalar_ridge) / 3
    x_hi = max(max(intensities), ridge) * 3
    y_lo, y_hi = min(min(attained), scalar) / 4, tensor * 3
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    xs = [x_lo * (x_hi / x_lo) ** (i / 200) for i in range(201)]
    hbm_roof = [min(x * bw / tera, tensor) for x in xs]
    scalar_roof = [min(x * bw / tera, scalar) for x in xs]
    ax.plot(xs, hbm_roof, color="black", linewidth=1.6,
            label=f"HBM roof ({bw / 1e12:.2f} TB/s) / tensor-core roof "
                  f"({tensor:.0f} TFLOP/s fp16)")
    ax.plot(xs, scalar_roof, color="gray", linewidth=1.2, linestyle="--",
            label=f"CUDA-core roof ({scalar:.1f} TFLOP/s fp32)")
    # each ridge line stops at its roof; its label sits above the corner, clear of the line
    ax.plot([ridge, ridge], [y_lo, tensor], color="black", linestyle=":", linewidth=1)
    ridge_text = ax.annotate(f"ridge point {ridge:.0f} FLOP/B", (ridge, tensor),
                             textcoords="offset points", xytext=(0, 7), fontsize=8,
                             ha="center", va="bottom")
    ax.plot([scalar_ridge, scalar_ridge], [y_lo, scalar], color="gray", linestyle=":",
            linewidth=1)
    scalar_text = ax.annotate(f"CUDA-core ridge\n{scalar_ridge:.1f} FLOP/B",
                              (scalar_ridge, scalar), textcoords="offset points",
                              xytext=(5, -5), fontsize=8, color="dimgray", ha="left", va="top")
    # every algorithm's points, standard last (open marker over the hf / megatron GEMMs it
    # shares); one legend entry per family
    families = draw_order(dict.fromkeys(r["family"] for r in shown.values()))
    for family in families:
        mine = [r for r in shown.values() if r["family"] == family]
        ax.scatter([r["arithmetic_intensity"] for r in mine],
                   [r["attained_flops_per_s"] / tera for r in mine],
                   **scatter_style(family, size=46))
    legend = ax.legend(loc="lower right", fontsize=8)
    # one label per spot: the numbers of every entry drawn there
    spots: dict = {}
    key_lines = []
    for entry in entries:
        here = [shown[n] for n in entry["names"] if n in shown]
        if not here:
            continue
        r = here[0]
        spot = spots.setdefault(_coords(r), {"xy": (r["arithmetic_intensity"],
                                                    r["attained_flops_per_s"] / tera),
                                             "numbers": []})
        spot["numbers"].append(entry["number"])
        who = ", ".join(label(f) for f in entry["families"])
        key_lines.append(f"{entry['number']:>2}  {entry['kernel']} [{who}]\n     "
                         f"{r['arithmetic_intensity']:.3g} FLOP/B, "
                         f"{r['attained_flops_per_s'] / tera:.3g} TFLOP/s, {r['limiter']}")
    spots = _join_close(sorted(spots.values(), key=lambda s: s["xy"]))
    place_labels(ax, [s["xy"] for s in spots],
                 [",".join(str(n) for n in s["numbers"]) for s in spots],
                 marker_radius_pt=6.5, obstacles=(legend, ridge_text, scalar_text),
                 lines=((xs, hbm_roof), (xs, scalar_roof), ([ridge, ridge], [y_lo, tensor]),
                        ([scalar_ridge, scalar_ridge], [y_lo, scalar])),
                 fontweight="bold")
    key_ax.axis("off")
    key_ax.text(0.0, 1.0, "\n".join(key_lines), va="top", ha="left", family="monospace",
                fontsize=8.4, transform=key_ax.transAxes)
    ax.set_xlabel("arithmetic intensity (FLOP per HBM byte)")
    ax.set_ylabel("attained TFLOP/s (FLOPs / predicted time)")
    ax.set_title(f"Roofline, {hw.name}: attention kernels (GPT-2 medium, causal, l2 model) "
                 "and the op catalogue", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    close(fig)


def main(results_dir: Path, quick: bool | None = None) -> list[Section]:
    quick = is_quick(quick)
    results_dir = Path(results_dir)
    rows = points(quick)
    write_csv(results_dir / "roofline_points.csv", rows, COLUMNS + ("workload",))
    figures = []
    entries = numbering(rows)
    for hw in HARDWARE:
        name = f"roofline_{hw}.png"
        plot(rows, hw, results_dir / name, entries)
        figures.append((name, f"Roofline of {hw} with every attention kernel and catalogue op "
                              "(numbered as in the key beside it; the same numbers on both "
                              "hardware)"))
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
