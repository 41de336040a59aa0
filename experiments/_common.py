"""What the experiment scripts share: report sections, the quick switch, a parallel and
memoised ``simulate`` for many workloads, plotting setup and number formatting."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")

from iosim import AttentionShape  # noqa: E402
from iosim.cli import OneLineParser

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


_MEMO: dict = {}


def _run(job: SimJob) -> dict:
    """Simulate ``job``; a small picklable summary (totals and per-kernel rows)."""
    from iosim import simulate

    result = simulate(job.algorithm, job.shape, block_rows=job.block_rows,
                      block_cols=job.block_cols, hardware=job.hardware,
                      sram_bytes=job.sram_bytes, model=job.model)

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
    per_head = s.seq_len ** 2 * (8 if unfused else 1)
    blocks = (job.block_rows or 64) * (job.block_cols or 64)
    return s.batch_heads * per_head * (1 if unfused else 4096 / blocks) * \
        (3 if job.model == "l2" else 1)


def simulate_many(jobs, desc: str = "simulate", progress: bool = True) -> list[dict]:
    """Summaries of ``jobs`` (in order), simulated in worker processes; repeated jobs (within a
    run of ``python -m experiments``) are answered from a memo."""
    from tqdm import tqdm

    jobs = [SimJob(*j) if not isinstance(j, SimJob) else j for j in jobs]
    todo = sorted({j for j in jobs if j not in _MEMO}, key=_cost_guess, reverse=True)
    if todo:
        bar = tqdm(total=len(todo), desc=desc, unit="sim", file=sys.stderr, leave=False,
                   disable=not progress)
        try:
            if workers() == 1 or len(todo) == 1:
                for job in todo:
                    _MEMO[job] = _run(job)
                    bar.update(1)
            else:
                with concurrent.futures.ProcessPoolExecutor(min(workers(), len(todo))) as pool:
                    futures = {pool.submit(_run, job): job for job in todo}
                    for future in concurrent.futures.as_completed(futures):
                        _MEMO[futures[future]] = future.result()
                        bar.update(1)
        finally:
            bar.close()
    return [_MEMO[j] for j in jobs]


def parallel_map(fn, items, desc: str = "run", progress: bool = True) -> list:
    """``[fn(x) for x in items]`` over worker processes (``fn`` must be module-level)."""
    from tqdm import tqdm

    items = list(items)
    if workers() == 1 or len(items) <= 1:
        return [fn(x) for x in items]
    out = [None] * len(items)
    with tqdm(total=len(items), desc=desc, unit="job", file=sys.stderr, leave=False,
              disable=not progress) as bar, \
            concurrent.futures.ProcessPoolExecutor(min(workers(), len(items))) as pool:
        futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
        for future in concurrent.futures.as_completed(futures):
            out[futures[future]] = future.result()
            bar.update(1)
    return out


# ---- plotting and formatting -----------------------------------------------------------------

#: One colour per attention algorithm, the same in every figure.
COLORS = {"standard": "#1f77b4", "hf": "#9467bd", "megatron": "#8c564b", "flash1": "#ff7f0e",
          "flash2": "#d62728", "catalogue": "#2ca02c"}
MARKERS = {"standard": "o", "hf": "v", "megatron": "^", "flash1": "s", "flash2": "D",
           "catalogue": "P"}


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.6):
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.titlesize": 11, "legend.fontsize": 8})
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                             squeeze=False)
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
