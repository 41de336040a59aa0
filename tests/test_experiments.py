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
    "backward_tradeoff": ["backward_tradeoff.csv", "backward_tradeoff.png"],
    "design_space": ["design_space.csv", "design_space.png"],
    "roofline": ["roofline_points.csv", "roofline_a100-40gb.png",
                 "roofline_h100-measured.png"],
    "timeline": ["timeline.csv", "timeline.png"],
    "inference": ["inference_decode.csv", "inference_gqa.csv", "inference.png"],
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


def test_backward_tradeoff_rows(quick_results):
    out, sections = quick_results
    rows = _csv(out / "backward_tradeoff.csv")
    assert {(r["hardware"], r["model"]) for r in rows} == {
        (h, m) for h in ("a100-40gb", "h100-measured") for m in ("two-level", "l2")}
    for r in rows:
        # flash2 recomputes (more FLOPs) and saves bytes; the columns are the differences
        assert int(r["extra_flops"]) == int(r["flash2_flops"]) - int(r["standard_flops"]) > 0
        assert int(r["hbm_bytes_saved"]) == \
            int(r["standard_hbm_bytes"]) - int(r["flash2_hbm_bytes"]) > 0
        assert int(r["seq_len"]) * int(r["batch_heads"]) == 2048  # B·H·N fixed (quick)
    two_level = sorted((int(r["seq_len"]), int(r["hbm_bytes_saved"]), int(r["extra_flops"]))
                       for r in rows if r["hardware"] == "a100-40gb" and r["model"] == "two-level")
    assert len(two_level) == 3
    # at fixed B·H·N both grow with N
    assert all(a[1] < b[1] and a[2] < b[2] for a, b in zip(two_level, two_level[1:]))
    assert "saved GB" in sections["backward_tradeoff"][0].body


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


# ---- figures: one style per algorithm, readable labels (issue 13) ----------------------------


def _capture_figures(monkeypatch, module):
    """Keep every figure ``module`` saves (its ``save_figure``), still writing the file."""
    saved = []
    original = module.save_figure

    def keep(fig, path, *args, **kwargs):
        saved.append((fig, path))
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(module, "save_figure", keep)
    return saved


def _legend_texts(fig):
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def test_one_colour_and_marker_per_algorithm():
    from experiments._common import COLORS, DRAW_ORDER, MARKERS, OPEN, draw_order

    assert set(COLORS) == set(MARKERS) == set(DRAW_ORDER)
    assert len(set(COLORS.values())) == len(COLORS)
    assert len(set(MARKERS.values())) == len(MARKERS)
    # standard shares kernels with hf and megatron: drawn after them, with an open marker
    order = draw_order(["standard", "hf", "megatron", "flash2"])
    assert order[-1] == "standard" and "standard" in OPEN


def test_validation_figures_use_the_common_style(tmp_path, monkeypatch):
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    from experiments import validation
    from experiments._common import COLORS, MARKERS

    rows = []
    for i, alg in enumerate(("standard", "hf", "megatron", "flash1", "flash2")):
        for k in range(3):
            rows.append({"algorithm": alg, "measured_time_s": 1e-3 * (k + 1),
                         "predicted_time_s": 1.1e-3 * (k + 1),
                         "predicted_time_roofline_s": 0.9e-3 * (k + 1),
                         "measured_dram_bytes": 1e8 * (k + 1), "flops": 1e9 * (i + 1)})
    closed = []
    monkeypatch.setattr(plt, "close", lambda fig=None: closed.append(fig))
    validation._scatter(tmp_path / "t.png", rows, "measured_time_s",
                        [("predicted_time_s", "a"), ("predicted_time_roofline_s", "b")], "t")
    validation._roofline(tmp_path / "r.png", rows, validation.HARDWARE)
    assert (tmp_path / "t.png").is_file() and (tmp_path / "r.png").is_file()
    for fig in closed:
        for ax in fig.axes:
            collections = [c for c in ax.collections if c.get_label().split(" ")[0] in COLORS]
            by_alg = {c.get_label().split(" ")[0]: c for c in collections}
            assert set(by_alg) == {"standard", "hf", "megatron", "flash1", "flash2"}
            for alg, c in by_alg.items():
                colour = c.get_edgecolor()[0] if alg == "standard" else c.get_facecolor()[0]
                assert mcolors.to_hex(colour) == COLORS[alg], alg
            # standard on top, open, so the hf / megatron kernels it covers stay visible
            assert max(by_alg.values(), key=lambda c: c.get_zorder()) is by_alg["standard"]
            assert len(by_alg["standard"].get_facecolor()) == 0 or \
                by_alg["standard"].get_facecolor()[0][3] == 0
    assert len(MARKERS) == len(set(MARKERS.values()))


