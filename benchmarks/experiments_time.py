"""How long the main job takes: ``python -m experiments`` (every script, then validation) run in a
temporary results folder, with its wall time, CPU time and peak resident memory, and each
script's seconds from the report it writes. A plain script that prints numbers.

    python benchmarks/experiments_time.py                  # the whole job
    python benchmarks/experiments_time.py --only validation design_space
    python benchmarks/experiments_time.py --quick          # the smoke-test settings
    python benchmarks/experiments_time.py --keep /tmp/out  # keep the results there

Peak RSS is the largest single process of the run (the command or one of its worker
processes), as ``/usr/bin/time -v`` reports it; the target (issue 12) is at most 180 s and
1.5 GB on a 2-core machine. On a shared VM the wall time varies by tens of percent with the
neighbours' load: the CPU time (user + system, every process) is steadier; compare runs on an
idle machine, or by CPU time.

Measured 2026-11-26 with /usr/bin/time -v (2-core shared VM; the other sessions' load varied;
"after" also simulates the flash3 backward runs that b0f6803 added to validation):

  =========================  ==========  ============  ===========
  run                        wall (s)    CPU (s)       peak RSS
  =========================  ==========  ============  ===========
  before (2808b76)           291         480           1.19 GB
  after (8517cce)            193         374           0.99 GB
  =========================  ==========  ============  ===========
"""
from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(results_dir: Path, extra: list[str]) -> dict:
    """Run the main job into ``results_dir``; wall seconds, CPU seconds, peak RSS bytes."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "experiments", str(results_dir), *extra],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
    return {"returncode": done.returncode, "wall_s": wall,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "peak_rss_bytes": after.ru_maxrss * 1024}  # Linux: KiB, the largest process


def script_seconds(report: Path) -> list[tuple[str, str]]:
    """(script, seconds) rows of the report's timing table."""
    rows = []
    for line in report.read_text().splitlines():
        match = re.match(r"\| `([\w]+)` \| ([\d.]+|failed) \|", line)
        if match:
            rows.append((match.group(1), match.group(2)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these scripts")
    parser.add_argument("--quick", action="store_true", help="the smoke-test settings")
    parser.add_argument("--keep", metavar="DIR", help="write the results here (kept)")
    args = parser.parse_args()
    extra = (["--quick"] if args.quick else []) + (["--only", *args.only] if args.only else [])
    with tempfile.TemporaryDirectory(prefix="iosim-experiments-") as tmp:
        results_dir = Path(args.keep) if args.keep else Path(tmp) / "results"
        result = run(results_dir, extra)
        report = results_dir / "report.md"
        if report.is_file():
            for name, seconds in script_seconds(report):
                print(f"  {name:<20} {seconds:>8} s")
    print(f"python -m experiments {' '.join(extra)}".rstrip() +
          f": {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU, "
          f"peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB"
          + ("" if result["returncode"] == 0 else f" (exit status {result['returncode']})"))
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
