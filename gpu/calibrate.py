"""Hardware microbenchmarks for the simulator's ``h100-measured`` preset: ``python -m gpu.calibrate``.

Never fitted to attention data. Measures: device-to-device copy bandwidth (bytes read + written), L2 read
bandwidth (a buffer of ~1/4 of L2 read over and over with ld.global.cg), shared-memory bandwidth (ld.shared.v4,
conflict-free), fp16 tensor-core matmul rate (2-D cupy.matmul 8192^3 and the cuBLAS strided-batched path of the
unfused pipelines), mma.sync tensor-core rate (operands in registers), CUDA-core fp32 FMA rate, exp rate (ex2.approx and expf), and kernel launch overhead.

Latency microbenchmarks (``_LAT_SRC``; each result gives ``cycles`` and ``latency_s``, converted with the SM clock
measured in the same run, ``results["sm_clock"]``): DRAM and L2 latency (single-thread pointer chase,
ld.global.cg, one 128-byte line per hop), shared-memory latency (ld.shared chase), mma.sync m16n8k16 latency and
issue interval (1, 2, 4, 8 independent chains in one warp), fp32 FMA and ex2.approx latency (dependent chains),
__syncthreads() cost against warps per CTA, and DRAM bandwidth against bytes in flight per SM (Little's law).

Reductions (``reduction_benchmarks``, ``gpu/reduce_bench.cu``; ``python -m gpu.calibrate --reductions`` runs only
these and merges them into --out): throughput of fp32 adds into global memory, as the attention backward's dQ
accumulation does them -- red.global.add.f32 / .v2.f32 / .v4.f32 from every thread (coalesced) and TMA
cp.reduce.async.bulk.tensor .add (one thread per warpgroup, 64 x 32-float boxes), into an L2-resident buffer and a
4 GiB one; bytes = fp32 data added; every sum checked afterwards. ``results["l2_reduction"]``.

``python -m gpu.calibrate --merge-from NEW.json --out OLD.json`` adds the result keys of NEW that OLD lacks to
OLD (existing results are kept; NEW's values of them are appended to ``reruns_of_existing_results``).
"""
from __future__ import annotations

import argparse
import copy
import json
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

_LAT_SRC = r"""
typedef unsigned int u32;
typedef unsigned long long u64;

// SM clock: clock64() against %globaltimer (ns) over a spin of spin_ns.
extern "C" __global__ void sm_clock(long long spin_ns, long long* __restrict__ out) {
    u64 g0, g1;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g0));
    const long long c0 = clock64();
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g1)); } while ((long long)(g1 - g0) < spin_ns);
    const long long c1 = clock64();
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g1));
    out[0] = c1 - c0;
    out[1] = (long long)(g1 - g0);
}

// Single-thread pointer chase through global memory; each hop is one ld.global.cg.u64 of the next address.
extern "C" __global__ void chase_global(u64 start, int hops, u64* __restrict__ out, long long* __restrict__ cyc) {
    u64 p = start;
    const long long t0 = clock64();
    for (int i = 0; i < hops; i += 8) {
#pragma unroll
        for (int u = 0; u < 8; ++u) asm volatile("ld.global.cg.u64 %0, [%0];" : "+l"(p) :: "memory");
    }
    out[0] = p;                      // the store waits for the last load; the clock is read after it
    const long long t1 = clock64();
    cyc[0] = t1 - t0;
}

// One warp chases one chain through shared memory (all lanes the same address: a broadcast, no conflict).
extern "C" __global__ void chase_smem(const u32* __restrict__ nxt, int n, int hops, u32* __restrict__ out,
                                      long long* __restrict__ cyc) {
    __shared__ u32 s[8192];
    u32 base;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(base) : "l"(s));
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = base + 4u * nxt[i];
    __syncthreads();
    u32 p = base;
    const long long t0 = clock64();
    for (int i = 0; i < hops; i += 8) {
#pragma unroll
        for (int u = 0; u < 8; ++u) asm volatile("ld.shared.u32 %0, [%0];" : "+r"(p) :: "memory");
    }
    out[threadIdx.x] = (p - base) >> 2;   // the index reached (checked on the host)
    const long long t1 = clock64();
    if (threadIdx.x == 0) cyc[0] = t1 - t0;
}

// C independent chains of dependent mma.sync m16n8k16 (f16 x f16 + f32; D of one is C of the next), one warp.
template <int C>
__device__ __forceinline__ void mma_chains(int iters, float* __restrict__ sink, long long* __restrict__ cyc) {
    const u32 t = threadIdx.x;
    const u32 a0 = 0x3c003c00u ^ (t & 0x3ffu), a1 = a0 ^ 0x00010001u, a2 = a0 ^ 0x00020002u, a3 = a0 ^ 0x00030003u;
    const u32 b0 = 0x38003800u ^ (t & 0x1ffu), b1 = b0 ^ 0x00040004u;
    float c[C][4];
#pragma unroll
    for (int u = 0; u < C; ++u) { c[u][0] = c[u][1] = c[u][2] = c[u][3] = 1e-3f * (u + 1); }
    __syncwarp();
    const long long t0 = clock64();
#pragma unroll 4
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int u = 0; u < C; ++u) {
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                         : "+f"(c[u][0]), "+f"(c[u][1]), "+f"(c[u][2]), "+f"(c[u][3])
                         : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
        }
    }
    float s = 0.f;
#pragma unroll
    for (int u = 0; u < C; ++u) s += c[u][0] + c[u][1] + c[u][2] + c[u][3];
    sink[t] = s;                     // waits for every chain
    const long long t1 = clock64();
    if (t == 0) cyc[0] = t1 - t0;
}
extern "C" __global__ void mma_chain1(int iters, float* sink, long long* cyc) { mma_chains<1>(iters, sink, cyc); }
extern "C" __global__ void mma_chain2(int iters, float* sink, long long* cyc) { mma_chains<2>(iters, sink, cyc); }
extern "C" __global__ void mma_chain4(int iters, float* sink, long long* cyc) { mma_chains<4>(iters, sink, cyc); }
extern "C" __global__ void mma_chain8(int iters, float* sink, long long* cyc) { mma_chains<8>(iters, sink, cyc); }

// One dependent chain of fp32 FMAs per thread, one warp.
extern "C" __global__ void fma_chain(int iters, float a, float b, float* __restrict__ sink, long long* __restrict__ cyc) {
    float x = threadIdx.x * 1e-3f;
    const long long t0 = clock64();
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int u = 0; u < 16; ++u) x = fmaf(x, a, b);
    }
    sink[threadIdx.x] = x;
    const long long t1 = clock64();
    if (threadIdx.x == 0) cyc[0] = t1 - t0;
}

// One dependent chain of ex2.approx.ftz.f32 (MUFU.EX2) per thread, one warp.
extern "C" __global__ void ex2_chain(int iters, float* __restrict__ sink, long long* __restrict__ cyc) {
    float x = threadIdx.x * -1e-3f;
    const long long t0 = clock64();
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int u = 0; u < 16; ++u) asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x));
    }
    sink[threadIdx.x] = x;
    const long long t1 = clock64();
    if (threadIdx.x == 0) cyc[0] = t1 - t0;
}

// __syncthreads() in a loop; thread 0 of each CTA records the cycles (launched with enough dynamic shared memory
// that one CTA fits per SM).
extern "C" __global__ void barrier_loop(int iters, long long* __restrict__ cyc) {
    __syncthreads();
    const long long t0 = clock64();
    for (int i = 0; i < iters; ++i) __syncthreads();
    const long long t1 = clock64();
    if (threadIdx.x == 0) cyc[blockIdx.x] = t1 - t0;
}

// DRAM bandwidth against bytes in flight: every thread issues U independent 16-byte ld.global.cg.v4 per round,
// then consumes them; the next round's addresses depend on the consumed value, so rounds do not overlap.
// The clock read between the loads and their use keeps ptxas from interleaving the two (without it, ptxas 13.0
// consumes each load right after issuing it for U >= 8: only ~4 loads in flight); SASS checked with nvcc 13.0.
template <int U>
__device__ __forceinline__ void bw_rounds(const uint4* __restrict__ buf, int rounds, u32 zero, u32* __restrict__ sink) {
    const long long nth = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    u32 acc = 0;
    for (int r = 0; r < rounds; ++r) {
        u32 v[U][4];
#pragma unroll
        for (int u = 0; u < U; ++u)
            asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];"
                         : "=r"(v[u][0]), "=r"(v[u][1]), "=r"(v[u][2]), "=r"(v[u][3]) : "l"(buf + i + u * nth));
        acc ^= (u32)clock() & zero;
#pragma unroll
        for (int u = 0; u < U; ++u) acc ^= v[u][0] ^ v[u][1] ^ v[u][2] ^ v[u][3];
        i += U * nth + (long long)(acc & zero);
    }
    if (acc == 0x12345678u) sink[0] = acc;
}
extern "C" __global__ void bw_u1(const uint4* b, int r, u32 z, u32* s) { bw_rounds<1>(b, r, z, s); }
extern "C" __global__ void bw_u2(const uint4* b, int r, u32 z, u32* s) { bw_rounds<2>(b, r, z, s); }
extern "C" __global__ void bw_u4(const uint4* b, int r, u32 z, u32* s) { bw_rounds<4>(b, r, z, s); }
extern "C" __global__ void bw_u8(const uint4* b, int r, u32 z, u32* s) { bw_rounds<8>(b, r, z, s); }
extern "C" __global__ void bw_u16(const uint4* b, int r, u32 z, u32* s) { bw_rounds<16>(b, r, z, s); }
"""
_LAT_OPTIONS = ("-std=c++17",)

