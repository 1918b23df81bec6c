"""Range calibration: search a clipping ratio of the quantization range on a grid.

Weights (``search_weight_range``): for every ratio ``r`` of the grid ``1, ..., 1 - max_shrink`` (descending, so
ties keep the widest range) the weight is quantized with its range multiplied by ``r`` and an error is measured:

- ``objective == "weight"``: ``||Q(W) - W||^2``;
- ``objective == "output"``: the output error ``||X (Q(W) - W)^T||^2`` on calibration inputs ``X``.

With ``granularity == "layer"`` one ratio minimises the total error (the output error is exact, cross-group terms
included). With ``granularity == "group"`` every quantization group picks its own ratio; the output objective
then scores each group by its own contribution ``d_g^T (X_g^T X_g) d_g`` (the block-diagonal part of the
Hessian, exact for per-row groups), which makes the choice separable over groups and lets all groups be
evaluated at once per grid point.

Static activation ranges (``calibrate_activation_range``): one range per input-channel group over all
calibration tokens, optionally clipped by the ratio minimising the activations' own quantization error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.core import (
    as_rows,
    check_finite,
    compute_dtype_for,
    compute_qparams,
    dequantize_codes,
    group_view,
    num_groups,
    quantize_codes,
)
from ..quant.formats import resolve_spec

__all__ = ["RangeSearchResult", "calibrate_activation_range", "clip_ratio_grid", "search_weight_range"]

_OBJECTIVES = ("weight", "output")
_GRANULARITIES = ("layer", "group")


@dataclass
class RangeSearchResult:
    """Outcome of a range search.

    Attributes:
        clip_ratio: ``[1, 1]`` (layer granularity) or ``[R, G]`` (per group), float32.
        grid: The ratios tried, ``[n]``, descending from 1.
        errors: ``[n]`` (layer) or ``[n, R, G]`` (group): the objective of every ratio.
    """

    clip_ratio: torch.Tensor
    grid: torch.Tensor
    errors: torch.Tensor


def clip_ratio_grid(range_cfg, device=None) -> torch.Tensor:
    """The ``num_grids`` ratios from 1 down to ``1 - max_shrink`` (float32)."""
    if range_cfg.num_grids < 1:
        raise ValueError(f"quant.calib_range.num_grids: expected >= 1, got {range_cfg.num_grids}")
    if not 0.0 <= range_cfg.max_shrink < 1.0:
        raise ValueError(f"quant.calib_range.max_shrink: expected in [0, 1), got {range_cfg.max_shrink}")
    return torch.linspace(1.0, 1.0 - range_cfg.max_shrink, range_cfg.num_grids, device=device)


def _validate(range_cfg) -> None:
    if range_cfg.objective not in _OBJECTIVES:
        raise ValueError(f"quant.calib_range.objective: expected one of {_OBJECTIVES}, got {range_cfg.objective!r}")
    if range_cfg.granularity not in _GRANULARITIES:
        raise ValueError(
            f"quant.calib_range.granularity: expected one of {_GRANULARITIES}, got {range_cfg.granularity!r}"
        )


def row_output_errors(d: torch.Tensor, x: torch.Tensor | None = None, hessian: torch.Tensor | None = None):
    """``||X d_o||^2`` for every row ``d_o`` of ``d [out, in]``, through ``X`` or ``H = X^T X``, whichever is cheaper."""
    if x is not None and (hessian is None or x.shape[0] <= d.shape[1]):
        return (x @ d.T).square().sum(dim=0)
    if hessian is None:
        raise ValueError("row_output_errors needs calibration inputs or their Hessian")
    return ((d @ hessian) * d).sum(dim=1)


def search_weight_range(
    w: torch.Tensor, wcfg, range_cfg, x: torch.Tensor | None = None, *, name: str = "weight"
) -> RangeSearchResult:
    """Clipping ratio(s) of weight ``w [out, in]`` for quantizer ``wcfg`` (see the module docstring).

    ``x [tokens, in]`` are the calibration inputs (required by the output objective), already transformed the
    way the layer sees them (e.g. smoothed).
    """
    _validate(range_cfg)
    spec = resolve_spec(wcfg)
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    cdtype = compute_dtype_for(w.dtype)
    w = w.to(cdtype)
    wg = group_view(w, spec.group_size)
    grid = clip_ratio_grid(range_cfg, device=w.device)
    per_layer = range_cfg.granularity == "layer" or spec.group_size == 0
    use_output = range_cfg.objective == "output"
    hessian = block_hessian = None
    if use_output:
        if x is None:
            raise ValueError(f"{name}: quant.calib_range.objective 'output' needs calibration inputs")
        x = as_rows(x).to(cdtype)
        if x.shape[1] != w.shape[1]:
            raise ValueError(f"{name}: inputs have {x.shape[1]} channels, the weight expects {w.shape[1]}")
        if per_layer or spec.group_size == -1:
            if x.shape[0] > w.shape[1]:
                hessian = x.T @ x
        else:
            xg = x.reshape(x.shape[0], wg.shape[1], wg.shape[2]).transpose(0, 1)  # [G, T, K]
            block_hessian = xg.transpose(1, 2) @ xg  # [G, K, K]

    errors = []
    for ratio in grid.tolist():
        scale, zero = compute_qparams(wg, spec, ratio)
        d = dequantize_codes(quantize_codes(wg, scale, zero, spec), scale, zero) - wg  # [R, G, K]
        if not use_output:
            err = d.square().sum(dim=-1)
            errors.append(err.sum() if per_layer else err)
        elif per_layer:
            errors.append(row_output_errors(d.reshape(w.shape), x, hessian).sum())
        elif spec.group_size == -1:
            errors.append(row_output_errors(d.reshape(w.shape), x, hessian).unsqueeze(1))
        else:
            dg = d.transpose(0, 1)  # [G, R, K]
            errors.append(((dg @ block_hessian) * dg).sum(dim=-1).T)
    errors = torch.stack(errors)
    best = errors.argmin(dim=0)
    clip = grid[best].to(torch.float32)
    clip = clip.reshape(1, 1) if per_layer else clip
    return RangeSearchResult(clip_ratio=clip, grid=grid, errors=errors)


def calibrate_activation_range(
    x: torch.Tensor, icfg, range_cfg=None, *, name: str = "inputs"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Static scale (and zero) ``[1, G]`` of the inputs ``x [..., in]`` over all calibration tokens.

    ``icfg.group_size`` must be 0 (one range) or k > 0 (one range per group of k channels): a per-token range
    cannot be static. With an enabled ``range_cfg``, each group's range is clipped by the grid ratio that minimises
    the quantization error of the calibration inputs (``granularity == "layer"``: one ratio for all groups).
    """
    spec = resolve_spec(icfg)
    if spec.group_size == -1:
        raise ValueError(f"{name}: static input quantization needs group_size 0 or k > 0, not -1 (per token)")
    check_finite(x, name)
    x2 = as_rows(x).to(compute_dtype_for(x.dtype))
    tokens, channels = x2.shape
    if spec.group_size == 0:
        xg = x2.reshape(1, 1, -1)
    else:
        groups = num_groups(channels, spec.group_size)
        xg = x2.reshape(tokens, groups, spec.group_size).transpose(0, 1).reshape(1, groups, -1)
    if range_cfg is None or not range_cfg.enabled:
        scale, zero = compute_qparams(xg, spec)
    else:
        _validate(range_cfg)
        grid = clip_ratio_grid(range_cfg, device=x2.device)
        errors = []
        for ratio in grid.tolist():
            scale, zero = compute_qparams(xg, spec, ratio)
            d = dequantize_codes(quantize_codes(xg, scale, zero, spec), scale, zero) - xg
            err = d.square().sum(dim=-1)
            errors.append(err.sum().expand_as(err) if range_cfg.granularity == "layer" else err)
        clip = grid[torch.stack(errors).argmin(dim=0)]
        scale, zero = compute_qparams(xg, spec, clip)
    return scale, None if zero is None else zero.to(spec.fmt.storage_dtype)