def test_roofline_numbers_match_across_plots_and_labels_do_not_collide(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Annotation

    from experiments import roofline

    saved = _capture_figures(monkeypatch, roofline)
    roofline.main(tmp_path, quick=True)
    assert len(saved) == len(roofline.HARDWARE)
    rows = _csv(tmp_path / "roofline_points.csv")
    for r in rows:
        for key in ("flops", "hbm_bytes", "arithmetic_intensity", "predicted_time_s",
                    "attained_flops_per_s"):
            r[key] = float(r[key])
    entries = roofline.numbering(rows)
    assert [e["number"] for e in entries] == list(range(1, len(entries) + 1))
    keys = []
    for fig, path in saved:
        ax, key_ax = fig.axes
        key_text = key_ax.texts[0].get_text()
        keys.append([line.split("[")[0].strip() for line in key_text.splitlines()
                     if line[:2].strip().isdigit()])
        assert "TFLOP/s" in ax.get_ylabel()
        # x axis: the data with a margin, not decades past it
        hw = path.name[len("roofline_"):-len(".png")]
        mine = [r for r in rows if r["hardware"] == hw and r["attained_flops_per_s"] > 0
                and r["hbm_bytes"] > 0]
        lo, hi = ax.get_xlim()
        assert lo < min(r["arithmetic_intensity"] for r in mine) < 10 * lo
        assert hi / 10 < max(r["arithmetic_intensity"] for r in mine) < hi
        # the number labels overlap no marker and no other label
        canvas = FigureCanvasAgg(fig)  # the saved figure was closed: draw it again
        canvas.draw()
        renderer = canvas.get_renderer()
        labels = [t for t in ax.texts if isinstance(t, Annotation)
                  and t.get_text().replace(",", "").isdigit()]
        assert labels
        boxes = [t.get_window_extent(renderer) for t in labels]
        for i, a in enumerate(boxes):
            assert not any(a.overlaps(b) for b in boxes[i + 1:])
        markers = [p for c in ax.collections for p in c.get_offsets()]
        for box in boxes:
            for x, y in ax.transData.transform(markers):
                assert not box.contains(x, y)
        # the ridge line stops at the roof, below its label
        ridge_label = next(t for t in ax.texts if t.get_text().startswith("ridge point"))
        ridge_box = ridge_label.get_window_extent(renderer)
        for line in ax.lines:
            xs, ys = line.get_xdata(), line.get_ydata()
            if len(xs) == 2 and xs[0] == xs[1]:
                top = ax.transData.transform((xs[0], max(ys)))[1]
                x_px = ax.transData.transform((xs[0], max(ys)))[0]
                if ridge_box.x0 <= x_px <= ridge_box.x1:
                    assert top <= ridge_box.y0
    # the same op numbering in both plots
    assert keys[0] == keys[1]


def test_blocksize_figure_has_no_minor_tick_labels_and_one_legend(tmp_path, monkeypatch):
    from matplotlib.ticker import NullFormatter

    from experiments import figure2_blocksize

    saved = _capture_figures(monkeypatch, figure2_blocksize)
    figure2_blocksize.main(tmp_path, quick=True)
    (fig, _), = saved
    for ax in fig.axes:
        assert isinstance(ax.yaxis.get_minor_formatter(), NullFormatter)
        assert ax.get_legend() is None  # the series legend is the figure's, for every panel
        assert "model" in ax.get_title()
    assert set(_legend_texts(fig)) == set(figure2_blocksize.SERIES)


def test_sram_sweep_legend_in_bytes_and_report_matches_the_curves(tmp_path, monkeypatch):
    from experiments import sram_sweep

    saved = _capture_figures(monkeypatch, sram_sweep)
    (section,) = sram_sweep.main(tmp_path, quick=True)
    (fig, _), = saved
    bound = next(t for t in _legend_texts(fig) if t.startswith("lower bound"))
    rows = _csv(tmp_path / "sram_sweep.csv")
    lower = int(rows[0]["lower_bound_bytes"])
    assert "bytes" in bound and f"{lower / 1e9:.3g} GB" in bound
    flash2 = [int(r["hbm_bytes"]) for r in rows if r["series"] == "flash2 (default blocks)"]
    if flash2[0] > flash2[-1]:  # a falling curve is not called flat
        assert "its traffic is the same" not in section.body
        assert "traffic falls" in section.body


def test_figure2_table_has_forward_plus_backward_on_both_presets(quick_results):
    out, sections = quick_results
    rows = [r for r in _csv(out / "figure2_table.csv") if r["source"] == "iosim (fwd+bwd)"]
    assert {(r["hardware"], r["algorithm"], r["model"]) for r in rows} == {
        (hw, a, m) for hw in ("a100-40gb", "h100-measured") for a in ("standard", "flash2")
        for m in ("two-level", "l2")}
    by = {(r["hardware"], r["algorithm"], r["model"]): r for r in rows}
    fwd = {(r["algorithm"], r["model"]): r for r in _csv(out / "figure2_table.csv")
           if r["source"] == "iosim (fwd)"}
    for hw in ("a100-40gb", "h100-measured"):
        # far fewer HBM bytes for flash2, and the backward adds to the forward's bytes
        assert int(by[(hw, "flash2", "two-level")]["hbm_bytes"]) * 2 < int(
            by[(hw, "standard", "two-level")]["hbm_bytes"])
    assert int(by[("a100-40gb", "standard", "two-level")]["hbm_bytes"]) > int(
        fwd[("standard", "two-level")]["hbm_bytes"])
    assert "forward plus backward" in sections["figure2_table"][0].body


def test_design_space_keeps_the_fastest_pair_per_point(quick_results):
    from experiments.design_space import grid

    out, _ = quick_results
    rows = _csv(out / "design_space.csv")
    g = grid(True)
    assert {(int(r["sram_kib_per_sm"]), int(r["l2_mib"]), float(r["hbm_tb_s"])) for r in rows} \
        == {(s, l2, bw) for s in g["sram_kib"] for l2 in g["l2_mib"] for bw in g["hbm_tb_s"]}
    assert all(int(r["block_rows"]) in g["blocks"] for r in rows)
    # more shared memory never makes the best pair slower (it only adds choices)
    for l2 in g["l2_mib"]:
        times = [float(r["predicted_time_s"]) for r in sorted(
            (r for r in rows if int(r["l2_mib"]) == l2), key=lambda r: int(r["sram_kib_per_sm"]))]
        assert times == sorted(times, reverse=True) or len(set(times)) == 1 or \
            times[-1] <= times[0]


def test_inference_decode_is_memory_bound_and_grouping_shrinks_kv_bytes(quick_results):
    out, _ = quick_results
    decode = _csv(out / "inference_decode.csv")
    assert decode and all(r["bound"] == "memory" for r in decode)
    longest = max(int(r["kv_seq_len"]) for r in decode)
    for b in {r["batch"] for r in decode}:
        times = {int(r["num_splits"]): float(r["predicted_time_s"]) for r in decode
                 if r["batch"] == b and int(r["kv_seq_len"]) == longest}
        # the heuristic splits only when B·H_kv CTAs leave SMs idle, and on a long cache it
        # pays (on a short one the combine kernel can cost more than the split saves)
        assert min(times, key=times.get) == max(times)
    gqa = _csv(out / "inference_gqa.csv")
    flash2 = sorted((int(r["group_size"]), int(r["hbm_bytes"])) for r in gqa
                    if r["algorithm"] == "flash2")
    assert [b for _, b in flash2] == sorted((b for _, b in flash2), reverse=True)
    assert flash2[-1][1] < flash2[0][1] * 0.75
