"""Flash-Decoding (split-KV): attention of a few query rows against a long KV cache.

When B·H_kv CTAs (times the query blocks) cannot fill the SMs — decode, one query token per
sequence — FlashAttention's query-block parallelism leaves most SMs idle. Split-KV also splits
the K/V sequence into ``num_splits`` contiguous parts, each its own CTA, and merges their partial
results in a second kernel:

1. ``flash_decoding_split``: one CTA per (batch·K/V head, block of Br of the group's query rows,
   split). The CTA holds the rows of **all** query heads of the K/V head's group (token "G":
   group_size · N rows, so K and V are read once for the whole group), loops over its split's
   K/V blocks of Bc rows (FlashAttention-2's online softmax; its SPLIT_WARPS warps each own a
   slice of every block's keys, ``warp_split="keys"``), and writes its partial output
   (normalised, float32) and log-sum-exp (float32) to one slab per split;
2. ``flash_decoding_combine``: one CTA per (batch·K/V head, COMBINE_ROWS rows, a warp each):
   for every split,
   reads the partial output and log-sum-exp and merges them (the log-sum-exp weighted sum, in
   the online form of FlashAttention's merge); writes O (input dtype) and L.

With one split the first kernel writes O and L directly and there is no combine kernel. Split s
covers K/V blocks [s·c, (s+1)·c) with c = ⌈⌈N_kv/Bc⌉ / num_splits⌉ (so the effective number of
splits is ⌈⌈N_kv/Bc⌉ / c⌉). With a key-padding mask, a batch element runs only the splits and
blocks of its valid keys. The default ``num_splits`` follows FlashAttention's heuristic
(:func:`num_splits_heuristic`)."""
from __future__ import annotations

import math

from ..errors import IosimError
from ..schedule import (BufferSpec, Fill, Flash1Merge, Kernel, Load, LogSumExp, Loop, Schedule,
                        Store, TensorSpec)
from ..shape import check_positive_int
from . import common

F32 = common.F32

#: Query rows (of the group's) each combine CTA merges, one warp per row.
COMBINE_ROWS = 4
#: Warps of a split CTA: each owns a slice of every K/V block's keys (few query rows to share).
SPLIT_WARPS = 4
#: Shared-memory stages of the K/V copies: enough bytes in flight to stream the cache.
KV_STAGES = 2
#: FlashAttention's cap on the number of splits.
MAX_SPLITS = 128
#: Splits are used only while fewer CTAs than this fraction of the SMs would run without them.
FILL_FRACTION = 0.8
#: The heuristic takes the fewest splits within this fraction of the best wave efficiency.
EFFICIENCY_FRACTION = 0.85


def row_extent(shape) -> int:
    """Query rows a split CTA's row blocks run over: the group's rows (group_size · N)."""
    return shape.group_size * shape.seq_len


def num_splits_heuristic(ctas: int, sm_count: int, kv_blocks: int,
                         max_splits: int = MAX_SPLITS) -> int:
    """FlashAttention's choice of splits for ``ctas`` CTAs without splitting, on ``sm_count``
    SMs, over ``kv_blocks`` K/V blocks: none (1) when the CTAs already fill FILL_FRACTION of
    the SMs; else, among the split counts that change the blocks per split, the fewest whose
    wave efficiency (waves / ⌈waves⌉) is within EFFICIENCY_FRACTION of the best."""
    if ctas >= FILL_FRACTION * sm_count:
        return 1
    max_splits = min(max_splits, sm_count, kv_blocks)

    def eligible(splits):
        return splits == 1 or (math.ceil(kv_blocks / splits)
                               != math.ceil(kv_blocks / (splits - 1)))

    efficiency = {}
    for splits in range(1, max_splits + 1):
        if eligible(splits):
            waves = ctas * splits / sm_count
            efficiency[splits] = waves / math.ceil(waves)
    best = max(efficiency.values())
    return min(s for s, eff in efficiency.items() if eff >= EFFICIENCY_FRACTION * best)


