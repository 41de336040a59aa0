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
from typing import NamedTuple

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
    # dtype -> FLOP/s of warpgroup wgmma (Hopper), where the spec gives one (else the library's)
    wgmma_flops_per_s: dict = field(default_factory=dict)
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
    # a wgmma's completion beyond its pipe time (optional [latency] wgmma_cycles; absent: the
    # dependent mma.sync's)
    wgmma_latency_cycles: float = 0.0
    # the share of the shorter of a warpgroup's wgmma work and another's exp work that runs
    # at the same time as the other on one SM (optional [compute] wgmma_sfu_overlap; absent:
    # 1, they overlap fully): the timed model charges the rest to the tensor pipe
    wgmma_sfu_overlap: float = 1.0
    # the same for wgmma beside FP32 work (optional [compute] wgmma_fp32_overlap; absent: 1)
    wgmma_fp32_overlap: float = 1.0
    # the wgmma rate with 1, 2, 3, ... consumer warpgroups resident per SM, relative to
    # wgmma_flops_per_s (optional [compute] wgmma_rate_by_warpgroups; absent: the same for all)
    wgmma_rate_by_warpgroups: tuple = ()
    # fp32 bytes per second the L2 adds into memory by reductions from the SMs (red.global.add:
    # an atomic add is a read-modify-write at the L2), and by TMA bulk reductions (optional
    # [l2] reduction_bandwidth_bytes_per_s, tma_reduction_bandwidth_bytes_per_s; absent: a
    # reduction costs a read and a write at the L2's bandwidth, and a TMA one as an SM's)
    l2_reduction_bytes_per_s: float | None = None
    tma_reduction_bytes_per_s: float | None = None
    sources: dict = field(default_factory=dict)  # section -> where its figures came from
    ncu_metrics: dict = field(default_factory=dict)  # section -> metric that measures it

    @property
    def l2_sets(self) -> int:
        return self.l2_bytes // (self.l2_line_bytes * self.l2_associativity)

    def wgmma_rate_factor(self, warpgroups: int) -> float:
        """The wgmma rate with ``warpgroups`` consumer warpgroups resident per SM, relative to
        ``wgmma_flops_per_s`` (1 without a table; past its end, its last entry)."""
        table = self.wgmma_rate_by_warpgroups
        if not table:
            return 1.0
        return table[min(max(int(warpgroups), 1), len(table)) - 1]

    def reduction_rate(self, copy_engine: str = "cp.async") -> float | None:
        """fp32 bytes per second the L2 adds by reductions issued by the SMs' threads
        (``copy_engine`` "cp.async") or by TMA ("tma"); None where the spec gives none."""
        return (self.tma_reduction_bytes_per_s if copy_engine == "tma"
                else self.l2_reduction_bytes_per_s)

    def tensor_rate(self, dtype: str, path: str = "library") -> float:
        """Dense tensor-core FLOP/s for matmuls with inputs of ``dtype``: a library GEMM's
        (``path="library"``), or warp-level ``mma.sync``'s where the spec gives one."""
        if path == "mma_sync" and dtype in self.mma_sync_flops_per_s:
            return self.mma_sync_flops_per_s[dtype]
        if path == "wgmma" and dtype in self.wgmma_flops_per_s:
            return self.wgmma_flops_per_s[dtype]
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


class _Key(NamedTuple):
    """One figure of a spec: where it sits, whether it is a whole count, its plausible range
    (inclusive) and the unit the range is given in."""

    section: str
    key: str
    kind: type  # int (a whole count) or float (a rate, a time, a latency)
    low: float
    high: float
    unit: str
    power_of_two: bool = False


