"""FlashAttention forward for Hopper (``gpu/flash3.cu``, kernel ``flash3_fwd``): wgmma, TMA, warp specialisation.

Host side: the kernel's fixed shape (128 query rows per CTA, one producer and two consumer warpgroups), its
shared-memory size, the TMA tensor maps (``CUtensorMap``, built with the driver's ``cuTensorMapEncodeTiled``
through ctypes and passed by value as a 128-byte ``__grid_constant__`` kernel parameter), NVRTC compilation for
``sm_90a`` and the pipeline object the harness runs (``make_pipeline("flash3", ...)``).

``python -m gpu.flash3 --sass OUT.json`` compiles every variant with nvcc/ptxas here (``-arch=sm_90a``) and
counts its SASS instructions (HGMMA, LDL/STL, ...) when ``cuobjdump`` is found.

The pure functions (tile choices, shared-memory bytes, tensor-map fields) need neither CuPy nor a GPU.
"""
from __future__ import annotations

import math

KERNEL_NAME = "flash3_fwd"
SOURCE = "flash3.cu"
CONSUMER_WARPGROUPS = 2                        # default; block_rows = 64 per consumer warpgroup
BLOCK_ROWS = 64 * CONSUMER_WARPGROUPS          # one wgmma m64 row block per consumer warpgroup
BLOCK_ROWS_ALLOWED = (128, 192)                # 2 or 3 consumer warpgroups
THREADS = 128 * (CONSUMER_WARPGROUPS + 1)      # + the producer warpgroup
HEAD_DIMS = (64, 128)
BLOCK_COLS = (64, 128, 192)
PANEL_COLS = 64                                # 128-byte swizzle: a TMA box row is at most 128 bytes
ALIGN_SLACK_BYTES = 1024                       # the kernel aligns its tiles to 1024 bytes itself
SMEM_LIMIT_BYTES = 227 * 1024
# setmaxnreg budgets per number of consumer warpgroups (producer, consumer): 128*p + 128*n*c <= 65536
REGS = {2: (40, 232), 3: (24, 160)}
PRODUCER_REGS, CONSUMER_REGS = REGS[CONSUMER_WARPGROUPS]
NVRTC_OPTIONS = ("--gpu-architecture=sm_90a", "-std=c++17")
# stages of the K/V ring per (head_dim, block_rows, block_cols) unless asked otherwise; 2 elsewhere. Chosen from
# the smoke timings at B=8, H=16, N=4096 on the H100 (gpu/NOTES.md, flash3 section)
DEFAULT_STAGES = {(64, 192, 128): 3}

# CUtensorMap enums (cuda.h)
CU_TENSOR_MAP_DATA_TYPE_FLOAT16 = 6
CU_TENSOR_MAP_INTERLEAVE_NONE = 0
CU_TENSOR_MAP_SWIZZLE_128B = 3
CU_TENSOR_MAP_L2_PROMOTION_L2_256B = 3
CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0          # out-of-range elements read as zeros
TENSOR_MAP_BYTES = 128


def smem_bytes(head_dim: int, block_cols: int, stages: int, block_rows: int = BLOCK_ROWS) -> int:
    """Dynamic shared memory of one CTA: the Q tile, ``stages`` K and V tiles (fp16) and the alignment slack."""
    return 2 * head_dim * (block_rows + 2 * stages * block_cols) + ALIGN_SLACK_BYTES


def consumer_warpgroups(block_rows: int) -> int:
    return block_rows // 64


def threads(block_rows: int) -> int:
    return 128 * (consumer_warpgroups(block_rows) + 1)


