"""Write result files atomically: a reader sees the old file or the whole new one, never half.

Every writer renders into a temporary file in the destination's folder, flushes and fsyncs it,
then ``os.replace`` s it over the destination (atomic on POSIX and Windows within one file
system). If rendering raises, the temporary file is removed and the destination is untouched.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .errors import IosimError


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path beside ``path``; on a clean exit move it onto ``path``.

    For writers that insist on a file name (matplotlib's ``savefig``). ``suffix`` defaults to
    ``path``'s own, so format detection by extension still works."""
    path = Path(path)
    if path.is_dir():
        raise IosimError(f"{path} is a folder; give a file path to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp",
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
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
