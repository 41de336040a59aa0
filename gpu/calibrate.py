"""Hardware microbenchmarks for the simulator's ``h100-measured`` preset: ``python -m gpu.calibrate``.

Never fitted to attention data. Measures: device-to-device copy bandwidth (bytes read + written), L2 read
bandwidth (a buffer of ~1/4 of L2 read over and over with ld.global.cg), shared-memory bandwidth (ld.shared.v4,
conflict-free), fp16 tensor-core matmul rate (2-D cupy.matmul 8192^3 and the cuBLAS strided-batched path of the
unfused pipelines), mma.sync tensor-core rate (operands in registers), CUDA-core fp32 FMA rate, exp rate (ex2.approx and expf), and kernel launch overhead.
"""
from __future__ import annotations

import argparse
import statistics
import time

from . import schema as S

_SRC = r"""
typedef unsigned int u32;
__device__ __forceinline__ uint4 mk_u4_(u32 a, u32 b, u32 c, u32 d) { uint4 v; v.x = a; v.y = b; v.z = c; v.w = d; return v; }
extern "C" __global__ void l2_read(const uint4* __restrict__ buf, long long nvec, int loads, u32* __restrict__ sink) {
    const long long nth = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    u32 acc = 0;
    for (int it = 0; it < loads; ++it) {
        u32 a, b, c, d;
        asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "l"(buf + i));
        acc ^= a ^ b ^ c ^ d;
        i += nth; if (i >= nvec) i -= nvec;
    }
    if (acc == 0x12345678u) sink[0] = acc;
}
extern "C" __global__ void smem_read(int iters, u32* __restrict__ sink) {
    __shared__ uint4 tile[1024];
    const int t = threadIdx.x;
    tile[t] = mk_u4_(t, t * 3u, t * 5u, t * 7u);
    __syncthreads();
    u32 acc = 0;
    int idx = t;
    for (int it = 0; it < iters; ++it) {
        const uint4 v = tile[idx];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
        idx = (idx + 32) & 1023;
    }
    if (acc == 0x12345678u) sink[0] = acc;
}
extern "C" __global__ void fma_rate(int iters, float a, float b, float* __restrict__ sink) {
    float x0 = threadIdx.x, x1 = x0 + 1, x2 = x0 + 2, x3 = x0 + 3, x4 = x0 + 4, x5 = x0 + 5, x6 = x0 + 6, x7 = x0 + 7;
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int u = 0; u < 16; ++u) {
            x0 = fmaf(x0, a, b); x1 = fmaf(x1, a, b); x2 = fmaf(x2, a, b); x3 = fmaf(x3, a, b);
            x4 = fmaf(x4, a, b); x5 = fmaf(x5, a, b); x6 = fmaf(x6, a, b); x7 = fmaf(x7, a, b);
        }
    }
    const float s = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7;
    if (s == 1.2345f) sink[0] = s;
}
extern "C" __global__ void ex2_rate(int iters, float* __restrict__ sink) {
    float x0 = threadIdx.x * 1e-3f, x1 = x0 + 0.1f, x2 = x0 + 0.2f, x3 = x0 + 0.3f;
    float x4 = x0 + 0.4f, x5 = x0 + 0.5f, x6 = x0 + 0.6f, x7 = x0 + 0.7f;
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int u = 0; u < 16; ++u) {
            asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x0)); asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x1));
            asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x2)); asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x3));
            asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x4)); asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x5));
            asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x6)); asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x7));
        }
    }
    const float s = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7;
    if (s == 1.2345f) sink[0] = s;
}
extern "C" __global__ void expf_rate(int iters, float* __restrict__ sink) {
    float x0 = threadIdx.x * -1e-3f, x1 = x0 - 0.1f, x2 = x0 - 0.2f, x3 = x0 - 0.3f;
    float x4 = x0 - 0.4f, x5 = x0 - 0.5f, x6 = x0 - 0.6f, x7 = x0 - 0.7f;
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int u = 0; u < 16; ++u) {
            x0 = expf(x0) - 1.5f; x1 = expf(x1) - 1.5f; x2 = expf(x2) - 1.5f; x3 = expf(x3) - 1.5f;
            x4 = expf(x4) - 1.5f; x5 = expf(x5) - 1.5f; x6 = expf(x6) - 1.5f; x7 = expf(x7) - 1.5f;
        }
    }
    const float s = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7;
    if (s == 1.2345f) sink[0] = s;
}
extern "C" __global__ void mma_rate(int iters, float* __restrict__ sink) {
    // 8 independent m16n8k16 f16 x f16 -> f32 accumulations per warp; operands stay in registers
    const u32 t = threadIdx.x;
    const u32 a0 = 0x3c003c00u ^ (t & 0x3ffu), a1 = a0 ^ 0x00010001u, a2 = a0 ^ 0x00020002u, a3 = a0 ^ 0x00030003u;
    const u32 b0 = 0x38003800u ^ (t & 0x1ffu), b1 = b0 ^ 0x00040004u;
    float c[8][4];
#pragma unroll
    for (int u = 0; u < 8; ++u) { c[u][0] = c[u][1] = c[u][2] = c[u][3] = 1e-3f * (u + 1); }
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                         : "+f"(c[u][0]), "+f"(c[u][1]), "+f"(c[u][2]), "+f"(c[u][3])
                         : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
        }
    }
    float s = 0.f;
#pragma unroll
    for (int u = 0; u < 8; ++u) s += c[u][0] + c[u][1] + c[u][2] + c[u][3];
    if (s == 1.2345f) sink[0] = s;
}
extern "C" __global__ void empty_kernel() { }
"""


