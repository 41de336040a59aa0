// iosim gpu/flash3.cu -- FlashAttention forward for Hopper (sm_90a): wgmma, TMA, warp specialisation.
//
// grid = (ceil(N/BR), B*H); one CTA = 1 producer warpgroup + NCWG (2 or 3) consumer warpgroups (384 or 512 threads),
// BR = 64*NCWG query rows (64 per consumer warpgroup, one wgmma m64 row block each). The producer warpgroup drops to
// PRODUCER_REGS registers (setmaxnreg.dec) and one of its threads issues every load: Q once, then K_j and V_j
// tiles of BC rows by cp.async.bulk.tensor (TMA, 3-D tensor maps over (d, N, B*H), so rows >= N arrive as
// zeros) into a STAGES-deep ring in shared memory. Each K and each V slot has its own "full" mbarrier (TMA
// transaction count) and "empty" mbarrier (one arrival per consumer warp), so K_{j+1} can land while V_j is
// still being read. The consumers raise their budget to CONSUMER_REGS (setmaxnreg.inc) and run, per block j:
//     S_j = Q K_j^T          wgmma m64nBCk16, A = Q and B = K both from shared memory (K-major, 128-byte swizzle)
//     O  += P_{j-1} V_{j-1}  wgmma m64nDk16, A = P in registers (fp16), B = V from shared memory (MN-major: tnspB)
// issued back to back; wgmma.wait_group 1 returns when S_j is done, and the online softmax of S_j (in place,
// exp2 with scale*log2e folded into one FFMA) runs while the PV wgmma of the previous block is still in flight
// (intra-warpgroup pipelining). wait_group 0, then O is rescaled and S_j is packed to fp16 as the next P.
// Tiles are stored as 64-column (128-byte) panels, 128-byte swizzled by TMA, which is the layout the wgmma
// descriptors (layout type 1, SBO = 1024 bytes per 8-row group) describe.
// Epilogue: O / l staged through this warpgroup's rows of the Q tile, written with 16-byte stores; the
// log-sum-exp L (fp32, (B,H,N), natural log of scale*QK^T) as flash2 writes it.
// Causal (top-left aligned, col <= row): blocks right of the diagonal are never loaded, only blocks that cross
// it are masked, and row blocks run longest first (blockIdx.x reversed within each head).
//
// Ping-pong (PINGPONG=1): the consumer warpgroups also take turns issuing their wgmmas, so one warpgroup's softmax
// runs under another's GEMMs.
// Compile-time parameters (defines): HEAD_DIM (64/128), BC (64/128/192), NCWG (2/3), STAGES (2..), PINGPONG,
// PV_SPLIT (1: one n64 wgmma per 64-column panel of V instead of one nD wgmma), PRODUCER_REGS, CONSUMER_REGS.
// Needs sm_90a. Host side, tile choices and measurements: gpu/flash3.py, gpu/NOTES.md (flash3 section).
#include "common.cuh"
#include "hopper.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef BC
#define BC 128
#endif
#ifndef NCWG
#define NCWG 2          // consumer warpgroups (64 query rows each)
#endif
#ifndef STAGES
#define STAGES 2
#endif
#ifndef PV_SPLIT
#define PV_SPLIT 0
#endif
#ifndef PINGPONG
#define PINGPONG 1      // 1: the consumer warpgroups take turns issuing their wgmmas (named barriers, round robin)
#endif
#ifndef PRODUCER_REGS
#define PRODUCER_REGS (NCWG == 3 ? 24 : 40)
#endif
#ifndef CONSUMER_REGS
#define CONSUMER_REGS (NCWG == 3 ? 160 : 232)
#endif

constexpr int D = HEAD_DIM;
constexpr int BR = 64 * NCWG;              // query rows per CTA
constexpr int THREADS = 128 * (NCWG + 1);
constexpr int NPANEL = D / 64;             // 64-column (128-byte) panels per tile row
constexpr int PANEL_Q = BR * 128;          // bytes of one panel of the Q tile
constexpr int PANEL_KV = BC * 128;
constexpr int TILE_Q = BR * D * 2;
constexpr int TILE_KV = BC * D * 2;
constexpr int SREG = BC / 2;               // S accumulator floats per thread
constexpr int OREG = D / 2;                // O accumulator floats per thread
constexpr int KT = BC / 16;                // k-steps of PV
constexpr int NBARS = 1 + 4 * STAGES;
static_assert(D == 64 || D == 128, "HEAD_DIM 64 or 128");
static_assert(BC == 64 || BC == 128 || BC == 192, "BC 64, 128 or 192");
static_assert(NCWG == 2 || NCWG == 3, "2 or 3 consumer warpgroups");
static_assert(PRODUCER_REGS * 128 + CONSUMER_REGS * 128 * NCWG <= 65536, "register budget of the CTA");
static_assert(STAGES >= 2, "at least two stages");

