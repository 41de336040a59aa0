"""The trace builder: a schedule becomes compact NumPy arrays of events, kernel by kernel.

One batch·head's events are built by :mod:`iosim.trace_fast`, which walks each CTA program once
as a tree and assembles every CTA's events with NumPy; :func:`_head_template_reference` walks
every CTA op by op (the same steps the numeric executor runs) and is kept as its reference.
The events of the other batch·heads differ only by a constant address offset per tensor and are
produced by NumPy broadcasting, not Python loops.

Event kinds: LOAD (a tile HBM -> SRAM), STORE (SRAM -> HBM) and COMPUTE (FLOPs by unit, the
exp/log evaluations among the scalar FLOPs, and the SRAM bytes the op reads and writes). An
accumulating store (an atomic add) is a LOAD of the tile followed by a STORE of it: the L2's
read-modify-write. A tile is ``rows`` row segments of ``row_bytes`` contiguous bytes,
``row_stride`` bytes apart, starting at byte address ``addr``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import schedule as sch
from . import trace_fast, work

LOAD, STORE, COMPUTE = 0, 1, 2
TENSOR_ALIGN_BYTES = 1 << 20  # tensors start on 1 MiB boundaries, as an allocator would place them

# the columns the replay engine reads, for every event of every batch·head
_COLUMNS = ("kind", "tensor", "addr", "rows", "row_bytes", "row_stride", "flops_tensor",
            "flops_scalar", "special_ops", "sram_read", "sram_write")
# what each event asks of the SM's pipes (iosim.work), and for tile loads: ``prefetched``
# (the buffer has several stages, so the copy is issued one loop iteration ahead),
# ``sync`` (a CTA-wide barrier before the tile may be used: the first load of a group) and
# ``reduction`` (the two events of an accumulating store: an atomic add at the L2). The
# same for every batch·head, so kept for one (``KernelTrace.head``), with the columns the
# timing model needs beside them
_WORK_COLUMNS = work.FIELDS + ("prefetched", "sync", "reduction")
_HEAD_COLUMNS = ("kind", "rows", "row_bytes", "sram_read", "sram_write") + _WORK_COLUMNS
_DTYPES = {"kind": np.int8, "tensor": np.int16, "addr": np.int64, "rows": np.int64,
           "row_bytes": np.int64, "row_stride": np.int64, "flops_tensor": np.int64,
           "flops_scalar": np.int64, "special_ops": np.int64, "sram_read": np.int64,
           "sram_write": np.int64, "mma": np.int64, "mma_chain": np.int32,
           "smem_operand_bytes": np.int64, "fp32": np.int64, "sfu": np.int64,
           "depth": np.int32, "prefetched": np.int8, "sync": np.int8, "reduction": np.int8}


@dataclass
class KernelTrace:
    """One kernel's events in launch order: CTA c owns events cta_start[c]:cta_start[c+1]."""

    name: str
    cta_start: np.ndarray
    kind: np.ndarray
    tensor: np.ndarray
    addr: np.ndarray
    rows: np.ndarray
    row_bytes: np.ndarray
    row_stride: np.ndarray
    flops_tensor: np.ndarray
    flops_scalar: np.ndarray
    special_ops: np.ndarray
    sram_read: np.ndarray
    sram_write: np.ndarray
    smem_bytes_per_cta: int
    kernel: object = None  # the schedule's Kernel (warps, registers, tensor path)
    tensor_path: str = "library"
    # one batch·head's events (the others repeat them): the _HEAD_COLUMNS and its CTAs'
    # ``cta_start``; ``heads`` batch·heads in all
    head: dict = None
    heads: int = 1
    # with a key-padding mask the batch elements' heads run different programs: one
    # (head template, heads) pair per run of heads sharing one, in launch order (``head`` and
    # ``heads`` are then the first's)
    head_groups: list = None

    @property
    def n_ctas(self) -> int:
        return len(self.cta_start) - 1

    @property
    def n_events(self) -> int:
        return len(self.kind)

    def groups(self) -> list:
        """One KernelTrace per run of heads sharing a program (just ``self`` without a padding
        mask), each with its own events, CTAs and head template: (trace, first event index)."""
        if not self.head_groups or len(self.head_groups) == 1:
            return [(self, 0)]
        out, event, cta = [], 0, 0
        for head, heads in self.head_groups:
            n_events = len(head["kind"]) * heads
            n_ctas = (len(head["cta_start"]) - 1) * heads
            columns = {c: getattr(self, c)[event:event + n_events] for c in _COLUMNS}
            out.append((KernelTrace(
                name=self.name, cta_start=self.cta_start[cta:cta + n_ctas + 1] - event,
                smem_bytes_per_cta=self.smem_bytes_per_cta, kernel=self.kernel,
                tensor_path=self.tensor_path, head=head, heads=heads, **columns), event))
            event, cta = event + n_events, cta + n_ctas
        return out