def _time(fn, reps=20, warm=3):
    import cupy as cp

    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b) * 1e-3)
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "n": len(ts)}


def calibrate(quick: bool = False) -> dict:
    import numpy as np
    import cupy as cp
    from . import bench as BN, kernels as KR

    dev = BN.device_info()
    sm = dev["sm_count"]
    mod = cp.RawModule(code=_SRC, options=("-std=c++17",))
    res: dict = {}
    settings: dict = {"nvrtc_options": ["-std=c++17"], "timer": "CUDA events, median of repeats after warm-up"}

    # 1) D2D copy, >= 1 GiB
    n = 1 << 30
    src = cp.empty(n, dtype=cp.uint8)
    src[:] = 7
    dst = cp.empty_like(src)
    t = _time(lambda: cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, n, 3, 0), reps=20)
    res["d2d_copy"] = {"bytes_per_s": 2 * n / t["median"], "buffer_bytes": n, "time_s": t,
                       "bytes_counted": "read + write (2 x buffer)", "method": "cudaMemcpyAsync D2D"}
    del src, dst

    # 2) L2 read bandwidth: buffer ~ L2/4, ld.global.cg, many passes
    l2 = dev["l2_bytes"]
    buf_bytes = (l2 // 4) // 16 * 16
    buf = cp.zeros(buf_bytes // 16 * 4, dtype=cp.uint32)
    sink = cp.zeros(4, dtype=cp.uint32)
    k = mod.get_function("l2_read")
    grid, threads, loads = sm * 8, 512, 256
    nvec = buf_bytes // 16
    t = _time(lambda: k((grid,), (threads,), (buf, np.int64(nvec), np.int32(loads), sink)))
    bytes_read = grid * threads * loads * 16
    res["l2_read"] = {"bytes_per_s": bytes_read / t["median"], "buffer_bytes": buf_bytes, "bytes_read": bytes_read,
                      "time_s": t, "grid": grid, "threads": threads, "loads_per_thread": loads,
                      "method": "ld.global.cg.v4 (L1 bypass) over a buffer of 1/4 of L2"}
    del buf

    # 3) shared-memory bandwidth
    k = mod.get_function("smem_read")
    iters = 4096
    grid, threads = sm * 2, 1024
    t = _time(lambda: k((grid,), (threads,), (np.int32(iters), sink)))
    b = grid * threads * iters * 16
    res["smem_read"] = {"bytes_per_s": b / t["median"], "bytes_per_s_per_sm": b / t["median"] / sm,
                        "time_s": t, "grid": grid, "threads": threads, "iters": iters,
                        "method": "ld.shared.v4, each 8-thread phase reads 128 contiguous bytes (conflict-free)"}

    # 4) matmul rates
    M = 8192
    a = cp.random.standard_normal((M, M), dtype=cp.float32).astype(cp.float16)
    bm = cp.random.standard_normal((M, M), dtype=cp.float32).astype(cp.float16)
    c = cp.empty((M, M), dtype=cp.float16)
    t = _time(lambda: cp.matmul(a, bm, out=c), reps=20)
    res["matmul_fp16_2d_cupy"] = {"flops_per_s": 2 * M ** 3 / t["median"], "m": M, "n": M, "k": M, "time_s": t,
                                  "method": "cupy.matmul 2-D float16"}
    t = _time(lambda: KR.gemm_strided_batched(0, 0, M, M, M, 1.0, a, M, 0, bm, M, 0, 0.0, c, M, 0, 1), reps=20)
    res["matmul_fp16_cublas_strided_batched_8192"] = {
        "flops_per_s": 2 * M ** 3 / t["median"], "m": M, "n": M, "k": M, "batch": 1, "time_s": t,
        "method": "cublasGemmStridedBatchedEx f16 in/out, CUBLAS_COMPUTE_32F, DEFAULT_TENSOR_OP"}
    del a, bm, c
    # the attention-shaped batched GEMMs (B*H = 64, N = 4096, d = 128)
    BH, N, d = 64, 4096, 128
    q = cp.random.standard_normal((1, BH, N, d), dtype=cp.float32).astype(cp.float16)
    kk = cp.random.standard_normal((1, BH, N, d), dtype=cp.float32).astype(cp.float16)
    s = cp.empty((1, BH, N, N), dtype=cp.float16)
    o = cp.empty_like(q)
    t1 = _time(lambda: KR.qk_gemm(q, kk, s, 1.0), reps=20)
    t2 = _time(lambda: KR.pv_gemm(s, kk, o), reps=20)
    f = 2.0 * BH * N * N * d
    res["matmul_fp16_cublas_attention_shapes"] = {
        "qk_flops_per_s": f / t1["median"], "pv_flops_per_s": f / t2["median"], "batch": BH, "seq_len": N,
        "head_dim": d, "qk_time_s": t1, "pv_time_s": t2}
    del q, kk, s, o

    # 5) fp32 FMA and exp rates
    fsink = cp.zeros(4, dtype=cp.float32)
    grid, threads, iters = sm * 8, 512, 2048
    k = mod.get_function("fma_rate")
    t = _time(lambda: k((grid,), (threads,), (np.int32(iters), np.float32(0.999), np.float32(0.001), fsink)))
    nfma = grid * threads * iters * 16 * 8
    res["fp32_fma"] = {"flops_per_s": 2 * nfma / t["median"], "fma_per_s": nfma / t["median"], "time_s": t,
                       "method": "8 independent FMA chains per thread"}
    for name in ("ex2_rate", "expf_rate"):
        k = mod.get_function(name)
        it2 = iters // 4
        t = _time(lambda: k((grid,), (threads,), (np.int32(it2), fsink)))
        nex = grid * threads * it2 * 16 * 8
        res["exp2_approx" if name == "ex2_rate" else "expf"] = {
            "exp_per_s": nex / t["median"], "time_s": t,
            "method": ("ex2.approx.ftz.f32 (MUFU.EX2), 8 independent chains" if name == "ex2_rate" else
                       "expf() (-ftz=true as CuPy compiles; FMUL+MUFU.EX2 and range handling) plus one FADD, "
                       "8 independent chains")}

    # 5b) the tensor-core rate of mma.sync (the instruction the flash kernels use), operands in registers
    k = mod.get_function("mma_rate")
    mma_grid, mma_threads, mma_iters = sm * 4, 256, 4096
    t = _time(lambda: k((mma_grid,), (mma_threads,), (np.int32(mma_iters), fsink)))
    n_mma = mma_grid * (mma_threads // 32) * mma_iters * 8
    res["mma_sync_fp16_f32"] = {
        "flops_per_s": n_mma * 2 * 16 * 8 * 16 / t["median"], "time_s": t, "grid": mma_grid,
        "threads": mma_threads, "iters": mma_iters,
        "method": "mma.sync.aligned.m16n8k16 f16 x f16 + f32, 8 independent accumulators per warp, "
                  "operands in registers (no memory traffic)"}
    # the same with one CTA per SM of W warps: how many resident warps the tensor cores need
    by_warps = {}
    for warps in (1, 2, 4, 8, 16, 32):
        t = _time(lambda: k((sm,), (32 * warps,), (np.int32(mma_iters), fsink)))
        by_warps[str(warps)] = sm * warps * mma_iters * 8 * 2 * 16 * 8 * 16 / t["median"]
    res["mma_sync_by_resident_warps"] = {
        "flops_per_s": by_warps, "grid": sm, "iters": mma_iters,
        "method": "mma_rate with one CTA of W warps per SM (W = the keys); 8 independent "
                  "accumulators per warp"}

    # 6) launch overhead
    k = mod.get_function("empty_kernel")
    nl = 2000
    for _ in range(100):
        k((1,), (32,), ())
    cp.cuda.runtime.deviceSynchronize()
    a_ev, b_ev = cp.cuda.Event(), cp.cuda.Event()
    h0 = time.perf_counter()
    a_ev.record()
    for _ in range(nl):
        k((1,), (32,), ())
    b_ev.record()
    b_ev.synchronize()
    h1 = time.perf_counter()
    gpu_per = cp.cuda.get_elapsed_time(a_ev, b_ev) * 1e-3 / nl
    # gap between two dependent launches measured with events around each
    gaps = []
    for _ in range(200):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        k((1,), (32,), ())
        e1.record()
        e1.synchronize()
        gaps.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3)
    res["launch_overhead"] = {
        "per_launch_back_to_back_events_s": gpu_per, "per_launch_host_wall_s": (h1 - h0) / nl,
        "single_empty_kernel_event_gap_s": {"median": statistics.median(gaps), "min": min(gaps), "max": max(gaps)},
        "launches": nl, "method": "CuPy RawKernel launches of an empty kernel, 1 block of 32 threads"}
    settings["quick"] = quick
    return {"schema": "iosim-gpu-calibration/1", "date": BN.now_iso(), "device": dev, "settings": settings,
            "results": res}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpu.calibrate", description=__doc__)
    ap.add_argument("--out", default="experiments/data/h100/calibration.json")
    args = ap.parse_args(argv)
    doc = calibrate()
    S.write_json_atomic(args.out, doc)
    r = doc["results"]
    print(f"D2D copy          {r['d2d_copy']['bytes_per_s']/1e12:.3f} TB/s")
    print(f"L2 read           {r['l2_read']['bytes_per_s']/1e12:.3f} TB/s")
    print(f"smem read         {r['smem_read']['bytes_per_s']/1e12:.3f} TB/s")
    print(f"cupy.matmul 8192  {r['matmul_fp16_2d_cupy']['flops_per_s']/1e12:.1f} TFLOP/s")
    print(f"cuBLAS sb 8192    {r['matmul_fp16_cublas_strided_batched_8192']['flops_per_s']/1e12:.1f} TFLOP/s")
    a = r["matmul_fp16_cublas_attention_shapes"]
    print(f"cuBLAS qk / pv    {a['qk_flops_per_s']/1e12:.1f} / {a['pv_flops_per_s']/1e12:.1f} TFLOP/s")
    print(f"mma.sync f16/f32  {r['mma_sync_fp16_f32']['flops_per_s']/1e12:.1f} TFLOP/s")
    print("mma.sync by warps " + ", ".join(f"{w}: {f/1e12:.0f}" for w, f in
                                           r['mma_sync_by_resident_warps']['flops_per_s'].items()))
    print(f"fp32 FMA          {r['fp32_fma']['flops_per_s']/1e12:.1f} TFLOP/s")
    print(f"ex2 / expf        {r['exp2_approx']['exp_per_s']/1e12:.3f} / {r['expf']['exp_per_s']/1e12:.3f} T/s")
    lo = r["launch_overhead"]
    print(f"launch            {lo['per_launch_back_to_back_events_s']*1e6:.2f} us/launch (events), "
          f"{lo['per_launch_host_wall_s']*1e6:.2f} us (host), gap {lo['single_empty_kernel_event_gap_s']['median']*1e6:.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
