// iosim gpu/decode.cu -- split-KV decoding ("flash_decoding"): flash_decoding_split + flash_decoding_combine.
//
// Shapes: Q, O (B, H, N, D) fp16; K, V (B, Hkv, M, D) fp16, Hkv = H / group; query head h reads kv head
// h / group. Causal (run-time flag) is aligned at the end: query row n sees key c iff c <= n + (M - N).
//
// flash_decoding_split: grid (num_splits, Hkv * row_chunks, B), split fastest. One CTA = one (batch b, kv head,
// split s) and ROWS = 16*MT query rows of the group: the group's g heads x N positions are g*N rows that lie
// contiguously in Q (heads kvh*g .. kvh*g+g-1 of batch b), row r = hh*N + n. More than ROWS rows -> more row
// chunks (blockIdx.y = kvh * row_chunks + chunk; each chunk re-streams the split's K/V, mostly from L2).
// Split s owns KV blocks [s*c, min((s+1)*c, ceil(M/BC))) of BC rows, c = ceil(ceil(M/BC) / num_splits).
// The CTA reads its Q rows once (to registers as mma.sync A fragments; rows >= g*N are zero), then streams its
// KV blocks through a STAGES-deep cp.async ring in shared memory (STAGES-1 blocks in flight). Each of the
// NWARPS = BC/16 warps owns 16 keys of every block: S = Q K_w^T and O_w += P V_w with mma.sync.m16n8k16
// (query rows padded to 16: decode is memory-bound, the tensor cores have > 10x headroom), its own online
// softmax (m, l, O in registers). At the end the warps' states are merged through shared memory.
// num_splits == 1: writes O (fp16) and L (fp32, natural-log LSE of scale*QK^T) directly.
// num_splits  > 1: writes O_part fp32 (B, H, num_splits, N, D), normalised by its own l, and
//                  L_part fp32 (B, H, num_splits, N) (= -inf for a split that sees no key).
// flash_decoding_combine: one warp per output row (b, h, n): L = log sum_s exp(L_s), O = sum_s exp(L_s - L) O_s.
//
// ROWSPLIT=1 (for g*N > 16, e.g. speculative decoding): the warps split the rows instead of the keys: warp w owns
// query rows [16w, 16w+16) of the CTA's ROWS = 16*NWARPS and all BC keys of every block (flash2's organisation),
// so up to 16*NWARPS rows read K/V once without row chunks; the merge step then has one state per row.
// Defines: HEAD_DIM (64/128), BC (multiple of 16: NWARPS = BC/16), STAGES (>= 2), MT (1 or 2 m-tiles of rows),
// ROWSPLIT (0/1; with ROWSPLIT, MT = 1).
#include "common.cuh"

__device__ __forceinline__ float4 mk_f4(float a, float b, float c, float d) { float4 v; v.x = a; v.y = b; v.z = c; v.w = d; return v; }
__device__ __forceinline__ uint2 mk_u2(u32 a, u32 b) { uint2 v; v.x = a; v.y = b; return v; }

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef BC
#define BC 64
#endif
#ifndef STAGES
#define STAGES 4
#endif
#ifndef MT
#define MT 1
#endif
#ifndef ROWSPLIT
#define ROWSPLIT 0
#endif

