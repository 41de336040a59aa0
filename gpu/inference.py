"""Inference shapes: GQA prefill (flash2 with grouped K/V) and split-KV decode (flash_decoding).

``python -m gpu.inference --out experiments/data/h100/bench_inference.json``  checks and times the sweeps
``python -m gpu.inference --ncu --merge-into FILE``     profiles the ncu sweep under Nsight Compute (DRAM bytes)
``python -m gpu.inference --precompile``                 compiles every kernel variant in parallel (CuPy cache)
``python -m gpu.sanitize --algorithms flash_decoding flash2_gqa``   memcheck / racecheck on small shapes

Shapes: Q, O (B, H, N, d) fp16; K, V (B, Hkv, M, d) fp16 (H % Hkv == 0, group g = H / Hkv, query head h reads
kv head h // g); L fp32 (B, H, N). Causal with M != N is aligned at the end: row r sees key c iff c <= r + M - N.
Kernels: ``flash2_fwd`` of gpu/flash2.cu built with GQA=1 (grid (ceil(N/Br), B*H), blockIdx.y = b*H + h);
``flash_decoding_split`` / ``flash_decoding_combine`` of gpu/decode.cu (see its header).
The error rule, input poisoning, run-twice check and CUDA-event timing are gpu/bench.py's and gpu/reference.py's;
the float64 reference is computed per batch (decode) or per (b, h) slice (prefill) with each head's kv head.
Everything above the "device" line is pure Python (tested on the CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

from . import kernels as K
from . import reference as R
from . import schema as S

ALGORITHM_DECODE = "flash_decoding"
DECODE_KERNELS = ["flash_decoding_split", "flash_decoding_combine"]
SMEM_LIMIT_BYTES = K.SMEM_LIMIT_BYTES
DECODE_LAUNCH_ORDER = "split fastest: grid (num_splits, kv_heads * row_chunks, B); blockIdx.x = split"
PREFILL_LAUNCH_ORDER = "grid (ceil(N/Br), B*H), blockIdx.y = b*H + h: a group's g query heads are adjacent"
# flash2's best committed block pairs at B=8 H=16 N=4096 (experiments/data/h100/bench.json), used when that
# file cannot be read; otherwise best_flash2_pairs() reads them from it.
FLASH2_BEST_PAIRS = {(64, False): (64, 64), (128, False): (128, 32), (64, True): (128, 64), (128, True): (64, 64)}
BENCH_JSON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "experiments", "data", "h100", "bench.json")


# ------------------------------------------------------------------------------------------ host-side logic
def check_shape(batch: int, heads: int, kv_heads: int, seq_len: int, kv_seq_len: int, head_dim: int,
                causal: bool = False) -> int:
    """Validate a GQA/decode shape; return the group size g = heads // kv_heads."""
    for name, v in (("batch", batch), ("heads", heads), ("kv_heads", kv_heads), ("seq_len", seq_len),
                    ("kv_seq_len", kv_seq_len), ("head_dim", head_dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if head_dim not in (64, 128):
        raise ValueError(f"head_dim must be 64 or 128, got {head_dim}")
    if causal and kv_seq_len < seq_len:
        raise ValueError(f"causal (end-aligned) needs kv_seq_len >= seq_len (got {kv_seq_len} < {seq_len}): "
                         "the first rows would see no key")
    return heads // kv_heads


def num_kv_blocks(kv_seq_len: int, block_cols: int) -> int:
    return -(-kv_seq_len // block_cols)


def blocks_per_split(kv_seq_len: int, block_cols: int, num_splits: int) -> int:
    """c = ceil(ceil(M / Bc) / num_splits): KV blocks of each split (the last ones may get fewer or none)."""
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return -(-num_kv_blocks(kv_seq_len, block_cols) // num_splits)


def effective_splits(kv_seq_len: int, block_cols: int, num_splits: int) -> int:
    """Splits that hold at least one KV block: ceil(ceil(M/Bc) / c) (<= num_splits); the kernels launch these."""
    return -(-num_kv_blocks(kv_seq_len, block_cols) // blocks_per_split(kv_seq_len, block_cols, num_splits))


def split_ranges(kv_seq_len: int, block_cols: int, num_splits: int) -> list[tuple[int, int]]:
    """Key range [start, stop) of each launched split (split s: KV blocks [s*c, min((s+1)*c, ceil(M/Bc))))."""
    c = blocks_per_split(kv_seq_len, block_cols, num_splits)
    nkb = num_kv_blocks(kv_seq_len, block_cols)
    out = []
    for s in range(effective_splits(kv_seq_len, block_cols, num_splits)):
        b0, b1 = min(s * c, nkb), min((s + 1) * c, nkb)
        out.append((min(b0 * block_cols, kv_seq_len), min(b1 * block_cols, kv_seq_len)))
    return out


def decode_tiling(head_dim: int, rows: int, block_cols: int | None = None, stages: int | None = None,
                  rowsplit: bool | None = None) -> dict:
    """Compile-time choice of the split kernel for ``rows`` = g*N query rows: BC (keys per block; NWARPS = BC/16),
    STAGES (cp.async ring depth) and the warp organisation: up to 16 rows, the warps split each block's keys
    (16 each) and share the CTA's 16 rows; above 16 rows (ROWSPLIT), each warp owns 16 of the CTA's BC rows and
    all keys of a block. ``block_rows`` = query rows per CTA."""
    bc = int(block_cols or 64)
    st = int(stages or 4)
    if bc % 16 or bc < 16 or bc > 256:
        raise ValueError(f"block_cols must be a multiple of 16 in [16, 256], got {bc}")
    if st < 2:
        raise ValueError(f"stages must be >= 2, got {st}")
    rs = (rows > 16) if rowsplit is None else bool(rowsplit)
    block_rows = bc if rs else 16
    return {"block_cols": bc, "stages": st, "rowsplit": rs, "mt": 1, "block_rows": block_rows,
            "threads": 32 * (bc // 16), "smem_bytes": decode_smem_bytes(head_dim, bc, st, block_rows)}


def decode_smem_bytes(head_dim: int, block_cols: int, stages: int, block_rows: int = 16) -> int:
    """Q tile (block_rows x d) + STAGES x (K, V tiles Bc x d), fp16."""
    return 2 * head_dim * (block_rows + 2 * stages * block_cols)


def row_chunks(group: int, seq_len: int, block_rows: int = 16) -> int:
    return -(-(group * seq_len) // block_rows)


def decode_grid(batch: int, kv_heads: int, group: int, seq_len: int, num_splits: int, block_rows: int = 16) -> tuple:
    return (num_splits, kv_heads * row_chunks(group, seq_len, block_rows), batch)


def decode_bytes(batch, heads, kv_heads, seq_len, kv_seq_len, head_dim, num_splits) -> dict:
    """Bytes the decode must move at least once: K, V, Q read, O (fp16) and L written; plus, with splits, the
    fp32 partials written by the split kernel and read by the combine kernel."""
    kv = 2 * 2 * batch * kv_heads * kv_seq_len * head_dim
    q = o = 2 * batch * heads * seq_len * head_dim
    lse = 4 * batch * heads * seq_len
    part = 0 if num_splits == 1 else 4 * batch * heads * num_splits * seq_len * (head_dim + 1)
    return {"kv_bytes": kv, "q_bytes": q, "o_bytes": o, "lse_bytes": lse, "partial_bytes": part,
            "total_bytes": kv + q + o + lse + 2 * part}


def visible_pairs(seq_len: int, kv_seq_len: int, causal: bool) -> int:
    """(query row, key) pairs attended: N*M, or with end-aligned causal sum_r clamp(r + M - N + 1, 0, M)."""
    N, M = seq_len, kv_seq_len
    if not causal:
        return N * M
    lo = max(0, N - M)              # rows r < N - M see no key (r + M - N + 1 <= 0)
    rows = N - lo                   # rows r >= N - M see r + M - N + 1 >= 1 keys (<= M since r <= N - 1)
    first = lo + M - N + 1
    return rows * first + rows * (rows - 1) // 2


def attention_flops_gqa(batch, heads, seq_len, kv_seq_len, head_dim, causal) -> float:
    """4 B H d x (attended pairs); causal with M == N uses the bench's convention 4 B H N^2 d / 2."""
    if causal and seq_len == kv_seq_len:
        return S.attention_flops(batch, heads, seq_len, head_dim, True)
    return 4.0 * batch * heads * head_dim * visible_pairs(seq_len, kv_seq_len, causal)


def causal_keep(seq_len: int, kv_seq_len: int, xp=None):
    """Boolean (N, M) mask of end-aligned causal attention: keep[r, c] = c <= r + M - N."""
    import numpy as np

    xp = xp or np
    return xp.tril(xp.ones((seq_len, kv_seq_len), dtype=bool), k=kv_seq_len - seq_len)


def sets_for(set_bytes: int, l2_bytes: int, cap_bytes: float = 20e9) -> int:
    """Input sets to rotate so that a run never finds the previous run's inputs in L2: >= 4 x L2 in all,
    at least 2 sets, at most 32, and at most ``cap_bytes`` of inputs (1 set when a set alone is that large)."""
    n = max(2, min(32, -(-4 * l2_bytes // max(1, set_bytes))))
    while n > 1 and n * set_bytes > cap_bytes:
        n -= 1
    return n


# sweeps (pure data)
DECODE_TARGET = dict(batch=16, heads=32, kv_heads=8, seq_len=1, kv_seq_len=32768, head_dim=128, causal=False)
SPLITS_TARGET = [1, 2, 4, 8, 16, 32]
GRID_BATCHES = [1, 4, 16, 64]
GRID_KV_LENS = [4096, 16384, 32768]
SPLITS_GRID = [1, 2, 4, 8, 16, 32]       # the roofline grid records 1, 4, 16 and the best of these
PREFILL_KV_HEADS = [32, 8, 4, 1]


def decode_shapes(name: str) -> list[dict]:
    if name == "target":
        return [dict(DECODE_TARGET, sweep="decode_target")]
    if name == "grid":
        return [dict(DECODE_TARGET, batch=b, kv_seq_len=m, sweep="decode_grid")
                for b in GRID_BATCHES for m in GRID_KV_LENS
                if not (b == DECODE_TARGET["batch"] and m == DECODE_TARGET["kv_seq_len"])]
    if name == "spec":   # speculative decoding: N = 4 and 16 query positions, causal (end-aligned)
        return [dict(DECODE_TARGET, seq_len=n, causal=True, sweep="decode_spec") for n in (4, 8, 16)]
    if name == "small":
        return [dict(batch=2, heads=8, kv_heads=2, seq_len=n, kv_seq_len=m, head_dim=d, causal=c, sweep="small")
                for (n, m) in ((1, 1000), (1, 4096), (3, 200), (16, 333)) for d in (64, 128) for c in (False, True)
                if not (n == 1 and c)]
    raise ValueError(f"unknown decode sweep {name!r}")


def prefill_shapes(name: str) -> list[dict]:
    if name == "prefill":
        return [dict(batch=8, heads=32, kv_heads=hk, seq_len=4096, kv_seq_len=4096, head_dim=d, causal=c,
                     sweep="gqa_prefill") for d in (64, 128) for c in (False, True) for hk in PREFILL_KV_HEADS]
    if name == "small":
        return [dict(batch=1, heads=4, kv_heads=hk, seq_len=n, kv_seq_len=m, head_dim=d, causal=c, sweep="small")
                for hk in (4, 1) for (n, m) in ((200, 200), (130, 300)) for d in (64, 128) for c in (False, True)]
    raise ValueError(f"unknown prefill sweep {name!r}")


def best_flash2_pairs(path: str = BENCH_JSON) -> dict:
    """{(head_dim, causal): (Br, Bc)} with the lowest median flash2 time at the bench's target shape
    (B=8, H=16, N=4096) in the committed bench data; FLASH2_BEST_PAIRS where the file lacks it."""
    best = dict(FLASH2_BEST_PAIRS)
    try:
        doc = json.load(open(path))
    except (OSError, ValueError):
        return best
    times: dict = {}
    for r in doc.get("runs", []):
        if (r.get("algorithm") == "flash2" and r.get("passed") and r.get("time_s") and r.get("batch") == 8
                and r.get("heads") == 16 and r.get("seq_len") == 4096):
            key = (r["head_dim"], bool(r["causal"]))
            t = r["time_s"]["median"]
            if key not in times or t < times[key][0]:
                times[key] = (t, (r["block_rows"], r["block_cols"]))
    best.update({k: v[1] for k, v in times.items()})
    return best


def validate(doc) -> list[str]:
    """Problems of a bench_inference document: the ``iosim-gpu-bench/1`` rules (gpu.schema) for the flash2 runs
    and the baselines, the same rules plus the inference fields for the flash_decoding runs (whose kernel list
    depends on num_splits: the combine kernel runs only when num_splits > 1)."""
    if not isinstance(doc, dict):
        return ["document must be an object"]
    runs = doc.get("runs") if isinstance(doc.get("runs"), list) else []
    known = [r for r in runs if not (isinstance(r, dict) and r.get("algorithm") == ALGORITHM_DECODE)]
    errs = S.validate(dict(doc, runs=known))
    for i, r in enumerate(runs):
        if not (isinstance(r, dict) and r.get("algorithm") == ALGORITHM_DECODE):
            continue
        w = f"runs[{i}] (flash_decoding)"
        shadow = dict(r, algorithm="flash2", kernels=[dict(k, name="flash2_fwd") for k in r.get("kernels", [])][:1])
        errs += [e.replace("runs[0]", w) for e in S.validate(dict(doc, runs=[shadow], baselines=[]))
                 if e.startswith("runs[0]")]
        want = DECODE_KERNELS if r.get("num_splits_effective", r.get("num_splits", 1)) > 1 else DECODE_KERNELS[:1]
        names = [k.get("name") for k in r.get("kernels", []) if isinstance(k, dict)]
        if names != want:
            errs.append(f"{w}.kernels names {names} != {want}")
    for i, r in enumerate(runs):
        if isinstance(r, dict):
            for k in ("kv_heads", "kv_seq_len", "num_splits"):
                if r.get("algorithm") in (ALGORITHM_DECODE, "flash2") and not isinstance(r.get(k), int):
                    errs.append(f"runs[{i}].{k} must be an integer")
    return errs


# ---------------------------------------------------------------------------------------------- device
def _rec(events, i):
    if events is not None:
        events[i].record()


def make_inputs(shape: dict, nsets: int, seed: int):
    """``nsets`` sets of (q, k, v): q (B, H, N, d), k, v (B, Hkv, M, d), standard normal rounded to fp16."""
    import cupy as cp

    B, H, Hk, N, M, d = (shape[k] for k in ("batch", "heads", "kv_heads", "seq_len", "kv_seq_len", "head_dim"))
    rs = cp.random.RandomState(seed)
    sets = []
    for _ in range(nsets):
        q = rs.standard_normal((B, H, N, d), dtype=cp.float32).astype(cp.float16)
        k = rs.standard_normal((B, Hk, M, d), dtype=cp.float32).astype(cp.float16)
        v = rs.standard_normal((B, Hk, M, d), dtype=cp.float32).astype(cp.float16)
        sets.append((q, k, v))
    return sets


def gqa_reference(q, k, v, causal: bool, xp, fp16_plain: bool = False):
    """softmax(scale q k^T [end-aligned causal]) v for q (B,H,N,d), k, v (B,Hkv,M,d): float64 (or, with
    ``fp16_plain``, the plain fp16 matmul-softmax-matmul of gpu/reference.py: S, P rounded to fp16, fp32
    accumulation). One batch at a time with the heads of a group stacked (decode), or one (b, h) slice at a
    time when N*M is large (prefill)."""
    B, H, N, d = q.shape
    Hk, M = k.shape[1], k.shape[2]
    g = H // Hk
    scale = 1.0 / math.sqrt(d)
    out = xp.empty((B, H, N, d), dtype=xp.float16 if fp16_plain else xp.float64)
    keep = causal_keep(N, M, xp) if causal else None
    wt = xp.float32 if fp16_plain else xp.float64

    def one(qq, kk, vv):   # qq (..., N, d), kk/vv (..., M, d)
        if fp16_plain:
            s = (qq.astype(wt) @ xp.swapaxes(kk.astype(wt), -1, -2)).astype(xp.float16)
            s = (s.astype(wt) * scale).astype(xp.float16).astype(wt)
        else:
            s = (qq.astype(wt) @ xp.swapaxes(kk.astype(wt), -1, -2)) * scale
        if keep is not None:
            s = xp.where(keep, s, -xp.inf)
        s -= s.max(axis=-1, keepdims=True)
        xp.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        if fp16_plain:
            s = s.astype(xp.float16).astype(wt)
        o = s @ vv.astype(wt)
        return o.astype(xp.float16) if fp16_plain else o

    if N * M <= (1 << 20):
        for b in range(B):
            qq = q[b].reshape(Hk, g, N, d)
            out[b] = one(qq, k[b][:, None], v[b][:, None]).reshape(H, N, d)
    else:
        for b in range(B):
            for h in range(H):
                out[b, h] = one(q[b, h], k[b, h // g], v[b, h // g])
    return out


DECODE_DEFAULT_TILING = {"block_cols": 64, "stages": 4}   # (BC, STAGES) of the split kernel unless given


class FlashDecoding:
    """flash_decoding_split (+ flash_decoding_combine when num_splits > 1). ``run(q, k, v, out, events=None)``
    records events[0..len(kernel_names)] around the kernels; ``self.L`` holds the LSE."""

    def __init__(self, shape: dict, num_splits: int, block_cols=None, stages=None, rowsplit=None):
        import cupy as cp

        self.shape = dict(shape)
        B, H, Hk, N, M, d = (shape[k] for k in ("batch", "heads", "kv_heads", "seq_len", "kv_seq_len", "head_dim"))
        self.causal = bool(shape.get("causal", False))
        self.g = check_shape(B, H, Hk, N, M, d, self.causal)
        self.requested_splits = int(num_splits)
        self.tiling = decode_tiling(d, self.g * N, block_cols or DECODE_DEFAULT_TILING["block_cols"],
                                    stages or DECODE_DEFAULT_TILING["stages"], rowsplit)
        self.bc, self.stages, self.rowsplit = self.tiling["block_cols"], self.tiling["stages"], self.tiling["rowsplit"]
        self.block_rows = self.tiling["block_rows"]
        self.bps = blocks_per_split(M, self.bc, self.requested_splits)
        self.num_splits = effective_splits(M, self.bc, self.requested_splits)
        self.smem = self.tiling["smem_bytes"]
        self.threads = self.tiling["threads"]
        if self.smem > SMEM_LIMIT_BYTES:
            raise ValueError(f"decode tiling needs {self.smem} B of shared memory (> {SMEM_LIMIT_BYTES})")
        defines = {"HEAD_DIM": d, "BC": self.bc, "STAGES": self.stages, "MT": 1, "ROWSPLIT": int(self.rowsplit)}
        self.k_split = K._raw_kernel("decode.cu", "flash_decoding_split", defines)
        self.k_split.max_dynamic_shared_size_bytes = self.smem
        self.k_comb = K._raw_kernel("decode.cu", "flash_decoding_combine", defines)
        self.kernel_names = list(DECODE_KERNELS) if self.num_splits > 1 else DECODE_KERNELS[:1]
        self.grid = decode_grid(B, Hk, self.g, N, self.num_splits, self.block_rows)
        self.L = cp.empty((B, H, N), dtype=cp.float32)
        if self.num_splits > 1:
            self.Opart = cp.empty((B, H, self.num_splits, N, d), dtype=cp.float32)
            self.Lpart = cp.empty((B, H, self.num_splits, N), dtype=cp.float32)
        else:   # never touched (num_splits == 1 writes O and L directly)
            self.Opart = cp.empty((1,), dtype=cp.float32)
            self.Lpart = cp.empty((1,), dtype=cp.float32)
        self.rows = B * H * N
        self.scale = 1.0 / math.sqrt(d)

    def resources(self) -> dict:
        return {"block_rows": self.block_rows, "block_cols": self.bc, "stages": self.stages,
                "warps_split": "rows (ROWSPLIT: 16 rows per warp, all keys of a block)" if self.rowsplit
                else "keys (16 keys of each block per warp, the CTA's 16 rows shared)",
                "threads": self.threads, "smem_bytes": self.smem, "registers": int(self.k_split.num_regs),
                "combine_registers": int(self.k_comb.num_regs) if self.num_splits > 1 else None,
                "grid": list(self.grid), "blocks_per_split": self.bps, "num_splits_effective": self.num_splits, "launch_order": DECODE_LAUNCH_ORDER,
                "matmul": "mma.sync.m16n8k16 f16->f32 (query rows padded to 16), P kept in registers"}

    def run(self, q, k, v, out, events=None):
        import numpy as np

        s = self.shape
        _rec(events, 0)
        self.k_split(self.grid, (self.threads,),
                     (q, k, v, self.Opart, self.Lpart, out, self.L, np.int32(s["seq_len"]), np.int32(s["kv_seq_len"]),
                      np.int32(s["heads"]), np.int32(self.g), np.int32(self.num_splits), np.int32(self.bps),
                      np.float32(self.scale), np.int32(self.causal)), shared_mem=self.smem)
        _rec(events, 1)
        if self.num_splits > 1:
            w = 4
            self.k_comb(((self.rows + w - 1) // w,), (32 * w,),
                        (self.Opart, self.Lpart, out, self.L, np.int64(self.rows), np.int32(s["seq_len"]),
                         np.int32(self.num_splits)))
            _rec(events, 2)

    def free(self):
        self.Opart = self.Lpart = self.L = None


class Flash2GQA:
    """flash2_fwd built with GQA=1 (``gqa=True``), or the unchanged MHA build (``gqa=False``, needs
    kv_heads == heads and M == N)."""

    def __init__(self, shape: dict, block_rows: int, block_cols: int, gqa: bool = True):
        import cupy as cp

        B, H, Hk, N, M, d = (shape[k] for k in ("batch", "heads", "kv_heads", "seq_len", "kv_seq_len", "head_dim"))
        self.g = check_shape(B, H, Hk, N, M, d, bool(shape.get("causal", False)))
        self.gqa = bool(gqa)
        if not self.gqa and (Hk != H or M != N):
            raise ValueError("the MHA build of flash2 needs kv_heads == heads and kv_seq_len == seq_len")
        self.shape = dict(shape)
        self.causal = bool(shape.get("causal", False))
        self.br, self.bc = int(block_rows), int(block_cols)
        if not K.flash_fits("flash2", self.br, self.bc, d):
            raise ValueError(f"flash2 ({self.br},{self.bc}) d={d} does not fit shared memory")
        self.wm, self.qreg = K.flash2_tiling(d, self.br, self.bc)
        defines = {"HEAD_DIM": d, "BR": self.br, "BC": self.bc}
        if (self.wm, self.qreg) != (1, 1):
            defines.update({"WM": self.wm, "QREG": self.qreg})
        if self.gqa:
            defines["GQA"] = 1
        self.kern = K._raw_kernel("flash2.cu", "flash2_fwd", defines)
        self.smem = K.flash_smem_bytes("flash2", self.br, self.bc, d)
        self.kern.max_dynamic_shared_size_bytes = self.smem
        self.threads = (self.br // (16 * self.wm)) * 32
        self.kernel_names = ["flash2_fwd"]
        self.L = cp.empty((B, H, N), dtype=cp.float32)
        self.scale = 1.0 / math.sqrt(d)

    def resources(self) -> dict:
        return {"block_rows": self.br, "block_cols": self.bc, "stages": 2, "threads": self.threads,
                "smem_bytes": self.smem, "registers": int(self.kern.num_regs), "warp_rows": 16 * self.wm,
                "q_in_registers": bool(self.qreg), "gqa_build": self.gqa, "launch_order": PREFILL_LAUNCH_ORDER,
                "matmul": "mma.sync.m16n8k16 f16->f32"}

    def run(self, q, k, v, out, events=None):
        import numpy as np

        s = self.shape
        B, H, N = s["batch"], s["heads"], s["seq_len"]
        args = [q, k, v, out, self.L, np.int32(N), np.float32(self.scale), np.int32(self.causal)]
        if self.gqa:
            args += [np.int32(s["kv_seq_len"]), np.int32(self.g)]
        _rec(events, 0)
        self.kern(((N + self.br - 1) // self.br, B * H), (self.threads,), tuple(args), shared_mem=self.smem)
        _rec(events, 1)

    def free(self):
        self.L = None


class TorchSDPA:
    """torch SDPA on the same inputs: ``variant='enable_gqa'`` (K/V of Hkv heads, enable_gqa=True) or
    ``'expanded'`` (K/V repeated to H heads beforehand, outside the timing: the MHA equivalent)."""

    def __init__(self, shape: dict, variant: str, expanded_sets=None):
        import torch

        self.torch = torch
        self.variant = variant
        self.causal = bool(shape["causal"])
        if self.causal and shape["seq_len"] != shape["kv_seq_len"]:
            raise ValueError("torch SDPA's is_causal is aligned at the top left; only M == N is compared")
        self.kernel_names = ["torch_sdpa"]
        self.expanded = expanded_sets   # {id(k): (k_expanded, v_expanded)}

    def run(self, q, k, v, out, events=None):
        torch = self.torch
        tq = torch.from_dlpack(q)
        if self.variant == "expanded":
            tk, tv = self.expanded[id(k)]
            kw = {}
        else:
            tk, tv = torch.from_dlpack(k), torch.from_dlpack(v)
            kw = {"enable_gqa": True}
        _rec(events, 0)
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=self.causal, **kw)
        _rec(events, 1)
        if events is None:
            torch.from_dlpack(out).copy_(o)


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> dict:
    """Device-to-device copy (cudaMemcpyAsync) of ``nbytes``: (read + written bytes) / median time."""
    import cupy as cp
    from .bench import _stats

    src = cp.empty(nbytes // 2, dtype=cp.float16)
    src.fill(1.0)
    dst = cp.empty_like(src)
    ts = []
    for i in range(reps + 3):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, 3, cp.cuda.get_current_stream().ptr)
        e1.record()
        e1.synchronize()
        if i >= 3:
            ts.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3)
    t = _stats(ts)
    del src, dst
    return {"bytes_per_s": 2 * nbytes / t["median"], "buffer_bytes": nbytes, "time_s": t,
            "method": "cudaMemcpyAsync device to device, (read + written bytes) / median of 20 CUDA-event times"}


def _shape_key(shape):
    return tuple(shape[k] for k in ("batch", "heads", "kv_heads", "seq_len", "kv_seq_len", "head_dim", "causal"))


def run_shape(shape: dict, configs: list[dict], args, log, baselines=True) -> tuple[list, list]:
    """Check and time each configuration on one shape. A config: {"algorithm": "flash_decoding",
    "num_splits": s, "block_cols": .., "stages": ..} or {"algorithm": "flash2", "block_rows", "block_cols",
    "gqa": bool}. Returns (runs, baselines)."""
    import cupy as cp
    from . import bench as BN

    B, H, Hk, N, M, d, causal = _shape_key(shape)
    set_bytes = 2 * (B * H * N * d + 2 * B * Hk * M * d)
    l2 = cp.cuda.runtime.getDeviceProperties(0)["l2CacheSize"]
    nsets = args.input_sets or sets_for(set_bytes, l2)
    seed = args.seed + 7 * N + 3 * d + 11 * M + 13 * B + Hk + int(causal)
    sets = make_inputs(shape, nsets, seed)
    q0, k0, v0 = sets[0]
    ref = gqa_reference(q0, k0, v0, causal, cp)
    e16 = R.rel_error(gqa_reference(q0, k0, v0, causal, cp, fp16_plain=True), ref, xp=cp)
    out = cp.empty((B, H, N, d), dtype=cp.float16)
    flops = attention_flops_gqa(B, H, N, M, d, causal)
    common = {k: shape[k] for k in ("batch", "heads", "seq_len", "head_dim", "causal", "kv_heads", "kv_seq_len")}
    common.update(sweep=shape.get("sweep"), input_sets=nsets, input_set_bytes=set_bytes,
                  rel_error_fp16_reference_source="cupy_fp16_plain (gpu.inference.gqa_reference)")
    log(f"shape B={B} H={H} Hkv={Hk} N={N} M={M} d={d} causal={causal}: fp16 reference error {e16:.3e}, "
        f"{nsets} input sets of {set_bytes/1e6:.1f} MB")
    runs, bls = [], []
    for cfg in configs:
        alg = cfg["algorithm"]
        rec = dict(common, algorithm=alg)
        pipe = None
        try:
            if alg == ALGORITHM_DECODE:
                pipe = FlashDecoding(shape, cfg["num_splits"], cfg.get("block_cols"), cfg.get("stages"),
                                     cfg.get("rowsplit"))
                rec["num_splits"] = pipe.requested_splits
                byt = decode_bytes(B, H, Hk, N, M, d, pipe.num_splits)
                rec.update(byt)
            else:
                pipe = Flash2GQA(shape, cfg["block_rows"], cfg["block_cols"], gqa=cfg.get("gqa", True))
                rec["num_splits"] = 1
            rec.update(pipe.resources())
            chk = BN.check_pipeline(pipe, q0, k0, v0, out, ref, e16)
            rec.update(chk)
            # LSE against float64 (max abs error, natural log)
            rec["lse_max_abs_error"] = lse_error(q0, k0, pipe.L, causal)
            t, per = BN.time_pipeline(pipe, sets, out, args.warmup, args.repeats)
            rec["time_s"] = t
            rec["tflops"] = flops / t["median"] / 1e12
            rec["flops"] = flops
            rec["kernels"] = [{"name": n, "time_s": p, "dram_read_bytes": None, "dram_write_bytes": None,
                               "ncu_duration_s": None} for n, p in zip(pipe.kernel_names, per)]
            if alg == ALGORITHM_DECODE:
                rec["achieved_bytes_per_s"] = rec["total_bytes"] / t["median"]
                if args.copy_bw:
                    rec["fraction_of_copy_bandwidth"] = rec["achieved_bytes_per_s"] / args.copy_bw
            extra = (f"splits={rec['num_splits']:2d} {rec.get('achieved_bytes_per_s', 0)/1e12:5.2f} TB/s "
                     f"({rec.get('fraction_of_copy_bandwidth', 0)*100:5.1f}% copy)" if alg == ALGORITHM_DECODE
                     else f"({pipe.br},{pipe.bc}) gqa_build={pipe.gqa}")
            log(f"  {alg:14s} {extra} {t['median']*1e3:8.3f} ms {rec['tflops']:6.1f} TFLOP/s err {chk['rel_error']} "
                f"(bound {chk['error_bound']:.2e}) lse {rec['lse_max_abs_error']:.1e} "
                f"{'PASS' if rec['passed'] else 'FAIL'} " + " ".join(
                    f"{n}={p['median']*1e3:.3f}" for n, p in zip(pipe.kernel_names, per)))
        except Exception as e:  # noqa: BLE001
            names = (DECODE_KERNELS if cfg.get("num_splits", 1) > 1 else DECODE_KERNELS[:1]) \
                if alg == ALGORITHM_DECODE else ["flash2_fwd"]
            rec.update(dict(R.check_error(None, e16), time_s=None, tflops=None, error=repr(e)[:2000],
                            kernels=[{"name": n, "time_s": None, "dram_read_bytes": None, "dram_write_bytes": None,
                                      "ncu_duration_s": None} for n in names]))
            rec.setdefault("num_splits", cfg.get("num_splits", 1))
            rec.setdefault("block_rows", cfg.get("block_rows", 16))
            rec.setdefault("block_cols", cfg.get("block_cols", 64))
            log(f"  {alg} {cfg} FAILED: {e!r}"[:3000])
        finally:
            if pipe is not None:
                pipe.free()
            pipe = None
            BN._free_pools()
        runs.append(rec)
    if baselines and not args.no_torch:
        bls = run_baselines(shape, sets, ref, out, flops, args, log)
    del sets, ref, out
    BN._free_pools()
    return runs, bls


def lse_error(q, k, L, causal) -> float:
    """max |L - logsumexp(scale q k^T)| over all rows (float64 reference, natural log)."""
    import cupy as cp

    B, H, N, d = q.shape
    Hk, M = k.shape[1], k.shape[2]
    g = H // Hk
    keep = causal_keep(N, M, cp) if causal else None
    worst = 0.0
    for b in range(B):
        if N * M <= (1 << 20):
            s = (q[b].reshape(Hk, g, N, d).astype(cp.float64) @ cp.swapaxes(k[b][:, None].astype(cp.float64), -1, -2))
            s = s.reshape(H, N, M) / math.sqrt(d)
            if keep is not None:
                s = cp.where(keep, s, -cp.inf)
            mx = s.max(axis=-1, keepdims=True)
            lse = (mx + cp.log(cp.exp(s - mx).sum(axis=-1, keepdims=True)))[..., 0]
            worst = max(worst, float(cp.abs(L[b].astype(cp.float64) - lse).max()))
        else:
            for h in (0, H - 1):   # two heads per batch (first and last group) for the large prefill shapes
                s = (q[b, h].astype(cp.float64) @ k[b, h // g].astype(cp.float64).T) / math.sqrt(d)
                if keep is not None:
                    s = cp.where(keep, s, -cp.inf)
                mx = s.max(axis=-1, keepdims=True)
                lse = (mx + cp.log(cp.exp(s - mx).sum(axis=-1, keepdims=True)))[..., 0]
                worst = max(worst, float(cp.abs(L[b, h].astype(cp.float64) - lse).max()))
            if b >= 1:
                break
    return worst


def run_baselines(shape, sets, ref, out, flops, args, log) -> list:
    import cupy as cp
    from . import bench as BN

    B, H, Hk, N, M, d, causal = _shape_key(shape)
    if causal and N != M:
        return []
    res = []
    g = H // Hk
    for variant in ("enable_gqa", "expanded"):
        exp_sets = None
        try:
            use = sets
            if variant == "expanded":
                import torch

                ebytes = 2 * 2 * B * H * M * d
                if ebytes > 36e9:
                    raise ValueError(f"expanded K/V would take {ebytes/1e9:.0f} GB")
                n_exp = max(1, min(len(sets), int(24e9 // ebytes)))
                use = sets[:n_exp]
                exp_sets = {}
                for (q, k, v) in use:
                    tk, tv = torch.from_dlpack(k), torch.from_dlpack(v)
                    exp_sets[id(k)] = (tk.repeat_interleave(g, dim=1).contiguous(),
                                       tv.repeat_interleave(g, dim=1).contiguous())
            tp = TorchSDPA(shape, variant, exp_sets)
            out.fill(float("nan"))
            q0, k0, v0 = sets[0]
            tp.run(q0, k0, v0, out)
            cp.cuda.runtime.deviceSynchronize()
            err = R.rel_error(out, ref, xp=cp)
            t, _ = BN.time_pipeline(tp, use, out, args.warmup, args.repeats)
            rec = dict({k: shape[k] for k in ("batch", "heads", "seq_len", "head_dim", "causal", "kv_heads",
                                              "kv_seq_len")}, name="torch_sdpa", variant=variant,
                       sweep=shape.get("sweep"), time_s=t, tflops=flops / t["median"] / 1e12,
                       rel_error=err if math.isfinite(err) else None, input_sets=len(use),
                       kernels=[{"name": "torch_sdpa", "time_s": t, "dram_read_bytes": None,
                                 "dram_write_bytes": None, "ncu_duration_s": None}])
            if N == 1 or N < M:
                byt = decode_bytes(B, H, Hk, N, M, d, 1)
                if variant == "expanded":
                    byt["kv_bytes"] *= g
                    byt["total_bytes"] = byt["kv_bytes"] + byt["q_bytes"] + byt["o_bytes"] + byt["lse_bytes"]
                rec["total_bytes"] = byt["total_bytes"]
                rec["achieved_bytes_per_s"] = byt["total_bytes"] / t["median"]
                if args.copy_bw:
                    rec["fraction_of_copy_bandwidth"] = rec["achieved_bytes_per_s"] / args.copy_bw
            res.append(rec)
            log(f"  torch_sdpa {variant:10s} {t['median']*1e3:8.3f} ms {rec['tflops']:6.1f} TFLOP/s err {err:.2e}"
                + (f" {rec['achieved_bytes_per_s']/1e12:.2f} TB/s" if "achieved_bytes_per_s" in rec else ""))
        except Exception as e:  # noqa: BLE001
            log(f"  torch_sdpa {variant} failed: {e!r}"[:1500])
        finally:
            exp_sets = None
            BN._free_pools()
    return res


def decode_configs(splits, block_cols=None, stages=None, rowsplit=None) -> list[dict]:
    return [{"algorithm": ALGORITHM_DECODE, "num_splits": s, "block_cols": block_cols, "stages": stages,
             "rowsplit": rowsplit} for s in splits]


def prefill_configs(shape: dict, pairs: dict) -> list[dict]:
    br, bc = pairs[(shape["head_dim"], bool(shape["causal"]))]
    cfgs = [{"algorithm": "flash2", "block_rows": br, "block_cols": bc, "gqa": True}]
    if shape["kv_heads"] == shape["heads"]:
        cfgs.append({"algorithm": "flash2", "block_rows": br, "block_cols": bc, "gqa": False})
    return cfgs


def base_doc(args) -> dict:
    from .bench import now_iso, device_info

    return {"schema": S.SCHEMA, "date": now_iso(), "device": device_info(),
            "settings": {"dtype": "fp16", "accumulate": "fp32", "warmup": args.warmup, "repeats": args.repeats,
                         "input_sets": args.input_sets or "per shape: sets_for(set bytes, L2) (see each run)",
                         "input_distribution": "standard normal, rounded to fp16",
                         "timer": "CUDA events around each run and between the kernels of a pipeline",
                         "ncu_cache_control": "all", "ncu_clock_control": "none", "seed": args.seed,
                         "error_rule": "rel_error <= 2 * rel_error_fp16_reference + 1e-4, all elements finite; "
                                       "run twice, errors must be equal",
                         "reference": "float64 per batch (decode) or per (b, h) slice (prefill), kv head h // g",
                         "flops": "4*B*H*N*M*d (causal: visible fraction; M == N: half), over the median time",
                         "bandwidth": "decode: (K + V + Q + O + L + 2 x fp32 partials) bytes / median time",
                         "decode_launch_order": DECODE_LAUNCH_ORDER, "prefill_launch_order": PREFILL_LAUNCH_ORDER,
                         "nvrtc_options": None, "dropout": "none",
                         "command": "python -m gpu.inference " + " ".join(sys.argv[1:])},
            "runs": [], "baselines": []}


def cmd_bench(args) -> int:
    from . import bench as BN

    t0 = time.monotonic()
    deadline = t0 + args.deadline_s

    def log(msg):
        print(f"[{time.monotonic() - t0:7.1f}s] {msg}", flush=True)

    doc = base_doc(args)
    if args.append and os.path.exists(args.out):
        old = json.load(open(args.out))
        doc["runs"], doc["baselines"] = old.get("runs", []), old.get("baselines", [])
        doc.setdefault("sessions", old.get("sessions", []))
    cb = copy_bandwidth()
    args.copy_bw = cb["bytes_per_s"]
    doc["copy_bandwidth"] = cb
    log(f"copy bandwidth {cb['bytes_per_s']/1e12:.3f} TB/s (read + write, 1 GiB D2D)")
    pairs = best_flash2_pairs()
    doc["settings"]["flash2_block_pairs"] = {f"d={k[0]},causal={k[1]}": list(v) for k, v in pairs.items()}
    work = []
    for sw in args.sweeps:
        if sw == "decode_target":
            work += [(s, decode_configs(args.splits or SPLITS_TARGET, args.block_cols, args.stages))
                     for s in decode_shapes("target")]
        elif sw == "decode_variants":   # ring depth / block size at the target shape
            for bc, st in args.variants:
                work += [(dict(s, sweep="decode_variants"), decode_configs(args.splits or SPLITS_TARGET, bc, st))
                         for s in decode_shapes("target")]
        elif sw == "decode_grid":
            work += [(s, decode_configs(SPLITS_GRID, args.block_cols, args.stages)) for s in decode_shapes("grid")]
        elif sw == "decode_spec":
            for s in decode_shapes("spec"):   # g*N > 16 rows: warps split the rows (default) or 16-row chunks
                work.append((s, decode_configs([1, 4, 16], args.block_cols, args.stages)
                             + (decode_configs([1, 4, 16], args.block_cols, args.stages, rowsplit=False)
                                if s["seq_len"] * s["heads"] // s["kv_heads"] > 16 else [])))
        elif sw == "gqa_prefill":
            work += [(s, prefill_configs(s, pairs)) for s in prefill_shapes("prefill")]
        elif sw == "small":
            work += [(s, decode_configs([1, 3, 4])) for s in decode_shapes("small")]
            work += [(s, prefill_configs(s, {k: (64, 64) for k in pairs})) for s in prefill_shapes("small")]
        else:
            raise ValueError(f"unknown sweep {sw!r}")
    for shape, cfgs in work:
        if time.monotonic() > deadline:
            log(f"deadline: skipping {shape}")
            doc.setdefault("skipped_shapes", []).append(shape)
            continue
        runs, bls = run_shape(shape, cfgs, args, log, baselines=shape.get("sweep") != "decode_variants"
                              and shape.get("sweep") != "small")
        doc["runs"].extend(runs)
        doc["baselines"].extend(bls)
        doc["settings"]["nvrtc_options"] = K.compile_log()
        doc["elapsed_s"] = time.monotonic() - t0
        S.write_json_atomic(args.out, doc)
    mark_best(doc)
    doc["elapsed_s"] = time.monotonic() - t0
    doc["schema_problems"] = validate(doc)
    S.write_json_atomic(args.out, doc)
    npass = sum(1 for r in doc["runs"] if r.get("passed"))
    log(f"wrote {args.out}: {len(doc['runs'])} runs, {npass} passed, schema problems {doc['schema_problems'][:5]}")
    return 0 if npass == len(doc["runs"]) else 1


def mark_best(doc) -> None:
    """Flag, per decode shape and sweep, the run with the lowest median time (``best_num_splits``)."""
    groups: dict = {}
    for r in doc["runs"]:
        if r.get("algorithm") == ALGORITHM_DECODE and r.get("time_s") and r.get("passed"):
            key = (r.get("sweep"), r["batch"], r["heads"], r["kv_heads"], r["seq_len"], r["kv_seq_len"],
                   r["head_dim"], r["causal"], r.get("block_cols"), r.get("stages"), r.get("block_rows"))
            groups.setdefault(key, []).append(r)
    for rs in groups.values():
        best = min(rs, key=lambda r: r["time_s"]["median"])
        for r in rs:
            r["best_num_splits"] = r is best


# ---------------------------------------------------------------------------------------------------- ncu
NCU_SPLITS = (1, 16)


def ncu_items(splits=NCU_SPLITS):
    """(shape, config) pairs profiled under ncu: the decode target at two split counts and the GQA prefill
    sweep at d=128 non-causal (flash2 and SDPA enable_gqa)."""
    items = [(s, c) for s in decode_shapes("target") for c in decode_configs(splits)]
    items += [(s, {"algorithm": "torch_sdpa", "variant": "enable_gqa"}) for s in decode_shapes("target")]
    pairs = best_flash2_pairs()
    for s in prefill_shapes("prefill"):
        if s["head_dim"] == 128 and not s["causal"]:
            items += [(s, c) for c in prefill_configs(s, pairs)]
            items.append((s, {"algorithm": "torch_sdpa", "variant": "enable_gqa"}))
    return items


def _cfg_key(shape, cfg):
    return (cfg["algorithm"], cfg.get("variant"), *_shape_key(shape), cfg.get("num_splits"),
            cfg.get("block_rows"), cfg.get("block_cols"), cfg.get("gqa"))


def cmd_ncu_child(args) -> int:
    import cupy as cp
    from . import bench as BN

    manifest, tag = [], 0
    cache = {}
    for shape, cfg in ncu_items(args.ncu_splits):
        key = _shape_key(shape)
        if key not in cache:
            cache.clear()
            BN._free_pools()
            cache[key] = make_inputs(shape, 1, seed=args.seed)[0]
        q, k, v = cache[key]
        out = cp.empty(q.shape, dtype=cp.float16)
        pipe = None
        try:
            if cfg["algorithm"] == ALGORITHM_DECODE:
                pipe = FlashDecoding(shape, cfg["num_splits"])
            elif cfg["algorithm"] == "flash2":
                pipe = Flash2GQA(shape, cfg["block_rows"], cfg["block_cols"], gqa=cfg["gqa"])
            else:
                pipe = TorchSDPA(shape, cfg["variant"])
            tag += 1
            BN.profiled_run(pipe, q, k, v, out, tag)
            manifest.append(dict(shape=shape, cfg=cfg, tag=tag, expected=list(pipe.kernel_names)))
            print(f"profiled tag {tag}: {cfg}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"ncu child: {cfg} failed: {e!r}", flush=True)
        finally:
            if pipe is not None and hasattr(pipe, "free"):
                pipe.free()
    S.write_json_atomic(args.manifest, {"manifest": manifest})
    return 0


def cmd_ncu(args) -> int:
    import shutil
    from . import ncu as NCU

    # the decode kernels are ours (matched by name), not library kernels to be summed into a library label
    NCU.OWN_KERNELS.update(DECODE_KERNELS)
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    csv_path, man_path = args.out + ".ncu.csv", args.out + ".manifest.json"
    cmd = [ncu, "--clock-control", "none", "--cache-control", "all", "--metrics", ",".join(NCU.METRICS), "--csv",
           "--print-units", "base", "--log-file", csv_path, "--nvtx", "--nvtx-include", "iosim_prof/",
           sys.executable, "-m", "gpu.inference", "--ncu-child", "--manifest", man_path, "--seed", str(args.seed),
           "--ncu-splits", *map(str, args.ncu_splits)]
    print("running: " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    text = open(csv_path).read()
    manifest = json.load(open(man_path))["manifest"]
    segs = NCU.segments(NCU.parse_csv(text))
    entries, problems = [], []
    for m in manifest:
        seg = segs.get(m["tag"])
        if seg is None:
            problems.append(f"tag {m['tag']} not found")
            continue
        try:
            att = NCU.attribute(seg, m["expected"])
            entries.append(dict(m, kernels=[dict(name=lab, **att[lab]) for lab in m["expected"]]))
        except ValueError as e:
            problems.append(f"tag {m['tag']}: {e}")
            entries.append(dict(m, raw_kernels=[{k2: kk[k2] for k2 in ("name", "dram_read_bytes", "dram_write_bytes",
                                                                       "duration_s")} for kk in seg]))
    print(f"ncu rc={rc}: {len(entries)} entries, problems {problems}", flush=True)
    from .bench import now_iso

    ndoc = {"schema": "iosim-gpu-ncu/1", "date": now_iso(), "ncu_command": " ".join(cmd[:14]), "ncu_rc": rc,
            "entries": entries, "problems": problems}
    S.write_json_atomic(args.out, ndoc)
    if args.merge_into and os.path.exists(args.merge_into):
        doc = json.load(open(args.merge_into))
        n = merge_ncu(doc, ndoc)
        doc["schema_problems"] = validate(doc)
        S.write_json_atomic(args.merge_into, doc)
        print(f"merged ncu bytes into {n} runs/baselines of {args.merge_into}", flush=True)
    return 0


def merge_ncu(doc: dict, ndoc: dict) -> int:
    """Attach ncu DRAM bytes per kernel to the matching runs (algorithm, shape, splits, block pair, build) and
    SDPA enable_gqa baselines of ``doc``."""
    idx = {}
    for e in ndoc.get("entries", []):
        if "kernels" in e:
            idx[_cfg_key(e["shape"], e["cfg"])] = e
    n = 0
    for r in doc.get("runs", []):
        if r.get("sweep") not in ("decode_target", "gqa_prefill"):
            continue
        cfg = {"algorithm": r["algorithm"], "num_splits": r.get("num_splits") if r["algorithm"] == ALGORITHM_DECODE
               else None, "block_rows": r.get("block_rows") if r["algorithm"] == "flash2" else None,
               "block_cols": r.get("block_cols") if r["algorithm"] == "flash2" else None,
               "gqa": r.get("gqa_build") if r["algorithm"] == "flash2" else None}
        e = idx.get(_cfg_key(r, cfg))
        if not e:
            continue
        byname = {k["name"]: k for k in e["kernels"]}
        for kr in r["kernels"]:
            src = byname.get(kr["name"])
            if src:
                kr.update(dram_read_bytes=src["dram_read_bytes"], dram_write_bytes=src["dram_write_bytes"],
                          ncu_duration_s=src["ncu_duration_s"])
        n += 1
    for b in doc.get("baselines", []):
        e = idx.get(_cfg_key(b, {"algorithm": "torch_sdpa", "variant": b.get("variant")}))
        if e and b.get("sweep") in ("decode_target", "gqa_prefill"):
            b["ncu"] = e["kernels"]
            b["kernels"][0].update({k: e["kernels"][0][k] for k in ("dram_read_bytes", "dram_write_bytes",
                                                                     "ncu_duration_s")})
            n += 1
    doc.setdefault("settings", {})["ncu_merged_from"] = ndoc.get("date")
    return n


# ----------------------------------------------------------------------------------------------- sanitize
def sanitize_shapes(algorithm: str) -> list[dict]:
    if algorithm == ALGORITHM_DECODE:
        return [dict(batch=1, heads=h, kv_heads=hk, seq_len=n, kv_seq_len=m, head_dim=d, causal=n > 1)
                for (h, hk, n, m) in ((4, 2, 1, 200), (4, 2, 3, 130), (8, 1, 3, 130)) for d in (64, 128)]
    return [dict(batch=1, heads=4, kv_heads=2, seq_len=n, kv_seq_len=m, head_dim=d, causal=c)
            for (n, m) in ((200, 200), (130, 200)) for d in (64, 128) for c in (False, True)]


def sanitize_child(algorithm: str) -> int:
    """Run under compute-sanitizer (gpu.sanitize): each small shape once, the output checked."""
    import cupy as cp

    cp.cuda.set_allocator(None)
    ok = True
    for sh in sanitize_shapes(algorithm):
        q, k, v = make_inputs(sh, 1, seed=sh["seq_len"] + sh["head_dim"])[0]
        ref = gqa_reference(q, k, v, sh["causal"], cp)
        e16 = R.rel_error(gqa_reference(q, k, v, sh["causal"], cp, fp16_plain=True), ref, xp=cp)
        variants = [(s, None) for s in (1, 3)] if algorithm == ALGORITHM_DECODE else [(64, 64), (128, 32)]
        for a, b in variants:
            out = cp.full(q.shape, float("nan"), dtype=cp.float16)
            p = FlashDecoding(sh, a) if algorithm == ALGORITHM_DECODE else Flash2GQA(sh, a, b)
            p.run(q, k, v, out)
            cp.cuda.runtime.deviceSynchronize()
            chk = R.check_error(R.rel_error(out, ref, xp=cp), e16)
            ok &= chk["passed"]
            print(f"SANITIZE_CHECK {algorithm} {a},{b} {sh} err={chk['rel_error']} passed={chk['passed']}", flush=True)
            p.free()
    return 0 if ok else 3


SANITIZE_KERNELS = {ALGORITHM_DECODE: list(DECODE_KERNELS), "flash2_gqa": ["flash2_fwd (GQA=1)"]}


# --------------------------------------------------------------------------------------------- precompile
def variants(head_dims=(64, 128), decode_tilings=((64, 4),), tests: bool = False) -> list[tuple]:
    pairs = best_flash2_pairs()
    vs = set()
    for d in head_dims:
        for causal in (False, True):
            br, bc = pairs[(d, causal)]
            wm, qreg = K.flash2_tiling(d, br, bc)
            base = {"HEAD_DIM": d, "BR": br, "BC": bc}
            if (wm, qreg) != (1, 1):
                base.update({"WM": wm, "QREG": qreg})
            vs.add(("flash2.cu", "flash2_fwd", tuple(sorted(base.items()))))
            vs.add(("flash2.cu", "flash2_fwd", tuple(sorted(dict(base, GQA=1).items()))))
        for br, bc in ((64, 64), (128, 32)):
            wm, qreg = K.flash2_tiling(d, br, bc)
            base = {"HEAD_DIM": d, "BR": br, "BC": bc, "GQA": 1}
            if (wm, qreg) != (1, 1):
                base.update({"WM": wm, "QREG": qreg})
            vs.add(("flash2.cu", "flash2_fwd", tuple(sorted(base.items()))))
        if tests:   # the pairs and tilings of tests/test_gpu_inference.py
            for br, bc in ((128, 64),):
                wm, qreg = K.flash2_tiling(d, br, bc)
                base = {"HEAD_DIM": d, "BR": br, "BC": bc, "GQA": 1}
                if (wm, qreg) != (1, 1):
                    base.update({"WM": wm, "QREG": qreg})
                vs.add(("flash2.cu", "flash2_fwd", tuple(sorted(base.items()))))
            decode_tilings = tuple(decode_tilings) + ((16, 2), (32, 3), (64, 6), (128, 3))
        for bc, st in decode_tilings:
            for rs in (0, 1):
                defs = tuple(sorted({"HEAD_DIM": d, "BC": bc, "STAGES": st, "MT": 1, "ROWSPLIT": rs}.items()))
                vs.add(("decode.cu", "flash_decoding_split", defs))
                vs.add(("decode.cu", "flash_decoding_combine", defs))
    return sorted(vs)


def cmd_precompile(args) -> int:
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp
    from .bench import _compile_one

    vs = variants(decode_tilings=tuple(args.variants) + ((64, 4),), tests=args.precompile_tests)
    t0 = time.monotonic()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as ex:
        for v, dt in ex.map(_compile_one, vs):
            print(f"compiled {v[0]} {v[1]} {dict(v[2])} in {dt:.1f}s", flush=True)
    print(f"precompiled {len(vs)} variants in {time.monotonic() - t0:.1f}s", flush=True)
    return 0


def _pair(text: str) -> tuple[int, int]:
    a, b = text.split(",")
    return int(a), int(b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpu.inference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/data/h100/bench_inference.json")
    ap.add_argument("--sweeps", nargs="*", default=["decode_target", "decode_grid", "gqa_prefill"],
                    help="decode_target decode_variants decode_grid decode_spec gqa_prefill small")
    ap.add_argument("--splits", nargs="*", type=int, default=None)
    ap.add_argument("--block-cols", type=int, default=None, help="decode: keys per KV block (16 per warp)")
    ap.add_argument("--stages", type=int, default=None, help="decode: cp.async ring depth")
    ap.add_argument("--variants", nargs="*", type=_pair, default=[], help="decode (BC,STAGES) pairs, e.g. 64,4")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--input-sets", type=int, default=None, help="default: per shape, >= 4 x L2 in all")
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--deadline-s", type=float, default=480.0)
    ap.add_argument("--append", action="store_true", help="keep the runs already in --out")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--ncu-splits", nargs="*", type=int, default=list(NCU_SPLITS))
    ap.add_argument("--merge-into", default=None)
    ap.add_argument("--ncu-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--precompile", action="store_true")
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--precompile-tests", action="store_true", help="also the variants the GPU tests use")
    args = ap.parse_args(argv)
    args.copy_bw = None
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.precompile:
        return cmd_precompile(args)
    if args.ncu_child:
        return cmd_ncu_child(args)
    if args.ncu:
        return cmd_ncu(args)
    return cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
