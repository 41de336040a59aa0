"""A hardware design-space sweep: predicted flash2 time over SRAM per SM x L2 size x HBM
bandwidth, each point with the block sizes that suit it best.

Starting from the calibrated `h100-measured` spec, every combination of shared memory per SM,
L2 capacity and HBM bandwidth below is a hypothetical GPU; on each, flash2 is simulated (l2
model, timed model) at every candidate (Br, Bc) pair that fits, and the fastest pair is kept.
The simulations are independent jobs run by :func:`iosim.distribute.map_jobs`: local worker
processes, or a Dask cluster when ``DASK_SCHEDULER_ADDRESS`` names one (see the how-to "Run a
sweep on a cluster").
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from iosim import AttentionShape, TilingError, load_hardware
from iosim.distribute import map_jobs
from iosim.results import markdown_table, save_figure, write_csv

from ._common import Section, cli, close, is_quick, new_figure, workers

BASE = "h100-measured"
KIB, MIB = 1024, 1024 * 1024
COLUMNS = ("sram_kib_per_sm", "l2_mib", "hbm_tb_s", "block_rows", "block_cols",
           "predicted_time_s", "hbm_bytes", "warps_per_sm", "timed_limiter")


def grid(quick: bool) -> dict:
    if quick:
        return {"sram_kib": (96, 228), "l2_mib": (10, 50), "hbm_tb_s": (3.0,),
                "blocks": (64, 128)}
    return {"sram_kib": (64, 96, 128, 160, 192, 228), "l2_mib": (10, 20, 30, 50, 80),
            "hbm_tb_s": (2.0, 3.0, 5.0), "blocks": (32, 64, 128)}


def shape_for(quick: bool) -> AttentionShape:
    if quick:
        return AttentionShape(batch=1, heads=2, seq_len=512, head_dim=64)
    return AttentionShape(batch=2, heads=16, seq_len=2048, head_dim=64)


def hardware_point(sram_kib: int, l2_mib: int, hbm_tb_s: float):
    """The base spec with this much shared memory per SM (1 KiB of it reserved per block), L2
    and HBM bandwidth."""
    base = load_hardware(BASE)
    unit = base.l2_line_bytes * base.l2_associativity
    return dataclasses.replace(
        base, name=f"{BASE} sram={sram_kib}KiB l2={l2_mib}MiB hbm={hbm_tb_s}TB/s",
        sram_bytes_per_sm=sram_kib * KIB, sram_bytes_per_block=sram_kib * KIB - KIB,
        l2_bytes=l2_mib * MIB // unit * unit, hbm_bandwidth_bytes_per_s=hbm_tb_s * 1e12)


def _simulate(job) -> list:
    """flash2 at one (Br, Bc) on every HBM bandwidth of one SRAM x L2 point: one row each, or
    None where the pair does not fit. The bandwidth changes the time only, not the schedule,
    the trace or the L2 replay: those are built and replayed once for all of them (the same
    counts and times as one :func:`iosim.simulate` each)."""
    from iosim import simulate
    from iosim.sampling import sampling_mode
    from iosim.schedules import build_schedule
    from iosim.simulate import simulate_trace
    from iosim.trace import build_trace

    shape, sram_kib, l2_mib, bandwidths, br, bc = job
    points = [hardware_point(sram_kib, l2_mib, hbm_tb_s) for hbm_tb_s in bandwidths]
    try:
        schedule = build_schedule("flash2", shape, br, bc,
                                  sram_bytes=points[0].sram_bytes_per_block)
        schedule.check_fits(points[0].sram_bytes_per_block)
        streamed, _ = sampling_mode(schedule, None)
        if streamed:  # a long one: as simulate() runs it, point by point
            results = [simulate("flash2", shape, block_rows=br, block_cols=bc, hardware=hw)
                       for hw in points]
        else:
            trace, memo = build_trace(schedule), {}
            results = [simulate_trace(trace, hw, "l2", memo=memo) for hw in points]
    except TilingError:
        return [None] * len(points)  # the pair does not fit this SRAM (or its CTA an SM)
    rows = []
    for hbm_tb_s, result in zip(bandwidths, results):
        (kernel,) = result.kernels
        rows.append({"sram_kib_per_sm": sram_kib, "l2_mib": l2_mib, "hbm_tb_s": hbm_tb_s,
                     "block_rows": br, "block_cols": bc,
                     "predicted_time_s": kernel.predicted_time_s,
                     "hbm_bytes": kernel.hbm_bytes,
                     "warps_per_sm": kernel.occupancy["warps_per_sm"],
                     "timed_limiter": kernel.timed_limiter})
    return rows


def main(results_dir: Path, quick: bool | None = None) -> list[Section]:
    quick = is_quick(quick)
    results_dir = Path(results_dir)
    g, shape = grid(quick), shape_for(quick)
    # one job per SRAM x L2 point and pair, for every HBM bandwidth (one trace, one L2 replay)
    jobs = [(shape, s, l2, g["hbm_tb_s"], br, bc) for s in g["sram_kib"]
            for l2 in g["l2_mib"] for br in g["blocks"] for bc in g["blocks"]]
    results = [r for rows in map_jobs(_simulate, jobs, workers=workers(), desc="design_space")
               for r in rows if r is not None]
    simulations = len(jobs) * len(g["hbm_tb_s"])
    best = {}
    for r in results:
        key = (r["sram_kib_per_sm"], r["l2_mib"], r["hbm_tb_s"])
        if key not in best or r["predicted_time_s"] < best[key]["predicted_time_s"]:
            best[key] = r
    rows = [best[k] for k in sorted(best)]
    write_csv(results_dir / "design_space.csv", rows, COLUMNS)

    fig, axes = new_figure(ncols=len(g["hbm_tb_s"]), width=4.6, height=4.0)
    times = [r["predicted_time_s"] * 1e3 for r in rows]
    vmin, vmax = min(times), max(times)
    for ax, bw in zip(axes[0], g["hbm_tb_s"]):
        image = np.full((len(g["sram_kib"]), len(g["l2_mib"])), np.nan)
        for i, s in enumerate(g["sram_kib"]):
            for j, l2 in enumerate(g["l2_mib"]):
                if (s, l2, bw) in best:
                    r = best[(s, l2, bw)]
                    image[i, j] = r["predicted_time_s"] * 1e3
                    ax.text(j, i, f"{r['block_rows']}x{r['block_cols']}", ha="center",
                            va="center", fontsize=7, color="white")
        shown = ax.imshow(image, origin="lower", aspect="auto", cmap="viridis", vmin=vmin,
                          vmax=vmax)
        ax.set_xticks(range(len(g["l2_mib"])), [str(x) for x in g["l2_mib"]])
        ax.set_yticks(range(len(g["sram_kib"])), [str(x) for x in g["sram_kib"]])
        ax.set_xlabel("L2 (MiB)")
        if ax is axes[0][0]:
            ax.set_ylabel("shared memory per SM (KiB)")
        ax.set_title(f"HBM {bw:g} TB/s")
        ax.grid(False)
    fig.colorbar(shown, ax=axes[0].tolist(), label="predicted flash2 time (ms), best pair")
    fig.suptitle(f"flash2 {shape.describe()}: design space around {BASE} "
                 "(label: the fastest Br x Bc)")
    save_figure(fig, results_dir / "design_space.png")
    close(fig)

    fastest, slowest = min(rows, key=lambda r: r["predicted_time_s"]), \
        max(rows, key=lambda r: r["predicted_time_s"])
    table = [{"SRAM KiB/SM": r["sram_kib_per_sm"], "L2 MiB": r["l2_mib"],
              "HBM TB/s": r["hbm_tb_s"], "best Br x Bc": f"{r['block_rows']}x{r['block_cols']}",
              "time ms": f"{r['predicted_time_s'] * 1e3:.3f}", "warps/SM": r["warps_per_sm"],
              "limiter": r["timed_limiter"]} for r in (fastest, slowest)]
    body = f"""flash2 at {shape.describe()} on {len(best)} hypothetical GPUs around `{BASE}`
({simulations} simulations: every SRAM x L2 x HBM point times every (Br, Bc) from
{list(g['blocks'])}), each point with its fastest pair (timed model, l2 model). Fastest and
slowest points:

{markdown_table(table)}

Run on a cluster by setting `DASK_SCHEDULER_ADDRESS` (see the how-to "Run a sweep on a
cluster"); the grid is at the top of `experiments/design_space.py`.
"""
    return [Section("Hardware design space: flash2 over SRAM, L2 and HBM bandwidth", body,
                    figures=[("design_space.png", "Predicted flash2 time with the best block "
                              "pair, over shared memory per SM and L2 size, per HBM bandwidth")],
                    data=["design_space.csv"])]


if __name__ == "__main__":
    cli(main, "design_space")
