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
fit. Causal: the row blocks with the most work are launched first.

Backward (:func:`build_backward`): FlashAttention-2's backward algorithm (the kernels of
:func:`common.flash_backward`) on Hopper, as FlashAttention-3 runs it: one CTA per K/V block of
Bc keys with a producer warpgroup (TMA copies of the Q, dO, L and D tiles into a ring of
``stages`` slots, K and V once) and Bc / 64 consumer warpgroups (64 keys each: Sᵀ = K Qᵀ and
dPᵀ = V dOᵀ by wgmma from shared memory, Pᵀ and dSᵀ in registers as the A operands of the dV
and dK wgmmas, dSᵀ through shared memory for dQ = dS K, added into the float32 accumulator in
HBM)."""
from __future__ import annotations

from ..errors import IosimError
from ..schedule import BufferSpec, Kernel, Schedule, TensorSpec
from . import common
# FlashAttention-3's backward tiles for 16-bit inputs are FlashAttention-2's
from .flash2 import BACKWARD_TILES, default_backward_blocks  # noqa: F401

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
                         f"slots of the ring: the forward's K/V, the backward's Q/dO), got "
                         f"{stages!r}")
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


#: Keys of a backward CTA's consumer warpgroup (the m64 of its Sᵀ = K Qᵀ wgmma).
KEYS_PER_WARPGROUP = 64
#: Rows a backward row kernel's CTA (D = rowsum(dO ∘ O), the dQ conversion) handles per head
#: dimension element: 256 threads with 8 elements (16 bytes) each.
ROW_KERNEL_THREADS = 256
ROW_KERNEL_ELEMENTS_PER_THREAD = 8


def build_backward(shape, block_rows, block_cols, sram_bytes,
                   stages=DEFAULT_STAGES) -> Schedule:
    """The backward of the module docstring. Shared memory: K and V (Bc x d), ``stages`` x (Q
    and dO tiles (Br x d), L and D rows), dSᵀ (Bc x Br, double-buffered)."""
    common.check_plain_backward(shape, "flash3")
    stages = check_stages(stages)
    e = shape.elem_bytes
    groups = max(1, -(-block_cols // KEYS_PER_WARPGROUP))
    producer_registers, consumer_registers = SETMAXNREG.get(groups, (24, None))
    buffers = (BufferSpec("Kj", "j", "d", e), BufferSpec("Vj", "j", "d", e),
               BufferSpec("Qi", "i", "d", e, stages=stages),
               BufferSpec("dOi", "i", "d", e, stages=stages),
               BufferSpec("Li", "i", "1", F32, stages=stages),
               BufferSpec("Di", "i", "1", F32, stages=stages),
               BufferSpec("S", "i", "j", F32, "reg"),
               # Pᵀ and dSᵀ converted to the input dtype in registers: the A operands of the
               # dV and dK wgmmas; dSᵀ also to shared memory for dQ = dS K
               BufferSpec("P", "i", "j", e, "reg"), BufferSpec("dP", "i", "j", F32, "reg"),
               BufferSpec("dS", "i", "j", e, stages=2),
               BufferSpec("dQi", "i", "d", F32, "reg"), BufferSpec("dK", "j", "d", F32, "reg"),
               BufferSpec("dV", "j", "d", F32, "reg"))
    rows = max(1, ROW_KERNEL_THREADS * ROW_KERNEL_ELEMENTS_PER_THREAD // shape.head_dim)
    return common.flash_backward(
        "flash3", shape, block_rows, block_cols, buffers,
        dict(tensor_path="wgmma", warps=WARPS_PER_WARPGROUP * (groups + 1),
             registers_per_thread=consumer_registers, producer_warps=WARPS_PER_WARPGROUP,
             producer_registers_per_thread=producer_registers, copy_engine="tma"),
        row_kernels=dict(rows=rows, warps=ROW_KERNEL_THREADS // 32),
        notes=f"FlashAttention backward on Hopper: producer warpgroup (TMA, {stages}-stage Q/dO "
              f"ring), {groups} consumer warpgroup(s) of 64 keys (wgmma), dQ added into a "
              "float32 buffer")
