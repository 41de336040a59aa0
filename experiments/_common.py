"""What the experiment scripts share: report sections, the quick switch, a parallel and
memoised ``simulate`` for many workloads, plotting setup and number formatting."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")

from iosim import AttentionShape  # noqa: E402
from iosim.cli import OneLineParser
from iosim.distribute import map_jobs

DEFAULT_RESULTS = Path("results")
QUICK_ENV = "IOSIM_QUICK"


@dataclass
class Section:
    """One part of ``report.md``: a title, a markdown body (prose and tables), the figures to
    show ((file name, caption) pairs, relative to the results folder) and the data files."""

    title: str
    body: str = ""
    figures: list = field(default_factory=list)
    data: list = field(default_factory=list)

    def to_markdown(self) -> str:
        parts = [f"## {self.title}", ""]
        if self.body:
            parts += [self.body.strip(), ""]
        for name, caption in self.figures:
            parts += [f"![{caption}]({name})", "", f"*{caption}* ([{name}]({name}))", ""]
        if self.data:
            links = ", ".join(f"[{name}]({name})" for name in self.data)
            parts += [f"Data: {links}", ""]
        return "\n".join(parts)


def is_quick(quick: bool | None = None) -> bool:
    """``quick`` if given, else the IOSIM_QUICK environment variable (1/true/yes = on)."""
    if quick is not None:
        return bool(quick)
    return os.environ.get(QUICK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def workers() -> int:
    return os.cpu_count() or 1


# ---- many simulations, in parallel, each done once per process -------------------------------


class SimJob(NamedTuple):
    """One ``iosim.simulate`` call, hashable (the memo key) and picklable (the worker's job)."""

    algorithm: str
    shape: AttentionShape
    hardware: str
    model: str = "l2"
    block_rows: int | None = None
    block_cols: int | None = None
    sram_bytes: int | None = None
    rows_per_warp: int | None = None
    pass_: str = "forward"
    num_splits: int | None = None


_MEMO: dict = {}


def _run(job: SimJob) -> dict:
    """Simulate ``job``; a small picklable summary (totals and per-kernel rows)."""
    from iosim import simulate

    result = simulate(job.algorithm, job.shape, block_rows=job.block_rows,
                      block_cols=job.block_cols, hardware=job.hardware,
                      sram_bytes=job.sram_bytes, model=job.model,
                      rows_per_warp=job.rows_per_warp, pass_=job.pass_,
                      num_splits=job.num_splits)

    def row(k):
        return {"name": k.name, "hbm_read_bytes": k.hbm_read_bytes,
                "hbm_write_bytes": k.hbm_write_bytes, "l2_read_bytes": k.l2_read_bytes,
                "l2_write_bytes": k.l2_write_bytes, "flops_tensor": k.flops_tensor,
                "flops_scalar": k.flops_scalar, "flops": k.flops, "hbm_bytes": k.hbm_bytes,
                "arithmetic_intensity": k.arithmetic_intensity, "bound": k.bound,
                "limiter": k.limiter, "predicted_time_s": k.predicted_time_s}

    return {"block_rows": result.block_rows, "block_cols": result.block_cols,
            "totals": row(result.totals), "kernels": [row(k) for k in result.kernels]}


def _cost_guess(job: SimJob) -> float:
    """Rough relative cost, to start the slowest jobs first."""
    s = job.shape
    unfused = job.algorithm in ("standard", "hf", "megatron")
    per_head = s.seq_len * s.kv_seq_len * (8 if unfused else 1)
    blocks = (job.block_rows or 64) * (job.block_cols or 64)
    return s.batch_heads * per_head * (1 if unfused else 4096 / blocks) * \
        (3 if job.model == "l2" else 1)


def simulate_many(jobs, desc: str = "simulate", progress: bool = True) -> list[dict]:
    """Summaries of ``jobs`` (in order), simulated by :func:`iosim.distribute.map_jobs` (worker
    processes, or the Dask scheduler that ``DASK_SCHEDULER_ADDRESS`` names); repeated jobs
    (within a run of ``python -m experiments``) are answered from a memo."""
    jobs = [SimJob(*j) if not isinstance(j, SimJob) else j for j in jobs]
    todo = sorted({j for j in jobs if j not in _MEMO}, key=_cost_guess, reverse=True)
    for job, summary in zip(todo, map_jobs(_run, todo, workers=workers(), progress=progress,
                                           desc=desc)):
        _MEMO[job] = summary
    return [_MEMO[j] for j in jobs]


def parallel_map(fn, items, desc: str = "run", progress: bool = True) -> list:
    """``[fn(x) for x in items]`` through :func:`iosim.distribute.map_jobs` (``fn`` must be
    module-level)."""
    return map_jobs(fn, list(items), workers=workers(), progress=progress, desc=desc)


# ---- plotting and formatting -----------------------------------------------------------------

#: One colour and one marker per attention algorithm (and the op catalogue), the same in every
#: figure: experiments/*.py and the validation figures all draw from these.
COLORS = {"standard": "#1f77b4", "hf": "#9467bd", "megatron": "#8c564b", "flash1": "#ff7f0e",
          "flash2": "#d62728", "catalogue": "#2ca02c", "flash_decoding": "#17becf",
          "flash3": "#e377c2"}
MARKERS = {"standard": "o", "hf": "v", "megatron": "^", "flash1": "s", "flash2": "D",
           "catalogue": "P", "flash_decoding": "X", "flash3": "*"}
#: Legend names where they differ from the key.
LABELS = {"catalogue": "op catalogue"}
#: Drawing order: the fused kernels (many, scattered) first, the unfused pipelines over them,
#: ``standard`` last. Its GEMMs are the same kernels as hf's and megatron's (and its bytes often
#: the same as megatron's), so it is drawn on top with an open marker (and a dashed line)
#: through which the points and lines it covers stay visible.
DRAW_ORDER = ("flash1", "flash2", "flash3", "flash_decoding", "catalogue", "hf", "megatron",
              "standard")
OPEN = frozenset({"standard"})


def label(algorithm: str) -> str:
    return LABELS.get(algorithm, algorithm)


def draw_order(algorithms) -> list:
    """``algorithms`` in :data:`DRAW_ORDER` (unknown names first, in their own order)."""
    algorithms = list(algorithms)
    rank = {a: i for i, a in enumerate(DRAW_ORDER)}
    return sorted(algorithms, key=lambda a: (rank.get(a, -1), algorithms.index(a)))


def _zorder(algorithm: str, base: float) -> float:
    return base + (DRAW_ORDER.index(algorithm) if algorithm in DRAW_ORDER else 0) / 10


def line_style(algorithm: str, markersize: float = 5, **overrides) -> dict:
    """Keyword arguments for ``ax.plot`` of one algorithm's line (colour, marker, fill, order);
    ``overrides`` win."""
    color = COLORS[algorithm]
    style = dict(color=color, marker=MARKERS[algorithm], markersize=markersize,
                 markeredgecolor=color, label=label(algorithm), zorder=_zorder(algorithm, 3))
    if algorithm in OPEN:
        style.update(markerfacecolor="none", markersize=markersize * 1.6, linestyle="--",
                     markeredgewidth=1.3)
    style.update(overrides)
    return style


def scatter_style(algorithm: str, size: float = 30, **overrides) -> dict:
    """Keyword arguments for ``ax.scatter`` of one algorithm's points; ``overrides`` win."""
    color = COLORS[algorithm]
    style = dict(marker=MARKERS[algorithm], s=size, facecolors=color, edgecolors="black",
                 linewidths=0.4, label=label(algorithm), zorder=_zorder(algorithm, 3))
    if algorithm in OPEN:
        style.update(facecolors="none", edgecolors=color, linewidths=1.1, s=size * 3.2)
    style.update(overrides)
    return style


def pow2_log_axes(ax, ticks, log_y: bool = True) -> None:
    """Axes over powers of two (sequence lengths, block sizes, batches): a base-2 x axis
    labelled at each of ``ticks`` (no minor labels); with ``log_y`` a log y axis with plain
    1/2/5 labels."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(n) for n in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    if log_y:
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)


def plain_log_axis(axis, subs=(1.0, 2.0, 5.0)) -> None:
    """Label a log ``axis`` (``ax.xaxis`` / ``ax.yaxis``) with plain numbers at 1, 2, 5 x 10^k
    and no minor-tick labels (matplotlib's default labels minor ticks of a short log axis as
    ``3 x 10^1``)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def place_labels(ax, xy, texts, *, marker_radius_pt: float = 5.0, obstacles=(), lines=(),
                 fontsize: float = 7.5, leader_from_pt: float = 15.0, **text_kw) -> list:
    """Write ``texts[i]`` near data point ``xy[i]`` where it overlaps no marker (every point of
    ``xy`` is one, ``marker_radius_pt`` in radius), no label already placed, no artist of
    ``obstacles`` (texts, legends: their drawn extents) and no polyline of ``lines`` ((xs, ys)
    in data coordinates), inside the axes. Candidates ring each point at growing distance; a
    label set further than ``leader_from_pt`` gets a thin leader line to its point. Call after
    the axes' limits and scales are final. Returns the text artists."""
    import numpy as np
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    px_per_pt = fig.dpi / 72.0
    points = to_px(np.asarray(xy, dtype=float).reshape(-1, 2))
    r_px = marker_radius_pt * px_per_pt
    blocked = [Bbox.from_extents(x - r_px, y - r_px, x + r_px, y + r_px) for x, y in points]
    blocked += [a.get_window_extent(renderer) for a in obstacles]
    samples = []
    for xs, ys in lines:
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        # resample each segment finely in display space
        for (x0, y0), (x1, y1) in zip(to_px(np.c_[xs[:-1], ys[:-1]]), to_px(np.c_[xs[1:], ys[1:]])):
            n = max(2, int(math.hypot(x1 - x0, y1 - y0) / 2) + 1)
            samples.append(np.c_[np.linspace(x0, x1, n), np.linspace(y0, y1, n)])
    samples = np.vstack(samples) if samples else np.empty((0, 2))
    frame = ax.get_window_extent(renderer)
    angles = [math.radians(a) for a in (-45, 135, 0, 180, -90, 90, -20, -70, 160, 110, 20, 70,
                                        -135, 45, -160, -110, 200)]
    radii_pt = (9, 13, 18, 24, 31, 40, 50, 62, 76, 92)
    placed = []
    for (px, py), text in zip(points, texts):
        artist = ax.annotate(text, (0, 0), xycoords="figure pixels", fontsize=fontsize,
                             ha="center", va="center", **text_kw)
        box = artist.get_window_extent(renderer)
        w, h = box.width + 2, box.height + 2
        best = None
        for radius in radii_pt:
            for angle in angles:
                cx = px + radius * px_per_pt * math.cos(angle)
                cy = py + radius * px_per_pt * math.sin(angle)
                cand = Bbox.from_extents(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                if not (frame.x0 <= cand.x0 and cand.x1 <= frame.x1 and
                        frame.y0 <= cand.y0 and cand.y1 <= frame.y1):
                    continue
                if any(cand.overlaps(b) for b in blocked):
                    continue
                if len(samples) and np.any((samples[:, 0] >= cand.x0) & (samples[:, 0] <= cand.x1)
                                           & (samples[:, 1] >= cand.y0)
                                           & (samples[:, 1] <= cand.y1)):
                    continue
                best = (radius, cx, cy, cand)
                break
            if best:
                break
        artist.remove()
        data_xy = ax.transData.inverted().transform((px, py))
        if best is None:  # nowhere free: next to the point, as before
            best = (0, px + 6 * px_per_pt, py + 6 * px_per_pt, None)
        radius, cx, cy, cand = best
        arrow = (dict(arrowstyle="-", color="0.45", linewidth=0.6, shrinkA=0,
                      shrinkB=marker_radius_pt) if radius > leader_from_pt else None)
        artist = ax.annotate(text, data_xy, xytext=((cx - px) / px_per_pt, (cy - py) / px_per_pt),
                             textcoords="offset points", fontsize=fontsize, ha="center",
                             va="center", arrowprops=arrow, zorder=6, **text_kw)
        if cand is not None:
            blocked.append(cand)
        placed.append(artist)
    return placed


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.6,
               **kwargs):
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.titlesize": 11, "legend.fontsize": 8})
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                             squeeze=False, **kwargs)
    return fig, axes


def close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def ms(t: float) -> str:
    return f"{t * 1e3:.3f}"


def si(x: float, unit: str = "") -> str:
    """3 significant figures with an SI prefix: 1.23 G."""
    if x == 0 or not math.isfinite(x):
        return f"{x}{unit}"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def cli(main, name: str) -> None:
    """``python -m experiments.<name> [results_dir] [--quick]``."""
    parser = OneLineParser(prog=f"python -m experiments.{name}")
    parser.add_argument("results_dir", nargs="?", default=str(DEFAULT_RESULTS))
    parser.add_argument("--quick", action="store_true", default=None,
                        help=f"reduced setting (also: {QUICK_ENV}=1)")
    args = parser.parse_args()
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    sections = main(results_dir, quick=args.quick)
    for s in sections:
        title = s.title if isinstance(s, Section) else str(s).splitlines()[0]
        print(f"{name}: {title}")
    print(f"wrote results to {results_dir}/")


def asdict_rows(rows) -> list[dict]:
    return [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in rows]
