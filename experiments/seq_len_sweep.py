"""The seed's comparison: HuggingFace, Megatron-LM, standard attention, FlashAttention and
FlashAttention-2 against sequence length at a fixed token count (B·N = 16384, H = 16, d = 64),
causal and not, on the measured H100 under the l2 model: HBM bytes and predicted time."""
from __future__ import annotations

from pathlib import Path


from iosim import AttentionShape
from iosim.results import markdown_table, save_figure, write_csv

from ._common import (Section, SimJob, cli, close, draw_order, is_quick, line_style,
                      new_figure, pow2_log_axes, simulate_many)

HARDWARE = "h100-measured"
MODEL = "l2"
ALGORITHMS = ("hf", "megatron", "standard", "flash1", "flash2")
HEADS, HEAD_DIM = 16, 64
COLUMNS = ("algorithm", "causal", "seq_len", "batch", "block_rows", "block_cols",
           "hbm_read_bytes", "hbm_write_bytes", "hbm_bytes", "flops", "predicted_time_s",
           "bound", "limiter")


def settings(quick: bool) -> tuple[list[int], int, int]:
    """(sequence lengths, tokens B·N, heads)."""
    if quick:
        return [256, 512], 1024, 2
    return [512, 1024, 2048, 4096, 8192, 16384], 16384, HEADS


def _same(rows: list[dict], causal: bool, a: str, b: str, key: str) -> bool:
    """Whether algorithms ``a`` and ``b`` agree within 1% on ``key`` at every sequence length."""
    va = {r["seq_len"]: r[key] for r in rows if r["algorithm"] == a and r["causal"] == causal}
    vb = {r["seq_len"]: r[key] for r in rows if r["algorithm"] == b and r["causal"] == causal}
    return bool(va) and va.keys() == vb.keys() and all(
        abs(va[n] - vb[n]) <= 0.01 * max(va[n], vb[n]) for n in va)


def _legend_label(rows: list[dict], alg: str) -> str:
    """``alg``, and for standard (drawn open and dashed on top) what its lines coincide with:
    the algorithms whose bytes (and time) it matches in every panel."""
    if alg != "standard":
        return alg
    found = []
    for key, what in (("hbm_bytes", "bytes"), ("predicted_time_s", "time")):
        twins = [o for o in ALGORITHMS if o != alg and
                 all(_same(rows, causal, alg, o, key) for causal in (False, True))]
        if twins:
            found.append((what, ", ".join(twins)))
    if not found:
        return alg
    if len(found) == 2 and found[0][1] == found[1][1]:
        return f"standard (same bytes and time as {found[0][1]})"
    return "standard (same " + "; same ".join(f"{w} as {t}" for w, t in found) + ")"


