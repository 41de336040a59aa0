"""Long contexts and memory: streamed and sampled simulation against the exact replay.
A plain script that prints numbers (no asserts).

    python benchmarks/sampling_speed.py              # every part
    python benchmarks/sampling_speed.py --skip-explore --max-seq-len 16384

(a) the explorer example (``iosim explore --algorithm flash2 --batch 8 --heads 16 --seq-len
    4096 --head-dim 128``) as a subprocess, by default (pairs sampled) and with ``--exact``:
    wall time, peak memory (targets: 5 s, 1.5 GB on 2 cores) and whether the rankings agree;
(b) single simulations, each in its own process (peak RSS of that process alone): exact
    (``exact=True``: every event replayed; streamed above iosim.sampling.STREAM_ABOVE_EVENTS)
    and sampled (``exact=False``) on a grid of shapes up to N = 65536, with the sampled
    counts' error against the exact ones, whether the exact value lies in the 95 % interval,
    and the share of the event stream the sampler replayed (target: within 1 %; any single
    simulation within 1 GB);
(c) flash2 at N = 262,144 exact and sampled, and at N = 1,048,576 sampled (H = 1, d = 128,
    l2 model; target 30 s): the cost estimate, the wall time, peak memory and the counts.

Each process's peak memory is its ``ru_maxrss``; for the explorer (worker processes) the sum
over the process tree is sampled every 50 ms with psutil.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

EXPLORE = ["explore", "--algorithm", "flash2", "--batch", "8", "--heads", "16",
           "--seq-len", "4096", "--head-dim", "128", "--hardware", "h100-measured",
           "--no-progress"]

# (algorithm, B, H, N, d, causal, Br, Bc)
GRID = [
    ("flash2", 8, 16, 4096, 128, False, 64, 64),
    ("flash2", 8, 16, 4096, 128, False, 16, 16),
    ("flash2", 4, 16, 8192, 128, True, None, None),
    ("flash2", 4, 16, 16384, 64, False, None, None),
    ("flash2", 1, 32, 65536, 16, True, None, None),
    ("flash2", 1, 16, 65536, 128, False, None, None),
    ("flash2", 1, 1, 65536, 128, False, None, None),
    ("standard", 4, 16, 2048, 64, False, None, None),
]

CHILD = r"""
import json, resource, sys, time
import iosim
from iosim.simulate import simulate
alg, b, h, n, d, causal, br, bc, exact = json.loads(sys.argv[1])
shape = iosim.AttentionShape(b, h, n, d, causal=causal)
for warm in (True, False):  # load the Numba cache of both paths before the clock starts
    simulate(alg, iosim.AttentionShape(1, 2, 256, d), exact=warm)
t0 = time.perf_counter()
r = simulate(alg, shape, block_rows=br, block_cols=bc, exact=exact, max_memory_bytes=None,
             max_seconds=None)
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                  * 1024, "sampled": r.sampled,
                  "totals": {k: getattr(r.totals, k) for k in (
                      "hbm_read_bytes", "hbm_write_bytes", "l2_dirty_end_bytes",
                      "predicted_time_s")},
                  "intervals": r.totals.intervals, "events": int(sum(
                      k.l2_line_accesses for k in r.kernels))}))
