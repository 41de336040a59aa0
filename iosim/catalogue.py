"""The seed's other operators, counted by the same engine as attention.

The seed contrasts compute-bound operators (a large matrix product) with memory-bound ones
(elementwise ReLU and dropout; reductions such as a row sum, softmax, LayerNorm, BatchNorm).
Each is written here as a :class:`~iosim.schedule.Schedule` of tile programs — loads, stores and
ops on on-chip tiles — and goes through the very path attention does:
:func:`iosim.trace.build_trace` → :func:`iosim.simulate.replay` (the Numba engine, two-level or
L2 model) → :func:`iosim.cost.kernel_cost`. Bytes and FLOPs are what the engine counts, never a
formula; the formulas live in the tests, as the independent check. HBM bytes follow the
engine's accounting: under the l2 model, output still dirty in L2 when a kernel ends is not that
kernel's HBM writes (as Nsight Compute measures a kernel) but is reported as
``l2_dirty_end_bytes``; an op whose output fits in L2 shows few HBM writes there.

The schedule IR is attention-shaped: every global tensor is (batch·head, rows, cols) with rows
and cols among ``"N"`` (``AttentionShape.seq_len``), ``"d"`` (``head_dim``) and ``"1"``, and block
variables range over N. So an operator's workload is an :class:`~iosim.shape.AttentionShape`
with batch = heads = 1, N = its row count, d = its column count:

* matmul M x K by K x N with M = N = K: tensors A, B, C of N x N, output tile Br x Bc, a loop over
  K in blocks of Bk (both operands row-major).
* small-d matmul: (N x d) by (d x N), the QKᵀ of attention; B is given as its (N x d) transpose
  (the bytes moved are the same).
* elementwise and row-wise ops: an (N x d) activation, one CTA per ``rows`` rows.
* BatchNorm (training mode, channels-last): an (N positions x d channels) activation; a stats
  kernel whose CTAs reduce their rows and add partial per-channel sums into one (1 x d) vector
  (an atomicAdd, resolved in L2 under the l2 model), then a normalising kernel.

FLOP conventions (CUDA-core FLOPs per element unless said): ReLU 1 (a max); dropout 2 (compare
with a random number, scale by 1/(1-p); random-number generation not counted) and it also writes
a one-byte keep-mask for the backward pass, as PyTorch does; row sum 1 (an add); softmax 5 (max,
subtract, exp, sum, divide — :class:`iosim.schedule.Softmax`); LayerNorm 7 (sum and sum of
squares 3, normalise 2, affine 2); BatchNorm stats 3, normalise 2 (one FMA with a per-channel
scale and shift). Matmuls: 2·m·n·k tensor-core FLOPs, accumulation included.

New op types (frozen dataclasses with ``reads``, ``writes`` and ``flops(dims, buffers)``, the
interface the trace builder calls): :class:`Pointwise` and :class:`Reduce`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from .errors import IosimError
from .hardware import load_hardware
from .schedule import (BufferSpec, Fill, Kernel, Load, Loop, MatMul, Schedule, Softmax, Store,
                       TensorSpec)
from .shape import AttentionShape, check_positive_int
from .simulate import KernelResult, check_model, simulate_trace
from .trace import build_trace

F32 = 4
#: Bytes of one row-wise CTA's input tile: elementwise kernels stream ~32 KiB per CTA.
ROW_TILE_BYTES = 32 * 1024
#: Large-GEMM tiles: 256 x 256 output tiles with K streamed in blocks of 64. Hopper GEMMs
#: (cuBLAS, CUTLASS) run 2-CTA clusters of 128 x 256 or 256 x 128 tiles whose A/B strips are
#: multicast by TMA: the cluster fetches them from L2 once, as one 256 x 256 tile would; the
#: schedule has no clusters, so it models the cluster as one CTA. With single-CTA 128 x 128 or
#: 256 x 128 tiles the l2 model finds an 8192^3 GEMM L2-bandwidth-bound on h100-measured.
GEMM_TILE_ROWS, GEMM_TILE_COLS, GEMM_K_BLOCK = 256, 256, 64
#: Output tile of the small-d (attention-score) GEMM, as the attention schedules use.
GEMM_TILE = 128


def _size(buf: BufferSpec, dims) -> int:
    return dims[buf.rows] * dims[buf.cols]


# ---- op types the attention schedules do not need --------------------------------------------


@dataclass(frozen=True)
class Pointwise:
    """out = f(inputs) element by element: ``flops_per_element`` CUDA-core FLOPs per output
    element. Inputs may be row or column vectors broadcast over the tile (LayerNorm's gamma)."""

    out: str
    inputs: tuple
    flops_per_element: int
    what: str = ""

    @property
    def reads(self):
        return tuple(self.inputs)

    @property
    def writes(self):
        return (self.out,)

    def flops(self, dims, buffers):
        return 0, self.flops_per_element * _size(buffers[self.out], dims)


@dataclass(frozen=True)
class Reduce:
    """out = a reduction of ``src`` (over its rows or columns, by ``out``'s shape):
    ``flops_per_element`` CUDA-core FLOPs per element of ``src``."""

    out: str
    src: str
    flops_per_element: int
    what: str = ""

    @property
    def reads(self):
        return (self.src,)

    @property
    def writes(self):
        return (self.out,)

    def flops(self, dims, buffers):
        return 0, self.flops_per_element * _size(buffers[self.src], dims)


# ---- the operators -------------------------------------------------------------------------


@dataclass(frozen=True)
class Operator:
    """One catalogue entry: a name, what it is, its schedule and the workload in words."""

    name: str
    kind: str  # "matmul", "elementwise" or "reduction"
    description: str
    schedule: Schedule
    workload: str


def _workload(rows: int, cols: int, dtype: str) -> AttentionShape:
    rows = check_positive_int("rows", rows)
    cols = check_positive_int("cols", cols)
    return AttentionShape(batch=1, heads=1, seq_len=rows, head_dim=cols, dtype=dtype)


def _rows_per_cta(shape: AttentionShape) -> int:
    row_bytes = shape.head_dim * shape.elem_bytes
    return max(1, min(shape.seq_len, ROW_TILE_BYTES // row_bytes))


def matmul(n: int = 8192, dtype: str = "fp16", block_rows: int = GEMM_TILE_ROWS,
           block_cols: int = GEMM_TILE_COLS, k_block: int = GEMM_K_BLOCK) -> Operator:
    """C = A @ B with A, B, C all n x n: one CTA per block_rows x block_cols tile of C."""
    shape = _workload(n, n, dtype)
    e = shape.elem_bytes
    body = (Fill("C", 0.0),
            Loop("k", (Load("Ak", "A", "i", "k"), Load("Bk", "B", "k", "j"),
                       MatMul("C", "Ak", "Bk", accumulate=True))),
            Store("C", "C", "i", "j"))
    kernel = Kernel("gemm", grid=("i", "j"), body=body,
                    buffers=(BufferSpec("Ak", "i", "k", e), BufferSpec("Bk", "k", "j", e),
                             BufferSpec("C", "i", "j", F32, "reg")),
                    blocks={"i": block_rows, "j": block_cols, "k": k_block}, row_var="i",
                    col_var="j")
    tensors = (TensorSpec("A", "N", "N", e, "input"), TensorSpec("B", "N", "N", e, "input"),
               TensorSpec("C", "N", "N", e, "output"))
    schedule = Schedule("matmul", shape, tensors, (kernel,), block_rows, block_cols,
                        notes=f"{block_rows}x{block_cols} output tiles, K in blocks of {k_block}")
    return Operator("matmul", "matmul", f"large matmul {n}x{n} @ {n}x{n}",
                    schedule, f"m=n=k={n} {dtype}")


def small_d_matmul(n: int = 8192, d: int = 64, dtype: str = "fp16",
                   block: int = GEMM_TILE) -> Operator:
    """S = A Bᵀ with A, B of n x d (the QKᵀ of attention): a CTA per block x block tile of S."""
    shape = _workload(n, d, dtype)
    e = shape.elem_bytes
    body = (Load("Ai", "A", "i", "d"), Load("Bj", "B", "j", "d"),
            MatMul("S", "Ai", "Bj", transpose_b=True), Store("S", "S", "i", "j"))
    kernel = Kernel("gemm_small_d", grid=("i", "j"), body=body,
                    buffers=(BufferSpec("Ai", "i", "d", e), BufferSpec("Bj", "j", "d", e),
                             BufferSpec("S", "i", "j", F32, "reg")),
                    blocks={"i": block, "j": block}, row_var="i", col_var="j")
    tensors = (TensorSpec("A", "N", "d", e, "input"), TensorSpec("B", "N", "d", e, "input"),
               TensorSpec("S", "N", "N", e, "output"))
    schedule = Schedule("small_d_matmul", shape, tensors, (kernel,), block, block,
                        notes="NT GEMM: B given as its n x d transpose")
    return Operator("small_d_matmul", "matmul", f"small-d matmul ({n}x{d}) @ ({d}x{n})",
                    schedule, f"n={n} d={d} {dtype}")


def _rowwise(name: str, kind: str, description: str, shape: AttentionShape, ops: tuple,
             extra_buffers: tuple = (), extra_tensors: tuple = (), loads: tuple = (),
             stores: tuple = (("Y", "Y", "d"),), rows: int | None = None) -> Operator:
    """A one-kernel operator: each CTA loads ``rows`` whole rows of X (plus ``loads``), runs
    ``ops`` and stores ``stores`` ((buffer, tensor, cols) triples)."""
    e = shape.elem_bytes
    rows = rows or _rows_per_cta(shape)
    body = ((Load("X", "X", "i", "d"),) + tuple(Load(b, t, r, c) for b, t, r, c in loads)
            + tuple(ops) + tuple(Store(b, t, "i", c) for b, t, c in stores))
    kernel = Kernel(name, grid=("i",), body=body,
                    buffers=(BufferSpec("X", "i", "d", e),) + tuple(extra_buffers),
                    blocks={"i": rows}, row_var="i")
    tensors = (TensorSpec("X", "N", "d", e, "input"),) + tuple(extra_tensors)
    schedule = Schedule(name, shape, tensors, (kernel,), rows, shape.head_dim,
                        notes=f"{rows} rows per CTA")
    return Operator(name, kind, description, schedule,
                    f"{shape.seq_len}x{shape.head_dim} {shape.dtype}")


def relu(rows: int = 65536, cols: int = 1024, dtype: str = "fp16") -> Operator:
    shape = _workload(rows, cols, dtype)
    e = shape.elem_bytes
    return _rowwise("relu", "elementwise", "elementwise ReLU", shape,
                    (Pointwise("Y", ("X",), 1, "max(x, 0)"),),
                    extra_buffers=(BufferSpec("Y", "i", "d", e, "reg"),),
                    extra_tensors=(TensorSpec("Y", "N", "d", e, "output"),))


def dropout(rows: int = 65536, cols: int = 1024, dtype: str = "fp16") -> Operator:
    shape = _workload(rows, cols, dtype)
    e = shape.elem_bytes
    return _rowwise("dropout", "elementwise", "dropout (writes a 1-byte keep-mask)", shape,
                    (Pointwise("Y", ("X",), 2, "keep ? x / (1-p) : 0"),
                     Pointwise("M", ("X",), 0, "keep-mask")),
                    extra_buffers=(BufferSpec("Y", "i", "d", e, "reg"),
                                   BufferSpec("M", "i", "d", 1, "reg")),
                    extra_tensors=(TensorSpec("Y", "N", "d", e, "output"),
                                   TensorSpec("mask", "N", "d", 1, "output")),
                    stores=(("Y", "Y", "d"), ("M", "mask", "d")))


def row_sum(rows: int = 65536, cols: int = 1024, dtype: str = "fp16") -> Operator:
    shape = _workload(rows, cols, dtype)
    return _rowwise("row_sum", "reduction", "row sum (float32 result)", shape,
                    (Reduce("s", "X", 1, "sum over the row"),),
                    extra_buffers=(BufferSpec("s", "i", "1", F32, "reg"),),
                    extra_tensors=(TensorSpec("s", "N", "1", F32, "output", float32=True),),
                    stores=(("s", "s", "1"),))


def softmax(rows: int = 65536, cols: int = 1024, dtype: str = "fp16") -> Operator:
    shape = _workload(rows, cols, dtype)
    e = shape.elem_bytes
    return _rowwise("softmax", "reduction", "row softmax (whole rows in SRAM)", shape,
                    (Softmax("X", "X"),),
                    extra_tensors=(TensorSpec("Y", "N", "d", e, "output"),),
                    stores=(("X", "Y", "d"),))


def layer_norm(rows: int = 65536, cols: int = 1024, dtype: str = "fp16") -> Operator:
    shape = _workload(rows, cols, dtype)
    e = shape.elem_bytes
    return _rowwise("layer_norm", "reduction", "LayerNorm over each row, with affine", shape,
                    (Pointwise("Y", ("X", "gamma", "beta"), 7, "(x-mean)*rstd*gamma+beta"),),
                    extra_buffers=(BufferSpec("gamma", "1", "d", e),
                                   BufferSpec("beta", "1", "d", e),
                                   BufferSpec("Y", "i", "d", e, "reg")),
                    extra_tensors=(TensorSpec("gamma", "1", "d", e, "input"),
                                   TensorSpec("beta", "1", "d", e, "input"),
                                   TensorSpec("Y", "N", "d", e, "output")),
                    loads=(("gamma", "gamma", "1", "d"), ("beta", "beta", "1", "d")))


def batch_norm(positions: int = 64 * 56 * 56, channels: int = 256,
               dtype: str = "fp16") -> Operator:
    """Training-mode BatchNorm over an (N·H·W positions x C channels) channels-last activation:
    a statistics kernel (partial per-channel sums added into a shared float32 vector) and a
    normalising kernel. X is read twice, Y written once."""
    shape = _workload(positions, channels, dtype)
    e = shape.elem_bytes
    rows = _rows_per_cta(shape)
    stats = Kernel(
        "bn_stats", grid=("i",),
        body=(Load("X", "X", "i", "d"), Reduce("sum", "X", 1, "sum"),
              Reduce("sumsq", "X", 2, "sum of squares"),
              Store("sum", "sum", "1", "d"), Store("sumsq", "sumsq", "1", "d")),
        buffers=(BufferSpec("X", "i", "d", e), BufferSpec("sum", "1", "d", F32, "reg"),
                 BufferSpec("sumsq", "1", "d", F32, "reg")),
        blocks={"i": rows}, row_var="i")
    vectors = ("sum", "sumsq", "gamma", "beta")
    normalise = Kernel(
        "bn_normalize", grid=("i",),
        body=tuple(Load(v, v, "1", "d") for v in vectors) + (
            Load("X", "X", "i", "d"),
            Pointwise("Y", ("X",) + vectors, 2, "x*scale[c] + shift[c]"),
            Store("Y", "Y", "i", "d")),
        buffers=(BufferSpec("X", "i", "d", e), BufferSpec("Y", "i", "d", e, "reg"))
        + tuple(BufferSpec(v, "1", "d", F32 if v.startswith("sum") else e) for v in vectors),
        blocks={"i": rows}, row_var="i")
    tensors = (TensorSpec("X", "N", "d", e, "input"),
               TensorSpec("sum", "1", "d", F32, "intermediate", float32=True),
               TensorSpec("sumsq", "1", "d", F32, "intermediate", float32=True),
               TensorSpec("gamma", "1", "d", e, "input"), TensorSpec("beta", "1", "d", e, "input"),
               TensorSpec("Y", "N", "d", e, "output"))
    schedule = Schedule("batch_norm", shape, tensors, (stats, normalise), rows, channels,
                        notes="two passes over X: statistics, then normalise")
    return Operator("batch_norm", "reduction", "BatchNorm, training mode (stats + normalise)",
                    schedule, f"{positions} positions x {channels} channels {dtype}")


#: Builders of every catalogue operator, in display order.
BUILDERS = {"matmul": matmul, "small_d_matmul": small_d_matmul, "relu": relu,
            "dropout": dropout, "row_sum": row_sum, "softmax": softmax,
            "layer_norm": layer_norm, "batch_norm": batch_norm}

#: Reduced sizes for quick runs (tests, smoke runs): same structure, about 1/16 of the bytes.
QUICK_SIZES = {"matmul": {"n": 2048}, "small_d_matmul": {"n": 2048},
               "relu": {"rows": 4096}, "dropout": {"rows": 4096}, "row_sum": {"rows": 4096},
               "softmax": {"rows": 4096}, "layer_norm": {"rows": 4096},
               "batch_norm": {"positions": 16 * 56 * 56 // 4}}


def operators(quick: bool = False) -> list[Operator]:
    """Every catalogue operator at its default size (``quick``: reduced sizes)."""
    return [build(**(QUICK_SIZES[name] if quick else {})) for name, build in BUILDERS.items()]


# ---- counting --------------------------------------------------------------------------------


@dataclass
class OperatorResult(KernelResult):
    """An operator's engine counts summed over its kernels (their totals), with roofline terms;
    ``kernels`` holds the per-kernel results."""

    kind: str = ""
    description: str = ""
    workload: str = ""
    hardware: str = ""
    model: str = ""
    kernels: list = field(default_factory=list)

    @property
    def achieved_flops_per_s(self) -> float:
        return self.flops / self.predicted_time_s if self.predicted_time_s else 0.0

    def summary(self) -> dict:
        """A flat dict for tables and CSV."""
        return {"op": self.name, "kind": self.kind, "workload": self.workload,
                "hardware": self.hardware, "model": self.model,
                "hbm_read_bytes": self.hbm_read_bytes, "hbm_write_bytes": self.hbm_write_bytes,
                "l2_dirty_end_bytes": self.l2_dirty_end_bytes,
                "flops_tensor": self.flops_tensor, "flops_scalar": self.flops_scalar,
                "arithmetic_intensity": self.arithmetic_intensity, "bound": self.bound,
                "limiter": self.limiter, "predicted_time_s": self.predicted_time_s}


def count(operator: Operator, hardware="h100-measured", model: str = "l2") -> OperatorResult:
    """Run ``operator``'s schedule through the trace builder, replay engine and cost model
    (the same path as :func:`iosim.simulate`, by way of :func:`iosim.simulate.simulate_trace`)."""
    if not isinstance(operator, Operator):
        raise IosimError(f"expected a catalogue Operator, got {type(operator).__name__}")
    check_model(model)
    hw = load_hardware(hardware)
    schedule = operator.schedule
    schedule.check_fits(hw.sram_bytes_per_block)
    result = simulate_trace(build_trace(schedule), hw, model)
    totals = {f.name: getattr(result.totals, f.name) for f in fields(KernelResult)}
    totals["name"] = operator.name
    return OperatorResult(**totals, kind=operator.kind, description=operator.description,
                          workload=operator.workload, hardware=hw.name, model=model,
                          kernels=result.kernels)


def run_catalogue(hardware="h100-measured", model: str = "l2",
                  quick: bool = False) -> list[OperatorResult]:
    """Count every catalogue operator on ``hardware``."""
    return [count(op, hardware, model) for op in operators(quick)]
