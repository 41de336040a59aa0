// iosim gpu/softmax.cu -- the memory-bound kernels of the unfused attention pipelines.
//
// softmax            : P = softmax(S) row-wise, optional causal mask applied inside (standard, hf)
// scale_mask_softmax : P = softmax(mask(scale * S)) in one pass (Megatron-LM's fused kernel)
// scale              : S' = scale * S, elementwise (HuggingFace's separate op)
// mask               : S'' = S' with -inf above the diagonal (col > row), elementwise (HuggingFace)
//
// S and P are fp16 (B*H*N rows of N). Row kernels: TPR threads per row (a power of two, >= 32), each
// holding up to MAXV 16-byte vectors (8 halves) of its row in registers, so S is read once and P written
// once. A CTA holds max(TPR, 256) threads = rows_per_cta rows ("row block"). Rows whose length is not a
// multiple of 8 (unaligned rows) take a scalar path with the same structure.
#include "common.cuh"

template <bool VEC, int MAXV>
__device__ __forceinline__ void row_softmax_impl(const h16* __restrict__ S, h16* __restrict__ P,
                                                 long long nrows, int N, int tpr, float scale, int causal)
{
    __shared__ float red_max[32];
    __shared__ float red_sum[32];
    const int tid = threadIdx.x;
    const int rows_per_cta = blockDim.x / tpr;
    const int rloc = tid / tpr;            // row within the CTA
    const int t = tid % tpr;               // thread within the row
    const long long row = (long long)blockIdx.x * rows_per_cta + rloc;
    const bool valid = row < nrows;
    const int qrow = valid ? (int)(row % N) : 0;   // query index inside its (b,h) slice
    const int lim = causal ? min(N, qrow + 1) : N; // columns >= lim are masked
    const h16* s = S + (valid ? row : 0) * (long long)N;
    h16* p = P + (valid ? row : 0) * (long long)N;

    float x[MAXV][8];
    float mx = NEG_INF_F;
    if (VEC) {
        const int nvec = N >> 3;
#pragma unroll
        for (int v = 0; v < MAXV; ++v) {
            const int vi = t + v * tpr;
            uint4 raw = mk_u4(0xFC00FC00u, 0xFC00FC00u, 0xFC00FC00u, 0xFC00FC00u);
            if (valid && vi < nvec) raw = *reinterpret_cast<const uint4*>(s + vi * 8);
            const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int col = vi * 8 + e;
                float f = h2f((h16)((e & 1) ? (w[e >> 1] >> 16) : (w[e >> 1] & 0xffffu))) * scale;
                if (col >= lim) f = NEG_INF_F;
                x[v][e] = f;
                mx = fmaxf(mx, f);
            }
        }
    } else {
#pragma unroll
        for (int v = 0; v < MAXV; ++v) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int col = (v * tpr + t) * 8 + e;
                float f = NEG_INF_F;
                if (valid && col < lim) f = h2f(s[col]) * scale;
                x[v][e] = f;
                mx = fmaxf(mx, f);
            }
        }
    }
    // row max: warp, then across the row's warps
    const int wpr = tpr >> 5;
    const int warp = tid >> 5, lane = tid & 31;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (wpr > 1) {
        if (lane == 0) red_max[warp] = mx;
        __syncthreads();
        mx = NEG_INF_F;
        for (int w = 0; w < wpr; ++w) mx = fmaxf(mx, red_max[rloc * wpr + w]);
    }
    const float mz = (mx == NEG_INF_F) ? 0.f : mx;
    const float L2E = 1.4426950408889634f;
    const float mzl = mz * L2E;
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < MAXV; ++v) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float ev = fast_exp2(fmaf(x[v][e], L2E, -mzl));
            x[v][e] = ev;
            sum += ev;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (wpr > 1) {
        if (lane == 0) red_sum[warp] = sum;
        __syncthreads();
        sum = 0.f;
        for (int w = 0; w < wpr; ++w) sum += red_sum[rloc * wpr + w];
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    if (!valid) return;
    if (VEC) {
        const int nvec = N >> 3;
#pragma unroll
        for (int v = 0; v < MAXV; ++v) {
            const int vi = t + v * tpr;
            if (vi < nvec) {
                uint4 o;
                o.x = pack_h2(x[v][0] * inv, x[v][1] * inv);
                o.y = pack_h2(x[v][2] * inv, x[v][3] * inv);
                o.z = pack_h2(x[v][4] * inv, x[v][5] * inv);
                o.w = pack_h2(x[v][6] * inv, x[v][7] * inv);
                *reinterpret_cast<uint4*>(p + vi * 8) = o;
            }
        }
    } else {
#pragma unroll
        for (int v = 0; v < MAXV; ++v) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int col = (v * tpr + t) * 8 + e;
                if (col < N) p[col] = f2h(x[v][e] * inv);
            }
        }
    }
}

