"""HBM accesses against SRAM size M: the FlashAttention paper's Theorem 2 (Θ(N²d²/M) accesses)
and where it stops (Θ(N·d): read Q, K, V and write O once), under the two-level model.

For each M the schedule takes its default block sizes for that SRAM (flash1: Bc = M/(4d),
Br = min(Bc, d); flash2: its (128, 128) default, halved until it fits) and a third series lets
flash2 grow its Q block to fill M (the largest Br, a multiple of 16, with Bc = 64 or less)."""
from __future__ import annotations

from pathlib import Path

from iosim import AttentionShape, TilingError
from iosim.occupancy import MAX_THREADS_PER_CTA
from iosim.results import markdown_table, save_figure, write_csv
from iosim.schedules import build_schedule
from iosim.schedules.common import ROWS_PER_WARP

from ._common import (Section, SimJob, cli, close, is_quick, line_style, new_figure,
                      plain_log_axis, si, simulate_many)

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


def rows_per_warp_for(block_rows: int) -> int | None:
    """Query rows per warp that keep a CTA of ``block_rows`` within MAX_THREADS_PER_CTA: the
    default (16, None) while it does, else the smallest multiple of 16 that does."""
    max_warps = MAX_THREADS_PER_CTA // 32
    if -(-block_rows // ROWS_PER_WARP) <= max_warps:
        return None
    rows = -(-block_rows // max_warps)
    return -(-rows // 16) * 16


def flash2_filling(shape: AttentionShape, sram: int) -> tuple[int, int, int | None] | None:
    """flash2's largest Q block (multiple of 16, at most N) that fits ``sram`` with Bc <= 64:
    (Br, Bc, rows per warp; None for the default)."""
    for bc in (64, 32, 16):
        for br in range(shape.seq_len - shape.seq_len % 16, 15, -16):
            rows_per_warp = rows_per_warp_for(br)
            try:
                build_schedule("flash2", shape, br, bc, sram_bytes=sram,
                               rows_per_warp=rows_per_warp)
            except TilingError:
                continue
            return br, bc, rows_per_warp
    return None


SERIES_STYLE = {  # label -> (algorithm, line_style overrides)
    "flash1 (default blocks)": ("flash1", {}),
    "flash2 (default blocks)": ("flash2", {"linestyle": "--", "markerfacecolor": "none"}),
    "flash2 (Br fills M)": ("flash2", {}),
}


def _kib(m: int) -> str:
    return f"{m // KIB} KiB" if m < 1024 * KIB else f"{m / (1024 * KIB):g} MiB"


def _settles(sel: list[dict]) -> dict | None:
    """The first row of ``sel`` (ordered by M) from which its HBM bytes no longer change."""
    if not sel:
        return None
    last = sel[-1]["hbm_bytes"]
    first = len(sel) - 1
    while first > 0 and sel[first - 1]["hbm_bytes"] == last:
        first -= 1
    return sel[first]


def describe(rows: list[dict], shape: AttentionShape, lower_bound: int) -> str:
    """What the three curves do, read from ``rows``: where each falls, where it stops and how
    far above the lower bound it stops."""
    n = shape.seq_len
    by = {label: sorted((r for r in rows if r["series"] == label), key=lambda r: r["sram_bytes"])
          for label in SERIES_STYLE}
    parts = []
    f1, f2, fill = by["flash1 (default blocks)"], by["flash2 (default blocks)"], \
        by["flash2 (Br fills M)"]
    if f1:
        stop = _settles(f1)
        falls = f"{si(f1[0]['hbm_bytes'], 'B')} at {_kib(f1[0]['sram_bytes'])}"
        parts.append(
            f"flash1 with the paper's block rule (Bc about M/(4d), Br = min(Bc, d)) makes N/Bc "
            f"passes over Q and O, so its HBM traffic falls as N²d²/M (the dotted line has "
            f"exactly that slope), from {falls}, until Bc reaches N = {n} at "
            f"M = {_kib(stop['sram_bytes'])}; from there one pass remains and the curve is flat "
            f"at {si(stop['hbm_bytes'], 'B')}, {stop['hbm_bytes'] / lower_bound:.1f}x the "
            "lower bound: flash1 keeps O, l and m in float32 and reads and writes them through "
            "HBM, above the fp16 Q, K, V and O of the bound.")
    if f2:
        stop = _settles(f2)
        falling = f2[0]["hbm_bytes"] > stop["hbm_bytes"]
        tiles = f"({stop['block_rows']}, {stop['block_cols']})"
        if falling:
            parts.append(
                f"flash2's default tiles are (128, 128), halved until they fit M: below "
                f"{_kib(stop['sram_bytes'])} they shrink with M "
                f"(({f2[0]['block_rows']}, {f2[0]['block_cols']}) at "
                f"{_kib(f2[0]['sram_bytes'])}), and as K and V are re-read N/Br times its "
                f"traffic falls, from {si(f2[0]['hbm_bytes'], 'B')}, until {tiles} fits at "
                f"{_kib(stop['sram_bytes'])}; from there the tiles stop growing and the curve is "
                f"flat at {si(stop['hbm_bytes'], 'B')}, "
                f"{stop['hbm_bytes'] / lower_bound:.1f}x the lower bound, however large M is.")
        else:
            parts.append(
                f"flash2's default tiles {tiles} fit every M here, so its traffic is the same "
                f"{si(stop['hbm_bytes'], 'B')} ({stop['hbm_bytes'] / lower_bound:.1f}x the "
                "lower bound) at every M.")
    if fill:
        stop = _settles(fill)
        parts.append(
            f"Letting flash2's Q block fill M (the largest Br that fits, Bc = 64 or less) "
            f"reads K and V ⌈N/Br⌉ times: the traffic falls with M in steps (only a larger Br "
            f"that lowers ⌈N/Br⌉ lowers it), from {si(fill[0]['hbm_bytes'], 'B')} at "
            f"{_kib(fill[0]['sram_bytes'])} (Br = {fill[0]['block_rows']}) to "
            f"{si(stop['hbm_bytes'], 'B')} at {_kib(stop['sram_bytes'])} "
            f"(Br = {stop['block_rows']}), {stop['hbm_bytes'] / lower_bound:.2f}x the lower "
            "bound: each of Q, K, V read once and O written once.")
        widest = MAX_THREADS_PER_CTA // 32 * ROWS_PER_WARP
        if any(r["block_rows"] > widest for r in fill):
            parts[-1] += (f" (A Q block of more than {widest} rows gives each warp more than "
                          f"{ROWS_PER_WARP} rows, to stay within {MAX_THREADS_PER_CTA} threads "
                          "per CTA; the two-level byte count does not depend on it.)")
    return "\n\n".join(parts)


def plot(rows: list[dict], shape: AttentionShape, lower_bound: int, anchor, path: Path) -> None:
    fig, axes = new_figure(width=7.2, height=4.8)
    ax = axes[0][0]
    for label, (algorithm, overrides) in SERIES_STYLE.items():
        sel = [r for r in rows if r["series"] == label]
        if sel:
            size = 7 if overrides.get("markerfacecolor") == "none" else 4
            ax.plot([r["sram_bytes"] / KIB for r in sel], [r["hbm_bytes"] / 1e9 for r in sel],
                    **line_style(algorithm, size, label=label, **overrides))
    ms = [r["sram_bytes"] / KIB for r in rows if r["series"].startswith("flash1")]
    if anchor:
        ax.plot(ms, [anchor / (m * KIB) / 1e9 for m in ms], color="gray", linestyle=":",
                label="∝ N²d²/M (Theorem 2), through flash1's first point")
    ax.axhline(lower_bound / 1e9, color="black", linestyle="--", linewidth=1,
               label=f"lower bound {lower_bound / 1e9:.3g} GB = 4·B·H·N·d·{shape.elem_bytes} "
                     "bytes\n(Q, K, V read and O written once)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = [16, 32, 64, 128, 256, 512, 1024]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t} KiB" if t < 1024 else "1 MiB" for t in ticks])
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    plain_log_axis(ax.yaxis)
    ax.set_xlabel("SRAM per thread block M")
    ax.set_ylabel("HBM reads + writes (GB)")
    ax.set_title(f"HBM accesses vs SRAM size, two-level model\n{shape.describe()}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    save_figure(fig, path)
    close(fig)


def main(results_dir: Path, quick: bool | None = None) -> list[Section]:
    quick = is_quick(quick)
    results_dir = Path(results_dir)
    shape = shape_for(quick)
    n, d, e, heads = shape.seq_len, shape.head_dim, shape.elem_bytes, shape.batch_heads
    lower_bound = 4 * heads * n * d * e  # read Q, K, V and write O once
    series = []  # (label, algorithm, M, Br or None, Bc or None, rows per warp or None)
    for m in sram_sizes(quick):
        series.append(("flash1 (default blocks)", "flash1", m, None, None, None))
        series.append(("flash2 (default blocks)", "flash2", m, None, None, None))
        fill = flash2_filling(shape, m)
        if fill:
            series.append(("flash2 (Br fills M)", "flash2", m) + fill)
    runnable, skipped = [], []
    for label, alg, m, br, bc, rpw in series:
        try:
            build_schedule(alg, shape, br, bc, sram_bytes=m, rows_per_warp=rpw)
            runnable.append((label, alg, m, br, bc, rpw))
        except TilingError:
            skipped.append(f"{label} at M={m // KIB} KiB")
    jobs = [SimJob(alg, shape, HARDWARE, MODEL, br, bc, m, rpw)
            for _, alg, m, br, bc, rpw in runnable]
    rows = []
    for (label, alg, m, *_), res in zip(runnable, simulate_many(jobs, desc="sram_sweep")):
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

    plot(rows, shape, lower_bound, anchor, results_dir / "sram_sweep.png")

    table = [{"series": r["series"], "M KiB": r["sram_bytes"] // KIB, "Br": r["block_rows"],
              "Bc": r["block_cols"], "HBM GB": f"{r['hbm_bytes'] / 1e9:.3f}",
              "x lower bound": f"{r['hbm_bytes'] / lower_bound:.2f}"} for r in rows]
    note = f" Left out (nothing fits): {', '.join(skipped)}." if skipped else ""
    body = f"""{shape.describe()}, two-level model, SRAM per thread block M from 16 KiB to
1 MiB (`{HARDWARE}` otherwise).{note} The lower bound (dashed) is reading Q, K and V and
writing O once: 4·B·H·N·d elements of {e} bytes, {si(lower_bound, 'B')}.

{describe(rows, shape, lower_bound)}

{markdown_table(table)}
"""
    return [Section("HBM accesses against SRAM size (Theorem 2)", body,
                    figures=[("sram_sweep.png", "HBM accesses against SRAM size M, with the "
                              "N²d²/M reference and the Θ(N·d) lower bound")],
                    data=["sram_sweep.csv"])]


if __name__ == "__main__":
    cli(main, "sram_sweep")
