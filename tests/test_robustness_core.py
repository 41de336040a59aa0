"""Hostile input to the core (issue 13): no writable Numba cache, strict JSON, float16 overflow,
block sizes past N, folders and implausible figures given as hardware."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import iosim
from iosim import AttentionShape, IosimError, run_attention
from iosim.cli import main
from iosim.errors import NumbaCacheWarning, TensorOverflowWarning, TilingError
from iosim.schedules import build_schedule

REPO = Path(__file__).resolve().parents[1]
UNFUSED = ("standard", "hf", "megatron")
FUSED = ("flash1", "flash2")


# ---- item 6: no writable Numba cache ------------------------------------------------------------

@pytest.fixture(scope="module")
def no_cache_env(tmp_path_factory):
    """A read-only-like copy of the package (its __pycache__ folders are files, so nothing can
    be written there, even as root) and cache locations under a regular file."""
    root = tmp_path_factory.mktemp("nocache")
    shutil.copytree(REPO / "iosim", root / "iosim",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for folder in [root / "iosim"] + [p for p in (root / "iosim").rglob("*") if p.is_dir()]:
        (folder / "__pycache__").write_text("not a folder")
    blocker = root / "a-file"
    blocker.write_text("")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NUMBA_", "IOSIM_")) and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1",
               NUMBA_CACHE_DIR=str(blocker / "cache"), XDG_CACHE_HOME=str(blocker / "xdg"),
               HOME=str(blocker / "home"))
    return root, env


def _warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "Warning" in line]


def test_no_cache_location_help_still_works_with_one_warning(no_cache_env):
    root, env = no_cache_env
    proc = subprocess.run([sys.executable, "-m", "iosim.cli", "--help"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "simulate" in proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 1, proc.stderr
    assert len(_warning_lines(proc.stderr)) == 1
    assert "NumbaCacheWarning" in proc.stderr and "NUMBA_CACHE_DIR" in proc.stderr
    assert str(root / "iosim") in proc.stderr  # the copy was used, not the checkout


def test_no_cache_location_still_simulates_uncached(no_cache_env):
    root, env = no_cache_env
    proc = subprocess.run([sys.executable, "-m", "iosim.cli", "simulate", "--algorithm",
                           "flash2", "--seq-len", "128", "--head-dim", "32", "--json"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["algorithm"] == "flash2"
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "NumbaCacheWarning" in proc.stderr
    assert not list((root / "iosim").rglob("*.nbi"))  # nothing was cached


def test_njit_cached_falls_back_and_warns_once(monkeypatch):
    """In-process: a Numba that cannot cache gives working, uncached functions, one warning."""
    from iosim import _numba

    calls = []

    def fake_njit(*args, cache=False, **options):
        calls.append(cache)
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x'")
        return lambda func: func

    monkeypatch.setattr(_numba, "njit", fake_njit)
    monkeypatch.setattr(_numba, "_cache_works", None)
    monkeypatch.delenv(_numba.WARNED_ENV, raising=False)
    with pytest.warns(NumbaCacheWarning, match=r"compiles its kernels without a cache") as seen:
        first = _numba.njit_cached(lambda x: x + 1)
        second = _numba.njit_cached(inline="always")(lambda x: x * 2)
    assert len(seen) == 1
    assert first(1) == 2 and second(3) == 6
    assert calls == [True, False, False]  # decided once: the second never tries the cache
    assert _numba.cache_works() is False
    assert os.environ[_numba.WARNED_ENV] == "1"  # worker processes inherit the silence


def test_njit_cached_caches_where_it_can(monkeypatch):
    from iosim import _numba

    seen = []
    monkeypatch.setattr(_numba, "njit",
                        lambda cache=False, **o: seen.append(cache) or (lambda f: f))
    monkeypatch.setattr(_numba, "_cache_works", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _numba.njit_cached(lambda: 5)() == 5
    assert seen == [True] and _numba.cache_works() is True


def test_engine_and_timing_use_njit_cached_only():
    for module in ("engine.py", "timing.py"):
        text = (REPO / "iosim" / module).read_text()
        assert "cache=True" not in text, module
        assert "@njit_cached" in text, module


# ---- item 8: strict JSON ------------------------------------------------------------------------

def _refuse_constant(name):
    raise ValueError(f"not strict JSON: {name}")


@pytest.mark.parametrize("algorithm", sorted(iosim.ALGORITHMS))
def test_simulate_json_is_strict_for_every_algorithm(capsys, algorithm):
    code = main(["simulate", "--algorithm", algorithm, "--seq-len", "128", "--head-dim", "32",
                 "--json"])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out, parse_constant=_refuse_constant)
    assert doc["algorithm"] == algorithm and doc["kernels"]


def test_to_dict_turns_non_finite_numbers_into_null():
    from iosim.simulate import KernelResult

    kernel = KernelResult(name="k", arithmetic_intensity=math.inf,
                          times_s={"timed": math.nan, "roofline": 1e-6})
    data = kernel.to_dict()
    assert data["arithmetic_intensity"] is None and data["times_s"]["timed"] is None
    assert data["times_s"]["roofline"] == 1e-6
    result = iosim.simulate("flash2", AttentionShape(1, 1, 64, 32))
    result.totals.arithmetic_intensity = math.inf
    result.kernels[0].arithmetic_intensity = -math.inf
    text = json.dumps(result.to_dict(), allow_nan=False)  # raises on inf/NaN
    doc = json.loads(text)
    assert doc["totals"]["arithmetic_intensity"] is None
    assert doc["kernels"][0]["arithmetic_intensity"] is None


# ---- item 9: float16 overflow of the unfused pipelines ------------------------------------------

def _large_logits(n=64, d=64, scale=300.0, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((n, d)) * s for s in (scale, scale, 1.0))
    return q.astype(np.float16), k.astype(np.float16), v.astype(np.float16)


@pytest.mark.parametrize("algorithm", UNFUSED)
def test_float16_overflow_gives_one_warning_naming_the_tensor(algorithm):
    q, k, v = _large_logits()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = run_attention(q, k, v, algorithm=algorithm)
    assert len(seen) == 1, [str(w.message) for w in seen]  # no NumPy overflow/invalid warnings
    warning = seen[0]
    assert warning.category is TensorOverflowWarning
    assert issubclass(TensorOverflowWarning, RuntimeWarning)
    message = str(warning.message)
    assert message.startswith("S overflowed float16 (max 65504)")
    assert "scores do not fit" in message and "NaN/inf" in message
    assert "as a float16 GPU pipeline's would be" in message
    assert Path(warning.filename).name == Path(__file__).name  # points at the caller's line
    # the behaviour is kept: the float16 pipeline's output is NaN, as on the GPU
    assert out.dtype == np.float16 and not np.isfinite(out).any()


@pytest.mark.parametrize("algorithm", UNFUSED)
def test_float16_overflow_warning_is_a_pytest_warns_match(algorithm):
    q, k, v = _large_logits(n=32, d=32, scale=500.0, seed=1)
    with pytest.warns(TensorOverflowWarning, match=rf"S overflowed float16 \(max 65504\) in "
                                                   rf"{algorithm}'s kernel 'qk_gemm': \d+ of"):
        run_attention(q, k, v, algorithm=algorithm, causal=True)


@pytest.mark.parametrize("algorithm", FUSED)
def test_fused_algorithms_do_not_overflow_float16(algorithm):
    q, k, v = _large_logits()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = run_attention(q, k, v, algorithm=algorithm)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("algorithm", sorted(iosim.ALGORITHMS))
def test_ordinary_float16_inputs_give_no_warning(algorithm):
    q, k, v = _large_logits(scale=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = run_attention(q, k, v, algorithm=algorithm)
    assert np.isfinite(out).all()


def test_float32_overflow_on_chip_is_reported_too():
    q = np.full((16, 8), 1e20, dtype=np.float32)
    with pytest.warns(TensorOverflowWarning, match=r"overflowed float32 .* in flash2's kernel"):
        out = run_attention(q, q, q, algorithm="flash2")
    assert not np.isfinite(out).all()


# ---- item 10: block sizes past N ----------------------------------------------------------------

def test_clipped_block_sizes_are_named_as_given_in_later_errors():
    shape = AttentionShape(1, 1, 4096, 128)
    with pytest.raises(TilingError) as info:
        build_schedule("flash2", shape, 100000, 100000)
    message = str(info.value)
    assert "block_rows=100000 (clipped to N=4096)" in message
    assert "block_cols=100000 (clipped to N=4096)" in message
    assert "block_rows=4096," not in message


def test_only_the_clipped_size_is_annotated():
    shape = AttentionShape(1, 1, 512, 256)
    with pytest.raises(TilingError, match=r"block_rows=1000 \(clipped to N=512\), "
                                          r"block_cols=\d+ needs"):
        build_schedule("flash1", shape, 1000)


def test_unclipped_errors_are_unchanged():
    with pytest.raises(TilingError) as info:
        build_schedule("flash2", AttentionShape(1, 1, 4096, 128), 1024, 1024)
    assert "clipped" not in str(info.value)
    assert "block_rows=1024, block_cols=1024 needs" in str(info.value)


def test_cli_names_the_block_size_the_user_gave(capsys):
    code = main(["simulate", "--algorithm", "standard", "--seq-len", "4096", "--head-dim", "128",
                 "--block-rows", "100000", "--block-cols", "100000"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "block_rows=100000 (clipped to N=4096)" in err


@pytest.mark.parametrize("name, word", [("block_rows", "query rows per block"),
                                        ("block_cols", "key/value columns per block")])
def test_block_size_messages_say_rows_or_columns(name, word):
    kwargs = {"block_rows": 2, "block_cols": 2, name: 0}
    with pytest.raises(IosimError, match=rf"{name} must be a positive integer \({word}"):
        build_schedule("flash2", AttentionShape(1, 1, 10, 4), kwargs["block_rows"],
                       kwargs["block_cols"])
    if name == "block_cols":
        with pytest.raises(IosimError) as info:
            build_schedule("flash2", AttentionShape(1, 1, 10, 4), 2, 0)
        assert "rows" not in str(info.value)


# ---- item 10: --hardware given a folder or an implausible figure --------------------------------

def test_cli_hardware_folder_is_called_a_folder(tmp_path, capsys):
    code = main(["simulate", "--algorithm", "flash2", "--seq-len", "64", "--head-dim", "32",
                 "--hardware", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is a folder" in err and "does not exist" not in err
    assert ".toml" in err and "h100-measured" in err


def _preset_text() -> str:
    return (REPO / "iosim" / "presets" / "h100-measured.toml").read_text(encoding="utf-8")


def _spec_with(tmp_path, section, key, value) -> Path:
    """The h100-measured preset with ``key = value`` in ``[section]`` (added if absent)."""
    out, current, done = [], None, False
    for line in _preset_text().splitlines():
        header = re.match(r"\s*\[([^\]]+)\]\s*$", line)
        if header:
            current = header.group(1).strip()
        if current == section and re.match(rf"\s*{re.escape(key)}\s*=", line):
            line, done = f"{key} = {value}", True
        out.append(line)
        if header and current == section and key not in _preset_text():
            out.append(f"{key} = {value}")
            done = True
    assert done
    path = tmp_path / "gpu.toml"
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def test_cli_huge_sm_count_gets_the_range_not_bytes(tmp_path, capsys):
    path = _spec_with(tmp_path, "compute", "sm_count", "1e300")
    code = main(["simulate", "--algorithm", "flash2", "--seq-len", "64", "--head-dim", "32",
                 "--hardware", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "sm_count must be a positive finite number from 1 to 10000 SMs, got 1e+300" in err
    assert "bytes" not in err


def test_cli_denormal_bandwidth_is_refused_not_printed_as_inf(tmp_path, capsys):
    path = _spec_with(tmp_path, "hbm", "bandwidth_bytes_per_s", "5e-324")
    code = main(["simulate", "--algorithm", "flash2", "--seq-len", "64", "--head-dim", "32",
                 "--hardware", str(path), "--json"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert re.search(r"bandwidth_bytes_per_s must be a positive finite number from 1e\+09 to "
                     r"1e\+16 bytes/s, got 5e-324", captured.err)


def test_cli_unknown_key_names_it_and_the_allowed_ones(tmp_path, capsys):
    path = _spec_with(tmp_path, "hbm", "bandwdith_typo", "5")
    code = main(["simulate", "--algorithm", "flash2", "--seq-len", "64", "--head-dim", "32",
                 "--hardware", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown key 'bandwdith_typo'; allowed: capacity_bytes, bandwidth_bytes_per_s" in err
