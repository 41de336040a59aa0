"""Order of the global loads in a flash kernel's loops, read from the SASS control bits.

Compiles a kernel exactly as ``kernels._source`` builds it, with NVRTC (ctypes; CuPy adds ``-ftz=true`` to
``kernels.NVRTC_OPTIONS``, so this does too), prints ptxas's register/spill line, disassembles the cubin with
``nvdisasm -hex`` and, for every loop (backward branch), counts LDG/STG/LDL/STL and lists the points where an
instruction waits on the scoreboard of outstanding LDGs (control bits of sm_90: write barrier = bits 46-48 of
the high word, wait mask = bits 52-57). Needs no GPU, only the NVIDIA wheels (not project dependencies):
  python3 -m venv /tmp/sv && /tmp/sv/bin/pip install nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-nvdisasm
  /tmp/sv/bin/python -m gpu.sass_order flash1.cu flash1_fwd HEAD_DIM=128 BR=128 BC=128
(NVRTC 13.0 is the release the H100 runs used.)
"""
from __future__ import annotations

import ctypes
import glob
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

from .kernels import NVRTC_OPTIONS, _source


def _nvidia_file(pattern: str) -> str:
    for base in sys.path:
        hits = sorted(glob.glob(os.path.join(base, "nvidia", "cu1*", pattern)))
        if hits:
            return hits[-1]
    raise FileNotFoundError(pattern)


def compile_cubin(fname: str, defines: dict) -> tuple[bytes, str]:
    ctypes.CDLL(_nvidia_file("lib/libnvrtc-builtins.so.*"), mode=ctypes.RTLD_GLOBAL)  # NVRTC dlopens it by name
    lib = ctypes.CDLL(_nvidia_file("lib/libnvrtc.so.*"))
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), _source(fname, defines).encode(), fname.encode(), 0,
                                  None, None) == 0
    opts = [o.encode() for o in (*NVRTC_OPTIONS, "-ftz=true", "--ptxas-options=-v")]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc:
        raise RuntimeError(log.value.decode())
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, buf)
    return buf.raw, log.value.decode()


def disassemble(cubin: bytes) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_nvidia_file("bin/nvdisasm"), "-hex", "-c", f.name], check=True,
                              capture_output=True, text=True).stdout
    lines, out, labels = text.splitlines(), [], {}
    for k, ln in enumerate(lines):
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\* 0x[0-9a-f]{16} \*/", ln)
        if m:
            hi = int(re.search(r"0x([0-9a-f]{16})", lines[k + 1]).group(1), 16) >> 41
            txt = m.group(2)
            op = txt.split()[1] if txt.startswith("@") else txt.split()[0]
            out.append(dict(addr=int(m.group(1), 16), text=txt, op=op, wb=(hi >> 5) & 7, wait=(hi >> 11) & 63))
        elif re.match(r"^\.L_x_\d+:", ln):
            labels[ln.split(":")[0]] = len(out)
    for k, ins in enumerate(out):   # backward branch = loop
        m = re.search(r"\(\s*(\.L_x_\d+)\)", ins["text"])
        if m and ins["op"] == "BRA" and labels.get(m.group(1), len(out)) <= k:
            ins["target"] = out[labels[m.group(1)]]["addr"]
    return out


def loop_report(ins: list[dict], lo: int, hi: int) -> list[str]:
    body = [x for x in ins if lo <= x["addr"] <= hi]
    c = Counter(x["op"] for x in body)
    keys = [k for k in sorted(c) if k.split(".")[0] in ("LDG", "STG", "LDL", "STL", "HMMA", "LDGSTS")]
    rep = [f"loop {lo:#06x}-{hi:#06x}: {len(body)} instructions; " + ", ".join(f"{k} {c[k]}" for k in keys)]
    pending: dict[int, list] = {}   # scoreboard -> (LDG, STGs issued before it) not yet waited on
    n_stg, events, trips, last_wait = 0, [], 0, -1
    for x in body:
        hit = [sb for sb in pending if x["wait"] >> sb & 1 and pending[sb]]
        if hit:
            loads = sorted((l for sb in hit for l in pending[sb]), key=lambda t: t[0]["addr"])
            trips += loads[0][0]["addr"] > last_wait   # issued after the previous wait: a new round trip
            last_wait = x["addr"]
            events.append("W")
            rep.append(f"  wait at {x['addr']:#06x} {x['text'][:44]:44s} <- {len(loads)} "
                       f"{'/'.join(sorted({l['op'] for l, _ in loads}))} issued {loads[0][0]['addr']:#06x}-"
                       f"{loads[-1][0]['addr']:#06x}; {n_stg - loads[0][1]} STG since the first of them")
            for sb in hit:
                pending[sb] = []
        if re.match(r"LDG\.E", x["op"]) and x["wb"] < 6:
            pending.setdefault(x["wb"], []).append((x, n_stg))
            events.append("L")
        if x["op"].startswith("STG"):
            n_stg += 1
            events.append("S")
    runs = re.findall(r"((.)\2*)", "".join(events))
    rep.append(f"  {trips} dependent global-load round trips; order (L=LDG, W=wait on LDG, S=STG, linear "
               f"order incl. both sides of branches): " + " ".join(f"{len(r)}{r[0]}" for r, _ in runs))
    return rep


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fname, kname = argv[0], argv[1]   # fname: relative to gpu/, or an absolute path (a variant)
    defines = dict(a.split("=", 1) for a in argv[2:])
    cubin, log = compile_cubin(fname, defines)
    print(f"{fname} {kname} {defines}")
    print("\n".join(ln.strip() for ln in log.splitlines() if "registers" in ln or "spill" in ln))
    ins = disassemble(cubin)
    for x in ins:
        if "target" in x and x["target"] < x["addr"]:
            print("\n".join(loop_report(ins, x["target"], x["addr"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
