"""The two-level engine equals the closed-form counts exactly, kernel by kernel, tensor by tensor
(the forward's and the backward's)."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import iosim
from iosim.closed_form import backward_hbm_traffic, by_tensor, hbm_traffic, visited_q_rows

DIVISORS = [16, 32, 64, 128]
#: The algorithms with a backward schedule (flash3 and other forward-only ones have none).
WITH_BACKWARD = [name for name in iosim.ALGORITHMS
                 if hasattr(iosim.schedules.algorithm_module(name), "build_backward")]


@st.composite
def dividing_shapes(draw):
    block_rows = draw(st.sampled_from(DIVISORS))
    block_cols = draw(st.sampled_from(DIVISORS))
    lcm = max(block_rows, block_cols)  # powers of two: the larger is the lcm
    n = lcm * draw(st.integers(1, 4))
    shape = iosim.AttentionShape(draw(st.integers(1, 2)), draw(st.integers(1, 3)), n,
                                 draw(st.sampled_from([16, 32, 64, 128])),
                                 dtype=draw(st.sampled_from(["fp16", "fp32"])))
    return shape, block_rows, block_cols


@pytest.mark.parametrize("algorithm", list(iosim.ALGORITHMS))
@given(case=dividing_shapes())
def test_two_level_engine_equals_closed_form(algorithm, case):
    shape, block_rows, block_cols = case
    result = iosim.simulate(algorithm, shape, block_rows=block_rows, block_cols=block_cols,
                            model="two-level", sram_bytes=1 << 22)
    expected = hbm_traffic(algorithm, shape, block_rows, block_cols)
    assert [k.name for k in result.kernels] == list(expected)
    for kernel in result.kernels:
        want = expected[kernel.name]
        got_reads = {t: v["read_bytes"] for t, v in kernel.tensors.items() if v["read_bytes"]}
        got_writes = {t: v["write_bytes"] for t, v in kernel.tensors.items() if v["write_bytes"]}
        assert got_reads == want["reads"]
        assert got_writes == want["writes"]
        assert kernel.hbm_read_bytes == sum(want["reads"].values())
        assert kernel.hbm_write_bytes == sum(want["writes"].values())


def test_standard_shows_the_seeds_eight_accesses():
    """Read Q, K, write S; read S, write P; read P, V, write O — kernel by kernel."""
    shape = iosim.AttentionShape(1, 1, 512, 64)
    result = iosim.simulate("standard", shape, model="two-level")
    moves = [(k.name, verb, t) for k in result.kernels for t, v in k.tensors.items()
             for verb in ("read", "write") if v[f"{verb}_bytes"]]
    assert sorted(moves) == sorted([
        ("qk_gemm", "read", "Q"), ("qk_gemm", "read", "K"), ("qk_gemm", "write", "S"),
        ("softmax", "read", "S"), ("softmax", "write", "P"),
        ("pv_gemm", "read", "P"), ("pv_gemm", "read", "V"), ("pv_gemm", "write", "O")])
    n, e = 512, 2
    by_kernel = {k.name: k for k in result.kernels}
    # S and P are N x N and cross HBM exactly once each way
    assert by_kernel["qk_gemm"].tensors["S"]["write_bytes"] == n * n * e
    assert by_kernel["softmax"].tensors["S"]["read_bytes"] == n * n * e
    assert by_kernel["softmax"].tensors["P"]["write_bytes"] == n * n * e
    assert by_kernel["pv_gemm"].tensors["P"]["read_bytes"] == n * n * e


def test_flash1_traffic_falls_as_theorem_2_says():
    """Θ(N²d²/M): quadrupling M (and so Bc) cuts flash1's Q/O traffic about fourfold."""
    shape = iosim.AttentionShape(1, 1, 4096, 64)
    small = iosim.simulate("flash1", shape, model="two-level", sram_bytes=128 * 1024)
    large = iosim.simulate("flash1", shape, model="two-level", sram_bytes=512 * 1024)
    q_small = small.kernels[1].tensors["Q"]["read_bytes"]
    q_large = large.kernels[1].tensors["Q"]["read_bytes"]
    assert 3.5 < q_small / q_large < 4.5


