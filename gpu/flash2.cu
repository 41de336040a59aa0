// iosim gpu/flash2.cu -- FlashAttention-2 forward order (Dao 2023, Algorithm 1 of FA2).
//
// grid = (ceil(N/BR), B*H); each CTA owns one Q block of BR rows and streams every K/V block of BC rows
// through shared memory (double-buffered cp.async). NWARPS = BR/(16*WM) warps, each owning 16*WM query rows.
// S = Q K^T and O += P V run on the tensor cores with mma.sync.m16n8k16 (f16 in, f32 accumulate);
// Q fragments stay in registers for the whole CTA (QREG=1); P never leaves registers (the S accumulator layout
// of two adjacent n-tiles is exactly the A-operand layout of one k-step of the PV mma).
// Online softmax in base 2: p = 2^(s*scale*log2e - m*scale*log2e).
// Writes O (fp16, (B,H,N,D)) and the log-sum-exp L (fp32, (B,H,N), natural log, of scale*QK^T) once.
//
// Compile-time parameters (defines): HEAD_DIM (64/128), BR, BC (multiples of 16), WM, QREG. Causal is a run-time flag.
//
// GQA (define GQA=1; gpu/inference.py): K, V are (B, Hkv, M, D) with Hkv = H / group; query head h of batch b
// (blockIdx.y = b*H + h) reads kv head h / group, i.e. K/V slice blockIdx.y / group; the kernel takes two more
// arguments (int M, int group). M may differ from N; causal is then aligned at the end: query row r sees key c
// iff c <= r + (M - N). Without GQA the kernel (signature, code, SASS) is the MHA kernel: M = N, group = 1.
#include "common.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef BR
#define BR 128
#endif
#ifndef BC
#define BC 64
#endif
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 1
#endif
#ifndef WM
#define WM 1      // 16-row m-tiles per warp (1: 16 rows, 2: 32 rows -- halves the K/V shared-memory reads per FLOP)
#endif
#ifndef GQA
#define GQA 0     // 1: grouped-query K/V (B, H/group, M, D) and two more kernel arguments (M, group); see above
#endif
#ifndef QREG
#define QREG 1    // 1: Q fragments live in registers for the whole CTA; 0: re-read from shared memory each block
#endif