def check_config(head_dim: int, block_rows: int, block_cols: int, stages: int) -> None:
    """Raise ValueError unless the kernel is built for this tiling and it fits the shared memory."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"flash3 supports head_dim in {HEAD_DIMS}, got {head_dim}")
    if block_rows not in BLOCK_ROWS_ALLOWED:
        raise ValueError(f"flash3 runs 64 query rows per consumer warpgroup, 2 or 3 of them: block_rows in "
                         f"{BLOCK_ROWS_ALLOWED}, got {block_rows}")
    if block_cols not in BLOCK_COLS:
        raise ValueError(f"flash3 supports block_cols in {BLOCK_COLS}, got {block_cols}")
    if not (isinstance(stages, int) and stages >= 2):
        raise ValueError(f"flash3 needs at least 2 K/V stages, got {stages!r}")
    if block_cols == 192 and head_dim != 64:
        raise ValueError("flash3 block_cols=192 is built for head_dim 64 only (registers)")
    if block_rows == 192 and block_cols == 192:
        raise ValueError("flash3 with 3 consumer warpgroups needs block_cols <= 128 (block_cols 192 spills)")
    if block_rows == 192 and head_dim == 128 and block_cols > 64:
        raise ValueError("flash3 with 3 consumer warpgroups (160 registers each) at head_dim 128 needs "
                         "block_cols 64 (block_cols 128 spills)")
    need = smem_bytes(head_dim, block_cols, stages, block_rows)
    if need > SMEM_LIMIT_BYTES:
        raise ValueError(f"flash3 d={head_dim} Bc={block_cols} with {stages} stages needs {need} bytes of shared "
                         f"memory, more than the {SMEM_LIMIT_BYTES} a block may opt in to")


def default_stages(head_dim: int, block_cols: int, block_rows: int = BLOCK_ROWS) -> int:
    return DEFAULT_STAGES.get((head_dim, block_rows, block_cols), 2)


def fits(block_rows: int, block_cols: int, head_dim: int, stages: int | None = None) -> bool:
    try:
        check_config(head_dim, block_rows, block_cols,
                     default_stages(head_dim, block_cols, block_rows) if stages is None else stages)
    except ValueError:
        return False
    return True


def tensor_map_fields(batch_heads: int, seq_len: int, head_dim: int, box_rows: int) -> dict:
    """Arguments of ``cuTensorMapEncodeTiled`` for a contiguous fp16 (B*H, N, d) tensor read in boxes of
    ``box_rows`` rows x 64 columns (one 128-byte swizzled panel): 3-D so that rows >= N of one (b, h) are
    out of range (zero-filled) instead of the next head's rows."""
    for name, x in (("batch_heads", batch_heads), ("seq_len", seq_len), ("head_dim", head_dim),
                    ("box_rows", box_rows)):
        if not (isinstance(x, int) and x > 0):
            raise ValueError(f"{name} must be a positive integer, got {x!r}")
    if head_dim % PANEL_COLS:
        raise ValueError(f"head_dim must be a multiple of {PANEL_COLS} (128-byte panels), got {head_dim}")
    if box_rows > 256:
        raise ValueError(f"a TMA box has at most 256 rows, got {box_rows}")
    elem = 2
    row_bytes = head_dim * elem
    return {
        "data_type": CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        "rank": 3,
        "global_dim": (head_dim, seq_len, batch_heads),            # innermost first
        "global_strides_bytes": (row_bytes, seq_len * row_bytes),   # of dims 1.. (dim 0 is contiguous)
        "box_dim": (PANEL_COLS, box_rows, 1),
        "element_strides": (1, 1, 1),
        "interleave": CU_TENSOR_MAP_INTERLEAVE_NONE,
        "swizzle": CU_TENSOR_MAP_SWIZZLE_128B,
        "l2_promotion": CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        "oob_fill": CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        "box_bytes": PANEL_COLS * elem * box_rows,
    }


_libcuda = None


def _driver():
    global _libcuda
    if _libcuda is None:
        import ctypes

        _libcuda = ctypes.CDLL("libcuda.so.1")
        f = _libcuda.cuTensorMapEncodeTiled
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                      ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                      ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                      ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return _libcuda


def encode_tensor_map(address: int, fields: dict):
    """The 128-byte CUtensorMap for a device ``address``, as a one-element NumPy array of dtype ``V128``
    (CuPy passes a size-one ndarray to a kernel by value, copying its bytes into the parameter)."""
    import ctypes
    import numpy as np

    if address % 16:
        raise ValueError(f"TMA needs a 16-byte aligned global address, got {address:#x}")
    rank = fields["rank"]
    buf = (ctypes.c_uint8 * TENSOR_MAP_BYTES)()
    dims = (ctypes.c_uint64 * rank)(*fields["global_dim"])
    strides = (ctypes.c_uint64 * (rank - 1))(*fields["global_strides_bytes"])
    box = (ctypes.c_uint32 * rank)(*fields["box_dim"])
    estr = (ctypes.c_uint32 * rank)(*fields["element_strides"])
    rc = _driver().cuTensorMapEncodeTiled(ctypes.addressof(buf), fields["data_type"], rank, ctypes.c_void_p(address),
                                          dims, strides, box, estr, fields["interleave"], fields["swizzle"],
                                          fields["l2_promotion"], fields["oob_fill"])
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {rc} for {fields}")
    return np.frombuffer(bytes(buf), dtype=np.dtype((np.void, TENSOR_MAP_BYTES))).copy()