def test_flash_moves_far_fewer_bytes_than_standard():
    shape = iosim.AttentionShape(4, 4, 2048, 64)
    standard = iosim.simulate("standard", shape, model="two-level").totals.hbm_bytes
    flash2 = iosim.simulate("flash2", shape, model="two-level").totals.hbm_bytes
    n, d, bh, e = 2048, 64, 16, 2
    assert standard > 4 * n * n * e * bh  # S and P each written and read once
    assert flash2 < standard / 5


def test_closed_form_refuses_what_it_does_not_cover():
    with pytest.raises(iosim.IosimError, match="divide N"):
        hbm_traffic("flash2", iosim.AttentionShape(1, 1, 100, 16), 64, 64)
    with pytest.raises(iosim.IosimError, match="no closed form"):
        hbm_traffic("nope", iosim.AttentionShape(1, 1, 128, 16), 64, 64)


# ---- the backward pass: any N (a multiple of the blocks or not), causal or not ---------------

def _engine_forms(result):
    return {k.name: {"reads": {t: v["read_bytes"] for t, v in k.tensors.items() if v["read_bytes"]},
                     "writes": {t: v["write_bytes"] for t, v in k.tensors.items()
                                if v["write_bytes"]}}
            for k in result.kernels}


@st.composite
def backward_shapes(draw):
    n = draw(st.integers(1, 160))
    block = st.one_of(st.sampled_from([8, 16, 32, 64]), st.integers(1, 48))
    shape = iosim.AttentionShape(draw(st.integers(1, 2)), draw(st.integers(1, 3)), n,
                                 draw(st.sampled_from([4, 8, 16, 64])),
                                 dtype=draw(st.sampled_from(["fp16", "fp32"])),
                                 causal=draw(st.booleans()))
    return shape, draw(block), draw(block)


@pytest.mark.parametrize("algorithm", WITH_BACKWARD)
@given(case=backward_shapes())
def test_two_level_backward_equals_closed_form(algorithm, case):
    shape, block_rows, block_cols = case
    result = iosim.simulate(algorithm, shape, block_rows=block_rows, block_cols=block_cols,
                            model="two-level", sram_bytes=1 << 22, pass_="backward")
    expected = backward_hbm_traffic(algorithm, shape, block_rows, block_cols)
    assert _engine_forms(result) == expected  # kernel by kernel (in order), tensor by tensor
    assert [k.name for k in result.kernels] == list(expected)
    for kernel in result.kernels:
        assert kernel.hbm_read_bytes == sum(expected[kernel.name]["reads"].values())
        assert kernel.hbm_write_bytes == sum(expected[kernel.name]["writes"].values())


# the shapes the hand counts of tests/test_backward.py used, each algorithm, causal and not
GRID = [(64, 16, 16, 32), (50, 8, 16, 7), (33, 5, 8, 33), (17, 4, 1, 3), (100, 16, 32, 16),
        (96, 8, 24, 40), (128, 32, 64, 64)]


@pytest.mark.parametrize("algorithm", WITH_BACKWARD)
@pytest.mark.parametrize("n, d, br, bc", GRID)
@pytest.mark.parametrize("causal", [False, True])
def test_backward_closed_form_grid(algorithm, n, d, br, bc, causal):
    shape = iosim.AttentionShape(1, 3, n, d, dtype="fp16", causal=causal)
    result = iosim.simulate(algorithm, shape, block_rows=br, block_cols=bc, model="two-level",
                            sram_bytes=1 << 22, pass_="backward")
    forms = backward_hbm_traffic(algorithm, shape, br, bc)
    assert _engine_forms(result) == forms
    reads, writes = by_tensor(forms)
    assert {t: v["read_bytes"] for t, v in result.totals.tensors.items() if v["read_bytes"]} \
        == reads
    assert result.totals.hbm_read_bytes == sum(reads.values())
    assert result.totals.hbm_write_bytes == sum(writes.values())


def _visited_tiles(n, br, bc, causal):
    """(rows, cols) of every (Q block, K/V block) tile a causal-skipping loop visits: the loop
    itself, written out."""
    return [(min(br, n - i * br), min(bc, n - j * bc))
            for j in range(math.ceil(n / bc)) for i in range(math.ceil(n / br))
            if not (causal and j * bc > (i + 1) * br - 1)]


