"""Registers, shared memory and occupancy of the real kernels, read by Nsight Compute:
``python -m gpu.occupancy --out experiments/data/h100/occupancy.json``.

Every distinct kernel variant the bench sweep runs at B=4, H=16, N=4096, fp16, non-causal: flash1 and flash2 for
head_dim 64 and 128 and every (block_rows, block_cols) pair of the sweep (flash2 with the warp tiling
``kernels.flash2_tiling`` picks), and the unfused pipelines' kernels (standard: cuBLAS qk_gemm / pv_gemm +
softmax; hf: + scale; megatron: scale_mask_softmax). The module runs itself under ``ncu`` (as ``gpu.bench --ncu``
does): the child checks each pipeline the way the harness does (fresh standard-normal inputs, output poisoned with
NaN, two runs that must give the same error, error rule of ``reference.check_error``), runs it once as warm-up
and once inside the NVTX range ``iosim_prof`` after an ``iosim_marker`` launch of ``tag + 1`` blocks; the parent
parses ncu's CSV (``ncu.parse_metrics_csv``), splits it at the markers (``ncu.segments``), labels each kernel
(``label_kernels``) and writes one record per profiled kernel (schema ``iosim-gpu-occupancy/1``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

from . import kernels as K
from . import ncu as NCU
from . import reference as R
from . import schema as S
from . import sweep as SW

SCHEMA = "iosim-gpu-occupancy/1"
METRICS = (
    "launch__registers_per_thread", "launch__block_size", "launch__grid_size",
    "launch__shared_mem_per_block_dynamic", "launch__shared_mem_per_block_static",
    "launch__occupancy_limit_registers", "launch__occupancy_limit_shared_mem", "launch__occupancy_limit_warps",
    "launch__occupancy_limit_blocks", "sm__maximum_warps_per_active_cycle_pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active", "launch__waves_per_multiprocessor",
    "gpu__time_duration.sum",
)
SHAPE = {"batch": 4, "heads": 16, "seq_len": 4096, "causal": False}
HEAD_DIMS = (64, 128)
UNFUSED = ("standard", "hf", "megatron")
RECORD_KEYS = ("algorithm", "kernel", "head_dim", "block_rows", "block_cols", "warp_rows", "q_in_registers",
               "threads", "smem_bytes") + METRICS


def variants(head_dims=HEAD_DIMS) -> list[dict]:
    """The kernel variants profiled: every flash pair of the sweep (flash2 with its tiling) and the unfused
    pipelines, per head dim."""
    out = []
    for d in head_dims:
        for alg in SW.FLASH:
            for br, bc in SW.pairs_for(alg, d):
                wm, qreg = K.flash2_tiling(d, br, bc) if alg == "flash2" else (1, 1)
                out.append({"algorithm": alg, "head_dim": d, "block_rows": br, "block_cols": bc,
                            "warp_rows": 16 * wm, "q_in_registers": bool(qreg)})
        for alg in UNFUSED:
            out.append({"algorithm": alg, "head_dim": d, "block_rows": None, "block_cols": None,
                        "warp_rows": None, "q_in_registers": None})
    return out


# ------------------------------------------------------------------------------------------- parsing (CPU)
def label_kernels(seg: list[dict], expected: list[str]) -> list[tuple[str, dict]]:
    """(label, kernel) for each kernel of one segment: our kernels by name, library (cuBLAS) kernels as
    qk_gemm before our first kernel and pv_gemm after it. Raises ValueError when the segment does not hold
    the expected kernels (``ncu.attribute``'s rule)."""
    NCU.attribute(seg, expected)
    out, seen_own = [], False
    for k in seg:
        if k["base"] in NCU.OWN_KERNELS:
            out.append((k["base"], k))
            seen_own = True
        else:
            out.append(("pv_gemm" if seen_own else "qk_gemm", k))
    return out


def _int_or_none(x):
    return int(round(x)) if isinstance(x, (int, float)) and math.isfinite(x) else None


def build_records(csv_text: str, manifest: list[dict]) -> tuple[list[dict], list[str], int]:
    """Records (one per profiled kernel) from ncu's CSV and the child's manifest; problems; kernels parsed."""
    kernels = NCU.parse_metrics_csv(csv_text)
    segs = NCU.segments(kernels)
    records, problems = [], []
    for m in manifest:
        if m.get("tag") is None:
            problems.append(f"{m['algorithm']} d={m['head_dim']} ({m['block_rows']},{m['block_cols']}) not "
                            f"profiled: {m.get('reason', 'failed its check')}")
            continue
        seg = segs.get(m["tag"])
        if seg is None:
            problems.append(f"tag {m['tag']} ({m['algorithm']} d={m['head_dim']}) not found in the ncu output")
            continue
        try:
            labelled = label_kernels(seg, m["expected"])
        except ValueError as e:
            problems.append(f"tag {m['tag']} ({m['algorithm']} d={m['head_dim']}): {e}")
            continue
        for idx, (label, k) in enumerate(labelled):
            met = {name: k["metrics"].get(name) for name in METRICS}
            flash = m["algorithm"] in SW.FLASH
            dyn, sta = met["launch__shared_mem_per_block_dynamic"], met["launch__shared_mem_per_block_static"]
            rec = {"algorithm": m["algorithm"], "kernel": label, "kernel_name": k["name"][:200],
                   "launch_index": idx, "head_dim": m["head_dim"], "block_rows": m["block_rows"],
                   "block_cols": m["block_cols"], "warp_rows": m["warp_rows"],
                   "q_in_registers": m["q_in_registers"],
                   "threads": m["threads"] if flash else _int_or_none(met["launch__block_size"]),
                   "smem_bytes": m["smem_bytes"] if flash else (
                       _int_or_none(dyn + sta) if dyn is not None and sta is not None else None),
                   "grid": k["grid"], "block": k["block"]}
            rec.update(met)
            rec.update({f: m.get(f) for f in ("rel_error", "rel_error_fp16_reference", "error_bound", "passed")})
            missing = [n for n in METRICS if met[n] is None]
            if missing:
                problems.append(f"tag {m['tag']} {label}: metrics missing {missing}")
            records.append(rec)
    return records, problems, len(kernels)


def validate(doc) -> list[str]:
    """Problems of an ``iosim-gpu-occupancy/1`` document (empty list when well-formed)."""
    errs = []
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        return [f"schema must be {SCHEMA!r}"]
    for k in ("date", "device", "settings", "records"):
        if k not in doc:
            errs.append(f"{k} missing")
    if errs:
        return errs
    for k in S.DEVICE_KEYS:
        if k not in doc["device"]:
            errs.append(f"device.{k} missing")
    for k in ("shape", "ncu_command", "metrics"):
        if k not in doc["settings"]:
            errs.append(f"settings.{k} missing")
    for i, r in enumerate(doc["records"]):
        w = f"records[{i}]"
        for k in RECORD_KEYS:
            if k not in r:
                errs.append(f"{w}.{k} missing")
        if r.get("passed") is not True:
            errs.append(f"{w}: kernel check did not pass")
        for k in METRICS:
            v = r.get(k)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                errs.append(f"{w}.{k} must be a finite non-negative number")
        if r.get("algorithm") in SW.FLASH:
            for k in ("block_rows", "block_cols", "warp_rows", "threads", "smem_bytes"):
                if not (isinstance(r.get(k), int) and r[k] > 0):
                    errs.append(f"{w}.{k} must be a positive integer for {r.get('algorithm')}")
    return errs


# ------------------------------------------------------------------------------------------- child (GPU)
def _fp16_reference_error(q, k, v, ref, out, causal):
    """The harness's fp16 reference error: PyTorch's plain matmul-softmax-matmul, else the CuPy fp16 path."""
    import cupy as cp
    from . import bench as BN

    try:
        import torch  # noqa: F401

        tp = BN._TorchPipe("torch_plain", {"head_dim": q.shape[3], "seq_len": q.shape[2], "causal": causal})
        tp.run(q, k, v, out)
        cp.cuda.runtime.deviceSynchronize()
        return R.rel_error(out, ref, xp=cp), "torch_plain"
    except ImportError:
        o16 = R.attention_fp16_plain(q, k, v, causal, xp=cp)
        return R.rel_error(o16, ref, xp=cp), "cupy_fp16_plain"


def cmd_child(args) -> int:
    import cupy as cp
    from . import bench as BN

    t0 = time.monotonic()
    manifest, tag = [], 0
    for d in args.head_dims:
        shape = dict(SHAPE, head_dim=d)
        B, H, N = shape["batch"], shape["heads"], shape["seq_len"]
        q, k, v = BN.make_inputs(shape, 1, seed=args.seed + 31 * d)[0]
        ref = R.attention_reference(q, k, v, False, xp=cp)
        out = cp.empty((B, H, N, d), dtype=cp.float16)
        fp16_err, fp16_src = _fp16_reference_error(q, k, v, ref, out, False)
        BN._free_pools()
        print(f"d={d}: fp16 reference error {fp16_err:.3e} ({fp16_src})", flush=True)
        for var in variants((d,)):
            alg = var["algorithm"]
            entry = dict(var, **shape, expected=K.kernel_names(alg, False), tag=None,
                         rel_error_fp16_reference_source=fp16_src)
            if time.monotonic() - t0 > args.deadline_s:
                entry["reason"] = "deadline"
                manifest.append(entry)
                continue
            pipe = None
            try:
                pipe = K.make_pipeline(alg, (B, H, N, d), False, var["block_rows"], var["block_cols"])
                entry.update(BN.kernel_resources(alg, pipe))
                chk = BN.check_pipeline(pipe, q, k, v, out, ref, fp16_err)
                entry.update(chk)
                if not chk["passed"]:
                    entry["reason"] = f"check failed: {chk}"
                    print(f"  {alg} d={d} ({var['block_rows']},{var['block_cols']}) FAILED its check {chk}",
                          flush=True)
                else:
                    tag += 1
                    BN.profiled_run(pipe, q, k, v, out, tag)
                    entry["tag"] = tag
                    print(f"  tag {tag}: {alg} d={d} ({var['block_rows']},{var['block_cols']}) "
                          f"err {chk['rel_error']:.2e} (bound {chk['error_bound']:.2e}) "
                          f"[{time.monotonic() - t0:.0f} s]", flush=True)
            except Exception as e:  # noqa: BLE001
                entry["reason"] = repr(e)[:1000]
                print(f"  {alg} d={d} ({var['block_rows']},{var['block_cols']}) error {e!r}"[:800], flush=True)
            finally:
                if pipe is not None:
                    pipe.free()
                pipe = None
                BN._free_pools()
            manifest.append(entry)
        del q, k, v, ref, out
        BN._free_pools()
    S.write_json_atomic(args.manifest, {"manifest": manifest})
    return 0


# ------------------------------------------------------------------------------------------- parent
def _ncu_attempts(ncu: str, csv_path: str) -> list[tuple[str, list[str]]]:
    base = [ncu, "--clock-control", "none", "--cache-control", "all", "--csv", "--print-units", "base",
            "--log-file", csv_path, "--nvtx", "--nvtx-include", "iosim_prof/"]
    return [("metrics", base + ["--metrics", ",".join(METRICS)]),
            # fallback: the sections that hold the same metrics, printed by metric name
            ("sections", base + ["--print-metric-name", "name", "--section", "LaunchStats", "--section",
                                 "Occupancy", "--metrics", "gpu__time_duration.sum"])]


def cmd_profile(args) -> int:
    from . import bench as BN

    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    csv_path = args.raw_csv or (args.out + ".csv")
    man_path = args.out + ".manifest.json"
    t0 = time.monotonic()
    result = None
    for label, cmd in _ncu_attempts(ncu, csv_path):
        left = args.deadline_s - (time.monotonic() - t0)
        if result is not None and left < 30:
            print(f"no time left for the ncu attempt {label}", flush=True)
            break
        child = [sys.executable, "-m", "gpu.occupancy", "--child", "--manifest", man_path, "--seed",
                 str(args.seed), "--deadline-s", str(max(30.0, left)), "--head-dims", *map(str, args.head_dims)]
        for p in (csv_path, man_path):
            if os.path.exists(p):
                os.unlink(p)
        print("running: " + " ".join(cmd + child), flush=True)
        rc = subprocess.run(cmd + child).returncode
        try:
            with open(csv_path) as f:
                text = f.read()
            with open(man_path) as f:
                manifest = json.load(f)["manifest"]
        except Exception as e:  # noqa: BLE001
            print(f"ncu attempt {label}: no output ({e!r}), rc={rc}", flush=True)
            continue
        records, problems, nparsed = build_records(text, manifest)
        print(f"ncu attempt {label}: rc={rc}, {nparsed} kernels parsed, {len(records)} records, "
              f"{len(problems)} problems", flush=True)
        result = (label, cmd, rc, manifest, records, problems)
        if records:
            break
        tail = text[-3000:]
        print("ncu output tail:\n" + tail, flush=True)
    if result is None:
        return 1
    label, cmd, rc, manifest, records, problems = result
    doc = {"schema": SCHEMA, "date": BN.now_iso(), "device": BN.device_info(),
           "settings": {"shape": dict(SHAPE), "head_dims": list(args.head_dims), "dtype": "fp16",
                        "accumulate": "fp32", "input_distribution": "standard normal, rounded to fp16",
                        "ncu_command": " ".join(cmd), "ncu_rc": rc, "ncu_mode": label, "metrics": list(METRICS),
                        "ncu_cache_control": "all", "ncu_clock_control": "none",
                        "units": "gpu__time_duration.sum in seconds, shared memory in bytes, *_pct in percent, "
                                 "occupancy limits in CTAs per SM",
                        "error_rule": "rel_error <= 2 * rel_error_fp16_reference + 1e-4, all elements finite, "
                                      "two runs with equal error (checked before profiling)",
                        "seed": args.seed},
           "records": records, "checks": manifest, "problems": problems,
           "elapsed_s": time.monotonic() - t0}
    doc["schema_problems"] = validate(doc)
    S.write_json_atomic(args.out, doc)
    print(f"wrote {args.out}: {len(records)} records, {len(problems)} problems, "
          f"{len(doc['schema_problems'])} schema problems", flush=True)
    for p in problems[:20]:
        print("  problem: " + p, flush=True)
    for line in table_lines(records):
        print(line, flush=True)
    return 0 if records and not problems else 1


def table_lines(records: list[dict]) -> list[str]:
    out = [f"{'algorithm':9s} {'kernel':19s} {'d':>3s} {'Br,Bc':>8s} {'wr':>3s} {'qr':>2s} {'regs':>4s} "
           f"{'thr':>4s} {'smem':>7s} {'lim r/s/w/b':>12s} {'theo%':>6s} {'ach%':>6s} {'waves':>6s} {'ms':>8s}"]
    for r in records:
        br = f"{r['block_rows']},{r['block_cols']}" if r["block_rows"] else "-"

        def g(k, fmt):
            v = r.get(k)
            return format(v, fmt) if isinstance(v, (int, float)) else "?"
        lim = "/".join(g(k, ".0f") for k in ("launch__occupancy_limit_registers", "launch__occupancy_limit_shared_mem",
                                              "launch__occupancy_limit_warps", "launch__occupancy_limit_blocks"))
        t = r.get("gpu__time_duration.sum")
        out.append(f"{r['algorithm']:9s} {r['kernel']:19s} {r['head_dim']:3d} {br:>8s} "
                   f"{(r['warp_rows'] or '-')!s:>3s} {('-' if r['q_in_registers'] is None else int(r['q_in_registers']))!s:>2s} "
                   f"{g('launch__registers_per_thread', '.0f'):>4s} {str(r['threads']):>4s} {str(r['smem_bytes']):>7s} "
                   f"{lim:>12s} {g('sm__maximum_warps_per_active_cycle_pct', '.2f'):>6s} "
                   f"{g('sm__warps_active.avg.pct_of_peak_sustained_active', '.2f'):>6s} "
                   f"{g('launch__waves_per_multiprocessor', '.2f'):>6s} "
                   f"{(t * 1e3 if isinstance(t, (int, float)) else float('nan')):8.3f}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpu.occupancy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/data/h100/occupancy.json")
    ap.add_argument("--raw-csv", default=None, help="where ncu's CSV goes (default OUT.csv)")
    ap.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--deadline-s", type=float, default=300.0,
                    help="no new variant is started after this many seconds (all ncu attempts together)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return cmd_child(args)
    return cmd_profile(args)


if __name__ == "__main__":
    sys.exit(main())
