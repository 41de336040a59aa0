// iosim gpu/flash1.cu -- FlashAttention (Dao et al. 2022) Algorithm 1 order, forward.
//
// grid = B*H CTAs. Each CTA walks the K/V blocks j (outer loop): K_j, V_j go to shared memory once; then
// for every Q block i (inner loop) the CTA reads Q_i, O_i, l_i, m_i from HBM, computes S = scale Q_i K_j^T,
// m~ = rowmax(S), P~ = exp(S - m~), l~ = rowsum(P~), m_new = max(m_i, m~),
// l_new = e^(m_i - m_new) l_i + e^(m~ - m_new) l~, and
// O_i <- diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~ - m_new) P~ V_j), then writes O_i, l_i, m_i back.
// O_i, l_i, m_i scratch is float32 in HBM (Os, Ls, Ms). The last visit of a row block writes the final O in fp16.
// Deviation from the paper's line 2 (O=0, l=0, m=-inf initialised in HBM): the first visit (j = 0) starts
// from those values in registers instead of reading them, which saves one pass and one memset.
// Each warp owns 16 rows of Q_i and loads them itself (per-warp double buffer), so the inner loop needs no
// CTA-wide barrier. Causal: Q blocks entirely above the diagonal of block j are skipped.
//
// Loads of the HBM scratch: each thread loads its whole fragment of O_i (DT x 2 float2) and its l_i, m_i in one
// batch, before any of them is used, so a warp waits for them once per (j, i) step instead of once per 8-column
// tile of O_i (the earlier version's per-column-tile load/branch/store blocks: 1 + D/8 round trips per step).
// l_i, m_i are issued before the QK^T mma; O_i too where registers allow (O_EARLY), else right after the PV mma.
//
// Compile-time parameters: HEAD_DIM, BR, BC, O_EARLY (default 1 for BC < 128; with BC = 128 the S tile already
// takes 64 registers a thread, and holding O_i across the mma loops spills (d=128) or splits the batch (d=64)
// and measured slower). Causal is a run-time flag.
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

constexpr int D = HEAD_DIM;
constexpr int NWARPS = BR / 16;
constexpr int THREADS = NWARPS * 32;
constexpr int NT = BC / 8;
constexpr int KD = D / 16;
constexpr int DT = D / 8;
constexpr int KT = BC / 16;
static_assert(BR % 16 == 0 && BC % 16 == 0 && D % 16 == 0, "block sizes");
#ifndef O_EARLY
#define O_EARLY (BC < 128)
#endif

// This thread's fragment of O_i (rows row_a, row_b; columns dt*8 + 2*c4, +1): all 2*DT loads issued together.
__device__ __forceinline__ void load_o_frag(float2 (&oa)[DT], float2 (&ob)[DT], const float* __restrict__ Osb,
                                            int row_a, int row_b, int c4, bool ld_a, bool ld_b) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
        const int col = dt * 8 + 2 * c4;
        oa[dt] = ld_a ? *reinterpret_cast<const float2*>(Osb + (size_t)row_a * D + col) : mk_f2(0.f, 0.f);
        ob[dt] = ld_b ? *reinterpret_cast<const float2*>(Osb + (size_t)row_b * D + col) : mk_f2(0.f, 0.f);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
