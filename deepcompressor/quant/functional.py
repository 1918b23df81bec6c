"""Quantize, dequantize and fake-quantize tensors (weights statically, activations dynamically or statically).

``fake_quantize(x, cfg)`` and ``quantize(x, cfg).dequantize(x.dtype)`` run the same arithmetic
(``quant.core``) and agree bit for bit. Parameters are either computed from ``x`` (dynamic: weights, or
per-token / per-group activation ranges at run time) or given (static: calibrated ``scale`` / ``zero``).
"""

from __future__ import annotations

import torch

from .core import (
    as_rows,
    check_finite,
    compute_dtype_for,
    compute_qparams,
    dequantize_codes,
    group_view,
    quantize_codes,
)
from .formats import QuantSpec, resolve_spec
from .tensor import QuantTensor

__all__ = ["dequantize", "fake_quantize", "quantization_params", "quantize"]


def _validate_params(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec, name: str):
    rows, groups = xg.shape[:2]
    if scale.dim() != 2 or scale.shape[1] != groups or scale.shape[0] not in (1, rows):
        raise ValueError(f"{name}: static scale of shape {tuple(scale.shape)} does not fit the {groups} groups "
                         f"(expected [1 or {rows}, {groups}])")
    if spec.has_zero and zero is None:
        raise ValueError(f"{name}: this quantizer ({spec.fmt.name}, symmetric={spec.symmetric}) needs a zero point")
    if not spec.has_zero and zero is not None:
        raise ValueError(f"{name}: a symmetric signed quantizer takes no zero point")
    if zero is not None and zero.shape != scale.shape:
        raise ValueError(f"{name}: zero shape {tuple(zero.shape)} differs from scale shape {tuple(scale.shape)}")


def _codes(x, cfg, scale, zero, clip_ratio, name, check):
    spec = resolve_spec(cfg)
    if check:
        check_finite(x, name)
    cdtype = compute_dtype_for(x.dtype)
    xg = group_view(as_rows(x).to(cdtype), spec.group_size)
    if scale is None:
        if zero is not None:
            raise ValueError(f"{name}: a zero point was given without a scale")
        scale, zero = compute_qparams(xg, spec, clip_ratio)
    else:
        if clip_ratio is not None:
            raise ValueError(f"{name}: clip_ratio only applies when the scale is computed, not to a given scale")
        _validate_params(xg, scale, zero, spec, name)
        scale = scale.to(spec.scale_dtype)
        zero = None if zero is None else zero.to(cdtype)
    return spec, xg, quantize_codes(xg, scale, zero, spec), scale, zero


def quantize(x: torch.Tensor, cfg, *, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
             clip_ratio: torch.Tensor | float | None = None, name: str = "tensor", check: bool = True) -> QuantTensor:
    """Real quantization of ``x [..., n]`` grouped along its last dimension.

    Args:
        cfg: A ``QuantizerConfig`` (or resolved ``QuantSpec``) with an integer ``dtype``.
        scale, zero: Static parameters ``[1 or R, G]`` (e.g. calibrated activation ranges); computed from ``x``
            when omitted.
        clip_ratio: Scalar or ``[R, G]`` factor on the computed range (the range search's result).
        name: Names the tensor (layer) in error messages.
        check: Raise on NaN / Inf input (one device sync).
    """
    spec, _, codes, scale, zero = _codes(x, cfg, scale, zero, clip_ratio, name, check)
    storage = spec.fmt.storage_dtype
    return QuantTensor(
        codes=codes.reshape(x.shape).to(storage),
        scale=scale,
        zero=None if zero is None else zero.to(storage),
        dtype=spec.fmt.name,
        group_size=spec.group_size,
        shape=tuple(x.shape),
    )


def fake_quantize(x: torch.Tensor, cfg, *, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                  clip_ratio: torch.Tensor | float | None = None, name: str = "tensor",
                  check: bool = True) -> torch.Tensor:
    """Quantize-dequantize ``x`` (same arguments as ``quantize``); returns ``x``'s dtype and shape."""
    _, _, codes, scale, zero = _codes(x, cfg, scale, zero, clip_ratio, name, check)
    return dequantize_codes(codes, scale, zero).reshape(x.shape).to(x.dtype)


def dequantize(qt: QuantTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return qt.dequantize(dtype)


def quantization_params(x: torch.Tensor, cfg, *, clip_ratio: torch.Tensor | float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (scale dtype) and zero (int container dtype, or None) that ``quantize(x, cfg)`` would use."""
    spec = resolve_spec(cfg)
    xg = group_view(as_rows(x).to(compute_dtype_for(x.dtype)), spec.group_size)
    scale, zero = compute_qparams(xg, spec, clip_ratio)
    return scale, None if zero is None else zero.to(spec.fmt.storage_dtype)
