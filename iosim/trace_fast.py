"""Vectorised trace building: one batch·head's events without a Python loop per tile.

The same events as :func:`iosim.trace._head_template_reference` (which walks every CTA op by op
through :func:`iosim.schedule.walk`), built by walking each kernel's program *once* as a tree:

* a **context** is one activation of a loop body (or of the CTA program, for the grid): the block
  index of every bound variable and, per variable that has a tile extent, whether its current
  block is the ragged last one. Contexts are NumPy arrays, one entry per activation, in program
  order;
* a :class:`~iosim.schedule.Loop` expands each context into one sub-context per block
  (``np.repeat``/``np.tile``), drops the blocks above the causal diagonal, and places each
  sub-context's events after those of the earlier iterations (exclusive cumulative sums of the
  event counts);
* an op's event values depend on the tile extents only, i.e. on the ragged flags of the bound
  variables: they are computed in Python once per combination of flags (at most 2^k for k block
  variables) and gathered into the event columns by the context's combination code. Addresses
  are ``base + (row0 * row_len + col0) * elem_bytes`` with row0/col0 from the block indices;
* ``sync`` (the first shared-memory load of a run of loads) is computed afterwards from the
  previous event of the same CTA.

The tile extents of a variable whose loop has ended stay those of its last executed iteration,
as in :func:`~iosim.schedule.walk`.

**Compressed templates** (``compress=True``, for long sequences: a CTA of flash2 at
N = 10^6 runs 16 k K/V blocks). An innermost loop (no loop in its body) with more than three
executed iterations keeps three of them: the first, the second standing for every middle one
(``reps`` = iterations - 2, its addresses advancing by ``addr_step`` bytes per repetition) and
the last. The middle iterations are the same events but for their addresses: none is ragged
(only a variable's last block is), and each event's predecessor is the same op as in the full
order (so ``sync`` and every neighbourhood the timed model looks at agree).
Extra columns: ``reps`` (how many times the event runs; 1 outside a middle iteration),
``addr_step``, ``body_offset`` (its place in its iteration's events) and ``body_len`` (the
events of one iteration). Expanding the repetitions gives the full template exactly
(:func:`expand_template`).
"""
from __future__ import annotations

import numpy as np

from . import schedule as sch
from . import work

LOAD, STORE, COMPUTE = 0, 1, 2
#: The columns a compressed template adds (see the module docstring).
REPEAT_COLUMNS = ("reps", "addr_step", "body_offset", "body_len")


def _names():
    from .trace import _COLUMNS, _DTYPES, _WORK_COLUMNS
    return _COLUMNS + _WORK_COLUMNS, _DTYPES