constexpr int D = HEAD_DIM;
constexpr int NWARPS = BC / 16;
constexpr int THREADS = NWARPS * 32;
constexpr int KW = ROWSPLIT ? 1 : NWARPS;               // warps that share rows (and split each block's keys)
constexpr int KEYS_W = BC / KW;                         // keys of a block per warp: 16, or BC with ROWSPLIT
constexpr int NTW = KEYS_W / 8, KTW = KEYS_W / 16;      // n-tiles of S, k-steps of PV per warp and block
constexpr int ROWS = ROWSPLIT ? 16 * NWARPS : 16 * MT;  // query rows per CTA
static_assert(!ROWSPLIT || MT == 1, "ROWSPLIT uses one m-tile per warp");
constexpr int KD = D / 16;               // k-steps of QK^T
constexpr int DT = D / 8;                // n-tiles of O
static_assert(BC % 16 == 0 && D % 16 == 0 && KD % 2 == 0 && DT % 2 == 0, "block sizes");
static_assert(STAGES >= 2, "at least double buffering");
static_assert(STAGES * 2 * BC * D * 2 >= KW * ROWS * D * 4, "merge buffer must fit in the K/V ring");
static_assert(ROWS * D * 2 >= (3 * KW + 1) * ROWS * 4, "row statistics must fit in the Q tile");

extern "C" __global__ void __launch_bounds__(THREADS)
flash_decoding_split(const h16* __restrict__ Q, const h16* __restrict__ K, const h16* __restrict__ V,
                     float* __restrict__ Opart, float* __restrict__ Lpart, h16* __restrict__ O,
                     float* __restrict__ L, int N, int M, int heads, int group, int num_splits,
                     int blocks_per_split, float scale, int causal)
{
    extern __shared__ __align__(128) unsigned char smem_raw[];
    h16* sQ = reinterpret_cast<h16*>(smem_raw);             // ROWS x D
    h16* sKV = sQ + ROWS * D;                                 // STAGES x (K: BC x D, V: BC x D)

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int s = blockIdx.x;
    const int row_chunks = (group * N + ROWS - 1) / ROWS;
    const int kvh = blockIdx.y / row_chunks;
    const int r0 = (blockIdx.y % row_chunks) * ROWS;          // first group row of this CTA
    const int b = blockIdx.z;
    const int R = group * N;                                  // rows of the group
    const int hkv = heads / group;

    const size_t qrow0 = ((size_t)b * heads + (size_t)kvh * group) * N;  // group's first row in (B*H*N)
    const h16* Qg = Q + qrow0 * D;
    const size_t kvs = ((size_t)b * hkv + kvh) * (size_t)M * D;
    const h16* Kb = K + kvs;
    const h16* Vb = V + kvs;

    const int nkb = (M + BC - 1) / BC;
    const int kb0 = s * blocks_per_split;
    const int nblk = max(0, min(kb0 + blocks_per_split, nkb) - kb0);

    const float sl2 = scale * 1.4426950408889634f;
    const int g8 = lane >> 2, c4 = lane & 3;
    const int koff = M - N;

    // prologue: Q rows [r0, r0+ROWS) of the group (zero beyond R), KV blocks 0 .. STAGES-2
    load_tile_async<ROWS, D, THREADS>(sQ, Qg, r0, R, tid);
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < nblk) {
            h16* tk = sKV + st * 2 * BC * D;
            load_tile_async<BC, D, THREADS>(tk, Kb, (kb0 + st) * BC, M, tid);
            load_tile_async<BC, D, THREADS>(tk + BC * D, Vb, (kb0 + st) * BC, M, tid);
        }
        cp_async_commit();
    }

    u32 qf[MT][KD][4];
    float o[MT][DT][4];
    float m_[MT][2], l_[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int i = 0; i < DT; ++i) { o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f; }
        m_[mt][0] = m_[mt][1] = NEG_INF_F;
        l_[mt][0] = l_[mt][1] = 0.f;
    }
    const u32 sQa = smem_addr(sQ), sKVa = smem_addr(sKV);
    const int wrow = ROWSPLIT ? warp * 16 : 0;             // this warp's first row in the CTA's tile
    const int wkey = ROWSPLIT ? 0 : warp * 16;             // this warp's first key in each block
    const int kw = ROWSPLIT ? 0 : warp;                    // this warp's slot in the merge buffers

    for (int j = 0; j < nblk; ++j) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (j == 0) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int kk = 0; kk < KD; ++kk) {
                    const int r = wrow + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    const int c = 2 * kk + (lane >> 4);
                    ldsm_x4(qf[mt][kk][0], qf[mt][kk][1], qf[mt][kk][2], qf[mt][kk][3], sQa + swz<D>(r, c) * 2);
                }
        }
        {   // refill the slot consumed in iteration j-1 (every warp has passed the barrier above)
            const int jn = j + STAGES - 1;
            if (jn < nblk) {
                h16* tk = sKV + (jn % STAGES) * 2 * BC * D;
                load_tile_async<BC, D, THREADS>(tk, Kb, (kb0 + jn) * BC, M, tid);
                load_tile_async<BC, D, THREADS>(tk + BC * D, Vb, (kb0 + jn) * BC, M, tid);
            }
            cp_async_commit();
        }
        const int k0 = (kb0 + j) * BC + wkey;              // this warp's first key
        const u32 kbase = sKVa + (j % STAGES) * 2 * BC * D * 2;
        const u32 vbase = kbase + BC * D * 2;

        // ---- S = Q K_w^T: this warp's rows x KEYS_W keys ----
        float sc[MT][NTW][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NTW; ++nt) { sc[mt][nt][0] = sc[mt][nt][1] = sc[mt][nt][2] = sc[mt][nt][3] = 0.f; }
