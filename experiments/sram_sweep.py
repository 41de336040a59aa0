"""HBM accesses against SRAM size M: the FlashAttention paper's Theorem 2 (Θ(N²d²/M) accesses)
and where it stops (Θ(N·d): read Q, K, V and write O once), under the two-level model.

For each M the schedule takes its default block sizes for that SRAM (flash1: Bc = M/(4d),
Br = min(Bc, d); flash2: its (128, 128) default, halved until it fits) and a third series lets
flash2 grow its Q block to fill M (the largest Br, a multiple of 16, with Bc = 64 or less)."""
from __future__ import annotations

from pathlib import Path

from iosim import AttentionShape, TilingError
from iosim.results import markdown_table, save_figure, write_csv
from iosim.schedules import build_schedule

from ._common import (COLORS, MARKERS, Section, SimJob, cli, close, is_quick, new_figure,
                      simulate_many)

HARDWARE = "a100-40gb"
MODEL = "two-level"
KIB = 1024
COLUMNS = ("series", "algorithm", "sram_bytes", "block_rows", "block_cols", "hbm_read_bytes",
           "hbm_write_bytes", "hbm_bytes", "lower_bound_bytes", "reference_bytes")


def sram_sizes(quick: bool) -> list[int]:
    """16 KiB .. 1 MiB in steps of about sqrt(2) (2^k and 1.5·2^k KiB)."""
    sizes = []
    k = 16
    while k <= 1024:
        sizes.append(k * KIB)
        if k * 3 // 2 <= 1024 and not quick:
            sizes.append(k * 3 // 2 * KIB)
        k *= 2
    return sorted(sizes)


def shape_for(quick: bool) -> AttentionShape:
    if quick:
        return AttentionShape(batch=1, heads=2, seq_len=512, head_dim=64)
    return AttentionShape(batch=64, heads=16, seq_len=1024, head_dim=64)


def flash2_filling(shape: AttentionShape, sram: int) -> tuple[int, int] | None:
    """flash2's largest Q block (multiple of 16, at most N) that fits ``sram`` with Bc <= 64."""
    for bc in (64, 32, 16):
        for br in range(shape.seq_len - shape.seq_len % 16, 15, -16):
            try:
                build_schedule("flash2", shape, br, bc, sram_bytes=sram)
            except TilingError:
                continue
            return br, bc
    return None


def main(results_dir: Path, quick: bool | None = None) -> list[Section]:
    quick = is_quick(quick)
    results_dir = Path(results_dir)
    shape = shape_for(quick)
    n, d, e, heads = shape.seq_len, shape.head_dim, shape.elem_bytes, shape.batch_heads
    lower_bound = 4 * heads * n * d * e  # read Q, K, V and write O once
    series = []  # (label, algorithm, M, Br or None, Bc or None)
    for m in sram_sizes(quick):
        series.append(("flash1 (default blocks)", "flash1", m, None, None))
        series.append(("flash2 (default blocks)", "flash2", m, None, None))
        fill = flash2_filling(shape, m)
        if fill:
            series.append(("flash2 (Br fills M)", "flash2", m) + fill)
    runnable, skipped = [], []
    for label, alg, m, br, bc in series:
        try:
            build_schedule(alg, shape, br, bc, sram_bytes=m)
            runnable.append((label, alg, m, br, bc))
        except TilingError:
            skipped.append(f"{label} at M={m // KIB} KiB")
    jobs = [SimJob(alg, shape, HARDWARE, MODEL, br, bc, m) for _, alg, m, br, bc in runnable]
    rows = []
    for (label, alg, m, _, _), res in zip(runnable, simulate_many(jobs, desc="sram_sweep")):
        t = res["totals"]
        rows.append({"series": label, "algorithm": alg, "sram_bytes": m,
                     "block_rows": res["block_rows"], "block_cols": res["block_cols"],
                     "hbm_read_bytes": t["hbm_read_bytes"],
                     "hbm_write_bytes": t["hbm_write_bytes"], "hbm_bytes": t["hbm_bytes"],
                     "lower_bound_bytes": lower_bound, "reference_bytes": None})
    # The N²d²/M reference, anchored at flash1's smallest M (the constant is the schedule's).
    f1 = [r for r in rows if r["series"].startswith("flash1")]
    anchor = f1[0]["hbm_bytes"] * f1[0]["sram_bytes"] if f1 else None
    for r in rows:
        r["reference_bytes"] = round(anchor / r["sram_bytes"]) if anchor else None
    write_csv(results_dir / "sram_sweep.csv", rows, COLUMNS)

    fig, axes = new_figure(width=7.2, height=4.8)
    ax = axes[0][0]
    colors = {"flash1 (default blocks)": COLORS["flash1"],
              "flash2 (default blocks)": "#e377c2", "flash2 (Br fills M)": COLORS["flash2"]}
    for label, color in colors.items():
        sel = [r for r in rows if r["series"] == label]
        if sel:
            ax.plot([r["sram_bytes"] / KIB for r in sel], [r["hbm_bytes"] / 1e9 for r in sel],
                    marker=MARKERS[sel[0]["algorithm"]], markersize=4, color=color, label=label)
    ms = [r["sram_bytes"] / KIB for r in f1]
    if anchor:
        ax.plot(ms, [anchor / (m * KIB) / 1e9 for m in ms], color="gray", linestyle=":",
                label="∝ N²d²/M (Theorem 2), through flash1's first point")
    ax.axhline(lower_bound / 1e9, color="black", linestyle="--", linewidth=1,
               label="lower bound: read Q, K, V and write O once (4·B·H·N·d bytes)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = [16, 32, 64, 128, 256, 512, 1024]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t} KiB" if t < 1024 else "1 MiB" for t in ticks])
    ax.set_xlabel("SRAM per thread block M")
    ax.set_ylabel("HBM reads + writes (GB)")
    ax.set_title(f"HBM accesses vs SRAM size, two-level model\n{shape.describe()}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    save_figure(fig, results_dir / "sram_sweep.png")
    close(fig)

    table = [{"series": r["series"], "M KiB": r["sram_bytes"] // KIB, "Br": r["block_rows"],
              "Bc": r["block_cols"], "HBM GB": f"{r['hbm_bytes'] / 1e9:.3f}",
              "x lower bound": f"{r['hbm_bytes'] / lower_bound:.2f}"} for r in rows]
    note = f" Left out (nothing fits): {', '.join(skipped)}." if skipped else ""
    body = f"""{shape.describe()}, two-level model, SRAM per thread block M from 16 KiB to
1 MiB (`{HARDWARE}` otherwise).{note}

flash1 with the paper's block rule (Bc = M/(4d)) makes N/Bc passes over Q and O, so its HBM
traffic falls as N²d²/M (the dotted line has exactly that slope) until Bc reaches N
(M = 4·N·d elements = {4 * n * d * e // KIB} KiB here): then one pass remains and the traffic
stops at a constant above the lower bound (dashed) — flash1 keeps O, l, m in float32 and
round-trips them through HBM, so its floor is about 2x the 4·N·d·e bytes of reading Q, K, V and
writing O once. flash2's default tiles do not grow with M, so its traffic is flat; letting its Q
block fill M gives the same 1/M fall (K and V are re-read N/Br times) down to the bound.

{markdown_table(table)}
"""
    return [Section("HBM accesses against SRAM size (Theorem 2)", body,
                    figures=[("sram_sweep.png", "HBM accesses against SRAM size M, with the "
                              "N²d²/M reference and the Θ(N·d) lower bound")],
                    data=["sram_sweep.csv"])]


if __name__ == "__main__":
    cli(main, "sram_sweep")