class _Builder:
    def __init__(self, kernel, schedule, base, tensor_ids, extents=None, compress=False):
        shape = schedule.shape
        self.compress = compress
        self.kernel = kernel
        self.n, self.d, self.causal = shape.seq_len, shape.head_dim, shape.causal
        self.extents = kernel.base_dims(self.d, self.n)
        self.extents.update(extents or {})
        self.tensors = schedule.tensor_map()
        self.buffers = kernel.buffer_map()
        self.base, self.tensor_ids = base, tensor_ids
        self.blocks = dict(kernel.blocks)
        self.span = {v: self.extents[kernel.span(v)] for v in self.blocks}
        self.nb = {v: sch.n_blocks(self.span[v], s) for v, s in self.blocks.items()}
        # the extent of a variable's ragged last block (== its block size when it divides)
        self.last = {v: self.span[v] - (self.nb[v] - 1) * s for v, s in self.blocks.items()}
        self.names, self.dtypes = _names()
        self._tables = {}

    # ---- contexts ----------------------------------------------------------------------------
    def ragged(self, var, idx):
        if self.span[var] % self.blocks[var] == 0 and self.span[var] >= self.blocks[var]:
            return np.zeros(len(idx), dtype=bool)
        return idx == self.nb[var] - 1

    def grid(self):
        kernel = self.kernel
        orders = []
        for var in kernel.grid:
            order = np.arange(self.nb[var], dtype=np.int64)
            if self.causal and kernel.longest_first and var == kernel.row_var:
                order = order[::-1]
            orders.append(order)
        if orders:
            mesh = np.meshgrid(*orders, indexing="ij")
            idx = {v: m.ravel().astype(np.int64) for v, m in zip(kernel.grid, mesh)}
            m = mesh[0].size
        else:
            idx, m = {}, 1
        rag = {v: self.ragged(v, idx[v]) for v in kernel.grid}
        return idx, rag, m

    def iterations(self, loop, idx, m):
        """Per context, the iterations of ``loop`` as a range ``[lo, hi)`` of block indices, and
        whether the causal mask may still drop some inside it (it skips a range's ends but may
        not keep one range where a "G" row tile spans several heads)."""
        lo = np.zeros(m, dtype=np.int64)
        hi = np.full(m, self.nb[loop.var], dtype=np.int64)
        if loop.within is not None:  # the blocks inside the current block of ``within``
            per = self.blocks[loop.within] // self.blocks[loop.var]
            lo = np.broadcast_to(idx[loop.within] * per, (m,)).astype(np.int64)
            hi = np.minimum(lo + per, self.nb[loop.var])
        r, c = self.kernel.row_var, self.kernel.col_var
        if self.causal and loop.causal_skip and (r in idx or r == loop.var):
            if loop.var == c:  # kept while the key block starts at or before the last
                # visible key: a prefix
                last = sch.last_visible_key(self.kernel, idx[r], self.extents)
                hi = np.minimum(hi, np.maximum(np.floor_divide(last, self.blocks[c]) + 1, 0))
            elif loop.var == r and self.kernel.span(r) != "G":
                # the last visible key grows with the row block: a suffix, from the first row
                # block that sees the key block's start (a binary search per context)
                need = idx[c] * self.blocks[c]
                a, b = lo.copy(), np.maximum(hi, lo)
                while np.any(a < b):
                    mid = (a + b) // 2
                    active = a < b
                    sees = sch.last_visible_key(self.kernel, mid, self.extents) >= need
                    b = np.where(active & sees, mid, b)
                    a = np.where(active & ~sees, mid + 1, a)
                lo = a
            else:
                return lo, np.maximum(hi, lo), True
        return lo, np.maximum(hi, lo), False

    def expand(self, loop, idx, m):
        """(parent context, indices, repetitions) of the executed iterations of ``loop`` in
        each context; repetitions None unless the loop is compressed (see the module doc)."""
        lo, hi, masked = self.iterations(loop, idx, m)
        count = hi - lo
        compress = (self.compress and not masked
                    and not any(isinstance(i, sch.Loop) for i in loop.body))
        kept = np.minimum(count, 3) if compress else count
        parent = np.repeat(np.arange(m, dtype=np.int64), kept)
        first = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(kept, out=first[1:])
        local = np.arange(len(parent), dtype=np.int64) - first[parent]
        sub = {v: a[parent] for v, a in idx.items()}
        reps = None
        if compress:  # iterations lo, lo + 1 (for every middle one) and hi - 1
            long = count[parent] > 3
            local = np.where(long & (local == 2), count[parent] - 1, local)
            reps = np.where(long & (local == 1), count[parent] - 2, 1)
        sub[loop.var] = lo[parent] + local
        if masked:
            r, c = self.kernel.row_var, self.kernel.col_var
            keep = ~(sub[c] * self.blocks[c]
                     > sch.last_visible_key(self.kernel, sub[r], self.extents))
            parent = parent[keep]
            sub = {v: a[keep] for v, a in sub.items()}
        return parent, sub, reps

    def count(self, body, idx, m):
        total = np.zeros(m, dtype=np.int64)
        fixed = 0
        for item in body:
            if isinstance(item, sch.Loop):
                parent, sub, _ = self.expand(item, idx, m)
                c = self.count(item.body, sub, len(parent))
                total += _group_sums(parent, c, m)
            else:
                fixed += 2 if isinstance(item, sch.Store) and item.accumulate else 1
        return total + fixed

    # ---- events ------------------------------------------------------------------------------
    def dims_of(self, vars_, code):
        dims = dict(self.extents)
        for bit, v in enumerate(vars_):
            dims[v] = self.last[v] if (code >> bit) & 1 else min(self.blocks[v], self.span[v])
        return dims

    def op_rows(self, op, dims):
        """The op's events (tuples over the columns, addr 0, sync = the first-load candidate)
        and whether each is a Load op's event."""
        buffers = self.buffers
        if isinstance(op, (sch.Load, sch.Store)):
            spec = self.tensors[op.tensor]
            nrows = dims[op.rows]
            ncols = dims[op.cols]
            row_len = self.extents[spec.cols]
            e = spec.elem_bytes
            row_bytes, stride = ncols * e, row_len * e
            if ncols == row_len:
                row_bytes, nrows = row_bytes * nrows, 1
            buf = buffers[op.buffer]
            tile_bytes = nrows * row_bytes
            on_chip = tile_bytes if buf.space == "smem" else 0
            is_load = isinstance(op, sch.Load)
            tid = self.tensor_ids[op.tensor]
            rows = []
            reduction = int(not is_load and op.accumulate)
            if reduction:
                rows.append(((LOAD, tid, 0, nrows, row_bytes, stride, 0, 0, 0, 0, 0,
                              0, 0, 0, 0, 0, 0, 1, 0, 1), 0))
            rows.append(((LOAD if is_load else STORE, tid, 0, nrows, row_bytes, stride, 0, 0, 0,
                          0 if is_load else on_chip, on_chip if is_load else 0,
                          0, 0, 0, 0, 0, 0, int(is_load and buf.stages > 1),
                          int(is_load and buf.space == "smem"), reduction), int(is_load)))
            return rows
        flops_tensor, flops_scalar = op.flops(dims, buffers)
        special = op.special_ops(dims, buffers) if hasattr(op, "special_ops") else 0

        def smem(names):
            return sum(dims[buffers[b].rows] * dims[buffers[b].cols] * buffers[b].elem_bytes
                       for b in names if buffers[b].space == "smem")

        return [((COMPUTE, -1, 0, 0, 0, 0, flops_tensor, flops_scalar, special,
                  smem(op.reads), smem(op.writes),
                  *work.op_work(op, dims, buffers, self.kernel), 0, 0, 0), 0)]

    def tables(self, op, vars_):
        """Per event of the op: one array per column over the 2^k extent codes (or a scalar
        where every code gives the same value), and the Load-op flag."""
        key = (id(op), vars_)
        if key not in self._tables:
            per_code = [self.op_rows(op, self.dims_of(vars_, code))
                        for code in range(1 << len(vars_))]
            events = []
            for e in range(len(per_code[0])):
                cols = []
                for ci, name in enumerate(self.names):
                    vals = [rows[e][0][ci] for rows in per_code]
                    if all(v == vals[0] for v in vals):
                        cols.append(vals[0])
                    else:
                        cols.append(np.asarray(vals, dtype=self.dtypes[name]))
                events.append((cols, per_code[0][e][1]))
            self._tables[key] = (op, events)  # keep op alive so id() stays unique
        return self._tables[key][1]

    def address(self, op, idx, m):
        spec = self.tensors[op.tensor]
        row_len = self.extents[spec.cols]
        row0 = idx[op.rows] * self.blocks[op.rows] if op.rows not in self.extents else 0
        col0 = idx[op.cols] * self.blocks[op.cols] if op.cols not in self.extents else 0
        addr = self.base[op.tensor] + (row0 * row_len + col0) * spec.elem_bytes
        if spec.slab_var is not None:  # the slab of the variable's current block
            addr = addr + idx[spec.slab_var] * (self.extents[spec.rows] * row_len
                                                * spec.elem_bytes)
        return np.broadcast_to(np.asarray(addr, dtype=np.int64), (m,))

    def step(self, op, var):
        """How far the address of ``op``'s tile moves when block variable ``var`` advances
        by one block (bytes)."""
        spec = self.tensors[op.tensor]
        row_len = self.extents[spec.cols]
        step = 0
        if op.rows == var:
            step += self.blocks[var] * row_len * spec.elem_bytes
        if op.cols == var:
            step += self.blocks[var] * spec.elem_bytes
        if spec.slab_var == var:
            step += self.extents[spec.rows] * row_len * spec.elem_bytes
        return step

    def emit(self, body, idx, rag, m, pos, reps=None, var=None):
        """Write the events of ``body`` run in each of ``m`` contexts, starting at ``pos``;
        return the extents' ragged flags after the body. ``reps``: per context, how many
        iterations of the compressed loop over ``var`` it stands for."""
        body_start = pos
        body_len = self.count(body, idx, m) if reps is not None else None
        pos = pos.copy()
        rag = dict(rag)
        code = vars_ = None
        for item in body:
            if isinstance(item, sch.Loop):
                var = item.var
                parent, sub, sub_reps = self.expand(item, idx, m)
                m2 = len(parent)
                c = self.count(item.body, sub, m2)
                cs = np.zeros(m2 + 1, dtype=np.int64)
                np.cumsum(c, out=cs[1:])
                bounds = np.searchsorted(parent, np.arange(m + 1))
                start = pos[parent] + cs[:-1] - cs[bounds[:-1]][parent]
                sub_rag = {v: a[parent] for v, a in rag.items()}
                sub_rag[var] = self.ragged(var, sub[var])
                after = self.emit(item.body, sub, sub_rag, m2, start, sub_reps, var)
                pos += cs[bounds[1:]] - cs[bounds[:-1]]
                # extents stay those of the last executed iteration
                ran = bounds[1:] > bounds[:-1]
                last = bounds[1:][ran] - 1
                for v, a in after.items():
                    new = rag[v].copy() if v in rag else np.zeros(m, dtype=bool)
                    new[ran] = a[last]
                    rag[v] = new
                code = None
                continue
            if code is None:
                vars_ = tuple(sorted(rag))
                code = np.zeros(m, dtype=np.int64)
                for bit, v in enumerate(vars_):
                    code |= rag[v].astype(np.int64) << bit
            events = self.tables(item, vars_)
            addr = self.address(item, idx, m) if isinstance(item, (sch.Load, sch.Store)) else None
            for cols, load_op in events:
                for name, col in zip(self.names, cols):
                    out = self.out[name]
                    if isinstance(col, np.ndarray):
                        out[pos] = col[code]
                    elif col:
                        out[pos] = col
                if addr is not None:
                    self.out["addr"][pos] = addr
                if reps is not None:
                    self.out["reps"][pos] = reps
                    self.out["body_offset"][pos] = pos - body_start
                    self.out["body_len"][pos] = body_len
                    if addr is not None:
                        self.out["addr_step"][pos] = self.step(item, var)
                if load_op:
                    self.load_op[pos] = True
                pos += 1
        return rag

    def build(self):
        idx, rag, m = self.grid()
        counts = self.count(self.kernel.body, idx, m)
        cta_start = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(counts, out=cta_start[1:])
        total = int(cta_start[-1])
        self.out = {c: np.zeros(total, dtype=self.dtypes[c]) for c in self.names}
        if self.compress:
            for c in REPEAT_COLUMNS:
                self.out[c] = np.zeros(total, dtype=np.int64)
            self.out["reps"][:] = 1
        self.load_op = np.zeros(total, dtype=bool)
        self.emit(self.kernel.body, idx, rag, m, cta_start[:-1])
        # sync: a shared-memory load not preceded (in its CTA) by another Load op
        previous = np.zeros(total, dtype=bool)
        previous[1:] = self.load_op[:-1]
        previous[cta_start[:-1][counts > 0]] = False
        sync = self.out["sync"]
        sync[previous] = 0
        return self.out, cta_start