# plausible ranges (cycles) for H100-class SMs: a result outside is flagged (``sane: false``) and printed
EXPECTED_CYCLES = {
    "dram_latency": (400, 1500), "l2_latency": (150, 500), "smem_latency": (20, 60),
    "mma_sync_latency": (15, 80), "fp32_latency": (2, 10), "ex2_latency": (6, 60), "barrier": (5, 300),
}
EXPECTED_SM_CLOCK_HZ = (0.8e9, 2.2e9)


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


def _stats(xs) -> dict:
    xs = [float(x) for x in xs]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def cycle_chain(n: int, seed: int, xp=None):
    """A random cyclic permutation of range(n) as a successor array: ``nxt[i]`` follows i, and following nxt from
    any index visits all n before returning (one cycle). Returns (nxt, first). NumPy or CuPy (``xp``)."""
    import numpy as np

    xp = xp or np
    perm = xp.argsort(xp.random.RandomState(seed).random_sample(n))
    nxt = xp.empty_like(perm)
    nxt[perm] = xp.roll(perm, -1)
    return nxt, int(perm[0])


def _latency_entry(key: str, per_op: list, method: str, **extra) -> dict:
    st = _stats(per_op)
    lo, hi = EXPECTED_CYCLES[key]
    return dict({"cycles": st["median"], "latency_s": None, "cycles_repeats": st, "method": method,
                 "expected_cycles": [lo, hi], "sane": bool(lo <= st["median"] <= hi)}, **extra)


