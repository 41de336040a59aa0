"""The ``iosim`` command line: ``iosim simulate`` and ``iosim explore``.

Every error is one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import IosimError
from .formatting import format_bytes, format_intensity, format_time, text_table
from .budget import DEFAULT_MAX_MEMORY_BYTES, DEFAULT_MAX_SECONDS
from .hardware import list_presets
from .results import check_writable
from .schedules import ALGORITHMS
from .shape import DTYPE_BYTES, AttentionShape
from .simulate import MODELS, TIME_MODELS, simulate


class OneLineParser(argparse.ArgumentParser):
    """argparse, but its errors are one line on stderr and exit status 2."""

    def error(self, message):  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_workload(p: argparse.ArgumentParser) -> None:
    p.add_argument("--algorithm", required=True, choices=list(ALGORITHMS))
    p.add_argument("--batch", type=int, default=1, help="batch size B (default 1)")
    p.add_argument("--heads", type=int, default=1, help="attention heads H (default 1)")
    p.add_argument("--seq-len", type=int, required=True, help="sequence length N")
    p.add_argument("--head-dim", type=int, required=True, help="head dimension d")
    p.add_argument("--dtype", default="fp16", choices=list(DTYPE_BYTES))
    p.add_argument("--causal", action="store_true", help="causal (autoregressive) mask")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="K/V heads (default: --heads); fewer is grouped-query attention, 1 "
                        "multi-query; must divide --heads")
    p.add_argument("--kv-seq-len", type=int, default=None,
                   help="keys per sequence, e.g. a KV cache (default: --seq-len); decode is "
                        "--seq-len 1; causal masks are aligned at the end")
    p.add_argument("--kv-lens", default=None,
                   help="key padding: valid keys of each batch element, comma-separated "
                        "(one per batch element, each 1..kv-seq-len)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout probability on the attention weights (default 0)")
    p.add_argument("--num-splits", type=int, default=None,
                   help="flash_decoding: K/V splits per query block (default: "
                        "FlashAttention's heuristic for the hardware's SMs)")
    p.add_argument("--hardware", default="h100-measured",
                   help="hardware preset (" + ", ".join(list_presets()) + ") or the path of "
                        "a TOML spec (default h100-measured)")
    p.add_argument("--sram-bytes", type=int, default=None,
                   help="SRAM per thread block in bytes (the paper's M); default: the spec's")
    p.add_argument("--model", default="l2", choices=list(MODELS),
                   help="memory model: l2 (default) or two-level (the paper's)")
    p.add_argument("--time-model", default="timed", choices=list(TIME_MODELS),
                   help="time prediction: timed (default; per-CTA replay with occupancy, "
                        "latency and overlap) or roofline (totals over rates)")
    p.add_argument("--max-memory-gb", type=float, default=DEFAULT_MAX_MEMORY_BYTES / 2**30,
                   help="refuse a run whose estimated memory exceeds this many GiB (default: "
                        f"half this machine's memory, {DEFAULT_MAX_MEMORY_BYTES / 2**30:.0f}; "
                        "explore: the pairs simulated at once)")
    p.add_argument("--max-minutes", type=float, default=DEFAULT_MAX_SECONDS / 60,
                   help="refuse a run whose estimated time exceeds this many minutes (default "
                        f"{DEFAULT_MAX_SECONDS / 60:.0f})")
    p.add_argument("--pass", dest="pass_", default="forward",
                   choices=["forward", "backward", "both"],
                   help="which pass: forward (default), backward (reads what the forward "
                        "saved) or both (the forward's kernels, then the backward's)")
    p.add_argument("--stages", type=int, default=None,
                   help="flash3: shared-memory slots of its ring (the forward's K/V, the "
                        "backward's Q/dO; 2 or 3; default 2; "
                        "explore: both ranked unless given)")
    p.add_argument("--rows-per-warp", type=int, default=None,
                   help="flash1/flash2: query rows each warp owns (default 16), which sets "
                        "the warps per CTA")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iosim")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="iosim", description="Count the bytes and FLOPs of attention "
                     "algorithms on a simulated GPU memory hierarchy and predict their time.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    sim = sub.add_parser("simulate", help="simulate one algorithm on one workload")
    _add_workload(sim)
    sim.add_argument("--block-rows", type=int, default=None, help="Br (default: algorithm's)")
    sim.add_argument("--block-cols", type=int, default=None, help="Bc (default: algorithm's)")
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    sim.add_argument("--exact", action="store_true",
                     help="replay every event, however long the kernel (default: a simulation "
                          "of over 4 M trace events is sampled: its HBM bytes are estimated "
                          "from a steady-state sample, with a 95%% confidence interval)")
    exp = sub.add_parser("explore", help="rank the block sizes that fit the SRAM")
    _add_workload(exp)
    exp.add_argument("--out", default=None, help="write every ranked pair to this CSV file")
    exp.add_argument("--top", type=int, default=15, help="rows to print (default 15)")
    exp.add_argument("--workers", type=int, default=None,
                     help="worker processes (default: all cores)")
    exp.add_argument("--no-progress", action="store_true", help="no progress bar")
    exp.add_argument("--exact", action="store_true",
                     help="replay every event of every pair (default: a pair of over 250 k "
                          "trace events is sampled; its HBM bytes are estimated to about a "
                          "percent, enough to rank)")
    exp.add_argument("--scheduler", default=None,
                     help="where the pairs run: local worker processes (default), 'local' (a "
                          "Dask LocalCluster) or a Dask scheduler address such as "
                          "tcp://host:8786 (default from DASK_SCHEDULER_ADDRESS)")
    return parser


def _kv_lens(text):
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise IosimError(f"--kv-lens must be comma-separated integers (valid keys per batch "
                         f"element), got {text!r}") from None


def _shape(args) -> AttentionShape:
    return AttentionShape(args.batch, args.heads, args.seq_len, args.head_dim, args.dtype,
                          args.causal, kv_heads=args.kv_heads, kv_seq_len=args.kv_seq_len,
                          kv_lens=_kv_lens(args.kv_lens), dropout=args.dropout)


def format_table(result) -> str:
    """The per-kernel table ``iosim simulate`` prints."""
    header = ("kernel", "HBM read", "HBM write", "L2 read", "L2 write", "SRAM r+w",
              "TC GFLOP", "scalar GFLOP", "FLOP/B", "roofline bound", "warps/SM",
              "timed limiter", "roofline", "timed")
    rows = []
    for k in result.kernels + [result.totals]:
        occ = k.occupancy
        rows.append((k.name, format_bytes(k.hbm_read_bytes), format_bytes(k.hbm_write_bytes),
                     format_bytes(k.l2_read_bytes), format_bytes(k.l2_write_bytes),
                     format_bytes(k.sram_read_bytes + k.sram_write_bytes),
                     f"{k.flops_tensor / 1e9:.2f}", f"{k.flops_scalar / 1e9:.2f}",
                     format_intensity(k.arithmetic_intensity), f"{k.bound} ({k.limiter})",
                     f"{occ['warps_per_sm']} ({occ['limiter']})" if occ else "",
                     k.timed_limiter, format_time(k.times_s["roofline"]),
                     format_time(k.times_s["timed"])))
    label = "HBM traffic" if result.model == "two-level" else "L2 requests"
    accesses = []
    for k in result.kernels:
        moves = [f"{verb} {name} {format_bytes(t[key])}" for name, t in k.tensors.items()
                 for verb, key in (("read", "read_bytes"), ("write", "write_bytes")) if t[key]]
        accesses.append(f"  {k.name}: " + ", ".join(moves))
    title = (f"{result.algorithm} ({result.pass_} pass) on {result.hardware.name}, "
             f"{result.shape.describe()}, "
             f"Br={result.block_rows} Bc={result.block_cols}, model {result.model}, "
             f"predicted time: {result.time_model} model")
    count = sum(1 for k in result.kernels for t in k.tensors.values()
                for key in ("read_bytes", "write_bytes") if t[key])
    sampled = []
    if getattr(result, "sampled", False):
        sampled = ["sampled (iosim.sampling; --exact replays every event): HBM counts are "
                   "estimates, 95% confidence intervals: " + ", ".join(
                       f"{name.replace('_bytes', '').replace('_', ' ')} "
                       f"{format_bytes(low)} .. {format_bytes(high)}"
                       for name, (low, high) in result.totals.intervals.items())]
    return "\n".join([title, text_table(header, rows, left_columns=1)]
                     + [f"{label} by tensor ({count} tensor reads/writes):"] + accesses
                     + sampled)


def _budget(args) -> dict:
    for flag, value in (("--max-memory-gb", args.max_memory_gb),
                        ("--max-minutes", args.max_minutes)):
        if not value > 0 or value == float("inf"):
            raise IosimError(f"{flag} must be a positive finite number, got {value}")
    return {"max_memory_bytes": args.max_memory_gb * 2**30,
            "max_seconds": args.max_minutes * 60}


def _simulate_with_stages(args):
    """``iosim simulate`` with ``--stages``: the schedule built with that ring depth."""
    from .hardware import load_hardware
    from .schedules import build_schedule
    from .simulate import simulate_schedule

    hw = load_hardware(args.hardware)
    if args.sram_bytes is not None:
        hw = hw.with_sram(args.sram_bytes)
    schedule = build_schedule(args.algorithm, _shape(args), args.block_rows, args.block_cols,
                              sram_bytes=hw.sram_bytes_per_block,
                              rows_per_warp=args.rows_per_warp, pass_=args.pass_,
                              stages=args.stages)
    return simulate_schedule(schedule, hardware=hw, model=args.model,
                             time_model=args.time_model, exact=args.exact or None,
                             **_budget(args))


def _simulate(args) -> None:
    from . import budget

    budget.announce = True  # say the estimate before a long run
    if args.stages is not None:  # flash3's ring depth
        result = _simulate_with_stages(args)
        print(json.dumps(result.to_dict()) if args.json else format_table(result))
        return
    result = simulate(args.algorithm, _shape(args), block_rows=args.block_rows,
                      block_cols=args.block_cols, hardware=args.hardware,
                      sram_bytes=args.sram_bytes, model=args.model,
                      time_model=args.time_model, rows_per_warp=args.rows_per_warp,
                      pass_=args.pass_, num_splits=args.num_splits,
                      exact=args.exact or None, **_budget(args))
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(format_table(result))


def _explore(args) -> None:
    from .explore import explore, format_ranking, occupancy_warning, spill_warning, write_csv

    if args.top < 1:
        raise IosimError(f"--top must be a positive integer, got {args.top}")
    if args.out is not None:  # refuse an unwritable destination before the ranking runs
        check_writable(args.out)
    rows = explore(args.algorithm, _shape(args), hardware=args.hardware,
                   sram_bytes=args.sram_bytes, model=args.model, workers=args.workers,
                   progress=not args.no_progress, time_model=args.time_model,
                   rows_per_warp=args.rows_per_warp, pass_=args.pass_,
                   scheduler=args.scheduler, stages=args.stages, num_splits=args.num_splits,
                   exact=args.exact or None, **_budget(args))
    print(format_ranking(rows[: args.top]))
    for warning in (occupancy_warning(rows[: args.top]), spill_warning(rows[: args.top])):
        if warning:
            print(warning, file=sys.stderr)
    if args.out:
        write_csv(rows, args.out)
        print(f"wrote {len(rows)} rows to {args.out}")


class Terminated(BaseException):
    """SIGTERM arrived: end like Ctrl-C, with the workers stopped and one line said."""


def _raise_terminated(signum, frame):
    raise Terminated()


def run_command(command, prog: str = "iosim") -> int:
    """Run ``command()`` the way every CLI of the project ends: 0; or one line on stderr and 2
    for bad input (IosimError, ValueError, OSError); 130 on Ctrl-C and 143 on SIGTERM, within a
    moment, worker processes included (they die with this one), never a traceback.

    The command runs in a helper thread so that the main thread, which receives the signals,
    can answer while the Numba engine (which releases the GIL) is in the middle of a replay."""
    import os
    import signal
    import threading

    outcome = {}

    def target():
        try:
            command()
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        worker = threading.Thread(target=target, name=f"{prog}-command", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
        if "error" in outcome:
            raise outcome["error"]
    except (IosimError, ValueError, OSError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        code = 130 if isinstance(exc, KeyboardInterrupt) else 143
        print(f"{prog}: {'interrupted' if code == 130 else 'terminated'}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # the command thread may be inside a replay: do not wait for it
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = {"simulate": _simulate, "explore": _explore}[args.command]
    return run_command(lambda: command(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