template <bool VEC>
__device__ __forceinline__ void row_softmax_dispatch(const h16* __restrict__ S, h16* __restrict__ P,
                                                     long long nrows, int N, int tpr, int vpt, float scale, int causal)
{
    switch (vpt) {
        case 1: row_softmax_impl<VEC, 1>(S, P, nrows, N, tpr, scale, causal); break;
        case 2: row_softmax_impl<VEC, 2>(S, P, nrows, N, tpr, scale, causal); break;
        case 4: row_softmax_impl<VEC, 4>(S, P, nrows, N, tpr, scale, causal); break;
        default: row_softmax_impl<VEC, 8>(S, P, nrows, N, tpr, scale, causal); break;
    }
}

// P = softmax(S) (S already scaled); causal mask applied inside when causal != 0.
// tpr threads per row, vpt (1, 2, 4 or 8) 16-byte vectors per thread, tpr * vpt * 8 >= N.
extern "C" __global__ void __launch_bounds__(512)
softmax(const h16* __restrict__ S, h16* __restrict__ P, long long nrows, int N, int tpr, int vpt, int causal)
{
    if ((N & 7) == 0) row_softmax_dispatch<true>(S, P, nrows, N, tpr, vpt, 1.0f, causal);
    else row_softmax_dispatch<false>(S, P, nrows, N, tpr, vpt, 1.0f, causal);
}

// P = softmax(mask(scale * S)) -- Megatron's fused scale-mask-softmax.
extern "C" __global__ void __launch_bounds__(512)
scale_mask_softmax(const h16* __restrict__ S, h16* __restrict__ P, long long nrows, int N, int tpr, int vpt,
                   float scale, int causal)
{
    if ((N & 7) == 0) row_softmax_dispatch<true>(S, P, nrows, N, tpr, vpt, scale, causal);
    else row_softmax_dispatch<false>(S, P, nrows, N, tpr, vpt, scale, causal);
}

// S' = scale * S (elementwise, fp16 out). n = number of elements.
extern "C" __global__ void __launch_bounds__(256)
scale(const h16* __restrict__ S, h16* __restrict__ Sp, long long n, float scale)
{
    const long long nvec = n >> 3;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < nvec; i += stride) {
        const uint4 r = reinterpret_cast<const uint4*>(S)[i];
        const u32 w[4] = {r.x, r.y, r.z, r.w};
        u32 o[4];
#pragma unroll
        for (int k = 0; k < 4; ++k)
            o[k] = pack_h2(h2f((h16)(w[k] & 0xffffu)) * scale, h2f((h16)(w[k] >> 16)) * scale);
        reinterpret_cast<uint4*>(Sp)[i] = mk_u4(o[0], o[1], o[2], o[3]);
    }
    // tail (n not a multiple of 8)
    for (long long i = nvec * 8 + (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        Sp[i] = f2h(h2f(S[i]) * scale);
}

// S'' = S' where col <= row, -inf elsewhere (causal mask). Elements are (B*H, N, N) row-major.
extern "C" __global__ void __launch_bounds__(256)
mask(const h16* __restrict__ S, h16* __restrict__ Sm, long long n, int N)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    if ((N & 7) == 0) {
        const long long nvec = n >> 3;
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < nvec; i += stride) {
            const long long e0 = i * 8;
            const int col0 = (int)(e0 % N);
            const int row = (int)((e0 / N) % N);
            uint4 r = reinterpret_cast<const uint4*>(S)[i];
            u32 w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                if (col0 + 2 * k > row) w[k] = (w[k] & 0xffff0000u) | H16_NEG_INF;
                if (col0 + 2 * k + 1 > row) w[k] = (w[k] & 0x0000ffffu) | ((u32)H16_NEG_INF << 16);
            }
            reinterpret_cast<uint4*>(Sm)[i] = mk_u4(w[0], w[1], w[2], w[3]);
        }
    } else {
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
            const int col = (int)(i % N);
            const int row = (int)((i / N) % N);
            Sm[i] = (col > row) ? H16_NEG_INF : S[i];
        }
    }
}

// An empty kernel whose grid size tags a segment of launches (used to attribute ncu rows).
extern "C" __global__ void iosim_marker(int tag) { }