"""


def run_child(case, exact):
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(list(case) + [exact])],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def tree_rss(proc) -> int:
    import psutil

    try:
        root = psutil.Process(proc.pid)
        return sum(p.memory_info().rss for p in [root] + root.children(recursive=True))
    except psutil.Error:
        return 0


def explore_example():
    print("(a) iosim explore, the example (flash2 B=8 H=16 N=4096 d=128), every core:")
    first = None
    for extra in ([], ["--exact"]):
        rows = run_explore(extra)
        if first is None:
            first = rows
        elif rows:
            worst = max(abs(float(a[4]) / float(b[4]) - 1) for a, b in zip(first, rows))
            same = [a[1:3] for a in first] == [b[1:3] for b in rows]
            print(f"    same ranking as --exact: {same}; predicted times differ by at most "
                  f"{100 * worst:.3f}%")


def run_explore(extra):
    """Run the explorer example (plus ``extra`` options); print its time and memory; return
    its ranked rows (rank, Br, Bc, splits, predicted ms, ...) as split lines."""
    cmd = [sys.executable, "-m", "iosim"] + EXPLORE + extra + ["--top", "100"]
    subprocess.run(cmd + ["--top", "1"], capture_output=True, timeout=3600)  # warm the caches
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    try:
        import psutil  # noqa: F401  (tree_rss needs it)
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc))
            time.sleep(0.05)
    except ImportError:
        pass
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    print(f"    {' '.join(['iosim explore'] + extra):22s} {wall:5.1f} s wall, peak memory of "
          f"the process tree {peak / 2**30:.2f} GiB (exit {proc.returncode})")
    return [line.split() for line in out.splitlines()[1:] if line.strip()[:1].isdigit()]


def grid(max_n):
    print("(b) single simulations, exact vs sampled (each in its own process, after warm-up):")
    print(f"    {'shape':44s} {'exact':>8s} {'RSS':>7s} {'sampled':>8s} {'RSS':>7s} "
          f"{'HBM read err':>12s} {'write err':>10s} {'time err':>9s} {'in CI':>6s}")
    for case in GRID:
        alg, b, h, n, d, causal, br, bc = case
        if n > max_n:
            continue
        exact = run_child(case, True)
        sampled = run_child(case, False)
        name = (f"{alg} B={b} H={h} N={n} d={d}{' causal' if causal else ''}"
                f"{f' {br}x{bc}' if br else ''}")
        if "error" in exact or "error" in sampled:
            print(f"    {name:44s} error: {exact.get('error') or sampled.get('error')}")
            continue
        errors = []
        for key in ("hbm_read_bytes", "hbm_write_bytes", "predicted_time_s"):
            want, got = exact["totals"][key], sampled["totals"][key]
            errors.append(100 * (got - want) / want if want else 0.0)
        inside = all(low <= exact["totals"][k] <= high
                     for k, (low, high) in sampled["intervals"].items())
        print(f"    {name:44s} {exact['wall_s']:7.2f}s {exact['rss_bytes'] / 2**30:6.2f}G "
              f"{sampled['wall_s']:7.2f}s {sampled['rss_bytes'] / 2**30:6.2f}G "
              f"{errors[0]:+11.3f}% {errors[1]:+9.3f}% {errors[2]:+8.3f}% "
              f"{('yes' if inside else 'NO') if sampled['sampled'] else '(exact)':>6s}")


def million_tokens(max_memory_gb):
    from iosim import budget
    from iosim.hardware import load_hardware
    from iosim.schedules import build_schedule
    from iosim.shape import AttentionShape

    print("(c) flash2 long contexts (H=1, d=128, l2 model; target at N = 1,048,576: 30 s), "
          "sampled by default, each in its own process:")
    hw = load_hardware("h100-measured")
    for n, exact in ((1 << 18, True), (1 << 18, None), (1 << 20, None)):
        schedule = build_schedule("flash2", AttentionShape(1, 1, n, 128),
                                  sram_bytes=hw.sram_bytes_per_block)
        cost = budget.estimate(schedule, streamed=True, sampled=not exact)
        name = f"N={n} {'exact' if exact else 'default'}"
        if cost.memory_bytes > max_memory_gb * 2**30:
            print(f"    {name}: not run, estimate {cost.describe()} over --max-memory-gb "
                  f"{max_memory_gb:g}")
            continue
        r = run_child(("flash2", 1, 1, n, 128, False, None, None), exact)
        if "error" in r:
            print(f"    {name}: error: {r['error']}")
            continue
        t = r["totals"]
        print(f"    {name:18s} estimate {cost.describe()} (compressed template: "
              f"{cost.template_events:.3g} events); ran {r['wall_s']:.1f} s, peak RSS "
              f"{r['rss_bytes'] / 2**30:.2f} GiB, sampled {r['sampled']}; HBM read "
              f"{t['hbm_read_bytes']:.6g} B, write {t['hbm_write_bytes']:.6g} B, predicted "
              f"{1e3 * t['predicted_time_s']:.2f} ms; 95% intervals {r['intervals'] or '-'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-explore", action="store_true")
    parser.add_argument("--max-seq-len", type=int, default=65536)
    parser.add_argument("--max-memory-gb", type=float, default=8.0)
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} cores; python {sys.version.split()[0]}")
    if not args.skip_explore:
        explore_example()
    grid(args.max_seq_len)
    million_tokens(args.max_memory_gb)


if __name__ == "__main__":
    main()
