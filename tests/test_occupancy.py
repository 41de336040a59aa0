"""The occupancy calculator against hand-worked CUDA occupancy cases."""
import dataclasses

import pytest

import iosim
from iosim.occupancy import MAX_THREADS_PER_CTA, REGISTER_OVERHEAD, estimate_registers, occupancy
from iosim.schedule import BufferSpec, Kernel

H100 = iosim.load_hardware("h100-measured")


def _kernel(warps=4, registers=None, smem_rows=0, reg_rows=0, cols=128):
    buffers = []
    if smem_rows:
        buffers.append(BufferSpec("A", "i", "d", 2))
    if reg_rows:
        buffers.append(BufferSpec("R", "j", "d", 4, "reg"))
    return Kernel("k", grid=("i",), body=(), buffers=tuple(buffers),
                  blocks={"i": max(smem_rows, 1), "j": max(reg_rows, 1)}, warps=warps,
                  registers_per_thread=registers)


def test_shared_memory_limits_resident_ctas():
    # 64 rows x 128 cols x 2 B = 16 KiB, + 1 KiB reserved: 233472 // 17408 = 13 CTAs
    occ = occupancy(_kernel(warps=1, registers=32, smem_rows=64), 128, 1024, H100)
    assert occ.smem_bytes_per_cta == 64 * 128 * 2
    assert occ.limits["smem"] == 233472 // (16384 + 1024) == 13
    assert occ.ctas_per_sm == 13 and occ.limiter == "smem" and occ.warps_per_sm == 13


def test_registers_limit_resident_ctas_in_allocation_units():
    # 255 registers -> 8160 per warp -> rounded up to 8192; 4 warps = 32768: two CTAs fit
    occ = occupancy(_kernel(warps=4, registers=255), 128, 1024, H100)
    assert occ.limits["registers"] == 2 and occ.limiter == "registers"
    assert occ.warps_per_sm == 8 and not occ.registers_estimated
    # 128 registers: 4096 per warp, 16384 per CTA: four CTAs
    assert occupancy(_kernel(warps=4, registers=128), 128, 1024, H100).ctas_per_sm == 4


def test_warps_and_the_cta_limit():
    occ = occupancy(_kernel(warps=32, registers=32), 128, 1024, H100)
    assert occ.limits["warps"] == 2 and occ.ctas_per_sm == 2 and occ.limiter == "warps"
    occ = occupancy(_kernel(warps=1, registers=16), 128, 1024, H100)
    assert occ.limiter == "ctas" and occ.ctas_per_sm == H100.max_ctas_per_sm


def test_registers_are_estimated_from_the_register_tiles():
    # 128 rows x 128 cols x 4 B = 64 KiB over 128 threads = 128 registers, + overhead
    kernel = _kernel(warps=4, reg_rows=128)
    assert estimate_registers(kernel, 128, 1024, H100) == 128 + REGISTER_OVERHEAD
    occ = occupancy(kernel, 128, 1024, H100)
    assert occ.registers_estimated and occ.registers_per_thread == 128 + REGISTER_OVERHEAD
    # tiles too large for the register file are capped at what lets one CTA fit (spilling)
    big = _kernel(warps=16, reg_rows=1024)
    assert estimate_registers(big, 128, 4096, H100) == 65536 // 16 // 32 == 128
    assert occupancy(big, 128, 4096, H100).ctas_per_sm == 1


