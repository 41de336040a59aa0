#!/bin/bash
# Device-side driver of the standard-backward measurement (writes under $OUT).
#   bash gpu/run_backward.sh          # GPU tests, then the non-causal sweep -> $OUT/bench_backward.json
#   bash gpu/run_backward.sh more     # append causal runs to the committed file, then ncu DRAM bytes
#   bash gpu/run_backward.sh flash2   # flash2 backward: variants (pick the fastest passing per d), GPU tests (small
#                                     # shapes), flash2 runs (unordered atomics, causal and not; ordered dQ at
#                                     # N=4096) appended to the committed file, ncu DRAM bytes, compute-sanitizer
#   bash gpu/run_backward.sh flash3   # flash3 (Hopper) backward: variants (fastest passing per d), GPU tests (flash3
#                                     # forward and backward, small shapes), runs (causal and not; FLASH3_SEQ_LENS)
#                                     # appended to experiments/data/h100/bench_backward_flash3.json, ncu DRAM
#                                     # bytes (N=4096), compute-sanitizer; FLASH3_STEPS picks steps (default: all)
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
  elif [ "${1:-}" = flash3 ]; then
    F3=experiments/data/h100/bench_backward_flash3.json
    [ -f "$F3" ] && cp "$F3" "$OUT/bench_backward_flash3.json"
    STEPS=" ${FLASH3_STEPS:-variants tests runs ncu sanitize} "
    if [[ "$STEPS" == *" variants "* ]]; then
      # flash3_bwd variants (gpu.flash3_bwd.VARIANTS): checked, timed at N=4096 beside SDPA; the fastest passing
      # one per d is used below (IOSIM_FLASH3_BWD_CONFIG; each run records its tiles, defines, registers)
      timeout 200 python3 -m gpu.backward --algorithm flash3 --variants --seq-lens 4096 --warmup 2 --repeats 10 \
          --out "$OUT/flash3_variants.json" 2>&1 | grep -v Warning
    fi
    [ -s "$OUT/flash3_variants.json.best.json" ] && export IOSIM_FLASH3_BWD_CONFIG="$OUT/flash3_variants.json.best.json"
    if [[ "$STEPS" == *" tests "* ]]; then
      timeout ${FLASH3_TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py -k "flash3" 2>&1 \
          | tail -25
    fi
    if [[ "$STEPS" == *" runs "* ]]; then
      for c in "" "--causal"; do
        timeout ${FLASH3_RUN_TIMEOUT:-150} python3 -m gpu.backward --algorithm flash3 \
            --seq-lens ${FLASH3_SEQ_LENS:-4096 1024 2048} --out "$OUT/bench_backward_flash3.json" --append $c \
            --deadline-s ${FLASH3_DEADLINE:-120} 2>&1
      done
    fi
    if [[ "$STEPS" == *" ncu "* ]]; then
      timeout 150 python3 -m gpu.backward --algorithm flash3 --ncu --out "$OUT/bench_backward_flash3.json" 2>&1 \
          | grep -v "^==PROF==" | tail -8
    fi
    if [[ "$STEPS" == *" sanitize "* ]]; then
      timeout 150 python3 -m gpu.backward --algorithm flash3 --sanitize --out "$OUT/bench_backward_flash3.json" 2>&1 \
          | tail -8
    fi
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