_KIB, _MIB, _GIB, _TIB = 2**10, 2**20, 2**30, 2**40
# The plausible ranges are wide (a GPU from a small embedded part to several generations past
# today's), but they refuse the typo that would silently give absurd predictions: a bandwidth of
# 5e-324, an sm_count of 1e300, a latency in seconds instead of cycles.
_BANDWIDTH = (1e9, 1e16, "bytes/s")
_LATENCY = (1, 1e5, "cycles")
_SCHEMA = {
    "hbm_bytes": _Key("hbm", "capacity_bytes", int, _MIB, 4 * 2**50, "bytes"),
    "hbm_bandwidth_bytes_per_s": _Key("hbm", "bandwidth_bytes_per_s", float, *_BANDWIDTH),
    "l2_bytes": _Key("l2", "capacity_bytes", int, _KIB, 64 * _GIB, "bytes"),
    "l2_line_bytes": _Key("l2", "line_bytes", int, 16, 1024, "bytes", power_of_two=True),
    "l2_sector_bytes": _Key("l2", "sector_bytes", int, 4, 1024, "bytes", power_of_two=True),
    "l2_associativity": _Key("l2", "associativity", int, 1, 64, "ways"),
    "l2_bandwidth_bytes_per_s": _Key("l2", "bandwidth_bytes_per_s", float, *_BANDWIDTH),
    "sram_bytes_per_sm": _Key("sram", "bytes_per_sm", int, _KIB, 64 * _MIB, "bytes"),
    "sram_bytes_per_block": _Key("sram", "bytes_per_block", int, _KIB, 64 * _MIB, "bytes"),
    "sram_bandwidth_bytes_per_s": _Key("sram", "bandwidth_bytes_per_s", float, *_BANDWIDTH),
    "sm_count": _Key("compute", "sm_count", int, 1, 10_000, "SMs"),
    "max_ctas_per_sm": _Key("compute", "max_ctas_per_sm", int, 1, 1024, "CTAs"),
    "scalar_flops_per_s": _Key("compute", "scalar_flops_per_s", float, 1e9, 1e18, "FLOP/s"),
    "special_ops_per_s": _Key("compute", "special_ops_per_s", float, 1e8, 1e18, "ops/s"),
    "launch_overhead_s": _Key("launch", "overhead_s", float, 1e-9, 1e-2, "s"),
    "clock_hz": _Key("sm", "clock_hz", float, 1e8, 1e10, "Hz"),
    "sub_partitions_per_sm": _Key("sm", "sub_partitions", int, 1, 64, "warp schedulers"),
    "max_warps_per_sm": _Key("sm", "max_warps", int, 1, 4096, "warps"),
    "registers_per_sm": _Key("sm", "registers", int, _KIB, 16 * _MIB, "registers"),
    "max_registers_per_thread": _Key("sm", "max_registers_per_thread", int, 1, 65_536,
                                     "registers"),
    "register_allocation_unit": _Key("sm", "register_allocation_unit", int, 1, 65_536,
                                     "registers"),
    "smem_reserved_bytes_per_cta": _Key("sm", "smem_reserved_bytes_per_cta", int, 0, 1 * _MIB,
                                        "bytes"),
    "dram_latency_cycles": _Key("latency", "dram_cycles", float, *_LATENCY),
    "l2_latency_cycles": _Key("latency", "l2_cycles", float, *_LATENCY),
    "smem_latency_cycles": _Key("latency", "smem_cycles", float, *_LATENCY),
    "mma_latency_cycles": _Key("latency", "mma_cycles", float, *_LATENCY),
    "fp32_latency_cycles": _Key("latency", "fp32_cycles", float, *_LATENCY),
    "special_latency_cycles": _Key("latency", "special_cycles", float, *_LATENCY),
    "barrier_cycles": _Key("latency", "barrier_cycles", float, *_LATENCY),
}
#: The plausible range of each tensor-core rate (tensor_flops_per_s, mma_sync_flops_per_s).
_TENSOR_RATE = _Key("compute", "", float, 1e9, 1e18, "FLOP/s")
#: A rate relative to another (wgmma_rate_by_warpgroups).
_RELATIVE_RATE = _Key("compute", "", float, 0.01, 10.0, "x")
_SECTIONS = ("hbm", "l2", "sram", "compute", "launch", "sm", "latency")
#: Keys every section may carry besides its figures.
_NOTES = ("source", "ncu_metric")
#: Tables of per-dtype rates in [compute].
_RATE_TABLES = ("tensor_flops_per_s", "mma_sync_flops_per_s", "wgmma_flops_per_s")
#: Figures a spec may leave out, and the figure each then takes (field names).
_OPTIONAL = {"wgmma_latency_cycles": (_Key("latency", "wgmma_cycles", float, *_LATENCY),
                                      "mma_latency_cycles"),
             "wgmma_sfu_overlap": (_Key("compute", "wgmma_sfu_overlap", float, 0.0, 1.0,
                                        "fraction"), 1.0),
             "wgmma_fp32_overlap": (_Key("compute", "wgmma_fp32_overlap", float, 0.0, 1.0,
                                         "fraction"), 1.0),
             "l2_reduction_bytes_per_s": (_Key("l2", "reduction_bandwidth_bytes_per_s", float,
                                               *_BANDWIDTH), None),
             "tma_reduction_bytes_per_s": (_Key("l2", "tma_reduction_bandwidth_bytes_per_s",
                                                float, *_BANDWIDTH),
                                           "l2_reduction_bytes_per_s")}
