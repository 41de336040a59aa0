"""The atomic writer (iosim.results) refuses destinations it must not replace, never makes
folders, and writes files with the mode the umask gives; ``python -m experiments`` refuses an
unusable results folder with one line and exit status 2."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from iosim import IosimError
from iosim.results import (atomic_path, check_writable, current_umask, save_figure, write_bytes,
                           write_csv, write_json, write_text)

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
SETPRIV = shutil.which("setpriv")


def _without_privileges(cmd: list[str]) -> list[str]:
    """``cmd`` run so that file permissions apply: as is for a normal user; for root, through
    ``setpriv`` with every capability dropped (root otherwise writes into a 0o555 folder)."""
    if not IS_ROOT:
        return cmd
    if SETPRIV is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    return [SETPRIV, "--inh-caps=-all", "--bounding-set=-all", *cmd]

WRITERS = {
    "bytes": lambda p: write_bytes(p, b"data"),
    "text": lambda p: write_text(p, "text\n"),
    "json": lambda p: write_json(p, {"a": 1}),
    "csv": lambda p: write_csv(p, [{"a": 1}]),
}


def _one_line(message: str) -> None:
    assert message and "\n" not in message.strip()


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def umask():
    """Set a umask for one test and restore the old one after it."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask):
        os.umask(mask)
        return mask

    yield set_mask
    os.umask(old)


# --- special files: refused, untouched ---------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_dev_null_is_refused_and_stays_a_device(kind):
    devnull = Path(os.devnull)
    before = os.stat(devnull)
    assert stat.S_ISCHR(before.st_mode)
    with pytest.raises(IosimError, match="character device") as info:
        WRITERS[kind](devnull)
    _one_line(str(info.value))
    after = os.stat(devnull)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert after.st_ino == before.st_ino


def test_dev_null_fails_check_writable():
    with pytest.raises(IosimError, match="not a regular file"):
        check_writable(os.devnull)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_is_refused_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    inode = os.stat(fifo).st_ino
    with pytest.raises(IosimError, match="FIFO"):
        check_writable(fifo)
    with pytest.raises(IosimError, match="FIFO"):
        write_csv(fifo, [{"a": 1}])
    with pytest.raises(IosimError, match="FIFO"):
        with atomic_path(fifo):
            pytest.fail("the body must not run for a FIFO")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.stat(fifo).st_ino == inode
    assert _listing(tmp_path) == ["pipe.csv"]  # no temporary or probe file left


def test_folder_is_refused(tmp_path):
    folder = tmp_path / "out.csv"
    folder.mkdir()
    (folder / "keep").write_text("x")
    for call in (check_writable, lambda p: write_text(p, "x")):
        with pytest.raises(IosimError, match="folder"):
            call(folder)
    assert folder.is_dir() and _listing(folder) == ["keep"]


def test_link_to_a_device_is_refused(tmp_path):
    link = tmp_path / "out.csv"
    link.symlink_to(os.devnull)
    with pytest.raises(IosimError, match="character device"):
        write_text(link, "x")
    assert link.is_symlink() and os.readlink(link) == os.devnull


# --- paths that are empty or lie where no file can be made -------------------------------------