def latency_benchmarks(dev: dict, log=print) -> dict:
    """The latency / Little's-law microbenchmarks (see the module doc). Returns new result entries by key."""
    import numpy as np
    import cupy as cp

    sm, l2 = dev["sm_count"], dev["l2_bytes"]
    kern = {}

    def K(name):
        if name not in kern:
            kern[name] = cp.RawKernel(_LAT_SRC, name, options=_LAT_OPTIONS)
        return kern[name]

    res: dict = {}
    i64 = cp.zeros(max(64, sm), dtype=cp.int64)

    def clock_samples(n=5, spin_ns=10_000_000):
        hz = []
        for _ in range(n):
            K("sm_clock")((1,), (1,), (np.int64(spin_ns), i64))
            c, ns = (int(x) for x in i64[:2].get())
            hz.append(c / ns * 1e9)
        return hz

    def guarded(key, fn):
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- one broken benchmark must not lose the others
            res[key] = {"error": repr(e)[:1000]}
            log(f"  {key}: FAILED {e!r}"[:500])
        log(f"  [{key}: {time.monotonic() - t0:.1f} s]")

    K("sm_clock")((1,), (1,), (np.int64(1_000_000), i64))
    cp.cuda.runtime.deviceSynchronize()
    hz_before = clock_samples()

    scratch = cp.empty(4 * l2, dtype=cp.uint8)

    def flush_l2():
        scratch.fill(1)
        cp.cuda.runtime.deviceSynchronize()

    LINE = 128

    def global_chase(nbytes, hops, reps, seed, warm_all):
        n = nbytes // LINE
        buf = cp.empty(n * (LINE // 8), dtype=cp.uint64)
        nxt, first = cycle_chain(n, seed, xp=cp)
        base = int(buf.data.ptr)
        buf.reshape(n, LINE // 8)[:, 0] = cp.uint64(base) + nxt.astype(cp.uint64) * cp.uint64(LINE)
        del nxt
        flush_l2()
        out = cp.zeros(1, dtype=cp.uint64)
        cyc = cp.zeros(1, dtype=cp.int64)
        k = K("chase_global")
        p = base + first * LINE
        warm = ((n + 7) // 8) * 8 if warm_all else hops
        k((1,), (1,), (np.uint64(p), np.int32(warm), out, cyc))
        p = int(out.get()[0])
        per_hop = []
        for _ in range(reps):
            k((1,), (1,), (np.uint64(p), np.int32(hops), out, cyc))
            p = int(out.get()[0])
            per_hop.append(int(cyc.get()[0]) / hops)
            if not (base <= p < base + n * LINE and (p - base) % LINE == 0):
                raise RuntimeError(f"pointer chase left the buffer: {p:#x}")
        del buf
        cp.get_default_memory_pool().free_all_blocks()
        return per_hop

    # --- DRAM latency: 2 GiB (>> L2), a fresh part of the cycle for every repeat
    def dram():
        hops, reps = 8192, 9
        per = global_chase(2 << 30, hops, reps, seed=11, warm_all=False)
        res["dram_latency"] = _latency_entry(
            "dram_latency", per, "single-thread pointer chase, random cyclic permutation of the 128-byte lines of "
            "a 2 GiB buffer, one ld.global.cg.u64 (L1 bypassed) per hop; L2 flushed (200 MB written) after "
            "building the chain, one warm-up pass of the same length, then each repeat continues along the "
            "cycle (never-visited lines: every hop misses L2). Includes whatever TLB misses random 2 GiB hops "
            "take (see dram_latency_by_footprint). clock64() around the loop / hops",
            buffer_bytes=2 << 30, stride_bytes=LINE, hops=hops, repeats=reps)
        by, rep = {}, {}
        for mib in (128, 512):
            st = _stats(global_chase(mib << 20, hops, 5, seed=12 + mib, warm_all=False))
            by[str(mib << 20)], rep[str(mib << 20)] = st["median"], st
        by[str(2 << 30)] = res["dram_latency"]["cycles"]
        rep[str(2 << 30)] = res["dram_latency"]["cycles_repeats"]
        res["dram_latency_by_footprint"] = {
            "cycles": by, "latency_s": None, "cycles_repeats": rep, "hops": hops,
            "method": "as dram_latency, over buffers of the given bytes (keys); a smaller footprint needs fewer "
                      "TLB entries"}

    def l2_lat():
        hops, reps = 8192, 9
        nbytes = (l2 // 8) // LINE * LINE
        per = global_chase(nbytes, hops, reps, seed=21, warm_all=True)
        res["l2_latency"] = _latency_entry(
            "l2_latency", per, "single-thread pointer chase as dram_latency over a buffer of L2/8 (fits in L2), "
                               "warmed by one pass over the whole cycle first; ld.global.cg (L1 bypassed). Random "
                               "lines: an average over the near and far L2 partitions",
            buffer_bytes=nbytes, stride_bytes=LINE, hops=hops, repeats=reps)

    def smem_lat():
        n, hops, reps = 4096, 16384, 9
        nxt, _ = cycle_chain(n, 31)
        nxt32 = cp.asarray(nxt.astype(np.uint32))
        want = 0
        for _ in range(hops):
            want = int(nxt[want])
        out = cp.zeros(32, dtype=cp.uint32)
        k = K("chase_smem")
        per = []
        for _ in range(reps + 1):
            out.fill(0xFFFFFFFF)
            k((1,), (32,), (nxt32, np.int32(n), np.int32(hops), out, i64))
            per.append(int(i64.get()[0]) / hops)
            got = out.get()
            if not (got == want).all():
                raise RuntimeError(f"shared-memory chase ended at {got[:4]}, expected {want}")
        per = per[1:]
        res["smem_latency"] = _latency_entry(
            "smem_latency", per, "one warp, every lane chasing the same random cycle of 4096 32-bit words in "
                                 "shared memory (broadcast, no bank conflict), ld.shared.u32 of the next address "
                                 "per hop; first launch dropped", hops=hops, words=n, repeats=reps)

    def mma_lat():
        iters, reps = 8192, 7
        sink = cp.zeros(32, dtype=cp.float32)
        by, rep, raw = {}, {}, {}
        for c in (1, 2, 4, 8):
            k = K(f"mma_chain{c}")
            per = []
            for _ in range(reps + 1):
                k((1,), (32,), (np.int32(iters), sink, i64))
                per.append(int(i64.get()[0]) / (iters * c))
            if not bool(cp.isfinite(sink).all()):
                raise RuntimeError("mma chain produced non-finite values")
            raw[c] = per[1:]
            by[str(c)] = statistics.median(raw[c])
            rep[str(c)] = _stats(raw[c])
        res["mma_sync_latency"] = _latency_entry(
            "mma_sync_latency", raw[1],
            "one warp, one dependent chain of mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 (the "
            "accumulator of each is the C input of the next; A, B constant in registers): cycles per mma "
            "(SASS: HMMA.16816.F32); first launch dropped", iters=iters, repeats=reps)
        res["mma_sync_by_chains"] = {
            "cycles_per_mma": by, "latency_s_per_mma": None, "repeats": rep, "iters": iters,
            "method": "one warp, C independent dependent chains (C = the keys) of mma.sync m16n8k16 f16/f32: "
                      "cycles per mma = cycles / (iters * C); C = 1 is the latency, large C the warp's issue "
                      "interval"}

    def alu_lat():
        iters, reps = 4096, 7
        sink = cp.zeros(32, dtype=cp.float32)
        for key, name, args, what in (
                ("fp32_latency", "fma_chain", (np.float32(0.999), np.float32(0.001)), "fmaf(x, a, b) (FFMA)"),
                ("ex2_latency", "ex2_chain", (), "ex2.approx.ftz.f32 x, x (MUFU.EX2; the chain runs into +inf "
                                                 "after a few steps, the unit's timing does not depend on it)")):
            k = K(name)
            per = []
            for _ in range(reps + 1):
                k((1,), (32,), (np.int32(iters), *args, sink, i64))
                per.append(int(i64.get()[0]) / (iters * 16))
            res[key] = _latency_entry(key, per[1:], f"one warp, one dependent chain per thread of {what}, 16 per "
                                                   "loop iteration; cycles per operation; first launch dropped",
                                      iters=iters, ops=iters * 16, repeats=reps)

    def barrier():
        iters, reps = 20000, 5
        k = K("barrier_loop")
        smem = 120 * 1024
        k.max_dynamic_shared_size_bytes = smem
        cyc, rep = {}, {}
        for w in (1, 2, 4, 8, 16, 32):
            per = []
            for _ in range(reps + 1):
                i64.fill(0)
                k((sm,), (32 * w,), (np.int32(iters), i64), shared_mem=smem)
                c = i64[:sm].get()
                per.append(float(np.median(c)) / iters)
            cyc[str(w)] = statistics.median(per[1:])
            rep[str(w)] = _stats(per[1:])
        lo, hi = EXPECTED_CYCLES["barrier"]
        res["barrier"] = {
            "cycles": cyc, "cycles_by_warps": dict(cyc), "latency_s": None, "cycles_repeats": rep,
            "iters": iters, "grid": sm,
            "dynamic_smem_bytes": smem, "expected_cycles": [lo, hi],
            "sane": all(lo <= cyc[w] <= hi for w in ("4", "8", "16")),
            "method": "__syncthreads() (BAR.SYNC) in a loop with nothing else, one CTA of W warps per SM (W = the "
                      "keys of cycles and of its copy cycles_by_warps; 120 KiB of dynamic shared memory requested "
                      "so that only one CTA fits per SM), "
                      "grid = SM count; thread 0's clock64() cycles / iterations, median over the CTAs, median "
                      "over repeats (first launch dropped)"}

    def bandwidth():
        nbytes = 2 << 30
        buf = cp.empty(nbytes // 4, dtype=cp.uint32)
        buf[:] = cp.arange(nbytes // 4, dtype=cp.uint32) * cp.uint32(2654435761)
        nvec = nbytes // 16
        sink = cp.zeros(4, dtype=cp.uint32)
        smem = 120 * 1024
        points, best, skipped = [], {}, []
        regs_per_sm = 65536
        for u in (1, 2, 4, 8, 16):
            k = K(f"bw_u{u}")
            k.max_dynamic_shared_size_bytes = smem
            regs = int(getattr(k, "num_regs", 0) or 0)
            for w in (1, 2, 4, 8, 16, 32):
                bif = 32 * 16 * u * w
                if regs and regs * 32 * w > regs_per_sm:
                    skipped.append({"warps": w, "loads_per_thread": u, "bytes_in_flight_per_sm": bif,
                                    "reason": f"{regs} registers x {32 * w} threads > {regs_per_sm} per SM"})
                    continue
                nth = sm * 32 * w
                rounds = nvec // (u * nth)
                try:
                    t = _time(lambda: k((sm,), (32 * w,), (buf, np.int32(rounds), np.uint32(0), sink),
                                        shared_mem=smem), reps=5, warm=1)
                except Exception as e:  # noqa: BLE001 -- e.g. too many resources: record, go on
                    skipped.append({"warps": w, "loads_per_thread": u, "bytes_in_flight_per_sm": bif,
                                    "reason": repr(e)[:300]})
                    continue
                read = rounds * u * nth * 16
                bw = read / t["median"]
                points.append({"warps": w, "loads_per_thread": u, "bytes_in_flight_per_sm": bif,
                               "registers_per_thread": regs or None, "bytes_read": read, "time_s": t,
                               "bytes_per_s": bw, "implied_latency_s": bif * sm / bw})
                if bw > best.get(bif, 0.0):
                    best[bif] = bw
        del buf
        cp.get_default_memory_pool().free_all_blocks()
        res["dram_bandwidth_by_bytes_in_flight"] = {
            "bytes_per_s": {str(b): best[b] for b in sorted(best)}, "points": points, "skipped": skipped,
            "grid": sm,
            "buffer_bytes": nbytes, "dynamic_smem_bytes": smem,
            "settings": {"warps": [1, 2, 4, 8, 16, 32], "loads_per_thread": [1, 2, 4, 8, 16], "load_bytes": 16,
                         "timer": "CUDA events, median of 5 after 1 warm-up"},
            "method": "one CTA per SM (grid = SM count, 120 KiB dynamic shared memory requested so one fits per "
                      "SM) of W warps; per round every thread issues U independent ld.global.cg.v4 (16 B, "
                      "coalesced, the whole grid reading consecutive bytes), consumes them, and the next round's "
                      "addresses depend on the result: bytes in flight per SM = W*32*16*U. Each launch reads the "
                      "2 GiB buffer once (>> L2). bytes_per_s (keys: bytes in flight per SM) is the best (W, U) "
                      "with that product, total over the GPU; every (W, U) point is in points; "
                      "implied_latency_s = bytes in flight (all SMs) / bandwidth (Little's law). 256 KiB per SM "
                      "(W=32, U=16) cannot be held in registers (it is the whole register file; the kernel needs "
                      "~78 registers x 1024 threads): the curve ends at 128 KiB, see skipped"}

    log("latency / Little's-law microbenchmarks:")
    for key, fn in (("dram_latency", dram), ("l2_latency", l2_lat), ("smem_latency", smem_lat),
                    ("mma_sync_latency", mma_lat), ("fp32_latency", alu_lat), ("barrier", barrier),
                    ("dram_bandwidth_by_bytes_in_flight", bandwidth)):
        guarded(key, fn)
    del scratch
    hz_after = clock_samples()
    hz = statistics.median(hz_before + hz_after)
    res["sm_clock"] = {
        "hz": hz, "samples_hz_before": hz_before, "samples_hz_after": hz_after, "spin_s": 0.01,
        "sane": bool(EXPECTED_SM_CLOCK_HZ[0] <= hz <= EXPECTED_SM_CLOCK_HZ[1]),
        "method": "one thread reads clock64() and %globaltimer at the start and end of a 10 ms spin on "
                  "%globaltimer: SM cycles / ns; 5 samples before and 5 after the latency benchmarks, median of "
                  "all 10; latency_s = cycles / hz"}
    to_seconds(res, hz)
    return res


def to_seconds(res: dict, hz: float) -> None:
    """Fill ``latency_s`` (and ``latency_s_per_mma``) of every latency entry from its cycles."""
    for v in res.values():
        if not isinstance(v, dict):
            continue
        if "latency_s" in v and v.get("cycles") is not None:
            c = v["cycles"]
            v["latency_s"] = {k: x / hz for k, x in c.items()} if isinstance(c, dict) else c / hz
        if "latency_s_per_mma" in v:
            v["latency_s_per_mma"] = {k: x / hz for k, x in v["cycles_per_mma"].items()}


LATENCY_KEYS = ("sm_clock", "dram_latency", "dram_latency_by_footprint", "l2_latency", "smem_latency",
                "mma_sync_latency", "mma_sync_by_chains", "fp32_latency", "ex2_latency", "barrier",
                "dram_bandwidth_by_bytes_in_flight")


def summary_lines(res: dict) -> list[str]:
    """One line per new (latency) result."""
    out = []
    hz = res.get("sm_clock", {}).get("hz")
    if hz:
        out.append(f"SM clock          {hz/1e9:.3f} GHz{'' if res['sm_clock'].get('sane') else '  OUT OF RANGE'}")
    for key in ("dram_latency", "l2_latency", "smem_latency", "mma_sync_latency", "fp32_latency", "ex2_latency"):
        e = res.get(key)
        if not e:
            continue
        if "error" in e:
            out.append(f"{key:17s} FAILED {e['error'][:200]}")
            continue
        ns = e["latency_s"] * 1e9 if e.get("latency_s") is not None else float("nan")
        out.append(f"{key:17s} {e['cycles']:8.1f} cycles  {ns:8.2f} ns  (min {e['cycles_repeats']['min']:.1f}, "
                   f"max {e['cycles_repeats']['max']:.1f}){'' if e['sane'] else '  OUT OF RANGE ' + str(e['expected_cycles'])}")
    e = res.get("dram_latency_by_footprint")
    if e and "error" not in e:
        out.append("DRAM lat by bytes " + ", ".join(f"{int(k) >> 20} MiB: {v:.0f}" for k, v in e["cycles"].items()))
    e = res.get("mma_sync_by_chains")
    if e and "error" not in e:
        out.append("mma.sync chains   " + ", ".join(f"{c}: {v:.2f}" for c, v in e["cycles_per_mma"].items())
                   + " cycles/mma")
    e = res.get("barrier")
    if e and "error" not in e:
        out.append("__syncthreads     " + ", ".join(f"{w} warps: {v:.1f}" for w, v in e["cycles"].items())
                   + f" cycles{'' if e['sane'] else '  OUT OF RANGE'}")
    elif e:
        out.append(f"barrier           FAILED {e['error'][:200]}")
    e = res.get("dram_bandwidth_by_bytes_in_flight")
    if e and "error" not in e:
        out.append("DRAM BW by B/SM   " + ", ".join(f"{int(b) // 1024 if int(b) >= 1024 else int(b)}"
                                                    f"{'K' if int(b) >= 1024 else ''}: {v/1e12:.2f}"
                                                    for b, v in e["bytes_per_s"].items()) + " TB/s")
    elif e:
        out.append(f"DRAM BW by B/SM   FAILED {e['error'][:200]}")
    return out


# ---- wgmma (Hopper warpgroup MMA), for the flash3 model's wgmma path -----------------------------------------
WGMMA_N = 128  # m64n128k16: FlashAttention-3's QKᵀ and PV shapes are m64 x (Bc or d) x k16 steps
WGMMA_RATE_CHAIN = 16  # back-to-back wgmmas per commit group in the rate kernel
WGMMA_OPTIONS = ("--gpu-architecture=sm_90a", "-std=c++17")


def wgmma_source(n: int = WGMMA_N) -> str:
    """Two kernels over wgmma.mma_async m64nNk16 f32 += f16 x f16 with both operands in shared memory (no swizzle;
    the values are zeros: only time is measured). ``wgmma_latency``: one wgmma, commit, wait, ``iters`` times in
    one warpgroup (clock64: issue-to-completion cycles of a dependent wgmma). ``wgmma_rate``: per warpgroup,
    WGMMA_RATE_CHAIN wgmmas into the same accumulators, then commit and wait, ``iters`` times."""
    regs = n // 2
    outs = ", ".join(f"%{i}" for i in range(regs))
    asm = (f'"{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 2}, 0;\\n'
           f'wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16 {{{outs}}}, %{regs}, %{regs + 1}, p, 1, 1, 0, 0;'
           f'\\n}}\\n"')
    bind = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    return (r"""
typedef unsigned long long u64;
#define NREG """ + str(regs) + r"""
__device__ __forceinline__ u64 desc(const void* smem, unsigned lbo, unsigned sbo) {
    unsigned a = (unsigned)__cvta_generic_to_shared(smem);
    return (u64)((a >> 4) & 0x3FFF) | ((u64)((lbo >> 4) & 0x3FFF) << 16) | ((u64)((sbo >> 4) & 0x3FFF) << 32);
}
__device__ __forceinline__ void mma(float* d, u64 da, u64 db, int scale_d) {
    asm volatile(""" + asm + " : " + bind + r""" : "l"(da), "l"(db), "r"(scale_d));
}
template <int CHAIN>
__device__ __forceinline__ void bench(int iters, long long* cycles, float* sink) {
    __shared__ __align__(128) unsigned char smem[32768];
    for (int i = threadIdx.x; i < 32768 / 4; i += blockDim.x) ((float*)smem)[i] = 0.0f;
    __syncthreads();
    const int wg = threadIdx.x / 128;
    u64 da = desc(smem + wg * 2048, 128, 256);
    u64 db = desc(smem + 16384, 128, 256);
    float d[NREG];
    for (int i = 0; i < NREG; ++i) d[i] = 0.0f;
    __syncthreads();
    long long t0 = clock64();
    for (int it = 0; it < iters; ++it) {
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int c = 0; c < CHAIN; ++c) mma(d, da, db, 1);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    }
    long long t1 = clock64();
    float acc = 0.0f;
    for (int i = 0; i < NREG; ++i) acc += d[i];
    if (acc == 123.0f) sink[0] = acc;
    if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}
extern "C" __global__ void wgmma_latency(int iters, long long* cycles, float* sink) { bench<1>(iters, cycles, sink); }
extern "C" __global__ void wgmma_rate(int iters, long long* cycles, float* sink) {
    bench<""" + str(WGMMA_RATE_CHAIN) + r""">(iters, cycles, sink);
}
// warpgroup 0 issues wgmmas (as wgmma_rate) when mode & 1, warpgroup 1 runs 8 independent ex2.approx chains per
// thread (MUFU) when mode & 2: one warp of each on every sub-partition, as FlashAttention-3's two consumer
// warpgroups. cycles[2 * block + wg]: each warpgroup's clock64 span.
extern "C" __global__ void wgmma_mufu(int mode, int iters, int ex2_iters, long long* cycles, float* sink) {
    __shared__ __align__(128) unsigned char smem[32768];
    for (int i = threadIdx.x; i < 32768 / 4; i += blockDim.x) ((float*)smem)[i] = 0.0f;
    __syncthreads();
    const int wg = threadIdx.x / 128;
    long long t0 = clock64();
    if (wg == 0 && (mode & 1)) {
        u64 da = desc(smem, 128, 256);
        u64 db = desc(smem + 16384, 128, 256);
        float d[NREG];
        for (int i = 0; i < NREG; ++i) d[i] = 0.0f;
        for (int it = 0; it < iters; ++it) {
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
            for (int c = 0; c < """ + str(WGMMA_RATE_CHAIN) + r"""; ++c) mma(d, da, db, 1);
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        }
        float acc = 0.0f;
        for (int i = 0; i < NREG; ++i) acc += d[i];
        if (acc == 123.0f) sink[0] = acc;
    }
    if (wg == 1 && (mode & 2)) {
        float x0 = threadIdx.x * 1e-3f, x1 = x0 + 0.1f, x2 = x0 + 0.2f, x3 = x0 + 0.3f, x4 = x0 + 0.4f,
              x5 = x0 + 0.5f, x6 = x0 + 0.6f, x7 = x0 + 0.7f;
        for (int it = 0; it < ex2_iters; ++it) {
            asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x0)); asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x1));
            asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x2)); asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x3));
            asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x4)); asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x5));
            asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x6)); asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(x7));
        }
        float acc = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7;
        if (acc == 123.0f) sink[0] = acc;
    }
    if (wg == 1 && (mode & 4)) {
        float x0 = threadIdx.x * 1e-3f, x1 = x0 + 0.1f, x2 = x0 + 0.2f, x3 = x0 + 0.3f, x4 = x0 + 0.4f,
              x5 = x0 + 0.5f, x6 = x0 + 0.6f, x7 = x0 + 0.7f;
        const float a = 0.999f, b = 1e-4f;
        for (int it = 0; it < ex2_iters; ++it) {
            asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(x0) : "f"(a), "f"(b));
            asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(x1) : "f"(a), "f"(b));
            asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(x2) : "f"(a), "f"(b));
            asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(x3) : "f"(a), "f"(b));
            asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(x4) : "f"(a), "f"(b));
            asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(x5) : "f"(a), "f"(b));
            asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(x6) : "f"(a), "f"(b));
            asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(x7) : "f"(a), "f"(b));
        }
        float acc = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7;
        if (acc == 123.0f) sink[0] = acc;
    }
    long long t1 = clock64();
    if (threadIdx.x % 128 == 0) cycles[2 * blockIdx.x + wg] = t1 - t0;
}
""")


def _wgmma_module():
    """The wgmma kernels, by NVRTC for sm_90a: through cupy.RawModule, else NVRTC directly (cubin)."""
    import os
    import tempfile

    import cupy as cp
    from cupy.cuda import nvrtc

    src = wgmma_source()
    try:
        mod = cp.RawModule(code=src, options=WGMMA_OPTIONS)
        mod.get_function("wgmma_latency")
        return mod, "cupy.RawModule"
    except Exception:  # noqa: BLE001 -- CuPy's own -arch may override sm_90a
        pass
    prog = nvrtc.createProgram(src, "wgmma.cu", [], [])
    try:
        nvrtc.compileProgram(prog, list(WGMMA_OPTIONS))
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    path = os.path.join(tempfile.mkdtemp(), "wgmma.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    return cp.RawModule(path=path), "nvrtc cubin"


def _wgmma_mufu_overlap(mod, sm, cycles, sink, log, other: int = 2) -> dict:
    """Do the tensor cores (wgmma, one warpgroup) and another pipe (``other``: 2 the special-function units'
    ex2, 4 the FP32 pipe's FMA; another warpgroup, the same sub-partitions) work at the same time? Each alone,
    then both (one CTA per SM, CUDA events); the other op's count is set so that each alone takes about as long
    as the other. ``overlap``: (alone sum - both) / (alone sum - alone max): 1 when both take as long as the
    longer alone, 0 when they add up."""
    import numpy as np
    import cupy as cp

    k = mod.get_function("wgmma_mufu")
    big = cp.zeros(2 * sm, dtype=cp.int64)
    iters = 1000

    def run(mode, ex2_iters):
        return _time(lambda: k((sm,), (256,), (np.int32(mode), np.int32(iters), np.int32(ex2_iters), big,
                                                 sink)), reps=7, warm=2)["median"]

    wg_alone = run(1, 0)
    probe = 4000
    per_ex2_iter = run(other, probe) / probe
    ex2_iters = max(1, int(round(wg_alone / per_ex2_iter)))
    ex2_alone = run(other, ex2_iters)
    both = run(1 | other, ex2_iters)
    longer, total = max(wg_alone, ex2_alone), wg_alone + ex2_alone
    overlap = (total - both) / (total - longer) if total > longer else 1.0
    name = "ex2" if other == 2 else "fma"
    log(f"  wgmma alone {wg_alone * 1e6:.1f} us, {name} alone {ex2_alone * 1e6:.1f} us, both {both * 1e6:.1f} us: "
        f"overlap {overlap:.2f}")
    return {"wgmma_alone_s": wg_alone, "ex2_alone_s": ex2_alone, "both_s": both, "overlap": overlap,
            "wgmma_iters": iters, "wgmmas_per_iter": WGMMA_RATE_CHAIN, "ex2_iters": ex2_iters,
            "ex2_per_iter_per_thread": 8,
            "method": "one CTA per SM of 2 warpgroups: warpgroup 0 issues wgmma m64n128k16 (16 per commit group), "
                      "warpgroup 1 runs 8 independent ex2.approx.ftz chains per thread; each alone, then both; CUDA "
                      "events; overlap = (alone sum - both) / (alone sum - longer alone)"}


def wgmma_benchmarks(dev: dict, log=print) -> dict:
    """wgmma m64n128k16 (f16 inputs, f32 accumulators, operands in shared memory): the issue-to-completion
    latency of one dependent wgmma (1 warpgroup, 1 CTA), and the rate with 1, 2 and 3 warpgroups per SM (one CTA
    per SM, WGMMA_RATE_CHAIN wgmmas per commit group; CUDA events). ``latency_cycles`` is the completion beyond the
    pipe time: the dependent latency less one wgmma's FLOPs at the measured per-SM rate (2 warpgroups)."""
    import numpy as np
    import cupy as cp

    mod, path = _wgmma_module()
    lat_k, rate_k = mod.get_function("wgmma_latency"), mod.get_function("wgmma_rate")
    sm = dev["sm_count"]
    cycles = cp.zeros(sm, dtype=cp.int64)
    sink = cp.zeros(1, dtype=cp.float32)
    flops_one = 2 * 64 * WGMMA_N * 16
    iters = 2000
    lat_k((1,), (128,), (np.int32(10), cycles, sink))
    per = []
    for _ in range(7):
        lat_k((1,), (128,), (np.int32(iters), cycles, sink))
        cp.cuda.runtime.deviceSynchronize()
        per.append(int(cycles[0].get()) / iters)
    by_wg, cyc_by_wg = {}, {}
    for groups in (1, 2, 3):
        def run(groups=groups):
            rate_k((sm,), (128 * groups,), (np.int32(iters), cycles, sink))
        t = _time(run, reps=7, warm=2)
        flops = sm * groups * iters * WGMMA_RATE_CHAIN * flops_one
        by_wg[str(groups)] = flops / t["median"]
        cyc_by_wg[str(groups)] = float(cp.median(cycles.astype(cp.float64)).get())
    try:  # must not lose the wgmma figures
        overlap = _wgmma_mufu_overlap(mod, sm, cycles, sink, log)
    except Exception as e:  # noqa: BLE001
        overlap = {"error": repr(e)[:1000]}
    try:
        fma_overlap = _wgmma_mufu_overlap(mod, sm, cycles, sink, log, other=4)
        fma_overlap["method"] = fma_overlap["method"].replace(
            "8 independent ex2.approx.ftz chains", "8 independent fma.rn.f32 chains")
        fma_overlap["fma_iters"] = fma_overlap.pop("ex2_iters")
        fma_overlap["fma_alone_s"] = fma_overlap.pop("ex2_alone_s")
        fma_overlap["fma_per_iter_per_thread"] = fma_overlap.pop("ex2_per_iter_per_thread")
    except Exception as e:  # noqa: BLE001
        fma_overlap = {"error": repr(e)[:1000]}
    rate = by_wg["2"]
    flop_per_sm_cycle = 2 * iters * WGMMA_RATE_CHAIN * flops_one / cyc_by_wg["2"]
    st = _stats(per)
    pipe = flops_one / flop_per_sm_cycle
    log(f"  wgmma m64n{WGMMA_N}k16: dependent {st['median']:.1f} cycles, pipe {pipe:.1f}; "
        f"{', '.join(f'{g} WG {r / 1e12:.0f} TFLOP/s' for g, r in by_wg.items())}")
    return {"wgmma_mufu_overlap": overlap, "wgmma_fma_overlap": fma_overlap, "wgmma_fp16_f32": {
        "flops_per_s": rate, "flops_per_s_by_warpgroups": by_wg,
        "flop_per_sm_cycle": flop_per_sm_cycle, "sm_cycles_by_warpgroups": cyc_by_wg,
        "latency_cycles": st["median"] - pipe, "dependent_cycles": st["median"], "dependent_cycles_repeats": st,
        "pipe_cycles_one_wgmma": pipe, "shape": f"m64n{WGMMA_N}k16", "compiled_by": path,
        "method": "wgmma.mma_async f32 += f16 x f16, both operands in shared memory (zeros, no swizzle); latency: "
                  "1 warpgroup, fence + 1 wgmma + commit + wait_group 0 per iteration, clock64 / iterations; rate: "
                  f"one CTA per SM of 1-3 warpgroups, {WGMMA_RATE_CHAIN} wgmmas per commit group, CUDA events "
                  "(flops_per_s: 2 warpgroups, FlashAttention-3's consumers); latency_cycles = dependent cycles "
                  "less one wgmma's FLOPs at flop_per_sm_cycle"}}


# ---- fp32 reductions into global memory (the attention backward's dQ accumulation) ----------------------------
REDUCTION_SOURCE = "reduce_bench.cu"          # gpu/reduce_bench.cu
RED_FORMS = {"red_f32": 1, "red_v2_f32": 2, "red_v4_f32": 4}   # kernel (= result key) -> floats per instruction
RED_CTAS_PER_SM, RED_THREADS = 4, 512
TMA_KEY = "tma_reduce_f32"
TMA_BOX_ROWS, TMA_BOX_COLS, TMA_COLS = 64, 32, 128  # boxes of 64 rows x 32 floats over a (rows x 128) fp32 tensor
TMA_BOX_BYTES = TMA_BOX_ROWS * TMA_BOX_COLS * 4
TMA_TILE_BYTES = 2 * TMA_BOX_BYTES                 # a warpgroup's staging tile (reduce_bench.cu TMA_TILE_BOXES)
TMA_DEPTH = 8                                      # bulk groups with pending shared-memory reads per issuing thread
TMA_CTAS_PER_SM, TMA_WARPGROUPS = 2, 2             # the main configuration: 4 issuing threads per SM
TMA_ISSUERS_PER_SM = {1: (1, 1), 2: (1, 2), 4: (2, 2)}   # issuing threads per SM -> (CTAs per SM, warpgroups)
REDUCTION_DRAM_BYTES = 4 << 30
REDUCTION_KEY = "l2_reduction"


def red_buffer_floats(target_bytes: int, total_threads: int, max_vec: int = 4) -> int:
    """Floats of the L2-resident buffer for the red.global forms: the multiple of ``total_threads * max_vec`` nearest
    ``target_bytes`` (at least one), so that every thread issues the same number of instructions in every form."""
    unit = total_threads * max_vec
    return max(1, round(target_bytes / 4 / unit)) * unit


def tma_buffer_boxes(target_bytes: int, issuers: list[int]) -> int:
    """64 x 32-float boxes of the L2-resident TMA destination: the multiple of lcm(issuers..., 4 boxes a row
    block) nearest ``target_bytes`` (at least one), so that every issuing thread adds the same number of boxes."""
    import math

    unit = math.lcm(4, *issuers)
    return max(1, round(target_bytes / TMA_BOX_BYTES / unit)) * unit


def reduction_bytes(floats: int, passes: int, launches: int = 1) -> int:
    """The bytes counted for a reduction benchmark: the fp32 data added (4 bytes a float, each float of the buffer
    added ``passes`` times per launch)."""
    return 4 * floats * passes * launches


def tma_reduce_tensor_map_fields(rows: int) -> dict:
    """``cuTensorMapEncodeTiled`` arguments of a 2-D (rows x 128) fp32 tensor written by TMA reductions in boxes of
    64 rows x 32 floats, 128-byte swizzle: flash3_bwd's dQaccum map (``dq_tensor_map_fields``, d = 128) with the
    batch-head dimension dropped."""
    from . import flash3_bwd as FB

    f = dict(FB.dq_tensor_map_fields(1, rows, TMA_COLS, TMA_BOX_ROWS))
    f.update({"rank": 2, "global_dim": f["global_dim"][:2], "global_strides_bytes": f["global_strides_bytes"][:1],
              "box_dim": f["box_dim"][:2], "element_strides": f["element_strides"][:2]})
    assert f["box_bytes"] == TMA_BOX_BYTES and f["box_dim"] == (TMA_BOX_COLS, TMA_BOX_ROWS)
    return f


def tma_smem_bytes(warpgroups: int) -> int:
    return warpgroups * TMA_TILE_BYTES + 1024


def reduction_benchmarks(dev: dict, log=print, l2_passes: int = 200, reps: int = 10, dram_reps: int = 5) -> dict:
    """Throughput of fp32 reductions into global memory (``gpu/reduce_bench.cu``): red.global.add.f32 / .v2 / .v4
    from every thread (coalesced) and TMA cp.reduce.async.bulk.tensor.2d .add (one thread per warpgroup), into an
    L2-resident buffer (~1/4 of L2, ``l2_passes`` sweeps a launch) and a 4 GiB one (one sweep). Bytes = the fp32
    data added. Every timed buffer and a small odd-sized one are checked afterwards (each float == adds x value);
    a wrong sum raises RuntimeError. Returns ``{REDUCTION_KEY: {...}}``."""
    import numpy as np
    import cupy as cp
    from . import flash3 as F3

    sm, l2 = dev["sm_count"], dev["l2_bytes"]
    defs = {"DEPTH": TMA_DEPTH}
    kern = {name: F3.compile_kernel(defs, REDUCTION_SOURCE, name) for name in (*RED_FORMS, TMA_KEY)}
    compiled = {name: F3.COMPILE_LOG.get(f"{name} {dict(sorted(defs.items()))}") for name in kern}
    kern[TMA_KEY].max_dynamic_shared_size_bytes = tma_smem_bytes(max(w for _, w in TMA_ISSUERS_PER_SM.values()))
    problems: list[str] = []

    def check(buf, expect: float, what: str, nvalid: int | None = None):
        a = buf.reshape(-1)
        head = a if nvalid is None else a[:nvalid]
        bad = int(cp.count_nonzero(head != cp.float32(expect)).get())
        if bad:
            i = int(cp.argmax(head != cp.float32(expect)).get())
            problems.append(f"{what}: {bad} of {head.size} floats != {expect} (e.g. [{i}] = {float(head[i].get())})")
        if nvalid is not None and a.size > nvalid and int(cp.count_nonzero(a[nvalid:]).get()):
            problems.append(f"{what}: floats beyond the range were changed")

    def timed(fn, buf, expect_per_launch: float, what: str, reps_: int, warm: int):
        buf.fill(0)
        n = [0]

        def one():
            fn()
            n[0] += 1
        t = _time(one, reps=reps_, warm=warm)
        cp.cuda.runtime.deviceSynchronize()
        check(buf, expect_per_launch * n[0], what)
        return t

    # red.global.add.{f32, v2, v4}
    red_grid = sm * RED_CTAS_PER_SM
    nth = red_grid * RED_THREADS
    l2_floats = red_buffer_floats(l2 // 4, nth)
    dram_floats = REDUCTION_DRAM_BYTES // 4
    big = cp.empty(dram_floats, dtype=cp.float32)
    small_n = 1_000_003                       # not a multiple of the grid: the sweep's tail is checked too
    small = cp.empty(small_n + 4096, dtype=cp.float32)
    out: dict = {}
    for name, v in RED_FORMS.items():
        k = kern[name]
        small.fill(0)
        k((red_grid,), (RED_THREADS,), (small, np.int64(small_n // v), np.int32(3), np.float32(0.5)))
        cp.cuda.runtime.deviceSynchronize()
        check(small, 1.5, f"{name} small buffer", nvalid=small_n // v * v)
        l2buf = big[:l2_floats]
        t_l2 = timed(lambda: k((red_grid,), (RED_THREADS,), (l2buf, np.int64(l2_floats // v), np.int32(l2_passes),
                                                              np.float32(1.0))),
                     l2buf, float(l2_passes), f"{name} L2-resident buffer", reps, 2)
        t_dr = timed(lambda: k((red_grid,), (RED_THREADS,), (big, np.int64(dram_floats // v), np.int32(1),
                                                              np.float32(1.0))),
                     big, 1.0, f"{name} 4 GiB buffer", dram_reps, 1)
        b_l2, b_dr = reduction_bytes(l2_floats, l2_passes), reduction_bytes(dram_floats, 1)
        out[name] = {
            "bytes_per_s": {"l2_resident": b_l2 / t_l2["median"], "dram": b_dr / t_dr["median"]},
            "l2_resident": {"buffer_bytes": 4 * l2_floats, "passes": l2_passes, "bytes_added": b_l2, "time_s": t_l2},
            "dram": {"buffer_bytes": 4 * dram_floats, "passes": 1, "bytes_added": b_dr, "time_s": t_dr},
            "grid": red_grid, "threads": RED_THREADS, "bytes_per_instruction": 4 * v,
            "warp_bytes_contiguous": 32 * 4 * v, "compile": compiled[name],
            "method": f"red.global.add{'' if v == 1 else f'.v{v}'}.f32 of 1.0f from every thread, consecutive threads "
                      f"to consecutive {4 * v}-byte vectors (a warp: {128 * v} contiguous bytes), grid-stride sweeps "
                      "over the buffer (l2_resident: ~1/4 of L2, `passes` sweeps a launch; dram: 4 GiB, one sweep); "
                      "bytes_per_s = fp32 bytes added / CUDA-event time (median); every float checked == adds x 1.0"}
        log(f"  {name:12s} L2 {out[name]['bytes_per_s']['l2_resident'] / 1e12:.3f} TB/s, "
            f"4 GiB {out[name]['bytes_per_s']['dram'] / 1e12:.3f} TB/s")

    # TMA cp.reduce.async.bulk.tensor.2d .add (one issuing thread per warpgroup)
    kt = kern[TMA_KEY]
    totals = [sm * c * w for c, w in TMA_ISSUERS_PER_SM.values()]
    nbox = tma_buffer_boxes(l2 // 4, totals)
    l2_rows = nbox // 4 * TMA_BOX_ROWS
    dram_rows = REDUCTION_DRAM_BYTES // (4 * TMA_COLS)
    dram_nbox = dram_rows // TMA_BOX_ROWS * 4
    map_l2 = F3.encode_tensor_map(big.data.ptr, tma_reduce_tensor_map_fields(l2_rows))
    map_dr = F3.encode_tensor_map(big.data.ptr, tma_reduce_tensor_map_fields(dram_rows))
    small_rows = 5 * TMA_BOX_ROWS             # 20 boxes: fewer than the issuing threads
    map_small = F3.encode_tensor_map(small.data.ptr, tma_reduce_tensor_map_fields(small_rows))

    def tma_launch(tmap, nb, passes, ctas_per_sm=TMA_CTAS_PER_SM, wgs=TMA_WARPGROUPS):
        kt((sm * ctas_per_sm,), (128 * wgs,), (tmap, np.int64(nb), np.int32(passes)), shared_mem=tma_smem_bytes(wgs))

    small.fill(0)
    tma_launch(map_small, small_rows // TMA_BOX_ROWS * 4, 3)
    cp.cuda.runtime.deviceSynchronize()
    check(small, 3.0, f"{TMA_KEY} small tensor", nvalid=small_rows * TMA_COLS)
    l2buf = big[:l2_rows * TMA_COLS]
    by_issuers, times_by_issuers = {}, {}
    b_l2 = reduction_bytes(l2_rows * TMA_COLS, l2_passes)
    for ips, (c, w) in TMA_ISSUERS_PER_SM.items():
        t = timed(lambda: tma_launch(map_l2, nbox, l2_passes, c, w), l2buf, float(l2_passes),
                  f"{TMA_KEY} L2-resident tensor, {ips} issuers/SM", reps, 2)
        by_issuers[str(ips)] = b_l2 / t["median"]
        times_by_issuers[str(ips)] = t
    main_ips = str(TMA_CTAS_PER_SM * TMA_WARPGROUPS)
    t_dr = timed(lambda: tma_launch(map_dr, dram_nbox, 1), big, 1.0, f"{TMA_KEY} 4 GiB tensor", dram_reps, 1)
    b_dr = reduction_bytes(dram_rows * TMA_COLS, 1)
    out[TMA_KEY] = {
        "bytes_per_s": {"l2_resident": by_issuers[main_ips], "dram": b_dr / t_dr["median"]},
        "l2_resident_bytes_per_s_by_issuers_per_sm": by_issuers,
        "l2_resident": {"buffer_bytes": 4 * l2_rows * TMA_COLS, "rows": l2_rows, "boxes": nbox, "passes": l2_passes,
                        "bytes_added": b_l2, "time_s": times_by_issuers[main_ips],
                        "time_s_by_issuers_per_sm": times_by_issuers},
        "dram": {"buffer_bytes": 4 * dram_rows * TMA_COLS, "rows": dram_rows, "boxes": dram_nbox, "passes": 1,
                 "bytes_added": b_dr, "time_s": t_dr},
        "grid": sm * TMA_CTAS_PER_SM, "threads": 128 * TMA_WARPGROUPS, "issuers_per_sm": int(main_ips),
        "issuers_per_sm_configs": {str(i): {"ctas_per_sm": c, "warpgroups": w} for i, (c, w) in TMA_ISSUERS_PER_SM.items()},
        "box": {"rows": TMA_BOX_ROWS, "floats": TMA_BOX_COLS, "bytes": TMA_BOX_BYTES, "swizzle": "128B"},
        "groups_in_flight": TMA_DEPTH, "smem_bytes_per_cta": tma_smem_bytes(TMA_WARPGROUPS), "compile": compiled[TMA_KEY],
        "method": "cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group, fp32 boxes of 64 rows x 32 "
                  "floats (128-byte swizzle; the tensor map of flash3_bwd's dQaccum at d = 128, 2-D) from a 64 x 64-float "
                  "shared-memory tile of 1.0f per warpgroup, issued by one thread per warpgroup (commit_group after "
                  f"each box, wait_group.read {TMA_DEPTH}), grid-stride sweeps over a (rows x 128) fp32 tensor "
                  "(l2_resident: ~1/4 of L2, `passes` sweeps a launch; dram: 4 GiB, one sweep); bytes_per_s = fp32 "
                  "bytes added / CUDA-event time (median); every float checked == adds x 1.0"}
    log(f"  {TMA_KEY:12s} L2 {out[TMA_KEY]['bytes_per_s']['l2_resident'] / 1e12:.3f} TB/s "
        f"(by issuers/SM: {', '.join(f'{i}: {r / 1e12:.2f}' for i, r in by_issuers.items())}), "
        f"4 GiB {out[TMA_KEY]['bytes_per_s']['dram'] / 1e12:.3f} TB/s")
    del big, small
    if problems:
        raise RuntimeError("reduction benchmark check failed:\n  " + "\n  ".join(problems))
    return {REDUCTION_KEY: dict(out, checked=True, method_note=(
        "an fp32 reduction is a read-modify-write done at the L2; bytes counted = the fp32 data added (4 bytes a "
        "float), not the DRAM or L2 traffic it causes"))}


def reduction_summary_lines(r: dict) -> list[str]:
    """Lines of the reduction rates beside l2_read and d2d_copy (those present)."""
    out = []
    red = r.get(REDUCTION_KEY)
    if not red:
        return out
    for k in (*RED_FORMS, TMA_KEY):
        if k in red:
            b = red[k]["bytes_per_s"]
            out.append(f"{k:17s} L2-resident {b['l2_resident'] / 1e12:.3f} TB/s, 4 GiB {b['dram'] / 1e12:.3f} TB/s")
    for k in ("l2_read", "d2d_copy"):
        if k in r:
            out.append(f"({k:15s} {r[k]['bytes_per_s'] / 1e12:.3f} TB/s)")
    return out


def merge_calibration(old: dict, new: dict) -> dict:
    """``old`` with the result keys of ``new`` that it lacks added. Existing results keep their values (the
    h100-measured preset is generated from them); ``new``'s values of those are appended to the list
    ``reruns_of_existing_results``, with ``new``'s date and device (earlier reruns stay in it)."""
    for d, w in ((old, "old"), (new, "new")):
        if d.get("schema") != "iosim-gpu-calibration/1":
            raise ValueError(f"{w} document is not iosim-gpu-calibration/1")
    doc = copy.deepcopy(old)
    added = [k for k in new["results"] if k not in old["results"]]
    for k in added:
        doc["results"][k] = copy.deepcopy(new["results"][k])
    prev = doc["settings"].get("added_results", [])
    doc["settings"]["added_results"] = [a for a in prev if not set(a.get("keys", ())) & set(added)] + [
        {"keys": added, "date": new["date"], "device": new["device"], "settings": new.get("settings", {})}]
    reruns = doc.setdefault("reruns_of_existing_results", [])
    rerun = {k: copy.deepcopy(v) for k, v in new["results"].items() if k in old["results"]}
    if rerun:
        reruns.append({"date": new["date"], "device_name": new["device"].get("name"),
                       "note": "a later run's values of results kept above (not used by the preset)",
                       "results": rerun})
    return doc


def calibrate(quick: bool = False, rates: bool = True, latencies: bool = True, wgmma: bool = False,
              reductions: bool = False) -> dict:
    """Run the microbenchmarks: ``rates`` the bandwidth / throughput / launch ones, ``latencies`` the latency
    and Little's-law ones (``latency_benchmarks``), ``reductions`` the fp32 reduction ones (``reduction_benchmarks``)."""
    from . import bench as BN

    dev = BN.device_info()
    res: dict = {}
    settings: dict = {"nvrtc_options": ["-std=c++17"], "timer": "CUDA events, median of repeats after warm-up",
                      "rates": rates, "latencies": latencies}
    t0 = time.monotonic()
    if rates:
        _rate_benchmarks(dev, res)
        settings["rates_elapsed_s"] = time.monotonic() - t0
    if latencies:
        t1 = time.monotonic()
        res.update(latency_benchmarks(dev))
        settings["latencies_elapsed_s"] = time.monotonic() - t1
        settings["latency_timer"] = "clock64() inside the kernels (SM cycles), converted with results.sm_clock.hz"
    if wgmma:
        res.update(wgmma_benchmarks(dev))
        settings["wgmma"] = True
    if reductions:
        t1 = time.monotonic()
        res.update(reduction_benchmarks(dev))
        settings["reductions"] = True
        settings["reductions_elapsed_s"] = time.monotonic() - t1
    settings["quick"] = quick
    return {"schema": "iosim-gpu-calibration/1", "date": BN.now_iso(), "device": dev, "settings": settings,
            "results": res}


def _rate_benchmarks(dev: dict, res: dict) -> None:
    import numpy as np
    import cupy as cp
    from . import kernels as KR

    sm = dev["sm_count"]
    mod = cp.RawModule(code=_SRC, options=("-std=c++17",))

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


def rate_summary_lines(r: dict) -> list[str]:
    out = []
    if "d2d_copy" not in r:
        return out
    out.append(f"D2D copy          {r['d2d_copy']['bytes_per_s']/1e12:.3f} TB/s")
    out.append(f"L2 read           {r['l2_read']['bytes_per_s']/1e12:.3f} TB/s")
    out.append(f"smem read         {r['smem_read']['bytes_per_s']/1e12:.3f} TB/s")
    out.append(f"cupy.matmul 8192  {r['matmul_fp16_2d_cupy']['flops_per_s']/1e12:.1f} TFLOP/s")
    out.append(f"cuBLAS sb 8192    {r['matmul_fp16_cublas_strided_batched_8192']['flops_per_s']/1e12:.1f} TFLOP/s")
    a = r["matmul_fp16_cublas_attention_shapes"]
    out.append(f"cuBLAS qk / pv    {a['qk_flops_per_s']/1e12:.1f} / {a['pv_flops_per_s']/1e12:.1f} TFLOP/s")
    out.append(f"mma.sync f16/f32  {r['mma_sync_fp16_f32']['flops_per_s']/1e12:.1f} TFLOP/s")
    out.append("mma.sync by warps " + ", ".join(f"{w}: {f/1e12:.0f}" for w, f in
                                                r['mma_sync_by_resident_warps']['flops_per_s'].items()))
    out.append(f"fp32 FMA          {r['fp32_fma']['flops_per_s']/1e12:.1f} TFLOP/s")
    out.append(f"ex2 / expf        {r['exp2_approx']['exp_per_s']/1e12:.3f} / {r['expf']['exp_per_s']/1e12:.3f} T/s")
    lo = r["launch_overhead"]
    out.append(f"launch            {lo['per_launch_back_to_back_events_s']*1e6:.2f} us/launch (events), "
               f"{lo['per_launch_host_wall_s']*1e6:.2f} us (host), gap "
               f"{lo['single_empty_kernel_event_gap_s']['median']*1e6:.2f} us")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gpu.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/data/h100/calibration.json")
    ap.add_argument("--only", choices=["rates", "latencies", "wgmma"], default=None,
                    help="run one group of microbenchmarks only (default: rates and latencies; wgmma: the "
                         "Hopper warpgroup MMA only)")
    ap.add_argument("--merge-from", default=None, metavar="NEW.json",
                    help="measure nothing: add the result keys of NEW.json that --out lacks to --out")
    ap.add_argument("--reductions", action="store_true",
                    help=f"run only the fp32 reduction microbenchmarks (results[{REDUCTION_KEY!r}]) and merge them "
                         "into --out (merge_calibration: existing results kept); --out is created if missing")
    ap.add_argument("--raw-out", default=None, metavar="NEW.json",
                    help="with --reductions: also write the new measurements alone (before the merge) here")
    return ap


def merge_into_file(out: str, new: dict) -> dict:
    """``new`` merged into the calibration document at ``out`` (``merge_calibration``), or ``new`` itself if ``out``
    does not exist; written atomically to ``out``. Returns the document written."""
    import os

    if os.path.exists(out):
        with open(out) as f:
            doc = merge_calibration(json.load(f), new)
    else:
        doc = new
    S.write_json_atomic(out, doc)
    return doc


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.reductions and (args.only or args.merge_from):
        ap.error("--reductions runs alone: not with --only or --merge-from")
    if args.raw_out and not args.reductions:
        ap.error("--raw-out goes with --reductions")
    if args.reductions:
        new = calibrate(rates=False, latencies=False, reductions=True)
        if args.raw_out:
            S.write_json_atomic(args.raw_out, new)
        doc = merge_into_file(args.out, new)
        print(f"device {new['device']['name']}; merged {sorted(new['results'])} into {args.out}")
        for line in reduction_summary_lines(dict(doc["results"], **new["results"])):
            print(line)
        return 0
    if args.merge_from:
        with open(args.merge_from) as f:
            new = json.load(f)
        with open(args.out) as f:
            old = json.load(f)
        doc = merge_calibration(old, new)
        S.write_json_atomic(args.out, doc)
        print(f"added {doc['settings']['added_results'][-1]['keys']} to {args.out}")
        return 0
    doc = calibrate(rates=args.only in (None, "rates"), latencies=args.only in (None, "latencies"),
                    wgmma=args.only == "wgmma")
    S.write_json_atomic(args.out, doc)
    r = doc["results"]
    print(f"device {doc['device']['name']}; wrote {args.out}")
    for line in rate_summary_lines(r) + summary_lines(r):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
