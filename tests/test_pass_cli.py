"""--pass through the API, the CLI and the explorer: the backward's kernels follow the
forward's, totals add up, and the paper's trade (more FLOPs, far fewer HBM bytes) shows."""
import json

import pytest

import iosim
from iosim.cli import main
from iosim.explore import explore

SHAPE = iosim.AttentionShape(2, 4, 512, 64)


def test_both_is_the_forward_then_the_backward():
    fwd = iosim.simulate("flash2", SHAPE, block_rows=64, block_cols=64)
    bwd = iosim.simulate("flash2", SHAPE, block_rows=64, block_cols=64, pass_="backward")
    both = iosim.simulate("flash2", SHAPE, block_rows=64, block_cols=64, pass_="both")
    assert (fwd.pass_, bwd.pass_, both.pass_) == ("forward", "backward", "both")
    assert [k.name for k in both.kernels] == [k.name for k in fwd.kernels + bwd.kernels]
    assert {k.phase for k in bwd.kernels} == {"backward"}
    assert both.totals.flops == fwd.totals.flops + bwd.totals.flops
    # the backward's matmuls: S recomputed, dV, dP, dQ, dK — 5 products of 2·N²·d each
    n, d, bh = SHAPE.seq_len, SHAPE.head_dim, SHAPE.batch_heads
    assert bwd.totals.flops_tensor == 5 * 2 * bh * n * n * d


def test_the_seed_trade_more_flops_far_fewer_bytes():
    # non-causal: the unfused GEMMs do not skip the masked half, so compare like with like
    shape = iosim.AttentionShape(2, 4, 1024, 64)
    standard = iosim.simulate("standard", shape, pass_="both", model="two-level").totals
    flash = iosim.simulate("flash2", shape, pass_="both", model="two-level").totals
    assert flash.flops > standard.flops  # recomputation in the backward
    assert flash.hbm_bytes * 3 < standard.hbm_bytes  # no N x N matrices through HBM


def test_cli_pass_flag_and_json(capsys):
    argv = ["simulate", "--algorithm", "standard", "--seq-len", "256", "--head-dim", "64",
            "--pass", "both", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pass"] == "both"
    phases = [k["phase"] for k in out["kernels"]]
    assert phases[0] == "forward" and phases[-1] == "backward"
    assert phases == sorted(phases, key=lambda p: p == "backward")
    with pytest.raises(SystemExit):
        main(argv[:-3] + ["--pass", "sideways"])
    assert "invalid choice: 'sideways'" in capsys.readouterr().err


def test_an_algorithm_without_a_backward_says_so(capsys):
    missing = [a for a in iosim.ALGORITHMS
               if not hasattr(iosim.schedules.algorithm_module(a), "build_backward")]
    if not missing:
        pytest.skip("every algorithm has a backward schedule")
    argv = ["simulate", "--algorithm", missing[0], "--seq-len", "256", "--head-dim", "64",
            "--pass", "backward"]
    assert main(argv) == 2
    assert "no backward schedule" in capsys.readouterr().err


def test_explore_ranks_the_backward_block_sizes():
    rows = explore("flash2", SHAPE, workers=1, progress=False, pass_="backward",
                   candidates=[32, 64])
    assert rows and [r.predicted_time_s for r in rows] == sorted(r.predicted_time_s
                                                                 for r in rows)