@pytest.mark.parametrize("path", ["", "   "], ids=["empty", "blank"])
def test_empty_path_is_an_error(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for call in (check_writable, lambda p: write_text(p, "x"), lambda p: write_csv(p, [])):
        with pytest.raises(IosimError, match="empty") as info:
            call(path)
        _one_line(str(info.value))
    assert _listing(tmp_path) == []


def test_missing_parent_folder_is_an_error_and_nothing_is_made(tmp_path):
    target = tmp_path / "missing" / "deeper" / "out.csv"
    with pytest.raises(IosimError, match="does not exist") as info:
        check_writable(target)
    assert str(tmp_path / "missing" / "deeper") in str(info.value)
    _one_line(str(info.value))
    for kind, write in WRITERS.items():
        with pytest.raises(IosimError, match="does not exist"):
            write(target)
    assert _listing(tmp_path) == []


def test_parent_that_is_a_file_is_an_error(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("I am a file\n")
    for target in (blocker / "out.csv", blocker / "sub" / "out.csv"):
        with pytest.raises(IosimError, match="not a folder") as info:
            check_writable(target)
        assert str(blocker) in str(info.value)
        with pytest.raises(IosimError, match="not a folder"):
            write_text(target, "x")
    assert blocker.read_text() == "I am a file\n" and _listing(tmp_path) == ["results"]


READ_ONLY_PROBE = """
import sys
from iosim import IosimError
from iosim.results import check_writable, write_text
target = sys.argv[1]
for name, call in (("check", check_writable), ("write", lambda p: write_text(p, "x"))):
    try:
        call(target)
        print(name, "WROTE")
    except IosimError as exc:
        print(name, exc)
"""


def test_read_only_folder_is_an_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        proc = subprocess.run(_without_privileges(
            [sys.executable, "-c", READ_ONLY_PROBE, str(folder / "out.csv")]),
            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr
        check, write = proc.stdout.splitlines()
        assert check.startswith("check cannot write") and "not writable" in check
        assert write.startswith("write cannot write") and "Permission denied" in write
        assert _listing(folder) == []
    finally:
        folder.chmod(0o755)


def test_folder_without_write_access_is_reported(tmp_path, monkeypatch):
    # root passes permission checks, so the os.access answer is what a non-root user would get
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False)
    with pytest.raises(IosimError, match="not writable"):
        check_writable(tmp_path / "out.csv")


def test_check_writable_leaves_no_trace(tmp_path):
    existing = tmp_path / "old.csv"
    existing.write_text("old\n")
    existing.chmod(0o640)
    assert check_writable(existing) == existing
    assert check_writable(str(tmp_path / "new.csv")) == tmp_path / "new.csv"
    assert _listing(tmp_path) == ["old.csv"]
    assert existing.read_text() == "old\n" and stat.S_IMODE(existing.stat().st_mode) == 0o640


# --- file modes follow the umask ---------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_new_file_mode_follows_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    for kind, write in WRITERS.items():
        path = tmp_path / f"new.{kind}"
        write(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, kind


def test_replaced_file_gets_the_mode_of_a_new_file(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "table.csv"
    path.write_text("old\n")
    path.chmod(0o600)
    write_csv(path, [{"a": 1}])
    assert path.read_text() == "a\n1\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_figure_mode_follows_umask(tmp_path, umask):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    umask(0o027)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = save_figure(fig, tmp_path / "f.png")
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_current_umask_does_not_change_it(umask):
    umask(0o037)
    assert current_umask() == 0o037
    assert current_umask() == 0o037


# --- ordinary writes still atomic --------------------------------------------------------------

def test_failed_render_leaves_old_file(tmp_path):
    path = tmp_path / "data.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("render failed")
    assert json.loads(path.read_text()) == {"v": 1} and _listing(tmp_path) == ["data.json"]


# --- python -m experiments with an unusable results folder -------------------------------------

def _run_experiments(*args, cwd=None, unprivileged=False):
    cmd = [sys.executable, "-m", "experiments", *args]
    if unprivileged:
        cmd = _without_privileges(cmd)
    return subprocess.run(cmd, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _assert_refused(proc):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m experiments: error:"), proc.stderr
    assert "Traceback" not in proc.stderr and "[experiments]" not in proc.stderr  # nothing ran


def test_experiments_into_a_file_exits_2(tmp_path):
    target = tmp_path / "results"
    target.write_text("not a folder\n")
    proc = _run_experiments(str(target))
    _assert_refused(proc)
    assert "not a folder" in proc.stderr
    assert target.read_text() == "not a folder\n"


def test_experiments_under_a_file_or_missing_parent_exits_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _assert_refused(_run_experiments(str(blocker / "results")))
    proc = _run_experiments(str(tmp_path / "missing" / "results"))
    _assert_refused(proc)
    assert "does not exist" in proc.stderr
    assert _listing(tmp_path) == ["file"]


def test_experiments_empty_folder_name_exits_2(tmp_path):
    _assert_refused(_run_experiments("", cwd=tmp_path))


def test_experiments_report_path_is_a_folder_exits_2(tmp_path):
    (tmp_path / "report.md").mkdir()
    proc = _run_experiments(str(tmp_path))
    _assert_refused(proc)
    assert "report.md" in proc.stderr


def test_experiments_into_a_read_only_folder_exits_2(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        proc = _run_experiments(str(folder), unprivileged=True)
        _assert_refused(proc)
        assert "not writable" in proc.stderr
        assert _listing(folder) == []
    finally:
        folder.chmod(0o755)


def test_experiments_help_is_plain_and_names_its_options():
    proc = _run_experiments("--help")
    assert proc.returncode == 0
    assert "`" not in proc.stdout
    assert "--quick" in proc.stdout and "--only" in proc.stdout and "figure2_table" in proc.stdout