#pragma unroll
        for (int kk = 0; kk < KD; kk += 2) {
#pragma unroll
            for (int nt = 0; nt < NTW; ++nt) {
                u32 b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3, kbase + swz<D>(wkey + nt * 8 + (lane & 7), 2 * kk + (lane >> 3)) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816(sc[mt][nt], qf[mt][kk], b0, b1);
                    mma16816(sc[mt][nt], qf[mt][kk + 1], b2, b3);
                }
            }
        }
        // ---- mask: keys >= M, causal (end-aligned) ----
        if (k0 + KEYS_W > M || (causal && k0 + KEYS_W - 1 > koff)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NTW; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int col = k0 + nt * 8 + 2 * c4 + (e & 1);
                        const int n = (r0 + wrow + mt * 16 + g8 + ((e < 2) ? 0 : 8)) % N;   // query position
                        if (col >= M || (causal && col > n + koff)) sc[mt][nt][e] = NEG_INF_F;
                    }
        }
        // ---- online softmax (base 2), P packed as the A operand of the PV mma ----
        u32 pf[MT][KTW][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float mx_a = m_[mt][0], mx_b = m_[mt][1];
#pragma unroll
            for (int nt = 0; nt < NTW; ++nt) {
                mx_a = fmaxf(mx_a, fmaxf(sc[mt][nt][0], sc[mt][nt][1]));
                mx_b = fmaxf(mx_b, fmaxf(sc[mt][nt][2], sc[mt][nt][3]));
            }
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
            const float ms_a = (mx_a == NEG_INF_F) ? 0.f : mx_a * sl2;
            const float ms_b = (mx_b == NEG_INF_F) ? 0.f : mx_b * sl2;
            const float alpha_a = fast_exp2(m_[mt][0] * sl2 - ms_a);
            const float alpha_b = fast_exp2(m_[mt][1] * sl2 - ms_b);
            m_[mt][0] = mx_a; m_[mt][1] = mx_b;
            float rs_a = 0.f, rs_b = 0.f;
#pragma unroll
            for (int nt = 0; nt < NTW; ++nt) {
                const float p0 = fast_exp2(fmaf(sc[mt][nt][0], sl2, -ms_a));
                const float p1 = fast_exp2(fmaf(sc[mt][nt][1], sl2, -ms_a));
                const float p2 = fast_exp2(fmaf(sc[mt][nt][2], sl2, -ms_b));
                const float p3 = fast_exp2(fmaf(sc[mt][nt][3], sl2, -ms_b));
                rs_a += p0 + p1;
                rs_b += p2 + p3;
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
        // ---- O_w += P V_w (KTW k-steps of 16 keys) ----
#pragma unroll
        for (int kt = 0; kt < KTW; ++kt)
#pragma unroll
        for (int dt = 0; dt < DT; dt += 2) {
            u32 b0, b1, b2, b3;
            ldsm_x4_t(b0, b1, b2, b3, vbase + swz<D>(wkey + kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dt + (lane >> 4)) * 2);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma16816(o[mt][dt], pf[mt][kt], b0, b1);
                mma16816(o[mt][dt + 1], pf[mt][kt], b2, b3);
            }
        }
    }

    // ---- merge the KW partial states of each row through shared memory (KW = 1 with ROWSPLIT) ----
    cp_async_wait<0>();
    __syncthreads();                                   // ring and Q tile are free now
    float* sO = reinterpret_cast<float*>(sKV);         // KW x ROWS x D (unnormalised, own max)
    float* sM = reinterpret_cast<float*>(sQ);          // KW x ROWS: max (raw score units)
    float* sL = sM + KW * ROWS;                        // KW x ROWS: sum
    float* sF = sL + KW * ROWS;                        // KW x ROWS: weight of slot w's O
    float* sLse = sF + KW * ROWS;                      // ROWS: natural-log LSE
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float la = l_[mt][0], lb = l_[mt][1];
        la += __shfl_xor_sync(0xffffffffu, la, 1);
        la += __shfl_xor_sync(0xffffffffu, la, 2);
        lb += __shfl_xor_sync(0xffffffffu, lb, 1);
        lb += __shfl_xor_sync(0xffffffffu, lb, 2);
        const int ra = wrow + mt * 16 + g8, rb = ra + 8;
        if (c4 == 0) {
            sM[kw * ROWS + ra] = m_[mt][0]; sL[kw * ROWS + ra] = la;
            sM[kw * ROWS + rb] = m_[mt][1]; sL[kw * ROWS + rb] = lb;
        }
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            *reinterpret_cast<float2*>(sO + (kw * ROWS + ra) * D + dt * 8 + 2 * c4) = mk_f2(o[mt][dt][0], o[mt][dt][1]);
            *reinterpret_cast<float2*>(sO + (kw * ROWS + rb) * D + dt * 8 + 2 * c4) = mk_f2(o[mt][dt][2], o[mt][dt][3]);
        }
    }
    __syncthreads();
    for (int t = tid; t < ROWS; t += THREADS) {
        float mx = NEG_INF_F;
#pragma unroll
        for (int w = 0; w < KW; ++w) mx = fmaxf(mx, sM[w * ROWS + t]);
        const float ms = (mx == NEG_INF_F) ? 0.f : mx * sl2;
        float f[KW];
        float lsum = 0.f;
#pragma unroll
        for (int w = 0; w < KW; ++w) {
            f[w] = fast_exp2(sM[w * ROWS + t] * sl2 - ms);   // -inf -> 0
            lsum += sL[w * ROWS + t] * f[w];
        }
        const float inv = (lsum > 0.f) ? 1.f / lsum : 0.f;
#pragma unroll
        for (int w = 0; w < KW; ++w) sF[w * ROWS + t] = f[w] * inv;
        sLse[t] = (lsum > 0.f) ? (ms + fast_log2(lsum)) * 0.6931471805599453f : NEG_INF_F;
    }
    __syncthreads();
    const bool direct = (num_splits == 1);
    constexpr int V4 = D / 4;                          // float4 per row
    for (int idx = tid; idx < ROWS * V4; idx += THREADS) {
        const int row = idx / V4, c = (idx % V4) * 4;
        const int r = r0 + row;
        if (r >= R) continue;
        float4 acc = mk_f4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int w = 0; w < KW; ++w) {
            const float fw = sF[w * ROWS + row];
            const float4 x = *reinterpret_cast<const float4*>(sO + (w * ROWS + row) * D + c);
            acc.x += fw * x.x; acc.y += fw * x.y; acc.z += fw * x.z; acc.w += fw * x.w;
        }
        if (direct) {
            *reinterpret_cast<uint2*>(O + (qrow0 + r) * D + c) = mk_u2(pack_h2(acc.x, acc.y), pack_h2(acc.z, acc.w));
        } else {
            const int hh = r / N, n = r % N;
            const size_t prow = (((size_t)b * heads + (size_t)kvh * group + hh) * num_splits + s) * N + n;
            *reinterpret_cast<float4*>(Opart + prow * D + c) = acc;
        }
    }
    for (int t = tid; t < ROWS && r0 + t < R; t += THREADS) {
        const int r = r0 + t;
        if (direct) {
            L[qrow0 + r] = sLse[t];
        } else {
            const int hh = r / N, n = r % N;
            Lpart[(((size_t)b * heads + (size_t)kvh * group + hh) * num_splits + s) * N + n] = sLse[t];
        }
    }
}

