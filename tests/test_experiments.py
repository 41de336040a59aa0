"""Smoke tests: every experiment script runs on its quick setting and leaves its files, and
``python -m experiments`` writes a report linking them."""
import csv
import importlib
import sys
import types

import pytest

from experiments import SCRIPTS, Section
from experiments import __main__ as runner

EXPECTED_FILES = {
    "figure2_table": ["figure2_table.csv"],
    "figure2_blocksize": ["figure2_blocksize.csv", "figure2_blocksize.png"],
    "sram_sweep": ["sram_sweep.csv", "sram_sweep.png"],
    "seq_len_sweep": ["seq_len_sweep.csv", "seq_len_sweep.png"],
    "roofline": ["roofline_points.csv", "roofline_a100-40gb.png",
                 "roofline_h100-measured.png"],
    "timeline": ["timeline.csv", "timeline.png"],
}


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Run every script once on its quick setting into one folder."""
    out = tmp_path_factory.mktemp("results")
    sections = {name: runner.run_script(name, out, quick=True) for name in SCRIPTS}
    return out, sections


def test_every_script_is_listed():
    assert set(SCRIPTS) == set(EXPECTED_FILES)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_writes_its_files_and_sections(quick_results, name):
    out, sections = quick_results
    for filename in EXPECTED_FILES[name]:
        path = out / filename
        assert path.is_file() and path.stat().st_size > 0, filename
        if filename.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sections[name] and all(isinstance(s, Section) for s in sections[name])
    for s in sections[name]:
        for fig, _ in s.figures:
            assert (out / fig).is_file()
        for data in s.data:
            assert (out / data).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_figure2_table_rows(quick_results):
    out, sections = quick_results
    rows = _csv(out / "figure2_table.csv")
    ours = {(r["algorithm"], r["model"]) for r in rows if r["source"].startswith("iosim")}
    assert ours == {(a, m) for a in ("standard", "flash1", "flash2")
                    for m in ("two-level", "l2")}
    paper = [r for r in rows if r["source"] == "paper"]
    assert [(r["gflops"], r["hbm_gb"], r["runtime_ms"]) for r in paper] == [
        ("66.6", "40.3", "41.7"), ("75.2", "4.4", "7.3")]
    assert "| standard |" in sections["figure2_table"][0].body
    by = {(r["algorithm"], r["model"]): int(r["hbm_bytes"]) for r in rows
          if r["source"].startswith("iosim")}
    assert by[("flash2", "two-level")] < by[("standard", "two-level")]


def test_blocksize_rows(quick_results):
    out, _ = quick_results
    rows = _csv(out / "figure2_blocksize.csv")
    series = {r["series"] for r in rows}
    assert len(series) == 3
    f1 = sorted((int(r["block_cols"]), int(r["hbm_bytes"])) for r in rows
                if r["algorithm"] == "flash1" and r["model"] == "two-level")
    assert [b for _, b in f1] == sorted((b for _, b in f1), reverse=True)  # falls with Bc


def test_sram_sweep_falls_to_the_lower_bound(quick_results):
    out, _ = quick_results
    rows = _csv(out / "sram_sweep.csv")
    f1 = [r for r in rows if r["series"].startswith("flash1")]
    hbm = [int(r["hbm_bytes"]) for r in f1]
    assert hbm == sorted(hbm, reverse=True) and hbm[0] > hbm[-1]
    assert all(int(r["hbm_bytes"]) >= int(r["lower_bound_bytes"]) for r in rows)


def test_seq_len_sweep_rows(quick_results):
    out, _ = quick_results
    rows = _csv(out / "seq_len_sweep.csv")
    algs = {"hf", "megatron", "standard", "flash1", "flash2"}
    assert {r["algorithm"] for r in rows} == algs
    assert {r["causal"] for r in rows} == {"True", "False"}
    assert len(rows) == len(algs) * 2 * 2  # two lengths in the quick setting


def test_roofline_points(quick_results):
    out, _ = quick_results
    rows = _csv(out / "roofline_points.csv")
    for hw in ("a100-40gb", "h100-measured"):
        names = {r["name"] for r in rows if r["hardware"] == hw}
        assert {"flash2:flash2_fwd", "standard:qk_gemm", "hf:softmax", "relu",
                "matmul", "batch_norm"} <= names


def test_timeline_puts_every_cta_on_an_sm_without_overlap(quick_results):
    out, _ = quick_results
    rows = _csv(out / "timeline.csv")
    assert {(r["block_rows"], r["block_cols"]) for r in rows} == {("128", "64"), ("64", "128")}
    for pair in {(r["block_rows"], r["block_cols"]) for r in rows}:
        mine = [r for r in rows if (r["block_rows"], r["block_cols"]) == pair]
        assert all(float(r["end_s"]) > float(r["start_s"]) >= 0 for r in mine)
        # causal and longest first: the first CTA visits the most K/V blocks
        assert int(mine[0]["kv_blocks"]) == max(int(r["kv_blocks"]) for r in mine)


def test_runner_writes_report(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "available_scripts", lambda: ["figure2_table", "fake_validation"])
    fake = types.ModuleType("experiments.fake_validation")

    def main(results_dir):  # the validation convention: no quick argument
        (results_dir / "fake.csv").write_text("a\n1\n")
        return ["## Fake validation\n\nall good"]

    fake.main = main
    monkeypatch.setitem(sys.modules, "experiments.fake_validation", fake)
    assert runner.main([str(tmp_path), "--quick"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "Figure 2 (left)" in report and "figure2_table.csv" in report
    assert "## Fake validation" in report and "all good" in report
    assert "Quick run" in report


def test_runner_reports_a_failing_script(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "available_scripts", lambda: ["broken"])
    broken = types.ModuleType("experiments.broken")

    def main(results_dir, quick=None):
        raise RuntimeError("it broke")

    broken.main = main
    monkeypatch.setitem(sys.modules, "experiments.broken", broken)
    assert runner.main([str(tmp_path), "--quick"]) == 1
    assert "it broke" in (tmp_path / "report.md").read_text()


def test_validation_hook_is_found_when_present():
    names = runner.available_scripts()
    assert names[: len(SCRIPTS)] == list(SCRIPTS)
    has_validation = importlib.util.find_spec("experiments.validation") is not None
    assert ("validation" in names) == has_validation


def test_quick_switch_from_environment(monkeypatch):
    from experiments import is_quick

    monkeypatch.setenv("IOSIM_QUICK", "1")
    assert is_quick() is True and is_quick(False) is False
    monkeypatch.setenv("IOSIM_QUICK", "0")
    assert is_quick() is False
