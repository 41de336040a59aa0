"""What the timed model costs: a plain script that prints numbers (no asserts).

    python benchmarks/timing_cost.py [--seq-len 4096] [--repeat 3]

For the docs' explorer example (flash2, B=8, H=16, N=4096, d=128, on ``h100-measured``) it times,
per block pair that fits, the three stages of one simulation after JIT warm-up — building the
trace, the L2 replay, and the timed model (``iosim.timing.time_kernel``) — and then the whole
``iosim.explore.explore`` call on every core. The timed model's share of a simulation is what
it adds to the explorer's cost over a roofline-only simulation (the replay and the trace are
shared by both time models).
"""
from __future__ import annotations

import argparse
import os
import time

import iosim
from iosim.explore import candidate_sizes, explore, fitting_pairs
from iosim.simulate import replay
from iosim.timing import time_kernel
from iosim.trace import build_trace


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    hw = iosim.load_hardware("h100-measured")
    shape = iosim.AttentionShape(8, 16, args.seq_len, 128)
    pairs = fitting_pairs("flash2", shape, hw, candidate_sizes(shape.seq_len))
    # warm up every @njit function once
    warm = build_trace(iosim.build_schedule("flash2", iosim.AttentionShape(1, 1, 256, 128)))
    for (row, hbm), kt in zip(replay(warm, hw, "l2"), warm.kernels):
        time_kernel(kt, hbm, hw, warm.schedule.shape)
    print(f"flash2 {shape.describe()} on {hw.name}: {len(pairs)} pairs; seconds, best of "
          f"{args.repeat}")
    print(f"{'Br x Bc':>9} {'trace':>8} {'replay':>8} {'timed':>8} {'timed share':>12}")
    totals = [0.0, 0.0, 0.0]
    for br, bc, _ in pairs:
        schedule = iosim.build_schedule("flash2", shape, br, bc, hw.sram_bytes_per_block)
        t_trace, trace = best_of(lambda: build_trace(schedule), args.repeat)
        t_replay, rows = best_of(lambda: replay(trace, hw, "l2"), args.repeat)
        t_timed, _ = best_of(lambda: [time_kernel(kt, hbm, hw, shape) for (row, hbm), kt
                                      in zip(rows, trace.kernels)], args.repeat)
        for i, t in enumerate((t_trace, t_replay, t_timed)):
            totals[i] += t
        share = t_timed / (t_trace + t_replay + t_timed)
        print(f"{br:>4} x {bc:<3} {t_trace:8.2f} {t_replay:8.2f} {t_timed:8.2f} {share:12.1%}")
    share = totals[2] / sum(totals)
    print(f"{'all':>9} {totals[0]:8.2f} {totals[1]:8.2f} {totals[2]:8.2f} {share:12.1%}")
    start = time.perf_counter()
    explore("flash2", shape, hardware=hw, progress=False)
    print(f"explore() on {os.cpu_count()} cores: {time.perf_counter() - start:.1f} s wall")


if __name__ == "__main__":
    main()