def test_impossible_ctas_are_refused():
    with pytest.raises(iosim.TilingError, match="at most 1024"):
        occupancy(_kernel(warps=MAX_THREADS_PER_CTA // 32 + 1, registers=32), 128, 1024, H100)
    with pytest.raises(iosim.TilingError, match="at most 255"):
        occupancy(_kernel(warps=4, registers=300), 128, 1024, H100)
    with pytest.raises(iosim.TilingError, match="does not fit an SM"):
        occupancy(_kernel(warps=1, registers=32, smem_rows=1024), 128, 1024, H100)


def test_flash2_warps_follow_rows_per_warp():
    shape = iosim.AttentionShape(1, 1, 1024, 128)
    default = iosim.build_schedule("flash2", shape, 128, 64).kernels[0]
    wide = iosim.build_schedule("flash2", shape, 128, 64, rows_per_warp=32).kernels[0]
    assert default.warps == 8 and wide.warps == 4
    with pytest.raises(iosim.IosimError, match="rows_per_warp applies to"):
        iosim.build_schedule("standard", shape, rows_per_warp=32)
    with pytest.raises(ValueError, match="rows_per_warp"):
        iosim.build_schedule("flash2", shape, 128, 64, rows_per_warp=0)


def test_simulate_reports_the_occupancy_of_each_kernel():
    shape = iosim.AttentionShape(1, 2, 512, 128)
    result = iosim.simulate("flash2", shape, block_rows=64, block_cols=128)
    (k,) = result.kernels
    # (64 + 4 x 128) x 128 x 2 B = 144 KiB of K/V/Q tiles: one CTA per SM
    assert k.occupancy["smem_bytes_per_cta"] == 147456
    assert k.occupancy["ctas_per_sm"] == 1 and k.occupancy["limiter"] == "smem"
    assert k.occupancy["warps_per_sm"] == 4
    # the L2 replay keeps the same number of CTAs resident
    assert k.concurrent_ctas == min(k.ctas, H100.sm_count)


def test_a_spec_without_the_sm_section_is_refused(tmp_path):
    from iosim.hardware import PRESET_DIR  # noqa: F401 - the presets exist
    text = (iosim.hardware.resources.files("iosim") / "presets" / "h100-sxm.toml").read_text()
    start = text.index("[sm]")
    end = text.index("[latency]")
    path = tmp_path / "no_sm.toml"
    path.write_text(text[:start] + text[end:])
    with pytest.raises(iosim.SpecError, match=r"missing section \[sm\]"):
        iosim.load_hardware(path)
    zero = tmp_path / "zero.toml"
    zero.write_text(text.replace("smem_reserved_bytes_per_cta = 1024",
                                 "smem_reserved_bytes_per_cta = 0"))
    assert iosim.load_hardware(zero).smem_reserved_bytes_per_cta == 0
    negative = tmp_path / "negative.toml"
    negative.write_text(text.replace("dram_cycles = 640", "dram_cycles = -1"))
    with pytest.raises(iosim.SpecError, match="dram_cycles must be a positive"):
        iosim.load_hardware(negative)


def test_registers_declared_on_a_kernel_win_over_the_estimate():
    shape = iosim.AttentionShape(1, 1, 512, 64)
    kernel = iosim.build_schedule("flash2", shape, 64, 64).kernels[0]
    declared = dataclasses.replace(kernel, registers_per_thread=255)
    occ = occupancy(declared, 64, 512, H100)
    assert occ.registers_per_thread == 255 and not occ.registers_estimated


def test_spills_are_flagged_where_the_register_estimate_was_capped():
    shape = iosim.AttentionShape(1, 2, 1024, 128)
    big = iosim.simulate("flash2", shape, block_rows=256, block_cols=128).kernels[0].occupancy
    assert big["spills"] and big["registers_needed"] > big["registers_per_thread"]
    small = iosim.simulate("flash2", shape, block_rows=64, block_cols=64).kernels[0].occupancy
    assert not small["spills"]


def test_simulate_schedule_checks_the_fit_and_matches_simulate():
    from iosim.simulate import simulate_schedule

    shape = iosim.AttentionShape(1, 2, 512, 64)
    schedule = iosim.build_schedule("flash2", shape, 64, 64)
    direct = iosim.simulate("flash2", shape, block_rows=64, block_cols=64)
    by_hand = simulate_schedule(schedule)
    assert by_hand.totals.hbm_bytes == direct.totals.hbm_bytes
    assert by_hand.totals.predicted_time_s == direct.totals.predicted_time_s
    with pytest.raises(iosim.TilingError, match="bytes are available"):
        simulate_schedule(schedule, hardware=iosim.load_hardware("h100-measured").with_sram(1024))
    with pytest.raises(iosim.IosimError, match="must be an iosim.schedule.Schedule"):
        simulate_schedule("flash2")