@given(n=st.integers(1, 300), br=st.integers(1, 70), bc=st.integers(1, 70), causal=st.booleans())
def test_visited_q_rows_counts_the_loop(n, br, bc, causal):
    br, bc = min(br, n), min(bc, n)
    assert visited_q_rows(n, br, bc, causal) == sum(r for r, _ in _visited_tiles(n, br, bc,
                                                                                  causal))
    if not causal:
        assert visited_q_rows(n, br, bc, causal) == math.ceil(n / bc) * n
    elif bc % br == 0:
        t_c = math.ceil(n / bc)
        assert visited_q_rows(n, br, bc, causal) == t_c * n - bc * t_c * (t_c - 1) // 2


def test_backward_formulas_in_numbers():
    """The per-head totals written out: standard's seven N x N passes, flash2's and flash1's
    Tc passes over the Q side."""
    n, d, e, br, bc = 1024, 64, 2, 128, 128
    shape = iosim.AttentionShape(1, 1, n, d)
    t = n // bc
    nd, nn = n * d * e, n * n * e
    standard = by_tensor(backward_hbm_traffic("standard", shape, br, bc))
    assert sum(standard[0].values()) + sum(standard[1].values()) == \
        7 * nn + (2 * t + t + t + t) * nd + 3 * nd  # dO twice, V, K, Q
    flash2 = by_tensor(backward_hbm_traffic("flash2", shape, br, bc))
    assert sum(flash2[0].values()) + sum(flash2[1].values()) == \
        2 * nd + 4 * n + 4 * n * d + 4 * nd + t * n * (2 * d * e + 8 + 8 * d) + 4 * n * d + nd
    flash1 = by_tensor(backward_hbm_traffic("flash1", shape, br, bc))
    assert sum(flash1[0].values()) + sum(flash1[1].values()) == \
        4 * n * d + 4 * nd + t * n * (2 * d * e + 12 * d + 8)


def test_flash1_backward_falls_as_one_over_m_theorem_5():
    """Theorem 5: Algorithm 4 makes Θ(N²d²/M) HBM accesses. With the paper's Bc = M/(4d)
    (flash1's default), the engine's backward bytes fall as 1/M — a log-log slope of -1 within
    5% — until Bc reaches N (one K/V block): from there on they stay at the floor, the O(Nd)
    of reading the inputs once and writing the gradients once."""
    n, d = 8192, 16
    shape = iosim.AttentionShape(1, 1, n, d)
    sizes = [8 << 10, 16 << 10, 32 << 10, 64 << 10]  # Bc = 64 ... 512: Tc = 128 ... 16
    hbm = []
    for m in sizes:
        result = iosim.simulate("flash1", shape, model="two-level", sram_bytes=m,
                                pass_="backward")
        assert result.block_cols == m // (4 * d * shape.elem_bytes)
        forms = backward_hbm_traffic("flash1", shape, result.block_rows, result.block_cols)
        assert _engine_forms(result) == forms
        hbm.append(result.totals.hbm_bytes)
    slope = np.polyfit(np.log(sizes), np.log(hbm), 1)[0]
    assert abs(slope + 1) < 0.05, slope
    assert all(a > b for a, b in zip(hbm, hbm[1:]))
    # the floor: Bc = N from M = 4·d·e·N on; more SRAM moves no fewer bytes
    floor = [iosim.simulate("flash1", shape, model="two-level", sram_bytes=m,
                            pass_="backward").totals.hbm_bytes
             for m in (4 * d * 2 * n, 8 * d * 2 * n)]
    e = shape.elem_bytes
    assert floor[0] == floor[1] == 4 * n * d + 4 * n * d * e + n * (2 * d * e + 12 * d + 8)
    assert floor[0] < hbm[-1]


def test_backward_closed_form_refuses_unknown_algorithm():
    with pytest.raises(iosim.IosimError, match="no closed form"):
        backward_hbm_traffic("nope", iosim.AttentionShape(1, 1, 128, 16), 64, 64)
