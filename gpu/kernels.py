"""Run-time compiled attention kernels (CuPy RawKernel / NVRTC) and the cuBLAS GEMMs of the unfused pipelines.

CuPy is imported lazily inside the functions so that ``import gpu`` works on a machine without it.
Every pipeline object has ``run(q, k, v, out, events=None)``: q, k, v are CuPy float16 arrays (B, H, N, d)
contiguous, out is (B, H, N, d) float16. When ``events`` is a list of CuPy events of length
``len(kernel_names) + 1`` the pipeline records them between its kernels (per-kernel timing).
"""
from __future__ import annotations

import math
from pathlib import Path

GPU_DIR = Path(__file__).resolve().parent
SMEM_LIMIT_BYTES = 227 * 1024  # H100 opt-in dynamic shared memory per block

KERNEL_NAMES = {
    "standard": ["qk_gemm", "softmax", "pv_gemm"],
    "megatron": ["qk_gemm", "scale_mask_softmax", "pv_gemm"],
    "hf": ["qk_gemm", "scale", "mask", "softmax", "pv_gemm"],  # "mask" only when causal
    "flash1": ["flash1_fwd"],
    "flash2": ["flash2_fwd"],
    "flash3": ["flash3_fwd"],   # gpu/flash3.cu (Hopper: wgmma, TMA, warp specialisation; see gpu/flash3.py)
}


def kernel_names(algorithm: str, causal: bool) -> list[str]:
    names = list(KERNEL_NAMES[algorithm])
    if algorithm == "hf" and not causal:
        names.remove("mask")
    return names


def flash_smem_bytes(algorithm: str, block_rows: int, block_cols: int, head_dim: int) -> int:
    """Dynamic shared memory of one CTA of the flash kernels (fp16 tiles)."""
    if algorithm == "flash2":
        return 2 * head_dim * (block_rows + 4 * block_cols)       # Q + 2x(K,V)
    if algorithm == "flash1":
        return 2 * head_dim * (2 * block_cols + 2 * block_rows)   # K, V + per-warp double-buffered Q
    if algorithm == "flash3":
        from . import flash3 as F3
        return F3.smem_bytes(head_dim, block_cols, F3.default_stages(head_dim, block_cols, block_rows), block_rows)
    raise ValueError(algorithm)


def flash_fits(algorithm: str, block_rows: int, block_cols: int, head_dim: int,
               limit: int = SMEM_LIMIT_BYTES) -> bool:
    if algorithm == "flash3":
        from . import flash3 as F3
        return F3.fits(block_rows, block_cols, head_dim)
    return (block_rows % 16 == 0 and block_cols % 16 == 0 and block_rows // 16 <= 16
            and flash_smem_bytes(algorithm, block_rows, block_cols, head_dim) <= limit)


def _source(fname: str, defines: dict | None = None) -> str:
    body = (GPU_DIR / fname).read_text()
    for header in ("common.cuh", "hopper.cuh"):   # inlined: NVRTC gets one self-contained source
        inc = f'#include "{header}"'
        if inc in body:
            body = body.replace(inc, (GPU_DIR / header).read_text().replace("#pragma once", ""))
    items = sorted((defines or {}).items())
    head = "".join(f"#define {k} {v}\n" for k, v in items)
    return f"// iosim variant: {fname} {dict(items)}\n" + head + body


NVRTC_OPTIONS = ("--gpu-architecture=sm_90", "-std=c++17")
_compile_log: dict = {"options": None, "fallback": False}
_kernel_cache: dict = {}


def _raw_kernel(fname: str, kname: str, defines: dict | None = None, options: tuple | None = None):
    import cupy as cp

    key = (fname, kname, tuple(sorted((defines or {}).items())), options)
    if key in _kernel_cache:
        return _kernel_cache[key]
    src = _source(fname, defines)
    opts = NVRTC_OPTIONS if options is None else tuple(options)
    k = cp.RawKernel(src, kname, options=opts)
    try:
        k.compile()
    except Exception as e:  # e.g. a duplicate-arch complaint: let CuPy pick the (sm_90) target itself
        opts = ("-std=c++17",)
        k = cp.RawKernel(src, kname, options=opts)
        try:
            k.compile()
        except Exception:
            raise e
        _compile_log["fallback"] = True
        _compile_log["first_error"] = str(e)[:500]
    _compile_log["options"] = list(opts)
    _kernel_cache[key] = k
    return k


