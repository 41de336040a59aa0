"""How fast ``iosim.trace.build_trace`` runs: the op-by-op reference walker against the vectorised
builder (iosim.trace_fast). A plain script that prints numbers (and checks the two agree).

    python benchmarks/trace_speed.py                 # every case
    python benchmarks/trace_speed.py --skip-reference-over 5e6

Cases: flash2 forward, B=8 H=16 N=4096 d=128, Br=Bc=16, 64, 128; and B=1 H=1 N=16384 d=128,
Br=Bc=16, 64, 128. Per case: events, then seconds of the one-batch·head template (the part that
was a Python loop per op) and of the whole ``build_trace`` (the template tiled over batch·heads
by NumPy), old and new, best of ``--repeat`` after one untimed warm-up build (the first
touch of a few GB of fresh memory costs page faults, ~1 s per GB on a small VM). The old
``build_trace`` (``reference=True``) is the reference walker; both now add the per-head address
offsets as one (heads x events) broadcast (the table below was measured when the reference
also tiled addresses the old way, with a per-event head index).

Measured 2026-11-26 (2-core shared VM, seconds, best of 2; non-causal / --causal):

  =======================  ===========  ====================  =======================
  case (flash2, d=128)     events       template old -> new   build_trace old -> new
  =======================  ===========  ====================  =======================
  B8 H16 N4096 Br=Bc=16    50.6M        1.35 -> 0.023 (59x)   5.30 -> 0.60 (8.8x)
  B8 H16 N4096 Br=Bc=64    3.2M         0.072 -> 0.001        0.090 -> 0.023 (4.0x)
  B8 H16 N4096 Br=Bc=128   0.8M         0.019 -> 0.001        0.024 -> 0.003 (8.9x)
  B1 H1 N16384 Br=Bc=16    6.3M         22.2 -> 0.125 (177x)  22.7 -> 0.185 (123x)
  B1 H1 N16384 Br=Bc=64    0.40M        1.31 -> 0.007 (198x)  1.33 -> 0.008 (158x)
  B1 H1 N16384 Br=Bc=128   0.10M        0.33 -> 0.002 (193x)  0.33 -> 0.002 (181x)
  causal B8 H16 N4096 16   29.7M        0.71 -> 0.015 (46x)   4.03 -> 0.18 (23x)
  =======================  ===========  ====================  =======================

With many batch·heads the remaining cost is tiling the template (a few GB of event columns);
the per-batch·head template itself is 50-200x faster.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import iosim
from iosim import trace as tr
from iosim import trace_fast

CASES = [(8, 16, 4096, 16), (8, 16, 4096, 64), (8, 16, 4096, 128),
         (1, 1, 16384, 16), (1, 1, 16384, 64), (1, 1, 16384, 128)]


def _best(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _template_seconds(schedule, template_of, repeat):
    base, _ = tr.tensor_layout(schedule)
    ids = {t.name: i for i, t in enumerate(schedule.tensors)}
    kernel = schedule.kernels[0]
    return _best(lambda: template_of(kernel, schedule, base, ids), repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--skip-reference-over", type=float, default=float("inf"),
                        help="skip the old builder above this many events per batch·head")
    args = parser.parse_args()
    print(f"{'B':>2} {'H':>3} {'N':>6} {'Br=Bc':>5} {'events/head':>11} {'events':>10}  "
          f"{'template old':>12} {'new':>8} {'x':>7}  {'build_trace old':>15} {'new':>8} {'x':>6}")
    for batch, heads, n, block in CASES:
        shape = iosim.AttentionShape(batch=batch, heads=heads, seq_len=n, head_dim=128,
                                     causal=args.causal)
        schedule = iosim.build_schedule("flash2", shape, block, block)
        t_new, (cols, starts) = _template_seconds(schedule, trace_fast.head_template,
                                                  args.repeat)
        per_head = len(cols["kind"])
        tr.build_trace(schedule)  # warm-up: the first touch of fresh memory costs page faults
        b_new, _ = _best(lambda: tr.build_trace(schedule), args.repeat)
        if per_head > args.skip_reference_over:
            print(f"{batch:>2} {heads:>3} {n:>6} {block:>5} {per_head:>11} "
                  f"{per_head * batch * heads:>10}  {'-':>12} {t_new:>8.3f} {'-':>7}  "
                  f"{'-':>15} {b_new:>8.3f} {'-':>6}", flush=True)
            continue
        t_old, (ref_cols, ref_starts) = _template_seconds(schedule, tr._head_template_reference,
                                                          args.repeat)
        assert np.array_equal(starts, ref_starts)
        assert all(np.array_equal(cols[c], ref_cols[c]) for c in ref_cols)
        del ref_cols
        b_old, _ = _best(lambda: tr.build_trace(schedule, reference=True), args.repeat)
        print(f"{batch:>2} {heads:>3} {n:>6} {block:>5} {per_head:>11} "
              f"{per_head * batch * heads:>10}  {t_old:>12.3f} {t_new:>8.3f} "
              f"{t_old / t_new:>7.0f}  {b_old:>15.3f} {b_new:>8.3f} {b_old / b_new:>6.1f}",
              flush=True)


if __name__ == "__main__":
    main()
