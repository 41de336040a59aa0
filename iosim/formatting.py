"""Human-readable numbers and plain-text tables for the command line."""
from __future__ import annotations

import math


def format_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def format_time(t: float) -> str:
    return f"{t * 1e3:.3f} ms" if t >= 1e-4 else f"{t * 1e6:.1f} us"


def format_intensity(x: float) -> str:
    """Arithmetic intensity in FLOP/byte ("inf" for an op that moves no bytes)."""
    return "inf" if math.isinf(x) else f"{x:.1f}"


def text_table(header, rows, left_columns: int = 0) -> str:
    """Columns padded to their widest cell; the first ``left_columns`` left-aligned."""
    rows = [tuple(str(c) for c in r) for r in rows]
    header = tuple(str(c) for c in header)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) if i < left_columns else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header)] + [line(r) for r in rows])
