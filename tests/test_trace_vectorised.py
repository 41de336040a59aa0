"""The vectorised trace builder (iosim.trace_fast) gives exactly the arrays of the op-by-op
reference walker (iosim.trace._head_template_reference): every column of every kernel, the CTA
offsets, and the one-batch·head ``head`` dict the timing model reads."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from iosim import AttentionShape, IosimError, build_schedule
from iosim import schedule as sch
from iosim.trace import (_COLUMNS, _HEAD_COLUMNS, _head_template_reference, build_trace,
                         tensor_layout)

ALGORITHMS = ("standard", "hf", "megatron", "flash1", "flash2")
PASSES = ("forward", "backward", "both")
BLOCKS = (8, 16, 32, 48, 64, 128)


def _tiled_the_old_way(schedule, kernel_trace):
    """Every batch·head's columns from the reference walker's template, tiled as build_trace
    tiled them before it was vectorised (np.tile, then a per-event head offset)."""
    base, head_stride = tensor_layout(schedule)
    names = tuple(t.name for t in schedule.tensors)
    ids = {name: i for i, name in enumerate(names)}
    stride_by_id = np.array([head_stride[name] for name in names] + [0], dtype=np.int64)
    template, _ = _head_template_reference(kernel_trace.kernel, schedule, base, ids)
    heads = schedule.shape.batch_heads
    columns = {c: np.tile(template[c], heads) for c in _COLUMNS}
    head_of_event = np.repeat(np.arange(heads, dtype=np.int64), len(template["kind"]))
    columns["addr"] += head_of_event * stride_by_id[columns["tensor"]]
    return columns


def _assert_same(schedule):
    fast, ref = build_trace(schedule), build_trace(schedule, reference=True)
    for kf in fast.kernels:
        for column, values in _tiled_the_old_way(schedule, kf).items():
            assert np.array_equal(getattr(kf, column), values), (kf.name, column)
    assert fast.tensor_names == ref.tensor_names
    assert np.array_equal(fast.tensor_base, ref.tensor_base)
    assert len(fast.kernels) == len(ref.kernels)
    for kf, kr in zip(fast.kernels, ref.kernels):
        assert kf.name == kr.name
        assert kf.heads == kr.heads and kf.smem_bytes_per_cta == kr.smem_bytes_per_cta
        for column in _COLUMNS + ("cta_start",):
            a, b = getattr(kf, column), getattr(kr, column)
            assert a.dtype == b.dtype, (kf.name, column)
            assert np.array_equal(a, b), (kf.name, column)
        assert set(kf.head) == set(kr.head) == set(_HEAD_COLUMNS) | {"cta_start"}
        for column in kr.head:
            a, b = kf.head[column], kr.head[column]
            assert a.dtype == b.dtype, (kf.name, "head", column)
            assert np.array_equal(a, b), (kf.name, "head", column)


def _schedule(algorithm, pass_, n, d, causal, batch, heads, br, bc, rows_per_warp=None,
              q_in_registers=False):
    shape = AttentionShape(batch=batch, heads=heads, seq_len=n, head_dim=d, causal=causal)
    try:
        return build_schedule(algorithm, shape, br, bc, sram_bytes=1 << 30,
                              rows_per_warp=rows_per_warp, q_in_registers=q_in_registers,
                              pass_=pass_)
    except IosimError:  # a tiling the algorithm refuses (e.g. one block size only)
        return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(algorithm=st.sampled_from(ALGORITHMS), pass_=st.sampled_from(PASSES),
       n=st.integers(1, 200), d=st.sampled_from([16, 32, 64, 80]), causal=st.booleans(),
       batch=st.integers(1, 3), heads=st.integers(1, 1), br=st.sampled_from(BLOCKS),
       bc=st.sampled_from(BLOCKS))
def test_vectorised_trace_equals_reference(algorithm, pass_, n, d, causal, batch, heads, br,
                                           bc):
    schedule = _schedule(algorithm, pass_, n, d, causal, batch, heads, br, bc)
    if schedule is not None:
        _assert_same(schedule)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(algorithm=st.sampled_from(("flash1", "flash2")), pass_=st.sampled_from(PASSES),
       n=st.integers(1, 160), causal=st.booleans(), heads=st.integers(1, 3),
       br=st.sampled_from(BLOCKS), bc=st.sampled_from(BLOCKS),
       rows_per_warp=st.sampled_from([None, 8, 16, 32]), q_in_registers=st.booleans())
def test_vectorised_trace_warp_options(algorithm, pass_, n, causal, heads, br, bc,
                                       rows_per_warp, q_in_registers):
    q_in_registers = q_in_registers and algorithm == "flash2"
    schedule = _schedule(algorithm, pass_, n, 64, causal, 1, heads, br, bc, rows_per_warp,
                         q_in_registers)
    if schedule is not None:
        _assert_same(schedule)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("n,br,bc", [(100, 32, 16), (10, 64, 64), (128, 64, 32), (97, 16, 48)])
@pytest.mark.parametrize("causal", [False, True])
def test_vectorised_trace_cases(algorithm, pass_, n, br, bc, causal):
    """Fixed cases: N not a multiple of the blocks, N below a block, N a multiple."""
    schedule = _schedule(algorithm, pass_, n, 64, causal, 2, 1, br, bc)
    assert schedule is not None
    _assert_same(schedule)


def _toy(body, grid=("i",), blocks=None, causal=True, n=70):
    """A hand-written kernel: nested loops, loops after loops, stale extents after a loop, an
    accumulating store, back-to-back loads."""
    shape = AttentionShape(batch=2, heads=1, seq_len=n, head_dim=32, causal=causal)
    tensors = (sch.TensorSpec("Q", "N", "d", 2, "input"), sch.TensorSpec("K", "N", "d", 2, "input"),
               sch.TensorSpec("O", "N", "d", 2, "output"),
               sch.TensorSpec("L", "N", "1", 4, "output", float32=True))
    buffers = (sch.BufferSpec("q", "i", "d", 2), sch.BufferSpec("k", "j", "d", 2, stages=2),
               sch.BufferSpec("s", "i", "j", 4), sch.BufferSpec("o", "i", "d", 4, space="reg"),
               sch.BufferSpec("l", "i", "1", 4))
    kernel = sch.Kernel("toy", grid, body, buffers, blocks or {"i": 32, "j": 16}, row_var="i",
                        col_var="j", longest_first=True)
    return sch.Schedule("toy", shape, tensors, (kernel,), 32, 16)


def test_vectorised_trace_nested_and_stale_extents():
    inner = sch.Loop("j", (sch.Load("k", "K", "j", "d"), sch.Load("q", "Q", "i", "d"),
                           sch.MatMul("s", "q", "k", transpose_b=True),
                           sch.Softmax("s", "s")), causal_skip=True)
    body = (sch.Load("q", "Q", "i", "d"), inner,
            sch.Scale("s"),  # extents of j: the last executed iteration's
            sch.Store("o", "O", "i", "d", accumulate=True), sch.Load("l", "L", "i", "1"),
            sch.Loop("j", (sch.Store("l", "L", "i", "1", accumulate=True),)),
            sch.Store("l", "L", "i", "1"))
    for causal in (False, True):
        for n in (70, 64, 5, 33):
            _assert_same(_toy(body, causal=causal, n=n))
    # no grid: one CTA per batch·head, loops nested three deep
    nested = (sch.Loop("i", (sch.Load("q", "Q", "i", "d"),
                             sch.Loop("j", (sch.Load("k", "K", "j", "d"),
                                            sch.MatMul("s", "q", "k", transpose_b=True)),
                                      causal_skip=True),
                             sch.Store("l", "L", "i", "1"))),)
    for causal in (False, True):
        _assert_same(_toy(nested, grid=(), causal=causal, n=50))