def main(results_dir: Path, quick: bool | None = None) -> list[Section]:
    quick = is_quick(quick)
    results_dir = Path(results_dir)
    lengths, tokens, heads = settings(quick)
    jobs = [SimJob(alg, AttentionShape(tokens // n, heads, n, HEAD_DIM, causal=causal),
                   HARDWARE, MODEL)
            for causal in (False, True) for alg in ALGORITHMS for n in lengths]
    rows = []
    for job, res in zip(jobs, simulate_many(jobs, desc="seq_len_sweep")):
        t = res["totals"]
        rows.append({"algorithm": job.algorithm, "causal": job.shape.causal,
                     "seq_len": job.shape.seq_len, "batch": job.shape.batch,
                     "block_rows": res["block_rows"], "block_cols": res["block_cols"],
                     "hbm_read_bytes": t["hbm_read_bytes"],
                     "hbm_write_bytes": t["hbm_write_bytes"], "hbm_bytes": t["hbm_bytes"],
                     "flops": t["flops"], "predicted_time_s": t["predicted_time_s"],
                     "bound": t["bound"], "limiter": t["limiter"]})
    write_csv(results_dir / "seq_len_sweep.csv", rows, COLUMNS)

    fig, axes = new_figure(ncols=2, nrows=2, width=5.6, height=4.0)
    for row, causal in enumerate((False, True)):
        for alg in draw_order(ALGORITHMS):  # standard last: open markers, dashed, on top
            sel = [r for r in rows if r["algorithm"] == alg and r["causal"] == causal]
            x = [r["seq_len"] for r in sel]
            for col, key, scale in ((0, "hbm_bytes", 1e-9), (1, "predicted_time_s", 1e3)):
                axes[row][col].plot(x, [r[key] * scale for r in sel],
                                    **line_style(alg, markersize=4, label=_legend_label(rows, alg)))
        mask = "causal" if causal else "no mask"
        for col, (ylabel, what) in enumerate((("HBM reads + writes (GB)", "HBM traffic"),
                                              ("predicted time (ms)", "predicted time"))):
            ax = axes[row][col]
            pow2_log_axes(ax, lengths)
            ax.set_xlabel("sequence length N (batch = %d / N)" % tokens)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{what}, {mask}")
    fig.suptitle(f"Attention forward at {tokens} tokens, H={heads}, d={HEAD_DIM}, "
                 f"{HARDWARE}, {MODEL} model", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    handles = dict(zip(*reversed(axes[0][0].get_legend_handles_labels())))
    order = [_legend_label(rows, alg) for alg in ALGORITHMS]
    fig.legend([handles[name] for name in order], order, loc="upper center", ncol=len(order),
               fontsize=9, bbox_to_anchor=(0.5, 0.97), frameon=False)
    save_figure(fig, results_dir / "seq_len_sweep.png")
    close(fig)

    by = {(r["algorithm"], r["causal"], r["seq_len"]): r for r in rows}
    tables = []
    for causal in (False, True):
        table = []
        for n in lengths:
            entry = {"N": n, "B": tokens // n}
            for alg in ALGORITHMS:
                entry[f"{alg} ms"] = f"{by[(alg, causal, n)]['predicted_time_s'] * 1e3:.3f}"
            for alg in ALGORITHMS:
                entry[f"{alg} GB"] = f"{by[(alg, causal, n)]['hbm_bytes'] / 1e9:.2f}"
            f2 = by[("flash2", causal, n)]["predicted_time_s"]
            entry["hf / flash2"] = f"{by[('hf', causal, n)]['predicted_time_s'] / f2:.1f}x"
            entry["megatron / flash2"] = \
                f"{by[('megatron', causal, n)]['predicted_time_s'] / f2:.1f}x"
            table.append(entry)
        tables.append(f"**{'Causal' if causal else 'No mask'}** (predicted time, HBM "
                      f"reads + writes, speed-up of flash2):\n\n{markdown_table(table)}")
    body = f"""Forward pass, {tokens} tokens per batch (B = {tokens} / N), H = {heads},
d = {HEAD_DIM}, fp16, `{HARDWARE}`, {MODEL} model, each algorithm's default block sizes.
hf runs separate scale (and mask) and softmax kernels over the N x N scores, megatron one
fused scale-mask-softmax kernel, standard the seed's three kernels (dropout left out
everywhere); their HBM traffic grows as B·H·N² = tokens·H·N, linearly in N at a fixed token
count, while FlashAttention's stays near the O(tokens·H·d) of its inputs and output. Causal
masking halves FlashAttention's work (blocks above the diagonal are skipped) but not the
unfused pipelines', which compute and store the full N x N scores. Megatron and standard move
the same bytes (the scale sits in the GEMM epilogue or in the fused softmax kernel: no extra
pass either way), so their curves coincide.

flash1's predicted time rises steeply at long N although its bytes stay small: it runs one CTA
per (batch, head) — {tokens // lengths[-1] * heads} CTAs at N = {lengths[-1]} on a GPU of 132
SMs — so most SMs sit idle and the cost model divides its compute time by that utilisation.
That is the weakness FlashAttention-2's extra grid dimension over Q blocks removes.

{tables[0]}

{tables[1]}
"""
    return [Section("Sequence length sweep: HF, Megatron, standard, FlashAttention 1 and 2",
                    body, figures=[("seq_len_sweep.png", "HBM traffic and predicted time "
                                    "against sequence length, without and with causal mask")],
                    data=["seq_len_sweep.csv"])]


if __name__ == "__main__":
    cli(main, "seq_len_sweep")
