"""compute-sanitizer runs over every kernel on small shapes: ``python -m gpu.sanitize``.

For each tool (memcheck, racecheck) and algorithm, a child process (``--child``) runs the algorithm on
N = 200 (not a multiple of any block) and N = 256, d in {64, 128}, causal and not, with CuPy's memory pool
off (each array its own cudaMalloc, so out-of-bounds accesses are caught), and checks the outputs.
Results (tool, algorithm, kernels, shapes, error count, summary line) go to one JSON.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

from . import schema as S

SHAPES = [dict(batch=1, heads=2, seq_len=n, head_dim=d, causal=c) for n in (200, 256) for d in (64, 128)
          for c in (False, True)]
FLASH_PAIRS = {"flash1": [(64, 64)], "flash2": [(64, 64), (128, 64), (128, 32)], "flash3": [(128, 128), (192, 128), (192, 64)]}


def _inference_target(algorithm: str):
    """(kernels, shapes) of a gpu/inference.py target (flash_decoding, flash2_gqa), else None."""
    from . import inference as I

    if algorithm not in I.SANITIZE_KERNELS:
        return None
    return I.SANITIZE_KERNELS[algorithm], I.sanitize_shapes(algorithm)


def child(algorithm: str) -> int:
    import cupy as cp
    from . import kernels as K, reference as R

    if _inference_target(algorithm):   # GQA prefill / split-KV decode: gpu/inference.py runs its own shapes
        from .inference import sanitize_child
        return sanitize_child(algorithm)
    cp.cuda.set_allocator(None)
    ok = True
    for sh in SHAPES:
        B, H, N, d, causal = sh["batch"], sh["heads"], sh["seq_len"], sh["head_dim"], sh["causal"]
        rs = cp.random.RandomState(N + d)
        q, k, v = (rs.standard_normal((B, H, N, d), dtype=cp.float32).astype(cp.float16) for _ in range(3))
        ref = R.attention_reference(q, k, v, causal, xp=cp)
        o16 = R.attention_fp16_plain(q, k, v, causal, xp=cp)
        e16 = R.rel_error(o16, ref, xp=cp)
        pairs = FLASH_PAIRS.get(algorithm, [(None, None)])
        for br, bc in pairs:
            if br is not None and not K.flash_fits(algorithm, br, bc, d):  # flash3 (192, 128) is d=64 only
                continue
            out = cp.full((B, H, N, d), float("nan"), dtype=cp.float16)
            p = K.make_pipeline(algorithm, (B, H, N, d), causal, br, bc)
            p.run(q, k, v, out)
            cp.cuda.runtime.deviceSynchronize()
            chk = R.check_error(R.rel_error(out, ref, xp=cp), e16)
            ok &= chk["passed"]
            print(f"SANITIZE_CHECK {algorithm} {br},{bc} N={N} d={d} causal={causal} "
                  f"err={chk['rel_error']} bound={chk['error_bound']:.2e} passed={chk['passed']}", flush=True)
            p.free()
    return 0 if ok else 3


def run_all(out_path: str, tools, algorithms, deadline_s: float) -> dict:
    cs = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    t0 = time.monotonic()
    results = []
    env = dict(os.environ)
    for tool in tools:
        for alg in algorithms:
            if time.monotonic() - t0 > deadline_s:
                results.append({"tool": tool, "algorithm": alg, "skipped": "deadline"})
                continue
            cmd = [cs, "--tool", tool, "--target-processes", "all", "--print-limit", "50"]
            if tool == "racecheck":
                cmd += ["--racecheck-report", "all"]
            cmd += [sys.executable, "-m", "gpu.sanitize", "--child", alg]
            t1 = time.monotonic()
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            text = p.stdout + "\n" + p.stderr
            m = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: (\d+) (?:errors?|hazards?)[^\n]*", text)
            summary = [ln.strip() for ln in text.splitlines() if "SUMMARY" in ln]
            err_count = sum(int(x) for x in m) if m else None
            kernels_with_errors = sorted(set(re.findall(r"in ([A-Za-z_][A-Za-z0-9_]*)\s*(?:\(|$)", "\n".join(
                ln for ln in text.splitlines() if ("Invalid" in ln or "hazard" in ln.lower() or "in " in ln)
                and ("=========" in ln)))))
            checks = [ln for ln in text.splitlines() if ln.startswith("SANITIZE_CHECK")]
            from .kernels import kernel_names
            inf = _inference_target(alg)
            results.append({
                "tool": tool, "algorithm": alg,
                "kernels": inf[0] if inf else sorted(set(kernel_names(alg, False)) | set(kernel_names(alg, True))),
                "shapes": inf[1] if inf else SHAPES, "flash_block_pairs": FLASH_PAIRS.get(alg),
                "error_count": err_count, "summary": summary, "returncode": p.returncode,
                "kernels_in_reports": kernels_with_errors if err_count else [],
                "output_checks": checks, "all_outputs_passed": bool(checks) and all("passed=True" in c for c in checks),
                "elapsed_s": time.monotonic() - t1,
                "log_tail": text[-3000:] if (err_count or p.returncode) else text[-600:]})
            print(f"{tool:10s} {alg:9s} errors={err_count} rc={p.returncode} "
                  f"checks={len(checks)} {summary[-1] if summary else ''} ({time.monotonic()-t1:.1f}s)", flush=True)
            S.write_json_atomic(out_path, {"schema": "iosim-gpu-sanitizers/1", "results": results})
    return {"schema": "iosim-gpu-sanitizers/1", "results": results, "elapsed_s": time.monotonic() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpu.sanitize", description=__doc__)
    ap.add_argument("--out", default="experiments/data/h100/sanitizers.json")
    ap.add_argument("--tools", nargs="*", default=["memcheck", "racecheck"])
    ap.add_argument("--algorithms", nargs="*", default=["standard", "megatron", "hf", "flash1", "flash2"])
    ap.add_argument("--deadline-s", type=float, default=300)
    ap.add_argument("--child", default=None)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)
    from .bench import now_iso, device_info

    doc = run_all(args.out, args.tools, args.algorithms, args.deadline_s)
    doc["date"] = now_iso()
    try:
        doc["device"] = device_info()
    except Exception:
        pass
    S.write_json_atomic(args.out, doc)
    bad = [r for r in doc["results"] if r.get("error_count") not in (0,) and not r.get("skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
