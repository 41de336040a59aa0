// iosim gpu/flash2_bwd.cu -- FlashAttention-2 backward (Dao 2023, Algorithm 2 of FA2), three kernels named as the
// simulator's iosim.schedules.flash2.build_backward: flash2_bwd_dot, flash2_bwd, flash2_bwd_convert.
//
// Inputs from the flash2 forward: Q, K, V, O, dO (fp16, (B,H,N,D)) and L (fp32, (B,H,N), natural log-sum-exp of
// scale*QK^T). Outputs dQ, dK, dV fp16; all accumulation fp32.
//   flash2_bwd_dot     Dv[row] = rowsum(dO o O) (fp32), dQaccum[row,:] = 0           (one warp per row)
//   flash2_bwd         grid (ceil(N/BC), B*H): one CTA per K/V block of BC rows, NWARPS = BC/16 warps, each owning
//                      16 K/V rows, so dK and dV accumulate per warp in registers. Loop over the Q blocks of BR rows
//                      (causal: from the block holding row kv0): recompute S^T = K Q^T, P^T = exp(scale S^T - L),
//                      dV += P^T dO, dP^T = V dO^T, dS^T = P^T o (dP^T - Dv), dK += dS^T Q; dS^T staged in shared
//                      memory, then each warp computes 16 rows of dQ_partial = dS K and atomicAdds them (fp32).
//                      All five products on mma.sync.m16n8k16 with ldmatrix fragments (.trans for dO, Q, K as the
//                      B operand of a k = rows product, and for dS read from its transposed shared copy).
//                      dK is scaled by `scale` in this kernel's epilogue.
//                      ordered != 0: the K/V-block CTAs of one (b*h) take turns (blockIdx.x order, a counter per
//                      Q block zeroed by flash2_bwd_dot) so the fp32 sums, and dQ, are bitwise reproducible;
//                      ordered == 0: plain unordered atomicAdd (as FA2), dQ may differ in the last bit run to run.
//   flash2_bwd_convert dQ = fp16(scale * dQaccum)
// Simple on purpose (single-buffered tiles, two __syncthreads per Q block); correctness first.
#include "common.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef BR
#define BR 64
#endif
#ifndef BC
#define BC 64
#endif

constexpr int D = HEAD_DIM;
constexpr int NWARPS = BC / 16;
constexpr int THREADS = NWARPS * 32;
constexpr int KD = D / 16;      // k-steps over the head dimension
constexpr int DT = D / 8;       // n-tiles over the head dimension
constexpr int NTQ = BR / 8;     // n-tiles over a Q block (S^T columns)
constexpr int KTQ = BR / 16;    // k-steps over a Q block
constexpr int KTK = BC / 16;    // k-steps over a K/V block
static_assert(BR % 16 == 0 && BC % 16 == 0 && D % 16 == 0, "block sizes");

static_assert(BR / 16 <= NWARPS, "dQ: one warp per 16 Q rows");
static_assert(KD % 2 == 0 && DT % 2 == 0, "pairs");

#define POS_INF_F __int_as_float(0x7f800000)

extern "C" __global__ void __launch_bounds__(128)
flash2_bwd_dot(const h16* __restrict__ O, const h16* __restrict__ dO, float* __restrict__ Dv,
               float* __restrict__ dQacc, int* __restrict__ sem, long long rows, int N)
{
    const long long row = (long long)blockIdx.x * 4 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    {   // zero the per-(b*h, Q block) turn counters of the ordered dQ accumulation
        const int n = (int)(row % N);
        if (lane == 0 && n % BR == 0) sem[(row / N) * ((N + BR - 1) / BR) + n / BR] = 0;
    }
    const h16* o = O + row * D;
    const h16* g = dO + row * D;
    float acc = 0.f;
#pragma unroll
    for (int c = lane; c < D; c += 32) acc += h2f(o[c]) * h2f(g[c]);
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
    if (lane == 0) Dv[row] = acc;
    float* dq = dQacc + row * D;
#pragma unroll
    for (int c = lane; c < D; c += 32) dq[c] = 0.f;
}

extern "C" __global__ void __launch_bounds__(256)
flash2_bwd_convert(const float* __restrict__ dQacc, h16* __restrict__ dQ, long long n, float scale)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dQ[i] = f2h(dQacc[i] * scale);
}

