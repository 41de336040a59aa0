"""FlashAttention-3 forward order (Hopper): the same math as FlashAttention-2, run by an
asynchronous, warp-specialised CTA.

One CTA per (batch·head, Q block of Br rows). The CTA has one *producer* warpgroup (4 warps
whose one active warp issues TMA bulk tensor copies, registers lowered by ``setmaxnreg``) and
``ceil(Br / 64)`` *consumer* warpgroups (registers raised), each owning 64 query rows: a
warpgroup MMA (``wgmma`` m64nNk16) is 64 rows high. Q is copied once; K and V tiles of Bc rows
stream through a ring of ``stages`` shared-memory slots (full/empty barriers): the producer runs
``stages - 1`` tiles ahead, so a consumer waits on a copy only when the ring runs dry. S = QKᵀ
by wgmma with both operands in shared memory (each warpgroup reads its rows of Q and all of K
once), the online softmax in registers, P (the input dtype, in registers) the A operand of the PV
wgmma with V from shared memory. The softmax of tile j overlaps the QKᵀ wgmma of tile j+1
(``Kernel.overlap_softmax``: intra-warpgroup pipelining). O and the log-sum-exp are written once.

Shared memory: (Br + 2·stages·Bc)·d elements. Any Br works in the IR (the numeric executor's
tests use tiny tiles); real kernels use multiples of 64 (:data:`ROWS_PER_WARPGROUP`), and the
explorer tries only those. Default tiles: FlashAttention-3's forward table for 16-bit inputs
(:data:`FA3_FORWARD_TILES`), Bc lowered in steps of 16 (then Br in steps of 64) until the tiles
fit. Causal: the row blocks with the most work are launched first. Forward only."""
from __future__ import annotations

from ..errors import IosimError
from ..schedule import BufferSpec, Kernel, Schedule, TensorSpec
from . import common

F32 = common.F32

#: Query rows of one consumer warpgroup: a wgmma instruction is m64.
ROWS_PER_WARPGROUP = 64
#: Warps of a warpgroup (and of the producer warpgroup).
WARPS_PER_WARPGROUP = 4
#: Ring depths the schedule accepts (FlashAttention-3's forward uses 2).
STAGES = (2, 3)
DEFAULT_STAGES = 2
#: FlashAttention-3's forward runs 1 to 3 consumer warpgroups (Br 64 to 192); the explorer tries
#: no more (the IR takes any Br).
MAX_CONSUMER_WARPGROUPS = 3
#: Registers per thread after ``setmaxnreg``, by consumer warpgroups:
#: (producer, consumer). FlashAttention-3's forward kernel: 2 consumer warpgroups 24/240,
#: 3 warpgroups 32/160; 1 warpgroup 56 and "256", which the 255 registers a thread may hold
#: (and setmaxnreg's multiples of 8) make 248. Other counts: the producer's 24, the consumers'
#: estimated from their register tiles (iosim.occupancy).
SETMAXNREG = {1: (56, 248), 2: (24, 240), 3: (32, 160)}
#: Bc steps when the tiles must shrink to fit (FlashAttention-3's tiles are multiples of 16).
BLOCK_COLS_STEP = 16


def fa3_tile(head_dim: int, causal: bool) -> tuple[int, int]:
    """FlashAttention-3's forward (Br, Bc) for 16-bit inputs on SM90 (hopper/tile_size.h, no
    local window, no paged KV): d <= 64: (192, 128 causal / 192); d <= 96: (192, 144);
    d <= 128: (128, 128 causal / 176); d <= 192: (128, 112); else (128, 80)."""
    if head_dim <= 64:
        return 192, 128 if causal else 192
    if head_dim <= 96:
        return 192, 144
    if head_dim <= 128:
        return 128, 128 if causal else 176
    if head_dim <= 192:
        return 128, 112
    return 128, 80


FA3_FORWARD_TILES = {64: fa3_tile(64, False), 128: fa3_tile(128, False)}