_TOP_LEVEL = ("name", "description") + _SECTIONS
#: The keys each section allows, in the order the documentation lists them.
ALLOWED_KEYS = {section: tuple(k.key for k in _SCHEMA.values() if k.section == section)
                + (_RATE_TABLES + ("wgmma_rate_by_warpgroups",) if section == "compute" else ())
                + tuple(k.key for k, _ in _OPTIONAL.values() if k.section == section) + _NOTES
                for section in _SECTIONS}


def _format_bound(value: float, binary: bool) -> str:
    """A range bound as people write it: 64 GiB, 10000, 1e+16."""
    if binary and value:
        for size, name in ((2**50, "PiB"), (_TIB, "TiB"), (_GIB, "GiB"), (_MIB, "MiB"),
                           (_KIB, "KiB")):
            if value >= size and value % size == 0:
                return f"{int(value // size)} {name}"
    if value == int(value) and (abs(value) < 1e6 or int(value) & (int(value) - 1) == 0):
        return str(int(value))
    return f"{value:g}"


def _range_text(spec: _Key) -> str:
    """``spec``'s range in words: "1 MiB to 4 PiB", "1e+09 to 1e+16 bytes/s"."""
    binary = spec.unit == "bytes" and spec.high >= _MIB
    low, high = (_format_bound(v, binary) for v in (spec.low, spec.high))
    return f"{low} to {high}" + ("" if binary else f" {spec.unit}")


