"""One module per attention algorithm; each builds a :class:`~iosim.schedule.Schedule`."""
from __future__ import annotations

from dataclasses import replace

from ..errors import IosimError, TilingError
from ..schedule import PASSES, Schedule
from . import flash1, flash2, hf, megatron, standard
from . import flash3
from . import flash_decoding
from ..shape import check_positive_int
from .common import check_block, clipped_note, stamp_extents

ALGORITHMS = {"standard": standard, "hf": hf, "megatron": megatron,
              "flash1": flash1, "flash2": flash2}
ALGORITHMS["flash3"] = flash3
ALGORITHMS["flash_decoding"] = flash_decoding  # forward only (inference)

#: Algorithms that split the K/V sequence over CTAs (``num_splits`` applies).
SPLIT_KV = ("flash_decoding",)

#: Algorithms with a K/V ring of several shared-memory stages (``stages`` applies).
STAGED = ("flash3",)


def algorithm_module(algorithm: str):
    try:
        return ALGORITHMS[algorithm]
    except (KeyError, TypeError):
        raise IosimError(f"unknown algorithm {algorithm!r}; allowed: "
                         f"{', '.join(ALGORITHMS)}") from None


#: Algorithms whose fused kernel splits its query rows over warps (``rows_per_warp`` applies).
WARP_TILED = ("flash1", "flash2")


def _check_pass(pass_, algorithm: str, module) -> str:
    if not isinstance(pass_, str) or pass_ not in PASSES:
        raise IosimError(f"unknown pass {pass_!r}; allowed: {', '.join(PASSES)}")
    if pass_ != "forward" and not hasattr(module, "build_backward"):
        have = ", ".join(name for name, m in ALGORITHMS.items() if hasattr(m, "build_backward"))
        raise IosimError(f"{algorithm} has no backward schedule yet (pass_={pass_!r}); "
                         f"algorithms with one: {have}")
    return pass_


def _join(forward: Schedule, backward: Schedule) -> Schedule:
    """One schedule: the forward's kernels, then the backward's; tensors the union (a name
    refers to the same tensor in both)."""
    tensors = list(forward.tensors)
    known = forward.tensor_map()
    for spec in backward.tensors:
        if spec.name in known:
            assert known[spec.name] == spec, (known[spec.name], spec)
        else:
            tensors.append(spec)
    return replace(forward, tensors=tuple(tensors), kernels=forward.kernels + backward.kernels,
                   notes=f"{forward.notes}; {backward.notes}")