constexpr int D = HEAD_DIM;
constexpr int ROWS_W = 16 * WM;          // query rows per warp
constexpr int NWARPS = BR / ROWS_W;
constexpr int THREADS = NWARPS * 32;
constexpr int NT = BC / 8;     // n-tiles of S per m-tile
constexpr int KD = D / 16;     // k-steps of QK^T
constexpr int DT = D / 8;      // n-tiles of O per m-tile
constexpr int KT = BC / 16;    // k-steps of PV
static_assert(BR % ROWS_W == 0 && BC % 16 == 0 && D % 16 == 0, "block sizes");
static_assert(NT % 2 == 0 && DT % 2 == 0 && KD % 2 == 0, "pairs of n-tiles");

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
flash2_fwd(const h16* __restrict__ Q, const h16* __restrict__ K, const h16* __restrict__ V,
           h16* __restrict__ O, float* __restrict__ L, int N, float scale, int causal
#if GQA
           , int M, int group
#endif
           )
{
#if GQA
#define KV_LEN M                 // K/V rows per (batch, kv head)
#define KV_OFF (M - N)           // end-aligned causal: row r sees keys c <= r + KV_OFF
#define KV_SLICE (bh / group)    // (b*H + h) / group = b*Hkv + h/group
#else
#define KV_LEN N
#define KV_OFF 0
#define KV_SLICE bh
#endif
    extern __shared__ __align__(128) unsigned char smem_raw[];
    h16* sQ = reinterpret_cast<h16*>(smem_raw);            // BR x D
    h16* sK = sQ + BR * D;                                   // 2 x BC x D
    h16* sV = sK + 2 * BC * D;                               // 2 x BC x D

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int nqb = gridDim.x;
    // causal: schedule the longest (last) row blocks first
    const int qb = causal ? (nqb - 1 - (int)blockIdx.x) : (int)blockIdx.x;
    const int q0 = qb * BR;
    const size_t bh = blockIdx.y;
    const h16* Qb = Q + bh * (size_t)N * D;
    const h16* Kb = K + KV_SLICE * (size_t)KV_LEN * D;
    const h16* Vb = V + KV_SLICE * (size_t)KV_LEN * D;

    const int nkb_all = (KV_LEN + BC - 1) / BC;
    int nkb = nkb_all;
    if (causal) {
        const int last_row = min(q0 + BR, N) - 1;
        nkb = min(nkb_all, (last_row + KV_OFF) / BC + 1);
    }

    const float sl2 = scale * 1.4426950408889634f;  // scale * log2(e)
    const int g = lane >> 2, c4 = lane & 3;
    const int wrow0 = q0 + warp * ROWS_W;           // first query row of this warp

    // prologue: Q, K0, V0
    load_tile_async<BR, D, THREADS>(sQ, Qb, q0, N, tid);
    load_tile_async<BC, D, THREADS>(sK, Kb, 0, KV_LEN, tid);
    load_tile_async<BC, D, THREADS>(sV, Vb, 0, KV_LEN, tid);
    cp_async_commit();

#if QREG
    u32 qf[WM][KD][4];
#endif
    float o[WM][DT][4];
    float m_[WM][2], l_[WM][2];   // running max (raw score units) and per-thread partial row sums
#pragma unroll
    for (int mt = 0; mt < WM; ++mt) {
#pragma unroll
        for (int i = 0; i < DT; ++i) { o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f; }
        m_[mt][0] = m_[mt][1] = NEG_INF_F;
        l_[mt][0] = l_[mt][1] = 0.f;
    }

    const u32 sQa = smem_addr(sQ), sKa = smem_addr(sK), sVa = smem_addr(sV);

    for (int j = 0; j < nkb; ++j) {
        cp_async_wait<0>();
        __syncthreads();
#if QREG
        if (j == 0) {
#pragma unroll
            for (int mt = 0; mt < WM; ++mt)
#pragma unroll
                for (int kk = 0; kk < KD; ++kk) {
                    const int r = warp * ROWS_W + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    const int c = 2 * kk + (lane >> 4);
                    ldsm_x4(qf[mt][kk][0], qf[mt][kk][1], qf[mt][kk][2], qf[mt][kk][3], sQa + swz<D>(r, c) * 2);
                }
        }
#endif
        if (j + 1 < nkb) {
            const int nb = (j + 1) & 1;
            load_tile_async<BC, D, THREADS>(sK + nb * BC * D, Kb, (j + 1) * BC, KV_LEN, tid);
            load_tile_async<BC, D, THREADS>(sV + nb * BC * D, Vb, (j + 1) * BC, KV_LEN, tid);
            cp_async_commit();
        }
        const int k0 = j * BC;
        // causal: this warp's rows all lie left of (above) this block -> nothing to add
        if (causal && k0 > wrow0 + ROWS_W - 1 + KV_OFF) continue;

        const int buf = j & 1;
        const u32 kbase = sKa + buf * BC * D * 2;
        const u32 vbase = sVa + buf * BC * D * 2;

        // ---- S = Q K^T (ROWS_W x BC per warp) ----
        float s[WM][NT][4];
#pragma unroll
        for (int mt = 0; mt < WM; ++mt)
#pragma unroll
            for (int i = 0; i < NT; ++i) { s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f; }
#pragma unroll
        for (int kk = 0; kk < KD; kk += 2) {
#if !QREG
            u32 qa[WM][2][4];
#pragma unroll
            for (int mt = 0; mt < WM; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = warp * ROWS_W + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    const int c = 2 * (kk + h) + (lane >> 4);
                    ldsm_x4(qa[mt][h][0], qa[mt][h][1], qa[mt][h][2], qa[mt][h][3], sQa + swz<D>(r, c) * 2);
                }
#endif
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                u32 b0, b1, b2, b3;
                const int r = nt * 8 + (lane & 7);
                const int c = 2 * kk + (lane >> 3);
                ldsm_x4(b0, b1, b2, b3, kbase + swz<D>(r, c) * 2);
#pragma unroll
                for (int mt = 0; mt < WM; ++mt) {
#if QREG
                    mma16816(s[mt][nt], qf[mt][kk], b0, b1);
                    mma16816(s[mt][nt], qf[mt][kk + 1], b2, b3);
#else
                    mma16816(s[mt][nt], qa[mt][0], b0, b1);
                    mma16816(s[mt][nt], qa[mt][1], b2, b3);
#endif
                }
            }
        }

        // ---- mask tail columns / causal ----
        const bool need_mask = (k0 + BC > KV_LEN) || (causal && (k0 + BC - 1 > wrow0 + KV_OFF));
        if (need_mask) {
#pragma unroll
            for (int mt = 0; mt < WM; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int col = k0 + nt * 8 + 2 * c4 + (e & 1);
                        const int row = wrow0 + mt * 16 + g + ((e < 2) ? 0 : 8);
                        if (col >= KV_LEN || (causal && col > row + KV_OFF)) s[mt][nt][e] = NEG_INF_F;
                    }
                }
        }

        // ---- online softmax ----
        u32 pf[WM][KT][4];
