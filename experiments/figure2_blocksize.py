"""The FlashAttention paper's Figure 2 (middle): HBM accesses and runtime of the forward pass
against block size (N=1024, d=64, A100).

Three series, every block size from 16 to 512 that fits the A100's SRAM per thread block:

* flash1 with the paper's rule Br = min(Bc, d), Bc on the x axis;
* flash2 with Br = Bc (both on the x axis);
* flash2 with Br = 128 fixed (its default), Bc on the x axis.

Each under the two-level model (the paper's accounting) and the l2 model. No causal mask here,
so the count is the plain N x N sweep the paper's figure shows."""
from __future__ import annotations

from pathlib import Path

from iosim import AttentionShape, TilingError
from iosim.hardware import load_hardware
from iosim.results import markdown_table, save_figure, write_csv
from iosim.schedules import build_schedule

from ._common import (Section, SimJob, cli, close, is_quick, line_style, new_figure,
                      pow2_log_axes, simulate_many)

HARDWARE = "a100-40gb"
MODELS = ("two-level", "l2")
SIZES = (16, 32, 64, 128, 256, 512)
#: How each series is drawn: the algorithm's colour and marker; flash2's two series told apart
#: by the line (solid: Br = Bc, dashed with open markers: Br = 128).
SERIES_STYLE = {
    "flash1, Br = min(Bc, d)": {},
    "flash2, Br = Bc": {},
    "flash2, Br = 128": {"linestyle": "--", "markerfacecolor": "none", "markersize": 8},
}
SERIES = {  # label -> (algorithm, Bc -> Br)
    "flash1, Br = min(Bc, d)": ("flash1", lambda bc, d: min(bc, d)),
    "flash2, Br = Bc": ("flash2", lambda bc, d: bc),
    "flash2, Br = 128": ("flash2", lambda bc, d: 128),
}
COLUMNS = ("series", "algorithm", "model", "block_rows", "block_cols", "sram_bytes_per_cta",
           "hbm_read_bytes", "hbm_write_bytes", "hbm_bytes", "predicted_time_s", "limiter")


def shape_for(quick: bool) -> AttentionShape:
    if quick:
        return AttentionShape(batch=1, heads=4, seq_len=256, head_dim=64)
    return AttentionShape(batch=64, heads=16, seq_len=1024, head_dim=64)


def _coinciding(rows: list[dict], key: str) -> list[tuple]:
    """Pairs of series in ``rows`` whose ``key`` agrees within 1% at every common block size."""
    by = {}
    for r in rows:
        by.setdefault(r["series"], {})[r["block_cols"]] = r[key]
    pairs = []
    names = list(by)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = set(by[a]) & set(by[b])
            if len(common) >= 2 and all(abs(by[a][c] - by[b][c]) <= 0.01 * max(by[a][c], by[b][c])
                                        for c in common):
                pairs.append((a, b))
    return pairs


def plot(rows: list[dict], sizes: list[int], shape: AttentionShape, path: Path) -> None:
    """One row of panels per memory model (HBM traffic, predicted time), the series in each;
    one legend for the series (they are the same in every panel) and, inside a panel, a note
    naming the series whose lines coincide there."""

    fig, axes = new_figure(ncols=2, nrows=len(MODELS), width=5.6, height=3.6, sharey="col")
    panels = (("hbm_bytes", 1e-9, "HBM reads + writes (GB)", "HBM accesses"),
              ("predicted_time_s", 1e3, "predicted time (ms)", "predicted forward runtime"))
    for row, model in enumerate(MODELS):
        mine = [r for r in rows if r["model"] == model]
        for col, (key, scale, ylabel, title) in enumerate(panels):
            ax = axes[row][col]
            for label, (algorithm, _) in SERIES.items():
                sel = [r for r in mine if r["series"] == label]
                if sel:
                    style = dict(SERIES_STYLE[label])
                    style = line_style(algorithm, style.pop("markersize", 5), label=label,
                                       **style)
                    ax.plot([r["block_cols"] for r in sel], [r[key] * scale for r in sel],
                            **style)
            notes = [f"{a} and {b.split(', ', 1)[-1] if a.split(',')[0] == b.split(',')[0] else b}:"
                     " lines coincide" for a, b in _coinciding(mine, key)]
            if notes:
                ax.text(0.98, 0.97, "\n".join(notes), transform=ax.transAxes, ha="right",
                        va="top", fontsize=7.5, color="0.25",
                        bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="0.8", alpha=0.9))
            pow2_log_axes(ax, sizes)
            ax.set_xlabel("block size Bc (columns of S per block)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}, {model} model")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(f"Block size vs HBM traffic and runtime: {shape.describe()}, {HARDWARE}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9,
               bbox_to_anchor=(0.5, 0.96), frameon=False)
    save_figure(fig, path)
    close(fig)