def defines(head_dim: int, block_cols: int, stages: int, pv_split: int = 0, pingpong: int = 1,
            block_rows: int = BLOCK_ROWS) -> dict:
    d = {"HEAD_DIM": head_dim, "BC": block_cols, "STAGES": stages}
    if block_rows != BLOCK_ROWS:
        d["NCWG"] = consumer_warpgroups(block_rows)
    if pv_split:
        d["PV_SPLIT"] = 1
    if not pingpong:
        d["PINGPONG"] = 0
    return d


_direct_cache: dict = {}
COMPILE_LOG: dict = {}


def compile_kernel(defs: dict, source: str = SOURCE, kernel_name: str = KERNEL_NAME):
    """The flash3 kernel for ``defs``, compiled by NVRTC for sm_90a: through ``cupy.RawKernel`` with
    ``--gpu-architecture=sm_90a`` (the harness's path), or, if CuPy's own arch flag overrides ours and the
    sm_90a-only instructions fail to compile, by NVRTC directly (cubin loaded with ``cupy.RawModule``).
    ``COMPILE_LOG`` records which path built each variant and the first error."""
    from . import kernels as K

    key = tuple(sorted(defs.items()))
    log_key = str(dict(key)) if (source, kernel_name) == (SOURCE, KERNEL_NAME) else f"{kernel_name} {dict(key)}"
    try:
        k = K._raw_kernel(source, kernel_name, defs, options=NVRTC_OPTIONS)
        COMPILE_LOG[log_key] = {"path": "cupy.RawKernel", "options": list(NVRTC_OPTIONS)}
        return k
    except Exception as e:  # noqa: BLE001
        first = str(e)[:3000]
    if (source, kernel_name, key) in _direct_cache:
        return _direct_cache[(source, kernel_name, key)]
    import os
    import tempfile

    import cupy as cp
    from cupy.cuda import nvrtc

    src = K._source(source, defs)
    prog = nvrtc.createProgram(src, source, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(NVRTC_OPTIONS))
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"NVRTC failed for {kernel_name} {defs}: {nvrtc.getProgramLog(prog)[:3000]}; "
                               f"through cupy.RawKernel: {first}") from e
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    fd, path = tempfile.mkstemp(suffix=".cubin")
    with os.fdopen(fd, "wb") as f:
        f.write(cubin)
    mod = cp.RawModule(path=path)
    k = mod.get_function(kernel_name)
    k._iosim_module = mod
    _direct_cache[(source, kernel_name, key)] = k
    COMPILE_LOG[log_key] = {"path": "nvrtc direct + cupy.RawModule", "options": list(NVRTC_OPTIONS),
                                   "raw_kernel_error": first}
    return k