#pragma unroll
        for (int mt = 0; mt < WM; ++mt) {
            float mx_a = m_[mt][0], mx_b = m_[mt][1];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                mx_a = fmaxf(mx_a, fmaxf(s[mt][nt][0], s[mt][nt][1]));
                mx_b = fmaxf(mx_b, fmaxf(s[mt][nt][2], s[mt][nt][3]));
            }
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
            const float ms_a = (mx_a == NEG_INF_F) ? 0.f : mx_a * sl2;
            const float ms_b = (mx_b == NEG_INF_F) ? 0.f : mx_b * sl2;
            const float alpha_a = fast_exp2(m_[mt][0] * sl2 - ms_a);   // m = -inf -> 0
            const float alpha_b = fast_exp2(m_[mt][1] * sl2 - ms_b);
            m_[mt][0] = mx_a; m_[mt][1] = mx_b;

            float rs_a = 0.f, rs_b = 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const float p0 = fast_exp2(fmaf(s[mt][nt][0], sl2, -ms_a));
                const float p1 = fast_exp2(fmaf(s[mt][nt][1], sl2, -ms_a));
                const float p2 = fast_exp2(fmaf(s[mt][nt][2], sl2, -ms_b));
                const float p3 = fast_exp2(fmaf(s[mt][nt][3], sl2, -ms_b));
                rs_a += p0 + p1;
                rs_b += p2 + p3;
                // A-operand of k-step nt/2: a0=(g, lo cols) a1=(g+8, lo) a2=(g, hi) a3=(g+8, hi)
                pf[mt][nt >> 1][(nt & 1) * 2 + 0] = pack_h2(p0, p1);
                pf[mt][nt >> 1][(nt & 1) * 2 + 1] = pack_h2(p2, p3);
            }
            l_[mt][0] = l_[mt][0] * alpha_a + rs_a;
            l_[mt][1] = l_[mt][1] * alpha_b + rs_b;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                o[mt][dt][0] *= alpha_a; o[mt][dt][1] *= alpha_a;
                o[mt][dt][2] *= alpha_b; o[mt][dt][3] *= alpha_b;
            }
        }

        // ---- O += P V ----
#pragma unroll
        for (int kt = 0; kt < KT; ++kt) {
#pragma unroll
            for (int dt = 0; dt < DT; dt += 2) {
                u32 b0, b1, b2, b3;
                const int r = kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                const int c = dt + (lane >> 4);
                ldsm_x4_t(b0, b1, b2, b3, vbase + swz<D>(r, c) * 2);
#pragma unroll
                for (int mt = 0; mt < WM; ++mt) {
                    mma16816(o[mt][dt], pf[mt][kt], b0, b1);
                    mma16816(o[mt][dt + 1], pf[mt][kt], b2, b3);
                }
            }
        }
    }

    // ---- epilogue: O /= l, write O (fp16) through this warp's rows of sQ, and L ----
    __syncwarp();
    h16* sO = sQ;  // this warp only ever read its own rows of sQ
    float* Lb = L + bh * (size_t)N;
#pragma unroll
    for (int mt = 0; mt < WM; ++mt) {
        float l_a = l_[mt][0], l_b = l_[mt][1];
        l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
        l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
        l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
        l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
        const float inv_a = (l_a > 0.f) ? 1.f / l_a : 0.f;
        const float inv_b = (l_b > 0.f) ? 1.f / l_b : 0.f;
        const int ra = warp * ROWS_W + mt * 16 + g, rb = ra + 8;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            *reinterpret_cast<u32*>(sO + swz<D>(ra, dt) + 2 * c4) = pack_h2(o[mt][dt][0] * inv_a, o[mt][dt][1] * inv_a);
            *reinterpret_cast<u32*>(sO + swz<D>(rb, dt) + 2 * c4) = pack_h2(o[mt][dt][2] * inv_b, o[mt][dt][3] * inv_b);
        }
        if (c4 == 0) {
            const float ln2 = 0.6931471805599453f;
            const int row_a = q0 + ra, row_b = q0 + rb;
            if (row_a < N) Lb[row_a] = (m_[mt][0] * sl2 + fast_log2(l_a)) * ln2;
            if (row_b < N) Lb[row_b] = (m_[mt][1] * sl2 + fast_log2(l_b)) * ln2;
        }
    }
    __syncwarp();
    h16* Ob = O + bh * (size_t)N * D;
    constexpr int CPR = D / 8;
#pragma unroll
    for (int it = 0; it < ROWS_W * CPR / 32; ++it) {
        const int idx = lane + it * 32;
        const int r = idx / CPR, c = idx % CPR;
        const int grow = wrow0 + r;
        if (grow < N) {
            const uint4 v = *reinterpret_cast<const uint4*>(sO + swz<D>(warp * ROWS_W + r, c));
            *reinterpret_cast<uint4*>(Ob + (size_t)grow * D + c * 8) = v;
        }
    }
}
