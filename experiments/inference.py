"""Inference shapes on the measured H100: a decode roofline and a GQA group-size sweep.

* **Decode** (one query token per sequence, H = 32 query heads on H_kv = 8 K/V heads,
  d = 128): ``flash_decoding`` over batch x KV-cache length, with one split and with the
  heuristic's splits. Every point is memory-bound (about 1 FLOP per byte: each K/V element is
  used by the group's 4 query rows); what splits buy is SMs: B·H_kv CTAs below the SM count
  leave most of the HBM bandwidth unused, and splitting the K/V sequence fills them.
* **GQA** (prefill, B = 8, N = 4096, H = 32, d = 128, non-causal): ``flash2`` and ``standard``
  as the group size H / H_kv grows from 1 (multi-head) to 32 (multi-query): the K/V bytes fall
  by the group size, but flash2 is compute-bound, so its time hardly moves; the unfused
  pipeline is dominated by the N x N scores, which grouping does not touch.
"""
from __future__ import annotations

from pathlib import Path

from iosim import AttentionShape, load_hardware
from iosim.results import markdown_table, save_figure, write_csv
from iosim.schedules import build_schedule

from ._common import Section, SimJob, cli, close, is_quick, line_style, new_figure, \
    pow2_log_axes, simulate_many

HARDWARE = "h100-measured"
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DECODE_COLUMNS = ("batch", "kv_seq_len", "num_splits", "ctas", "hbm_bytes", "flops",
                  "arithmetic_intensity", "bound", "predicted_time_s",
                  "achieved_bytes_per_s", "fraction_of_hbm_bandwidth")
GQA_COLUMNS = ("algorithm", "group_size", "kv_heads", "hbm_bytes", "flops",
               "predicted_time_s", "bound")


def settings(quick: bool) -> dict:
    if quick:
        return {"batches": [1, 16], "kv_lens": [1024, 4096], "gqa": (1, 4, 256),
                "groups": [1, 4, 32]}
    return {"batches": [1, 4, 16, 64], "kv_lens": [4096, 16384, 32768],
            "gqa": (8, 4096, 4096), "groups": [1, 2, 4, 8, 16, 32]}


def decode_rows(batches, kv_lens) -> list[dict]:
    hw = load_hardware(HARDWARE)
    shapes = [AttentionShape(b, HEADS, 1, HEAD_DIM, kv_heads=KV_HEADS, kv_seq_len=m)
              for b in batches for m in kv_lens]
    # the splits the default schedule takes (FlashAttention's heuristic for this GPU's SMs)
    chosen = {s: dict(build_schedule("flash_decoding", s, sm_count=hw.sm_count)
                      .kernels[0].extents)["S"] for s in shapes}
    jobs = [SimJob("flash_decoding", s, HARDWARE, num_splits=splits)
            for s in shapes for splits in sorted({1, chosen[s]})]
    rows = []
    for job, result in zip(jobs, simulate_many(jobs, desc="inference: decode")):
        t = result["totals"]
        shape = job.shape
        rows.append({"batch": shape.batch, "kv_seq_len": shape.kv_seq_len,
                     "num_splits": job.num_splits, "ctas": shape.batch_kv_heads
                     * job.num_splits, "hbm_bytes": t["hbm_bytes"], "flops": t["flops"],
                     "arithmetic_intensity": t["arithmetic_intensity"], "bound": t["bound"],
                     "predicted_time_s": t["predicted_time_s"],
                     "achieved_bytes_per_s": t["hbm_bytes"] / t["predicted_time_s"],
                     "fraction_of_hbm_bandwidth": t["hbm_bytes"] / t["predicted_time_s"]
                     / hw.hbm_bandwidth_bytes_per_s})
    return rows


def gqa_rows(batch, seq_len, kv_len, groups) -> list[dict]:
    jobs = [SimJob(alg, AttentionShape(batch, HEADS, seq_len, HEAD_DIM, kv_heads=HEADS // g,
                                       kv_seq_len=kv_len), HARDWARE)
            for alg in ("flash2", "standard") for g in groups]
    rows = []
    for job, result in zip(jobs, simulate_many(jobs, desc="inference: GQA")):
        t = result["totals"]
        rows.append({"algorithm": job.algorithm, "group_size": job.shape.group_size,
                     "kv_heads": job.shape.kv_heads, "hbm_bytes": t["hbm_bytes"],
                     "flops": t["flops"],
                     "predicted_time_s": t["predicted_time_s"], "bound": t["bound"]})
    return rows


