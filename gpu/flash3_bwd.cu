// iosim gpu/flash3_bwd.cu -- FlashAttention backward for Hopper (sm_90a): wgmma, TMA, warp specialisation.
//
// The algorithm of flash2_bwd.cu (FA2's backward): one CTA per K/V block of BC = 128 keys (grid (ceil(N/BC), B*H)),
// a loop over the Q blocks of BR rows (causal: from the block holding key kv0), dK and dV accumulated in registers
// over the whole loop, dQ partials added into the fp32 dQaccum. flash3_bwd_dot (D = rowsum(dO o O), dQaccum = 0) and
// flash3_bwd_convert (dQ = fp16(scale dQaccum)) run before and after (16-byte accesses; the same work as
// flash2_bwd.cu's flash2_bwd_dot / flash2_bwd_convert).
//
// One CTA = 1 producer warpgroup + 2 consumer warpgroups (384 threads). The producer drops to PRODUCER_REGS
// (setmaxnreg.dec); its warp 0 loads K and V once (TMA, 3-D tensor maps over (d, N, B*H), 128-byte swizzled 64-column
// panels; rows >= N arrive as zeros), then per Q block the Q and dO tiles (TMA) and L*log2e, D (ordinary loads by the
// 32 lanes; rows >= N: +inf and 0, so P = 0 there) into a STAGES-deep ring (one "full" mbarrier per slot: 32
// arrivals + the TMA bytes; one "empty" mbarrier: one arrival per consumer thread). Consumer warpgroup w
// (setmaxnreg.inc to CONSUMER_REGS) owns keys [64w, 64w+64) of the block (one wgmma m64 row block) and per Q block
// (PIPE 0, the default):
//     S^T  = K_w Q^T         wgmma m64nBRk16 SS (A = K, B = Q, both K-major)         } issued together,
//     dP^T = V_w dO^T        wgmma m64nBRk16 SS (A = V, B = dO)                       } two commit groups
//     P^T  = exp2(S^T scale log2e - L log2e) (masked: causal kv > q), while dP^T is in flight
//     dV  += P^T dO           wgmma m64nDk16 RS (A = P^T fp16 from the accumulators, B = dO MN-major: tnspB);
//                             DV_EARLY (default at d = 128): issued here, under the dS^T arithmetic
//     dS^T = P^T o (dP^T - D)
//     dK  += dS^T Q           wgmma m64nDk16 RS (A = dS^T, B = Q MN-major)
//     dS^T (fp16) -> shared memory (128-byte swizzled, the layout TMA gives a tile; double-buffered)
//     named barrier over both consumer warpgroups (the whole dS^T tile is in shared memory), then
//     dQ_w = (dS K)_w         wgmma SS with A = dS (MN-major view of dS^T: tnspA) and B = K (MN-major: tnspB);
//                             DQ_SPLIT 0 (BR = 128): warpgroup w takes Q rows [64w, 64w+64), all d columns;
//                             DQ_SPLIT 1 (BR = 64): all 64 rows, d columns [w d/2, (w+1) d/2)
//     wait dV/dK -> the ring slot is released; wait dQ -> DQ_TMA (default): the 64 x DQN fp32 tile is written to
//     shared memory (128-byte swizzled boxes of 32 floats) and one thread adds it to dQaccum with TMA reductions
//     (cp.reduce.async.bulk.tensor .add.f32); DQ_TMA 0: red.global.add.v4.f32 straight from the accumulators
// Epilogue: dK (times scale) and dV to fp16, staged through the K and V tiles (swizzled), 16-byte global stores.
// Compile-time parameters (measured ones: gpu/flash3_bwd.py VARIANTS, gpu/NOTES.md): HEAD_DIM (64/128), BR
// (64/128), STAGES (>= 2), PIPE (0, 1, 2), DV_EARLY, DK_FIRST, DQ_TMA, DQ_BUFS, DQ_PRODUCER, DQ_V4, ROTATE, DIAG,
// PRODUCER_REGS, CONSUMER_REGS. Needs sm_90a. Host side: gpu/flash3_bwd.py.
#include "common.cuh"
#include "hopper.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef BR
#define BR (HEAD_DIM == 64 ? 128 : 64)
#endif
#ifndef STAGES
#define STAGES 2
#endif
#ifndef DQ_SPLIT               // 0: the two warpgroups split dQ's 128 rows; 1: they split d (needs BR == 64)
#define DQ_SPLIT (BR == 128 ? 0 : 1)
#endif
#ifndef DQ_V4                  // 1: red.global.add.v4.f32 (lane pairs exchange halves); 0: .v2
#define DQ_V4 1
#endif
#ifndef DQ_TMA                 // 1: dQ partials staged in shared memory (fp32, 128-byte swizzled boxes) and added
#define DQ_TMA 1               //    by TMA (cp.reduce.async.bulk.tensor .add); 0: red.global.add from registers
#endif
#ifndef PIPE                   // 1: dQ of Q block i issued after S^T, dP^T of block i+1 and reduced under dV, dK of
#define PIPE 0                 //    block i+1; dV issued before dS^T is computed. 2: the same with S^T and dP^T
#endif                         //    apart (fewer live registers; see the loop). 0: one block after the other
#ifndef DQ_BUFS                // DQ_TMA: dQ staging tiles per warpgroup (2: one may still be read by TMA)
#define DQ_BUFS 1
#endif
#ifndef DQ_PRODUCER            // DQ_TMA: 1: the producer's warp 1 issues the TMA reductions (mbarrier handshake per
#define DQ_PRODUCER 0          //    warpgroup tile); 0: one thread of each consumer warpgroup (named barriers)
#endif
#ifndef DV_EARLY               // PIPE 0: 1: dV issued right after P^T (under the dS^T arithmetic); 0: with dK
#define DV_EARLY (HEAD_DIM == 128)   // (at d = 64 the early dV costs registers: C7512, slower)
#endif
#ifndef DK_FIRST               // PIPE 0: 1: dK issued before dS^T is stored to shared memory (the stores run under it)
#define DK_FIRST 0
#endif
#ifndef ROTATE                 // 1: each K/V block's Q loop starts at its own offset (see the kernel)
#define ROTATE 0
#endif
#ifndef DK_WAIT_END            // PIPE 2: wait for dK(it) at the end of block it (else under S(it+1))
#define DK_WAIT_END 0
#endif
#ifndef DIAG                   // diagnostics only (wrong dQ; PIPE 2): 1 no dQ reductions, 2 no dQ wgmma either
#define DIAG 0
#endif
#ifndef P_F32                  // PIPE 1: keep P^T in fp32 for dS^T (else its fp16 copy, fewer registers)
#define P_F32 0
#endif
#ifndef PRODUCER_REGS
#define PRODUCER_REGS 24
#endif
#ifndef CONSUMER_REGS
#define CONSUMER_REGS 240
#endif

