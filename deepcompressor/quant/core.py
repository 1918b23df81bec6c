"""The one arithmetic of quantization, shared by the fake (quantize-dequantize) and the real (integer) paths.

Layout: a tensor ``[..., n]`` is seen as ``rows x n`` (leading dims flattened) and grouped along the last
(input / reduction) dimension into a ``[R, G, K]`` view:

- ``group_size == 0``: one group for the whole tensor, ``[1, 1, rows * n]``;
- ``group_size == -1``: one group per row (per output channel of a weight, per token of an activation),
  ``[rows, 1, n]``;
- ``group_size == k > 0``: ``[rows, n // k, k]``; ``n`` must be a multiple of ``k``.

Quantization parameters have shape ``[R, G]`` (``R`` is 1 for static activation scales shared by all tokens).
Codes are ``clamp(round(x / scale) + zero, qmin, qmax)``; ``torch.round`` rounds half to even. Values are
reconstructed as ``(code - zero) * scale``. Scales are rounded to their storage dtype (clamped into its finite
normal range, so an all-zero group gets the smallest normal scale and reconstructs exactly 0) before they are
used, so codes computed from a fresh range and codes computed from stored parameters agree exactly.
Arithmetic runs in float32, or float64 when the input is float64.
"""

from __future__ import annotations

import torch

from .formats import QuantSpec

__all__ = [
    "as_rows",
    "check_finite",
    "compute_dtype_for",
    "compute_qparams",
    "dequantize_codes",
    "group_view",
    "num_groups",
    "quantize_codes",
]


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` -> ``[rows, n]`` (a 1-D tensor is one row)."""
    if x.dim() == 0:
        raise ValueError("cannot quantize a 0-d tensor: expected at least one dimension")
    return x.reshape(-1, x.shape[-1])


def quantized_weight_bytes(out_features: int, in_features: int, wcfg) -> int:
    """Bytes of an ``[out, in]`` weight quantized with ``wcfg`` (a quantizer config with a dtype): the codes plus
    a scale (and a zero point for asymmetric formats) per group."""
    from .formats import resolve_spec

    spec = resolve_spec(wcfg)
    groups = num_groups(in_features, spec.group_size)
    rows = 1 if spec.group_size == 0 else out_features
    total = out_features * in_features * spec.fmt.bits // 8
    total += rows * groups * torch.empty(0, dtype=spec.scale_dtype).element_size()
    if spec.has_zero:
        total += rows * groups
    return total


def num_groups(n: int, group_size: int) -> int:
    """Number of groups along an input dimension of size ``n``."""
    if group_size in (0, -1):
        return 1
    if group_size < -1:
        raise ValueError(f"group_size: expected -1, 0 or k > 0, got {group_size}")
    if n % group_size:
        raise ValueError(f"group_size={group_size} does not divide the input dimension {n}")
    return n // group_size


def group_view(x2d: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[rows, n]`` -> ``[R, G, K]`` (see the module docstring)."""
    rows, n = x2d.shape
    if group_size == 0:
        return x2d.reshape(1, 1, rows * n)
    if group_size == -1:
        return x2d.reshape(rows, 1, n)
    return x2d.reshape(rows, num_groups(n, group_size), group_size)


def check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or Inf values; cannot quantize")


def _divide(x: torch.Tensor, constant: float) -> torch.Tensor:
    """``x / constant`` correctly rounded on every device: PyTorch's CUDA kernels turn a division by a Python scalar
    into a multiplication by its reciprocal (one ulp off in some groups), a tensor divisor keeps true division."""
    return x / torch.full_like(x, float(constant))


def _store_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    info = torch.finfo(spec.scale_dtype)
    return scale.clamp(min=info.tiny, max=info.max).to(spec.scale_dtype)


def compute_qparams(
    xg: torch.Tensor, spec: QuantSpec, clip_ratio: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (in ``spec.scale_dtype``) and zero point (integer-valued, compute dtype, or None) of each group.

    Args:
        xg: Grouped view ``[R, G, K]`` in the compute dtype.
        clip_ratio: Optional factor (scalar or broadcastable to ``[R, G]``) applied to the range: the clipping
            ratio found by the range search.
    """
    fmt = spec.fmt
    if spec.symmetric:
        absmax = xg.abs().amax(dim=-1)
        if clip_ratio is not None:
            absmax = absmax * clip_ratio
        scale = _store_scale(_divide(absmax, fmt.symmetric_qmax), spec)
        if fmt.signed:
            return scale, None
        return scale, torch.full(scale.shape, float(fmt.symmetric_zero), dtype=xg.dtype, device=xg.device)
    xmin = xg.amin(dim=-1).clamp(max=0)
    xmax = xg.amax(dim=-1).clamp(min=0)
    if clip_ratio is not None:
        xmin = xmin * clip_ratio
        xmax = xmax * clip_ratio
    scale = _store_scale(_divide(xmax - xmin, fmt.qmax - fmt.qmin), spec)
    zero = torch.round(fmt.qmin - xmin / scale.to(xg.dtype)).clamp(fmt.qmin, fmt.qmax)
    return scale, zero


def quantize_codes(
    xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """Integer-valued codes (compute dtype) of ``xg`` ``[R, G, K]`` with parameters ``[R or 1, G]``."""
    codes = torch.round(xg / scale.to(xg.dtype).unsqueeze(-1))
    if zero is not None:
        codes = codes + zero.to(xg.dtype).unsqueeze(-1)
    return codes.clamp_(spec.fmt.qmin, spec.fmt.qmax)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """``(codes - zero) * scale`` on the grouped view, in the dtype of ``codes``."""
    if zero is not None:
        codes = codes - zero.to(codes.dtype).unsqueeze(-1)
    return codes * scale.to(codes.dtype).unsqueeze(-1)