flash1_fwd(const h16* __restrict__ Q, const h16* __restrict__ K, const h16* __restrict__ V,
           h16* __restrict__ O, float* __restrict__ Os, float* __restrict__ Ls, float* __restrict__ Ms,
           int N, float scale, int causal)
{
    extern __shared__ __align__(128) unsigned char smem_raw[];
    h16* sK = reinterpret_cast<h16*>(smem_raw);   // BC x D
    h16* sV = sK + BC * D;                          // BC x D
    h16* sQ = sV + BC * D;                          // NWARPS x 2 x 16 x D

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const size_t bh = blockIdx.x;
    const h16* Qb = Q + bh * (size_t)N * D;
    const h16* Kb = K + bh * (size_t)N * D;
    const h16* Vb = V + bh * (size_t)N * D;
    h16* Ob = O + bh * (size_t)N * D;
    float* Osb = Os + bh * (size_t)N * D;
    float* Lsb = Ls + bh * (size_t)N;
    float* Msb = Ms + bh * (size_t)N;

    const int nkb = (N + BC - 1) / BC;
    const int nqb = (N + BR - 1) / BR;
    const float sl2 = scale * 1.4426950408889634f;
    const int g = lane >> 2, c4 = lane & 3;
    h16* sQw = sQ + warp * 2 * 16 * D;
    const u32 sQwa = smem_addr(sQw), sKa = smem_addr(sK), sVa = smem_addr(sV);

    for (int j = 0; j < nkb; ++j) {
        const int k0 = j * BC;
        __syncthreads();  // everyone is done with K_{j-1}, V_{j-1}
        load_tile_async<BC, D, THREADS>(sK, Kb, k0, N, tid);
        load_tile_async<BC, D, THREADS>(sV, Vb, k0, N, tid);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        const int i_start = causal ? (k0 / BR) : 0;
        // prefetch this warp's 16 rows of Q_{i_start}
        load_tile_async<16, D, 32>(sQw, Qb, i_start * BR + warp * 16, N, lane);
        cp_async_commit();

        for (int i = i_start; i < nqb; ++i) {
            const int wrow0 = i * BR + warp * 16;
            const int buf = (i - i_start) & 1;
            cp_async_wait<0>();
            __syncwarp();
            u32 qf[KD][4];
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                const int r = buf * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                const int c = 2 * kk + (lane >> 4);
                ldsm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], sQwa + swz<D>(r, c) * 2);
            }
            __syncwarp();
            if (i + 1 < nqb) {
                load_tile_async<16, D, 32>(sQw + (buf ^ 1) * 16 * D, Qb, wrow0 + BR, N, lane);
                cp_async_commit();
            }
            // rows of this warp all lie above this K block (causal) or past N: nothing to do
            if (wrow0 >= N) continue;
            if (causal && k0 > wrow0 + 15) continue;
            // last K block that touches these rows: finalise there
            const int j_last = causal ? min(nkb - 1, (wrow0 + 15) / BC) : (nkb - 1);
            const bool first = (j == 0);
            const bool last = (j == j_last);

            const int row_a = wrow0 + g, row_b = row_a + 8;
            const bool va = row_a < N, vb = row_b < N;

            // ---- previous statistics l_i, m_i (and O_i if O_EARLY) from HBM, issued before the QK^T mma so
            // that their DRAM latency overlaps it ----
            float mi_a = NEG_INF_F, mi_b = NEG_INF_F, li_a = 0.f, li_b = 0.f;  // stored in base-2 units
            if (!first) {
                if (va) { mi_a = Msb[row_a]; li_a = Lsb[row_a]; }
                if (vb) { mi_b = Msb[row_b]; li_b = Lsb[row_b]; }
            }
            float2 oa[DT], ob[DT];
            if constexpr (O_EARLY) load_o_frag(oa, ob, Osb, row_a, row_b, c4, !first && va, !first && vb);

            // ---- S = Q_i K_j^T ----
            float s[NT][4];
#pragma unroll
            for (int t = 0; t < NT; ++t) { s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f; }
#pragma unroll
            for (int kk = 0; kk < KD; kk += 2) {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    u32 b0, b1, b2, b3;
                    const int r = nt * 8 + (lane & 7);
                    const int c = 2 * kk + (lane >> 3);
                    ldsm_x4(b0, b1, b2, b3, sKa + swz<D>(r, c) * 2);
                    mma16816(s[nt], qf[kk], b0, b1);
                    mma16816(s[nt], qf[kk + 1], b2, b3);
                }
            }
            if ((k0 + BC > N) || (causal && (k0 + BC - 1 > wrow0))) {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int col = k0 + nt * 8 + 2 * c4 + (e & 1);
                        const int row = (e < 2) ? row_a : row_b;
                        if (col >= N || (causal && col > row)) s[nt][e] = NEG_INF_F;
                    }
                }
            }
            // ---- block statistics m~, P~, l~ ----
            float mt_a = NEG_INF_F, mt_b = NEG_INF_F;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                mt_a = fmaxf(mt_a, fmaxf(s[nt][0], s[nt][1]));
                mt_b = fmaxf(mt_b, fmaxf(s[nt][2], s[nt][3]));
            }
            mt_a = fmaxf(mt_a, __shfl_xor_sync(0xffffffffu, mt_a, 1));
            mt_a = fmaxf(mt_a, __shfl_xor_sync(0xffffffffu, mt_a, 2));
            mt_b = fmaxf(mt_b, __shfl_xor_sync(0xffffffffu, mt_b, 1));
            mt_b = fmaxf(mt_b, __shfl_xor_sync(0xffffffffu, mt_b, 2));
            // scores in base-2 units: x = s * scale * log2e
            const float mts_a = (mt_a == NEG_INF_F) ? NEG_INF_F : mt_a * sl2;
            const float mts_b = (mt_b == NEG_INF_F) ? NEG_INF_F : mt_b * sl2;
            const float msub_a = (mt_a == NEG_INF_F) ? 0.f : mts_a;
            const float msub_b = (mt_b == NEG_INF_F) ? 0.f : mts_b;
            float lt_a = 0.f, lt_b = 0.f;
            u32 pf[KT][4];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const float p0 = fast_exp2(fmaf(s[nt][0], sl2, -msub_a));
                const float p1 = fast_exp2(fmaf(s[nt][1], sl2, -msub_a));
                const float p2 = fast_exp2(fmaf(s[nt][2], sl2, -msub_b));
                const float p3 = fast_exp2(fmaf(s[nt][3], sl2, -msub_b));
                lt_a += p0 + p1;
                lt_b += p2 + p3;
                pf[nt >> 1][(nt & 1) * 2 + 0] = pack_h2(p0, p1);
                pf[nt >> 1][(nt & 1) * 2 + 1] = pack_h2(p2, p3);
            }
            lt_a += __shfl_xor_sync(0xffffffffu, lt_a, 1);
            lt_a += __shfl_xor_sync(0xffffffffu, lt_a, 2);
            lt_b += __shfl_xor_sync(0xffffffffu, lt_b, 1);
            lt_b += __shfl_xor_sync(0xffffffffu, lt_b, 2);

            const float mn_a = fmaxf(mi_a, mts_a), mn_b = fmaxf(mi_b, mts_b);
            const float mnz_a = (mn_a == NEG_INF_F) ? 0.f : mn_a;
            const float mnz_b = (mn_b == NEG_INF_F) ? 0.f : mn_b;
            const float ea_old = fast_exp2(mi_a - mnz_a), eb_old = fast_exp2(mi_b - mnz_b);
            const float ea_new = fast_exp2(msub_a - mnz_a) * (mt_a == NEG_INF_F ? 0.f : 1.f);
            const float eb_new = fast_exp2(msub_b - mnz_b) * (mt_b == NEG_INF_F ? 0.f : 1.f);
            const float ln_a = ea_old * li_a + ea_new * lt_a;
            const float ln_b = eb_old * li_b + eb_new * lt_b;
            const float inv_a = ln_a > 0.f ? 1.f / ln_a : 0.f;
            const float inv_b = ln_b > 0.f ? 1.f / ln_b : 0.f;

            // ---- P~ V_j ----
            float acc[DT][4];