// One warp per output row i of the (B*H*N) rows; COMBINE_WARPS rows per CTA.
#ifndef COMBINE_WARPS
#define COMBINE_WARPS 4
#endif
extern "C" __global__ void __launch_bounds__(COMBINE_WARPS * 32)
flash_decoding_combine(const float* __restrict__ Opart, const float* __restrict__ Lpart, h16* __restrict__ O,
                       float* __restrict__ L, long long rows, int N, int num_splits)
{
    const int lane = threadIdx.x & 31;
    const long long i = (long long)blockIdx.x * COMBINE_WARPS + (threadIdx.x >> 5);
    if (i >= rows) return;
    const long long bh = i / N, n = i % N;
    const float* lp = Lpart + (bh * num_splits) * N + n;          // lp[s * N]
    const float* op = Opart + ((bh * num_splits) * N + n) * D;    // op[s * N * D]
    const float log2e = 1.4426950408889634f;
    float mx = NEG_INF_F;
    for (int s = lane; s < num_splits; s += 32) mx = fmaxf(mx, lp[(size_t)s * N]);
#pragma unroll
    for (int k = 16; k > 0; k >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, k));
    const float ms = (mx == NEG_INF_F) ? 0.f : mx * log2e;
    float sum = 0.f;
    for (int s = lane; s < num_splits; s += 32) sum += fast_exp2(lp[(size_t)s * N] * log2e - ms);
