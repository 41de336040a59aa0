"""Hardware specs: a frozen dataclass loaded from a TOML file (a shipped preset or the user's own).

Each TOML file describes one GPU as a list of levels (HBM, L2, SRAM) plus its compute units, in
the manner of kerncraft's machine files: every section gives its figures, where they came from
(``source``), and the Nsight Compute metric that measures that level (``ncu_metric``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import SpecError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PRESET_DIR = "presets"


class FrozenDict(dict):
    """A read-only dict (it still pickles, so specs can travel to worker processes)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("hardware specs are read-only; edit the TOML file instead")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse
    __ior__ = _refuse

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def __hash__(self):
        return hash(tuple(sorted(self.items())))


@dataclass(frozen=True)
class Hardware:
    """One GPU's memory hierarchy and compute rates. All sizes in bytes, rates per second."""

    name: str
    description: str
    # HBM (device memory)
    hbm_bytes: int
    hbm_bandwidth_bytes_per_s: float
    # L2 cache between the SMs and HBM
    l2_bytes: int
    l2_line_bytes: int
    l2_sector_bytes: int
    l2_associativity: int
    l2_bandwidth_bytes_per_s: float
    # on-chip SRAM (shared memory)
    sram_bytes_per_sm: int
    sram_bytes_per_block: int
    sram_bandwidth_bytes_per_s: float
    # compute
    sm_count: int
    max_ctas_per_sm: int
    tensor_flops_per_s: dict = field(default_factory=dict)  # dtype -> FLOP/s (dense matmul)
    scalar_flops_per_s: float = 0.0  # CUDA-core fp32 FLOP/s
    special_ops_per_s: float = 0.0  # exp/log evaluations per second (special-function units)
    # dtype -> FLOP/s of warp-level mma.sync, where it differs from the library GEMM rate
    mma_sync_flops_per_s: dict = field(default_factory=dict)
    launch_overhead_s: float = 0.0
    # the SM as the occupancy calculator and the timing model see it ([sm])
    clock_hz: float = 0.0
    sub_partitions_per_sm: int = 4  # warp schedulers, each with its own tensor/FP32/SFU pipes
    max_warps_per_sm: int = 64
    registers_per_sm: int = 65536
    max_registers_per_thread: int = 255
    register_allocation_unit: int = 256  # registers are allocated per warp in units of this
    smem_reserved_bytes_per_cta: int = 0  # shared memory the driver reserves for each CTA
    # latencies in SM clock cycles, of one dependent access or instruction ([latency])
    dram_latency_cycles: float = 0.0
    l2_latency_cycles: float = 0.0
    smem_latency_cycles: float = 0.0
    mma_latency_cycles: float = 0.0
    fp32_latency_cycles: float = 0.0
    special_latency_cycles: float = 0.0
    barrier_cycles: float = 0.0
    sources: dict = field(default_factory=dict)  # section -> where its figures came from
    ncu_metrics: dict = field(default_factory=dict)  # section -> metric that measures it

    @property
    def l2_sets(self) -> int:
        return self.l2_bytes // (self.l2_line_bytes * self.l2_associativity)

    def tensor_rate(self, dtype: str, path: str = "library") -> float:
        """Dense tensor-core FLOP/s for matmuls with inputs of ``dtype``: a library GEMM's
        (``path="library"``), or warp-level ``mma.sync``'s where the spec gives one."""
        if path == "mma_sync" and dtype in self.mma_sync_flops_per_s:
            return self.mma_sync_flops_per_s[dtype]
        try:
            return self.tensor_flops_per_s[dtype]
        except KeyError:
            raise SpecError(f"hardware {self.name!r} gives no tensor_flops_per_s for dtype "
                            f"{dtype!r}; it has: {', '.join(sorted(self.tensor_flops_per_s))}")

    def ridge_point(self, dtype: str) -> float:
        """Arithmetic intensity (FLOP per HBM byte) where the roofline turns from memory to compute."""
        return self.tensor_rate(dtype) / self.hbm_bandwidth_bytes_per_s

    def with_sram(self, sram_bytes_per_block: int) -> "Hardware":
        """A copy whose usable SRAM per thread block is ``sram_bytes_per_block`` (the paper's M)."""
        from dataclasses import replace

        from .shape import check_positive_int

        try:
            sram_bytes_per_block = check_positive_int("sram_bytes", sram_bytes_per_block,
                                                      "a positive integer number of bytes")
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        return replace(self, sram_bytes_per_block=sram_bytes_per_block,
                       sram_bytes_per_sm=max(self.sram_bytes_per_sm, sram_bytes_per_block))