class Flash3:
    """Pipeline object of the harness: ``run(q, k, v, out, events=None)`` on (B, H, N, d) fp16 CuPy arrays."""

    algorithm = "flash3"

    def __init__(self, shape, causal, block_rows=None, block_cols=None, stages=None, pv_split=0, pingpong=1):
        import cupy as cp

        self.B, self.H, self.N, self.d = (int(x) for x in shape)
        self.causal = bool(causal)
        self.br = BLOCK_ROWS if block_rows is None else int(block_rows)
        self.bc = 128 if block_cols is None else int(block_cols)
        self.stages = default_stages(self.d, self.bc, self.br) if stages is None else int(stages)
        check_config(self.d, self.br, self.bc, self.stages)
        self.pv_split = int(pv_split)
        self.pingpong = int(pingpong)
        self.scale = 1.0 / math.sqrt(self.d)
        self.kernel_names = [KERNEL_NAME]
        self.threads = threads(self.br)
        self.consumer_warpgroups = consumer_warpgroups(self.br)
        self.defines = defines(self.d, self.bc, self.stages, self.pv_split, self.pingpong, self.br)
        self.kern = compile_kernel(self.defines)
        self.smem = smem_bytes(self.d, self.bc, self.stages, self.br)
        self.kern.max_dynamic_shared_size_bytes = self.smem
        self.L = cp.empty((self.B, self.H, self.N), dtype=cp.float32)
        self.grid = ((self.N + self.br - 1) // self.br, self.B * self.H)
        bh = self.B * self.H
        self._fields_q = tensor_map_fields(bh, self.N, self.d, self.br)
        self._fields_kv = tensor_map_fields(bh, self.N, self.d, self.bc)
        self._maps: dict = {}

    def tensor_maps(self, q, k, v):
        key = (q.data.ptr, k.data.ptr, v.data.ptr)
        m = self._maps.get(key)
        if m is None:
            for x in (q, k, v):
                if x.shape != (self.B, self.H, self.N, self.d) or x.dtype.itemsize != 2 or not x.flags.c_contiguous:
                    raise ValueError(f"flash3 needs contiguous fp16 (B,H,N,d) = {(self.B, self.H, self.N, self.d)} "
                                     f"inputs, got {x.shape} {x.dtype}")
            m = (encode_tensor_map(q.data.ptr, self._fields_q), encode_tensor_map(k.data.ptr, self._fields_kv),
                 encode_tensor_map(v.data.ptr, self._fields_kv))
            if len(self._maps) > 16:
                self._maps.clear()
            self._maps[key] = m
        return m

    def run(self, q, k, v, out, events=None):
        import numpy as np

        tq, tk, tv = self.tensor_maps(q, k, v)
        if events is not None:
            events[0].record()
        self.kern(self.grid, (self.threads,), (tq, tk, tv, out, self.L, np.int32(self.N), np.float32(self.scale),
                                               np.int32(self.causal)), shared_mem=self.smem)
        if events is not None:
            events[1].record()

    def resources(self) -> dict:
        """What the kernel is built with, for its bench record."""
        try:
            attrs = self.kern.attributes
        except Exception:  # noqa: BLE001
            attrs = {}
        return {"block_rows": self.br, "block_cols": self.bc, "stages": self.stages,
                "consumer_warpgroups": self.consumer_warpgroups, "threads": self.threads,
                "smem_bytes": self.smem, "registers": attrs.get("num_regs"),
                "local_bytes": attrs.get("local_size_bytes"), "pv_split": bool(self.pv_split), "pingpong": bool(self.pingpong),
                "producer_regs": REGS[self.consumer_warpgroups][0],
                "consumer_regs": REGS[self.consumer_warpgroups][1],
                "warp_rows": 16, "q_in_registers": False,
                "compile": COMPILE_LOG.get(str(dict(sorted(self.defines.items()))))}

    def free(self):
        self.L = None
        self._maps = {}


# ------------------------------------------------------------------------------------------------ SASS (host)
def variants() -> list[dict]:
    out = []
    for d in HEAD_DIMS:
        for br in BLOCK_ROWS_ALLOWED:
            for bc in BLOCK_COLS:
                for st in (2, 3):
                    if fits(br, bc, d, st):
                        out.append(defines(d, bc, st, block_rows=br))
    return out


def sass_report(out_path: str) -> dict:
    """Compile every variant with nvcc -cubin -arch=sm_90a (ptxas -v) and count SASS ops with cuobjdump."""
    import os
    import re
    import shutil
    import subprocess
    import tempfile

    from . import kernels as K
    from . import sass as SA
    from . import schema as S

    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    cuobjdump = shutil.which("cuobjdump") or os.environ.get("CUOBJDUMP")
    entries = []
    ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:]
    for defs in variants():
        src = K._source(SOURCE, defs)
        with tempfile.TemporaryDirectory() as td:
            cu, cubin = os.path.join(td, "k.cu"), os.path.join(td, "k.cubin")
            open(cu, "w").write(src)
            p = subprocess.run([nvcc, "-arch=sm_90a", "-cubin", "-Xptxas", "-v", "-o", cubin, cu],
                               capture_output=True, text=True)
            log = p.stdout + p.stderr
            e = {"variant": defs, "returncode": p.returncode,
                 "method": "nvcc -arch=sm_90a -cubin (same ptxas as NVRTC's sm_90a target) on the source NVRTC compiles",
                 "ptxas": [ln.strip() for ln in log.splitlines() if "ptxas info" in ln and (
                     "Used" in ln or "spill" in ln or "C7519" in ln or "C7515" in ln or "C7510" in ln)]}
            m = re.search(r"Used (\d+) registers", log)
            e["registers"] = int(m.group(1)) if m else None
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            e["spill_store_bytes"], e["spill_load_bytes"] = (int(m.group(1)), int(m.group(2))) if m else (None, None)
            if cuobjdump and p.returncode == 0:
                sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
                e["sass_counts"] = SA.count_ops(sass)
                e["sass_extra"] = {op: len(re.findall(r"\b" + re.escape(op) + r"\b", sass)) for op in
                                   ("UTMALDG", "USETMAXREG", "WARPGROUP.ARRIVE", "WARPGROUP.DEPBAR", "SYNCS")}
                e["hgmma_forms"] = sorted(set(re.findall(r"HGMMA\.[0-9x]+\.F32", sass)))
                e["hgmma_tnspB"] = len(re.findall(r"HGMMA[^\n]*tnspB", sass))
                # intra-warpgroup overlap: exponentials issued between wait_group 1 (S_j done) and wait_group 0
                # (PV_{j-1} done) of the main loop run while the PV wgmma is in flight
                m = re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1(.*?)WARPGROUP\.DEPBAR\.LE gsb0, 0x0", sass, re.S)
                e["mufu_ex2_between_wait1_and_wait0"] = len(re.findall(r"MUFU\.EX2", m.group(1))) if m else 0
            entries.append(e)
            print(defs, e.get("registers"), e.get("spill_store_bytes"), e.get("sass_counts", {}).get("HGMMA"),
                  flush=True)
    doc = {"schema": "iosim-gpu-sass/1", "kernel": KERNEL_NAME, "nvcc": ver, "cuobjdump": bool(cuobjdump),
           "entries": entries}
    S.write_json_atomic(out_path, doc)
    return doc