def compile_log() -> dict:
    return dict(_compile_log)


# ----------------------------------------------------------------------------------------------------------
# cuBLAS strided-batched fp16 GEMM (fp32 compute, tensor-op algorithm)
CUDA_R_16F = 2
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99
OP_N, OP_T = 0, 1


def gemm_strided_batched(transa, transb, m, n, k, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, batch):
    """Column-major C = alpha op(A) op(B) + beta C for ``batch`` matrices (CuPy float16 arrays)."""
    import numpy as np
    import cupy as cp
    from cupy_backends.cuda.libs import cublas

    handle = cp.cuda.device.get_cublas_handle()
    a = np.array(alpha, dtype=np.float32)
    b = np.array(beta, dtype=np.float32)
    cublas.gemmStridedBatchedEx(handle, transa, transb, m, n, k, a.ctypes.data,
                                A.data.ptr, CUDA_R_16F, lda, sA, B.data.ptr, CUDA_R_16F, ldb, sB,
                                b.ctypes.data, C.data.ptr, CUDA_R_16F, ldc, sC, batch,
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP)


def qk_gemm(q, k, s, alpha):
    """S[b,h] = alpha * Q[b,h] K[b,h]^T; q, k (B,H,N,d), s (B,H,N,N) float16."""
    B, H, N, d = q.shape
    # row-major S = Q K^T  <=>  column-major S^T = K Q^T
    gemm_strided_batched(OP_T, OP_N, N, N, d, alpha, k, d, N * d, q, d, N * d, 0.0, s, N, N * N, B * H)


def pv_gemm(p, v, o):
    """O[b,h] = P[b,h] V[b,h]; p (B,H,N,N), v/o (B,H,N,d)."""
    B, H, N, d = v.shape
    # row-major O = P V  <=>  column-major O^T = V^T P^T
    gemm_strided_batched(OP_N, OP_N, d, N, N, 1.0, v, d, N * d, p, N, N * N, 0.0, o, d, N * d, B * H)


