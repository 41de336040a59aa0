"""FlashAttention backward for Hopper (``gpu/flash3_bwd.cu``, kernel ``flash3_bwd``): wgmma, TMA, warp specialisation.

Host side: the kernel's tilings (BC = 128 keys per CTA, two consumer warpgroups of 64 keys, BR = 64 or 128 query
rows per Q block), its shared-memory bytes, the variant table of ``python -m gpu.backward --algorithm flash3
--variants`` and the pipeline object ``Flash3Backward`` (``run(q, k, v, o, L, do, dq, dk, dv, events=None)``, the
interface of ``kernels.Flash2Backward``): flash3_bwd_dot (D = rowsum(dO o O), dQaccum = 0), flash3_bwd,
flash3_bwd_convert (dQ = fp16(scale dQaccum)), all three in ``flash3_bwd.cu``. O and L come from the flash2 forward, as for flash2's backward.

The pure functions (tiles, shared memory, defines, variant validation) need neither CuPy nor a GPU.
"""
from __future__ import annotations

import math

SOURCE = "flash3_bwd.cu"
KERNEL_NAME = "flash3_bwd"
KERNEL_NAMES = ["flash3_bwd_dot", KERNEL_NAME, "flash3_bwd_convert"]
BLOCK_COLS = 128                       # keys per CTA: 64 per consumer warpgroup (one wgmma m64 row block each)
CONSUMER_WARPGROUPS = 2
THREADS = 128 * (CONSUMER_WARPGROUPS + 1)   # + the producer warpgroup
HEAD_DIMS = (64, 128)
BLOCK_ROWS = (64, 128)
DEFAULT_BLOCK_ROWS = {64: 128, 128: 64}
PRODUCER_REGS, CONSUMER_REGS = 24, 240  # setmaxnreg: 128*24 + 256*240 <= 65536
SMEM_LIMIT_BYTES = 227 * 1024
ALIGN_SLACK_BYTES = 1024
STATIC_SMEM_BYTES = 128                # the mbarriers (static shared memory), rounded up
# switches of flash3_bwd.cu other than the tiles, with their allowed values
SWITCHES = {"STAGES": (2, 3, 4), "DQ_V4": (0, 1), "PIPE": (0, 1, 2), "P_F32": (0, 1), "DIAG": (0, 1, 2), "DK_WAIT_END": (0, 1), "DQ_TMA": (0, 1), "ROTATE": (0, 1), "DQ_BUFS": (1, 2), "DQ_PRODUCER": (0, 1), "DV_EARLY": (0, 1), "DK_FIRST": (0, 1),
            "PRODUCER_REGS": (24, 32, 40), "CONSUMER_REGS": (216, 224, 232, 240)}
LAUNCH_REGS = 168                      # registers a thread at launch (__launch_bounds__(384, 1): 65536 / 384, by 8)


def dq_split(head_dim: int, block_rows: int) -> int:
    """How the two consumer warpgroups share dQ = dS K: 0 by rows (BR = 128: 64 rows each), 1 by columns of d."""
    return 0 if block_rows == 128 else 1


def dq_cols(head_dim: int, block_rows: int) -> int:
    """dQ columns per consumer warpgroup (its tile is 64 rows x this)."""
    return head_dim // 2 if dq_split(head_dim, block_rows) else head_dim


def smem_bytes(head_dim: int, block_rows: int, stages: int = 2, dq_tma: bool = True, dq_bufs: int = 1) -> int:
    """K, V (128 x d), ``stages`` x (Q, dO) (BR x d), 2 x dSᵀ (128 x BR) fp16, with ``dq_tma`` one fp32 dQ tile
    (64 x dq_cols) per consumer warpgroup, ``stages`` x (L, D) fp32 rows, slack."""
    return (2 * head_dim * (2 * BLOCK_COLS + 2 * stages * block_rows) + 2 * 2 * BLOCK_COLS * block_rows
            + (CONSUMER_WARPGROUPS * dq_bufs * 64 * dq_cols(head_dim, block_rows) * 4 if dq_tma else 0)
            + stages * 2 * block_rows * 4 + ALIGN_SLACK_BYTES)