# ------------------------------------------------------------------------------------------ device smoke check
def _lse_reference(q, k, causal, xp):
    """float64 log-sum-exp of each row of scale * q k^T (causal: columns <= row), (B, H, N)."""
    B, H, N, d = q.shape
    out = xp.empty((B, H, N), dtype=xp.float64)
    for b in range(B):
        for h in range(H):
            s = (q[b, h].astype(xp.float64) @ k[b, h].astype(xp.float64).T) / math.sqrt(d)
            if causal:
                s = xp.where(xp.tril(xp.ones((N, N), dtype=bool)), s, -xp.inf)
            mx = s.max(axis=1, keepdims=True)
            out[b, h] = (mx + xp.log(xp.exp(s - mx).sum(axis=1, keepdims=True)))[:, 0]
    return out


def smoke(outdir: str, timing: bool = True, configs: list | None = None) -> int:
    """First device check: tensor-map encoding and by-value passing, every variant on small odd shapes against the
    float64 reference (output and L), then a quick CUDA-event timing at the target shape beside torch SDPA.
    Writes ``outdir/flash3_smoke.json`` (and the NVRTC log of any failed compile) as it goes."""
    import json
    import os
    import time

    import cupy as cp

    from . import reference as R
    from . import schema as S

    os.makedirs(outdir, exist_ok=True)
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "checks": [], "timings": []}
    try:
        from .bench import device_info
        doc["device"] = device_info()
    except Exception as e:  # noqa: BLE001
        doc["device_error"] = repr(e)
    try:
        import cuda.bindings.driver  # noqa: F401
        doc["cuda_python"] = True
    except Exception as e:  # noqa: BLE001
        doc["cuda_python"] = repr(e)[:200]
    path = os.path.join(outdir, "flash3_smoke.json")

    def save():
        S.write_json_atomic(path, doc)

    def log(msg):
        print(msg, flush=True)

    ok_all = True
    if configs is None:
        configs = [dict(head_dim=d, block_rows=BLOCK_ROWS, block_cols=bc, stages=st, pingpong=pp)
                   for d in HEAD_DIMS for bc in (64, 128) for st, pp in ((2, 1), (2, 0), (3, 1))]
    doc["configs"] = configs
    for cfg in configs:
        d, br, bc = cfg["head_dim"], cfg["block_rows"], cfg["block_cols"]
        var = {k: cfg[k] for k in ("stages", "pingpong") if k in cfg}
        for (B, H, N) in ((1, 2, 200), (2, 3, 256), (1, 2, 1000)):
            broken = False
            for causal in (False, True):
                rec = dict(head_dim=d, block_rows=br, block_cols=bc, batch=B, heads=H, seq_len=N, causal=causal, **var)
                try:
                    rs = cp.random.RandomState(N * 31 + d + bc)
                    q, k, v = (rs.standard_normal((B, H, N, d), dtype=cp.float32).astype(cp.float16) for _ in range(3))
                    ref = R.attention_reference(q, k, v, causal, xp=cp)
                    e16 = R.rel_error(R.attention_fp16_plain(q, k, v, causal, xp=cp), ref, xp=cp)
                    pipe = Flash3((B, H, N, d), causal, br, bc, **var)
                    out = cp.full((B, H, N, d), float("nan"), dtype=cp.float16)
                    pipe.L.fill(float("nan"))
                    pipe.run(q, k, v, out)
                    cp.cuda.runtime.deviceSynchronize()
                    chk = R.check_error(R.rel_error(out, ref, xp=cp), e16)
                    lse = _lse_reference(q, k, causal, cp)
                    lerr = float(cp.abs(pipe.L.astype(cp.float64) - lse).max())
                    rec.update(chk, lse_max_abs_error=lerr if math.isfinite(lerr) else None, resources=pipe.resources())
                    rec["passed"] = bool(chk["passed"] and math.isfinite(lerr) and lerr < 1e-2)
                    pipe.free()
                except Exception as e:  # noqa: BLE001
                    rec.update(passed=False, error=repr(e)[:4000])
                    with open(os.path.join(outdir, "flash3_errors.log"), "a") as f:
                        f.write(f"{rec}\n{e}\n\n")
                    broken = True
                ok_all &= rec["passed"]
                doc["checks"].append(rec)
                log(f"check {rec.get('passed')} d={d} br={br} bc={bc} {var} N={N} causal={causal} "
                    f"err={rec.get('rel_error')} bound={rec.get('error_bound')} lse={rec.get('lse_max_abs_error')}"
                    f" {rec.get('error', '')[:300]}")
                save()
                if broken:
                    break
            if broken:  # a compile or launch error: the other shapes of this variant would repeat it
                break
    if not timing:
        return 0 if ok_all else 1
    # quick timing at the target shape (CUDA events, median of 10 after 3 warm-ups; one input set)
    import torch

    from .schema import attention_flops

    def med(fn, reps=10):
        for _ in range(3):
            fn()
        ev = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(reps)]
        for a, b in ev:
            a.record(); fn(); b.record()
        ev[-1][1].synchronize()
        ts = sorted(cp.cuda.get_elapsed_time(a, b) * 1e-3 for a, b in ev)
        return ts[len(ts) // 2]

    B, H, N = 8, 16, 4096
    for d in HEAD_DIMS:
        rs = cp.random.RandomState(d)
        q, k, v = (rs.standard_normal((B, H, N, d), dtype=cp.float32).astype(cp.float16) for _ in range(3))
        out = cp.empty_like(q)
        tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
        for causal in (False, True):
            fl = attention_flops(B, H, N, d, causal)
            t = med(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal))
            doc["timings"].append(dict(name="torch_sdpa", head_dim=d, causal=causal, time_s=t, tflops=fl / t / 1e12))
            log(f"sdpa d={d} causal={causal} {t*1e3:.3f} ms {fl/t/1e12:.1f} TFLOP/s")
            for cfg in configs:
                if cfg["head_dim"] != d:
                    continue
                br, bc, st, pp = cfg["block_rows"], cfg["block_cols"], cfg.get("stages", 2), cfg.get("pingpong", 1)
                try:
                    pipe = Flash3((B, H, N, d), causal, br, bc, stages=st, pingpong=pp)
                    t = med(lambda: pipe.run(q, k, v, out))
                    doc["timings"].append(dict(name="flash3", head_dim=d, causal=causal, block_rows=br,
                                               block_cols=bc, stages=st, pingpong=pp, time_s=t,
                                               tflops=fl / t / 1e12, resources=pipe.resources()))
                    log(f"flash3 d={d} br={br} bc={bc} st={st} pp={pp} causal={causal} {t*1e3:.3f} ms "
                        f"{fl/t/1e12:.1f} TFLOP/s")
                    pipe.free()
                except Exception as e:  # noqa: BLE001
                    log(f"flash3 timing d={d} bc={bc} st={st} failed {e!r}"[:500])
                save()
        del q, k, v, out, tq, tk, tv
        cp.get_default_memory_pool().free_all_blocks()
    save()
    return 0 if ok_all else 1


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m gpu.flash3", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sass", metavar="OUT", help="compile every variant here and count its SASS")
    ap.add_argument("--smoke", metavar="DIR", help="device check: correctness on small shapes + quick timing")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--configs", default=None, help="JSON list of {head_dim, block_rows, block_cols, stages, "
                    "pingpong} for --smoke (default: every 128-row variant)")
    args = ap.parse_args(argv)
    if args.sass:
        sass_report(args.sass)
    if args.smoke:
        import json

        return smoke(args.smoke, timing=not args.no_timing,
                     configs=json.loads(args.configs) if args.configs else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
