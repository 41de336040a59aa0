"""The two-level engine equals the closed-form counts exactly, kernel by kernel, tensor by tensor."""
import pytest
from hypothesis import given, strategies as st

import iosim
from iosim.closed_form import hbm_traffic

DIVISORS = [16, 32, 64, 128]


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
