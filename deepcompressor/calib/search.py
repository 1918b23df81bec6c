"""Shared pieces of the calibration searches: token subsampling, the quantized layer output, errors, timing.

The quantized output of a linear (one place, used by every search and by ``FakeQuantLinear``)::

    y = Q_a(x / s) @ W_main^T + ((x / s) @ L2^T) @ L1^T (+ bias)

where ``W_main`` is the (fake-)quantized residual ``W * s - L1 @ L2`` and the low-rank branch reads the smoothed
input before activation quantization (SVDQuant).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from ..quant.functional import fake_quantize
from ..utils.device import synchronize
from .range import calibrate_activation_range

__all__ = [
    "StageTimer",
    "input_quantizer_enabled",
    "quantize_inputs",
    "quantized_linear_output",
    "relative_error",
    "squared_error",
    "subsample_tokens",
    "synchronize",
]


def subsample_tokens(x: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """``x [..., in]`` as ``[tokens, in]`` keeping at most ``max_tokens`` evenly spaced rows (deterministic)."""
    x2 = x.reshape(-1, x.shape[-1])
    if max_tokens <= 0 or x2.shape[0] <= max_tokens:
        return x2
    index = torch.linspace(0, x2.shape[0] - 1, max_tokens, device=x2.device).round().long()
    return x2.index_select(0, index)


def input_quantizer_enabled(icfg) -> bool:
    return icfg is not None and icfg.dtype is not None


def quantize_inputs(xs: torch.Tensor, icfg, *, scale: torch.Tensor | None = None,
                    zero: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize layer inputs per ``icfg`` (identity when disabled).

    Dynamic: ranges from ``xs`` itself (per token / group). Static: the given ``scale`` / ``zero``, or ranges
    calibrated on ``xs`` (plain min/max) when none are given.
    """
    if not input_quantizer_enabled(icfg):
        return xs
    if getattr(icfg, "static", False) and scale is None:
        scale, zero = calibrate_activation_range(xs, icfg)
    return fake_quantize(xs, icfg, scale=scale, zero=zero, check=False)


def quantized_linear_output(xq: torch.Tensor, w_main: torch.Tensor, xs: torch.Tensor | None = None,
                            l1: torch.Tensor | None = None, l2: torch.Tensor | None = None,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``xq @ w_main^T + (xs @ l2^T) @ l1^T + bias`` (the branch and bias only when given)."""
    y = torch.nn.functional.linear(xq, w_main, bias)
    if l1 is not None:
        y = y + (xs @ l2.T) @ l1.T
    return y


def squared_error(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``||y - ref||^2`` as a 0-d tensor (no device sync)."""
    return (y - ref).square().sum()


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``||y - ref|| / ||ref||`` (0 when both are 0), computed on values divided by ``max |ref|`` so that squares of
    large outputs do not overflow float32."""
    scale = ref.abs().amax().clamp_min(torch.finfo(ref.dtype).tiny) if ref.numel() else 1.0
    num, den = float(((y - ref) / scale).norm()), float((ref / scale).norm())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


class StageTimer:
    """Wall-clock seconds per named stage, synchronising the device at stage boundaries only."""

    def __init__(self, device: torch.device | str):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