def _figure(decode, gqa, batches, kv_lens, groups, path: Path) -> None:
    fig, axes = new_figure(ncols=2, width=5.8, height=4.4)
    left, right = axes[0]
    for m, dash in zip(kv_lens, ("-", "--", ":", "-.")):
        at_m = [r for r in decode if r["kv_seq_len"] == m]
        # per batch: one split, and the heuristic's choice (the same point where it is 1)
        one = [r for r in at_m if r["num_splits"] == 1]
        chosen = [max((r for r in at_m if r["batch"] == b), key=lambda r: r["num_splits"])
                  for b in batches]
        for sel, what, alpha in ((one, "one split", 0.4), (chosen, "heuristic's splits", 1.0)):
            left.plot([r["batch"] for r in sel],
                      [100 * r["fraction_of_hbm_bandwidth"] for r in sel],
                      **line_style("flash_decoding", markersize=5, linestyle=dash, alpha=alpha,
                                   label=f"N_kv={m}, {what}"))
    pow2_log_axes(left, batches, log_y=False)
    left.set_xlabel("batch (sequences decoded at once)")
    left.set_ylabel("predicted HBM bandwidth used (% of the spec's)")
    left.set_title(f"decode, H={HEADS}, H_kv={KV_HEADS}, d={HEAD_DIM}")
    left.legend(fontsize=6.5)
    for alg in ("flash2", "standard"):
        sel = [r for r in gqa if r["algorithm"] == alg]
        base = sel[0]
        right.plot([r["group_size"] for r in sel],
                   [r["predicted_time_s"] / base["predicted_time_s"] for r in sel],
                   **line_style(alg, markersize=5, label=f"{alg}: time"))
        right.plot([r["group_size"] for r in sel],
                   [r["hbm_bytes"] / base["hbm_bytes"] for r in sel],
                   **line_style(alg, markersize=5, linestyle=":", label=f"{alg}: HBM bytes"))
    pow2_log_axes(right, groups, log_y=False)
    right.set_xlabel("group size H / H_kv (1: multi-head, 32: multi-query)")
    right.set_ylabel("relative to multi-head")
    right.set_title("GQA prefill")
    right.legend(fontsize=6.5)
    fig.tight_layout()
    save_figure(fig, path)
    close(fig)


def main(results_dir: Path, quick: bool | None = None) -> list[Section]:
    quick = is_quick(quick)
    results_dir = Path(results_dir)
    s = settings(quick)
    decode = decode_rows(s["batches"], s["kv_lens"])
    gqa = gqa_rows(*s["gqa"], s["groups"])
    write_csv(results_dir / "inference_decode.csv", decode, DECODE_COLUMNS)
    write_csv(results_dir / "inference_gqa.csv", gqa, GQA_COLUMNS)
    _figure(decode, gqa, s["batches"], s["kv_lens"], s["groups"],
            results_dir / "inference.png")
    decode_table = [{"B": r["batch"], "N_kv": r["kv_seq_len"], "splits": r["num_splits"],
                     "CTAs": r["ctas"], "HBM GB": f"{r['hbm_bytes'] / 1e9:.3f}",
                     "FLOP/B": f"{r['arithmetic_intensity']:.2f}", "bound": r["bound"],
                     "predicted µs": f"{r['predicted_time_s'] * 1e6:.1f}",
                     "% of HBM bw": f"{100 * r['fraction_of_hbm_bandwidth']:.0f}"}
                    for r in decode]
    gqa_table = [{"algorithm": r["algorithm"], "H/H_kv": r["group_size"],
                  "H_kv": r["kv_heads"], "HBM GB": f"{r['hbm_bytes'] / 1e9:.3f}",
                  "GFLOP": f"{r['flops'] / 1e9:.0f}", "bound": r["bound"],
                  "predicted ms": f"{r['predicted_time_s'] * 1e3:.3f}"} for r in gqa]
    batch, seq_len, _ = s["gqa"]
    body = f"""**Decode** on `{HARDWARE}`: `flash_decoding`, one query token per sequence, H =
{HEADS} query heads sharing H_kv = {KV_HEADS} K/V heads, d = {HEAD_DIM}, with one split and
with FlashAttention's heuristic's splits. Every point is memory-bound: each K/V element meets
only the group's {HEADS // KV_HEADS} query rows, about one FLOP per byte. Without splits there
are B·H_kv CTAs; below the SM count most of the bandwidth is idle, and splitting the K/V
sequence fills the SMs (the partial results cost a few MB of writes and a combine kernel).

{markdown_table(decode_table)}

**GQA prefill**: B = {batch}, N = N_kv = {seq_len}, H = {HEADS}, d = {HEAD_DIM}, non-causal,
group size H / H_kv from 1 to {HEADS}. K and V shrink by the group size (and the L2 model sees a
group's query heads reuse one K/V head, since their CTAs run side by side); flash2 is
compute-bound, so its time barely moves, and the unfused pipeline's bytes are the N x N scores,
which grouping leaves alone.

{markdown_table(gqa_table)}

Measured on the GPU (`python -m gpu.inference`, `experiments/data/h100/bench_inference.json`)
and compared with these predictions in the validation section."""
    return [Section("Inference shapes: decode and grouped-query attention", body,
                    figures=[("inference.png", "Left: predicted HBM bandwidth of decode "
                              "(flash_decoding) against the batch, one split (faint) vs the "
                              "heuristic's (solid colour). Right: GQA prefill, time and HBM bytes against the "
                              "group size, relative to multi-head.")],
                    data=["inference_decode.csv", "inference_gqa.csv"])]


if __name__ == "__main__":
    cli(main, "inference")
