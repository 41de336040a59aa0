"""Nsight Compute CSV parsing and attribution of profiled kernels to pipeline runs (pure Python).

The profiled process launches, before each measured run, the empty kernel ``iosim_marker`` with
``tag + 1`` blocks; every kernel that ncu lists after a marker of tag t (t >= 1) belongs to segment t,
until the next marker. Tag 0 marks warm-up launches (ignored). Within a segment, our own kernels match by
exact name; library (cuBLAS, PyTorch) kernels between them are summed into the expected library label
(qk_gemm before our first kernel, pv_gemm after our last).
"""
from __future__ import annotations

import csv
import io
import re

METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "gpu__time_duration.sum")
OWN_KERNELS = {"softmax", "scale_mask_softmax", "scale", "mask", "flash1_fwd", "flash2_fwd", "flash3_fwd"}
MARKER = "iosim_marker"
LIBRARY_LABELS = {"qk_gemm", "pv_gemm", "torch_sdpa", "torch_plain"}

_UNIT = {
    "byte": 1.0, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,
    "kibyte": 1024.0, "mibyte": 1024.0 ** 2, "gibyte": 1024.0 ** 3,
    "nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0, "ns": 1e-9, "us": 1e-6, "ms": 1e-3,
    "s": 1.0, "": 1.0,
}


def _value(text: str, unit: str) -> float:
    t = text.strip().replace(",", "")
    if t in ("", "n/a", "N/A"):
        return float("nan")
    return float(t) * _UNIT.get(unit.strip().lower(), 1.0)


def base_name(kernel_name: str) -> str:
    """'void foo<1, 2>(int, float*)' -> 'foo'; 'softmax' -> 'softmax'."""
    s = kernel_name.strip()
    s = re.sub(r"^(void|__global__)\s+", "", s)
    s = s.split("(")[0]
    s = s.split("<")[0]
    s = s.split("::")[-1]
    return s.strip()


def parse_metrics_csv(text: str) -> list[dict]:
    """ncu ``--csv`` details rows (one row per kernel and metric) as kernels in launch order:
    {id, name, base, grid, block, metrics: {metric name: value in base units (seconds for times)}}.
    Lines before the CSV header (==PROF== messages, program output) are skipped."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"') and "Metric Name" in ln), None)
    if start is None:
        return []
    reader = csv.DictReader(io.StringIO("\n".join(ln for ln in lines[start:] if ln.startswith('"'))))
    kernels: dict[int, dict] = {}
    for row in reader:
        try:
            kid = int(row["ID"])
        except (KeyError, ValueError, TypeError):
            continue
        name = row.get("Kernel Name", "") or ""
        k = kernels.setdefault(kid, {"id": kid, "name": name, "base": base_name(name),
                                     "grid": row.get("Grid Size", ""), "block": row.get("Block Size", ""),
                                     "metrics": {}})
        metric = (row.get("Metric Name") or "").strip()
        if metric:
            try:
                k["metrics"][metric] = _value(row.get("Metric Value", ""), row.get("Metric Unit", ""))
            except ValueError:
                k["metrics"][metric] = None
    return [kernels[i] for i in sorted(kernels)]


def parse_csv(text: str) -> list[dict]:
    """The harness's three metrics per kernel, in launch order: {id, name, base, grid, block,
    dram_read_bytes, dram_write_bytes, duration_s} (see :func:`parse_metrics_csv`)."""
    out = []
    for k in parse_metrics_csv(text):
        m = k.pop("metrics")
        k.update(dram_read_bytes=m.get("dram__bytes_read.sum"),
                 dram_write_bytes=m.get("dram__bytes_write.sum"),
                 duration_s=m.get("gpu__time_duration.sum"))
        out.append(k)
    return out


def grid_x(grid: str) -> int | None:
    m = re.match(r"\s*\(?\s*(\d+)", grid or "")
    return int(m.group(1)) if m else None


def segments(kernels: list[dict]) -> dict[int, list[dict]]:
    """Split the kernel list at marker kernels: {tag: [kernels after that marker]} (tag 0 dropped)."""
    segs: dict[int, list[dict]] = {}
    cur = None
    for k in kernels:
        if k["base"] == MARKER:
            gx = grid_x(k["grid"])
            cur = (gx - 1) if gx else None
            if cur is not None and cur >= 1:
                segs[cur] = []
            continue
        if cur is not None and cur >= 1:
            segs[cur].append(k)
    return segs


def attribute(seg_kernels: list[dict], expected: list[str]) -> dict[str, dict]:
    """Map the kernels of one segment onto the expected labels (see module doc). Returns
    {label: {dram_read_bytes, dram_write_bytes, ncu_duration_s, launches}}; raises ValueError on mismatch."""
    out = {lab: {"dram_read_bytes": 0.0, "dram_write_bytes": 0.0, "ncu_duration_s": 0.0, "launches": 0}
           for lab in expected}
    pos = 0
    for k in seg_kernels:
        own = k["base"] in OWN_KERNELS
        if own:
            # advance to the next expected own-kernel label with this name
            while pos < len(expected) and expected[pos] != k["base"]:
                if expected[pos] not in LIBRARY_LABELS and out[expected[pos]]["launches"] == 0:
                    raise ValueError(f"kernel {k['base']} found where {expected[pos]} was expected")
                pos += 1
            if pos >= len(expected):
                raise ValueError(f"unexpected kernel {k['base']} (expected {expected})")
            lab = expected[pos]
        else:
            while pos < len(expected) and expected[pos] not in LIBRARY_LABELS:
                if out[expected[pos]]["launches"] == 0:
                    raise ValueError(f"library kernel {k['name']!r} found where {expected[pos]} was expected")
                pos += 1
            if pos >= len(expected):
                raise ValueError(f"unexpected library kernel {k['name']!r} (expected {expected})")
            lab = expected[pos]
        rec = out[lab]
        for src, dst in (("dram_read_bytes", "dram_read_bytes"), ("dram_write_bytes", "dram_write_bytes"),
                         ("duration_s", "ncu_duration_s")):
            v = k.get(src)
            if v is not None:
                rec[dst] += v
        rec["launches"] += 1
    missing = [lab for lab in expected if out[lab]["launches"] == 0]
    if missing:
        raise ValueError(f"no kernel found for {missing}")
    return out
