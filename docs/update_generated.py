"""Copy what `python -m experiments` made into the docs: figures into docs/figures/ and the
validation section into docs/validation.md.

    python -m experiments && python docs/update_generated.py [results_dir]
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
FIGURES = ("roofline_a100-40gb.png", "roofline_h100-measured.png", "figure2_blocksize.png",
           "sram_sweep.png", "seq_len_sweep.png", "validation_time.png", "validation_bytes.png",
           "validation_roofline.png", "timeline.png", "backward_tradeoff.png",
           "design_space.png", "inference.png")

VALIDATION_INTRO = """# Validation on the H100

iosim's predictions for the kernels it models, beside what an H100 SXM measured. The
measurements are committed under `experiments/data/h100/` (`bench.json`: timings by CUDA
events, median of 20 runs over rotated inputs, with Nsight Compute DRAM bytes per kernel;
`calibration.json`: the microbenchmarks behind the `h100-measured` preset; `sanitizers.json`,
`sass.json`; `occupancy.json`: registers per thread and achieved occupancy of every kernel
variant, by Nsight Compute). Both time models take their figures only from `calibration.json`
— copy bandwidth, L2 and shared-memory bandwidth, GEMM and `mma.sync` rates, fp32 FMA and `ex2`
rates, launch overhead, and for the timed model the SM clock and the latencies of DRAM, L2,
shared memory, a dependent `mma.sync`, FMA, `ex2` and a barrier — never from the attention runs
they predict; nothing is fitted. The only figure taken from the real kernels is their
registers per thread (what ptxas chose), declared on the schedule as a kernel writer would.

## Re-run it

On a machine with an NVIDIA GPU and CuPy:

```bash
python -m gpu.calibrate --out experiments/data/<gpu>/calibration.json
python -m iosim.calibration experiments/data/<gpu>/calibration.json > iosim/presets/<gpu>-measured.toml
python -m gpu.bench --sweep full --out experiments/data/<gpu>/bench.json
python -m gpu.bench --ncu --sweep ncu --out experiments/data/<gpu>/ncu.json \\
    --merge-into experiments/data/<gpu>/bench.json
python -m gpu.occupancy --out experiments/data/<gpu>/occupancy.json
```

then anywhere, `python -m experiments` (or `python -m experiments.validation`) renders the
tables and figures below from the committed data.

"""

VALIDATION_READING = """
## Reading the results

* **DRAM bytes.** Compare the `l2` and `two-level` columns: the two-level (paper) model
  counts every K/V tile FlashAttention-2 streams as HBM traffic, while on a real GPU the tiles
  that the concurrent CTAs of one head share are served by the L2 — which the `l2` model
  reproduces. The largest remaining byte errors are flash kernels whose own data is close to
  the L2's size, and flash2 at N = 16k, where real CTAs drift apart and re-fetch K/V tiles that
  the lock-step replay shares.
* **Time, flash2.** The roofline misses most where an SM holds few warps (the occupancy
  table): a variant whose double-buffered tiles leave room for one 4-warp CTA per SM runs
  about twice as slow as its FLOPs say, because each warp waits for every fragment it loads
  from shared memory and nothing else on its sub-partition fills the gap. The timed model
  charges exactly that latency and lets resident warps queue for the pipes, so its error no
  longer grows with falling occupancy. What it still misses is within one occupancy level:
  the real kernels' register allocation (255 registers, small spills in some variants) and
  how far the compiler software-pipelines fragment loads, which the model does not see.
* **Time, flash1.** The timed model first predicted our flash1 kernel about a third faster
  than it ran. The kernel's machine code said why (`gpu/NOTES.md`, "SASS of the flash1 O
  update", reproduced by `gpu/sass_order.py`): the O_i update issued its loads two at a time,
  each pair consumed and stored before the next — 1 + d/8 dependent DRAM round trips per warp
  and step where the model assumes one. The kernel was fixed to issue each step's O_i, l_i and
  m_i loads together and re-measured (`bench_flash1_before.json` keeps the old runs): it runs
  at 0.35-0.93x its old time, and the model, unchanged except that back-to-back loads now wait
  once as a group, lands within the error shown above. The remaining worst cases are the
  4-warp (Br = 64) variants at d = 64, which run faster than predicted.
* **Time, unfused pipelines.** HBM-bound; the row-wise softmax kernels move data at about
  83% of the copy bandwidth, which neither model predicts (no microbenchmark of a
  read-compute-write row kernel's achievable bandwidth is in the calibration), and the
  smallest kernels are dominated by launch and tail effects.
* **Block sizes.** flash1's ranking is right on every shape. flash2's pairs that keep the same
  number of warps resident lie within about 15% of one another, the size of the model's own
  per-kernel error, so its best pick is often a close second; the pair that halves the
  occupancy (64 x 128 at d = 128) is always ranked last, as measured.

"""


def main(results: Path) -> None:
    (DOCS / "figures").mkdir(exist_ok=True)
    for name in FIGURES:
        if (results / name).exists():
            shutil.copyfile(results / name, DOCS / "figures" / name)
    section = (results / "validation.md").read_text()
    section = section.replace("](validation_", "](figures/validation_")
    section = "\n".join(line for line in section.splitlines()
                        if not line.startswith("## Validation against"))
    (DOCS / "validation.md").write_text(VALIDATION_INTRO + "## The tables\n" + section
                                        + VALIDATION_READING)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("results"))