def build_schedule(algorithm: str, shape, block_rows=None, block_cols=None,
                   sram_bytes: int | None = None, rows_per_warp=None,
                   q_in_registers: bool = False, pass_: str = "forward",
                   stages=None, num_splits=None, sm_count=None) -> Schedule:
    """The schedule of ``algorithm`` for ``shape``, tiled by (block_rows, block_cols).

    Block sizes left as None take the algorithm's default for an SRAM of ``sram_bytes`` per
    thread block (default: the h100-measured preset's). Given block sizes that do not fit are
    refused with a :class:`~iosim.errors.TilingError` naming bytes needed and available.
    ``rows_per_warp`` (flash1, flash2) sets the query rows each warp owns, hence the warps per
    CTA (default 16 rows: Br / 16 warps). ``q_in_registers`` (flash2) keeps each warp's rows of
    Q in registers for the whole K/V loop instead of re-reading them from shared memory.
    ``stages`` (flash3) sets the shared-memory slots of its K/V ring (2 or 3; default 2).
    ``num_splits`` (flash_decoding) splits the K/V sequence over that many CTAs per query
    block (default: FlashAttention's heuristic for ``sm_count`` SMs, default the
    h100-measured preset's).

    ``pass_``: "forward" (default), "backward" (the backward pass alone: it reads what the
    forward saved) or "both" (one schedule, the forward's kernels then the backward's, with the
    same (block_rows, block_cols); defaults then come from the backward's choice, checked to
    fit both). Every kernel says its pass in ``Kernel.phase``."""
    module = algorithm_module(algorithm)
    pass_ = _check_pass(pass_, algorithm, module)
    extra = {}
    if rows_per_warp is not None:
        if algorithm not in WARP_TILED:
            raise IosimError(f"rows_per_warp applies to {', '.join(WARP_TILED)} only, "
                             f"not {algorithm!r}")
        extra["rows_per_warp"] = check_positive_int(
            "rows_per_warp", rows_per_warp, "a positive integer (query rows per warp)")
    if q_in_registers:
        if algorithm != "flash2":
            raise IosimError(f"q_in_registers applies to flash2 only, not {algorithm!r}")
        extra["q_in_registers"] = True
    if stages is not None:
        if algorithm not in STAGED:
            raise IosimError(f"stages applies to {', '.join(STAGED)} only, not {algorithm!r}")
        extra["stages"] = stages
    if num_splits is not None or sm_count is not None:
        if algorithm not in SPLIT_KV:
            raise IosimError(f"num_splits applies to {', '.join(SPLIT_KV)} only, "
                             f"not {algorithm!r}")
        if num_splits is not None:
            extra["num_splits"] = flash_decoding.check_num_splits(num_splits)
        if sm_count is not None:
            extra["sm_count"] = check_positive_int("sm_count", sm_count, "a positive integer")
    if sram_bytes is None:
        from ..hardware import load_hardware

        sram_bytes = load_hardware("h100-measured").sram_bytes_per_block
    sram_bytes = check_positive_int("sram_bytes", sram_bytes,
                                    "a positive integer number of bytes per thread block")
    n = shape.seq_len
    # a block is no longer than its variable's extent: query rows (a split-KV kernel's: the
    # group's rows) and keys
    row_extent = getattr(module, "row_extent", lambda s: s.seq_len)(shape)
    extent = {"block_rows": row_extent, "block_cols": shape.kv_seq_len}
    clipped = {}  # block size -> the value the caller gave, where it was clipped
    if block_rows is not None:
        given, block_rows = block_rows, check_block("block_rows", block_rows, row_extent)
        if block_rows != given:
            clipped["block_rows"] = given
    if block_cols is not None:
        given, block_cols = block_cols, check_block("block_cols", block_cols,
                                                    shape.kv_seq_len)
        if block_cols != given:
            clipped["block_cols"] = given

    backward_extra = {key: value for key, value in extra.items()
                      if key in ("rows_per_warp", "stages")}

    def build(br, bc):
        if pass_ == "forward":
            return stamp_extents(module.build(shape, br, bc, sram_bytes, **extra))
        backward = module.build_backward(shape, br, bc, sram_bytes, **backward_extra)
        if pass_ == "backward":
            return stamp_extents(backward)
        return stamp_extents(_join(module.build(shape, br, bc, sram_bytes, **extra), backward))

    def fits(br, bc):
        br = block_rows if block_rows is not None else br
        bc = block_cols if block_cols is not None else bc
        schedule = build(br, bc)
        return all(k.smem_bytes(shape.head_dim, n) <= sram_bytes for k in schedule.kernels)

    defaults = (module.default_blocks if pass_ == "forward"
                else getattr(module, "default_backward_blocks", module.default_blocks))
    try:
        if block_rows is None or block_cols is None:
            default_rows, default_cols = defaults(shape, sram_bytes, fits)
            block_rows = default_rows if block_rows is None else block_rows
            block_cols = default_cols if block_cols is None else block_cols
        schedule = build(block_rows, block_cols)
        schedule.check_fits(sram_bytes)
    except TilingError as exc:
        if not clipped:
            raise
        message = str(exc)
        for name, given in clipped.items():
            message = _name_given_blocks(message, {name: given}, extent[name])
        raise TilingError(message) from None
    return schedule


def _name_given_blocks(message: str, clipped: dict, seq_len: int) -> str:
    """``message`` about a tiling whose block sizes were clipped to N, naming the sizes the
    caller gave: "block_rows=4096" becomes "block_rows=100000 (clipped to N=4096)"."""
    for name, given in clipped.items():
        clipped_text = f"{name}={seq_len}"
        if clipped_text in message:
            message = message.replace(clipped_text, clipped_note({name: given}, seq_len), 1)
        else:
            message += f" ({clipped_note({name: given}, seq_len)})"
    return message


__all__ = ["ALGORITHMS", "PASSES", "STAGED", "build_schedule", "algorithm_module"]
