"""The iosim command line: JSON output, tables, and one-line errors with exit status 2."""
import json
import subprocess
import sys

import pytest

import iosim
from iosim.cli import main

COUNTS = {"hbm_read_bytes", "hbm_write_bytes", "l2_read_bytes", "l2_write_bytes",
          "sram_read_bytes", "sram_write_bytes", "flops_tensor", "flops_scalar"}
BASE = ["simulate", "--batch", "2", "--heads", "2", "--seq-len", "256", "--head-dim", "64"]


@pytest.mark.parametrize("algorithm", list(iosim.ALGORITHMS))
@pytest.mark.parametrize("model", ["two-level", "l2"])
def test_json_has_the_promised_keys(algorithm, model, capsys):
    assert main(BASE + ["--algorithm", algorithm, "--model", model, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"algorithm", "model", "hardware", "block_rows", "block_cols", "totals",
            "kernels"} <= set(out)
    assert out["algorithm"] == algorithm and out["model"] == model
    assert out["hardware"] == "h100-measured"
    assert COUNTS | {"predicted_time_s", "arithmetic_intensity", "bound"} <= set(out["totals"])
    assert out["time_model"] == "timed"
    for kernel in out["kernels"]:
        assert COUNTS | {"name", "predicted_time_s", "bound", "occupancy", "time_breakdown",
                         "timed_limiter"} <= set(kernel)
        assert kernel["bound"] in ("memory", "compute")
        assert kernel["predicted_time_s"] == kernel["times_s"]["timed"]
        assert kernel["times_s"]["roofline"] > 0
        assert kernel["occupancy"]["warps_per_sm"] >= 1
    for key in COUNTS:
        assert out["totals"][key] == sum(k[key] for k in out["kernels"])
    # matmul FLOPs of QKᵀ and PV: 4·B·H·N²·d
    assert out["totals"]["flops_tensor"] == 4 * 2 * 2 * 256 ** 2 * 64


def test_l2_model_never_reads_more_than_it_requests(capsys):
    main(BASE + ["--algorithm", "flash2", "--json"])
    totals = json.loads(capsys.readouterr().out)["totals"]
    assert 0 < totals["hbm_read_bytes"] <= totals["l2_read_bytes"]


def test_time_model_flag_switches_the_prediction(capsys):
    assert main(BASE + ["--algorithm", "flash2", "--json", "--time-model", "roofline",
                        "--rows-per-warp", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    (kernel,) = out["kernels"]
    assert out["time_model"] == "roofline"
    assert kernel["predicted_time_s"] == kernel["times_s"]["roofline"]
    assert kernel["occupancy"]["warps_per_cta"] == out["block_rows"] // 32


def test_explore_warns_when_pairs_differ_in_occupancy(capsys):
    argv = ["explore", "--algorithm", "flash2", "--seq-len", "256", "--head-dim", "128",
            "--workers", "1", "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "warps/SM" in captured.out
    assert "differ in occupancy" in captured.err


@pytest.mark.parametrize("out, message", [("", "empty"), ("/dev/null", "not a regular file"),
                                          ("/nonexistent-folder/x.csv", "does not exist")])
def test_explore_refuses_an_unwritable_out_before_ranking(out, message, capsys):
    argv = ["explore", "--algorithm", "flash2", "--seq-len", "256", "--head-dim", "64",
            "--workers", "1", "--no-progress", "--out", out]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ranked, nothing printed
    assert message in captured.err and captured.err.count("\n") == 1


def test_table_lists_every_kernel(capsys):
    assert main(BASE + ["--algorithm", "hf", "--causal"]) == 0
    out = capsys.readouterr().out
    for name in ("qk_gemm", "scale", "mask", "softmax", "pv_gemm", "total"):
        assert name in out


@pytest.mark.parametrize("args, message", [
    (["--seq-len", "0"], "seq_len must be a positive integer"),
    (["--head-dim", "-3"], "head_dim must be a positive integer"),
    (["--hardware", "tpu-v9"], "unknown hardware preset 'tpu-v9'"),
    (["--block-rows", "0"], "block_rows must be a positive integer"),
    (["--seq-len", "4096", "--block-rows", "1024", "--block-cols", "1024"],
     "bytes are available"),
    (["--sram-bytes", "0"], "sram_bytes must be a positive integer"),
    (["--algorithm", "flash9"], "invalid choice: 'flash9'"),
    (["--seq-len", "abc"], "invalid int value"),
    (["--time-model", "cycles"], "invalid choice: 'cycles'"),
    (["--rows-per-warp", "0"], "rows_per_warp must be a positive integer"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    argv = ["simulate", "--algorithm", "flash2", "--seq-len", "256", "--head-dim", "64"]
    for flag, value in zip(args[::2], args[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    with pytest.raises(SystemExit) if "invalid" in message else _no_raise():
        code = main(argv)
        assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_malformed_toml_is_refused(tmp_path, capsys):
    spec = tmp_path / "broken.toml"
    spec.write_text('name = "x"\n[hbm\n')
    assert main(BASE + ["--algorithm", "flash2", "--hardware", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "not valid TOML" in err and err.count("\n") == 1


def test_console_script_runs_in_a_new_process():
    proc = subprocess.run([sys.executable, "-m", "iosim", "simulate", "--algorithm", "flash2",
                           "--seq-len", "0", "--head-dim", "64"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "iosim: error: seq_len must be a positive integer, got 0"
