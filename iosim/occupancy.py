"""Occupancy: how many CTAs (and warps) of a kernel one SM keeps resident at once.

The rules are the CUDA occupancy calculator's: a CTA needs its warps, its registers (allocated
per warp in units of ``register_allocation_unit``) and its shared memory (plus the bytes the
driver reserves per CTA); an SM holds as many CTAs as the scarcest of warps, registers, shared
memory and the CTA limit allows. The kernel's registers per thread are the ones it declares
(``Kernel.registers_per_thread``, e.g. what ptxas or Nsight Compute reported) or, when it
declares none, an estimate from its register tiles (:func:`estimate_registers`).

A warp-specialised kernel (``Kernel.producer_warps`` > 0) has copy-only producer warps whose
registers per thread (``Kernel.producer_registers_per_thread``, what ``setmaxnreg`` lowers them
to) differ from its computing warps': each kind is allocated per warp at its own count, and the
register tiles are split over the computing (consumer) threads only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import TilingError

#: Registers a thread needs beyond its tiles: addresses, loop counters, indices, predicates.
REGISTER_OVERHEAD = 32
BYTES_PER_REGISTER = 4
#: Threads one CTA may have (every CUDA GPU since compute capability 2.0).
MAX_THREADS_PER_CTA = 1024
LIMITERS = ("warps", "registers", "smem", "ctas")


@dataclass(frozen=True)
class Occupancy:
    """Resident CTAs and warps per SM for one kernel, and what limits them."""

    ctas_per_sm: int
    warps_per_cta: int
    registers_per_thread: int
    registers_estimated: bool  # True when the kernel declared none
    registers_needed: int  # what its register tiles ask for (registers_needed), uncapped
    smem_bytes_per_cta: int
    limiter: str  # one of LIMITERS
    limits: dict  # limiter -> CTAs per SM that resource alone allows
    # a warp-specialised kernel's copy-only warps and their registers per thread (else 0, None)
    producer_warps: int = 0
    producer_registers_per_thread: int | None = None

    @property
    def spills(self) -> bool:
        """Estimated registers were capped below what the tiles ask for: a real kernel would
        spill to local memory, which the timed model does not charge."""
        return self.registers_estimated and self.registers_needed > self.registers_per_thread

    @property
    def warps_per_sm(self) -> int:
        return self.ctas_per_sm * self.warps_per_cta

    def to_dict(self) -> dict:
        out = asdict(self)
        out["warps_per_sm"] = self.warps_per_sm
        out["spills"] = self.spills
        return out


def registers_needed(kernel, head_dim: int, seq_len: int) -> int:
    """Registers per thread ``kernel``'s register tiles ask for: every tile kept in registers
    ("reg" buffers, 4-byte registers, split over the CTA's threads) plus REGISTER_OVERHEAD,
    uncapped. An upper estimate: it counts every register tile as live at once."""
    from .schedule import full_dims

    dims = full_dims(kernel, head_dim, seq_len)
    tile_bytes = sum(dims[b.rows] * dims[b.cols] * b.elem_bytes
                     for b in kernel.buffers if b.space == "reg")
    threads = 32 * (kernel.warps - _producer_warps(kernel))  # the computing threads hold them
    return math.ceil(tile_bytes / BYTES_PER_REGISTER / threads) + REGISTER_OVERHEAD


def _producer_warps(kernel) -> int:
    """Copy-only warps of ``kernel`` (0 unless it is warp-specialised)."""
    producers = getattr(kernel, "producer_warps", 0) or 0
    if not 0 <= producers < kernel.warps:
        raise TilingError(f"kernel {kernel.name!r} has {producers} producer warps of "
                          f"{kernel.warps}; at least one warp must compute")
    return producers


def _registers_per_warp(registers: int, hardware) -> int:
    """Registers one warp is allocated at ``registers`` per thread (whole allocation units)."""
    unit = hardware.register_allocation_unit
    return math.ceil(registers * 32 / unit) * unit


def producer_registers(kernel, consumer_registers: int) -> int:
    """Registers per thread of ``kernel``'s producer warps: declared, else the consumers'."""
    declared = getattr(kernel, "producer_registers_per_thread", None)
    return consumer_registers if declared is None else declared


def estimate_registers(kernel, head_dim: int, seq_len: int, hardware) -> int:
    """Registers per thread of ``kernel``: :func:`registers_needed`, capped at the hardware's
    per-thread maximum and at what lets one CTA fit the SM's register file (a compiler given
    those bounds spills past them; :attr:`Occupancy.spills` says so)."""
    unit = hardware.register_allocation_unit
    fits_one_cta = hardware.registers_per_sm // kernel.warps // unit * unit // 32
    producers = _producer_warps(kernel)
    declared_producer = getattr(kernel, "producer_registers_per_thread", None)
    if producers and declared_producer is not None:  # what the producers leave the consumers
        left = hardware.registers_per_sm - producers * _registers_per_warp(declared_producer,
                                                                          hardware)
        fits_one_cta = max(1, left // (kernel.warps - producers) // unit * unit // 32)
    return max(1, min(hardware.max_registers_per_thread, fits_one_cta,
                      registers_needed(kernel, head_dim, seq_len)))


def occupancy(kernel, head_dim: int, seq_len: int, hardware) -> Occupancy:
    """Resident CTAs per SM of ``kernel`` on ``hardware`` (see the module docstring).

    Raises :class:`TilingError` when not even one CTA fits an SM."""
    warps = kernel.warps
    if kernel.threads > MAX_THREADS_PER_CTA:
        raise TilingError(f"kernel {kernel.name!r} has {kernel.threads} threads per CTA; at most "
                          f"{MAX_THREADS_PER_CTA} are allowed (use larger rows_per_warp or "
                          "smaller blocks)")
    estimated = kernel.registers_per_thread is None
    registers = (estimate_registers(kernel, head_dim, seq_len, hardware) if estimated
                 else kernel.registers_per_thread)
    if registers > hardware.max_registers_per_thread:
        raise TilingError(f"kernel {kernel.name!r} declares {registers} registers per thread; "
                          f"the hardware allows at most {hardware.max_registers_per_thread}")
    smem = kernel.smem_bytes(head_dim, seq_len)
    producers = _producer_warps(kernel)
    producer_regs = producer_registers(kernel, registers) if producers else None
    if producer_regs is not None and not 1 <= producer_regs <= hardware.max_registers_per_thread:
        raise TilingError(f"kernel {kernel.name!r} declares {producer_regs} registers per "
                          f"producer thread; the hardware allows 1 to "
                          f"{hardware.max_registers_per_thread}")
    registers_per_cta = _registers_per_warp(registers, hardware) * (warps - producers)
    if producers:
        registers_per_cta += _registers_per_warp(producer_regs, hardware) * producers
    smem_per_cta = smem + hardware.smem_reserved_bytes_per_cta
    limits = {
        "warps": hardware.max_warps_per_sm // warps,
        "registers": hardware.registers_per_sm // registers_per_cta,
        "smem": hardware.sram_bytes_per_sm // smem_per_cta if smem > 0 else math.inf,
        "ctas": hardware.max_ctas_per_sm,
    }
    limiter = min(LIMITERS, key=lambda name: limits[name])
    ctas = limits[limiter]
    if ctas < 1:
        raise TilingError(
            f"one CTA of kernel {kernel.name!r} ({warps} warps, {registers} registers per "
            f"thread, {smem} bytes of shared memory) does not fit an SM of {hardware.name} "
            f"(limited by {limiter})")
    return Occupancy(ctas_per_sm=int(ctas), warps_per_cta=warps,
                     registers_per_thread=registers, registers_estimated=estimated,
                     registers_needed=registers_needed(kernel, head_dim, seq_len),
                     smem_bytes_per_cta=smem, limiter=limiter,
                     limits={k: (int(v) if math.isfinite(v) else None)
                             for k, v in limits.items()},
                     producer_warps=producers, producer_registers_per_thread=producer_regs)