def check_config(head_dim: int, block_rows: int, defines: dict | None = None) -> None:
    """Raise ValueError unless flash3_bwd.cu is built for this tiling and these switches, within shared memory and
    registers (BR = 128 at d = 128 would need 64 more accumulator registers per thread than setmaxnreg gives)."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"flash3 backward supports head_dim in {HEAD_DIMS}, got {head_dim}")
    if block_rows not in BLOCK_ROWS:
        raise ValueError(f"flash3 backward supports block_rows in {BLOCK_ROWS}, got {block_rows}")
    if head_dim == 128 and block_rows == 128:
        raise ValueError("flash3 backward: BR = 128 at d = 128 needs more than 240 registers a thread")
    defines = dict(defines or {})
    for k, v in defines.items():
        if k not in SWITCHES:
            raise ValueError(f"flash3 backward: unknown define {k!r} (known: {sorted(SWITCHES)})")
        if v not in SWITCHES[k]:
            raise ValueError(f"flash3 backward: {k}={v!r} not in {SWITCHES[k]}")
    p = defines.get("PRODUCER_REGS", PRODUCER_REGS)
    c = defines.get("CONSUMER_REGS", CONSUMER_REGS)
    if 128 * p + 128 * CONSUMER_WARPGROUPS * c > LAUNCH_REGS * THREADS:
        raise ValueError(f"flash3 backward: setmaxnreg {p} + 2 x {c} per lane exceeds the {LAUNCH_REGS} x {THREADS} "
                         "registers the CTA gets at launch")
    need = smem_bytes(head_dim, block_rows, defines.get("STAGES", 2), bool(defines.get("DQ_TMA", 1)),
                      defines.get("DQ_BUFS", 1))
    if need + STATIC_SMEM_BYTES > SMEM_LIMIT_BYTES:
        raise ValueError(f"flash3 backward d={head_dim} BR={block_rows} {defines} needs {need} bytes of shared "
                         f"memory, more than {SMEM_LIMIT_BYTES}")


def fits(head_dim: int, block_rows: int, defines: dict | None = None) -> bool:
    try:
        check_config(head_dim, block_rows, defines)
    except ValueError:
        return False
    return True


def kernel_defines(head_dim: int, block_rows: int, extra: dict | None = None) -> dict:
    return {"HEAD_DIM": head_dim, "BR": block_rows, **dict(extra or {})}


# (BR, BC, extra defines) tried by ``gpu.backward --algorithm flash3 --variants``, per head dim; the first is the
# default (DEFAULT_BLOCK_ROWS)
VARIANTS = {64: [(128, 128, {}), (128, 128, {"DK_FIRST": 1}), (128, 128, {"DV_EARLY": 1}), (128, 128, {"DQ_TMA": 0}),
                 (64, 128, {})],
            128: [(64, 128, {}), (64, 128, {"DK_FIRST": 1}), (64, 128, {"DQ_PRODUCER": 1}),
                  (64, 128, {"DK_FIRST": 1, "DQ_PRODUCER": 1}), (64, 128, {"DV_EARLY": 0}), (64, 128, {"DQ_TMA": 0})]}
EXTRA_VARIANTS_ENV = "IOSIM_FLASH3_EXTRA_VARIANTS"   # JSON {"64": [[BR, BC, {defines}], ...]}: diagnostics


def variants_with_extra(table: dict = VARIANTS) -> dict:
    """``table`` plus the entries of $IOSIM_FLASH3_EXTRA_VARIANTS (e.g. DIAG builds, timed for a diagnosis: their
    dQ is wrong on purpose, so they fail the checks and are never picked)."""
    import json
    import os

    extra = os.environ.get(EXTRA_VARIANTS_ENV)
    if not extra:
        return table
    out = {d: list(rows) for d, rows in table.items()}
    for d, rows in json.loads(extra).items():
        out.setdefault(int(d), []).extend((int(br), int(bc), dict(defs)) for br, bc, defs in rows)
    return out


def validate_variants(table: dict = VARIANTS) -> list[str]:
    """Problems of a variant table (empty when every entry compiles for its head dim and fits)."""
    errs = []
    for d, rows in table.items():
        if not rows:
            errs.append(f"d={d}: no variants")
            continue
        if (rows[0][0], rows[0][2]) != (DEFAULT_BLOCK_ROWS.get(d), {}):
            errs.append(f"d={d}: the first variant is not the default")
        seen = set()
        for br, bc, defs in rows:
            key = (br, bc, tuple(sorted(defs.items())))
            if key in seen:
                errs.append(f"d={d}: duplicate {key}")
            seen.add(key)
            if bc != BLOCK_COLS:
                errs.append(f"d={d}: block_cols {bc} (the kernel is built for {BLOCK_COLS})")
            try:
                check_config(d, br, defs)
            except ValueError as e:
                errs.append(f"d={d}: {e}")
    return errs


CU_TENSOR_MAP_DATA_TYPE_FLOAT32 = 7
DQ_BOX_COLS = 32                        # fp32: a 128-byte swizzled box row holds 32 floats


def dq_tensor_map_fields(batch_heads: int, seq_len: int, head_dim: int, box_rows: int = 64) -> dict:
    """``cuTensorMapEncodeTiled`` arguments for the fp32 dQaccum (B*H, N, d), written by TMA reductions in boxes of
    ``box_rows`` rows x 32 floats (128-byte swizzle); rows >= N of a head are out of range (clipped)."""
    from . import flash3 as F3

    f = F3.tensor_map_fields(batch_heads, seq_len, head_dim, box_rows)
    row_bytes = head_dim * 4
    f.update({"data_type": CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
              "global_strides_bytes": (row_bytes, seq_len * row_bytes),
              "box_dim": (DQ_BOX_COLS, box_rows, 1), "box_bytes": DQ_BOX_COLS * 4 * box_rows})
    return f


class Flash3Backward:
    """dQ, dK, dV from Q, K, V, O, dO and the forward's L. ``run(q, k, v, o, L, do, dq, dk, dv, events=None)``
    records ``events[0..3]`` around flash2_bwd_dot, flash3_bwd, flash2_bwd_convert."""

    def __init__(self, shape, causal=False, block_rows=None, defines=None):
        import cupy as cp

        from . import flash3 as F3
        from . import kernels as K

        self.B, self.H, self.N, self.d = (int(x) for x in shape)
        self.causal = bool(causal)
        self.br = int(block_rows or DEFAULT_BLOCK_ROWS.get(self.d, 64))
        self.bc = BLOCK_COLS
        self.extra_defines = dict(defines or {})
        check_config(self.d, self.br, self.extra_defines)
        self.stages = int(self.extra_defines.get("STAGES", 2))
        self.scale = 1.0 / math.sqrt(self.d)
        self.kernel_names = list(KERNEL_NAMES)
        self.defines = kernel_defines(self.d, self.br, self.extra_defines)
        self.k_dot = F3.compile_kernel(self.defines, SOURCE, "flash3_bwd_dot")
        self.k_conv = F3.compile_kernel(self.defines, SOURCE, "flash3_bwd_convert")
        self.k_main = F3.compile_kernel(self.defines, SOURCE, KERNEL_NAME)
        self.dq_tma = bool(int(self.extra_defines.get("DQ_TMA", 1)))
        self.smem = smem_bytes(self.d, self.br, self.stages, self.dq_tma, int(self.extra_defines.get("DQ_BUFS", 1)))
        self.k_main.max_dynamic_shared_size_bytes = self.smem
        self.threads = THREADS
        B, H, N, d = self.B, self.H, self.N, self.d
        self.Dv = cp.empty((B, H, N), dtype=cp.float32)
        self.dQacc = cp.empty((B, H, N, d), dtype=cp.float32)
        self._fq = F3.tensor_map_fields(B * H, N, d, self.br)
        self._fkv = F3.tensor_map_fields(B * H, N, d, self.bc)
        self._fdq = dq_tensor_map_fields(B * H, N, d)
        self._maps: dict = {}

    def tensor_maps(self, q, k, v, do):
        from . import flash3 as F3

        key = (q.data.ptr, k.data.ptr, v.data.ptr, do.data.ptr)
        m = self._maps.get(key)
        if m is None:
            for x in (q, k, v, do):
                if x.shape != (self.B, self.H, self.N, self.d) or x.dtype.itemsize != 2 or not x.flags.c_contiguous:
                    raise ValueError(f"flash3 backward needs contiguous fp16 (B,H,N,d) inputs, got {x.shape} {x.dtype}")
            m = (F3.encode_tensor_map(q.data.ptr, self._fq), F3.encode_tensor_map(k.data.ptr, self._fkv),
                 F3.encode_tensor_map(v.data.ptr, self._fkv), F3.encode_tensor_map(do.data.ptr, self._fq),
                 F3.encode_tensor_map(self.dQacc.data.ptr, self._fdq))
            if len(self._maps) > 16:
                self._maps.clear()
            self._maps[key] = m
        return m

    def run(self, q, k, v, o, L, do, dq, dk, dv, events=None):
        import numpy as np

        from .kernels import _rec

        B, H, N, d = self.B, self.H, self.N, self.d
        rows = B * H * N
        tq, tk, tv, tdo, tdq = self.tensor_maps(q, k, v, do)
        _rec(events, 0)
        lpr = d // 8   # lanes per row
        self.k_dot(((rows * lpr + 255) // 256,), (256,), (o, do, self.Dv, self.dQacc, np.int64(rows)))
        _rec(events, 1)
        grid = ((N + self.bc - 1) // self.bc, B * H)
        self.k_main(grid, (self.threads,), (tq, tk, tv, tdo, tdq, L, self.Dv, self.dQacc, dk, dv, np.int32(N),
                                            np.float32(self.scale), np.int32(self.causal)), shared_mem=self.smem)
        _rec(events, 2)
        n8 = rows * d // 8
        self.k_conv((min(132 * 16, (n8 + 255) // 256),), (256,), (self.dQacc, dq, np.int64(n8), np.float32(self.scale)))
        _rec(events, 3)

    def resources(self) -> dict:
        """Tiles, warps and the compiled flash3_bwd's registers / local memory / shared memory."""
        from . import flash3 as F3

        try:
            attrs = self.k_main.attributes
        except Exception:  # noqa: BLE001
            attrs = {}
        return {"block_rows": self.br, "block_cols": self.bc, "threads": self.threads, "smem_bytes": self.smem,
                "defines": dict(self.extra_defines), "stages": self.stages,
                "dq_reduction": ("TMA cp.reduce.async.bulk.tensor add (fp32 tile staged in shared memory)"
                                 if self.dq_tma else "red.global.add from registers"),
                "consumer_warpgroups": CONSUMER_WARPGROUPS, "dq_split": ("rows", "columns")[dq_split(self.d, self.br)],
                "registers": attrs.get("num_regs"), "local_bytes": attrs.get("local_size_bytes"),
                "producer_regs": int(self.extra_defines.get("PRODUCER_REGS", PRODUCER_REGS)),
                "consumer_regs": int(self.extra_defines.get("CONSUMER_REGS", CONSUMER_REGS)),
                "compile": F3.COMPILE_LOG.get(f"{KERNEL_NAME} {dict(sorted(self.defines.items()))}")}

    def free(self):
        self.Dv = self.dQacc = None
        self._maps = {}