extern "C" __global__ void __launch_bounds__(THREADS)
flash2_bwd(const h16* __restrict__ Q, const h16* __restrict__ K, const h16* __restrict__ V,
           const h16* __restrict__ dO, const float* __restrict__ L, const float* __restrict__ Dv,
           float* __restrict__ dQacc, h16* __restrict__ dK, h16* __restrict__ dV, int* __restrict__ sem,
           int N, float scale, int causal, int ordered)
{
    extern __shared__ __align__(128) unsigned char smem_raw[];
    h16* sQ = reinterpret_cast<h16*>(smem_raw);    // BR x D
    h16* sdO = sQ + BR * D;                          // BR x D
    h16* sK = sdO + BR * D;                          // BC x D
    h16* sV = sK + BC * D;                           // BC x D
    h16* sdS = sV + BC * D;                          // BC x BR  (dS^T, rows = K/V rows)
    float* sL = reinterpret_cast<float*>(sdS + BC * BR);   // BR: L * log2(e) (+inf past N)
    float* sD = sL + BR;                                      // BR: rowsum(dO o O)

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, c4 = lane & 3;
    const int kv0 = blockIdx.x * BC;
    const size_t bh = blockIdx.y;
    const h16* Qb = Q + bh * (size_t)N * D;
    const h16* Kb = K + bh * (size_t)N * D;
    const h16* Vb = V + bh * (size_t)N * D;
    const h16* dOb = dO + bh * (size_t)N * D;
    const float* Lb = L + bh * (size_t)N;
    const float* Db = Dv + bh * (size_t)N;
    float* dQb = dQacc + bh * (size_t)N * D;

    const float sl2 = scale * 1.4426950408889634f;
    const float log2e = 1.4426950408889634f;

    load_tile_async<BC, D, THREADS>(sK, Kb, kv0, N, tid);
    load_tile_async<BC, D, THREADS>(sV, Vb, kv0, N, tid);

    const u32 sQa = smem_addr(sQ), sdOa = smem_addr(sdO), sKa = smem_addr(sK), sVa = smem_addr(sV);
    const u32 sdSa = smem_addr(sdS);
    const int wr0 = warp * 16;                        // this warp's first K/V row (local)
    const int kvr_a = kv0 + wr0 + g, kvr_b = kvr_a + 8;   // global K/V rows of accumulator elements 0,1 / 2,3

    float dk[DT][4], dv[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) { dk[i][e] = 0.f; dv[i][e] = 0.f; }

    const int nqb = (N + BR - 1) / BR;
    const int qb0 = causal ? kv0 / BR : 0;
    for (int qb = qb0; qb < nqb; ++qb) {
        const int q0 = qb * BR;
        load_tile_async<BR, D, THREADS>(sQ, Qb, q0, N, tid);
        load_tile_async<BR, D, THREADS>(sdO, dOb, q0, N, tid);
        cp_async_commit();
        for (int i = tid; i < BR; i += THREADS) {
            const int r = q0 + i;
            sL[i] = (r < N) ? Lb[r] * log2e : POS_INF_F;
            sD[i] = (r < N) ? Db[r] : 0.f;
        }
        cp_async_wait<0>();
        __syncthreads();

        // ---- S^T = K Q^T and dP^T = V dO^T (16 x BR per warp) ----
        float st[NTQ][4], dpt[NTQ][4];
#pragma unroll
        for (int i = 0; i < NTQ; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) { st[i][e] = 0.f; dpt[i][e] = 0.f; }
#pragma unroll
        for (int kk = 0; kk < KD; kk += 2) {
            u32 ka[2][4], va[2][4];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = wr0 + (lane & 7) + ((lane >> 3) & 1) * 8;
                const int c = 2 * (kk + h) + (lane >> 4);
                ldsm_x4(ka[h][0], ka[h][1], ka[h][2], ka[h][3], sKa + swz<D>(r, c) * 2);
                ldsm_x4(va[h][0], va[h][1], va[h][2], va[h][3], sVa + swz<D>(r, c) * 2);
            }
#pragma unroll
            for (int nt = 0; nt < NTQ; ++nt) {
                const int r = nt * 8 + (lane & 7);
                const int c = 2 * kk + (lane >> 3);
                u32 b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3, sQa + swz<D>(r, c) * 2);
                mma16816(st[nt], ka[0], b0, b1);
                mma16816(st[nt], ka[1], b2, b3);
                ldsm_x4(b0, b1, b2, b3, sdOa + swz<D>(r, c) * 2);
                mma16816(dpt[nt], va[0], b0, b1);
                mma16816(dpt[nt], va[1], b2, b3);
            }
        }

        // ---- P^T, dS^T (masked: K/V row past N, causal kv > q; Q rows past N have L = +inf -> P = 0) ----
        u32 pf[KTQ][4], dsf[KTQ][4];