# Each field: (section, key, type). "type" is int (a whole count of bytes) or float (a rate).
_SCHEMA = {
    "hbm_bytes": ("hbm", "capacity_bytes", int),
    "hbm_bandwidth_bytes_per_s": ("hbm", "bandwidth_bytes_per_s", float),
    "l2_bytes": ("l2", "capacity_bytes", int),
    "l2_line_bytes": ("l2", "line_bytes", int),
    "l2_sector_bytes": ("l2", "sector_bytes", int),
    "l2_associativity": ("l2", "associativity", int),
    "l2_bandwidth_bytes_per_s": ("l2", "bandwidth_bytes_per_s", float),
    "sram_bytes_per_sm": ("sram", "bytes_per_sm", int),
    "sram_bytes_per_block": ("sram", "bytes_per_block", int),
    "sram_bandwidth_bytes_per_s": ("sram", "bandwidth_bytes_per_s", float),
    "sm_count": ("compute", "sm_count", int),
    "max_ctas_per_sm": ("compute", "max_ctas_per_sm", int),
    "scalar_flops_per_s": ("compute", "scalar_flops_per_s", float),
    "special_ops_per_s": ("compute", "special_ops_per_s", float),
    "launch_overhead_s": ("launch", "overhead_s", float),
    "clock_hz": ("sm", "clock_hz", float),
    "sub_partitions_per_sm": ("sm", "sub_partitions", int),
    "max_warps_per_sm": ("sm", "max_warps", int),
    "registers_per_sm": ("sm", "registers", int),
    "max_registers_per_thread": ("sm", "max_registers_per_thread", int),
    "register_allocation_unit": ("sm", "register_allocation_unit", int),
    "smem_reserved_bytes_per_cta": ("sm", "smem_reserved_bytes_per_cta", int),
    "dram_latency_cycles": ("latency", "dram_cycles", float),
    "l2_latency_cycles": ("latency", "l2_cycles", float),
    "smem_latency_cycles": ("latency", "smem_cycles", float),
    "mma_latency_cycles": ("latency", "mma_cycles", float),
    "fp32_latency_cycles": ("latency", "fp32_cycles", float),
    "special_latency_cycles": ("latency", "special_cycles", float),
    "barrier_cycles": ("latency", "barrier_cycles", float),
}
#: Keys that may be 0 (everything else must be positive).
_MAY_BE_ZERO = {("sm", "smem_reserved_bytes_per_cta")}
_SECTIONS = ("hbm", "l2", "sram", "compute", "launch", "sm", "latency")


