"""Hardware specs: the shipped presets, a user's own TOML file, and the refusal of bad ones."""
from __future__ import annotations

import dataclasses
import math
import re
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

import iosim
from iosim import Hardware, IosimError, SpecError, list_presets, load_hardware

SECTIONS = ("hbm", "l2", "sram", "compute", "launch", "sm", "latency")
REQUIRED_PRESETS = {"a100-40gb", "h100-sxm", "h100-measured", "h200"}


def preset_text(name: str = "h100-measured") -> str:
    return (resources.files("iosim") / "presets" / f"{name}.toml").read_text(encoding="utf-8")


def edit(text: str, section: str, key: str, value: str | None) -> str:
    """Set ``key = value`` in ``[section]`` (``value`` None deletes the line). The key must exist."""
    out, current, done = [], None, False
    for line in text.splitlines():
        header = re.match(r"\s*\[([^\]]+)\]\s*$", line)
        if header:
            current = header.group(1).strip()
        elif current == section and re.match(rf"\s*{re.escape(key)}\s*=", line):
            done = True
            if value is None:
                continue
            line = f"{key} = {value}"
        out.append(line)
    assert done, f"[{section}] {key} not found in the preset text"
    return "\n".join(out) + "\n"


def drop_section(text: str, section: str) -> str:
    out, current = [], None
    for line in text.splitlines():
        header = re.match(r"\s*\[([^\]]+)\]\s*$", line)
        if header:
            current = header.group(1).strip()
        if current != section:
            out.append(line)
    assert len(out) < len(text.splitlines())
    return "\n".join(out) + "\n"