def check_stages(stages) -> int:
    """``stages`` if it is one of :data:`STAGES`, else an IosimError."""
    if isinstance(stages, bool) or not isinstance(stages, int) or stages not in STAGES:
        raise IosimError(f"stages must be one of {', '.join(map(str, STAGES))} (shared-memory "
                         f"slots of the K/V ring), got {stages!r}")
    return stages


def default_blocks(shape, sram_bytes: int, fits) -> tuple[int, int]:
    """FlashAttention-3's tile (:func:`fa3_tile`) clipped to N; Bc lowered in steps of 16, then
    Br in steps of 64, then either halved, until the live tiles ``fits``."""
    n = shape.seq_len
    block_rows, block_cols = fa3_tile(shape.head_dim, shape.causal)
    block_rows, block_cols = min(block_rows, n), min(block_cols, n)
    while not fits(block_rows, block_cols):
        if block_cols > BLOCK_COLS_STEP:
            block_cols = max(BLOCK_COLS_STEP, (block_cols - 1) // BLOCK_COLS_STEP
                             * BLOCK_COLS_STEP)
        elif block_rows > ROWS_PER_WARPGROUP:
            block_rows = max(ROWS_PER_WARPGROUP, (block_rows - 1) // ROWS_PER_WARPGROUP
                             * ROWS_PER_WARPGROUP)
        elif block_rows * block_cols > 1:
            if block_rows >= block_cols:
                block_rows = max(1, block_rows // 2)
            else:
                block_cols = max(1, block_cols // 2)
        else:
            break
    return block_rows, block_cols


def consumer_warpgroups(block_rows: int) -> int:
    """Consumer warpgroups of a CTA of ``block_rows`` query rows (64 rows each)."""
    return max(1, -(-block_rows // ROWS_PER_WARPGROUP))


def build(shape, block_rows, block_cols, sram_bytes, stages=DEFAULT_STAGES) -> Schedule:
    stages = check_stages(stages)
    e = shape.elem_bytes
    body = common.online_softmax_program(shape)
    groups = consumer_warpgroups(block_rows)
    producer_registers, consumer_registers = SETMAXNREG.get(groups, (24, None))
    fwd = Kernel(
        "flash3_fwd", grid=("i",), body=body,
        # K and V in a ring of ``stages`` slots each, filled by the producer's TMA copies
        buffers=(BufferSpec("Qi", "i", "d", e), BufferSpec("Kj", "j", "d", e, stages=stages),
                 BufferSpec("Vj", "j", "d", e, stages=stages),
                 BufferSpec("S", "i", "j", F32, "reg"),
                 # P converted to the input dtype in registers: the A operand of the PV wgmma
                 BufferSpec("P", "i", "j", e, "reg"),
                 BufferSpec("O", "i", "d", F32, "reg"), BufferSpec("m", "i", "1", F32, "reg"),
                 BufferSpec("l", "i", "1", F32, "reg"), BufferSpec("alpha", "i", "1", F32, "reg"),
                 BufferSpec("L", "i", "1", F32, "reg")),
        blocks={"i": block_rows, "j": block_cols}, row_var="i", col_var="j",
        tensor_path="wgmma", warps=WARPS_PER_WARPGROUP * (groups + 1), longest_first=True,
        registers_per_thread=consumer_registers, producer_warps=WARPS_PER_WARPGROUP,
        producer_registers_per_thread=producer_registers, copy_engine="tma",
        overlap_softmax=True, spans=common.FUSED_SPANS)
    tensors = tuple(common.qkv_tensors(shape)) + (
        common.output_tensor(shape),
        TensorSpec("L", "N", "1", F32, "output", float32=True))
    return Schedule("flash3", shape, tensors, (fwd,), block_rows, block_cols,
                    notes=f"FlashAttention-3 forward: producer warpgroup (TMA), {groups} "
                          f"consumer warpgroup(s) (wgmma), {stages}-stage K/V ring, softmax "
                          "overlapped with the next QKᵀ")
