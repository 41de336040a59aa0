"""The numeric executor: runs a schedule's tile program on NumPy arrays, tile by tile.

It walks exactly the steps the trace builder counts (:func:`iosim.schedule.walk`), so an output
that matches reference attention proves the counted program computes attention."""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import schedule as sch
from .errors import IosimError, TensorOverflowWarning
from .reference import dropout_keep
from .schedules import build_schedule
from .shape import AttentionShape

_DTYPES = {np.dtype(np.float16): "fp16", np.dtype(np.float32): "fp32",
           np.dtype(np.float64): "fp32"}


@dataclass
class ExecutionResult:
    """What a run left behind: the output, every global tensor (shape (B·H, rows, cols)) and
    the final value of captured on-chip buffers (for FlashAttention-2's m and l)."""

    output: np.ndarray
    tensors: dict
    captured: dict = field(default_factory=dict)


def _check_inputs(q, k, v):
    arrays = []
    for name, x in (("q", q), ("k", k), ("v", v)):
        x = np.asarray(x)
        if x.dtype not in _DTYPES:
            raise IosimError(f"{name} must be a float16, float32 or float64 array, got {x.dtype}")
        if x.ndim not in (2, 4):
            raise IosimError(f"{name} must have shape (N, d) or (B, H, N, d), got {x.shape}")
        if 0 in x.shape:
            raise IosimError(f"{name} has an empty dimension {x.shape}; all sizes must be >= 1")
        if not np.all(np.isfinite(x)):
            raise IosimError(f"{name} contains NaN or infinite values; inputs must be finite")
        arrays.append(x)
    q, k, v = arrays
    if not (q.shape == k.shape == v.shape):
        raise IosimError(f"q, k, v must have the same shape, got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise IosimError(f"q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return q, k, v


def _safe_exp_diff(a, b):
    """exp(a - b), with 0 where a is -inf (a row that has seen no unmasked score yet)."""
    with np.errstate(invalid="ignore"):
        out = np.exp(a - b)
    return np.where(np.isneginf(a), 0.0, out)


@dataclass
class _Overflow:
    """The first tensor (or on-chip product) whose finite values overflowed its dtype."""

    name: str = ""
    kernel: str = ""
    dtype: object = None
    count: int = 0

    def record(self, name, kernel, source, result) -> None:
        """Note the values of ``result`` that became infinite where ``source`` was finite."""
        new = np.isinf(result) & np.isfinite(source)
        if new.any():
            if not self.name:
                self.name, self.kernel, self.dtype = name, kernel, result.dtype
            if name == self.name:
                self.count += int(new.sum())


def _overflow_message(overflow: _Overflow, schedule) -> str:
    dtype = np.dtype(overflow.dtype)
    label = {"float16": "float16", "float32": "float32"}.get(dtype.name, dtype.name)
    spec = next((t for t in schedule.tensors if t.name == overflow.name), None)
    scores = spec is not None and (spec.rows, spec.cols) == ("N", "M")
    what = ("of the unfused pipeline's scores" if scores
            else "of its values" if spec is not None else "values of an on-chip product")
    hint = ("; the fused algorithms (flash1, flash2) keep the scores on chip in float32"
            if scores and label == "float16" else "")
    return (f"{overflow.name} overflowed {label} (max {np.finfo(dtype).max:.6g}) in "
            f"{schedule.algorithm}'s kernel {overflow.kernel!r}: {overflow.count} {what} do not "
            f"fit, so its output is NaN/inf, as a {label} GPU pipeline's would be{hint}")


class _CTA:
    """Numeric state of one CTA: its on-chip buffers, over the global tensors of one head
    (``head``: the batch·query head, or for a kernel over K/V heads the batch·K/V head)."""

    def __init__(self, kernel, head_tensors, compute_dtype, scale, overflow=None, *,
                 head=0, shape=None, slabbed=(), seed=0):
        self.kernel = kernel
        self.buffers = {}
        self.tensors = head_tensors
        self.compute_dtype = compute_dtype
        self.scale = scale
        self.specs = kernel.buffer_map()
        self.overflow = _Overflow() if overflow is None else overflow
        self.head, self.shape, self.slabbed, self.seed = head, shape, slabbed, seed

    def _slice(self, token, index, dims):
        if token not in index:  # a whole-extent token ("N", "M", "L", "G", "d", "1")
            return slice(0, dims[token])
        start = index[token] * self.kernel.blocks[token]
        return slice(start, start + dims[token])

    def _offset(self, token, index):
        return index[token] * self.kernel.blocks[token] if token in index else 0

    def _tensor(self, name, index):
        """The (rows, cols) array of tensor ``name`` this CTA addresses (its slab, if any)."""
        array = self.tensors[name]
        slab_var = self.slabbed.get(name)
        return array if slab_var is None else array[index[slab_var]]

    def _query_rows(self, token, index, count):
        """(query head, query row) of each of ``count`` tile rows starting at ``token``'s
        block: rows of a "G" tile run over the group's heads, N rows each."""
        rows = self._offset(token, index) + np.arange(count)
        if (token if token not in self.kernel.blocks else self.kernel.span(token)) == "G":
            n, g = self.shape.seq_len, self.shape.group_size
            return self.head * g + rows // n, rows % n
        return np.full(count, self.head), rows

    def step(self, step: sch.Step):
        op, index, dims = step.op, step.index, step.dims
        buf = self.buffers
        if isinstance(op, sch.Load):
            tile = self._tensor(op.tensor, index)[self._slice(op.rows, index, dims),
                                                  self._slice(op.cols, index, dims)]
            buf[op.buffer] = tile.astype(self.compute_dtype)
        elif isinstance(op, sch.Store):
            target = self._tensor(op.tensor, index)
            source = buf[op.buffer]
            with np.errstate(over="ignore"):  # reported once, as a TensorOverflowWarning
                stored = source.astype(target.dtype)
            self.overflow.record(op.tensor, self.kernel.name, source, stored)
            tile = (self._slice(op.rows, index, dims), self._slice(op.cols, index, dims))
            if op.accumulate:  # an atomic add into the tensor (float32 on the GPU)
                with np.errstate(over="ignore", invalid="ignore"):
                    target[tile] += stored
            else:
                target[tile] = stored
        elif isinstance(op, sch.Fill):
            spec = self.specs[op.buffer]
            buf[op.buffer] = np.full((dims[spec.rows], dims[spec.cols]), op.value,
                                     dtype=self.compute_dtype)
        elif isinstance(op, sch.Copy):
            buf[op.dst] = buf[op.src].copy()
        elif isinstance(op, sch.MatMul):
            a = buf[op.a].T if op.transpose_a else buf[op.a]
            b = buf[op.b].T if op.transpose_b else buf[op.b]
            with np.errstate(over="ignore", invalid="ignore"):
                product = a @ b
                if op.scaled:
                    product = product * self.scale
            if not np.isfinite(product).all():
                finite_operands = np.isfinite(a).all() and np.isfinite(b).all()
                self.overflow.record(op.out, self.kernel.name,
                                     np.full(product.shape, finite_operands), product)
            buf[op.out] = buf[op.out] + product if op.accumulate else product
        elif isinstance(op, sch.Scale):
            buf[op.buffer] = buf[op.buffer] * self.scale
        elif isinstance(op, sch.CausalMask):
            x = buf[op.buffer]
            _, rows = self._query_rows(op.row_var, index, x.shape[0])
            rows = rows[:, None] + sch.causal_offset(self.kernel, dims)
            cols = self._offset(op.col_var, index) + np.arange(x.shape[1])[None, :]
            buf[op.buffer] = np.where(cols > rows, op.value, x)
        elif isinstance(op, sch.KeyPaddingMask):
            x = buf[op.buffer]
            cols = self._offset(op.col_var, index) + np.arange(x.shape[1])[None, :]
            buf[op.buffer] = np.where(cols >= dims["L"], -np.inf, x)
        elif isinstance(op, sch.Dropout):
            x = buf[op.buffer]
            heads, rows = self._query_rows(op.row_var, index, x.shape[0])
            cols = self._offset(op.col_var, index) + np.arange(x.shape[1])
            keep = dropout_keep(self.seed, heads[:, None], rows[:, None], cols[None, :],
                                self.shape.dropout)
            buf[op.buffer] = np.where(keep, x / (1.0 - self.shape.dropout), 0.0).astype(x.dtype)
            if op.mask_out:
                buf[op.mask_out] = keep.astype(self.compute_dtype)
        elif isinstance(op, sch.Softmax):
            x = buf[op.src]
            with np.errstate(invalid="ignore"):  # inf - inf: a row an overflow made infinite
                e = np.exp(x - x.max(axis=1, keepdims=True))
                buf[op.out] = e / e.sum(axis=1, keepdims=True)
        elif isinstance(op, sch.OnlineSoftmax):
            s, m, l = buf[op.scores], buf[op.row_max], buf[op.row_sum]
            m_new = np.maximum(m, s.max(axis=1, keepdims=True))
            p = _safe_exp_diff(s, m_new)
            alpha = _safe_exp_diff(m, m_new)
            buf[op.probs], buf[op.alpha] = p, alpha
            buf[op.row_sum] = alpha * l + p.sum(axis=1, keepdims=True)
            buf[op.row_max] = m_new
        elif isinstance(op, sch.BlockSoftmax):
            s = buf[op.scores]
            m_blk = s.max(axis=1, keepdims=True)
            p = _safe_exp_diff(s, m_blk)
            buf[op.probs], buf[op.block_max] = p, m_blk
            buf[op.block_sum] = p.sum(axis=1, keepdims=True)
        elif isinstance(op, sch.Flash1Merge):
            m, l, o = buf[op.row_max], buf[op.row_sum], buf[op.out]
            m_blk, l_blk, pv = buf[op.block_max], buf[op.block_sum], buf[op.pv]
            m_new = np.maximum(m, m_blk)
            old, new = _safe_exp_diff(m, m_new), _safe_exp_diff(m_blk, m_new)
            l_new = old * l + new * l_blk
            with np.errstate(invalid="ignore", divide="ignore"):
                merged = (l * old * o + new * pv) / l_new
            buf[op.out] = np.where(l_new > 0, merged, o)
            buf[op.row_max], buf[op.row_sum] = m_new, l_new
        elif isinstance(op, sch.RowScale):
            buf[op.buffer] = buf[op.buffer] * buf[op.factor]
        elif isinstance(op, sch.RowDivide):
            # a row that saw no unmasked key (possible within one KV split) stays 0, as the
            # kernels leave it
            divisor = buf[op.divisor]
            buf[op.buffer] = np.divide(buf[op.buffer], divisor, where=divisor != 0,
                                       out=np.zeros_like(buf[op.buffer]))
        elif isinstance(op, sch.LogSumExp):
            with np.errstate(divide="ignore"):  # log 0 = -inf: a row with no unmasked key
                buf[op.out] = buf[op.row_max] + np.log(buf[op.row_sum])
        elif isinstance(op, sch.RowDot):
            buf[op.out] = (buf[op.a] * buf[op.b]).sum(axis=1, keepdims=True)
        elif isinstance(op, sch.SoftmaxBackward):
            buf[op.out] = buf[op.probs] * (buf[op.grad] - buf[op.rowdot])
        elif isinstance(op, sch.RecomputeProbs):
            buf[op.probs] = _safe_exp_diff(buf[op.scores], buf[op.lse])
        else:  # pragma: no cover - a new op without numeric semantics
            raise TypeError(f"the executor does not know op {type(op).__name__}")


def execute(schedule: sch.Schedule, q, k, v, d_out=None, *, scale: float | None = None,
            capture: tuple = (), saved: dict | None = None, seed: int = 0) -> ExecutionResult:
    """Run ``schedule`` on q of shape (B·H, N, d) and k, v of shape (B·H_kv, N_kv, d) (the
    schedule's shape says H_kv and N_kv; both equal H and N for plain multi-head attention)
    and return every tensor it wrote.

    A schedule with backward kernels needs ``d_out`` (dO, the gradient of the output, the
    shape of q); its gradients are ``tensors["dQ"]``, ``["dK"]`` and ``["dV"]``. A
    backward-only schedule also reads what the forward pass saved (P for the unfused
    pipelines, O and L for FlashAttention-2): pass them as ``saved`` (tensor name -> array
    of the tensor's shape, e.g. the forward run's ``tensors``), or build the schedule with
    ``pass_="both"``.

    ``capture`` names on-chip buffers (rows indexed by the kernel's row variable) whose value at
    the end of each CTA is kept, e.g. ("m", "l") for FlashAttention-2's running max and sum.
    ``seed`` seeds the dropout mask (:func:`iosim.reference.dropout_keep`).

    Values that overflow a tensor's dtype (a float16 S past 65504) become inf and the output
    NaN/inf, as on the GPU; one :class:`~iosim.errors.TensorOverflowWarning` names the first
    tensor that overflowed (NumPy's own overflow warnings are suppressed)."""
    shape = schedule.shape
    q, k, v = (np.asarray(x) for x in (q, k, v))
    bh, n, d = shape.batch_heads, shape.seq_len, shape.head_dim
    bkv, g = shape.batch_kv_heads, shape.group_size
    for name, x, want in (("q", q, (bh, n, d)), ("k", k, (bkv, shape.kv_seq_len, d)),
                          ("v", v, (bkv, shape.kv_seq_len, d))):
        if x.shape != want:
            raise IosimError(f"{name} must have shape {want} for {shape.describe()}, "
                             f"got {x.shape}")
    exact = q.dtype == np.float64
    compute_dtype = np.float64 if exact else np.float32
    scale = shape.softmax_scale if scale is None else scale
    tensors = {}
    dims = schedule.kernels[0].base_dims(d, n)
    slabbed = {}
    for spec in schedule.tensors:
        dtype = np.float64 if exact else (np.float32 if spec.float32 else q.dtype)
        heads = bkv if spec.heads == "kv" else bh
        slabs = (dims["S"],) if spec.slab_var else ()
        if spec.slab_var:
            slabbed[spec.name] = spec.slab_var
        tensors[spec.name] = np.full((heads,) + slabs + (dims[spec.rows], dims[spec.cols]),
                                     np.nan, dtype=dtype)
    tensors["Q"][...], tensors["K"][...], tensors["V"][...] = q, k, v
    if schedule.has_backward:
        if d_out is None:
            raise IosimError(f"{schedule.algorithm}'s schedule has backward kernels: pass d_out "
                             "(the gradient of the output, the shape of q)")
        d_out = np.asarray(d_out)
        if d_out.shape != q.shape:
            raise IosimError(f"d_out must have the shape of q {q.shape}, got {d_out.shape}")
        tensors["dO"][...] = d_out
    elif d_out is not None:
        raise IosimError(f"{schedule.algorithm}'s schedule has no backward kernels; d_out "
                         "applies to a schedule built with pass_='backward' or 'both'")
    for name, value in (saved or {}).items():
        if name not in tensors:
            raise IosimError(f"saved tensor {name!r} is not one of the schedule's: "
                             f"{', '.join(tensors)}")
        value = np.asarray(value)
        if value.shape != tensors[name].shape:
            raise IosimError(f"saved tensor {name!r} must have shape {tensors[name].shape}, "
                             f"got {value.shape}")
        tensors[name][...] = value
    written = {op.tensor for kernel in schedule.kernels for op in _ops(kernel.body)
               if isinstance(op, sch.Store)}
    missing = [t.name for t in schedule.tensors
               if schedule.has_backward and t.name not in ("Q", "K", "V", "dO")
               and t.name not in written and not (saved and t.name in saved)]
    if missing:
        raise IosimError(f"the schedule reads {', '.join(missing)}, which no kernel of it writes "
                         "(saved by the forward pass): pass saved={name: array} or build it "
                         "with pass_='both'")
    captured = {name: np.full((bh, n), np.nan) for name in capture}
    overflow = _Overflow()
    layouts = {spec.name: spec.heads for spec in schedule.tensors}
    for kernel in schedule.kernels:
        per_kv = kernel.heads == "kv"
        views = {name: _head_view(t, layouts[name], per_kv, g) for name, t in tensors.items()}
        heads_per_batch = shape.kv_heads if per_kv else shape.heads
        for head in range(bkv if per_kv else bh):
            extents = {"L": shape.valid_kv_len(head // heads_per_batch)}
            head_tensors = {name: view(head) for name, view in views.items()}
            for point in sch.grid_points(kernel, n, shape.causal, extents):
                cta = _CTA(kernel, head_tensors, compute_dtype, scale, overflow, head=head,
                           shape=shape, slabbed=slabbed, seed=seed)
                for step in sch.walk(kernel, point, n, d, shape.causal, extents):
                    cta.step(step)
                for name in capture:
                    if name in cta.buffers and kernel.row_var in point and not per_kv:
                        start = point[kernel.row_var] * kernel.blocks[kernel.row_var]
                        values = cta.buffers[name][:, 0]
                        captured[name][head, start:start + len(values)] = values
    if overflow.name:
        warnings.warn(_overflow_message(overflow, schedule), TensorOverflowWarning,
                      stacklevel=_caller_stacklevel())
    return ExecutionResult(output=tensors.get("O"), tensors=tensors, captured=captured)


def _head_view(tensor, layout: str, per_kv_kernel: bool, group: int):
    """head index -> the (rows, cols) array a kernel's CTA of that head sees of ``tensor``:
    a query head reads K/V head h // group; a K/V head sees a query-head tensor as its group's
    rows stacked (group · rows, cols), a view since the group's heads are adjacent."""
    if layout == "kv":
        return (lambda h: tensor[h]) if per_kv_kernel else (lambda h: tensor[h // group])
    if not per_kv_kernel:
        return lambda h: tensor[h]
    assert tensor.ndim == 3, "a split (slab) tensor is laid out per K/V head"
    stacked = tensor.reshape(tensor.shape[0] // group, group * tensor.shape[1], tensor.shape[2])
    return lambda h: stacked[h]


def _ops(body):
    """Every op of a kernel body, loops flattened."""
    for item in body:
        if isinstance(item, sch.Loop):
            yield from _ops(item.body)
        else:
            yield item


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside this module (run_attention's caller, or
    execute's), so the warning points at the user's line."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    return level


def _workload(q, k, v, scale, causal: bool):
    """Checked q, k, v and scale, their AttentionShape, and q's (B, H) for reshaping back."""
    q, k, v = _check_inputs(q, k, v)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not np.isfinite(scale) or scale <= 0):
        raise IosimError(f"scale must be a positive finite number, got {scale!r}")
    b, h = (q.shape[0], q.shape[1]) if q.ndim == 4 else (1, 1)
    n, d = q.shape[-2:]
    shape = AttentionShape(b, h, n, d, dtype=_DTYPES[q.dtype], causal=causal)
    return q, k, v, shape


def run_attention(q, k, v, *, algorithm: str, block_rows=None, block_cols=None,
                  causal: bool = False, scale: float | None = None):
    """Attention computed by running ``algorithm``'s schedule tile by tile.

    q, k, v: arrays of shape (N, d) or (B, H, N, d), float16, float32 or float64 (float64 in,
    float64 out; lower precisions accumulate in float32 as a GPU kernel does). Returns O with the
    input's shape and dtype."""
    q, k, v, shape = _workload(q, k, v, scale, causal)
    schedule = build_schedule(algorithm, shape, block_rows, block_cols)
    flat = [x.reshape(shape.batch_heads, shape.seq_len, shape.head_dim) for x in (q, k, v)]
    out = execute(schedule, *flat, scale=scale).output
    return out.astype(q.dtype).reshape(q.shape)


def run_attention_backward(q, k, v, d_out, *, algorithm: str, block_rows=None, block_cols=None,
                           causal: bool = False, scale: float | None = None):
    """The gradients (dq, dk, dv) of attention with respect to q, k, v, given ``d_out`` (the
    gradient of the output), computed by running ``algorithm``'s forward and backward
    schedules (``pass_="both"``) tile by tile.

    Arrays as for :func:`run_attention` (d_out the shape and dtype of q); returns three arrays
    with the input's shape and dtype."""
    q, k, v, shape = _workload(q, k, v, scale, causal)
    d_out = np.asarray(d_out)
    if d_out.shape != q.shape or d_out.dtype != q.dtype:
        raise IosimError(f"d_out must have the shape and dtype of q {q.shape} {q.dtype}, got "
                         f"{d_out.shape} {d_out.dtype}")
    if not np.all(np.isfinite(d_out)):
        raise IosimError("d_out contains NaN or infinite values; inputs must be finite")
    schedule = build_schedule(algorithm, shape, block_rows, block_cols, pass_="both")
    flat = [x.reshape(shape.batch_heads, shape.seq_len, shape.head_dim)
            for x in (q, k, v, d_out)]
    tensors = execute(schedule, *flat, scale=scale).tensors
    return tuple(tensors[name].astype(q.dtype).reshape(q.shape) for name in ("dQ", "dK", "dV"))