// Ping-pong: warpgroup w issues its wgmmas only after the other one has issued its own (barrier 3 + w:
// 128 threads of w wait, 128 of the other arrive), so one warpgroup's softmax runs under the other's GEMMs.
__device__ __forceinline__ void turn_wait(int wg) {
#if PINGPONG
    named_bar_sync(3 + wg, 256);
#endif
}
__device__ __forceinline__ void turn_pass(int wg) {
#if PINGPONG
    named_bar_arrive(3 + (wg + 1) % NCWG, 256);   // round robin over the consumer warpgroups
#endif
}

// ---- the tile products --------------------------------------------------------------------------------------
// S (64 x BC per consumer warpgroup) = Q_rows K^T: NPANEL panels x 4 k-steps of 16 columns (32 bytes) each
__device__ __forceinline__ void issue_qk(float* s, u32 qa, u32 kb) {
#pragma unroll
    for (int p = 0; p < NPANEL; ++p)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const u64 da = make_desc(qa + p * PANEL_Q + kk * 32, 16, 1024);
            const u64 db = make_desc(kb + p * PANEL_KV + kk * 32, 16, 1024);
            if constexpr (BC == 192) wgmma_ss_n192(s, da, db, (p | kk) != 0);
            else if constexpr (BC == 128) wgmma_ss_n128(s, da, db, (p | kk) != 0);
            else wgmma_ss_n64(s, da, db, (p | kk) != 0);
        }
}
// O (64 x D) += P (64 x BC, registers) V (BC x D, MN-major): KT k-steps of 16 rows (2048 bytes) each
__device__ __forceinline__ void issue_pv(float* o, const u32 (*pf)[4], u32 vb) {
    constexpr u32 LBO = PANEL_KV, SBO = 1024;   // LBO: next 64-column panel (MN), SBO: next 8 rows (K)
#pragma unroll
    for (int t = 0; t < KT; ++t) {
        if constexpr (D == 128 && !PV_SPLIT) {
            wgmma_rs_n128_tb(o, pf[t], make_desc(vb + t * 2048, LBO, SBO));
        } else {
#pragma unroll
            for (int pn = 0; pn < NPANEL; ++pn)
                wgmma_rs_n64_tb(o + 32 * pn, pf[t], make_desc(vb + pn * PANEL_KV + t * 2048, LBO, SBO));
        }
    }
}

