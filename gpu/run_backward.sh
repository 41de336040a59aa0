#!/bin/bash
# Device-side driver of the standard-backward measurement (writes under $OUT).
#   bash gpu/run_backward.sh          # GPU tests, then the non-causal sweep -> $OUT/bench_backward.json
#   bash gpu/run_backward.sh more     # append causal runs to the committed file, then ncu DRAM bytes
#   bash gpu/run_backward.sh flash2   # flash2 backward: variants (pick the fastest passing per d), GPU tests (small
#                                     # shapes), flash2 runs (unordered atomics, causal and not; ordered dQ at
#                                     # N=4096) appended to the committed file, ncu DRAM bytes, compute-sanitizer
set -u
export PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/cupy_cache}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv 2>&1
  python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" 2>&1
  if [ "${1:-}" = flash2 ]; then
    cp experiments/data/h100/bench_backward.json "$OUT/bench_backward.json"
    # flash2_bwd variants (gpu.backward FLASH2_VARIANTS): checked, timed at N=4096; the fastest passing one per d
    # is used by everything below (IOSIM_FLASH2_BWD_CONFIG; each run records its tiles, defines, registers)
    timeout 120 python3 -m gpu.backward --algorithm flash2 --variants --seq-lens 4096 --warmup 2 --repeats 10 \
        --out "$OUT/flash2_variants.json" 2>&1 | grep -v Warning
    [ -s "$OUT/flash2_variants.json.best.json" ] && export IOSIM_FLASH2_BWD_CONFIG="$OUT/flash2_variants.json.best.json"
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
        -k "flash2_backward" 2>&1 | tail -25
    for c in "" "--causal"; do
      timeout 110 python3 -m gpu.backward --algorithm flash2 --out "$OUT/bench_backward.json" --append $c \
          --deadline-s 90 2>&1
    done
    for c in "" "--causal"; do
      timeout 60 python3 -m gpu.backward --algorithm flash2 --ordered --seq-lens 4096 \
          --out "$OUT/bench_backward.json" --append $c --deadline-s 45 2>&1
    done
    timeout 150 python3 -m gpu.backward --algorithm flash2 --ncu --out "$OUT/bench_backward.json" 2>&1 \
        | grep -v "^==PROF==" | tail -8
    timeout 150 python3 -m gpu.backward --algorithm flash2 --sanitize --out "$OUT/bench_backward.json" 2>&1 | tail -8
  elif [ "${1:-}" = more ]; then
    cp experiments/data/h100/bench_backward.json "$OUT/bench_backward.json"
    timeout 200 python3 -m gpu.backward --out "$OUT/bench_backward.json" --append --causal --deadline-s 150 2>&1
    timeout 240 python3 -m gpu.backward --ncu --out "$OUT/bench_backward.json" 2>&1 | grep -v "^==PROF==" | tail -40
  else
    timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_kernels.py \
        -k "backward or test_unfused" 2>&1 | tail -15
    timeout 380 python3 -m gpu.backward --out "$OUT/bench_backward.json" --deadline-s ${BWD_DEADLINE:-300} 2>&1
  fi
  date -u
} 2>&1 | tee "$OUT/backward${1:+_$1}.log"