def main(results_dir: Path, quick: bool | None = None) -> list[Section]:
    quick = is_quick(quick)
    results_dir = Path(results_dir)
    shape = shape_for(quick)
    sram = load_hardware(HARDWARE).sram_bytes_per_block
    sizes = [s for s in SIZES if s <= shape.seq_len]
    points, skipped = [], []
    for label, (algorithm, rule) in SERIES.items():
        for bc in sizes:
            br = min(rule(bc, shape.head_dim), shape.seq_len)
            try:
                schedule = build_schedule(algorithm, shape, br, bc, sram_bytes=sram)
            except TilingError:
                skipped.append(f"{label} at Bc={bc}")
                continue
            need = max(k.smem_bytes(shape.head_dim, shape.seq_len) for k in schedule.kernels)
            points.append((label, algorithm, br, bc, need))
    jobs = [SimJob(alg, shape, HARDWARE, model, br, bc)
            for _, alg, br, bc, _ in points for model in MODELS]
    results = iter(simulate_many(jobs, desc="figure2_blocksize"))
    rows = []
    for label, algorithm, br, bc, need in points:
        for model in MODELS:
            t = next(results)["totals"]
            rows.append({"series": label, "algorithm": algorithm, "model": model,
                         "block_rows": br, "block_cols": bc, "sram_bytes_per_cta": need,
                         "hbm_read_bytes": t["hbm_read_bytes"],
                         "hbm_write_bytes": t["hbm_write_bytes"], "hbm_bytes": t["hbm_bytes"],
                         "predicted_time_s": t["predicted_time_s"], "limiter": t["limiter"]})
    write_csv(results_dir / "figure2_blocksize.csv", rows, COLUMNS)

    plot(rows, sizes, shape, results_dir / "figure2_blocksize.png")

    table_rows = [{"series": r["series"], "model": r["model"], "Br": r["block_rows"],
                   "Bc": r["block_cols"], "SRAM KiB": f"{r['sram_bytes_per_cta'] / 1024:.0f}",
                   "HBM GB": f"{r['hbm_bytes'] / 1e9:.3f}",
                   "time ms": f"{r['predicted_time_s'] * 1e3:.3f}", "limiter": r["limiter"]}
                  for r in rows]
    note = (f"Pairs that do not fit {sram} bytes of SRAM per thread block are left out: "
            f"{', '.join(skipped)}." if skipped else "Every pair fits the SRAM.")
    body = f"""Forward pass, {shape.describe()}, `{HARDWARE}` ({sram} bytes of SRAM per
thread block). {note}

As in the paper, larger blocks mean fewer passes over HBM: flash1 re-reads and re-writes every
Q and O block once per K/V block, so its traffic falls as 1/Bc; flash2 re-reads K and V once
per Q block, so its two-level traffic falls as 1/Br, and under the l2 model most of those
re-reads hit L2. Past some size the runtime stops falling because HBM is no longer the limit
(the `limiter` column turns to the tensor cores).

{markdown_table(table_rows)}
"""
    return [Section("Figure 2 (middle): block size vs HBM accesses and runtime", body,
                    figures=[("figure2_blocksize.png",
                              "HBM accesses (left) and predicted runtime (right) against "
                              "block size")],
                    data=["figure2_blocksize.csv"])]


if __name__ == "__main__":
    cli(main, "figure2_blocksize")
