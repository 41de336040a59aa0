"""A kernel on the modelled SMs: the timed model's per-SM CTA timeline (a Gantt chart) and the
SMs' occupancy over time, with waves, the tail and causal imbalance — what a kernel writer wants
to see before writing the kernel.

Two flash2 variants at the same causal shape on ``h100-measured``: the default tiles
(Br = 128, Bc = 64, 16 query rows per warp: 8 warps per CTA) and Br = 64, Bc = 128, whose
double-buffered K/V tiles leave room for one CTA of 4 warps per SM. For each, the first SMs'
CTAs as bars (shade: the CTA's work, i.e. how many K/V blocks its causal row block visits) and,
below, the resident warps per SM averaged over all SMs against time."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from iosim import AttentionShape, simulate
from iosim.results import markdown_table, save_figure, write_csv
from iosim.timing import LIMITERS

from ._common import COLORS, Section, cli, close, is_quick, new_figure

HARDWARE = "h100-measured"
ALGORITHM = "flash2"
VARIANTS = ((128, 64), (64, 128))
SMS_SHOWN = 12


def shape_for(quick: bool) -> AttentionShape:
    if quick:
        return AttentionShape(batch=1, heads=4, seq_len=1024, head_dim=128, causal=True)
    return AttentionShape(batch=2, heads=16, seq_len=4096, head_dim=128, causal=True)


def resident_warps_over_time(timeline, warps_per_cta: int, sm_count: int, points: int = 400):
    """(times, mean resident warps per SM) sampled at ``points`` instants over the kernel."""
    start, end = timeline.cta_start_s, timeline.cta_end_s
    times = np.linspace(0.0, float(end.max()), points)
    # CTAs running at t: started at or before t and not yet ended
    started = np.searchsorted(np.sort(start), times, side="right")
    ended = np.searchsorted(np.sort(end), times, side="right")
    return times, (started - ended) * warps_per_cta / sm_count


def main(results_dir: Path, quick: bool | None = None) -> list[Section]:
    quick = is_quick(quick)
    results_dir = Path(results_dir)
    shape = shape_for(quick)
    fig, axes = new_figure(ncols=len(VARIANTS), nrows=2, width=6.4, height=3.8)
    rows, table = [], []
    for col, (br, bc) in enumerate(VARIANTS):
        result = simulate(ALGORITHM, shape, block_rows=br, block_cols=bc, hardware=HARDWARE)
        (kernel,) = result.kernels
        timed = result.timelines[kernel.name]
        occ = kernel.occupancy
        n_row_blocks = -(-shape.seq_len // br)
        # launch order within a head is longest-first: CTA c's row block
        row_block = n_row_blocks - 1 - (np.arange(len(timed.cta_sm)) % n_row_blocks)
        work = (row_block * br + br - 1) // bc + 1  # K/V blocks the causal row block visits
        for c in range(len(timed.cta_sm)):
            rows.append({"block_rows": br, "block_cols": bc, "cta": c,
                         "sm": int(timed.cta_sm[c]), "start_s": float(timed.cta_start_s[c]),
                         "end_s": float(timed.cta_end_s[c]), "kv_blocks": int(work[c]),
                         "limiter": LIMITERS[timed.cta_limiter[c]]})
        ax = axes[0][col]
        shown = timed.cta_sm < SMS_SHOWN
        cmap = _colormap()
        shade = work / work.max()
        # a CTA's bar sits in its SM's row, split into one lane per resident slot
        slots = occ["ctas_per_sm"]
        lane = _lanes(timed.cta_sm, timed.cta_start_s, timed.cta_end_s, slots)
        for c in np.flatnonzero(shown):
            y = timed.cta_sm[c] + lane[c] / slots
            ax.barh(y, (timed.cta_end_s[c] - timed.cta_start_s[c]) * 1e3,
                    left=timed.cta_start_s[c] * 1e3, height=0.9 / slots, align="edge",
                    color=cmap(0.2 + 0.8 * shade[c]), edgecolor="white", linewidth=0.3)
        ax.set_ylim(SMS_SHOWN, 0)
        ax.set_ylabel("SM")
        ax.set_xlabel("time (ms)")
        ax.set_title(f"{ALGORITHM} {br}x{bc}: {occ['warps_per_sm']} warps/SM "
                     f"({occ['ctas_per_sm']} CTA, {occ['limiter']}-limited)\n"
                     f"first {SMS_SHOWN} SMs; darker = more K/V blocks")
        ax.grid(axis="y", alpha=0)
        times, warps = resident_warps_over_time(timed, occ["warps_per_cta"],
                                                result.hardware.sm_count)
        ax2 = axes[1][col]
        ax2.plot(times * 1e3, warps, color=COLORS[ALGORITHM])
        ax2.axhline(occ["warps_per_sm"], color="black", linestyle="--", linewidth=1,
                    label=f"occupancy limit ({occ['warps_per_sm']} warps/SM)")
        ax2.set_ylim(0, occ["warps_per_sm"] * 1.15)
        ax2.set_xlim(axes[0][col].get_xlim())
        ax2.set_xlabel("time (ms)")
        ax2.set_ylabel("resident warps per SM (mean)")
        ax2.legend(loc="best")
        ax2.set_title(f"SM idle in the tail: {kernel.time_breakdown['sm_idle']:.1%} "
                      f"of SM-time; kernel {kernel.times_s['timed'] * 1e3:.3f} ms")
        table.append({"Br x Bc": f"{br}x{bc}", "warps/SM": occ["warps_per_sm"],
                      "CTAs/SM": occ["ctas_per_sm"], "occupancy limit": occ["limiter"],
                      "timed ms": f"{kernel.times_s['timed'] * 1e3:.3f}",
                      "roofline ms": f"{kernel.times_s['roofline'] * 1e3:.3f}",
                      "SM idle": f"{kernel.time_breakdown['sm_idle']:.1%}",
                      "timed limiter": kernel.timed_limiter})
    fig.suptitle(f"Timed model on {HARDWARE}: {shape.describe()}", y=1.0)
    fig.tight_layout()
    save_figure(fig, results_dir / "timeline.png")
    close(fig)
    write_csv(results_dir / "timeline.csv", rows)
    body = f"""{ALGORITHM} at {shape.describe()} on `{HARDWARE}`, under the timed model
(`iosim.timing`): each bar is one CTA on one SM (a row per SM, one lane per resident slot),
from the moment the block scheduler gave it a slot to its end. Causal row blocks differ in work
(darker bars visit more K/V blocks); flash2 launches the longest first, so the short ones fill
the tail. The lower panels give the resident warps per SM averaged over the SMs: flat at the
occupancy limit while every slot is busy, then falling in the tail.

{markdown_table(table)}
"""
    return [Section("A kernel on the modelled SMs: CTA timeline", body,
                    figures=[("timeline.png", "Per-SM CTA timeline and resident warps over "
                              "time for two flash2 tilings (timed model)")],
                    data=["timeline.csv"])]


def _lanes(sm, start, end, slots):
    """A lane (0..slots-1) per CTA such that CTAs sharing an SM at a time get different
    lanes (greedy: the lane that freed first)."""
    lane = np.zeros(len(sm), dtype=int)
    free_at = {}
    for c in np.lexsort((start, sm)):
        lanes = free_at.setdefault(int(sm[c]), [0.0] * slots)
        pick = min(range(slots), key=lambda i: lanes[i])
        lane[c] = pick
        lanes[pick] = end[c]
    return lane


def _colormap():
    import matplotlib

    return matplotlib.colormaps["Reds"]


if __name__ == "__main__":
    cli(main, "timeline")