#pragma unroll
            for (int t = 0; t < DT; ++t) { acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f; }
#pragma unroll
            for (int kt = 0; kt < KT; ++kt) {
#pragma unroll
                for (int dt = 0; dt < DT; dt += 2) {
                    u32 b0, b1, b2, b3;
                    const int r = kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    const int c = dt + (lane >> 4);
                    ldsm_x4_t(b0, b1, b2, b3, sVa + swz<D>(r, c) * 2);
                    mma16816(acc[dt], pf[kt], b0, b1);
                    mma16816(acc[dt + 1], pf[kt], b2, b3);
                }
            }
            if constexpr (!O_EARLY) load_o_frag(oa, ob, Osb, row_a, row_b, c4, !first && va, !first && vb);
            // ---- O_i update (rescale old O) and write back: one loop per destination, so no branch separates
            // the loads from each other or from the stores ----
            const float fo_a = li_a * ea_old * inv_a, fo_b = li_b * eb_old * inv_b;
            const float fn_a = ea_new * inv_a, fn_b = eb_new * inv_b;
            if (last) {
#pragma unroll
                for (int dt = 0; dt < DT; ++dt) {
                    const int col = dt * 8 + 2 * c4;
                    if (va) *reinterpret_cast<u32*>(Ob + (size_t)row_a * D + col) =
                        pack_h2(fo_a * oa[dt].x + fn_a * acc[dt][0], fo_a * oa[dt].y + fn_a * acc[dt][1]);
                    if (vb) *reinterpret_cast<u32*>(Ob + (size_t)row_b * D + col) =
                        pack_h2(fo_b * ob[dt].x + fn_b * acc[dt][2], fo_b * ob[dt].y + fn_b * acc[dt][3]);
                }
            } else {
#pragma unroll
                for (int dt = 0; dt < DT; ++dt) {
                    const int col = dt * 8 + 2 * c4;
                    if (va) *reinterpret_cast<float2*>(Osb + (size_t)row_a * D + col) =
                        mk_f2(fo_a * oa[dt].x + fn_a * acc[dt][0], fo_a * oa[dt].y + fn_a * acc[dt][1]);
                    if (vb) *reinterpret_cast<float2*>(Osb + (size_t)row_b * D + col) =
                        mk_f2(fo_b * ob[dt].x + fn_b * acc[dt][2], fo_b * ob[dt].y + fn_b * acc[dt][3]);
                }
            }
            if (!last && c4 == 0) {
                if (va) { Msb[row_a] = mn_a; Lsb[row_a] = ln_a; }
                if (vb) { Msb[row_b] = mn_b; Lsb[row_b] = ln_b; }
            }
        }
    }
}