// ---------------------------------------------------------------------------------------------------------
// softmax_backward: dS = P o (dP - D), D = rowsum(P o dP), per row of N (backward of the standard pipeline).
// P (saved by the forward pass) and dP are read once, dS written once; fp16 in/out, fp32 math. Same launch
// shape as softmax (tpr threads per row, vpt 16-byte vectors of each operand per thread). The causal mask
// needs nothing here: P is 0 where the forward masked, so dS is too.
template <bool VEC, int MAXV>
__device__ __forceinline__ void row_softmax_bwd_impl(const h16* __restrict__ P, const h16* __restrict__ dP,
                                                     h16* __restrict__ dS, long long nrows, int N, int tpr)
{
    __shared__ float red_sum[32];
    const int tid = threadIdx.x;
    const int rows_per_cta = blockDim.x / tpr;
    const int rloc = tid / tpr;
    const int t = tid % tpr;
    const long long row = (long long)blockIdx.x * rows_per_cta + rloc;
    const bool valid = row < nrows;
    const long long off = (valid ? row : 0) * (long long)N;
    float p[MAXV][8], g[MAXV][8];
    float dsum = 0.f;
#pragma unroll
    for (int v = 0; v < MAXV; ++v) {
        if (VEC) {
            const int vi = t + v * tpr;
            uint4 rp = mk_u4(0u, 0u, 0u, 0u), rg = mk_u4(0u, 0u, 0u, 0u);
            if (valid && vi < (N >> 3)) {
                rp = *reinterpret_cast<const uint4*>(P + off + vi * 8);
                rg = *reinterpret_cast<const uint4*>(dP + off + vi * 8);
            }
            const u32 wp[4] = {rp.x, rp.y, rp.z, rp.w};
            const u32 wg[4] = {rg.x, rg.y, rg.z, rg.w};
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                p[v][e] = h2f((h16)((e & 1) ? (wp[e >> 1] >> 16) : (wp[e >> 1] & 0xffffu)));
                g[v][e] = h2f((h16)((e & 1) ? (wg[e >> 1] >> 16) : (wg[e >> 1] & 0xffffu)));
                dsum = fmaf(p[v][e], g[v][e], dsum);
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int col = (v * tpr + t) * 8 + e;
                p[v][e] = 0.f; g[v][e] = 0.f;
                if (valid && col < N) { p[v][e] = h2f(P[off + col]); g[v][e] = h2f(dP[off + col]); }
                dsum = fmaf(p[v][e], g[v][e], dsum);
            }
        }
    }
    const int wpr = tpr >> 5;
    const int warp = tid >> 5, lane = tid & 31;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dsum += __shfl_xor_sync(0xffffffffu, dsum, o);
    if (wpr > 1) {
        if (lane == 0) red_sum[warp] = dsum;
        __syncthreads();
        dsum = 0.f;
        for (int w = 0; w < wpr; ++w) dsum += red_sum[rloc * wpr + w];
    }
    if (!valid) return;
#pragma unroll
    for (int v = 0; v < MAXV; ++v) {
        if (VEC) {
            const int vi = t + v * tpr;
            if (vi < (N >> 3)) {
                uint4 o;
                o.x = pack_h2(p[v][0] * (g[v][0] - dsum), p[v][1] * (g[v][1] - dsum));
                o.y = pack_h2(p[v][2] * (g[v][2] - dsum), p[v][3] * (g[v][3] - dsum));
                o.z = pack_h2(p[v][4] * (g[v][4] - dsum), p[v][5] * (g[v][5] - dsum));
                o.w = pack_h2(p[v][6] * (g[v][6] - dsum), p[v][7] * (g[v][7] - dsum));
                *reinterpret_cast<uint4*>(dS + off + vi * 8) = o;
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int col = (v * tpr + t) * 8 + e;
                if (col < N) dS[off + col] = f2h(p[v][e] * (g[v][e] - dsum));
            }
        }
    }
}

template <bool VEC>
__device__ __forceinline__ void row_softmax_bwd_dispatch(const h16* __restrict__ P, const h16* __restrict__ dP,
                                                         h16* __restrict__ dS, long long nrows, int N, int tpr, int vpt)
{
    switch (vpt) {
        case 1: row_softmax_bwd_impl<VEC, 1>(P, dP, dS, nrows, N, tpr); break;
        case 2: row_softmax_bwd_impl<VEC, 2>(P, dP, dS, nrows, N, tpr); break;
        case 4: row_softmax_bwd_impl<VEC, 4>(P, dP, dS, nrows, N, tpr); break;
        default: row_softmax_bwd_impl<VEC, 8>(P, dP, dS, nrows, N, tpr); break;
    }
}

extern "C" __global__ void __launch_bounds__(512)
softmax_backward(const h16* __restrict__ P, const h16* __restrict__ dP, h16* __restrict__ dS, long long nrows,
                 int N, int tpr, int vpt)
{
    if ((N & 7) == 0) row_softmax_bwd_dispatch<true>(P, dP, dS, nrows, N, tpr, vpt);
    else row_softmax_bwd_dispatch<false>(P, dP, dS, nrows, N, tpr, vpt);
}
