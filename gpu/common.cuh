// iosim gpu/common.cuh -- small PTX helpers shared by the attention kernels.
// No system headers: this file is compiled by NVRTC (through CuPy) and by nvcc for resource reports.
#pragma once

typedef unsigned short h16;       // raw IEEE half bits
typedef unsigned int u32;

__device__ __forceinline__ uint4 mk_u4(u32 a, u32 b, u32 c, u32 d) { uint4 v; v.x = a; v.y = b; v.z = c; v.w = d; return v; }
__device__ __forceinline__ float2 mk_f2(float a, float b) { float2 v; v.x = a; v.y = b; return v; }

#define NEG_INF_F __int_as_float(0xff800000)
#define H16_NEG_INF ((h16)0xFC00)

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 r;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// 16-byte global->shared async copy; src_bytes == 0 zero-fills the destination.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

__device__ __forceinline__ void ldsm_x4(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

// D = A*B + D; A 16x16 f16 (row), B 16x8 f16 (col), D 16x8 f32.
__device__ __forceinline__ void mma16816(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// pack two floats into f16x2: low half = lo, high half = hi
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float h2f(h16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ h16 f2h(float f) {
    h16 h;
    asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float fast_log2(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Swizzled (XOR) offset, in halves, of 16-byte chunk `c` of row `r` in a tile whose rows hold D halves.
template <int D>
__device__ __forceinline__ int swz(int r, int c) {
    return r * D + ((c ^ (r & 7)) << 3);
}

// Load rows [row0, row0+R) of a (nrows x D) fp16 matrix into a swizzled R x D shared tile with cp.async.
// Rows >= nrows are zero-filled. All THREADS threads of the caller participate.
template <int R, int D, int THREADS>
__device__ __forceinline__ void load_tile_async(h16* tile, const h16* __restrict__ g, int row0, int nrows, int tid) {
    constexpr int CPR = D / 8;
    constexpr int CHUNKS = R * CPR;
    const u32 base = smem_addr(tile);
#pragma unroll
    for (int it = 0; it < (CHUNKS + THREADS - 1) / THREADS; ++it) {
        const int idx = tid + it * THREADS;
        if ((CHUNKS % THREADS == 0) || idx < CHUNKS) {
            const int r = idx / CPR, c = idx % CPR;
            const int gr = row0 + r;
            const bool ok = gr < nrows;
            const h16* src = g + (size_t)(ok ? gr : 0) * D + c * 8;
            cp_async16(base + swz<D>(r, c) * 2, src, ok ? 16 : 0);
        }
    }
}
