"""The attention workload: batch, query heads and K/V heads (grouped-query attention), query and
key/value lengths (a KV cache), head dim, dtype, causal flag, key padding and dropout."""
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
    """One multi-head attention forward pass: Q and O of shape (batch, heads, seq_len, head_dim),
    K and V of shape (batch, kv_heads, kv_seq_len, head_dim).

    * ``kv_heads`` (default ``heads``) must divide ``heads``: query head h reads K/V head
      h // (heads / kv_heads) (grouped-query attention; 1 K/V head is multi-query attention).
    * ``kv_seq_len`` (default ``seq_len``): the keys a query block attends to (a KV cache of
      that length; decode is ``seq_len=1``). With ``causal`` the mask is aligned at the end, as
      for a KV cache: query row r sees key c iff c <= r + (kv_seq_len - seq_len); so a causal
      shape needs kv_seq_len >= seq_len.
    * ``kv_lens`` (default None: every key valid): a key-padding mask, the number of valid
      (leading) keys of each batch element, each in 1..kv_seq_len. Fused kernels skip the
      padded K/V blocks; unfused pipelines compute them and mask.
    * ``dropout``: the probability of zeroing an attention weight (training), in [0, 1)."""

    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: str = "fp16"
    causal: bool = False
    kv_heads: int | None = None
    kv_seq_len: int | None = None
    kv_lens: tuple | None = None
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("batch", "heads", "seq_len", "head_dim"):
            object.__setattr__(self, name, check_positive_int(name, getattr(self, name)))
        check_dtype(self.dtype)
        if not isinstance(self.causal, (bool, np.bool_)):
            raise IosimError(f"causal must be True or False, got {self.causal!r}")
        object.__setattr__(self, "causal", bool(self.causal))
        kv_heads = self.heads if self.kv_heads is None else check_positive_int(
            "kv_heads", self.kv_heads, f"a positive divisor of heads={self.heads}")
        if self.heads % kv_heads:
            raise IosimError(f"kv_heads must divide heads={self.heads} (each K/V head serves "
                             f"a group of query heads), got {kv_heads}")
        object.__setattr__(self, "kv_heads", kv_heads)
        kv_seq_len = self.seq_len if self.kv_seq_len is None else check_positive_int(
            "kv_seq_len", self.kv_seq_len, "a positive integer (keys per sequence)")
        if self.causal and kv_seq_len < self.seq_len:
            raise IosimError(f"a causal shape needs kv_seq_len >= seq_len (the mask is aligned "
                             f"at the end of the keys), got kv_seq_len={kv_seq_len} < "
                             f"seq_len={self.seq_len}")
        object.__setattr__(self, "kv_seq_len", kv_seq_len)
        object.__setattr__(self, "kv_lens", check_kv_lens(self.kv_lens, self.batch, kv_seq_len))
        object.__setattr__(self, "dropout", check_dropout(self.dropout))

    @property
    def elem_bytes(self) -> int:
        """Bytes per element of Q, K, V, O, S and P."""
        return DTYPE_BYTES[self.dtype]

    @property
    def batch_heads(self) -> int:
        return self.batch * self.heads

    @property
    def batch_kv_heads(self) -> int:
        return self.batch * self.kv_heads

    @property
    def group_size(self) -> int:
        """Query heads per K/V head (1: multi-head attention)."""
        return self.heads // self.kv_heads

    @property
    def causal_offset(self) -> int:
        """kv_seq_len - seq_len: query row r sits at key position r + this (causal alignment)."""
        return self.kv_seq_len - self.seq_len

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def valid_kv_len(self, batch_index: int) -> int:
        """Keys of batch element ``batch_index`` that the padding mask leaves valid."""
        return self.kv_seq_len if self.kv_lens is None else self.kv_lens[batch_index]

    def matmul_flops(self) -> int:
        """FLOPs of the two matmuls QKᵀ and PV over all heads (4·B·H·N·N_kv·d), unmasked."""
        return 4 * self.batch_heads * self.seq_len * self.kv_seq_len * self.head_dim

    def describe(self) -> str:
        mask = ", causal" if self.causal else ""
        kv = ""
        if self.kv_heads != self.heads:
            kv += f" Hkv={self.kv_heads}"
        if self.kv_seq_len != self.seq_len:
            kv += f" Nkv={self.kv_seq_len}"
        extra = ""
        if self.kv_lens is not None:
            extra += f", key padding (valid {min(self.kv_lens)}..{max(self.kv_lens)})"
        if self.dropout:
            extra += f", dropout {self.dropout:g}"
        return (f"B={self.batch} H={self.heads}{kv} N={self.seq_len} d={self.head_dim} "
                f"{self.dtype}{mask}{extra}")


def check_kv_lens(kv_lens, batch: int, kv_seq_len: int):
    """``kv_lens`` as a tuple of ``batch`` ints in 1..kv_seq_len (or None), else IosimError."""
    if kv_lens is None:
        return None
    if isinstance(kv_lens, (str, bytes)) or not hasattr(kv_lens, "__len__"):
        raise IosimError(f"kv_lens must be a sequence of {batch} valid key counts (one per "
                         f"batch element), got {kv_lens!r}")
    if len(kv_lens) != batch:
        raise IosimError(f"kv_lens must give one valid key count per batch element "
                         f"({batch}), got {len(kv_lens)}")
    allowed = f"an integer in 1..kv_seq_len={kv_seq_len}"
    values = []
    for b, value in enumerate(kv_lens):
        value = check_positive_int(f"kv_lens[{b}]", value, allowed)
        if value > kv_seq_len:
            raise IosimError(f"kv_lens[{b}] must be {allowed}, got {value}")
        values.append(value)
    return tuple(values)


def check_dropout(dropout) -> float:
    """``dropout`` as a float in [0, 1), else IosimError."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.floating)):
        raise IosimError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    dropout = float(dropout)
    if not (0.0 <= dropout < 1.0):  # NaN fails too
        raise IosimError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    return dropout