// mask (tail columns, causal) and the online-softmax update of one S block, in place: s becomes
// exp2(s*sl2 - m_new*sl2); returns the per-row rescale factors of the old O and l.
__device__ __forceinline__ void softmax_block(float* s, float* m, float* rowsum, float* alpha,
                                              int k0, int row_lo, int N, int causal, float sl2, int lane) {
    const bool need_mask = (k0 + BC > N) || (causal && (k0 + BC - 1 > row_lo - (lane >> 2)));
    if (need_mask) {
#pragma unroll
        for (int i = 0; i < SREG; ++i) {
            const int col = k0 + 8 * (i >> 2) + 2 * (lane & 3) + (i & 1);
            const int row = row_lo + 8 * ((i >> 1) & 1);
            if (col >= N || (causal && col > row)) s[i] = NEG_INF_F;
        }
    }
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int i = 0; i < SREG; ++i) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s[i]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    }
    float ms[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        ms[h] = (mx[h] == NEG_INF_F) ? 0.f : mx[h] * sl2;
        alpha[h] = fast_exp2(m[h] * sl2 - ms[h]);      // old m = -inf -> 0
        m[h] = mx[h];
        rowsum[h] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < SREG; ++i) {
        const int h = (i >> 1) & 1;
        s[i] = fast_exp2(fmaf(s[i], sl2, -ms[h]));
        rowsum[h] += s[i];
    }
}
// the S accumulator of k-columns [16t, 16t+16) is the A fragment of PV k-step t
__device__ __forceinline__ void pack_p(u32 (*pf)[4], const float* s) {
#pragma unroll
    for (int t = 0; t < KT; ++t)
#pragma unroll
        for (int k = 0; k < 4; ++k) pf[t][k] = pack_h2(s[8 * t + 2 * k], s[8 * t + 2 * k + 1]);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
flash3_fwd(const __grid_constant__ TmaMap tmQ, const __grid_constant__ TmaMap tmK, const __grid_constant__ TmaMap tmV,
           h16* __restrict__ O, float* __restrict__ L, int N, float scale, int causal)
{
    extern __shared__ unsigned char smem_raw[];            // + 1024 bytes of slack for the alignment below
    __shared__ __align__(8) u64 bars[NBARS];
    const u32 raw = smem_addr(smem_raw);
    const u32 sQ = (raw + 1023u) & ~1023u;                // 128-byte swizzle atoms need 1024-byte alignment
    const u32 sK = sQ + TILE_Q, sV = sK + STAGES * TILE_KV;
    const u32 barQ = smem_addr(&bars[0]);
#define FULL_K(s) (barQ + 8u * (1 + (s)))
#define FULL_V(s) (barQ + 8u * (1 + STAGES + (s)))
#define EMPTY_K(s) (barQ + 8u * (1 + 2 * STAGES + (s)))
#define EMPTY_V(s) (barQ + 8u * (1 + 3 * STAGES + (s)))

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // row blocks fastest: the CTAs resident together share one (b, h), so its K/V tiles are read from L2
    // (with (b, h) fastest every resident CTA streams a different head's K/V and they all come from DRAM)
    const int bh = blockIdx.y;
    const int nqb = gridDim.x;
    const int qb = causal ? (nqb - 1 - (int)blockIdx.x) : (int)blockIdx.x;   // causal: longest row blocks first
    const int q0 = qb * BR;
    int nkb = (N + BC - 1) / BC;
    if (causal) nkb = min(nkb, (min(q0 + BR, N) - 1) / BC + 1);

    if (tid == 0) {
        mbar_init(barQ, 1);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(FULL_K(s), 1);
            mbar_init(FULL_V(s), 1);
            mbar_init(EMPTY_K(s), NCWG * 4);
            mbar_init(EMPTY_V(s), NCWG * 4);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
    __syncthreads();

    if (warp < 4) {
        // ================= producer warpgroup =================
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(PRODUCER_REGS));
        if (warp == 0 && lane == 0) {
            mbar_expect_tx(barQ, TILE_Q);
#pragma unroll
            for (int p = 0; p < NPANEL; ++p) tma_load_3d(sQ + p * PANEL_Q, &tmQ, 64 * p, q0, bh, barQ);
            for (int j = 0; j < nkb; ++j) {
                const int s = j % STAGES;
                const u32 ph = (u32)((j / STAGES) & 1);
                mbar_wait(EMPTY_K(s), ph ^ 1u);
                mbar_expect_tx(FULL_K(s), TILE_KV);
#pragma unroll
                for (int p = 0; p < NPANEL; ++p)
                    tma_load_3d(sK + s * TILE_KV + p * PANEL_KV, &tmK, 64 * p, j * BC, bh, FULL_K(s));
                mbar_wait(EMPTY_V(s), ph ^ 1u);
                mbar_expect_tx(FULL_V(s), TILE_KV);
#pragma unroll
                for (int p = 0; p < NPANEL; ++p)
                    tma_load_3d(sV + s * TILE_KV + p * PANEL_KV, &tmV, 64 * p, j * BC, bh, FULL_V(s));
            }
        }
        return;
    }

    // ================= consumer warpgroups =================
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(CONSUMER_REGS));
    const int wg = warp / 4 - 1;                  // 0 .. NCWG-1
    const int wl = warp & 3;                      // warp within its warpgroup
    const int ctid = tid - 128 * (wg + 1);
    const int row_lo = q0 + 64 * wg + 16 * wl + (lane >> 2);   // query row of accumulator entries i with (i>>1)&1 == 0
    const float sl2 = scale * 1.4426950408889634f;
    const u32 qa = sQ + wg * 64 * 128;            // this warpgroup's 64 rows (8 swizzle atoms) of every Q panel

    float o[OREG];
    float s[SREG];
    u32 pf[KT][4];
#pragma unroll
    for (int i = 0; i < OREG; ++i) o[i] = 0.f;
    float m[2] = {NEG_INF_F, NEG_INF_F}, l[2] = {0.f, 0.f}, rs[2], alpha[2];

    mbar_wait(barQ, 0);
#if PINGPONG
    if (wg == NCWG - 1) named_bar_arrive(3, 256);  // warpgroup 0 goes first
#endif
    // ---- block 0: S_0, softmax ----
    mbar_wait(FULL_K(0), 0);
    turn_wait(wg);
    wgmma_fence();
    issue_qk(s, qa, sK);
    wgmma_commit();
    turn_pass(wg);
    wgmma_wait<0>();
    fence_f<SREG>(s);
    __syncwarp();
    if (lane == 0) mbar_arrive(EMPTY_K(0));
    softmax_block(s, m, rs, alpha, 0, row_lo, N, causal, sl2, lane);
    l[0] = rs[0]; l[1] = rs[1];
    pack_p(pf, s);

    // ---- steady state: S_j = Q K_j^T and O += P_{j-1} V_{j-1} in flight together ----
    for (int j = 1; j < nkb; ++j) {
        const int sk = j % STAGES, sp = (j - 1) % STAGES;
        mbar_wait(FULL_K(sk), (u32)((j / STAGES) & 1));
        mbar_wait(FULL_V(sp), (u32)(((j - 1) / STAGES) & 1));
        turn_wait(wg);
        wgmma_fence();
        issue_qk(s, qa, sK + sk * TILE_KV);
        wgmma_commit();
        issue_pv(o, pf, sV + sp * TILE_KV);
        wgmma_commit();
        turn_pass(wg);
        wgmma_wait<1>();                          // S_j done (groups complete in order)
        fence_f<SREG>(s);
        __syncwarp();
        if (lane == 0) mbar_arrive(EMPTY_K(sk));
        softmax_block(s, m, rs, alpha, j * BC, row_lo, N, causal, sl2, lane);
        // Keep the softmax above the wait. The fences stop NVVM from sinking it below; ptxas hoists a
        // wgmma.wait_group to the top of its basic block, so a block boundary (the wait for the next K tile,
        // needed next anyway) must separate them.
        fence_f<SREG>(s);
        fence_f<2>(rs); fence_f<2>(alpha); fence_f<2>(m);
        if (j + 1 < nkb) mbar_wait(FULL_K((j + 1) % STAGES), (u32)(((j + 1) / STAGES) & 1));
        wgmma_wait<0>();                          // PV_{j-1} done
        fence_f<OREG>(o);
        fence_u<KT * 4>(&pf[0][0]);
        __syncwarp();
        if (lane == 0) mbar_arrive(EMPTY_V(sp));
#pragma unroll
        for (int i = 0; i < OREG; ++i) o[i] *= alpha[(i >> 1) & 1];
        l[0] = l[0] * alpha[0] + rs[0];
        l[1] = l[1] * alpha[1] + rs[1];
        pack_p(pf, s);
    }
    {
        const int sp = (nkb - 1) % STAGES;
        mbar_wait(FULL_V(sp), (u32)(((nkb - 1) / STAGES) & 1));
        turn_wait(wg);
        wgmma_fence();
        issue_pv(o, pf, sV + sp * TILE_KV);
        wgmma_commit();
#if PINGPONG
        if (wg != NCWG - 1) turn_pass(wg);        // the last warpgroup's last turn needs no successor
#endif
        wgmma_wait<0>();
        fence_f<OREG>(o);
    }

    // ---- epilogue: O / l through this warpgroup's rows of the Q tile (swizzled), 16-byte global stores; L ----
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
    const float inv[2] = {(l[0] > 0.f) ? 1.f / l[0] : 0.f, (l[1] > 0.f) ? 1.f / l[1] : 0.f};
    named_bar_sync(1 + wg, 128);                  // every warp of this warpgroup is past its last wgmma
#pragma unroll
    for (int c = 0; c < D / 8; ++c) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int rr = 64 * wg + 16 * wl + (lane >> 2) + 8 * h;     // row within the CTA tile
            const u32 addr = sQ + (c >> 3) * PANEL_Q + rr * 128 + ((((c & 7) ^ (rr & 7))) << 4) + (lane & 3) * 4;
            st_shared_u32(addr, pack_h2(o[4 * c + 2 * h] * inv[h], o[4 * c + 2 * h + 1] * inv[h]));
        }
    }
    if ((lane & 3) == 0) {
        float* Lb = L + (size_t)bh * N;
        const float ln2 = 0.6931471805599453f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = row_lo + 8 * h;
            if (row < N) Lb[row] = (m[h] * sl2 + fast_log2(l[h])) * ln2;
        }
    }
    named_bar_sync(1 + wg, 128);
    h16* Ob = O + (size_t)bh * N * D;
    constexpr int CPR = D / 8;                    // 16-byte chunks per row
#pragma unroll
    for (int it = 0; it < 64 * CPR / 128; ++it) {
        const int idx = ctid + it * 128;
        const int r = idx / CPR, c = idx % CPR;
        const int rr = 64 * wg + r;
        const int grow = q0 + rr;
        if (grow < N) {
            const uint4 v = ld_shared_v4(sQ + (c >> 3) * PANEL_Q + rr * 128 + (((c & 7) ^ (rr & 7)) << 4));
            *reinterpret_cast<uint4*>(Ob + (size_t)grow * D + c * 8) = v;
        }
    }
#undef FULL_K
#undef FULL_V
#undef EMPTY_K
#undef EMPTY_V
}
