"""Sweep definitions for ``python -m gpu.bench`` (pure Python)."""
from __future__ import annotations

from .kernels import flash_fits

ALGORITHMS = ["standard", "megatron", "hf", "flash1", "flash2"]
FLASH = ("flash1", "flash2")
# run only when named (--algorithms flash3): the Hopper kernel of gpu/flash3.cu (sm_90a, TMA, wgmma)
EXTRA_ALGORITHMS = ["flash3"]
TILED = FLASH + ("flash3",)  # algorithms whose runs carry a (block_rows, block_cols) pair
SEQ_LENS = [512, 1024, 2048, 4096, 8192, 16384]
HEAD_DIMS = [64, 128]
HEADS = 16
TOKENS = 16384  # B * N, as in the FlashAttention paper's benchmarks
BLOCK_PAIRS = [(64, 64), (128, 64), (64, 128), (128, 128), (128, 32)]
FLASH3_PAIRS = [(128, 64), (128, 128), (192, 64), (192, 128)]  # 2 or 3 consumer warpgroups of 64 rows
TARGET = {"batch": 8, "heads": 16, "seq_len": 4096}
# default (best-guess) block pair per head dim, used where only one pair is run
DEFAULT_PAIR = {"flash1": {64: (128, 64), 128: (128, 64)}, "flash2": {64: (128, 64), 128: (128, 32)},
                "flash3": {64: (192, 128), 128: (128, 128)}}


def batch_for(seq_len: int) -> int:
    return max(1, TOKENS // seq_len)


def pairs_for(algorithm: str, head_dim: int, pairs=None) -> list[tuple[int, int]]:
    if pairs is None:
        pairs = FLASH3_PAIRS if algorithm == "flash3" else BLOCK_PAIRS
    return [p for p in pairs if flash_fits(algorithm, p[0], p[1], head_dim)]


# flash1 at long sequences runs on only B*H CTAs (16 or 32 for N >= 8192): a run takes 0.1-1 s, so only the two
# large-tile pairs are timed there (device-time budget); every pair is timed for N <= 4096.
FLASH1_LONG_PAIRS = [(128, 64), (128, 128)]
FLASH1_LONG_N = 8192


def _configs(shape: dict, algorithms, all_pairs: bool) -> list[dict]:
    out = []
    for a in algorithms:
        if a in TILED:
            pairs = pairs_for(a, shape["head_dim"]) if all_pairs else [DEFAULT_PAIR[a][shape["head_dim"]]]
            if a == "flash1" and all_pairs and shape["seq_len"] >= FLASH1_LONG_N:
                pairs = [p for p in pairs if p in FLASH1_LONG_PAIRS]
            for br, bc in pairs:
                out.append(dict(shape, algorithm=a, block_rows=br, block_cols=bc))
        else:
            out.append(dict(shape, algorithm=a, block_rows=None, block_cols=None))
    return out


def shapes(name: str) -> list[dict]:
    """Shapes (batch, heads, seq_len, head_dim, causal) of a sweep, target shapes first."""
    target = [dict(TARGET, head_dim=d, causal=c) for d in HEAD_DIMS for c in (False, True)]
    if name == "smoke":
        return [dict(batch=2, heads=4, seq_len=n, head_dim=d, causal=c)
                for n in (200, 1024) for d in HEAD_DIMS for c in (False, True)] + \
               [dict(TARGET, head_dim=d, causal=False) for d in HEAD_DIMS]
    if name == "target":
        return target
    if name == "nsweep":  # short N sweep beside the target shape (default pair of each flash kernel)
        return [dict(batch=batch_for(n), heads=HEADS, seq_len=n, head_dim=d, causal=c)
                for c in (False, True) for d in HEAD_DIMS for n in (1024, 2048, 8192, 16384)]
    if name == "quick":
        return target + [dict(batch=batch_for(n), heads=HEADS, seq_len=n, head_dim=d, causal=False)
                         for n in (1024, 4096) for d in HEAD_DIMS]
    if name in ("full", "ncu"):
        grid = [dict(batch=batch_for(n), heads=HEADS, seq_len=n, head_dim=d, causal=c)
                for c in (False, True) for d in HEAD_DIMS for n in SEQ_LENS]
        if name == "ncu":
            return [s for s in grid if not s["causal"]] + [dict(TARGET, head_dim=d, causal=False) for d in HEAD_DIMS]
        return target + grid
    raise ValueError(f"unknown sweep {name!r}")


# shapes of the ncu sweep whose flash block pairs are all profiled (others: the default pair only)
NCU_ALL_PAIRS = {(4096, 64), (4096, 128), (16384, 128), (1024, 128)}


def configs(name: str, algorithms=None) -> list[list[dict]]:
    """Run configurations grouped by shape (one group per input shape)."""
    algorithms = list(algorithms or ALGORITHMS)
    groups = []
    for s in shapes(name):
        if name == "ncu":
            all_pairs = (s["seq_len"], s["head_dim"]) in NCU_ALL_PAIRS and s["batch"] == batch_for(s["seq_len"])
        else:
            all_pairs = name in ("full", "target", "quick", "smoke") and not (
                name == "smoke" and s["seq_len"] == 4096)
        groups.append(_configs(s, algorithms, all_pairs))
    return groups