def _number(where: str, value, kind, may_be_zero: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not may_be_zero):
        allowed = "a non-negative" if may_be_zero else "a positive"
        raise SpecError(f"{where} must be {allowed} finite number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise SpecError(f"{where} must be a whole number of bytes/units, got {value!r}")
        return int(value)
    return float(value)


def hardware_from_dict(data: dict, origin: str) -> Hardware:
    """Validate a parsed TOML document and build a Hardware. ``origin`` names it in errors."""
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: expected a TOML table")
    for key in ("name", "description"):
        if not isinstance(data.get(key), str) or not data.get(key):
            raise SpecError(f"{origin}: missing top-level string '{key}'")
    sources, metrics = {}, {}
    for section in _SECTIONS:
        table = data.get(section)
        if not isinstance(table, dict):
            raise SpecError(f"{origin}: missing section [{section}]; a spec needs "
                            f"[{'], ['.join(_SECTIONS)}]")
        if not isinstance(table.get("source"), str) or not table["source"].strip():
            raise SpecError(f"{origin}: [{section}] needs a 'source' string saying where its "
                            "figures came from (datasheet or measurement)")
        sources[section] = table["source"]
        if "ncu_metric" in table:
            metrics[section] = str(table["ncu_metric"])
    values = {}
    for field_name, (section, key, kind) in _SCHEMA.items():
        if key not in data[section]:
            raise SpecError(f"{origin}: [{section}] is missing '{key}'")
        values[field_name] = _number(f"{origin}: [{section}] {key}", data[section][key], kind,
                                     (section, key) in _MAY_BE_ZERO)
    rates = data["compute"].get("tensor_flops_per_s")
    if not isinstance(rates, dict) or not rates:
        raise SpecError(f"{origin}: [compute] needs a table tensor_flops_per_s = "
                        "{fp16 = ..., bf16 = ..., fp32 = ...}")
    tensor = _rates(origin, "tensor_flops_per_s", rates)
    mma = data["compute"].get("mma_sync_flops_per_s", {})
    if not isinstance(mma, dict):
        raise SpecError(f"{origin}: [compute] mma_sync_flops_per_s must be a table "
                        "{fp16 = ..., ...} when given")
    hw = Hardware(name=data["name"], description=data["description"],
                  tensor_flops_per_s=FrozenDict(tensor),
                  mma_sync_flops_per_s=FrozenDict(_rates(origin, "mma_sync_flops_per_s", mma)),
                  sources=FrozenDict(sources), ncu_metrics=FrozenDict(metrics),
                  **values)
    _check_consistency(hw, origin)
    return hw


def _rates(origin: str, key: str, rates: dict) -> dict:
    """A table dtype -> FLOP/s, each dtype known and each rate a positive number."""
    from .shape import DTYPE_BYTES

    checked = {}
    for dtype, rate in rates.items():
        if dtype not in DTYPE_BYTES:
            raise SpecError(f"{origin}: [compute] {key} has unknown dtype {dtype!r}; allowed: "
                            f"{', '.join(DTYPE_BYTES)}")
        checked[dtype] = _number(f"{origin}: [compute] {key}.{dtype}", rate, float)
    return checked


def _check_consistency(hw: Hardware, origin: str) -> None:
    if hw.l2_line_bytes % hw.l2_sector_bytes or hw.l2_line_bytes // hw.l2_sector_bytes > 8:
        raise SpecError(f"{origin}: l2 line_bytes ({hw.l2_line_bytes}) must be a multiple of "
                        f"sector_bytes ({hw.l2_sector_bytes}), with at most 8 sectors per line")
    if hw.l2_bytes % (hw.l2_line_bytes * hw.l2_associativity):
        raise SpecError(f"{origin}: l2 capacity_bytes ({hw.l2_bytes}) must be a multiple of "
                        f"line_bytes x associativity ({hw.l2_line_bytes * hw.l2_associativity})")
    if hw.max_registers_per_thread * 32 > hw.registers_per_sm:
        raise SpecError(f"{origin}: sm max_registers_per_thread ({hw.max_registers_per_thread}) "
                        f"x 32 threads exceeds registers ({hw.registers_per_sm})")
    if hw.sram_bytes_per_block > hw.sram_bytes_per_sm:
        raise SpecError(f"{origin}: sram bytes_per_block ({hw.sram_bytes_per_block}) exceeds "
                        f"bytes_per_sm ({hw.sram_bytes_per_sm})")


def list_presets() -> list[str]:
    """Names of the hardware presets shipped with the package."""
    folder = resources.files("iosim") / PRESET_DIR
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_hardware(preset_or_path) -> Hardware:
    """Load a shipped preset by name (``"h100-measured"``) or a user's TOML file by path."""
    if isinstance(preset_or_path, Hardware):
        return preset_or_path
    text_name = str(preset_or_path)
    path = Path(text_name)
    if text_name.endswith(".toml") or path.is_file() or "/" in text_name or "\\" in text_name:
        if not path.is_file():
            raise SpecError(f"hardware spec file {text_name!r} does not exist")
        origin, raw = str(path), path.read_bytes()
    else:
        if text_name not in list_presets():
            raise SpecError(f"unknown hardware preset {text_name!r}; presets: "
                            f"{', '.join(list_presets())} (or a path to a .toml file)")
        origin = f"preset {text_name}"
        raw = (resources.files("iosim") / PRESET_DIR / f"{text_name}.toml").read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{origin}: not valid TOML ({exc})") from None
    return hardware_from_dict(data, origin)
