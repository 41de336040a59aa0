"""The schedule: an algorithm's per-thread-block (CTA) tile program, as data.

A :class:`Schedule` is a list of :class:`Kernel` s run one after another. A kernel launches a grid
of CTAs: one per (batch·head, grid index ...) point, in launch order (batch·head slowest). Each CTA
runs the same program: a list of ops and nested :class:`Loop` s over blocks of rows (the *row*
block variable, size ``Br``) or columns (the *column* block variable, size ``Bc``) of an N-long
sequence. Ops name on-chip buffers; :class:`Load` and :class:`Store` move tiles of named global
tensors between HBM and those buffers.

Nothing here computes anything. Two walkers read the same objects: the numeric executor
(:mod:`iosim.executor`) runs the ops on arrays, the trace builder (:mod:`iosim.trace`) turns loads,
stores and FLOP counts into event arrays for the replay engine. See :func:`walk`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from typing import Iterator, Union

from .errors import TilingError

# Extents of tile dimensions are named by tokens:
#   the name of a block variable ("i", "j")  -> rows/cols of the current block of that variable
#   "d"                                      -> the head dimension
#   "N"                                      -> the whole query sequence (seq_len)
#   "M"                                      -> the whole key/value sequence (kv_seq_len)
#   "L"                                      -> the valid keys of the current batch element
#                                               (kv_lens; M without a padding mask)
#   "G"                                      -> the query rows of a K/V head's group of query
#                                               heads (group_size · N), for kernels over K/V heads
#   "S"                                      -> the KV splits of a split-KV kernel
#   "1"                                      -> a single column (row vectors such as m, l)
# A block variable runs over the extent of its *span* token: by default the kernel's row
# variable over "N" and every other over "M" (Kernel.spans overrides).
Dim = str


@dataclass(frozen=True)
class TensorSpec:
    """A global tensor in HBM, laid out (batch·head, rows, cols) row-major."""

    name: str
    rows: Dim  # "N"
    cols: Dim  # "N", "d" or "1"
    elem_bytes: int
    role: str  # "input", "output" or "intermediate"
    float32: bool = False  # kept in float32 whatever the input dtype (running max/sum, scratch)
    # "q": one (rows x cols) slice per batch·query head; "kv": per batch·K/V head (K, V, dK, dV)
    heads: str = "q"
    # one slab per block of this variable (a split-KV kernel's partial outputs, one per split):
    # the tensor is (heads, slabs, rows, cols) and a tile lies in the slab of the variable's
    # current block
    slab_var: str | None = None


@dataclass(frozen=True)
class BufferSpec:
    """An on-chip tile. ``space`` is "smem" (shared memory, counts against SRAM) or "reg".

    ``stages`` copies of a shared-memory tile are kept when it is multi-buffered: 2 for a tile
    whose next block is copied in while this one is used (FlashAttention-2's K and V)."""

    name: str
    rows: Dim
    cols: Dim
    elem_bytes: int
    space: str = "smem"
    stages: int = 1


# ---- ops -------------------------------------------------------------------------------------
# Each op lists the buffers it reads and writes (for SRAM byte counts) and its FLOPs as a
# function of the current tile extents (``dims``: token -> number of rows/cols): ``flops``
# returns (tensor-core FLOPs, scalar FLOPs); ops that evaluate exp or log also say how many in
# ``special_ops`` (a part of their scalar FLOPs that runs on the special-function units).


@dataclass(frozen=True)
class Load:
    """Copy the tile tensor[rows, cols] from HBM into ``buffer``."""

    buffer: str
    tensor: str
    rows: Dim
    cols: Dim


@dataclass(frozen=True)
class Store:
    """Copy ``buffer`` back to the tile tensor[rows, cols] in HBM.

    With ``accumulate`` the tile is *added* to what the tensor holds, with atomics (as
    FlashAttention-2's backward adds each K/V block's share of dQ into a float32 buffer). The
    add happens in the L2: a read-modify-write of the tile. The trace counts it as a load and a
    store of the same tile (see :mod:`iosim.trace`); the CTA waits for neither."""

    buffer: str
    tensor: str
    rows: Dim
    cols: Dim
    accumulate: bool = False


@dataclass(frozen=True)
class Fill:
    """Set ``buffer`` to a constant: 0, or -inf for a running maximum."""

    buffer: str
    value: float

    reads = ()

    @property
    def writes(self):
        return (self.buffer,)

    def flops(self, dims, buffers):
        return 0, 0


@dataclass(frozen=True)
class Copy:
    """dst = src between on-chip buffers (e.g. a shared-memory tile into registers, where a
    kernel keeps an operand for its whole loop)."""

    dst: str
    src: str

    @property
    def reads(self):
        return (self.src,)

    @property
    def writes(self):
        return (self.dst,)

    def flops(self, dims, buffers):
        return 0, 0


@dataclass(frozen=True)
class MatMul:
    """out = [out +] [scale ·] a @ b, with aᵀ for a when ``transpose_a`` and bᵀ for b when
    ``transpose_b``. Tensor-core FLOPs 2·m·n·k (m x k times k x n, after the transposes)."""

    out: str
    a: str
    b: str
    transpose_b: bool = False
    accumulate: bool = False
    scaled: bool = False  # multiply by the softmax scale 1/sqrt(d) (free in a GEMM epilogue)
    transpose_a: bool = False  # the backward's dV = Pᵀ dO, dK = dSᵀ Q

    @property
    def reads(self):
        return (self.a, self.b) + ((self.out,) if self.accumulate else ())

    @property
    def writes(self):
        return (self.out,)

    def extents(self, dims, buffers) -> tuple[int, int, int]:
        """(m, n, k) of the product: out is m x n, the contraction k long."""
        a, b = buffers[self.a], buffers[self.b]
        m, k = (dims[a.cols], dims[a.rows]) if self.transpose_a else (dims[a.rows], dims[a.cols])
        n = dims[b.rows] if self.transpose_b else dims[b.cols]
        return m, n, k

    def flops(self, dims, buffers):
        # accumulating into ``out`` happens inside the tensor-core instruction: no scalar FLOPs
        m, n, k = self.extents(dims, buffers)
        return 2 * m * n * k, 0


def _size(buf: BufferSpec, dims) -> int:
    return dims[buf.rows] * dims[buf.cols]


class _Elementwise:
    """An op that updates ``buffer`` in place, one scalar operation per element."""

    @property
    def reads(self):
        return (self.buffer,)

    @property
    def writes(self):
        return (self.buffer,)

    def flops(self, dims, buffers):
        return 0, _size(buffers[self.buffer], dims)


@dataclass(frozen=True)
class Scale(_Elementwise):
    """buffer *= softmax scale (elementwise)."""

    buffer: str


@dataclass(frozen=True)
class CausalMask(_Elementwise):
    """Set buffer[r, c] = ``value`` (-inf) where the column's sequence index exceeds the row's.

    ``row_offset``/``col_offset`` name the block variables (or "N" for a whole-row tile) that
    place the tile in the sequence."""

    buffer: str
    row_var: Dim
    col_var: Dim
    value: float = float("-inf")  # 0.0: the mask's backward (zero the masked gradients)


#: Philox4x32-10, the counter-based generator cuRAND and PyTorch draw dropout masks from: 10
#: rounds of 2 wide multiplies, 4 XORs and 2 key additions (8 integer instructions each) give
#: four 32-bit random words per call.
PHILOX_INSTRUCTIONS_PER_CALL = 10 * 8
PHILOX_BITS_PER_CALL = 4 * 32


@dataclass(frozen=True)
class Dropout:
    """buffer[r, c] = buffer[r, c] · keep[r, c] / (1 − p), keep drawn from a counter-based RNG
    at (query head, query row, key column): the same mask wherever and however often it is
    regenerated. ``bits_per_element`` random bits decide one element: 32 (a float uniform, as
    PyTorch's dropout kernel draws) or 8 (a byte threshold, as fused attention kernels do).
    With ``mask_out`` the keep mask is also written to that (1-byte) buffer, for the backward.

    Counted per element: the RNG's integer instructions (PHILOX_INSTRUCTIONS_PER_CALL over the
    elements one call decides), a compare and a multiply; they run on the CUDA cores and are
    counted with the scalar FLOPs."""

    buffer: str
    row_var: Dim
    col_var: Dim
    bits_per_element: int = 32
    mask_out: str | None = None

    @property
    def reads(self):
        return (self.buffer,)

    @property
    def writes(self):
        return (self.buffer,) + ((self.mask_out,) if self.mask_out else ())

    def flops(self, dims, buffers):
        elements = _size(buffers[self.buffer], dims)
        per_call = PHILOX_BITS_PER_CALL // self.bits_per_element
        return 0, elements * 2 + -(-elements * PHILOX_INSTRUCTIONS_PER_CALL // per_call)


@dataclass(frozen=True)
class KeyPaddingMask(_Elementwise):
    """Set buffer[r, c] = -inf where key c is padding (c >= the batch element's valid keys,
    token "L"): the unfused pipelines' key-padding mask."""

    buffer: str
    col_var: Dim


@dataclass(frozen=True)
class Softmax:
    """out = softmax(src) along rows, the stable way (subtract the row max): whole rows in SRAM."""

    out: str
    src: str

    @property
    def reads(self):
        return (self.src,)

    @property
    def writes(self):
        return (self.out,)

    def flops(self, dims, buffers):
        # per element: max, subtract, exp, sum, divide
        return 0, 5 * _size(buffers[self.src], dims)

    def special_ops(self, dims, buffers):
        return _size(buffers[self.src], dims)  # one exp per element


@dataclass(frozen=True)
class OnlineSoftmax:
    """FlashAttention-2 step on a score tile S with running row max m and row sum l:
    m_new = max(m, rowmax S); P = exp(S - m_new); alpha = exp(m - m_new);
    l = alpha·l + rowsum P; m = m_new."""

    scores: str
    probs: str
    row_max: str
    row_sum: str
    alpha: str

    @property
    def reads(self):
        return (self.scores, self.row_max, self.row_sum)

    @property
    def writes(self):
        return (self.probs, self.row_max, self.row_sum, self.alpha)

    def flops(self, dims, buffers):
        tile = _size(buffers[self.scores], dims)
        rows = dims[buffers[self.scores].rows]
        # max, subtract, exp, sum per element; per row: max, subtract, exp, fma
        return 0, 4 * tile + 4 * rows

    def special_ops(self, dims, buffers):
        return _size(buffers[self.scores], dims) + dims[buffers[self.scores].rows]


@dataclass(frozen=True)
class BlockSoftmax:
    """FlashAttention-1 block statistics: m_blk = rowmax S; P = exp(S - m_blk); l_blk = rowsum P."""

    scores: str
    probs: str
    block_max: str
    block_sum: str

    @property
    def reads(self):
        return (self.scores,)

    @property
    def writes(self):
        return (self.probs, self.block_max, self.block_sum)

    def flops(self, dims, buffers):
        return 0, 4 * _size(buffers[self.scores], dims)

    def special_ops(self, dims, buffers):
        return _size(buffers[self.scores], dims)


@dataclass(frozen=True)
class Flash1Merge:
    """FlashAttention-1 merge (Algorithm 1, lines 11-13): with m_new = max(m, m_blk) and
    l_new = e^(m-m_new)·l + e^(m_blk-m_new)·l_blk,
    O = (l·e^(m-m_new)·O + e^(m_blk-m_new)·PV) / l_new; then m = m_new, l = l_new."""

    out: str
    pv: str
    row_max: str
    row_sum: str
    block_max: str
    block_sum: str

    @property
    def reads(self):
        return (self.out, self.pv, self.row_max, self.row_sum, self.block_max, self.block_sum)

    @property
    def writes(self):
        return (self.out, self.row_max, self.row_sum)

    def flops(self, dims, buffers):
        out = _size(buffers[self.out], dims)
        rows = dims[buffers[self.out].rows]
        # per element: two scales, one add, one divide; per row: max, 2 exp, 2 fma
        return 0, 4 * out + 6 * rows

    def special_ops(self, dims, buffers):
        return 2 * dims[buffers[self.out].rows]


@dataclass(frozen=True)
class RowScale:
    """buffer[r, :] *= factor[r] (the online-softmax rescale of the output accumulator)."""

    buffer: str
    factor: str

    @property
    def reads(self):
        return (self.buffer, self.factor)

    @property
    def writes(self):
        return (self.buffer,)

    def flops(self, dims, buffers):
        return 0, _size(buffers[self.buffer], dims)


@dataclass(frozen=True)
class RowDivide:
    """buffer[r, :] /= divisor[r] (the final normalisation by the row sum)."""

    buffer: str
    divisor: str

    @property
    def reads(self):
        return (self.buffer, self.divisor)

    @property
    def writes(self):
        return (self.buffer,)

    def flops(self, dims, buffers):
        return 0, _size(buffers[self.buffer], dims)


@dataclass(frozen=True)
class LogSumExp:
    """out = m + log(l): the per-row log-sum-exp that FlashAttention-2 keeps for the backward pass."""

    out: str
    row_max: str
    row_sum: str

    @property
    def reads(self):
        return (self.row_max, self.row_sum)

    @property
    def writes(self):
        return (self.out,)

    def flops(self, dims, buffers):
        return 0, 2 * dims[buffers[self.out].rows]

    def special_ops(self, dims, buffers):
        return dims[buffers[self.out].rows]  # one log per row


# ---- backward-pass ops ------------------------------------------------------------------------


@dataclass(frozen=True)
class RowDot:
    """out[r] = Σ_c a[r, c]·b[r, c]: the backward's D = rowsum(dO ∘ O) (FlashAttention-2) or
    rowsum(P ∘ dP) (autograd's softmax backward); the two are equal."""

    out: str
    a: str
    b: str

    @property
    def reads(self):
        return (self.a, self.b)

    @property
    def writes(self):
        return (self.out,)

    def flops(self, dims, buffers):
        return 0, 2 * _size(buffers[self.a], dims)  # a multiply and an add per element


@dataclass(frozen=True)
class SoftmaxBackward:
    """out = probs ∘ (grad − rowdot[r]): the gradient of the softmax's input (dS) from its
    output P, the output's gradient dP and D = rowsum(P ∘ dP)."""

    out: str
    probs: str
    grad: str
    rowdot: str

    @property
    def reads(self):
        return (self.probs, self.grad, self.rowdot)

    @property
    def writes(self):
        return (self.out,)

    def flops(self, dims, buffers):
        return 0, 2 * _size(buffers[self.grad], dims)  # a subtract and a multiply per element


@dataclass(frozen=True)
class RecomputeProbs:
    """probs = exp(scores − lse[r]): P recomputed from the scores and the saved log-sum-exp L
    (FlashAttention's backward); masked scores (-inf) give 0."""

    probs: str
    scores: str
    lse: str

    @property
    def reads(self):
        return (self.scores, self.lse)

    @property
    def writes(self):
        return (self.probs,)

    def flops(self, dims, buffers):
        return 0, 2 * _size(buffers[self.scores], dims)  # a subtract and an exp per element

    def special_ops(self, dims, buffers):
        return _size(buffers[self.scores], dims)


@dataclass(frozen=True)
class Loop:
    """Run ``body`` once per block of ``var`` (the kernel's row or column block variable).

    With ``causal_skip`` the iterations whose (row block, column block) tile lies wholly above
    the diagonal are skipped when the shape is causal."""

    var: str
    body: tuple
    causal_skip: bool = False
    # the blocks of ``var`` inside the current block of this (grid) variable only: a split-KV
    # CTA loops over the K/V blocks of its split
    within: str | None = None


Op = Union[Load, Store, Fill, Copy, MatMul, Scale, CausalMask, Dropout, KeyPaddingMask, Softmax,
           OnlineSoftmax, BlockSoftmax, Flash1Merge, RowScale, RowDivide, LogSumExp, RowDot,
           SoftmaxBackward, RecomputeProbs]

#: The passes a kernel belongs to, and what :func:`iosim.schedules.build_schedule` builds.
PASSES = ("forward", "backward", "both")


@dataclass(frozen=True)
class Kernel:
    """One kernel launch: grid variables (after the implicit batch·head index) and a CTA program.

    ``blocks`` maps each block variable to its block size in rows; the row variable indexes
    query rows, the column variable key/value rows (columns of S)."""

    name: str
    grid: tuple  # block variables that index CTAs, slowest first, after batch·head
    body: tuple
    buffers: tuple  # BufferSpec
    blocks: dict  # var -> block size (rows)
    row_var: str | None = None
    col_var: str | None = None
    tensor_path: str = "library"  # "library" (cuBLAS-class GEMM) or "mma_sync" (warp-level mma)
    warps: int = 4  # warps per CTA; a mma_sync kernel's warps split the rows of its tiles
    # causal: launch the row blocks with the most work (the last ones) first, as
    # FlashAttention-2 does, so that the short ones fill the tail
    longest_first: bool = False
    registers_per_thread: int | None = None  # declared; None: estimated (iosim.occupancy)
    phase: str = "forward"  # "forward" or "backward": the pass the kernel belongs to
    # ---- asynchronous (warp-specialised) kernels, Hopper style; the defaults describe a kernel
    # whose warps all compute and copy their own tiles. ``tensor_path`` "wgmma": warpgroup MMAs
    # (4 warps, 64 rows) reading their operands from shared memory once per warpgroup.
    # ``producer_warps`` of the ``warps`` only issue copies (a producer warpgroup); their
    # registers per thread are ``producer_registers_per_thread`` (lowered by setmaxnreg; None:
    # the kernel's). ``copy_engine``: "cp.async" (the computing warps copy) or "tma" (bulk tensor
    # copies issued by the producer, ``stages - 1`` tiles ahead of the consumers).
    # ``overlap_softmax``: the softmax of tile j runs while the tensor cores do the next QKᵀ.
    producer_warps: int = 0
    producer_registers_per_thread: int | None = None
    copy_engine: str = "cp.async"
    overlap_softmax: bool = False
    # the head index of the grid: "q" (one per batch·query head) or "kv" (one per batch·K/V
    # head; "q" tensors are then seen as the group's rows, token "G")
    heads: str = "q"
    spans: tuple = ()  # (variable, token) pairs overriding the default span of a variable
    # how a mma_sync kernel's warps share a tile: "rows" (each warp owns query rows and reads
    # all of the K/V tile) or "keys" (each warp owns a slice of the K/V block's keys and reads
    # all the query rows: a split-KV decode kernel with few rows)
    warp_split: str = "rows"
    # (token, extent) pairs of the workload (N, M, G, S, L), set by build_schedule from the shape;
    # absent ones default to seq_len (N, M, L) or 1 (G, S)
    extents: tuple = ()

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def consumer_warps(self) -> int:
        """Warps that compute (all of them unless some are copy-only producers)."""
        return self.warps - self.producer_warps

    @property
    def consumer_warpgroups(self) -> int:
        """Groups of 4 computing warps (a wgmma kernel's warpgroups, 64 query rows each)."""
        return max(1, self.consumer_warps // 4)

    def buffer_map(self) -> dict:
        return {b.name: b for b in self.buffers}

    def span(self, var: str) -> str:
        """The extent token a block variable runs over."""
        return dict(self.spans).get(var, "N" if var == self.row_var else "M")

    def base_dims(self, head_dim: int, seq_len: int) -> dict:
        """Extent of every whole-extent token for this kernel's workload."""
        dims = {"d": head_dim, "N": seq_len, "M": seq_len, "L": seq_len, "G": seq_len,
                "S": 1, "1": 1}
        dims.update(dict(self.extents))
        return dims

    def smem_bytes(self, head_dim: int, seq_len: int) -> int:
        """Shared-memory bytes of the CTA's live tiles at full block size, every stage."""
        dims = full_dims(self, head_dim, seq_len)
        return sum(dims[b.rows] * dims[b.cols] * b.elem_bytes * b.stages
                   for b in self.buffers if b.space == "smem")


@dataclass(frozen=True)
class Schedule:
    """An algorithm's forward pass, backward pass or both (forward kernels first) for one shape
    and tiling; each kernel's ``phase`` says which pass it belongs to."""

    algorithm: str
    shape: object  # AttentionShape
    tensors: tuple  # TensorSpec
    kernels: tuple  # Kernel
    block_rows: int
    block_cols: int
    notes: str = ""

    def tensor_map(self) -> dict:
        return {t.name: t for t in self.tensors}

    @property
    def has_backward(self) -> bool:
        return any(k.phase == "backward" for k in self.kernels)

    def check_fits(self, sram_bytes: int) -> None:
        """Refuse a tiling whose live shared-memory tiles exceed ``sram_bytes`` per CTA."""
        for kernel in self.kernels:
            need = kernel.smem_bytes(self.shape.head_dim, self.shape.seq_len)
            if need > sram_bytes:
                raise TilingError(
                    f"{self.algorithm} kernel {kernel.name!r} with block_rows={self.block_rows}, "
                    f"block_cols={self.block_cols} needs {need} bytes of SRAM per thread block; "
                    f"{sram_bytes} bytes are available (pick smaller blocks or raise --sram-bytes)")


def n_blocks(extent: int, size: int) -> int:
    return math.ceil(extent / size)


def full_dims(kernel: Kernel, head_dim: int, seq_len: int) -> dict:
    """Tile extents at full block size (a block no longer than its variable's extent)."""
    dims = kernel.base_dims(head_dim, seq_len)
    dims.update({var: min(size, dims[kernel.span(var)]) for var, size in kernel.blocks.items()})
    return dims


def causal_offset(kernel: Kernel, dims: dict) -> int:
    """Key position of query row 0 (M − N: the causal mask is aligned at the end of the keys)."""
    return dims["M"] - dims["N"]


@dataclass
class Step:
    """One op as a CTA runs it: the op, the current block index of each variable, tile extents."""

    op: object
    index: dict
    dims: dict


def last_visible_key(kernel: Kernel, row_block, dims: dict):
    """The last key position any query row of row block ``row_block`` (an int or an array)
    may see under the causal mask: its last row's position (rows sit at r + M − N). Rows of a
    "G" tile run over a group of heads, N rows each, so a tile reaching a head's last row sees
    key M − 1."""
    r = kernel.row_var
    size, n = kernel.blocks[r], dims["N"]
    first = row_block * size
    last = np.minimum(first + size, dims[kernel.span(r)]) - 1
    if kernel.span(r) == "G":
        last = np.where(last // n > first // n, n - 1, last % n)
    return last + causal_offset(kernel, dims)


def block_above_diagonal(kernel: Kernel, index: dict, dims: dict) -> bool:
    """True when the (row block, column block) tile lies wholly above the causal diagonal.
    A kernel without a row variable in ``index`` has no such tile."""
    r, c = kernel.row_var, kernel.col_var
    if r not in index:
        return False
    return index[c] * kernel.blocks[c] > int(last_visible_key(kernel, index[r], dims))


def loop_range(kernel: Kernel, loop: Loop, index: dict, dims: dict) -> range:
    """The block indices of ``loop`` in a CTA at ``index``: every block of its variable's
    extent, or with ``within`` those inside the current block of that variable."""
    size = kernel.blocks[loop.var]
    count = n_blocks(dims[kernel.span(loop.var)], size)
    if loop.within is None:
        return range(count)
    outer = kernel.blocks[loop.within]
    per = outer // size
    first = index[loop.within] * per
    return range(first, min(first + per, count))


def walk(kernel: Kernel, grid_index: dict, seq_len: int, head_dim: int,
         causal: bool, extents: dict | None = None) -> Iterator[Step]:
    """Yield the steps one CTA of ``kernel`` runs, in program order.

    ``grid_index`` gives the block index of each grid variable of this CTA; ``extents``
    overrides whole-extent tokens (the valid keys "L" of one batch element). Both the numeric
    executor and the trace builder consume this one sequence."""
    index = dict(grid_index)
    dims = kernel.base_dims(head_dim, seq_len)
    dims.update(extents or {})

    def set_dim(var):
        size = kernel.blocks[var]
        dims[var] = min(size, dims[kernel.span(var)] - index[var] * size)

    for var in grid_index:
        set_dim(var)

    def run(body):
        for item in body:
            if isinstance(item, Loop):
                for block in loop_range(kernel, item, index, dims):
                    index[item.var] = block
                    if (causal and item.causal_skip
                            and block_above_diagonal(kernel, index, dims)):
                        continue
                    set_dim(item.var)
                    yield from run(item.body)
                index.pop(item.var, None)
            else:
                yield Step(item, dict(index), dict(dims))

    yield from run(kernel.body)


def grid_points(kernel: Kernel, seq_len: int, causal: bool = False,
                extents: dict | None = None) -> list[dict]:
    """Every CTA's grid index (excluding batch·head), in launch order (the row blocks in
    reverse when the shape is ``causal`` and the kernel launches the longest first)."""
    dims = kernel.base_dims(0, seq_len)
    dims.update(extents or {})
    points = [{}]
    for var in kernel.grid:
        count = n_blocks(dims[kernel.span(var)], kernel.blocks[var])
        order = range(count)
        if causal and kernel.longest_first and var == kernel.row_var:
            order = reversed(order)
        points = [dict(p, **{var: b}) for p in points for b in order]
    return points
