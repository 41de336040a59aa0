"""iosim.gpu -- real CUDA attention kernels and the harness that measures them on an H100.

Importable without CuPy: CuPy (and PyTorch) are imported lazily inside the functions that need a GPU.
Entry points: ``python -m gpu.bench``, ``python -m gpu.calibrate``, ``python -m gpu.sanitize``,
``python -m gpu.sass``. Pure-Python parts: ``gpu.reference`` (float64 reference and error rule),
``gpu.schema`` (JSON validator), ``gpu.sweep`` (sweep definitions), ``gpu.ncu`` (ncu CSV parsing).
"""
from .schema import SCHEMA, validate, assert_valid, attention_flops  # noqa: F401

__all__ = ["SCHEMA", "validate", "assert_valid", "attention_flops"]
