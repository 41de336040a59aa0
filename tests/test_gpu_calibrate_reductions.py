"""The fp32 reduction microbenchmarks of gpu/calibrate.py (``--reductions``, results["l2_reduction"]): buffer sizing,
byte counting, the TMA tensor map, argument parsing and the merge, on the CPU; the measurement itself on a GPU."""
import json
import math
import re
from pathlib import Path

import pytest

from gpu import calibrate as CAL
from gpu import flash3_bwd as FB
from gpu import kernels as K

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "experiments" / "data" / "h100"
SRC = (ROOT / "gpu" / CAL.REDUCTION_SOURCE).read_text()


def _doc(date, results, device="X"):
    return {"schema": "iosim-gpu-calibration/1", "date": date, "device": {"name": device}, "settings": {},
            "results": results}


def test_buffer_sizes_give_every_thread_the_same_work():
    sm, l2 = 132, 50 * 2 ** 20
    nth = sm * CAL.RED_CTAS_PER_SM * CAL.RED_THREADS
    n = CAL.red_buffer_floats(l2 // 4, nth)
    for v in CAL.RED_FORMS.values():
        assert (n // v) % nth == 0 and n % v == 0
    assert 0.2 * l2 < 4 * n < 0.3 * l2
    assert CAL.red_buffer_floats(10, nth) == 4 * nth          # at least one vector a thread
    totals = [sm * c * w for c, w in CAL.TMA_ISSUERS_PER_SM.values()]
    nbox = CAL.tma_buffer_boxes(l2 // 4, totals)
    assert all(nbox % t == 0 for t in totals) and nbox % 4 == 0
    assert 0.2 * l2 < nbox * CAL.TMA_BOX_BYTES < 0.3 * l2
    assert CAL.tma_buffer_boxes(1, [132]) == math.lcm(4, 132)


def test_reduction_bytes_are_the_fp32_data_added():
    assert CAL.reduction_bytes(1000, 3) == 12000
    assert CAL.reduction_bytes(CAL.REDUCTION_DRAM_BYTES // 4, 1) == CAL.REDUCTION_DRAM_BYTES
    assert CAL.reduction_bytes(10, 2, launches=5) == 400
    # the TMA sweep adds exactly the tensor: boxes x box bytes = rows x 128 floats x 4
    rows = 25344
    assert rows // CAL.TMA_BOX_ROWS * 4 * CAL.TMA_BOX_BYTES == CAL.reduction_bytes(rows * CAL.TMA_COLS, 1)


def test_tma_tensor_map_is_flash3_dq_map_in_two_dimensions():
    f = CAL.tma_reduce_tensor_map_fields(1024)
    dq = FB.dq_tensor_map_fields(1, 1024, 128)
    assert f["rank"] == 2 and f["global_dim"] == (128, 1024) and f["global_strides_bytes"] == (512,)
    assert f["box_dim"] == (32, 64) and f["element_strides"] == (1, 1) and f["box_bytes"] == 8192
    for k in ("data_type", "swizzle", "interleave", "l2_promotion", "oob_fill"):
        assert f[k] == dq[k]
    assert f["data_type"] == FB.CU_TENSOR_MAP_DATA_TYPE_FLOAT32
    big = CAL.tma_reduce_tensor_map_fields(CAL.REDUCTION_DRAM_BYTES // 512)
    assert big["global_dim"][1] * 512 == CAL.REDUCTION_DRAM_BYTES and big["global_dim"][1] < 2 ** 31


def test_tma_shared_memory_fits_every_configuration():
    for c, w in CAL.TMA_ISSUERS_PER_SM.values():
        assert c * (CAL.tma_smem_bytes(w) + 1024) <= 228 * 1024 and 128 * w <= 1024
    assert CAL.TMA_ISSUERS_PER_SM[CAL.TMA_CTAS_PER_SM * CAL.TMA_WARPGROUPS] == (CAL.TMA_CTAS_PER_SM,
                                                                                 CAL.TMA_WARPGROUPS)


def test_reduction_source_matches_the_host_side():
    src = K._source(CAL.REDUCTION_SOURCE, {"DEPTH": CAL.TMA_DEPTH})
    assert '#include "' not in src and "#pragma once" not in src     # self-contained for NVRTC
    for name in (*CAL.RED_FORMS, CAL.TMA_KEY):
        assert re.search(rf'extern "C" __global__ void {name}\(', SRC), name
    assert "red.global.add.f32" in SRC and "red.global.add.v2.f32" in SRC and "red.global.add.v4.f32" in SRC
    assert "cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group" in SRC
    assert re.search(r"#define DEPTH (\d+)", SRC).group(1) == str(CAL.TMA_DEPTH)
    assert "constexpr int TMA_BOX_BYTES = 64 * 32 * 4;" in SRC and "constexpr int TMA_TILE_BOXES = 2;" in SRC
    assert CAL.TMA_TILE_BYTES == 2 * CAL.TMA_BOX_BYTES
    assert "TmaMap" not in SRC.split("#include")[0]                  # the struct comes from hopper.cuh


def test_parser_and_flag_conflicts():
    a = CAL.build_parser().parse_args(["--reductions", "--out", "x.json", "--raw-out", "y.json"])
    assert a.reductions and a.out == "x.json" and a.raw_out == "y.json" and a.only is None
    a = CAL.build_parser().parse_args([])
    assert not a.reductions and a.raw_out is None and a.out == "experiments/data/h100/calibration.json"
    for bad in (["--reductions", "--only", "rates"], ["--reductions", "--merge-from", "n.json"], ["--raw-out", "y"]):
        with pytest.raises(SystemExit):
            CAL.main(bad)


def _fake_reductions():
    r = {k: {"bytes_per_s": {"l2_resident": 2e12, "dram": 1e12}} for k in (*CAL.RED_FORMS, CAL.TMA_KEY)}
    return {CAL.REDUCTION_KEY: dict(r, checked=True)}


def test_reductions_flag_merges_into_out(tmp_path, monkeypatch, capsys):
    out, raw = tmp_path / "cal.json", tmp_path / "raw.json"
    old = _doc("old", {"l2_read": {"bytes_per_s": 7e12}, "d2d_copy": {"bytes_per_s": 3e12}}, "A")
    out.write_text(json.dumps(old))
    calls = []

    def fake(**kw):
        calls.append(kw)
        return _doc("new", _fake_reductions(), "B")

    monkeypatch.setattr(CAL, "calibrate", fake)
    assert CAL.main(["--reductions", "--out", str(out), "--raw-out", str(raw)]) == 0
    assert calls == [{"rates": False, "latencies": False, "reductions": True}]
    doc = json.loads(out.read_text())
    assert doc["results"]["l2_read"] == {"bytes_per_s": 7e12} and doc["date"] == "old"     # kept
    assert doc["results"][CAL.REDUCTION_KEY]["red_v4_f32"]["bytes_per_s"]["l2_resident"] == 2e12
    assert doc["settings"]["added_results"][-1]["keys"] == [CAL.REDUCTION_KEY]
    assert json.loads(raw.read_text())["results"].keys() == {CAL.REDUCTION_KEY}
    text = capsys.readouterr().out
    assert "red_v4_f32" in text and "tma_reduce_f32" in text and "l2_read" in text and "7.000 TB/s" in text
    # a second run: the first values stay, the new ones go to the reruns
    assert CAL.main(["--reductions", "--out", str(out)]) == 0
    doc2 = json.loads(out.read_text())
    assert doc2["results"][CAL.REDUCTION_KEY] == doc["results"][CAL.REDUCTION_KEY]
    assert CAL.REDUCTION_KEY in doc2["reruns_of_existing_results"][-1]["results"]


def test_merge_into_missing_file_writes_the_new_document(tmp_path):
    out = tmp_path / "sub.json"
    new = _doc("new", _fake_reductions())
    assert CAL.merge_into_file(str(out), new) == new and json.loads(out.read_text()) == new


def test_reduction_summary_lines():
    assert CAL.reduction_summary_lines({}) == []
    lines = CAL.reduction_summary_lines(dict(_fake_reductions(), l2_read={"bytes_per_s": 7.5e12}))
    assert len(lines) == 5 and lines[0].startswith("red_f32") and "2.000 TB/s" in lines[0] and "1.000" in lines[0]
    assert "l2_read" in lines[-1] and "7.500" in lines[-1]


def test_committed_calibration_has_the_reduction_results():
    doc = json.loads((DATA / "calibration.json").read_text())
    red = doc["results"][CAL.REDUCTION_KEY]
    assert red["checked"] is True
    for k, v in CAL.RED_FORMS.items():
        e = red[k]
        assert e["bytes_per_instruction"] == 4 * v and e["grid"] > 0 and e["threads"] == CAL.RED_THREADS
        assert e["l2_resident"]["bytes_added"] == e["l2_resident"]["buffer_bytes"] * e["l2_resident"]["passes"]
        assert e["dram"]["buffer_bytes"] == CAL.REDUCTION_DRAM_BYTES
    e = red[CAL.TMA_KEY]
    assert e["box"]["bytes"] == CAL.TMA_BOX_BYTES and e["dram"]["boxes"] * CAL.TMA_BOX_BYTES == CAL.REDUCTION_DRAM_BYTES
    for k in (*CAL.RED_FORMS, CAL.TMA_KEY):
        b = red[k]["bytes_per_s"]
        assert 1e10 < b["dram"] and 1e10 < b["l2_resident"] < 1e14, k
        assert red[k]["method"]
    # existing results untouched by the merge; the file still records the device
    assert "l2_read" in doc["results"] and "d2d_copy" in doc["results"] and doc["device"]["driver"]
    assert CAL.REDUCTION_KEY in doc["settings"]["added_results"][-1]["keys"]


@pytest.mark.gpu
def test_reduction_benchmarks_on_gpu():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
        major = cp.cuda.Device(0).compute_capability
    except Exception:  # noqa: BLE001
        pytest.skip("no CUDA device")
    if int(major) < 90:
        pytest.skip("needs sm_90 (red.global.add.v4.f32, TMA)")
    from gpu import bench as BN

    r = CAL.reduction_benchmarks(BN.device_info(), log=lambda *a: None, l2_passes=4, reps=2, dram_reps=1)
    red = r[CAL.REDUCTION_KEY]
    assert red["checked"] and all(red[k]["bytes_per_s"]["l2_resident"] > 0 for k in (*CAL.RED_FORMS, CAL.TMA_KEY))
