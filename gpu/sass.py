"""SASS evidence for the run-time compiled kernels: ``python -m gpu.sass --out FILE``.

Reads the cubins CuPy cached (CUPY_CACHE_DIR; compile with CUPY_CACHE_SAVE_CUDA_SOURCE=1 so the variant header
of each source can be read back), disassembles them with ``cuobjdump -sass`` and counts the instructions that
matter: HMMA (tensor-core mma.sync), LDSM (ldmatrix), LDGSTS (cp.async), MUFU.EX2, LDG/STG widths, BAR,
and local-memory traffic (LDL/STL).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import tempfile

from . import schema as S

OPS = ["HMMA", "LDSM", "LDGSTS", "MUFU.EX2", "LDG.E.128", "LDG.E", "STG.E.128", "STG.E", "STS", "LDS", "BAR",
       "LDL", "STL", "SHFL", "FFMA", "HGMMA"]


def count_ops(sass: str) -> dict:
    counts = {op: 0 for op in OPS}
    for ln in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", ln)
        if not m:
            continue
        ins = m.group(2)
        for op in OPS:
            if ins == op or ins.startswith(op + "."):
                counts[op] += 1
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpu.sass")
    ap.add_argument("--cache-dir", default=os.environ.get("CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache")))
    ap.add_argument("--out", required=True)
    ap.add_argument("--dump-dir", default=None, help="also write each kernel's full SASS here")
    args = ap.parse_args(argv)
    tool = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    entries = []
    for path in sorted(glob.glob(os.path.join(args.cache_dir, "*.cubin"))):
        data = open(path, "rb").read()
        off = data.find(b"\x7fELF")
        if off < 0:
            continue
        variant = None
        if os.path.exists(path + ".cu"):
            first = open(path + ".cu").readline().strip()
            variant = first.replace("// iosim variant: ", "") if first.startswith("// iosim variant") else first[:120]
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as tf:
            tf.write(data[off:])
            tmp = tf.name
        how = "cuobjdump of the cubin in CuPy's cache"
        try:
            p = subprocess.run([tool, "-sass", tmp], capture_output=True, text=True, timeout=120)
            sass, err = p.stdout, p.stderr
            res = subprocess.run([tool, "-res-usage", tmp], capture_output=True, text=True, timeout=120).stdout
        finally:
            os.unlink(tmp)
        if "Function" not in sass and os.path.exists(path + ".cu"):
            # fall back: the very source NVRTC compiled, through nvcc/ptxas of the same CUDA release
            nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
            with tempfile.TemporaryDirectory() as td:
                cu = os.path.join(td, "k.cu")
                shutil.copy(path + ".cu", cu)
                cb = os.path.join(td, "k.cubin")
                q = subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-std=c++17", "-ftz=true", "-Xptxas", "-v",
                                    "-o", cb, cu], capture_output=True, text=True, timeout=300)
                ptxas = [ln.strip() for ln in q.stderr.splitlines() if "registers" in ln or "spill" in ln]
                if os.path.exists(cb):
                    sass = subprocess.run([tool, "-sass", cb], capture_output=True, text=True, timeout=120).stdout
                    res = "\n".join(ptxas)
                    how = "nvcc -cubin -arch=sm_90 of the source NVRTC compiled (cache cubin unreadable: %s)" % err[:200]
        funcs = re.findall(r"Function : (\S+)", sass)
        arch = re.findall(r"arch = (sm_\d+a?)", sass)
        entries.append({"cubin": os.path.basename(path), "variant": variant, "functions": funcs,
                        "arch": sorted(set(arch)), "counts": count_ops(sass), "method": how,
                        "resource_usage": [ln.strip() for ln in res.splitlines()
                                           if "REG" in ln or "Function" in ln or "registers" in ln or "spill" in ln]})
        if args.dump_dir and variant and ("flash" in variant or "softmax" in variant):
            os.makedirs(args.dump_dir, exist_ok=True)
            tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", variant)[:80]
            open(os.path.join(args.dump_dir, tag + ".sass"), "w").write(sass)
    S.write_json_atomic(args.out, {"schema": "iosim-gpu-sass/1", "tool": tool, "kernels": entries})
    for e in entries:
        c = e["counts"]
        print(f"{(e['variant'] or e['cubin'])[:70]:70s} {e['arch']} HMMA={c['HMMA']} LDSM={c['LDSM']} "
              f"LDGSTS={c['LDGSTS']} EX2={c['MUFU.EX2']} LDL={c['LDL']} STL={c['STL']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
