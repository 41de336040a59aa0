#!/bin/bash
# Device-side driver: bash gpu/run_device.sh STAGE...   (writes under $OUT; see gpu/NOTES.md)
# Stages: info smoke precompile calibrate occupancy bench ncu sass sanitize
set -u
export PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/cupy_cache}
export CUPY_CACHE_SAVE_CUDA_SOURCE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
PY=python3
T0=$(date +%s)
el() { echo "[stage $1 t=$(( $(date +%s) - T0 ))s]"; }
for st in "$@"; do
  el "$st"
  case "$st" in
    info)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv 2>&1
      $PY -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__, torch.version.cuda)" 2>&1 ;;
    precompile-smoke) $PY -m gpu.bench --precompile --sweep smoke --jobs 14 2>&1 | tail -3 ;;
    precompile) $PY -m gpu.bench --precompile --sweep full --jobs 14 2>&1 | tail -3 ;;
    smoke) $PY -m gpu.bench --sweep smoke --repeats 5 --warmup 2 --out $OUT/smoke.json --deadline-s ${SMOKE_DEADLINE:-200} 2>&1 | tee $OUT/smoke.log ;;
    calibrate) $PY -m gpu.calibrate --out $OUT/calibration.json 2>&1 | tee /tmp/calibrate.log ;;
    occupancy) $PY -m gpu.occupancy --out $OUT/occupancy.json --raw-csv $OUT/occupancy_ncu.csv \
                 --deadline-s ${OCC_DEADLINE:-240} 2>&1 | tee /tmp/occupancy.log ;;
    bench) $PY -m gpu.bench --sweep ${SWEEP:-full} --out ${BENCH_OUT:-$OUT/bench.json} --deadline-s ${BENCH_DEADLINE:-300} 2>&1 | tee /tmp/bench.log
           [ "${BENCH_OUT:-$OUT/bench.json}" != "$OUT/bench.json" ] && cp ${BENCH_OUT} $OUT/bench.json ;;
    ncu-smoke) $PY -m gpu.bench --ncu --sweep ncu --max-n 1024 --algorithms standard hf flash2 --out $OUT/ncu_smoke.json --deadline-s 60 2>&1 | tail -25 ;;
    ncu) mkdir -p /tmp/ncu; $PY -m gpu.bench --ncu --sweep ncu --out /tmp/ncu/ncu.json --merge-into ${MERGE_INTO:-build/bench.json} --deadline-s ${NCU_DEADLINE:-200} 2>&1 | tail -30
         cp /tmp/ncu/ncu.json $OUT/ncu.json; [ -f ${MERGE_INTO:-build/bench.json} ] && cp ${MERGE_INTO:-build/bench.json} $OUT/bench_merged.json
         tar czf $OUT/ncu_raw.tgz -C /tmp/ncu . ;;
    logs) mkdir -p /tmp/sassdump; cp /tmp/calibrate.log /tmp/bench.log /tmp/sassdump/ 2>/dev/null; tar czf $OUT/logs.tgz -C /tmp sassdump 2>/dev/null; ls -la $OUT ;;
    sass) $PY -m gpu.sass --out $OUT/sass.json --dump-dir /tmp/sassdump 2>&1 | grep -E "flash|softmax|scale|mask" | head -40 ;;
    sanitize-smoke) $PY -m gpu.sanitize --out $OUT/sanitizers.json --tools memcheck --algorithms flash2 flash1 standard --deadline-s 90 2>&1 ;;
    sanitize) $PY -m gpu.sanitize --out $OUT/sanitizers.json --deadline-s ${SAN_DEADLINE:-200} 2>&1 ;;
    tune) $PY -m gpu.tune --out $OUT/tune.json --deadline-s ${TUNE_DEADLINE:-200} 2>&1 ;;
    cache-save) tar czf $OUT/cupy_cache.tgz -C "$CUPY_CACHE_DIR" . && ls -la $OUT/cupy_cache.tgz ;;
    cache-load) mkdir -p "$CUPY_CACHE_DIR" && [ -f build/cupy_cache.tgz ] && tar xzf build/cupy_cache.tgz -C "$CUPY_CACHE_DIR" && ls "$CUPY_CACHE_DIR" | wc -l ;;
    *) echo "unknown stage $st" ;;
  esac
done
el done
