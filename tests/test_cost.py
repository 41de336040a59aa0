"""The cost model against hand calculations from the counts and the hardware spec."""
import math

import pytest

import iosim
from iosim.cost import kernel_cost, sm_utilization


def test_sm_utilization_counts_idle_sms_in_the_last_wave():
    assert sm_utilization(132, 132) == 1.0
    assert sm_utilization(16, 132) == pytest.approx(16 / 132)
    assert sm_utilization(133, 132) == pytest.approx(133 / 264)


def test_flash2_time_is_the_roofline_of_its_own_counts():
    hw = iosim.load_hardware("h100-measured")
    shape = iosim.AttentionShape(4, 8, 2048, 64)
    result = iosim.simulate("flash2", shape, hardware=hw, time_model="roofline")
    k = result.kernels[0]
    n, d, bh = 2048, 64, 32
    # the two matmuls on tensor cores, at the mma.sync rate the flash kernels use
    assert k.flops_tensor == 4 * bh * n * n * d
    assert k.tensor_path == "mma_sync"
    tensor = k.flops_tensor / hw.tensor_rate("fp16", "mma_sync")
    # one exp per score plus one per row and block (the rescale), one log per row at the end
    blocks = math.ceil(n / result.block_cols)
    assert k.special_ops == bh * (n * n + n * blocks + n)
    special = k.special_ops / hw.special_ops_per_s
    scalar = (k.flops_scalar - k.special_ops) / hw.scalar_flops_per_s
    compute = (tensor + scalar + special) / sm_utilization(k.ctas, hw.sm_count)
    memory = max((k.hbm_read_bytes + k.hbm_write_bytes) / hw.hbm_bandwidth_bytes_per_s,
                 (k.l2_read_bytes + k.l2_write_bytes) / hw.l2_bandwidth_bytes_per_s,
                 (k.sram_read_bytes + k.sram_write_bytes) / hw.sram_bandwidth_bytes_per_s)
    assert k.predicted_time_s == pytest.approx(max(compute, memory) + hw.launch_overhead_s)
    assert k.times_s["roofline"] == k.predicted_time_s and k.time_model == "roofline"
    assert k.bound == ("compute" if compute > memory else "memory")
    assert k.arithmetic_intensity == pytest.approx(
        (k.flops_tensor + k.flops_scalar) / (k.hbm_read_bytes + k.hbm_write_bytes))


def test_library_gemms_use_the_library_rate_and_softmax_is_hbm_bound():
    hw = iosim.load_hardware("h100-measured")
    result = iosim.simulate("standard", iosim.AttentionShape(8, 16, 2048, 64), hardware=hw)
    by_name = {k.name: k for k in result.kernels}
    assert by_name["qk_gemm"].tensor_path == "library"
    assert by_name["qk_gemm"].times_s["tensor"] == pytest.approx(
        by_name["qk_gemm"].flops_tensor / hw.tensor_rate("fp16"))
    softmax = by_name["softmax"]
    assert softmax.bound == "memory" and softmax.limiter == "hbm"
    assert softmax.special_ops == 8 * 16 * 2048 * 2048  # one exp per score
    assert result.totals.predicted_time_s == pytest.approx(
        sum(k.predicted_time_s for k in result.kernels))


def test_a_spec_without_an_mma_sync_rate_falls_back_to_the_library_rate():
    hw = iosim.load_hardware("a100-40gb")
    assert hw.tensor_rate("fp16", "mma_sync") == hw.tensor_rate("fp16") == 312e12


def test_a_slower_special_function_unit_slows_only_exp_heavy_kernels(tmp_path):
    from importlib import resources

    text = (resources.files("iosim") / "presets" / "h100-sxm.toml").read_text()
    slow = text.replace("special_ops_per_s = 4.18e12", "special_ops_per_s = 4.18e10")
    assert slow != text
    path = tmp_path / "slow-sfu.toml"
    path.write_text(slow)
    shape = iosim.AttentionShape(2, 8, 1024, 64)
    fast_run = iosim.simulate("flash2", shape, hardware="h100-sxm")
    slow_run = iosim.simulate("flash2", shape, hardware=str(path))
    assert slow_run.totals.predicted_time_s > 10 * fast_run.totals.predicted_time_s
    assert slow_run.kernels[0].limiter == "scalar"
    gemm_fast = iosim.simulate("standard", shape, hardware="h100-sxm").kernels[0]
    gemm_slow = iosim.simulate("standard", shape, hardware=str(path)).kernels[0]
    assert gemm_slow.predicted_time_s == gemm_fast.predicted_time_s  # qk_gemm has no exp
