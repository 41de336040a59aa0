"""Faults and limits: the cost estimate and budget, Ctrl-C / SIGTERM / a killed parent, and the
JSON totals."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import iosim
from iosim import budget
from iosim.cli import main
from iosim.trace import build_trace


@pytest.mark.parametrize("algorithm, blocks", [("flash2", (64, 32)), ("flash1", (32, 64)),
                                                ("standard", (64, 64)), ("hf", (32, 32))])
def test_the_estimate_counts_exactly_the_events_the_trace_builds(algorithm, blocks):
    shape = iosim.AttentionShape(2, 3, 200, 64)
    schedule = iosim.build_schedule(algorithm, shape, *blocks)
    trace = build_trace(schedule)
    cost = budget.estimate(schedule)
    assert cost.events == sum(k.n_events for k in trace.kernels)
    assert cost.template_events * shape.batch_heads == cost.events


def test_causal_estimates_are_close():
    shape = iosim.AttentionShape(1, 2, 1024, 64, causal=True)
    schedule = iosim.build_schedule("flash2", shape, 64, 64)
    actual = sum(k.n_events for k in build_trace(schedule).kernels)
    assert abs(budget.estimate(schedule).events - actual) / actual < 0.1


def test_a_run_over_budget_is_refused_before_anything_is_built(capsys):
    started = time.perf_counter()
    # (streamed, a simulation holds one head's events and a few numbers per CTA: 10^8 batch
    # elements of 8 CTAs each are what is over the memory budget)
    code = main(["simulate", "--algorithm", "flash2", "--batch", "100000000", "--seq-len",
                 "1024", "--head-dim", "64"])
    assert code == 2 and time.perf_counter() - started < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "GiB of memory" in err and "--max-memory-gb" in err
    with pytest.raises(budget.BudgetError, match="time budget"):
        iosim.simulate("flash2", iosim.AttentionShape(1, 1, 10**8, 64))
    # raising the budget lets a run through; None means no limit
    small = iosim.AttentionShape(1, 1, 256, 64)
    with pytest.raises(budget.BudgetError):
        iosim.simulate("flash2", small, max_memory_bytes=1)
    assert iosim.simulate("flash2", small, max_memory_bytes=None).totals.flops > 0


def test_explore_refuses_an_oversized_ranking(capsys):
    code = main(["explore", "--algorithm", "flash2", "--seq-len", "1000000", "--head-dim", "64",
                 "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("iosim: error: ranking") and err.count("\n") == 1


def test_bad_budget_flags_are_one_line(capsys):
    code = main(["simulate", "--algorithm", "flash2", "--seq-len", "256", "--head-dim", "64",
                 "--max-minutes", "0"])
    assert code == 2 and "--max-minutes must be a positive" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("iosim ")


def test_json_totals_are_consistent(capsys):
    assert main(["simulate", "--algorithm", "hf", "--causal", "--seq-len", "256",
                 "--head-dim", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    totals, kernels = out["totals"], out["kernels"]
    assert totals["tensor_path"] == "library"
    assert totals["concurrent_ctas"] == max(k["concurrent_ctas"] for k in kernels) > 0
    for name in ("timed", "roofline", "hbm", "launch"):
        assert totals["times_s"][name] == pytest.approx(sum(k["times_s"][name] for k in kernels))
    assert totals["tensors"]["S"]["write_bytes"] == sum(
        k["tensors"].get("S", {}).get("write_bytes", 0) for k in kernels) > 0
    assert main(["simulate", "--algorithm", "flash2", "--seq-len", "256", "--head-dim", "64",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["tensor_path"] == "mma_sync"


# ---- signals: a real process, as a user's shell would run it ------------------------------

LONG_EXPLORE = [sys.executable, "-m", "iosim.cli", "explore", "--algorithm", "flash2",
                "--batch", "8", "--heads", "16", "--seq-len", "4096", "--head-dim", "128",
                "--workers", "2", "--no-progress"]


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc/*/stat)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _start_and_wait_for_workers(timeout_s=60.0):
    process = subprocess.Popen(LONG_EXPLORE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = _children(process.pid)
        if len(workers) >= 2:
            time.sleep(1.0)  # let them start simulating
            return process, _children(process.pid)
        time.sleep(0.2)
    process.kill()
    pytest.skip("the explorer's workers did not start in time on this machine")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_a_signal_ends_explore_at_once_with_one_line_and_its_workers(sig, code, word):
    process, workers = _start_and_wait_for_workers()
    sent = time.monotonic()
    process.send_signal(sig)
    out, err = process.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert process.returncode == code
    assert err.strip() == f"iosim: {word}", err
    time.sleep(1.0)
    assert not [w for w in workers if _alive(w)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_parent_kills_its_workers():
    process, workers = _start_and_wait_for_workers()
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and [w for w in workers if _alive(w)]:
        time.sleep(0.2)
    assert not [w for w in workers if _alive(w)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
def test_ctrl_c_in_the_middle_of_a_replay_ends_at_once():
    # one process, no workers: the replay runs in Numba code, which releases the GIL
    cmd = [sys.executable, "-m", "iosim.cli", "simulate", "--algorithm", "standard",
           "--batch", "8", "--heads", "16", "--seq-len", "8192", "--head-dim", "64"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3.0)
    if process.poll() is not None:
        pytest.skip("the simulation finished before the signal on this machine")
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert time.monotonic() - sent < 2.0
    assert process.returncode == 130 and err == "iosim: interrupted\n"
