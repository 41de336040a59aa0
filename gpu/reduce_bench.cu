// iosim gpu/reduce_bench.cu -- throughput of fp32 reductions into global memory (the attention backward's dQ
// accumulation), for gpu/calibrate.py's reduction_benchmarks (``python -m gpu.calibrate --reductions``).
//
// red_f32 / red_v2_f32 / red_v4_f32: every thread issues red.global.add{,.v2,.v4}.f32 of `val` (fire and forget:
//   the add is done at the L2), consecutive threads to consecutive vectors (a warp covers 128 / 256 / 512
//   contiguous bytes), a grid-stride sweep over the buffer of nvec vectors, `passes` times: every float of the
//   buffer gets exactly `passes` adds of `val` per launch (checked on the host).
// tma_reduce_f32: every warpgroup fills its shared-memory staging tile (64 rows x 64 floats = 2 boxes of 64 x 32
//   floats, 128-byte swizzle, as flash3_bwd's dQ tile at d = 128; all values 1.0f) once; then one thread of the
//   warpgroup (as flash3_bwd's dQ) issues cp.reduce.async.bulk.tensor.2d .add boxes over a (rows x 128) fp32
//   tensor: box b (column block b % 4, row block b / 4; source box b % 2 of the tile) in a grid-stride sweep over
//   the nbox boxes, `passes` times, one bulk group per box, at most DEPTH groups whose shared-memory reads are
//   pending. Every float gets exactly `passes` adds per launch.
// Compiled by NVRTC for sm_90a (flash3.compile_kernel); nvcc -arch=sm_90a -cubin -I gpu checks it here.
#include "common.cuh"
#include "hopper.cuh"

#ifndef DEPTH                  // tma_reduce_f32: bulk groups in flight per issuing thread (shared-memory reads)
#define DEPTH 8
#endif

template <int V>
__device__ __forceinline__ void red_add(float* p, float v);
template <>
__device__ __forceinline__ void red_add<1>(float* p, float v) {
    asm volatile("red.global.add.f32 [%0], %1;\n" :: "l"(p), "f"(v) : "memory");
}
template <>
__device__ __forceinline__ void red_add<2>(float* p, float v) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %1};\n" :: "l"(p), "f"(v) : "memory");
}
template <>
__device__ __forceinline__ void red_add<4>(float* p, float v) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %1, %1, %1};\n" :: "l"(p), "f"(v) : "memory");
}

template <int V>
__device__ __forceinline__ void red_sweep(float* __restrict__ buf, long long nvec, int passes, float val) {
    const long long nth = (long long)gridDim.x * blockDim.x;
    const long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (int p = 0; p < passes; ++p) {
#pragma unroll 4
        for (long long i = i0; i < nvec; i += nth) red_add<V>(buf + i * V, val);
    }
}
extern "C" __global__ void red_f32(float* buf, long long nvec, int passes, float val) { red_sweep<1>(buf, nvec, passes, val); }
extern "C" __global__ void red_v2_f32(float* buf, long long nvec, int passes, float val) { red_sweep<2>(buf, nvec, passes, val); }
extern "C" __global__ void red_v4_f32(float* buf, long long nvec, int passes, float val) { red_sweep<4>(buf, nvec, passes, val); }

constexpr int TMA_BOX_BYTES = 64 * 32 * 4;       // 64 rows x 32 floats (one 128-byte swizzled box)
constexpr int TMA_TILE_BOXES = 2;                // a staging tile: 64 rows x 64 floats
constexpr int TMA_COL_BOXES = 4;                 // the destination: 128 floats a row
constexpr int TMA_TILE_BYTES = TMA_TILE_BOXES * TMA_BOX_BYTES;

__device__ __forceinline__ void tma_reduce_add_2d(const TmaMap* map, int c0, int c1, u32 src) {
    asm volatile(
        "cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2}], [%3];\n"
        :: "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(src) : "memory");
}

// dynamic shared memory: (blockDim.x / 128) * TMA_TILE_BYTES + 1024 (alignment slack)
extern "C" __global__ void tma_reduce_f32(const __grid_constant__ TmaMap tm, long long nbox, int passes) {
    extern __shared__ __align__(1024) unsigned char dsmem[];
    const u32 base = (smem_addr(dsmem) + 1023u) & ~1023u;
    const int wg = threadIdx.x / 128, t = threadIdx.x % 128;
    const u32 tile = base + wg * TMA_TILE_BYTES;
    const u32 one = 0x3f800000u;                    // 1.0f: every value equal, so the swizzle does not matter
    for (int o = 4 * t; o < TMA_TILE_BYTES; o += 4 * 128) st_shared_u32(tile + o, one);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // generic-proxy writes -> the TMA unit
    named_bar_sync(1 + wg, 128);
    if (t == 0) {
        const long long nwg = (long long)gridDim.x * (blockDim.x / 128);
        const long long b0 = (long long)blockIdx.x * (blockDim.x / 128) + wg;
        for (int p = 0; p < passes; ++p) {
            for (long long b = b0; b < nbox; b += nwg) {
                const int cb = (int)(b % TMA_COL_BOXES);
                tma_reduce_add_2d(&tm, 32 * cb, (int)(64 * (b / TMA_COL_BOXES)), tile + (cb % TMA_TILE_BOXES) * TMA_BOX_BYTES);
                asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
                asm volatile("cp.async.bulk.wait_group.read %0;\n" :: "n"(DEPTH) : "memory");
            }
        }
        asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");   // the adds done before the CTA retires
    }
}