def softmax_launch_shape(N: int) -> tuple[int, int]:
    """(threads per row, 16-byte vectors per thread) for a row of N fp16 values."""
    nvec = max(1, (N + 7) // 8)
    tpr = 32
    while tpr * 4 < nvec and tpr < 512:
        tpr *= 2
    vpt = 1
    while tpr * vpt < nvec:
        vpt *= 2
    if vpt > 8:
        raise ValueError(f"row of {N} too long for the softmax kernels (max 32768)")
    return tpr, vpt


def _rec(events, i):
    if events is not None:
        events[i].record()


class _Unfused:
    def __init__(self, algorithm, shape, causal):
        import cupy as cp

        self.algorithm = algorithm
        self.B, self.H, self.N, self.d = shape
        self.causal = bool(causal)
        self.scale = 1.0 / math.sqrt(self.d)
        self.kernel_names = kernel_names(algorithm, causal)
        B, H, N = self.B, self.H, self.N
        self.S = cp.empty((B, H, N, N), dtype=cp.float16)
        self.P = cp.empty((B, H, N, N), dtype=cp.float16)
        if algorithm == "hf":
            self.S1 = cp.empty((B, H, N, N), dtype=cp.float16)
            self.S2 = cp.empty((B, H, N, N), dtype=cp.float16) if causal else None
        self.tpr, self.vpt = softmax_launch_shape(N)
        self.cta = max(256, self.tpr)
        self.rows = B * H * N
        self.grid_rows = (self.rows + self.cta // self.tpr - 1) // (self.cta // self.tpr)
        self.k_softmax = _raw_kernel("softmax.cu", "softmax")
        self.k_sms = _raw_kernel("softmax.cu", "scale_mask_softmax")
        self.k_scale = _raw_kernel("softmax.cu", "scale")
        self.k_mask = _raw_kernel("softmax.cu", "mask")
        n = B * H * N * N
        self.n_elem = n
        self.ew_grid = min(132 * 32, max(1, (n // 8 + 255) // 256))

    def run(self, q, k, v, out, events=None):
        import numpy as np

        N = self.N
        e = 0
        _rec(events, e)
        if self.algorithm == "standard":
            qk_gemm(q, k, self.S, self.scale); e += 1; _rec(events, e)
            self.k_softmax((self.grid_rows,), (self.cta,),
                           (self.S, self.P, np.int64(self.rows), np.int32(N), np.int32(self.tpr),
                            np.int32(self.vpt), np.int32(self.causal)))
            e += 1; _rec(events, e)
        elif self.algorithm == "megatron":
            qk_gemm(q, k, self.S, 1.0); e += 1; _rec(events, e)
            self.k_sms((self.grid_rows,), (self.cta,),
                       (self.S, self.P, np.int64(self.rows), np.int32(N), np.int32(self.tpr),
                        np.int32(self.vpt), np.float32(self.scale), np.int32(self.causal)))
            e += 1; _rec(events, e)
        elif self.algorithm == "hf":
            qk_gemm(q, k, self.S, 1.0); e += 1; _rec(events, e)
            self.k_scale((self.ew_grid,), (256,), (self.S, self.S1, np.int64(self.n_elem), np.float32(self.scale)))
            e += 1; _rec(events, e)
            src = self.S1
            if self.causal:
                self.k_mask((self.ew_grid,), (256,), (self.S1, self.S2, np.int64(self.n_elem), np.int32(N)))
                e += 1; _rec(events, e)
                src = self.S2
            self.k_softmax((self.grid_rows,), (self.cta,),
                           (src, self.P, np.int64(self.rows), np.int32(N), np.int32(self.tpr),
                            np.int32(self.vpt), np.int32(0)))
            e += 1; _rec(events, e)
        else:
            raise ValueError(self.algorithm)
        pv_gemm(self.P, v, out); e += 1; _rec(events, e)

    def free(self):
        self.S = self.P = None
        if self.algorithm == "hf":
            self.S1 = self.S2 = None


# flash2 register-blocking choice per (head_dim, BR, BC): (16-row m-tiles per warp, Q kept in registers).
# Default (1, 1); entries below were chosen by ``python -m gpu.tune`` on the H100 (see NOTES.md).
FLASH2_WARP_TILING: dict = {
    # (head_dim, BR, BC): (WM, QREG)   measured at B=8 H=16 N=4096 (experiments/data/h100/tune_flash2.json)
    (64, 64, 64): (2, 1),     # 294 vs 264 TFLOP/s with WM=1
    (64, 128, 64): (2, 0),    # 310 vs 249
    (64, 128, 128): (2, 0),   # 277 vs 261
    (64, 128, 32): (2, 1),    # 274 vs 199
    (128, 128, 64): (2, 0),   # 303 vs 292-297
    (128, 128, 32): (2, 0),   # 310 vs 257
}


def flash2_tiling(head_dim: int, block_rows: int, block_cols: int) -> tuple[int, int]:
    return FLASH2_WARP_TILING.get((head_dim, block_rows, block_cols), (1, 1))


class _Flash:
    def __init__(self, algorithm, shape, causal, block_rows, block_cols, wm=None, qreg=None):
        import cupy as cp

        self.algorithm = algorithm
        self.B, self.H, self.N, self.d = shape
        self.causal = bool(causal)
        self.br, self.bc = int(block_rows), int(block_cols)
        if not flash_fits(algorithm, self.br, self.bc, self.d):
            raise ValueError(f"{algorithm} ({self.br},{self.bc}) d={self.d} does not fit shared memory")
        self.scale = 1.0 / math.sqrt(self.d)
        self.kernel_names = kernel_names(algorithm, causal)
        defines = {"HEAD_DIM": self.d, "BR": self.br, "BC": self.bc}
        self.wm, self.qreg = 1, 1
        if algorithm == "flash2":
            dwm, dq = flash2_tiling(self.d, self.br, self.bc)
            self.wm = int(wm if wm is not None else dwm)
            self.qreg = int(qreg if qreg is not None else dq)
            if self.br % (16 * self.wm):
                raise ValueError(f"BR={self.br} is not a multiple of 16*WM={16 * self.wm}")
            if (self.wm, self.qreg) != (1, 1):
                defines.update({"WM": self.wm, "QREG": self.qreg})
        self.kern = _raw_kernel(f"{algorithm}.cu", f"{algorithm}_fwd", defines)
        self.smem = flash_smem_bytes(algorithm, self.br, self.bc, self.d)
        self.kern.max_dynamic_shared_size_bytes = self.smem
        self.threads = (self.br // (16 * self.wm)) * 32
        B, H, N, d = self.B, self.H, self.N, self.d
        if algorithm == "flash2":
            self.L = cp.empty((B, H, N), dtype=cp.float32)
        else:
            self.Os = cp.empty((B, H, N, d), dtype=cp.float32)
            self.Ls = cp.empty((B, H, N), dtype=cp.float32)
            self.Ms = cp.empty((B, H, N), dtype=cp.float32)

    def run(self, q, k, v, out, events=None):
        import numpy as np

        _rec(events, 0)
        B, H, N = self.B, self.H, self.N
        if self.algorithm == "flash2":
            grid = ((N + self.br - 1) // self.br, B * H)
            self.kern(grid, (self.threads,), (q, k, v, out, self.L, np.int32(N), np.float32(self.scale),
                                               np.int32(self.causal)), shared_mem=self.smem)
        else:
            self.kern((B * H,), (self.threads,), (q, k, v, out, self.Os, self.Ls, self.Ms, np.int32(N),
                                                  np.float32(self.scale), np.int32(self.causal)),
                      shared_mem=self.smem)
        _rec(events, 1)

    def free(self):
        self.L = self.Os = self.Ls = self.Ms = None


def make_pipeline(algorithm, shape, causal, block_rows=None, block_cols=None, **kw):
    if algorithm in ("flash1", "flash2"):
        return _Flash(algorithm, shape, causal, block_rows, block_cols, **kw)
    if algorithm == "flash3":
        from .flash3 import Flash3
        return Flash3(shape, causal, block_rows, block_cols, **kw)
    return _Unfused(algorithm, shape, causal)


def marker(tag: int):
    """Launch the empty marker kernel with ``tag + 1`` blocks (segments ncu rows)."""
    import numpy as np

    k = _raw_kernel("softmax.cu", "iosim_marker")
    k((int(tag) + 1,), (32,), (np.int32(tag),))


# ----------------------------------------------------------------------------------------------------------
# FlashAttention-2 backward (gpu/flash2_bwd.cu): kernels named as iosim.schedules.flash2.build_backward
FLASH2_BWD_KERNEL_NAMES = ["flash2_bwd_dot", "flash2_bwd", "flash2_bwd_convert"]


FLASH2_BWD_DEFAULT_BLOCKS = {64: (64, 128), 128: (64, 128)}   # head_dim -> (BR, BC): 8 warps, no spills (ptxas 13.0)


def flash2_bwd_smem_bytes(block_rows: int, block_cols: int, head_dim: int, pipe_dq: bool = True) -> int:
    """K, V (block_cols x d), Q, dO (block_rows x d, double-buffered), dSᵀ (block_cols x block_rows; two with
    ``pipe_dq``, flash2_bwd.cu's PIPE_DQ) fp16 + L, D (fp32 rows, double-buffered)."""
    return (2 * head_dim * (2 * block_cols + 4 * block_rows) + 2 * (2 if pipe_dq else 1) * block_cols * block_rows
            + 16 * block_rows)


def flash2_bwd_blocks_ok(block_rows: int, block_cols: int, head_dim: int) -> bool:
    """The tilings flash2_bwd.cu compiles: 16-row warps over BC, dQ split into 16-row x (n-tile pair) warp tiles."""
    if block_rows % 16 or block_cols % 16 or head_dim % 16 or block_rows > block_cols or (
            block_rows != 32 and block_rows % 64):   # the dS^T swizzle: rows of 4 or of 8k 16-byte chunks
        return False
    nwarps, rg, dt = block_cols // 16, block_rows // 16, head_dim // 8
    if nwarps % rg:
        return False
    cg = nwarps // rg
    return dt % cg == 0 and (dt // cg) % 2 == 0 and flash2_bwd_smem_bytes(block_rows, block_cols, head_dim) <= SMEM_LIMIT_BYTES


class Flash2Backward:
    """dQ, dK, dV from Q, K, V, O, dO and the forward's L. ``run(q, k, v, o, L, do, dq, dk, dv, events=None)``
    records ``events[0..3]`` around flash2_bwd_dot, flash2_bwd, flash2_bwd_convert."""

    def __init__(self, shape, causal=False, block_rows=None, block_cols=None, ordered=False, defines=None):
        import cupy as cp

        self.ordered = bool(ordered)  # deterministic dQ: K/V blocks add in blockIdx.x order per Q block
        self.B, self.H, self.N, self.d = shape
        self.causal = bool(causal)
        dbr, dbc = FLASH2_BWD_DEFAULT_BLOCKS.get(self.d, (64, 128))
        self.br, self.bc = int(block_rows or dbr), int(block_cols or dbc)
        if not flash2_bwd_blocks_ok(self.br, self.bc, self.d):
            raise ValueError(f"flash2 backward: unsupported (BR, BC, d) = ({self.br}, {self.bc}, {self.d})")
        self.scale = 1.0 / math.sqrt(self.d)
        self.kernel_names = list(FLASH2_BWD_KERNEL_NAMES)
        self.extra_defines = dict(defines or {})   # e.g. KV_REGS, P_F32, DQ_UNROLL (flash2_bwd.cu's switches)
        defines = {"HEAD_DIM": self.d, "BR": self.br, "BC": self.bc, **self.extra_defines}
        self.k_dot = _raw_kernel("flash2_bwd.cu", "flash2_bwd_dot", defines)
        self.k_main = _raw_kernel("flash2_bwd.cu", "flash2_bwd", defines)
        self.k_conv = _raw_kernel("flash2_bwd.cu", "flash2_bwd_convert", defines)
        self.smem = flash2_bwd_smem_bytes(self.br, self.bc, self.d, bool(int(self.extra_defines.get("PIPE_DQ", 1))))
        self.k_main.max_dynamic_shared_size_bytes = self.smem
        self.threads = (self.bc // 16) * 32
        B, H, N, d = self.B, self.H, self.N, self.d
        self.Dv = cp.empty((B, H, N), dtype=cp.float32)
        self.dQacc = cp.empty((B, H, N, d), dtype=cp.float32)
        self.sem = cp.zeros((B * H * ((N + self.br - 1) // self.br),), dtype=cp.int32)

    def run(self, q, k, v, o, L, do, dq, dk, dv, events=None):
        import numpy as np

        B, H, N, d = self.B, self.H, self.N, self.d
        rows = B * H * N
        _rec(events, 0)
        self.k_dot(((rows + 3) // 4,), (128,), (o, do, self.Dv, self.dQacc, self.sem, np.int64(rows),
                                               np.int32(N)))
        _rec(events, 1)
        grid = ((N + self.bc - 1) // self.bc, B * H)
        self.k_main(grid, (self.threads,), (q, k, v, do, L, self.Dv, self.dQacc, dk, dv, self.sem,
                                            np.int32(N), np.float32(self.scale), np.int32(self.causal),
                                            np.int32(self.ordered)), shared_mem=self.smem)
        _rec(events, 2)
        n = rows * d
        self.k_conv((min(132 * 16, (n + 255) // 256),), (256,), (self.dQacc, dq, np.int64(n),
                                                                  np.float32(self.scale)))
        _rec(events, 3)

    def resources(self) -> dict:
        """Tiles, warps and the compiled flash2_bwd's registers / local memory (spills) / shared memory."""
        k = self.k_main
        out = {"block_rows": self.br, "block_cols": self.bc, "threads": self.threads, "smem_bytes": self.smem,
               "defines": dict(self.extra_defines)}
        for key, attr in (("registers", "num_regs"), ("local_bytes", "local_size_bytes")):
            try:
                out[key] = int(getattr(k, attr))
            except Exception:  # noqa: BLE001 - attribute names differ across CuPy versions
                out[key] = None
        return out

    def free(self):
        self.Dv = self.dQacc = self.sem = None