#pragma unroll
    for (int k = 16; k > 0; k >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, k);
    const float lse2 = ms + fast_log2(sum);                       // log2 of sum exp(L_s); -inf if none
    constexpr int PER = D / 32;                                    // 4 (D=128) or 2 (D=64) columns per lane
    float acc[PER];
#pragma unroll
    for (int e = 0; e < PER; ++e) acc[e] = 0.f;
    if (sum > 0.f) {
        for (int s = 0; s < num_splits; ++s) {
            const float w = fast_exp2(lp[(size_t)s * N] * log2e - lse2);
            const float* src = op + (size_t)s * N * D + lane * PER;
            if (PER == 4) {
                const float4 x = *reinterpret_cast<const float4*>(src);
                acc[0] += w * x.x; acc[1] += w * x.y; acc[2 % PER] += w * x.z; acc[3 % PER] += w * x.w;
            } else {
                const float2 x = *reinterpret_cast<const float2*>(src);
                acc[0] += w * x.x; acc[1] += w * x.y;
            }
        }
    }
    h16* dst = O + i * D + lane * PER;
    if (PER == 4) {
        *reinterpret_cast<uint2*>(dst) = mk_u2(pack_h2(acc[0], acc[1]), pack_h2(acc[2 % PER], acc[3 % PER]));
    } else {
        *reinterpret_cast<u32*>(dst) = pack_h2(acc[0], acc[1]);
    }
    if (lane == 0) L[i] = (sum > 0.f) ? lse2 * 0.6931471805599453f : NEG_INF_F;
}
