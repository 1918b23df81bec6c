"""Integer formats and the resolved settings of one quantizer.

A format is a signed or unsigned integer of ``bits`` bits with codes in ``[qmin, qmax]``:

=========  ====  ======  ======
name       bits  qmin    qmax
=========  ====  ======  ======
``sint4``  4     -8      7
``uint4``  4     0       15
``sint8``  8     -128    127
``uint8``  8     0       255
=========  ====  ======  ======

Symmetric quantization has no data-dependent zero point: ``scale = absmax / (2**(bits-1) - 1)``. For a signed
format the zero point is 0; for an unsigned format it is the fixed mid code ``2**(bits-1)`` (the code of a
symmetric unsigned quantizer is the signed code shifted by the mid code, the convention of GPTQ), so the two
symmetric variants represent the same values. Asymmetric quantization maps ``[min(x, 0), max(x, 0)]`` onto
``[qmin, qmax]`` with an integer zero point in ``[qmin, qmax]`` (0 is always exactly representable).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["FORMATS", "IntFormat", "QuantSpec", "get_format", "resolve_spec", "scale_dtype_from_name"]


@dataclass(frozen=True)
class IntFormat:
    """An integer format: ``bits`` bits, signed or unsigned."""

    name: str
    bits: int
    signed: bool

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def symmetric_qmax(self) -> int:
        """Largest code magnitude of a symmetric quantizer (7 for 4 bits, 127 for 8 bits)."""
        return (1 << (self.bits - 1)) - 1

    @property
    def symmetric_zero(self) -> int:
        """Fixed zero point of a symmetric quantizer: 0 when signed, the mid code when unsigned."""
        return 0 if self.signed else 1 << (self.bits - 1)

    @property
    def storage_dtype(self) -> torch.dtype:
        """Container dtype of unpacked codes and zero points."""
        return torch.int8 if self.signed else torch.uint8


FORMATS: dict[str, IntFormat] = {
    name: IntFormat(name, bits, signed)
    for name, bits, signed in (("sint4", 4, True), ("uint4", 4, False), ("sint8", 8, True), ("uint8", 8, False))
}

_SCALE_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def get_format(name: str, key: str = "dtype") -> IntFormat:
    """The format called ``name``; ``key`` names the config key in the error message."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"{key}: unknown integer format {name!r}; expected one of {sorted(FORMATS)}") from None


def scale_dtype_from_name(name: str, key: str = "scale_dtype") -> torch.dtype:
    try:
        return _SCALE_DTYPES[name]
    except KeyError:
        raise ValueError(f"{key}: unknown scale dtype {name!r}; expected one of {sorted(_SCALE_DTYPES)}") from None


@dataclass(frozen=True)
class QuantSpec:
    """Validated settings of one quantizer (what a ``QuantizerConfig`` means, resolved once)."""

    fmt: IntFormat
    group_size: int
    symmetric: bool
    scale_dtype: torch.dtype

    @property
    def has_zero(self) -> bool:
        """Whether the quantized form carries a zero point (asymmetric, or symmetric unsigned)."""
        return not self.symmetric or not self.fmt.signed


@functools.lru_cache(maxsize=256)
def _resolve(dtype: str, group_size: int, symmetric: bool, scale_dtype: str) -> QuantSpec:
    fmt = get_format(dtype)
    if not isinstance(group_size, int) or group_size < -1:
        raise ValueError(f"group_size: expected -1 (per row), 0 (per tensor) or k > 0, got {group_size!r}")
    return QuantSpec(fmt, group_size, bool(symmetric), scale_dtype_from_name(scale_dtype))


def resolve_spec(cfg) -> QuantSpec:
    """Resolve a ``QuantizerConfig`` (or anything with ``dtype``, ``group_size``, ``symmetric``, ``scale_dtype``).

    Raises ``ValueError`` when the config disables quantization (``dtype is None``) or names an unknown format.
    """
    if isinstance(cfg, QuantSpec):
        return cfg
    if cfg.dtype is None:
        raise ValueError("dtype is None: this quantizer is disabled, nothing to quantize")
    return _resolve(cfg.dtype, cfg.group_size, cfg.symmetric, cfg.scale_dtype)
