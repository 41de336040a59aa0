"""Build a hardware spec from the GPU microbenchmarks (``python -m gpu.calibrate``).

``python -m iosim.calibration experiments/data/h100/calibration.json > iosim/presets/h100-measured.toml``
regenerates the ``h100-measured`` preset: every rate comes from the calibration file (never
from the attention measurements the validation predicts), the capacities from the device
properties recorded in it, and the L2 geometry that no benchmark measures from the datasheet."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import SpecError

# Figures no microbenchmark measures: the datasheet's, said so in the spec.
_LINE_BYTES, _SECTOR_BYTES, _ASSOCIATIVITY, _MAX_CTAS_PER_SM = 128, 32, 16, 32
# compute capability 9.0 (CUDA C Programming Guide): occupancy limits
_SUB_PARTITIONS, _MAX_WARPS, _REGISTERS, _MAX_REGS_PER_THREAD = 4, 64, 65536, 255
_REGISTER_UNIT, _SMEM_RESERVED = 256, 1024
# spec key -> calibration result holding its latency in cycles
_LATENCIES = {"dram_cycles": "dram_latency", "l2_cycles": "l2_latency",
              "smem_cycles": "smem_latency", "mma_cycles": "mma_sync_latency",
              "fp32_cycles": "fp32_latency", "special_cycles": "ex2_latency"}


def _rate(results: dict, key: str, field: str) -> float:
    try:
        value = float(results[key][field])
    except (KeyError, TypeError, ValueError):
        raise SpecError(f"calibration file lacks results.{key}.{field}") from None
    if not value > 0:
        raise SpecError(f"calibration results.{key}.{field} must be positive, got {value}")
    return value


def _barrier_cycles(results: dict) -> float:
    """Cycles of one __syncthreads at 4 warps per CTA (the flash kernels' usual size)."""
    try:
        by_warps = results["barrier"]["cycles_by_warps"]
        value = float(by_warps.get("4", by_warps.get(4)))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise SpecError("calibration file lacks results.barrier.cycles_by_warps['4']") from None
    if not value > 0:
        raise SpecError(f"calibration barrier cycles must be positive, got {value}")
    return value


def _wgmma(results: dict, latency: dict) -> tuple[str, float, str]:
    """The wgmma path's figures: (the [compute] table line, or "" to take the library GEMM
    rate; the [latency] wgmma_cycles; what the latency source says of them). Measured where the
    calibration has ``wgmma_fp16_f32`` (gpu/calibrate.py's wgmma benchmark), else estimated: a
    wgmma reads its operands from shared memory, then runs like a dependent MMA, so its
    completion beyond its pipe time is taken as the shared-memory latency plus the mma.sync
    latency (both measured)."""
    if "wgmma_fp16_f32" in results:
        rate = _rate(results, "wgmma_fp16_f32", "flops_per_s")
        cycles = _rate(results, "wgmma_fp16_f32", "latency_cycles")
        overlap_line = ""
        for key, name in (("wgmma_mufu_overlap", "wgmma_sfu_overlap"),
                          ("wgmma_fma_overlap", "wgmma_fp32_overlap")):
            overlap = results.get(key, {}).get("overlap")
            if overlap is not None:
                overlap_line += f"{name} = {min(1.0, max(0.0, float(overlap))):.3f}\n"
        by_groups = results["wgmma_fp16_f32"].get("flops_per_s_by_warpgroups") or {}
        if by_groups:
            relative = [float(by_groups[str(g)]) / rate for g in sorted(map(int, by_groups))]
            overlap_line += ("wgmma_rate_by_warpgroups = ["
                             + ", ".join(f"{r:.3f}" for r in relative) + "]\n")
        return (f"wgmma_flops_per_s = {{ fp16 = {rate:.4e}, bf16 = {rate:.4e} }}\n"
                + overlap_line, cycles,
                "wgmma m64n128k16 measured (operands in shared memory, zeros: real data may draw more "
                "power and lower the clock)")
    cycles = latency["smem_cycles"] + latency["mma_cycles"]
    return ("", cycles, "wgmma_cycles an estimate, not measured: shared-memory latency + "
                        "mma.sync latency (a wgmma fetches its operands, then runs as a "
                        "dependent MMA); the wgmma rate is the cuBLAS GEMM's (Hopper's cuBLAS "
                        "kernels are wgmma kernels)")


def _reductions(results: dict) -> tuple[str, str]:
    """The [l2] lines of the reduction rates (fp32 bytes added per second into a buffer the L2
    holds: ``red.global.add.v2.f32`` from the SMs' threads, as the flash2 backward adds dQ, and
    TMA bulk reductions), and the note for the source; empty without the measurement."""
    measured = results.get("l2_reduction") or {}
    red = (measured.get("red_v2_f32") or {}).get("bytes_per_s", {}).get("l2_resident")
    tma = (measured.get("tma_reduce_f32") or {}).get("bytes_per_s", {}).get("l2_resident")
    if not red:
        return "", ""
    line = f"reduction_bandwidth_bytes_per_s = {float(red):.4e}\n"
    if tma:
        line += f"tma_reduction_bandwidth_bytes_per_s = {float(tma):.4e}\n"
    return line, ("; reductions measured: red.global.add.v2.f32 and TMA cp.reduce.async.bulk "
                  "adds of fp32 into a buffer of 1/4 of L2")


def preset_from_calibration(doc: dict, name: str = "h100-measured", origin: str = "") -> str:
    """The TOML text of a hardware spec whose figures come from calibration ``doc``."""
    if doc.get("schema") != "iosim-gpu-calibration/1":
        raise SpecError(f"{origin or 'calibration'}: not an iosim-gpu-calibration/1 document")
    r, dev = doc["results"], doc["device"]
    where = f"{origin} ({doc['date']}, {dev['name']}, driver {dev.get('driver')})"
    copy = _rate(r, "d2d_copy", "bytes_per_s")
    l2 = _rate(r, "l2_read", "bytes_per_s")
    smem = _rate(r, "smem_read", "bytes_per_s")
    gemm = _rate(r, "matmul_fp16_cublas_strided_batched_8192", "flops_per_s")
    mma = _rate(r, "mma_sync_fp16_f32", "flops_per_s")
    fma = _rate(r, "fp32_fma", "flops_per_s")
    exp = _rate(r, "exp2_approx", "exp_per_s")
    launch = _rate(r, "launch_overhead", "per_launch_back_to_back_events_s")
    clock = _rate(r, "sm_clock", "hz")
    latency = {key: _rate(r, name, "cycles") for key, name in _LATENCIES.items()}
    barrier = _barrier_cycles(r)
    wgmma_line, wgmma_cycles, wgmma_note = _wgmma(r, latency)
    l2_bytes = int(dev["l2_bytes"])
    l2_bytes -= l2_bytes % (_LINE_BYTES * _ASSOCIATIVITY)
    reduction_line, reduction_note = _reductions(r)
    return f'''# Generated by `python -m iosim.calibration {origin}`: do not edit by hand.
name = "{name}"
description = "{dev['name']} as measured by this project's microbenchmarks (gpu/calibrate.py)"

[hbm]
capacity_bytes = {int(dev['total_memory_bytes'])}
bandwidth_bytes_per_s = {copy:.4e}
source = "measured: device-to-device copy, bytes read + written over time; {where}"
ncu_metric = "dram__bytes_read.sum + dram__bytes_write.sum"

[l2]
capacity_bytes = {l2_bytes}
line_bytes = {_LINE_BYTES}
sector_bytes = {_SECTOR_BYTES}
associativity = {_ASSOCIATIVITY}
bandwidth_bytes_per_s = {l2:.4e}
{reduction_line}source = "capacity from the device properties; bandwidth measured: ld.global.cg reads of a buffer of 1/4 of L2{reduction_note}; line/sector from the Hopper whitepaper; associativity a modelling assumption; {where}"
ncu_metric = "lts__t_bytes.sum"

[sram]
bytes_per_sm = {int(dev['smem_per_sm'])}
bytes_per_block = {int(dev['smem_per_block_optin'])}
bandwidth_bytes_per_s = {smem:.4e}
source = "capacities from the device properties; bandwidth measured: conflict-free ld.shared.v4; {where}"
ncu_metric = "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum"

[compute]
sm_count = {int(dev['sm_count'])}
max_ctas_per_sm = {_MAX_CTAS_PER_SM}
tensor_flops_per_s = {{ fp16 = {gemm:.4e}, bf16 = {gemm:.4e}, fp32 = {gemm / 2:.4e} }}
mma_sync_flops_per_s = {{ fp16 = {mma:.4e}, bf16 = {mma:.4e} }}
{wgmma_line}scalar_flops_per_s = {fma:.4e}
special_ops_per_s = {exp:.4e}
source = "measured: cuBLAS strided-batched fp16 GEMM 8192^3 (bf16 taken equal, TF32 half); mma.sync m16n8k16 with operands in registers; fp32 FMA chains; ex2.approx (MUFU) chains; {where}"
ncu_metric = "sm__inst_executed_pipe_tensor.sum"

[launch]
overhead_s = {launch:.4e}
source = "measured: back-to-back empty-kernel launches through CuPy, CUDA events; {where}"

[sm]
clock_hz = {clock:.4e}
sub_partitions = {_SUB_PARTITIONS}
max_warps = {_MAX_WARPS}
registers = {_REGISTERS}
max_registers_per_thread = {_MAX_REGS_PER_THREAD}
register_allocation_unit = {_REGISTER_UNIT}
smem_reserved_bytes_per_cta = {_SMEM_RESERVED}
source = "clock measured (clock64 against %globaltimer while the benchmarks ran); occupancy limits from the CUDA C Programming Guide (compute capability 9.0); {where}"

[latency]
dram_cycles = {latency['dram_cycles']:.1f}
l2_cycles = {latency['l2_cycles']:.1f}
smem_cycles = {latency['smem_cycles']:.1f}
mma_cycles = {latency['mma_cycles']:.1f}
fp32_cycles = {latency['fp32_cycles']:.1f}
special_cycles = {latency['special_cycles']:.1f}
barrier_cycles = {barrier:.1f}
wgmma_cycles = {wgmma_cycles:.1f}
source = "measured: pointer chases (DRAM over a buffer far above L2, L2 over one inside it, shared memory), dependent chains of mma.sync m16n8k16, FMA and ex2.approx in one warp, __syncthreads of a 4-warp CTA; {wgmma_note}; {where}"
'''


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m iosim.calibration CALIBRATION.json > PRESET.toml", file=sys.stderr)
        return 2
    try:
        doc = json.loads(Path(argv[0]).read_text())
        print(preset_from_calibration(doc, origin=argv[0]), end="")
    except (OSError, ValueError, KeyError) as exc:
        print(f"iosim: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