def default_blocks(shape, sram_bytes: int, fits) -> tuple[int, int]:
    """Br: the group's rows, at most 64; Bc: 128 for d <= 128, else 64 (clipped to N_kv);
    the larger halved until the live tiles ``fits``."""
    rows = min(64, row_extent(shape))
    cols = min(128 if shape.head_dim <= 128 else 64, shape.kv_seq_len)
    while not fits(rows, cols) and rows * cols > 1:
        if cols >= rows and cols > 1:
            cols //= 2
        else:
            rows = max(1, rows // 2)
    return rows, cols


def split_size(shape, block_cols: int, num_splits: int) -> tuple[int, int]:
    """(K/V blocks per split, effective number of splits) for ``num_splits`` splits."""
    kv_blocks = math.ceil(shape.kv_seq_len / block_cols)
    per_split = math.ceil(kv_blocks / num_splits)
    return per_split, math.ceil(kv_blocks / per_split)


def default_num_splits(shape, block_rows: int, block_cols: int, sm_count: int) -> int:
    """:func:`num_splits_heuristic` for this shape's CTAs (B·H_kv·⌈G/Br⌉) and K/V blocks."""
    ctas = shape.batch_kv_heads * math.ceil(row_extent(shape) / block_rows)
    return num_splits_heuristic(ctas, sm_count, math.ceil(shape.kv_seq_len / block_cols))


def check_num_splits(num_splits) -> int:
    return check_positive_int("num_splits", num_splits,
                              "a positive integer (K/V splits per query block)")


def build(shape, block_rows, block_cols, sram_bytes, num_splits=None, sm_count=None) -> Schedule:
    if shape.dropout:
        raise IosimError("flash_decoding models inference: dropout must be 0, got "
                         f"{shape.dropout:g}")
    if num_splits is None:
        if sm_count is None:
            from ..hardware import load_hardware

            sm_count = load_hardware("h100-measured").sm_count
        num_splits = default_num_splits(shape, block_rows, block_cols, sm_count)
    num_splits = check_num_splits(num_splits)
    per_split, splits = split_size(shape, block_cols, num_splits)
    e = shape.elem_bytes
    split = splits > 1
    out, lse = ("Opart", "Lpart") if split else ("O", "L")
    body = common.online_softmax_program(shape, within="s" if split else None, out=out,
                                         lse=lse)
    spans = (("i", "G"), ("j", "L"), ("s", "L"))
    extents = (("S", splits),)
    split_kernel = Kernel(
        "flash_decoding_split", grid=("i", "s") if split else ("i",), body=body,
        buffers=(BufferSpec("Qi", "i", "d", e), BufferSpec("Kj", "j", "d", e, stages=KV_STAGES),
                 BufferSpec("Vj", "j", "d", e, stages=KV_STAGES),
                 BufferSpec("S", "i", "j", F32, "reg"), BufferSpec("P", "i", "j", F32, "reg"),
                 BufferSpec("O", "i", "d", F32, "reg"), BufferSpec("m", "i", "1", F32, "reg"),
                 BufferSpec("l", "i", "1", F32, "reg"), BufferSpec("alpha", "i", "1", F32, "reg"),
                 BufferSpec("L", "i", "1", F32, "reg")),
        blocks={"i": block_rows, "j": block_cols, "s": per_split * block_cols},
        row_var="i", col_var="j", tensor_path="mma_sync", warps=SPLIT_WARPS, heads="kv",
        spans=spans, extents=extents, warp_split="keys")
    kernels = (split_kernel,)
    tensors = tuple(common.qkv_tensors(shape))
    if split:
        combine_rows = min(COMBINE_ROWS, row_extent(shape))
        merge = (Load("Os", "Opart", "r", "d"), Load("Ls", "Lpart", "r", "1"),
                 Flash1Merge("O", "Os", "m", "l", "Ls", "one"))
        kernels += (Kernel(
            "flash_decoding_combine", grid=("r",),
            body=(Fill("O", 0.0), Fill("m", float("-inf")), Fill("l", 0.0), Fill("one", 1.0),
                  Loop("s", merge), LogSumExp("L", "m", "l"),
                  Store("O", "O", "r", "d"), Store("L", "L", "r", "1")),
            # every split's partial result is loaded independently of the merge so far, so
            # the loads of the next splits are in flight while this one is merged
            buffers=(BufferSpec("Os", "r", "d", F32, "reg", stages=2),
                     BufferSpec("Ls", "r", "1", F32, "reg", stages=2),
                     BufferSpec("O", "r", "d", F32, "reg"), BufferSpec("m", "r", "1", F32, "reg"),
                     BufferSpec("l", "r", "1", F32, "reg"), BufferSpec("one", "r", "1", F32, "reg"),
                     BufferSpec("L", "r", "1", F32, "reg")),
            blocks={"r": combine_rows, "s": per_split * block_cols}, row_var="r",
            tensor_path="mma_sync", warps=combine_rows, heads="kv",
            spans=(("r", "G"), ("s", "L")), extents=extents),)
        tensors += (TensorSpec("Opart", "G", "d", F32, "intermediate", float32=True, heads="kv",
                               slab_var="s"),
                    TensorSpec("Lpart", "G", "1", F32, "intermediate", float32=True, heads="kv",
                               slab_var="s"))
    tensors += (common.output_tensor(shape),
                TensorSpec("L", "N", "1", F32, "output", float32=True))
    return Schedule("flash_decoding", shape, tensors, kernels, block_rows, block_cols,
                    notes=f"split-KV: {splits} split(s) of {per_split} K/V block(s), all query "
                          "heads of a K/V head's group in one CTA"
                          + ("; partial results merged by a combine kernel" if split else ""))
