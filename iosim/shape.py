"""The attention workload: batch, heads, sequence length, head dim, dtype and causal flag."""
from __future__ import annotations

import math
import operator

import numpy as np
from dataclasses import dataclass

from .errors import IosimError

#: Bytes per element of each supported data type.
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def check_positive_int(name: str, value, allowed: str = "a positive integer") -> int:
    """Return ``value`` as an int, or raise IosimError naming ``name`` and what is allowed."""
    if isinstance(value, bool):
        raise IosimError(f"{name} must be {allowed}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise IosimError(f"{name} must be {allowed}, got {value!r}") from None
    if value < 1:
        raise IosimError(f"{name} must be {allowed}, got {value}")
    return value


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPE_BYTES:
        raise IosimError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
    return dtype


@dataclass(frozen=True)
class AttentionShape:
    """One multi-head attention forward pass: Q, K, V and O of shape (batch, heads, seq_len, head_dim)."""

    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: str = "fp16"
    causal: bool = False

    def __post_init__(self):
        for name in ("batch", "heads", "seq_len", "head_dim"):
            object.__setattr__(self, name, check_positive_int(name, getattr(self, name)))
        check_dtype(self.dtype)
        if not isinstance(self.causal, (bool, np.bool_)):
            raise IosimError(f"causal must be True or False, got {self.causal!r}")
        object.__setattr__(self, "causal", bool(self.causal))

    @property
    def elem_bytes(self) -> int:
        """Bytes per element of Q, K, V, O, S and P."""
        return DTYPE_BYTES[self.dtype]

    @property
    def batch_heads(self) -> int:
        return self.batch * self.heads

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def matmul_flops(self) -> int:
        """FLOPs of the two matmuls QKᵀ and PV over all heads (4·B·H·N²·d), unmasked."""
        return 4 * self.batch_heads * self.seq_len**2 * self.head_dim

    def describe(self) -> str:
        mask = ", causal" if self.causal else ""
        return (f"B={self.batch} H={self.heads} N={self.seq_len} d={self.head_dim} "
                f"{self.dtype}{mask}")
