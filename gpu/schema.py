"""The ``iosim-gpu-bench/1`` JSON schema: a validator the simulator side can call too (no dependencies)."""
from __future__ import annotations

import json
import math
import os

SCHEMA = "iosim-gpu-bench/1"
ALGORITHM_KERNELS = {
    "standard": ["qk_gemm", "softmax", "pv_gemm"],
    "megatron": ["qk_gemm", "scale_mask_softmax", "pv_gemm"],
    "hf": ["qk_gemm", "scale", "mask", "softmax", "pv_gemm"],
    "flash1": ["flash1_fwd"],
    "flash2": ["flash2_fwd"],
}
# algorithms run only when named (bench_flash3.json): valid in any document, not required in bench.json
EXTRA_ALGORITHM_KERNELS = {"flash3": ["flash3_fwd"]}
BASELINES = ("torch_sdpa", "torch_plain")
DEVICE_KEYS = ("name", "driver", "cuda_runtime", "cupy", "torch", "sm_count", "l2_bytes", "smem_per_block_optin")
SETTINGS_KEYS = ("dtype", "warmup", "repeats", "input_sets", "ncu_cache_control", "ncu_clock_control")
SHAPE_KEYS = ("batch", "heads", "seq_len", "head_dim", "causal")
RUN_KEYS = SHAPE_KEYS + ("algorithm", "block_rows", "block_cols", "rel_error", "rel_error_fp16_reference",
                         "error_bound", "passed", "time_s", "tflops", "kernels")
KERNEL_KEYS = ("name", "time_s", "dram_read_bytes", "dram_write_bytes", "ncu_duration_s")


def expected_kernels(algorithm: str, causal: bool) -> list[str]:
    names = list({**ALGORITHM_KERNELS, **EXTRA_ALGORITHM_KERNELS}[algorithm])
    if algorithm == "hf" and not causal:
        names.remove("mask")
    return names


def attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool) -> float:
    """Nominal forward FLOPs 4 B H N^2 d (half when causal)."""
    f = 4.0 * batch * heads * seq_len * seq_len * head_dim
    return f / 2 if causal else f


def _num(x, nonneg=True):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x >= 0 or not nonneg)


def _check_time(t, where, errs, required=True):
    if t is None:
        if required:
            errs.append(f"{where}: time_s missing")
        return
    if not isinstance(t, dict):
        errs.append(f"{where}: time_s must be an object")
        return
    for k in ("median", "min", "max"):
        if not _num(t.get(k)):
            errs.append(f"{where}: time_s.{k} must be a finite non-negative number")
    if all(_num(t.get(k)) for k in ("median", "min", "max")) and not (t["min"] <= t["median"] <= t["max"]):
        errs.append(f"{where}: time_s needs min <= median <= max")


def validate(doc) -> list[str]:
    """Return a list of problems (empty when ``doc`` follows the schema)."""
    errs: list[str] = []
    if not isinstance(doc, dict):
        return ["document must be an object"]
    if doc.get("schema") != SCHEMA:
        errs.append(f"schema must be {SCHEMA!r}")
    if not isinstance(doc.get("date"), str):
        errs.append("date must be an ISO 8601 string")
    dev = doc.get("device")
    if not isinstance(dev, dict):
        errs.append("device must be an object")
    else:
        for k in DEVICE_KEYS:
            if k not in dev:
                errs.append(f"device.{k} missing")
    st = doc.get("settings")
    if not isinstance(st, dict):
        errs.append("settings must be an object")
    else:
        for k in SETTINGS_KEYS:
            if k not in st:
                errs.append(f"settings.{k} missing")
    runs = doc.get("runs")
    if not isinstance(runs, list):
        errs.append("runs must be a list")
        runs = []
    for i, r in enumerate(runs):
        w = f"runs[{i}]"
        if not isinstance(r, dict):
            errs.append(f"{w} must be an object")
            continue
        for k in RUN_KEYS:
            if k not in r:
                errs.append(f"{w}.{k} missing")
        alg = r.get("algorithm")
        if alg not in ALGORITHM_KERNELS and alg not in EXTRA_ALGORITHM_KERNELS:
            errs.append(f"{w}.algorithm {alg!r} unknown")
            continue
        for k in ("batch", "heads", "seq_len", "head_dim"):
            if not (isinstance(r.get(k), int) and not isinstance(r.get(k), bool) and r.get(k) > 0):
                errs.append(f"{w}.{k} must be a positive integer")
        if not isinstance(r.get("causal"), bool):
            errs.append(f"{w}.causal must be a boolean")
        if alg in ("flash1", "flash2", "flash3"):
            for k in ("block_rows", "block_cols"):
                if not (isinstance(r.get(k), int) and r.get(k) > 0):
                    errs.append(f"{w}.{k} must be a positive integer for {alg}")
        else:
            if r.get("block_rows") is not None or r.get("block_cols") is not None:
                errs.append(f"{w}: block_rows/block_cols must be null for {alg}")
        if not isinstance(r.get("passed"), bool):
            errs.append(f"{w}.passed must be a boolean")
        if r.get("passed") is True:
            re_, bound = r.get("rel_error"), r.get("error_bound")
            if not (_num(re_) and _num(bound) and re_ <= bound):
                errs.append(f"{w}: passed but rel_error is not within error_bound")
        timed = r.get("time_s") is not None
        _check_time(r.get("time_s"), w, errs, required=False)
        if timed and not _num(r.get("tflops")):
            errs.append(f"{w}.tflops must be a finite non-negative number when timed")
        ks = r.get("kernels")
        if not isinstance(ks, list):
            errs.append(f"{w}.kernels must be a list")
            continue
        if isinstance(r.get("causal"), bool):
            names = [k.get("name") if isinstance(k, dict) else None for k in ks]
            want = expected_kernels(alg, r["causal"])
            if names != want:
                errs.append(f"{w}.kernels names {names} != {want}")
        for j, kr in enumerate(ks):
            if not isinstance(kr, dict):
                errs.append(f"{w}.kernels[{j}] must be an object")
                continue
            for k in KERNEL_KEYS:
                if k not in kr:
                    errs.append(f"{w}.kernels[{j}].{k} missing")
            _check_time(kr.get("time_s"), f"{w}.kernels[{j}]", errs, required=False)
            for k in ("dram_read_bytes", "dram_write_bytes", "ncu_duration_s"):
                if kr.get(k) is not None and not _num(kr.get(k)):
                    errs.append(f"{w}.kernels[{j}].{k} must be null or a non-negative number")
    bl = doc.get("baselines", [])
    if not isinstance(bl, list):
        errs.append("baselines must be a list")
        bl = []
    for i, b in enumerate(bl):
        w = f"baselines[{i}]"
        if not isinstance(b, dict):
            errs.append(f"{w} must be an object")
            continue
        if b.get("name") not in BASELINES:
            errs.append(f"{w}.name must be one of {BASELINES}")
        for k in SHAPE_KEYS + ("time_s", "tflops"):
            if k not in b:
                errs.append(f"{w}.{k} missing")
        _check_time(b.get("time_s"), w, errs, required=False)
    return errs


def assert_valid(doc) -> None:
    errs = validate(doc)
    if errs:
        raise ValueError("invalid iosim-gpu-bench document:\n  " + "\n  ".join(errs[:50]))


def _clean(x):
    """Replace non-finite floats with None so that the JSON is strict."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json_atomic(path, doc) -> None:
    """Write ``doc`` as strict JSON to ``path`` with the package's atomic writer (a regular file,
    mode by the umask). The harness makes the per-GPU data folder it is told to write into."""
    from iosim.results import write_text

    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    write_text(path, json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n")