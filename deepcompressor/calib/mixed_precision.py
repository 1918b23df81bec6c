"""Mixed precision (``quant.mixed_precision``): which layers keep a higher precision, and in which format.

A layer's sensitivity is the relative output error of the layer quantized alone with the chain's formats
(round-to-nearest weights, inputs quantized as configured; no smoothing, branch or search) on its calibration
inputs. The most sensitive layers are kept at the higher precision: as many as ``keep``, and no more than the
extra weight bytes ``max_extra_bytes_ratio`` allows. Pure functions; ``ptq_infinity`` measures the inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from ..quant.core import quantized_weight_bytes
from ..quant.functional import fake_quantize
from .search import quantize_inputs, quantized_linear_output, relative_error

__all__ = ["choose_layers", "high_precision_config", "layer_sensitivity", "weight_bytes"]

def high_precision_config(layer_cfg, precision: str):
    """``layer_cfg`` (a ``QuantConfig``) with the formats of ``precision``: ``sint8`` (weights per output channel,
    inputs per token, dynamic) or ``bf16`` (nothing quantized)."""
    if precision == "bf16":
        return dataclasses.replace(layer_cfg, wgts=dataclasses.replace(layer_cfg.wgts, dtype=None),
                                   ipts=dataclasses.replace(layer_cfg.ipts, dtype=None))
    if precision != "sint8":
        raise ValueError(f"quant.mixed_precision.precision: {precision!r} is not sint8 or bf16")
    wgts = layer_cfg.wgts
    if wgts.dtype is not None:
        wgts = dataclasses.replace(wgts, dtype="sint8", group_size=-1)
    ipts = layer_cfg.ipts
    if ipts.dtype is not None:
        ipts = dataclasses.replace(ipts, dtype="sint8", group_size=-1, static=False)
    return dataclasses.replace(layer_cfg, wgts=wgts, ipts=ipts)


def weight_bytes(out_features: int, in_features: int, wcfg) -> int:
    """Bytes of a weight in the format ``wcfg`` (16-bit when its dtype is None): codes plus one scale per group."""
    if wcfg is None or wcfg.dtype is None:
        return 2 * out_features * in_features
    return quantized_weight_bytes(out_features, in_features, wcfg)


@torch.no_grad()
def layer_sensitivity(weight: torch.Tensor, x: torch.Tensor, layer_cfg, bias: torch.Tensor | None = None) -> float:
    """Relative output error of the linear quantized alone, round-to-nearest, on inputs ``x [tokens, in]``."""
    w = weight.float()
    xf = x.float()
    wq = fake_quantize(w, layer_cfg.wgts, check=False) if layer_cfg.wgts.dtype is not None else w
    xq = quantize_inputs(xf, layer_cfg.ipts)
    b = None if bias is None else bias.float()
    return relative_error(quantized_linear_output(xq, wq, bias=b), torch.nn.functional.linear(xf, w, b))


def choose_layers(sensitivity: Mapping[str, float], extra_bytes: Mapping[str, int], base_bytes: int, keep: int,
                  max_extra_bytes_ratio: float) -> list[str]:
    """The layers to keep at the higher precision, the most sensitive first (ties by name)."""
    chosen, spent = [], 0
    budget = max_extra_bytes_ratio * base_bytes if max_extra_bytes_ratio > 0 else None
    for name in sorted(sensitivity, key=lambda n: (-sensitivity[n], n)):
        if keep > 0 and len(chosen) >= keep:
            break
        if budget is not None and spent + extra_bytes[name] > budget:
            continue
        chosen.append(name)
        spent += extra_bytes[name]
    return chosen
