"""The op catalogue: engine counts against independent hand calculations."""
import pytest

from iosim import IosimError
from iosim import catalogue as cat

ROWS, COLS = 2048, 1024  # 2 M fp16 elements = 4 MiB per tensor
N_ELEMS = ROWS * COLS
FP16 = 2


@pytest.mark.parametrize("model", ["two-level", "l2"])
def test_relu_reads_and_writes_each_element_once(model):
    r = cat.count(cat.relu(ROWS, COLS), "h100-measured", model)
    assert r.hbm_read_bytes == N_ELEMS * FP16
    # under the l2 model, output still dirty in L2 at the end is counted apart (as ncu does)
    assert r.hbm_write_bytes + r.l2_dirty_end_bytes == N_ELEMS * FP16
    if model == "two-level":
        assert r.l2_dirty_end_bytes == 0
    assert r.flops_tensor == 0 and r.flops_scalar == N_ELEMS
    assert r.arithmetic_intensity == pytest.approx(N_ELEMS / r.hbm_bytes)
    assert r.bound == "memory"
    if model == "two-level":
        assert r.arithmetic_intensity == pytest.approx(N_ELEMS / (2 * N_ELEMS * FP16))
        assert r.limiter == "hbm"


def test_dropout_writes_output_and_one_byte_mask():
    r = cat.count(cat.dropout(ROWS, COLS), "h100-measured", "two-level")
    assert r.hbm_read_bytes == N_ELEMS * FP16
    assert r.hbm_write_bytes == N_ELEMS * (FP16 + 1)
    assert r.flops_scalar == 2 * N_ELEMS
    assert r.bound == "memory"


def test_row_sum_and_softmax():
    s = cat.count(cat.row_sum(ROWS, COLS), "a100-40gb", "two-level")
    assert s.hbm_read_bytes == N_ELEMS * FP16
    assert s.hbm_write_bytes == ROWS * 4  # one float32 per row
    assert s.flops_scalar == N_ELEMS
    sm = cat.count(cat.softmax(ROWS, COLS), "a100-40gb", "l2")
    assert sm.hbm_read_bytes == N_ELEMS * FP16
    assert sm.hbm_write_bytes + sm.l2_dirty_end_bytes == N_ELEMS * FP16
    assert sm.flops_scalar == 5 * N_ELEMS
    assert sm.bound == "memory"


def test_layer_norm_reads_gamma_beta_per_cta_in_the_two_level_model():
    op = cat.layer_norm(ROWS, COLS)
    rows_per_cta = op.schedule.kernels[0].blocks["i"]
    ctas = -(-ROWS // rows_per_cta)
    two = cat.count(op, "h100-measured", "two-level")
    assert two.hbm_read_bytes == N_ELEMS * FP16 + ctas * 2 * COLS * FP16
    assert two.hbm_write_bytes == N_ELEMS * FP16
    assert two.flops_scalar == 7 * N_ELEMS
    l2 = cat.count(op, "h100-measured", "l2")  # gamma and beta come from L2 after the first CTA
    assert l2.hbm_read_bytes == N_ELEMS * FP16 + 2 * COLS * FP16


def test_batch_norm_reads_twice_writes_once():
    positions, channels = 4096, 256
    op = cat.batch_norm(positions, channels)
    n = positions * channels
    r = cat.count(op, "h100-measured", "l2")
    assert [k.name for k in r.kernels] == ["bn_stats", "bn_normalize"]
    # X twice, plus the four per-channel vectors once (L2 serves the other CTAs)
    assert r.hbm_read_bytes == 2 * n * FP16 + channels * (4 + 4 + 2 + 2)
    # Y once, plus the two float32 partial-sum vectors (atomics resolved in L2), counting
    # what is still dirty in L2 when each kernel ends
    assert r.hbm_write_bytes + r.l2_dirty_end_bytes == n * FP16 + 2 * channels * 4
    assert r.flops_scalar == 3 * n + 2 * n
    assert r.bound == "memory"


def test_large_matmul_flops_and_compute_bound_on_h100():
    n = 4096
    r = cat.count(cat.matmul(n), "h100-measured", "l2")
    assert r.flops_tensor == 2 * n ** 3 and r.flops_scalar == 0
    # A and B read at least once, C written once
    assert r.hbm_read_bytes >= 2 * n * n * FP16
    assert r.hbm_write_bytes + r.l2_dirty_end_bytes == n * n * FP16
    assert r.bound == "compute" and r.limiter == "tensor"
    assert r.arithmetic_intensity > 266  # beyond h100-measured's ridge point


def test_matmul_two_level_bytes_are_the_tile_formula():
    n, br, bc, bk = 1024, 256, 128, 64  # explicit tiles, not the default
    r = cat.count(cat.matmul(n, block_rows=br, block_cols=bc, k_block=bk), "a100-40gb",
                  "two-level")
    # each of (n/br)(n/bc) CTAs streams a br x n strip of A and an n x bc strip of B
    ctas = (n // br) * (n // bc)
    assert r.hbm_read_bytes == ctas * (br * n + n * bc) * FP16
    assert r.flops_tensor == 2 * n ** 3


def test_small_d_matmul_is_memory_bound():
    n, d = 2048, 64
    r = cat.count(cat.small_d_matmul(n, d), "h100-measured", "l2")
    assert r.flops_tensor == 2 * n * n * d
    assert r.hbm_write_bytes + r.l2_dirty_end_bytes == n * n * FP16
    assert r.hbm_read_bytes == 2 * n * d * FP16  # A and B fit in L2: read once
    assert r.bound == "memory"


def test_catalogue_lists_every_op_and_quick_sizes_work():
    names = [op.name for op in cat.operators(quick=True)]
    assert names == list(cat.BUILDERS)
    assert {"matmul", "small_d_matmul", "relu", "dropout", "row_sum", "softmax",
            "layer_norm", "batch_norm"} <= set(names)


def test_bad_input():
    with pytest.raises(IosimError):
        cat.count(cat.relu(16, 16), "h100-measured", "three-level")
    with pytest.raises(IosimError):
        cat.count("relu", "h100-measured")
    with pytest.raises(IosimError):
        cat.relu(0, 16)
