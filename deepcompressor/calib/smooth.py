"""Smoothing (SmoothQuant, as used by SVDQuant): migrate activation outliers into the weights.

Per input channel ``j``: ``s_j = max|X_j|^alpha / max|W_j|^beta``; the layer computes ``(x / s) @ (W * s)^T``, the
same product, with flatter inputs. ``max|W_j|`` is taken over the rows of every linear that reads the input, so
one ``s`` serves them all (e.g. separate q/k/v projections). Both maxima are clamped to at least ``1e-5`` so that
``s`` is finite and positive for dead channels.

The search scores every candidate ``(alpha, beta)`` by the squared output error of the fully quantized layers
(quantized inputs, round-to-nearest weights, and the rank-r SVD branch of ``W * s`` when the low-rank branch is
enabled: one SVD per candidate, the iterative refinement runs once ``s`` is chosen) against the float outputs.
Candidates are ``(0, 0)`` (no smoothing, first so that ties keep it) and ``(i/n, 1 - i/n)``, plus ``(i/n, 0)`` with
``beta_zero`` (scales from the activations alone, ``s = max|X|^alpha``: the cheap candidates other SmoothQuant
searches use, which pick them on real layers), or every pair of the grid with ``search_beta``.

Gain-projected scaling (GPS, ``quant.smooth.strategy``): a closed form instead of the grid. To second order, the
output error of the smoothed, quantized product is ``sum_j E[dx_j^2] s_j^2 ||W_:j||^2 + E[dw_j^2] ||X_j||^2 / s_j^2``,
where ``dx_j`` is the quantization noise of the smoothed input ``X_j / s_j`` and ``dw_j`` that of the smoothed weight
column ``W_:j s_j``. With group quantizers the noise variances are set by the group's step, common to the channels
of a group, so each term is minimised by ``s_j^4 = c * ||X_j||^2 / ||W_:j||^2``, the constant ``c`` being the same
for a group; scaling a whole group of ``s`` leaves group-aligned quantization of both operands unchanged, so ``c``
does not matter:

    s_j = (||X_j||^2 / sum over the linears and rows of W_ij^2) ^ (1/4)

(normalised to a geometric mean of 1). ``gps`` uses it alone (no candidate is evaluated); ``gps+grid`` adds it as
the starting point of the search: the candidates ``s_gps ^ gamma`` for ``gamma`` in ``GPS_EXPONENTS`` are scored
with the grid's ``(alpha, beta)`` pairs and the best of all is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..quant.formats import scale_dtype_from_name
from ..quant.functional import fake_quantize
from .lowrank import lowrank_factors
from .search import quantize_inputs, quantized_linear_output, squared_error

__all__ = [
    "GPS_EXPONENTS",
    "SMOOTH_STRATEGIES",
    "SmoothSearchResult",
    "fold_smooth_into_linear",
    "fold_smooth_into_norm",
    "gps_scale",
    "search_smooth_scale",
    "smooth_candidates",
    "smooth_scale",
]

_MIN_RANGE = 1e-5
SMOOTH_STRATEGIES = ("grid", "gps", "gps+grid")
GPS_EXPONENTS = (0.5, 0.75, 1.0, 1.25, 1.5)
_GPS_LIMIT = 1e4  # bound on s and 1 / s: a dead input channel or weight column would otherwise send s to 0 or inf


def _gps_log_ratio(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``log(||X_j||^2 / sum W_ij^2)`` per input channel."""
    energy_x = x.float().square().sum(dim=0)
    energy_w = sum(w.float().square().sum(dim=0) for w in weights)
    tiny = torch.finfo(torch.float32).tiny
    return energy_x.clamp_min(tiny).log() - energy_w.clamp_min(tiny).log()


def _gps_from_log_ratio(log_ratio: torch.Tensor, gamma: float) -> torch.Tensor:
    log_s = (gamma / 4) * log_ratio
    log_s = log_s - log_s.mean()
    limit = torch.log(torch.tensor(_GPS_LIMIT, device=log_s.device))
    return log_s.clamp(-limit, limit).exp()


def gps_scale(x: torch.Tensor, weights: Sequence[torch.Tensor], gamma: float = 1.0) -> torch.Tensor:
    """Gain-projected smoothing scale (module docstring) of inputs ``x [tokens, in]`` read by ``weights`` (each
    ``[out_i, in]``), raised to ``gamma``; float32 ``[in]`` with geometric mean 1."""
    return _gps_from_log_ratio(_gps_log_ratio(x, weights), gamma)