@dataclass
class Trace:
    schedule: object
    tensor_names: tuple
    tensor_base: np.ndarray  # byte address of each tensor
    kernels: list


def tensor_layout(schedule) -> tuple[dict, dict]:
    """Byte base address and per-head byte stride of every tensor, in declaration order (a
    "kv" tensor has B·H_kv heads, a "q" tensor B·H; a split tensor one slab per split)."""
    shape = schedule.shape
    extents = schedule.kernels[0].base_dims(shape.head_dim, shape.seq_len)
    base, head_stride, cursor = {}, {}, 0
    for t in schedule.tensors:
        slabs = extents["S"] if t.slab_var else 1
        head_bytes = extents[t.rows] * extents[t.cols] * t.elem_bytes * slabs
        base[t.name] = cursor
        head_stride[t.name] = head_bytes
        total = head_bytes * (shape.batch_kv_heads if t.heads == "kv" else shape.batch_heads)
        cursor += -(-total // TENSOR_ALIGN_BYTES) * TENSOR_ALIGN_BYTES
    return base, head_stride


def tensor_addressing(schedule) -> tuple[tuple, dict, dict, np.ndarray]:
    """What addresses a schedule's events: the tensor names in declaration order, their ids,
    their base addresses, and each id's per-head byte stride (plus a trailing 0 for compute
    events, tensor id -1)."""
    base, head_stride = tensor_layout(schedule)
    names = tuple(t.name for t in schedule.tensors)
    tensor_ids = {name: i for i, name in enumerate(names)}
    stride_by_id = np.array([head_stride[name] for name in names] + [0], dtype=np.int64)
    return names, tensor_ids, base, stride_by_id


def tensor_heads(schedule, kernel, heads: np.ndarray) -> np.ndarray:
    """Per kernel head (rows) and tensor (columns, plus a trailing 0 column for compute
    events): the head-stride multiple of the tensor slice that head addresses. A query head
    reads K/V head h // group; a K/V head's CTAs see a query tensor's group of heads, which
    starts at query head k · group."""
    g = schedule.shape.group_size
    per_kv = kernel.heads == "kv"
    cols = []
    for t in schedule.tensors:
        if (t.heads == "kv") == per_kv:
            cols.append(heads)
        elif per_kv:
            cols.append(heads * g)
        else:
            cols.append(heads // g)
    cols.append(np.zeros_like(heads))
    return np.stack(cols, axis=1)


def _tile_extent(token, index, dims, kernel):
    """(first index, count) of a tile dimension given by ``token``."""
    if token not in index:
        return 0, dims[token]
    return index[token] * kernel.blocks[token], dims[token]


def _head_template_reference(kernel, schedule, base, tensor_ids, extents=None):
    """Walk every CTA of one batch·head; return its events (as columns) and CTA offsets.

    The reference for :func:`iosim.trace_fast.head_template` (the same arrays, vectorised):
    one Python step per op of every CTA."""
    shape = schedule.shape
    n, d = shape.seq_len, shape.head_dim
    overrides = extents
    extents = kernel.base_dims(d, n)
    extents.update(overrides or {})
    tensors = schedule.tensor_map()
    buffers = kernel.buffer_map()
    cols = {c: [] for c in _COLUMNS + _WORK_COLUMNS}
    cta_start = [0]

    def smem(names, dims):
        return sum(dims[buffers[b].rows] * dims[buffers[b].cols] * buffers[b].elem_bytes
                   for b in names if buffers[b].space == "smem")

    for point in sch.grid_points(kernel, n, shape.causal, overrides):
        previous_load = False
        for step in sch.walk(kernel, point, n, d, shape.causal, overrides):
            op, index, dims = step.op, step.index, step.dims
            if isinstance(op, (sch.Load, sch.Store)):
                spec = tensors[op.tensor]
                row0, nrows = _tile_extent(op.rows, index, dims, kernel)
                col0, ncols = _tile_extent(op.cols, index, dims, kernel)
                row_len = extents[spec.cols]
                e = spec.elem_bytes
                addr = base[op.tensor] + (row0 * row_len + col0) * e
                if spec.slab_var is not None:
                    addr += index[spec.slab_var] * extents[spec.rows] * row_len * e
                row_bytes, stride = ncols * e, row_len * e
                if ncols == row_len:  # whole rows: one contiguous segment
                    row_bytes, nrows = row_bytes * nrows, 1
                buf = buffers[op.buffer]
                tile_bytes = nrows * row_bytes
                on_chip = tile_bytes if buf.space == "smem" else 0
                is_load = isinstance(op, sch.Load)
                if not is_load and op.accumulate:
                    # an atomic add: the L2 reads the tile and writes it back (a load event,
                    # issued without waiting: the CTA never sees the old values, so
                    # "prefetched", no barrier), then the store below
                    for c, v in zip(_COLUMNS + _WORK_COLUMNS,
                                    (LOAD, tensor_ids[op.tensor], addr, nrows, row_bytes,
                                     stride, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1)):
                        cols[c].append(v)
                values = (LOAD if is_load else STORE, tensor_ids[op.tensor],
                          addr, nrows, row_bytes, stride, 0, 0, 0,
                          0 if is_load else on_chip, on_chip if is_load else 0,
                          0, 0, 0, 0, 0, 0, int(is_load and buf.stages > 1),
                          int(is_load and buf.space == "smem" and not previous_load),
                          int(not is_load and op.accumulate))
                previous_load = is_load
            else:
                previous_load = False
                flops_tensor, flops_scalar = op.flops(dims, buffers)
                special = op.special_ops(dims, buffers) if hasattr(op, "special_ops") else 0
                values = (COMPUTE, -1, 0, 0, 0, 0, flops_tensor, flops_scalar, special,
                          smem(op.reads, dims), smem(op.writes, dims),
                          *work.op_work(op, dims, buffers, kernel), 0, 0, 0)
            for c, v in zip(_COLUMNS + _WORK_COLUMNS, values):
                cols[c].append(v)
        cta_start.append(len(cols["kind"]))
    return {c: np.asarray(v, dtype=_DTYPES[c]) for c, v in cols.items()}, np.asarray(cta_start)


def build_trace(schedule, reference: bool = False) -> Trace:
    """Events of every kernel of ``schedule`` over all its heads (batch·query heads, or
    batch·K/V heads for a kernel over K/V heads).

    One head's events come from :func:`iosim.trace_fast.head_template` (vectorised), or
    with ``reference`` from the op-by-op walker :func:`_head_template_reference` (the same
    arrays, slower: the oracle the tests compare the vectorised builder with). With a
    key-padding mask each batch element's heads get the template of its valid keys."""
    template_of = _head_template_reference if reference else trace_fast.head_template
    shape = schedule.shape
    names, tensor_ids, base, stride_by_id = tensor_addressing(schedule)
    kernels = []
    for kernel in schedule.kernels:
        per_batch = shape.kv_heads if kernel.heads == "kv" else shape.heads
        # runs of batch elements with the same valid keys share a template
        runs = []
        for b in range(shape.batch):
            valid = shape.valid_kv_len(b)
            if runs and runs[-1][0] == valid:
                runs[-1][1] += 1
            else:
                runs.append([valid, 1])
        templates = {}
        parts, groups, first_head = [], [], 0
        for valid, batches in runs:
            if valid not in templates:
                extents = {"L": valid} if shape.kv_lens is not None else None
                templates[valid] = template_of(kernel, schedule, base, tensor_ids, extents)
            template, starts = templates[valid]
            heads = batches * per_batch
            head_index = np.arange(first_head, first_head + heads, dtype=np.int64)
            parts.append(_repeat_heads(template, starts, head_index,
                                       tensor_heads(schedule, kernel, head_index) * stride_by_id))
            head = {c: template[c] for c in _HEAD_COLUMNS}
            head["cta_start"] = starts
            groups.append((head, heads))
            first_head += heads
        if len(parts) == 1:  # one template for every head: its columns as they are
            columns, cta_start = parts[0]
        else:
            columns = {c: np.concatenate([p[0][c] for p in parts]) for c in _COLUMNS}
            offsets = np.cumsum([0] + [len(p[0]["kind"]) for p in parts])
            cta_start = np.concatenate([p[1][:-1] + off for p, off in zip(parts, offsets)]
                                       + [offsets[-1:]]).astype(np.int64)
        kernels.append(KernelTrace(name=kernel.name, cta_start=cta_start,
                                   tensor_path=kernel.tensor_path, kernel=kernel,
                                   head=groups[0][0], heads=groups[0][1],
                                   head_groups=groups if len(groups) > 1 else None,
                                   smem_bytes_per_cta=kernel.smem_bytes(shape.head_dim,
                                                                        shape.seq_len),
                                   **columns))
    return Trace(schedule=schedule, tensor_names=names,
                 tensor_base=np.array([base[nm] for nm in names], dtype=np.int64),
                 kernels=kernels)


def _repeat_heads(template, starts, head_index, offset_by_tensor):
    """The events of ``len(head_index)`` heads running ``template`` (its CTAs at ``starts``):
    head h's addresses are the template's plus ``offset_by_tensor[h, tensor]``; returns the
    columns and the CTA offsets (with the end)."""
    heads = len(head_index)
    per_head = len(template["kind"])
    columns = {c: np.tile(template[c], heads) for c in _COLUMNS}
    addr = columns["addr"].reshape(heads, per_head)
    addr += offset_by_tensor[:, template["tensor"]]  # tensor id -1 (compute): the 0 column
    cta_start = (starts[:-1][None, :] + per_head * np.arange(heads)[:, None]).ravel()
    return columns, np.append(cta_start, per_head * heads).astype(np.int64)