constexpr int D = HEAD_DIM;
constexpr int BC = 128;                    // keys per CTA: 64 per consumer warpgroup
constexpr int NCWG = 2;
constexpr int THREADS = 128 * (NCWG + 1);
constexpr int NPANEL = D / 64;             // 64-column (128-byte) panels per tile row
constexpr int PANEL_Q = BR * 128;          // bytes of one panel of a Q / dO tile
constexpr int PANEL_KV = BC * 128;
constexpr int TILE_Q = BR * D * 2;
constexpr int TILE_KV = BC * D * 2;
constexpr int PANEL_DS = BC * 128;         // dS^T tile: BC rows (keys) x BR columns (queries), BR/64 panels
constexpr int TILE_DS = BC * BR * 2;
constexpr int SREG = BR / 2;               // S^T, dP^T accumulator floats per thread (64 x BR per warpgroup)
constexpr int KREG = D / 2;                // dK, dV accumulator floats per thread (64 x D)
constexpr int KTQ = BR / 16;               // k-steps of dV / dK (over the Q block's rows)
constexpr int DQN = DQ_SPLIT ? D / 2 : D;  // dQ columns per warpgroup
constexpr int DQREG = DQN / 2;
constexpr int NBARS = 1 + 2 * STAGES + 2 * NCWG;
static_assert(D == 64 || D == 128, "HEAD_DIM 64 or 128");
static_assert(BR == 64 || BR == 128, "BR 64 or 128");
static_assert(DQ_SPLIT ? BR == 64 : BR == 128, "DQ_SPLIT 1 with BR 64, 0 with BR 128");
// setmaxnreg moves registers within what the CTA got at launch: 168 a thread (65536 / 384, in units of 8) x 384
static_assert(PRODUCER_REGS * 128 + CONSUMER_REGS * 128 * NCWG <= 168 * THREADS, "register budget of the CTA");
static_assert(STAGES >= 2, "at least two stages");
// shared memory (after 1024-byte alignment): K, V, STAGES x (Q, dO), 2 x dS^T, STAGES x (L, D) fp32 rows
constexpr int OFF_V = TILE_KV;
constexpr int OFF_Q = 2 * TILE_KV;
constexpr int OFF_DO = OFF_Q + STAGES * TILE_Q;
constexpr int OFF_DS = OFF_DO + STAGES * TILE_Q;
constexpr int OFF_DQ = OFF_DS + 2 * TILE_DS;                 // DQ_TMA: per warpgroup 64 x DQN fp32, boxes of 32 columns
constexpr int DQ_BOX = 64 * 128;                             // bytes of one 64-row x 32-float box (128-byte swizzle)
constexpr int TILE_DQ = DQ_TMA ? 64 * DQN * 4 : 0;
constexpr int OFF_LD = OFF_DQ + NCWG * DQ_BUFS * TILE_DQ;
// dynamic shared memory: OFF_LD + STAGES * 2 * BR * 4 + 1024 (alignment slack) = gpu/flash3_bwd.py smem_bytes

