"""Write result files atomically: a reader sees the old file or the whole new one, never half.

Every writer renders into a temporary file in the destination's folder, flushes and fsyncs it,
then ``os.replace`` s it over the destination (atomic on POSIX and Windows within one file
system). If rendering raises, the temporary file is removed and the destination is untouched.

A destination must be a regular file or absent: a folder, a device (``/dev/null``,
``/dev/full``), a FIFO or a socket is refused, never replaced. The destination's folder must
exist already: writers never create folders. :func:`check_writable` makes these checks (and
that the folder accepts a new file) without writing, so a command can refuse a bad output
path before it spends time computing what it would write.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .errors import IosimError

_ALLOWED = "give the path of a regular file (new or existing) in an existing, writable folder"


def _as_path(path) -> Path:
    """``path`` as a :class:`Path`; an empty path (which :class:`Path` would read as ``.``) and a
    non-path are errors."""
    try:
        raw = os.fspath(path)
    except TypeError:
        raise IosimError(f"an output path must be a string or path, got "
                         f"{type(path).__name__}") from None
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if raw.strip() == "":
        raise IosimError(f"the output path is empty or blank; {_ALLOWED}")
    return Path(raw)


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "not a regular file"


def _check_destination(path: Path) -> None:
    """Raise :class:`IosimError` unless ``path`` is absent or a regular file and its folder
    exists and is a folder. Makes no file."""
    try:
        st = os.stat(path)  # follows links: a link to /dev/full is refused like /dev/full
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        st = None  # a parent is a file: reported below, naming that parent
    except OSError as exc:
        raise IosimError(f"cannot write {path}: {exc.strerror}; {_ALLOWED}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise IosimError(f"cannot write {path}: it is {_file_kind(st.st_mode)}, not a regular "
                         f"file; {_ALLOWED}")
    folder = path.parent
    try:
        folder_st = os.stat(folder)
    except FileNotFoundError:
        raise IosimError(f"cannot write {path}: folder {folder} does not exist (folders are not "
                         f"created); create it first or {_ALLOWED}") from None
    except NotADirectoryError:
        blocker = folder
        while blocker.parent != blocker and not blocker.parent.is_dir():
            blocker = blocker.parent
        raise IosimError(f"cannot write {path}: {blocker} is a file, not a folder; "
                         f"{_ALLOWED}") from None
    except OSError as exc:
        raise IosimError(f"cannot write {path}: folder {folder}: {exc.strerror}; "
                         f"{_ALLOWED}") from None
    if not stat.S_ISDIR(folder_st.st_mode):
        raise IosimError(f"cannot write {path}: {folder} is {_file_kind(folder_st.st_mode)}, "
                         f"not a folder; {_ALLOWED}")


def check_writable(path) -> Path:
    """Check that ``path`` could be written atomically now, without writing it; return it.

    Raises :class:`~iosim.IosimError` (one line: what is wrong and what is allowed) when
    ``path`` is empty; exists and is not a regular file (a folder, a device such as
    ``/dev/null``, a FIFO, a socket); lies in a folder that does not exist (folders are never
    created) or under a regular file; or lies in a folder where no new file can be made (no
    write permission, a read-only file system). The last check uses :func:`os.access` and then
    a probe: an empty temporary file is made in the folder and removed at once, so it holds for
    root and for read-only mounts too. Nothing else is touched; an existing ``path`` is left as
    it is.
    """
    path = _as_path(path)
    _check_destination(path)
    folder = path.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise IosimError(f"cannot write {path}: folder {folder} is not writable; {_ALLOWED}")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise IosimError(f"cannot write {path}: cannot create a file in folder {folder} "
                         f"({exc.strerror}); {_ALLOWED}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return path


def current_umask() -> int:
    """The process's file-mode creation mask (read from ``/proc/self/status`` where it exists,
    else by setting and at once restoring it with :func:`os.umask`)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path beside ``path``; on a clean exit move it onto ``path``.

    For writers that insist on a file name (matplotlib's ``savefig``). ``suffix`` defaults to
    ``path``'s own, so format detection by extension still works.

    ``path`` must be absent or a regular file, in an existing folder (see
    :func:`check_writable`); otherwise :class:`~iosim.IosimError` is raised before anything is
    written. The file gets the mode a new file would (``0o666`` less the umask), also when it
    replaces an existing file: an old file's mode is not kept."""
    path = _as_path(path)
    _check_destination(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.",
                                   suffix=suffix or path.suffix or ".tmp", dir=path.parent)
    except OSError as exc:
        raise IosimError(f"cannot write {path}: cannot create a file in folder {path.parent} "
                         f"({exc.strerror}); {_ALLOWED}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        try:
            os.chmod(tmp, 0o666 & ~current_umask())
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            _check_destination(path)  # it may have changed while the file was rendered
            os.replace(tmp, path)
        except OSError as exc:
            raise IosimError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (the rules of :func:`atomic_path`); return the path.

    A failure to write (a full disk) is an :class:`~iosim.IosimError`; ``path`` is untouched."""
    with atomic_path(path) as tmp:
        try:
            Path(tmp).write_bytes(data)
        except OSError as exc:
            raise IosimError(f"cannot write {path}: {exc.strerror}") from None
    return Path(path)


def write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON; infinities and NaN become null (JSON has no such numbers)."""
    return write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # NumPy scalars
        return _json_safe(obj.item())
    return obj


def write_csv(path, rows: Iterable[Mapping], columns: Sequence[str] | None = None) -> Path:
    """Write dict-like ``rows`` as CSV with a header; ``columns`` fixes the order (default: the
    keys of the first row, then any new keys in order of appearance)."""
    rows = [dict(r) for r in rows]
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n",
                            extrasaction="raise")
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    return write_text(path, buffer.getvalue())


def save_figure(fig, path, dpi: int = 150) -> Path:
    """Save a matplotlib figure atomically (format from ``path``'s extension)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None,
                   headers: Mapping[str, str] | None = None, align_right: bool = True) -> str:
    """A GitHub-flavoured markdown table of dict-like ``rows`` (values shown with ``str``)."""
    rows = [dict(r) for r in rows]
    if columns is None:
        columns = list(rows[0]) if rows else []
    headers = headers or {}
    head = [str(headers.get(c, c)) for c in columns]
    rule = ["---:" if align_right else "---" for _ in columns]
    if rule:
        rule[0] = "---"
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(rule) + " |"]
    for r in rows:
        cells = [str(r.get(c, "")).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
