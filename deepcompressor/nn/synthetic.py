"""Quantized layers made from float weights without calibration, for measuring speed, memory and loading (the cost
of a quantized layer does not depend on its values): seeded smoothing scales ``exp(U(-0.5, 0.5))``, a seeded random
low-rank branch carrying about a tenth of the weight's scale, and the residual quantized round-to-nearest."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..quant.functional import quantize
from ..quant.tensor import QuantTensor
from .fake_linear import FakeQuantLinear

__all__ = ["SyntheticFactors", "synthetic_factors", "synthetic_fake_linear"]


@dataclass
class SyntheticFactors:
    """What calibration would have found for one layer: quantized residual, smoothing scale, branch factors."""

    qweight: QuantTensor
    ipts: object | None  # the input quantizer config, None for 16-bit inputs
    smooth_scale: torch.Tensor | None  # float32 [in]
    lowrank_l1: torch.Tensor | None  # [out, r] in quant.low_rank.dtype
    lowrank_l2: torch.Tensor | None  # [r, in]


def synthetic_factors(linear: nn.Linear, layer_cfg, rank: int, smooth: bool, generator: torch.Generator,
                      name: str = "linear") -> SyntheticFactors:
    """The factors of a synthetic layer; ``layer_cfg`` is a ``QuantConfig`` whose ``wgts`` / ``ipts`` apply to it."""
    weight = linear.weight.detach().float()
    device = weight.device
    out_features, in_features = weight.shape
    ipts = layer_cfg.ipts if layer_cfg.ipts.dtype is not None else None
    if ipts is not None and ipts.static:
        raise ValueError(f"{name}: synthetic layers have no calibrated static input ranges (quant.ipts.static)")
    s = None
    if smooth and ipts is not None:
        s = torch.empty(in_features, device=device).uniform_(-0.5, 0.5, generator=generator).exp()
        weight = weight * s
    l1 = l2 = None
    if rank > 0:
        # A branch carrying about a tenth of the weight's scale; the quantized residual makes the layer exact again.
        std = (0.1 * float(weight.std()) / rank**0.5) ** 0.5
        l1 = torch.randn(out_features, rank, device=device, generator=generator) * std
        l2 = torch.randn(rank, in_features, device=device, generator=generator) * std
        weight = weight - l1 @ l2
        dtype = getattr(torch, layer_cfg.low_rank.dtype)
        l1, l2 = l1.to(dtype), l2.to(dtype)
    return SyntheticFactors(quantize(weight, layer_cfg.wgts, name=name), ipts, s, l1, l2)


def synthetic_fake_linear(linear: nn.Linear, layer_cfg, rank: int, smooth: bool, generator: torch.Generator,
                          name: str) -> FakeQuantLinear:
    """The ``FakeQuantLinear`` of a synthetic layer (what ``ptq_infinity`` would install)."""
    f = synthetic_factors(linear, layer_cfg, rank, smooth, generator, name)
    return FakeQuantLinear(linear.in_features, linear.out_features, qweight=f.qweight,
                           bias=None if linear.bias is None else linear.bias.detach(), smooth_scale=f.smooth_scale,
                           lowrank_l1=f.lowrank_l1, lowrank_l2=f.lowrank_l2, wgts=layer_cfg.wgts,
                           ipts=f.ipts if f.ipts is not None else layer_cfg.ipts, name=name)