def _number(where: str, value, spec: _Key):
    """``value`` checked against ``spec``: a finite number in its range (a whole one, a power
    of two, where the key asks)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value) or not spec.low <= value <= spec.high:
        positive = "positive " if spec.low > 0 else ""
        raise SpecError(f"{where} must be a {positive}finite number from {_range_text(spec)}, "
                        f"got {value!r}")
    if spec.kind is int:
        if float(value) != int(value):
            raise SpecError(f"{where} must be a whole number of {spec.unit}, got {value!r}")
        value = int(value)
        if spec.power_of_two and value & (value - 1):
            raise SpecError(f"{where} must be a power of two ({_range_text(spec)}), "
                            f"got {value}")
        return value
    return float(value)


def _check_keys(origin: str, where: str, table: dict, allowed) -> None:
    """Refuse a key that is not one of ``allowed``: a typo would otherwise be ignored silently
    and its figure left at what the rest of the file says."""
    unknown = [key for key in table if key not in allowed]
    if unknown:
        raise SpecError(f"{origin}: {where} has unknown key {unknown[0]!r}; allowed: "
                        f"{', '.join(allowed)}")


def hardware_from_dict(data: dict, origin: str) -> Hardware:
    """Validate a parsed TOML document and build a Hardware. ``origin`` names it in errors."""
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: expected a TOML table")
    unknown = [key for key in data if key not in _TOP_LEVEL]
    if unknown:
        what = "section" if isinstance(data[unknown[0]], dict) else "top-level key"
        raise SpecError(f"{origin}: unknown {what} {unknown[0]!r}; a spec has top-level keys "
                        f"name, description and sections [{'], ['.join(_SECTIONS)}]")
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
        _check_keys(origin, f"[{section}]", table, ALLOWED_KEYS[section])
        sources[section] = table["source"]
        if "ncu_metric" in table:
            if not isinstance(table["ncu_metric"], str):
                raise SpecError(f"{origin}: [{section}] ncu_metric must be a string (the "
                                f"Nsight Compute metric), got {table['ncu_metric']!r}")
            metrics[section] = table["ncu_metric"]
    values = {}
    for field_name, spec in _SCHEMA.items():
        if spec.key not in data[spec.section]:
            raise SpecError(f"{origin}: [{spec.section}] is missing '{spec.key}'")
        values[field_name] = _number(f"{origin}: [{spec.section}] {spec.key}",
                                     data[spec.section][spec.key], spec)
    rates = data["compute"].get("tensor_flops_per_s")
    if not isinstance(rates, dict) or not rates:
        raise SpecError(f"{origin}: [compute] needs a table tensor_flops_per_s = "
                        "{fp16 = ..., bf16 = ..., fp32 = ...}")
    tensor = _rates(origin, "tensor_flops_per_s", rates)
    mma = data["compute"].get("mma_sync_flops_per_s", {})
    if not isinstance(mma, dict):
        raise SpecError(f"{origin}: [compute] mma_sync_flops_per_s must be a table "
                        "{fp16 = ..., ...} when given")
    for field_name, (spec, fallback) in _OPTIONAL.items():
        value = data[spec.section].get(spec.key)
        default = values[fallback] if isinstance(fallback, str) else fallback
        values[field_name] = (default if value is None else
                              _number(f"{origin}: [{spec.section}] {spec.key}", value, spec))
    by_groups = data["compute"].get("wgmma_rate_by_warpgroups", [])
    if not isinstance(by_groups, list):
        raise SpecError(f"{origin}: [compute] wgmma_rate_by_warpgroups must be a list of "
                        "relative rates [1 warpgroup, 2, ...] when given")
    values["wgmma_rate_by_warpgroups"] = tuple(
        _number(f"{origin}: [compute] wgmma_rate_by_warpgroups[{i}]", value, _RELATIVE_RATE)
        for i, value in enumerate(by_groups))
    wgmma = data["compute"].get("wgmma_flops_per_s", {})
    if not isinstance(wgmma, dict):
        raise SpecError(f"{origin}: [compute] wgmma_flops_per_s must be a table "
                        "{fp16 = ..., ...} when given")
    hw = Hardware(name=data["name"], description=data["description"],
                  tensor_flops_per_s=FrozenDict(tensor),
                  mma_sync_flops_per_s=FrozenDict(_rates(origin, "mma_sync_flops_per_s", mma)),
                  wgmma_flops_per_s=FrozenDict(_rates(origin, "wgmma_flops_per_s", wgmma)),
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
        checked[dtype] = _number(f"{origin}: [compute] {key}.{dtype}", rate, _TENSOR_RATE)
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
    if not text_name.strip():
        raise SpecError(f"the hardware spec is empty; give a preset name "
                        f"({', '.join(list_presets())}) or the path of a .toml spec file")
    path = Path(text_name)
    is_preset = text_name in list_presets()
    if path.is_dir() and not is_preset:
        raise SpecError(f"hardware spec {text_name!r} is a folder; give the path of a .toml "
                        f"spec file or a preset name ({', '.join(list_presets())})")
    if text_name.endswith(".toml") or path.is_file() or "/" in text_name or "\\" in text_name:
        if not path.exists():
            raise SpecError(f"hardware spec file {text_name!r} does not exist; give the path "
                            f"of a .toml spec file or a preset name ({', '.join(list_presets())})")
        if not path.is_file():
            raise SpecError(f"hardware spec {text_name!r} is not a regular file; give the path "
                            f"of a .toml spec file or a preset name ({', '.join(list_presets())})")
        origin = str(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise SpecError(f"cannot read hardware spec file {text_name!r}: "
                            f"{exc.strerror or exc}") from None
    else:
        if not is_preset:
            raise SpecError(f"unknown hardware preset {text_name!r}; presets: "
                            f"{', '.join(list_presets())} (or a path to a .toml file)")
        origin = f"preset {text_name}"
        raw = (resources.files("iosim") / PRESET_DIR / f"{text_name}.toml").read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{origin}: not valid TOML ({exc})") from None
    return hardware_from_dict(data, origin)