__device__ __forceinline__ void red_add_v2(float* p, float a, float b) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" :: "l"(p), "f"(a), "f"(b) : "memory");
}
__device__ __forceinline__ void red_add_v4(float* p, float a, float b, float c, float d) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" :: "l"(p), "f"(a), "f"(b), "f"(c), "f"(d)
                 : "memory");
}
template <bool B> struct BoolC { static constexpr bool value = B; };
__device__ __forceinline__ float2 unpack_h2(u32 v) {
    h16 lo, hi;
    asm("mov.b32 {%0, %1}, %2;\n" : "=h"(lo), "=h"(hi) : "r"(v));
    return mk_f2(h2f(lo), h2f(hi));
}
__device__ __forceinline__ float2 ld_shared_f2(u32 addr) {
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
    return v;
}
__device__ __forceinline__ void st_shared_v4f(u32 addr, float a, float b, float c, float d) {
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" :: "r"(addr), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}
// global (fp32 tensor map) += a shared-memory box, by the TMA unit (bulk async-group completion)
__device__ __forceinline__ void tma_reduce_add_3d(const TmaMap* map, int c0, int c1, int c2, u32 src) {
    asm volatile(
        "cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2, %3}], [%4];\n"
        :: "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(src) : "memory");
}
__device__ __forceinline__ void st_shared_f32(u32 addr, float v) {
    asm volatile("st.shared.f32 [%0], %1;\n" :: "r"(addr), "f"(v) : "memory");
}

// acc (64 x BR) {=} A (64 rows of a K or V tile, K-major) * B^T (BR rows of a Q or dO tile, K-major)
__device__ __forceinline__ void issue_sdp(float* acc, u32 a, u32 b) {
#pragma unroll
    for (int p = 0; p < NPANEL; ++p)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const u64 da = make_desc(a + p * PANEL_KV + kk * 32, 16, 1024);
            const u64 db = make_desc(b + p * PANEL_Q + kk * 32, 16, 1024);
            if constexpr (BR == 128) wgmma_ss_n128(acc, da, db, (p | kk) != 0);
            else wgmma_ss_n64(acc, da, db, (p | kk) != 0);
        }
}
// acc (64 x D) += A (64 x BR, fp16 registers) * B (BR x D: a Q or dO tile, MN-major): KTQ k-steps of 16 rows
__device__ __forceinline__ void issue_kv(float* acc, const u32 (*af)[4], u32 b) {
#pragma unroll
    for (int t = 0; t < KTQ; ++t) {
        const u64 db = make_desc(b + t * 2048, PANEL_Q, 1024);
        if constexpr (D == 128) wgmma_rs_n128_tb(acc, af[t], db);
        else wgmma_rs_n64_tb(acc, af[t], db);
    }
}
// dQ (64 x DQN) = dS (64 rows x BC keys: MN-major view of the dS^T tile) * K (BC x DQN columns, MN-major)
__device__ __forceinline__ void issue_dq(float* acc, u32 ds, u32 kb) {
#pragma unroll
    for (int t = 0; t < BC / 16; ++t) {
        const u64 da = make_desc(ds + t * 2048, PANEL_DS, 1024);
        const u64 db = make_desc(kb + t * 2048, PANEL_KV, 1024);
        if constexpr (DQN == 128) wgmma_ss_tt_n128(acc, da, db, t != 0);
        else if constexpr (DQN == 64) wgmma_ss_tt_n64(acc, da, db, t != 0);
        else wgmma_ss_tt_n32(acc, da, db, t != 0);
    }
}

// Dv[row] = rowsum(dO o O) (fp32) and dQaccum[row, :] = 0: D/8 lanes per row, 16-byte loads and stores
extern "C" __global__ void __launch_bounds__(256)
flash3_bwd_dot(const h16* __restrict__ O, const h16* __restrict__ dO, float* __restrict__ Dv,
               float* __restrict__ dQacc, long long rows)
{
    constexpr int LPR = D / 8;                         // lanes per row
    const long long row = ((long long)blockIdx.x * 256 + threadIdx.x) / LPR;
    const int l = threadIdx.x % LPR;
    if (row >= rows) return;                            // LPR divides 32: a row's lanes leave together
    const uint4 o = *reinterpret_cast<const uint4*>(O + row * D + 8 * l);
    const uint4 g = *reinterpret_cast<const uint4*>(dO + row * D + 8 * l);
    float acc = 0.f;
    const u32 ow[4] = {o.x, o.y, o.z, o.w}, gw[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 a = unpack_h2(ow[k]), b = unpack_h2(gw[k]);
        acc = fmaf(a.x, b.x, acc);
        acc = fmaf(a.y, b.y, acc);
    }
#pragma unroll
    for (int s = LPR / 2; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
    if (l == 0) Dv[row] = acc;
    float4* dq = reinterpret_cast<float4*>(dQacc + row * D + 8 * l);
    float4 z;
    z.x = z.y = z.z = z.w = 0.f;
    dq[0] = z;
    dq[1] = z;
}

// dQ = fp16(scale * dQaccum): 8 elements a thread (two 16-byte loads, one 16-byte store)
extern "C" __global__ void __launch_bounds__(256)
flash3_bwd_convert(const float* __restrict__ dQacc, h16* __restrict__ dQ, long long n8, float scale)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += (long long)gridDim.x * blockDim.x) {
        const float4 a = reinterpret_cast<const float4*>(dQacc)[2 * i];
        const float4 b = reinterpret_cast<const float4*>(dQacc)[2 * i + 1];
        reinterpret_cast<uint4*>(dQ)[i] = mk_u4(pack_h2(a.x * scale, a.y * scale), pack_h2(a.z * scale, a.w * scale),
                                                pack_h2(b.x * scale, b.y * scale), pack_h2(b.z * scale, b.w * scale));
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
flash3_bwd(const __grid_constant__ TmaMap tmQ, const __grid_constant__ TmaMap tmK, const __grid_constant__ TmaMap tmV,
           const __grid_constant__ TmaMap tmdO, const __grid_constant__ TmaMap tmdQ, const float* __restrict__ L, const float* __restrict__ Dv,
           float* __restrict__ dQacc, h16* __restrict__ dK, h16* __restrict__ dV, int N, float scale, int causal)
{
    extern __shared__ unsigned char smem_raw[];
    __shared__ __align__(8) u64 bars[NBARS];
    const u32 base = (smem_addr(smem_raw) + 1023u) & ~1023u;   // 128-byte swizzle atoms: 1024-byte alignment
    const u32 sK = base, sV = base + OFF_V, sQ = base + OFF_Q, sdO = base + OFF_DO, sdS = base + OFF_DS;
    const u32 sLD = base + OFF_LD;             // slot s: L*log2e at sLD + s*2*BR*4, D at + BR*4
    const u32 barKV = smem_addr(&bars[0]);
#define FULL(s) (barKV + 8u * (1 + (s)))
#define EMPTY(s) (barKV + 8u * (1 + STAGES + (s)))
#define DQFULL(w) (barKV + 8u * (1 + 2 * STAGES + (w)))          // DQ_PRODUCER: a warpgroup's dQ tile is staged
#define DQEMPTY(w) (barKV + 8u * (1 + 2 * STAGES + NCWG + (w)))  // DQ_PRODUCER: ... and read out by TMA

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int bh = blockIdx.y;
    const int kv0 = blockIdx.x * BC;
    const int nqb = (N + BR - 1) / BR;
    const int qb0 = causal ? kv0 / BR : 0;
    const int niter = nqb - qb0;
    // ROTATE: the K/V-block CTAs of one head start their Q loop at different blocks (evenly spread, wrapping), so
    // the CTAs running together add their dQ partials into different rows instead of all into the same Q block
    const int rot = ROTATE ? (int)(((long long)blockIdx.x * niter) / gridDim.x) : 0;
    auto qstart = [&](int it) { int j = it + rot; if (j >= niter) j -= niter; return (qb0 + j) * BR; };
    const float log2e = 1.4426950408889634f;

    if (tid == 0) {
        mbar_init(barKV, 1);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(FULL(s), 32);
            mbar_init(EMPTY(s), NCWG * 128);   // every consumer thread arrives (its own L, D reads)
        }
        for (int w = 0; w < NCWG; ++w) {
            mbar_init(DQFULL(w), 128);
            mbar_init(DQEMPTY(w), 1);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
    __syncthreads();

    if (warp < 4) {
        // ================= producer warpgroup =================
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(PRODUCER_REGS));
        if (warp == 0) {
            if (lane == 0) {
                mbar_expect_tx(barKV, 2 * TILE_KV);
#pragma unroll
                for (int p = 0; p < NPANEL; ++p) {
                    tma_load_3d(sK + p * PANEL_KV, &tmK, 64 * p, kv0, bh, barKV);
                    tma_load_3d(sV + p * PANEL_KV, &tmV, 64 * p, kv0, bh, barKV);
                }
            }
            const float* Lb = L + (size_t)bh * N;
            const float* Db = Dv + (size_t)bh * N;
            for (int it = 0; it < niter; ++it) {
                const int s = it % STAGES;
                const int q0 = qstart(it);
                mbar_wait(EMPTY(s), (u32)(((it / STAGES) & 1) ^ 1));
                const u32 sl = sLD + s * 2 * BR * 4;
#pragma unroll
                for (int i = lane; i < BR; i += 32) {
                    const int r = q0 + i;
                    st_shared_f32(sl + 4 * i, r < N ? Lb[r] * log2e : __int_as_float(0x7f800000));
                    st_shared_f32(sl + 4 * (BR + i), r < N ? Db[r] : 0.f);
                }
                if (lane == 0) {
                    mbar_expect_tx(FULL(s), 2 * TILE_Q);     // lane 0's arrival, after its own stores
#pragma unroll
                    for (int p = 0; p < NPANEL; ++p) {
                        tma_load_3d(sQ + s * TILE_Q + p * PANEL_Q, &tmQ, 64 * p, q0, bh, FULL(s));
                        tma_load_3d(sdO + s * TILE_Q + p * PANEL_Q, &tmdO, 64 * p, q0, bh, FULL(s));
                    }
                } else {
                    mbar_arrive(FULL(s));
                }
            }
        }
#if DQ_TMA && DQ_PRODUCER
        if (warp == 1 && lane == 0) {
            // the dQ reductions: per Q block, each consumer warpgroup's staged tile, added by TMA
            for (int it = 0; it < niter; ++it) {
                const int q0 = qstart(it);
#pragma unroll
                for (int w = 0; w < NCWG; ++w) {
                    mbar_wait(DQFULL(w), (u32)(it & 1));
                    const u32 sdq = base + OFF_DQ + w * TILE_DQ;
#pragma unroll
                    for (int b = 0; b < DQN / 32; ++b)
                        tma_reduce_add_3d(&tmdQ, (DQ_SPLIT ? w * (D / 2) : 0) + 32 * b, q0 + (DQ_SPLIT ? 0 : 64 * w),
                                          bh, sdq + b * DQ_BOX);
                    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
                    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
                    mbar_arrive(DQEMPTY(w));
                }
            }
            asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
        }
#endif
        return;
    }

    // ================= consumer warpgroups =================
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(CONSUMER_REGS));
    const int wg = warp / 4 - 1;               // 0, 1: keys [64 wg, 64 wg + 64) of the block
    const int wl = warp & 3;
    const int g = lane >> 2, c4 = lane & 3;
    const float sl2 = scale * log2e;
    const u32 kA = sK + wg * 64 * 128, vA = sV + wg * 64 * 128;   // this warpgroup's 64 rows of each panel
    const int kv_lo = kv0 + 64 * wg + 16 * wl + g;                 // key of accumulator entries with (i>>1)&1 == 0
    float* dQb = dQacc + (size_t)bh * N * D;

    float dk[KREG], dv[KREG];
#pragma unroll
    for (int i = 0; i < KREG; ++i) { dk[i] = 0.f; dv[i] = 0.f; }

    // P^T = exp2(S^T scale log2e - L log2e) in place (causal: 0 where key > query). Accumulator entry i: key
    // kv_lo + 8 ((i >> 1) & 1), query q0 + 8 (i >> 2) + 2 c4 + (i & 1)
    auto compute_p = [&](float* st, u32 sl, int q0) {
        const bool need_mask = causal && (kv0 + BC - 1 > q0);
#pragma unroll
        for (int j = 0; j < SREG / 4; ++j) {
            const int col = 8 * j + 2 * c4;
            const float2 l = ld_shared_f2(sl + 4 * col);
            float* x = st + 4 * j;
            x[0] = fast_exp2(fmaf(x[0], sl2, -l.x));
            x[1] = fast_exp2(fmaf(x[1], sl2, -l.y));
            x[2] = fast_exp2(fmaf(x[2], sl2, -l.x));
            x[3] = fast_exp2(fmaf(x[3], sl2, -l.y));
            if (need_mask) {
                const int q = q0 + col;
                if (kv_lo > q) x[0] = 0.f;
                if (kv_lo > q + 1) x[1] = 0.f;
                if (kv_lo + 8 > q) x[2] = 0.f;
                if (kv_lo + 8 > q + 1) x[3] = 0.f;
            }
        }
    };
    // the accumulator of k-columns [16t, 16t+16) is the fp16 A fragment of k-step t
    auto pack = [&](u32 (*f)[4], const float* x) {
#pragma unroll
        for (int t = 0; t < KTQ; ++t)
#pragma unroll
            for (int k = 0; k < 4; ++k) f[t][k] = pack_h2(x[8 * t + 2 * k], x[8 * t + 2 * k + 1]);
    };
    // dS^T fragments to shared memory: 128-byte swizzled rows of BR queries (64 per panel), the layout of a TMA tile
    auto store_ds = [&](const u32 (*f)[4], u32 dsb) {
#pragma unroll
        for (int t = 0; t < KTQ; ++t)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                // fragment pair (t, k): key row 16 wl + g + 8 (k & 1), query column 16 t + 8 (k >> 1) + 2 c4
                const int rr = 64 * wg + 16 * wl + g + 8 * (k & 1);
                const int c = 2 * t + (k >> 1);                  // 16-byte chunk (8 queries) of the row
                const u32 addr = dsb + (c >> 3) * PANEL_DS + rr * 128 + ((((c & 7) ^ (rr & 7))) << 4) + c4 * 4;
                st_shared_u32(addr, f[t][k]);
            }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // visible to the dQ wgmma
    };
    auto issue_dq_w = [&](float* dq, u32 dsb) {
        if constexpr (DQ_SPLIT) issue_dq(dq, dsb, sK + wg * (D / 2) * 2 / 128 * PANEL_KV + (wg * (D / 2) * 2) % 128);
        else issue_dq(dq, dsb + wg * PANEL_DS, sK);
    };
    // dQaccum[q0 + rows of this warpgroup, columns of this warpgroup] += dq
    auto red_dq = [&](const float* dq, int q0, int it) {
        const int qrow0 = q0 + (DQ_SPLIT ? 0 : 64 * wg) + 16 * wl + g;   // entries with (i>>1)&1 == 0
        const int col0 = DQ_SPLIT ? wg * (D / 2) : 0;
#if DQ_TMA
        // this warpgroup's 64 x DQN tile -> shared memory (swizzled boxes of 32 columns), then one thread adds it
        // to dQaccum with TMA reductions (rows >= N are clipped by the tensor map)
        const u32 sdq = base + OFF_DQ + (wg * DQ_BUFS + it % DQ_BUFS) * TILE_DQ;
        const int ctid = tid - 128 * (wg + 1);
#if DQ_PRODUCER
        mbar_wait(DQEMPTY(wg), (u32)((it & 1) ^ 1));   // the producer's TMA has read the last tile out
#else
        if (ctid == 0) asm volatile("cp.async.bulk.wait_group.read %0;\n" :: "n"(DQ_BUFS - 1) : "memory");
        named_bar_sync(2 + wg, 128);
#endif
#pragma unroll
        for (int j = 0; j < DQREG / 4; ++j) {
            const float* a = dq + 4 * j;
            const bool odd = c4 & 1;
            const float s0 = odd ? a[0] : a[2], s1 = odd ? a[1] : a[3];
            const float r0 = __shfl_xor_sync(0xffffffffu, s0, 1), r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
            const int r = 16 * wl + g + (odd ? 8 : 0);             // row of the warpgroup's tile
            const int c = 8 * j + 2 * (c4 & 2);                    // column of the tile (4 floats from here)
            const u32 addr = sdq + (c >> 5) * DQ_BOX + r * 128 + (((((c & 31) >> 2) ^ (r & 7))) << 4);
            if (odd) st_shared_v4f(addr, r0, r1, a[2], a[3]);
            else st_shared_v4f(addr, a[0], a[1], r0, r1);
        }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#if DQ_PRODUCER
        mbar_arrive(DQFULL(wg));
        (void)ctid;
#else
        named_bar_sync(2 + wg, 128);
        if (ctid == 0) {
#pragma unroll
            for (int b = 0; b < DQN / 32; ++b)
                tma_reduce_add_3d(&tmdQ, col0 + 32 * b, qrow0 - 16 * wl - g, bh, sdq + b * DQ_BOX);
            asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
        }
#endif
#else
#pragma unroll
        for (int j = 0; j < DQREG / 4; ++j) {
            const float* a = dq + 4 * j;
#if DQ_V4
            const bool odd = c4 & 1;
            const float s0 = odd ? a[0] : a[2], s1 = odd ? a[1] : a[3];
            const float r0 = __shfl_xor_sync(0xffffffffu, s0, 1), r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
            const int row = qrow0 + (odd ? 8 : 0);
            const int col = col0 + 8 * j + 2 * (c4 & 2);
            if (row < N) {
                if (odd) red_add_v4(dQb + (size_t)row * D + col, r0, r1, a[2], a[3]);
                else red_add_v4(dQb + (size_t)row * D + col, a[0], a[1], r0, r1);
            }
#else
            const int col = col0 + 8 * j + 2 * c4;
            if (qrow0 < N) red_add_v2(dQb + (size_t)qrow0 * D + col, a[0], a[1]);
            if (qrow0 + 8 < N) red_add_v2(dQb + (size_t)(qrow0 + 8) * D + col, a[2], a[3]);
#endif
        }
#endif
    };

    mbar_wait(barKV, 0);
#if PIPE == 2
    // Software-pipelined with fewer live accumulators than PIPE 1. Commit groups per block it, in order:
    // S(it), dQ(it-1), dV(it), dP(it), dK(it); dK(it-1) (and the ring slot of it-1) completes under S(it), the
    // exponentials run under dQ(it-1), the dQ(it-1) reductions under dV(it) and dP(it).
    float dq[DQREG];
    u32 dsf[KTQ][4];
    // one Q block; FIRST (compile time): block 0, no dQ(it-1) yet. Peeled so that every wgmma of the loop body is
    // issued unconditionally (ptxas serialises wgmmas whose issue or wait depends on a run-time branch)
    auto block = [&](int it, auto first_c) {
        constexpr bool FIRST = decltype(first_c)::value;
        const int s = it % STAGES;
        const int q0 = qstart(it);
        const u32 qS = sQ + s * TILE_Q, doS = sdO + s * TILE_Q;
        const u32 sl = sLD + s * 2 * BR * 4;
        mbar_wait(FULL(s), (u32)((it / STAGES) & 1));

        float st[SREG];
        wgmma_fence();
        issue_sdp(st, kA, qS);
        wgmma_commit();
        if constexpr (!FIRST) {
            named_bar_sync(1, 256);            // dS^T of block it-1 complete (both warpgroups)
            wgmma_fence();
#if DIAG != 2
            issue_dq_w(dq, sdS + ((it - 1) & 1) * TILE_DS);
#endif
            wgmma_commit();
            wgmma_wait<2>();                   // dK(it-1) done: its ring slot is free
            fence_f<KREG>(dk);
            fence_u<KTQ * 4>(&dsf[0][0]);
            mbar_arrive(EMPTY((it - 1) % STAGES));
            wgmma_wait<1>();                   // S^T done
        } else {
            wgmma_wait<0>();
        }
        fence_f<SREG>(st);
        compute_p(st, sl, q0);
        u32 pf[KTQ][4];
        pack(pf, st);
        float dpt[SREG];
        wgmma_fence();
        issue_kv(dv, pf, doS);
        wgmma_commit();
        issue_sdp(dpt, vA, doS);
        wgmma_commit();
        if constexpr (!FIRST) {
            wgmma_wait<2>();                   // dQ(it-1) done
            fence_f<DQREG>(dq);
#if DIAG == 0
            red_dq(dq, qstart(it - 1), it - 1);
#endif
        }
        wgmma_wait<0>();                       // dV(it), dP^T(it) done
        fence_f<SREG>(dpt);
        fence_f<KREG>(dv);
        fence_u<KTQ * 4>(&pf[0][0]);
#pragma unroll
        for (int j = 0; j < SREG / 4; ++j) {
            const float2 dd = ld_shared_f2(sl + 4 * (BR + 8 * j + 2 * c4));
            const float2 pa = unpack_h2(pf[j >> 1][2 * (j & 1)]), pb = unpack_h2(pf[j >> 1][2 * (j & 1) + 1]);
            float* x = dpt + 4 * j;
            x[0] = pa.x * (x[0] - dd.x);
            x[1] = pa.y * (x[1] - dd.y);
            x[2] = pb.x * (x[2] - dd.x);
            x[3] = pb.y * (x[3] - dd.y);
        }
        pack(dsf, dpt);
        store_ds(dsf, sdS + (it & 1) * TILE_DS);
        wgmma_fence();
        issue_kv(dk, dsf, qS);
        wgmma_commit();
#if DK_WAIT_END
        wgmma_wait<0>();
        fence_f<KREG>(dk);
        fence_u<KTQ * 4>(&dsf[0][0]);
#endif
    };
    block(0, BoolC<true>());
    for (int it = 1; it < niter; ++it) block(it, BoolC<false>());
    wgmma_wait<0>();                           // dK of the last block
    fence_f<KREG>(dk);
    fence_u<KTQ * 4>(&dsf[0][0]);
    named_bar_sync(1, 256);                    // dS^T of the last block complete
#if DIAG != 2
    wgmma_fence();
    issue_dq_w(dq, sdS + ((niter - 1) & 1) * TILE_DS);
    wgmma_commit();
    wgmma_wait<0>();
    fence_f<DQREG>(dq);
#if DIAG == 0
    red_dq(dq, qstart(niter - 1), niter - 1);
#endif
#endif
#elif PIPE
    // Software-pipelined: the dQ of Q block it-1 is issued after S^T, dP^T of block it (one barrier per block, where
    // the other warpgroup has long stored its dS^T) and its reductions run under dV, dK of block it; dV is issued
    // as soon as P^T is known, under the dS^T arithmetic. Commit groups, in order: S, dP, [dQ(it-1)], dV, dK.
    float dq[DQREG];
    for (int it = 0; it < niter; ++it) {
        const int s = it % STAGES;
        const int q0 = qstart(it);
        const u32 qS = sQ + s * TILE_Q, doS = sdO + s * TILE_Q;
        const u32 sl = sLD + s * 2 * BR * 4;
        mbar_wait(FULL(s), (u32)((it / STAGES) & 1));

        float st[SREG], dpt[SREG];
        wgmma_fence();
        issue_sdp(st, kA, qS);
        wgmma_commit();
        issue_sdp(dpt, vA, doS);
        wgmma_commit();
        if (it > 0) {
            named_bar_sync(1, 256);            // dS^T of block it-1 complete (both warpgroups)
            issue_dq_w(dq, sdS + ((it - 1) & 1) * TILE_DS);
            wgmma_commit();
            wgmma_wait<2>();                   // S^T done
        } else {
            wgmma_wait<1>();
        }
        fence_f<SREG>(st);
        compute_p(st, sl, q0);
        u32 pf[KTQ][4];
        pack(pf, st);
#if P_F32
        fence_f<SREG>(st);
#endif
        wgmma_fence();
        issue_kv(dv, pf, doS);
        wgmma_commit();
        if (it > 0) wgmma_wait<2>(); else wgmma_wait<1>();   // dP^T done
        fence_f<SREG>(dpt);
#pragma unroll
        for (int j = 0; j < SREG / 4; ++j) {
            const float2 dd = ld_shared_f2(sl + 4 * (BR + 8 * j + 2 * c4));
            float* x = dpt + 4 * j;
#if P_F32
            const float* p = st + 4 * j;
            const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
#else
            const float2 pa = unpack_h2(pf[j >> 1][2 * (j & 1)]), pb = unpack_h2(pf[j >> 1][2 * (j & 1) + 1]);
            const float p0 = pa.x, p1 = pa.y, p2 = pb.x, p3 = pb.y;
#endif
            x[0] = p0 * (x[0] - dd.x);
            x[1] = p1 * (x[1] - dd.y);
            x[2] = p2 * (x[2] - dd.x);
            x[3] = p3 * (x[3] - dd.y);
        }
        u32 dsf[KTQ][4];
        pack(dsf, dpt);
        store_ds(dsf, sdS + (it & 1) * TILE_DS);
        wgmma_fence();
        issue_kv(dk, dsf, qS);
        wgmma_commit();
        if (it > 0) {
            wgmma_wait<2>();                   // dQ of block it-1 done
            fence_f<DQREG>(dq);
            red_dq(dq, qstart(it - 1), it - 1);
        }
        wgmma_wait<0>();                       // dV, dK done: Q, dO, L, D of slot s no longer read
        fence_f<KREG>(dv);
        fence_f<KREG>(dk);
        fence_u<KTQ * 4>(&pf[0][0]);
        fence_u<KTQ * 4>(&dsf[0][0]);
        mbar_arrive(EMPTY(s));
    }
    named_bar_sync(1, 256);                    // dS^T of the last block complete
    wgmma_fence();
    issue_dq_w(dq, sdS + ((niter - 1) & 1) * TILE_DS);
    wgmma_commit();
    wgmma_wait<0>();
    fence_f<DQREG>(dq);
    red_dq(dq, qstart(niter - 1), niter - 1);
#else
    for (int it = 0; it < niter; ++it) {
        const int s = it % STAGES;
        const int q0 = qstart(it);
        const u32 qS = sQ + s * TILE_Q, doS = sdO + s * TILE_Q;
        const u32 dsb = sdS + (it & 1) * TILE_DS;
        const u32 sl = sLD + s * 2 * BR * 4;
        mbar_wait(FULL(s), (u32)((it / STAGES) & 1));

        float st[SREG], dpt[SREG];
        wgmma_fence();
        issue_sdp(st, kA, qS);
        wgmma_commit();
        issue_sdp(dpt, vA, doS);
        wgmma_commit();
        wgmma_wait<1>();                       // S^T done
        fence_f<SREG>(st);
        compute_p(st, sl, q0);
        fence_f<SREG>(st);
#if DV_EARLY
        u32 pf[KTQ][4];
        pack(pf, st);
        wgmma_fence();
        issue_kv(dv, pf, doS);                 // dV += P^T dO runs under the dS^T arithmetic
        wgmma_commit();
        wgmma_wait<1>();                       // dP^T done
#else
        wgmma_wait<0>();                       // dP^T done
#endif
        fence_f<SREG>(dpt);

        // ---- dS^T = P^T o (dP^T - D) (in place of dP^T); P^T, dS^T to fp16 A fragments; dS^T to shared memory ----
#pragma unroll
        for (int j = 0; j < SREG / 4; ++j) {
            const float2 dd = ld_shared_f2(sl + 4 * (BR + 8 * j + 2 * c4));
            float* x = dpt + 4 * j;
            const float* p = st + 4 * j;
            x[0] = p[0] * (x[0] - dd.x);
            x[1] = p[1] * (x[1] - dd.y);
            x[2] = p[2] * (x[2] - dd.x);
            x[3] = p[3] * (x[3] - dd.y);
        }
        u32 dsf[KTQ][4];
#if !DV_EARLY
        u32 pf[KTQ][4];
        pack(pf, st);
#endif
        pack(dsf, dpt);
#if !DK_FIRST
        store_ds(dsf, dsb);
#endif
        wgmma_fence();
#if !DV_EARLY
        issue_kv(dv, pf, doS);
#endif
        issue_kv(dk, dsf, qS);
        wgmma_commit();
#if DK_FIRST
        store_ds(dsf, dsb);                    // under the dK wgmma
#endif
        named_bar_sync(1, 256);                // the whole dS^T tile is in shared memory

        float dq[DQREG];
        wgmma_fence();
        issue_dq_w(dq, dsb);
        wgmma_commit();
        wgmma_wait<1>();                       // dV, dK done: Q, dO, L, D of slot s no longer read
        fence_f<KREG>(dv);
        fence_f<KREG>(dk);
        fence_u<KTQ * 4>(&pf[0][0]);
        fence_u<KTQ * 4>(&dsf[0][0]);
        mbar_arrive(EMPTY(s));
        wgmma_wait<0>();                       // dQ done
        fence_f<DQREG>(dq);
        red_dq(dq, q0, it);
    }
#endif

    // ---- epilogue: dK (scaled) into the K tile, dV into the V tile (swizzled, this warpgroup's rows), then
    //      16-byte global stores ----
#if DQ_TMA
    if (tid == 128 || tid == 256) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");  // dQ reductions done
#endif
    named_bar_sync(1, 256);                    // both warpgroups are past their last wgmma (which read K)
#pragma unroll
    for (int c = 0; c < D / 8; ++c) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int rr = 64 * wg + 16 * wl + g + 8 * h;
            const u32 off = (c >> 3) * PANEL_KV + rr * 128 + ((((c & 7) ^ (rr & 7))) << 4) + c4 * 4;
            st_shared_u32(sK + off, pack_h2(dk[4 * c + 2 * h] * scale, dk[4 * c + 2 * h + 1] * scale));
            st_shared_u32(sV + off, pack_h2(dv[4 * c + 2 * h], dv[4 * c + 2 * h + 1]));
        }
    }
    named_bar_sync(2 + wg, 128);
    const int ctid = tid - 128 * (wg + 1);
    h16* dKb = dK + (size_t)bh * N * D;
    h16* dVb = dV + (size_t)bh * N * D;
    constexpr int CPR = D / 8;                 // 16-byte chunks per row
#pragma unroll
    for (int k = 0; k < 64 * CPR / 128; ++k) {
        const int idx = ctid + k * 128;
        const int r = idx / CPR, c = idx % CPR;
        const int rr = 64 * wg + r;
        const int grow = kv0 + rr;
        if (grow < N) {
            const u32 off = (c >> 3) * PANEL_KV + rr * 128 + (((c & 7) ^ (rr & 7)) << 4);
            *reinterpret_cast<uint4*>(dKb + (size_t)grow * D + c * 8) = ld_shared_v4(sK + off);
            *reinterpret_cast<uint4*>(dVb + (size_t)grow * D + c * 8) = ld_shared_v4(sV + off);
        }
    }
#undef FULL
#undef EMPTY
#undef DQFULL
#undef DQEMPTY
}