def write(tmp_path: Path, text: str, name: str = "gpu.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- presets ------------------------------------------------------------------------------------

def test_required_presets_are_listed():
    names = list_presets()
    assert REQUIRED_PRESETS <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_frozen_with_sources(name):
    hw = load_hardware(name)
    assert isinstance(hw, Hardware)
    assert hw.name == name and hw.description
    with pytest.raises(dataclasses.FrozenInstanceError):
        hw.hbm_bandwidth_bytes_per_s = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        hw.name = "other"
    assert set(hw.sources) == set(SECTIONS)
    for section, source in hw.sources.items():
        assert isinstance(source, str) and source.strip(), section
    # sanity of the figures, from the physics rather than the file
    assert 1e11 < hw.hbm_bandwidth_bytes_per_s < hw.l2_bandwidth_bytes_per_s \
        < hw.sram_bandwidth_bytes_per_s
    assert hw.sram_bytes_per_block <= hw.sram_bytes_per_sm < hw.l2_bytes < hw.hbm_bytes
    assert hw.l2_line_bytes % hw.l2_sector_bytes == 0
    assert hw.l2_sets * hw.l2_line_bytes * hw.l2_associativity == hw.l2_bytes
    assert {"fp16", "bf16", "fp32"} <= set(hw.tensor_flops_per_s)
    assert hw.launch_overhead_s > 0 and hw.sm_count > 0


def test_h100_measured_figures_come_from_the_committed_calibration():
    """The preset's rates are the microbenchmarks' (to the 4 digits the TOML keeps)."""
    import json
    from pathlib import Path

    from iosim.calibration import preset_from_calibration

    path = Path(__file__).resolve().parents[1] / "experiments" / "data" / "h100" / "calibration.json"
    results = json.loads(path.read_text())["results"]
    hw = load_hardware("h100-measured")
    close = lambda a, b: a == pytest.approx(b, rel=1e-3)
    assert close(hw.hbm_bandwidth_bytes_per_s, results["d2d_copy"]["bytes_per_s"])
    assert close(hw.l2_bandwidth_bytes_per_s, results["l2_read"]["bytes_per_s"])
    assert close(hw.sram_bandwidth_bytes_per_s, results["smem_read"]["bytes_per_s"])
    gemm = results["matmul_fp16_cublas_strided_batched_8192"]["flops_per_s"]
    assert close(hw.tensor_rate("fp16"), gemm)
    assert close(hw.tensor_rate("fp16", "mma_sync"), results["mma_sync_fp16_f32"]["flops_per_s"])
    assert close(hw.special_ops_per_s, results["exp2_approx"]["exp_per_s"])
    assert close(hw.scalar_flops_per_s, results["fp32_fma"]["flops_per_s"])
    reductions = results["l2_reduction"]
    assert close(hw.reduction_rate("cp.async"),
                 reductions["red_v2_f32"]["bytes_per_s"]["l2_resident"])
    assert close(hw.reduction_rate("tma"),
                 reductions["tma_reduce_f32"]["bytes_per_s"]["l2_resident"])
    assert hw.ridge_point("fp16") == pytest.approx(gemm / results["d2d_copy"]["bytes_per_s"],
                                                   rel=1e-3)
    for section in ("hbm", "l2", "sram", "compute", "launch"):
        assert "measured" in hw.sources[section]
    # the shipped file is exactly what the generator makes of the committed data
    preset = Path(iosim.__file__).parent / "presets" / "h100-measured.toml"
    generated = preset_from_calibration(json.loads(path.read_text()),
                                        origin="experiments/data/h100/calibration.json")
    assert preset.read_text() == generated


def test_ridge_point_orders_the_gpus():
    # H100 SXM has more FLOP/s per HBM byte than A100; H200 (same FLOP/s, more bandwidth) less.
    a100, h100, h200 = (load_hardware(n) for n in ("a100-40gb", "h100-sxm", "h200"))
    assert h200.ridge_point("fp16") < h100.ridge_point("fp16")
    assert a100.ridge_point("fp16") < h100.ridge_point("fp16")


def test_tensor_rate_of_unknown_dtype_is_refused():
    hw = load_hardware("h100-measured")
    with pytest.raises(SpecError, match=r"no tensor_flops_per_s for dtype 'int8'.*fp16"):
        hw.ridge_point("int8")


def test_load_hardware_passes_a_hardware_through():
    hw = load_hardware("a100-40gb")
    assert load_hardware(hw) is hw


def test_unknown_preset_is_refused_naming_the_presets():
    with pytest.raises(SpecError, match=r"unknown hardware preset 'b200'; presets: ") as info:
        load_hardware("b200")
    for name in REQUIRED_PRESETS:
        assert name in str(info.value)
    assert isinstance(info.value, IosimError) and isinstance(info.value, ValueError)


# ---- with_sram ----------------------------------------------------------------------------------

def test_with_sram_is_a_modified_copy():
    hw = load_hardware("h100-measured")
    smaller = hw.with_sram(100_000)
    assert smaller.sram_bytes_per_block == 100_000
    assert smaller.sram_bytes_per_sm == hw.sram_bytes_per_sm
    assert hw.sram_bytes_per_block == 232_448  # the original is untouched
    bigger = hw.with_sram(10**6)
    assert bigger.sram_bytes_per_block == bigger.sram_bytes_per_sm == 10**6
    assert bigger.hbm_bandwidth_bytes_per_s == hw.hbm_bandwidth_bytes_per_s
    with pytest.raises(dataclasses.FrozenInstanceError):
        bigger.sram_bytes_per_block = 5


@pytest.mark.parametrize("bad", [0, -1, 1.5, 1024.0, True, "1024", None])
def test_with_sram_refuses_bad_sizes(bad):
    with pytest.raises(SpecError, match=r"sram_bytes must be a positive integer"):
        load_hardware("h100-measured").with_sram(bad)


# ---- a user's own file -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(REQUIRED_PRESETS))
def test_copied_preset_loads_by_path(tmp_path, name):
    path = write(tmp_path, preset_text(name), "mine.toml")
    for spec in (path, str(path)):
        assert load_hardware(spec) == load_hardware(name)


def test_user_file_without_toml_suffix_loads_by_path(tmp_path):
    path = write(tmp_path, preset_text("h200"), "my-gpu.spec")
    assert load_hardware(path).name == "h200"


def test_user_edits_take_effect(tmp_path):
    text = edit(preset_text(), "hbm", "bandwidth_bytes_per_s", "1.0e12")
    text = edit(text, "compute", "sm_count", "7")
    hw = load_hardware(write(tmp_path, text))
    assert hw.hbm_bandwidth_bytes_per_s == 1.0e12 and hw.sm_count == 7
    assert hw.ridge_point("fp16") == pytest.approx(hw.tensor_rate("fp16") / 1.0e12)


@given(st.integers(1, 10_000))
def test_any_plausible_sm_count_loads(tmp_path_factory, count):
    path = tmp_path_factory.mktemp("hw") / "gpu.toml"
    path.write_text(edit(preset_text(), "compute", "sm_count", str(count)), encoding="utf-8")
    assert load_hardware(path).sm_count == count


def test_nonexistent_path_is_refused(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(SpecError, match=r"hardware spec file .*nope\.toml.* does not exist"):
        load_hardware(missing)


def _refused(tmp_path, text, pattern):
    with pytest.raises(SpecError, match=pattern) as info:
        load_hardware(write(tmp_path, text))
    assert "gpu.toml" in str(info.value)  # the message names the file


def test_invalid_toml_syntax_is_refused(tmp_path):
    _refused(tmp_path, preset_text() + "\nthis is = = not toml\n", r"not valid TOML")
    _refused(tmp_path, "[hbm\ncapacity_bytes = 1\n", r"not valid TOML")


def test_non_utf8_file_is_refused(tmp_path):
    path = tmp_path / "gpu.toml"
    path.write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(SpecError, match=r"not valid TOML"):
        load_hardware(path)


@pytest.mark.parametrize("section", SECTIONS)
def test_missing_section_is_refused(tmp_path, section):
    _refused(tmp_path, drop_section(preset_text(), section),
             rf"missing section \[{section}\]; a spec needs \[hbm\], \[l2\]")


@pytest.mark.parametrize("section, key", [
    ("hbm", "capacity_bytes"), ("hbm", "bandwidth_bytes_per_s"), ("l2", "line_bytes"),
    ("l2", "sector_bytes"), ("l2", "associativity"), ("sram", "bytes_per_block"),
    ("compute", "sm_count"), ("compute", "scalar_flops_per_s"), ("launch", "overhead_s"),
])
def test_missing_key_is_refused(tmp_path, section, key):
    _refused(tmp_path, edit(preset_text(), section, key, None),
             rf"\[{section}\] is missing '{key}'")


def test_missing_tensor_rates_are_refused(tmp_path):
    _refused(tmp_path, edit(preset_text(), "compute", "tensor_flops_per_s", None),
             r"\[compute\] needs a table tensor_flops_per_s")
    _refused(tmp_path, edit(preset_text(), "compute", "tensor_flops_per_s", "{}"),
             r"\[compute\] needs a table tensor_flops_per_s")


@pytest.mark.parametrize("key", ["name", "description"])
def test_missing_top_level_string_is_refused(tmp_path, key):
    text = "\n".join(line for line in preset_text().splitlines()
                     if not line.startswith(f"{key} ="))
    _refused(tmp_path, text, rf"missing top-level string '{key}'")


@pytest.mark.parametrize("section", SECTIONS)
def test_missing_source_is_refused(tmp_path, section):
    _refused(tmp_path, edit(preset_text(), section, "source", None),
             rf"\[{section}\] needs a 'source' string")


def test_blank_source_is_refused(tmp_path):
    _refused(tmp_path, edit(preset_text(), "hbm", "source", '"   "'),
             r"\[hbm\] needs a 'source' string")


@pytest.mark.parametrize("section, key", [
    ("hbm", "bandwidth_bytes_per_s"), ("l2", "capacity_bytes"), ("compute", "sm_count"),
    ("launch", "overhead_s"), ("sram", "bytes_per_block"),
])
@pytest.mark.parametrize("value", ["0", "-1", "-2.97e12", "0.0", "nan", "inf", "-inf"])
def test_non_positive_or_non_finite_values_are_refused(tmp_path, section, key, value):
    _refused(tmp_path, edit(preset_text(), section, key, value),
             rf"\[{section}\] {key} must be a positive finite number from ")


@pytest.mark.parametrize("value", ['"fast"', '"2.97e12"', "true", "[1, 2]", "{ a = 1 }"])
def test_non_number_is_refused(tmp_path, value):
    _refused(tmp_path, edit(preset_text(), "hbm", "bandwidth_bytes_per_s", value),
             r"\[hbm\] bandwidth_bytes_per_s must be a number")


def test_fractional_byte_count_is_refused(tmp_path):
    _refused(tmp_path, edit(preset_text(), "l2", "capacity_bytes", "1048576.5"),
             r"\[l2\] capacity_bytes must be a whole number of bytes, got 1048576\.5")


def test_fractional_count_is_refused_in_its_own_unit(tmp_path):
    """A count that is not bytes is not called bytes."""
    _refused(tmp_path, edit(preset_text(), "compute", "sm_count", "131.5"),
             r"\[compute\] sm_count must be a whole number of SMs, got 131\.5$")
    _refused(tmp_path, edit(preset_text(), "sm", "max_warps", "63.5"),
             r"\[sm\] max_warps must be a whole number of warps")


@pytest.mark.parametrize("rate, pattern", [
    ("{ fp16 = 791e12, fp8 = 1.5e15 }", r"tensor_flops_per_s has unknown dtype 'fp8'; allowed: "
                                        r"fp16, bf16, fp32"),
    ("{ fp16 = -1.0 }", r"tensor_flops_per_s\.fp16 must be a positive finite number from "
                        r"1e\+09 to 1e\+18 FLOP/s, got -1\.0"),
    ("{ fp16 = nan }", r"tensor_flops_per_s\.fp16 must be a positive finite number from"),
    ("{ fp16 = 1e300 }", r"tensor_flops_per_s\.fp16 must be a positive finite number from"),
    ('{ fp16 = "lots" }', r"tensor_flops_per_s\.fp16 must be a number"),
])
def test_bad_tensor_rates_are_refused(tmp_path, rate, pattern):
    _refused(tmp_path, edit(preset_text(), "compute", "tensor_flops_per_s", rate), pattern)


def test_line_not_multiple_of_sector_is_refused(tmp_path):
    text = edit(edit(preset_text(), "l2", "line_bytes", "64"), "l2", "sector_bytes", "128")
    _refused(tmp_path, text, r"line_bytes \(64\) must be a multiple of sector_bytes \(128\)")


def test_inconsistent_geometry_is_refused(tmp_path):
    _refused(tmp_path, edit(preset_text(), "l2", "capacity_bytes", "1000000"),
             r"capacity_bytes \(1000000\) must be a multiple of line_bytes x associativity")
    _refused(tmp_path, edit(preset_text(), "sram", "bytes_per_block", "300000"),
             r"bytes_per_block \(300000\) exceeds bytes_per_sm")


def test_spec_error_hierarchy():
    assert issubclass(SpecError, IosimError) and issubclass(SpecError, ValueError)
    assert iosim.SpecError is SpecError
    assert math.isfinite(load_hardware("h200").hbm_bandwidth_bytes_per_s)


# ---- unknown keys and implausible figures (a typo must not give silently wrong predictions) ----

def add_line(text: str, section: str, line: str) -> str:
    """Add ``line`` as the first line of ``[section]``."""
    out = []
    for existing in text.splitlines():
        out.append(existing)
        if re.match(rf"\s*\[{re.escape(section)}\]", existing):
            out.append(line)
    assert len(out) == len(text.splitlines()) + 1
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("section", SECTIONS)
def test_unknown_key_is_refused_naming_it_and_the_allowed_keys(tmp_path, section):
    from iosim.hardware import ALLOWED_KEYS

    with pytest.raises(SpecError) as info:
        load_hardware(write(tmp_path, add_line(preset_text(), section, "bandwdith_typo = 5")))
    message = str(info.value)
    assert "gpu.toml" in message
    assert f"[{section}] has unknown key 'bandwdith_typo'; allowed: " in message
    for key in ALLOWED_KEYS[section]:
        assert key in message


def test_the_issue_typo_under_hbm_is_refused(tmp_path):
    _refused(tmp_path, add_line(preset_text(), "hbm", "bandwdith_typo = 5"),
             r"\[hbm\] has unknown key 'bandwdith_typo'; allowed: capacity_bytes, "
             r"bandwidth_bytes_per_s, source, ncu_metric$")


def test_misspelt_rate_table_is_refused(tmp_path):
    text = add_line(preset_text(), "compute", "mma_synch_flops_per_s = { fp16 = 1e14 }")
    _refused(tmp_path, text,
             r"\[compute\] has unknown key 'mma_synch_flops_per_s'; allowed: .*"
             r"tensor_flops_per_s, mma_sync_flops_per_s")


def test_unknown_section_and_top_level_key_are_refused(tmp_path):
    _refused(tmp_path, preset_text() + "\n[l3]\ncapacity_bytes = 1024\nsource = \"x\"\n",
             r"unknown section 'l3'; a spec has top-level keys name, description and sections "
             r"\[hbm\], \[l2\], \[sram\], \[compute\], \[launch\], \[sm\], \[latency\]")
    _refused(tmp_path, 'vendor = "nvidia"\n' + preset_text(),
             r"unknown top-level key 'vendor'; a spec has top-level keys name, description")


def test_non_string_ncu_metric_is_refused(tmp_path):
    _refused(tmp_path, edit(preset_text(), "hbm", "ncu_metric", "42"),
             r"\[hbm\] ncu_metric must be a string")


def _schema_cases():
    from iosim.hardware import _SCHEMA

    for spec in _SCHEMA.values():
        below = spec.low / 2 if spec.low > 0 else -1
        yield pytest.param(spec, below, id=f"{spec.section}.{spec.key}-below")
        yield pytest.param(spec, spec.high * 2, id=f"{spec.section}.{spec.key}-above")


@pytest.mark.parametrize("spec, value", list(_schema_cases()))
def test_every_figure_has_a_plausible_range(tmp_path, spec, value):
    """Outside its range, every figure is refused with a message that gives the range."""
    from iosim.hardware import _range_text

    text = edit(preset_text(), spec.section, spec.key, repr(float(value)))
    with pytest.raises(SpecError) as info:
        load_hardware(write(tmp_path, text))
    message = str(info.value)
    positive = "positive " if spec.low > 0 else ""
    assert f"[{spec.section}] {spec.key} must be a {positive}finite number from " \
        f"{_range_text(spec)}, got {float(value)!r}" in message


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_figure_is_inside_its_range(name):
    from iosim.hardware import _SCHEMA, _TENSOR_RATE

    hw = load_hardware(name)
    for field_name, spec in _SCHEMA.items():
        assert spec.low <= getattr(hw, field_name) <= spec.high, field_name
    for rate in list(hw.tensor_flops_per_s.values()) + list(hw.mma_sync_flops_per_s.values()):
        assert _TENSOR_RATE.low <= rate <= _TENSOR_RATE.high


@pytest.mark.parametrize("section, key, value, pattern", [
    # the issue's cases: a denormal bandwidth (it printed "inf ms"), an sm_count of 1e300
    ("hbm", "bandwidth_bytes_per_s", "5e-324",
     r"\[hbm\] bandwidth_bytes_per_s must be a positive finite number from 1e\+09 to 1e\+16 "
     r"bytes/s, got 5e-324"),
    ("compute", "sm_count", "1e300",
     r"\[compute\] sm_count must be a positive finite number from 1 to 10000 SMs, got 1e\+300$"),
    ("compute", "sm_count", "20000",
     r"\[compute\] sm_count must be a positive finite number from 1 to 10000 SMs, got 20000$"),
    ("sm", "clock_hz", "1.98", r"\[sm\] clock_hz must be a positive finite number from "
                               r"1e\+08 to 1e\+10 Hz"),
    ("latency", "dram_cycles", "0.5", r"\[latency\] dram_cycles must be a positive finite "
                                      r"number from 1 to 100000 cycles"),
    ("l2", "associativity", "128", r"\[l2\] associativity must be a positive finite number "
                                   r"from 1 to 64 ways"),
    ("hbm", "capacity_bytes", "1e20", r"\[hbm\] capacity_bytes must be a positive finite "
                                      r"number from 1 MiB to 4 PiB"),
    ("sm", "smem_reserved_bytes_per_cta", "-1", r"smem_reserved_bytes_per_cta must be a finite "
                                                r"number from 0 to 1 MiB"),
])
def test_implausible_figures_are_refused_with_their_range(tmp_path, section, key, value, pattern):
    _refused(tmp_path, edit(preset_text(), section, key, value), pattern)


def test_zero_reserved_shared_memory_is_allowed(tmp_path):
    text = edit(preset_text(), "sm", "smem_reserved_bytes_per_cta", "0")
    assert load_hardware(write(tmp_path, text)).smem_reserved_bytes_per_cta == 0


@pytest.mark.parametrize("key, value", [("line_bytes", "96"), ("sector_bytes", "24")])
def test_line_and_sector_sizes_must_be_powers_of_two(tmp_path, key, value):
    _refused(tmp_path, edit(preset_text(), "l2", key, value),
             rf"\[l2\] {key} must be a power of two \(\d+ to 1024 bytes\), got {value}")


# ---- what --hardware may name ------------------------------------------------------------------

def test_a_folder_is_refused_as_a_folder(tmp_path, monkeypatch):
    for folder in (tmp_path, str(tmp_path), str(tmp_path) + "/"):
        with pytest.raises(SpecError, match=r"is a folder; give the path of a \.toml spec file "
                                            r"or a preset name \(.*h100-measured"):
            load_hardware(folder)
    (tmp_path / "specs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=r"'specs' is a folder"):
        load_hardware("specs")


@pytest.mark.parametrize("blank", ["", "  "])
def test_an_empty_hardware_name_is_refused(blank):
    with pytest.raises(SpecError, match=r"the hardware spec is empty; give a preset name "
                                        r"\(.*h100-measured"):
        load_hardware(blank)


def test_a_preset_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "h200").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_hardware("h200").name == "h200"


def test_a_device_file_is_refused_as_not_a_regular_file():
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null")
    with pytest.raises(SpecError, match=r"'/dev/null' is not a regular file; give the path of "
                                        r"a \.toml spec file or a preset name"):
        load_hardware("/dev/null")


def test_the_howto_table_lists_every_key_with_its_range():
    from iosim.hardware import ALLOWED_KEYS, _SCHEMA, _TENSOR_RATE, _range_text

    doc = (Path(__file__).resolve().parents[1] / "docs" / "howto" / "hardware.md").read_text()
    for spec in _SCHEMA.values():
        assert f"| `[{spec.section}]` | `{spec.key}` | {_range_text(spec)} |" in doc, spec.key
    for table in ("tensor_flops_per_s", "mma_sync_flops_per_s"):
        assert f"| `[compute]` | `{table}` | each {_range_text(_TENSOR_RATE)} |" in doc
    documented = set(re.findall(r"^\| `\[(\w+)\]` \| `(\w+)` \|", doc, re.M))
    assert documented == {(section, key) for section, keys in ALLOWED_KEYS.items()
                          for key in keys if key not in ("source", "ncu_metric")}