def _group_sums(parent, values, m):
    """Sum of ``values`` per parent (``parent`` sorted), for parents 0..m-1."""
    cs = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(values, out=cs[1:])
    bounds = np.searchsorted(parent, np.arange(m + 1))
    return cs[bounds[1:]] - cs[bounds[:-1]]


def head_template(kernel, schedule, base, tensor_ids, extents=None, compress=False):
    """One batch·head's events (as columns) and CTA offsets, vectorised; see the module doc.
    ``extents`` overrides whole-extent tokens (the valid keys "L" of a batch element);
    ``compress``: a compressed template (the module doc)."""
    return _Builder(kernel, schedule, base, tensor_ids, extents, compress).build()


def expand_template(columns, cta_start):
    """The full template a compressed one stands for (every repetition written out, addresses
    advanced): the columns of :func:`head_template` without ``compress``, and CTA offsets."""
    reps = columns["reps"]
    n = len(reps)
    # a compressed iteration's events repeat as a block: index the events of each repetition
    first = np.flatnonzero((reps > 1) & (columns["body_offset"] == 0))
    order, rep = [], []
    e = 0
    for f in first:
        order.append(np.arange(e, f))
        rep.append(np.zeros(f - e, dtype=np.int64))
        length = int(columns["body_len"][f])
        k = int(reps[f])
        order.append(np.tile(np.arange(f, f + length), k))
        rep.append(np.repeat(np.arange(k, dtype=np.int64), length))
        e = f + length
    order.append(np.arange(e, n))
    rep.append(np.zeros(n - e, dtype=np.int64))
    order = np.concatenate(order).astype(np.int64)
    rep = np.concatenate(rep)
    out = {c: v[order] for c, v in columns.items() if c not in REPEAT_COLUMNS}
    out["addr"] = out["addr"] + rep * columns["addr_step"][order]
    counts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(reps, out=counts[1:])
    return out, counts[cta_start]