def smooth_scale(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``max|X|^alpha / max|W|^beta`` per channel, with both maxima clamped to ``>= 1e-5``."""
    return x_absmax.clamp_min(_MIN_RANGE).pow(alpha) / w_absmax.clamp_min(_MIN_RANGE).pow(beta)


def smooth_candidates(smooth_cfg) -> list[tuple[float, float]]:
    """The ``(alpha, beta)`` pairs the search tries, in order."""
    n = smooth_cfg.num_grids
    if n < 1:
        raise ValueError(f"quant.smooth.num_grids: expected >= 1, got {n}")
    steps = [i / n for i in range(n + 1)]
    if smooth_cfg.search_beta:
        return [(a, b) for a in steps for b in steps]
    pairs = [(0.0, 0.0)] + [(a, 1.0 - a) for a in steps]
    if getattr(smooth_cfg, "beta_zero", False):
        pairs += [(a, 0.0) for a in steps if 0.0 < a < 1.0]  # (0, 0) and (1, 0) are already there
    return pairs


@dataclass
class SmoothSearchResult:
    """Outcome of ``search_smooth_scale``.

    Attributes:
        scale: ``s [in]`` (float32); inputs are divided by it, weight columns multiplied.
        alpha, beta: The chosen exponents (None when a GPS scale was chosen).
        candidates: Every ``(alpha, beta)`` tried.
        errors: Summed squared output error of every candidate: the ``(alpha, beta)`` ones, then the GPS ones.
        gamma: The chosen GPS exponent (None when a grid candidate was chosen).
        gps_exponents: The GPS exponents tried.
    """

    scale: torch.Tensor
    alpha: float | None
    beta: float | None
    candidates: list[tuple[float, float]]
    errors: torch.Tensor
    gamma: float | None = None
    gps_exponents: tuple[float, ...] = ()


def search_smooth_scale(weights: Sequence[torch.Tensor], x: torch.Tensor, qcfg, *,
                        y_refs: Sequence[torch.Tensor] | None = None, name: str = "linear") -> SmoothSearchResult:
    """Search the smoothing scale shared by ``weights`` (each ``[out_i, in]``) reading inputs ``x [tokens, in]``.

    Args:
        qcfg: ``QuantConfig``: uses ``wgts``, ``ipts``, ``smooth`` and ``low_rank``.
        y_refs: Float outputs ``x @ w_i^T`` if already computed.
    """
    weights = [w.float() for w in weights]
    x = x.float()
    for i, w in enumerate(weights):
        if w.shape[1] != x.shape[1]:
            raise ValueError(f"{name}[{i}]: weight expects {w.shape[1]} inputs, calibration inputs have {x.shape[1]}")
    strategy = getattr(qcfg.smooth, "strategy", "grid")
    if strategy not in SMOOTH_STRATEGIES:
        raise ValueError(f"quant.smooth.strategy: {strategy!r} is not one of {', '.join(SMOOTH_STRATEGIES)}")
    if strategy == "gps":  # the closed form alone: nothing to score
        return SmoothSearchResult(gps_scale(x, weights), None, None, [], torch.zeros(0, device=x.device), 1.0, (1.0,))
    if y_refs is None:
        y_refs = [x @ w.T for w in weights]
    x_absmax = x.abs().amax(dim=0)
    w_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
    wcfg, lr_cfg = qcfg.wgts, qcfg.low_rank
    quantize_weights = wcfg is not None and wcfg.dtype is not None
    factor_dtype = scale_dtype_from_name(lr_cfg.dtype, key="quant.low_rank.dtype") if lr_cfg.enabled else None
    candidates = smooth_candidates(qcfg.smooth)
    exponents = GPS_EXPONENTS if strategy == "gps+grid" else ()
    scales = [smooth_scale(x_absmax, w_absmax, a, b) for a, b in candidates]
    if exponents:
        log_ratio = _gps_log_ratio(x, weights)
        scales += [_gps_from_log_ratio(log_ratio, gamma) for gamma in exponents]
    errors = []
    for s in scales:
        xs = x / s
        xq = quantize_inputs(xs, qcfg.ipts)
        err = torch.zeros((), device=x.device)
        for w, y_ref in zip(weights, y_refs):
            ws = w * s
            l1 = l2 = None
            if lr_cfg.enabled:
                l1, l2 = lowrank_factors(ws, lr_cfg.rank, lr_cfg.svd, factor_dtype)
                ws = ws - l1 @ l2
            wq = fake_quantize(ws, wcfg, check=False) if quantize_weights else ws
            err = err + squared_error(quantized_linear_output(xq, wq, xs, l1, l2), y_ref)
        errors.append(err)
    errors = torch.stack(errors)
    best = int(errors.argmin())
    if best >= len(candidates):
        return SmoothSearchResult(scales[best], None, None, candidates, errors, exponents[best - len(candidates)],
                                  exponents)
    alpha, beta = candidates[best]
    return SmoothSearchResult(scales[best], alpha, beta, candidates, errors, None, exponents)


def fold_smooth_into_norm(weight: torch.Tensor | None, bias: torch.Tensor | None,
                          s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Affine of a norm whose output feeds the smoothed linears: ``(weight / s, bias / s)``.

    A norm without affine weight cannot absorb ``s``: the caller keeps the division at run time.
    """
    if weight is None:
        raise ValueError("fold_smooth_into_norm: the norm has no affine weight; keep the smoothing scale at run time")
    if weight.shape != s.shape:
        raise ValueError(f"fold_smooth_into_norm: norm weight {tuple(weight.shape)} vs scale {tuple(s.shape)}")
    new_weight = (weight.float() / s).to(weight.dtype)
    new_bias = None if bias is None else (bias.float() / s).to(bias.dtype)
    return new_weight, new_bias


def fold_smooth_into_linear(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor,
                            rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A producing linear whose output rows ``rows`` (all by default) are the smoothed input: divide those rows of
    its weight and bias by ``s`` (e.g. the value rows of a fused qkv projection before the output projection).
    Returns new tensors; the inputs are not modified."""
    rows = slice(None) if rows is None else rows
    new_weight = weight.clone()
    block = new_weight[rows]
    if block.shape[0] != s.shape[0]:
        raise ValueError(f"fold_smooth_into_linear: {block.shape[0]} selected rows vs scale of {s.shape[0]} channels")
    new_weight[rows] = (block.float() / s.unsqueeze(1)).to(weight.dtype)
    new_bias = None
    if bias is not None:
        new_bias = bias.clone()
        new_bias[rows] = (bias[rows].float() / s).to(bias.dtype)
    return new_weight, new_bias