#pragma unroll
        for (int nt = 0; nt < NTQ; ++nt) {
            float p[4], ds[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int ql = nt * 8 + 2 * c4 + (e & 1);
                const int kvr = (e < 2) ? kvr_a : kvr_b;
                float pe = fast_exp2(fmaf(st[nt][e], sl2, -sL[ql]));
                if (kvr >= N || (causal && kvr > q0 + ql)) pe = 0.f;
                p[e] = pe;
                ds[e] = pe * (dpt[nt][e] - sD[ql]);
            }
            pf[nt >> 1][(nt & 1) * 2 + 0] = pack_h2(p[0], p[1]);
            pf[nt >> 1][(nt & 1) * 2 + 1] = pack_h2(p[2], p[3]);
            dsf[nt >> 1][(nt & 1) * 2 + 0] = pack_h2(ds[0], ds[1]);
            dsf[nt >> 1][(nt & 1) * 2 + 1] = pack_h2(ds[2], ds[3]);
            // dS^T to shared memory (rows = K/V rows of this warp, columns = Q rows)
            *reinterpret_cast<u32*>(sdS + swz<BR>(wr0 + g, nt) + 2 * c4) = dsf[nt >> 1][(nt & 1) * 2 + 0];
            *reinterpret_cast<u32*>(sdS + swz<BR>(wr0 + g + 8, nt) + 2 * c4) = dsf[nt >> 1][(nt & 1) * 2 + 1];
        }

        // ---- dV += P^T dO, dK += dS^T Q  (k = the BR rows of the Q block; B operands via ldmatrix.trans) ----
#pragma unroll
        for (int kt = 0; kt < KTQ; ++kt) {
#pragma unroll
            for (int dt = 0; dt < DT; dt += 2) {
                const int r = kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                const int c = dt + (lane >> 4);
                u32 b0, b1, b2, b3;
                ldsm_x4_t(b0, b1, b2, b3, sdOa + swz<D>(r, c) * 2);
                mma16816(dv[dt], pf[kt], b0, b1);
                mma16816(dv[dt + 1], pf[kt], b2, b3);
                ldsm_x4_t(b0, b1, b2, b3, sQa + swz<D>(r, c) * 2);
                mma16816(dk[dt], dsf[kt], b0, b1);
                mma16816(dk[dt + 1], dsf[kt], b2, b3);
            }
        }
        __syncthreads();   // dS^T complete; sQ / sdO no longer read in this iteration

        // ---- dQaccum[q0 + 16w .. +16, :] += dS K  (A = dS from dS^T via ldmatrix.trans, B = K via .trans) ----
        // ordered (deterministic) mode: the K/V blocks add into this Q block's dQ rows in blockIdx.x order
        int* turn = sem + bh * (size_t)nqb + qb;
        if (ordered) {
            if (tid == 0) {
                while (atomicAdd(turn, 0) != (int)blockIdx.x) { __nanosleep(64); }
                __threadfence();
            }
            __syncthreads();
        }
        if (warp < BR / 16) {
            u32 da[KTK][4];
#pragma unroll
            for (int kt = 0; kt < KTK; ++kt) {
                const int mi = lane >> 3;
                const int r = kt * 16 + (lane & 7) + (mi >> 1) * 8;
                const int c = warp * 2 + (mi & 1);
                ldsm_x4_t(da[kt][0], da[kt][1], da[kt][2], da[kt][3], sdSa + swz<BR>(r, c) * 2);
            }
            const int qr_a = q0 + warp * 16 + g, qr_b = qr_a + 8;
#pragma unroll
            for (int dt = 0; dt < DT; dt += 2) {
                float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
                for (int kt = 0; kt < KTK; ++kt) {
                    const int r = kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    const int c = dt + (lane >> 4);
                    u32 b0, b1, b2, b3;
                    ldsm_x4_t(b0, b1, b2, b3, sKa + swz<D>(r, c) * 2);
                    mma16816(acc[0], da[kt], b0, b1);
                    mma16816(acc[1], da[kt], b2, b3);
                }
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int col = (dt + h) * 8 + 2 * c4;
                    if (qr_a < N) {
                        atomicAdd(dQb + (size_t)qr_a * D + col, acc[h][0]);
                        atomicAdd(dQb + (size_t)qr_a * D + col + 1, acc[h][1]);
                    }
                    if (qr_b < N) {
                        atomicAdd(dQb + (size_t)qr_b * D + col, acc[h][2]);
                        atomicAdd(dQb + (size_t)qr_b * D + col + 1, acc[h][3]);
                    }
                }
            }
        }
        if (ordered) __threadfence();
        __syncthreads();   // sdS, sL, sD, sQ, sdO free for the next Q block
        if (ordered && tid == 0) atomicAdd(turn, 1);
    }

    // ---- epilogue: dK (scaled), dV to fp16 ----
    h16* dKb = dK + bh * (size_t)N * D;
    h16* dVb = dV + bh * (size_t)N * D;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
        const int col = dt * 8 + 2 * c4;
        if (kvr_a < N) {
            *reinterpret_cast<u32*>(dKb + (size_t)kvr_a * D + col) = pack_h2(dk[dt][0] * scale, dk[dt][1] * scale);
            *reinterpret_cast<u32*>(dVb + (size_t)kvr_a * D + col) = pack_h2(dv[dt][0], dv[dt][1]);
        }
        if (kvr_b < N) {
            *reinterpret_cast<u32*>(dKb + (size_t)kvr_b * D + col) = pack_h2(dk[dt][2] * scale, dk[dt][3] * scale);
            *reinterpret_cast<u32*>(dVb + (size_t)kvr_b * D + col) = pack_h2(dv[dt][2], dv[dt][3]);
        }
    }
}
