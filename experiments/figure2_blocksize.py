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

from ._common import (COLORS, MARKERS, Section, SimJob, cli, close, is_quick, new_figure,
                      simulate_many)

HARDWARE = "a100-40gb"
MODELS = ("two-level", "l2")
SIZES = (16, 32, 64, 128, 256, 512)
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

    fig, axes = new_figure(ncols=2, width=5.6, height=4.2)
    styles = {"two-level": "-", "l2": "--"}
    for order, (label, (algorithm, _)) in enumerate(reversed(list(SERIES.items()))):
        color = COLORS[algorithm] if "128" not in label else "#e377c2"
        for model in MODELS:
            sel = [r for r in rows if r["series"] == label and r["model"] == model]
            if not sel:
                continue
            x = [r["block_cols"] for r in sel]
            hollow = model == "l2"
            kw = dict(color=color, linestyle=styles[model], marker=MARKERS[algorithm],
                      markersize=7 - 2 * order if hollow else 4, zorder=3 + order,
                      markerfacecolor="none" if hollow else color, label=f"{label} ({model})")
            axes[0][0].plot(x, [r["hbm_bytes"] / 1e9 for r in sel], **kw)
            axes[0][1].plot(x, [r["predicted_time_s"] * 1e3 for r in sel], **kw)
    for ax, ylabel, title in ((axes[0][0], "HBM reads + writes (GB)", "HBM accesses"),
                              (axes[0][1], "predicted time (ms)", "Predicted forward runtime")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.set_xlabel("block size Bc (columns of S per block)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    axes[0][1].legend(loc="upper right", ncol=1, title="l2-model flash2 lines coincide",
                      title_fontsize=8)
    fig.suptitle(f"Block size vs HBM traffic and runtime: {shape.describe()}, {HARDWARE} "
                 "(solid: two-level model, dashed: l2 model)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, results_dir / "figure2_blocksize.png")
    close(fig)

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
