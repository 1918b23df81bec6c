"""SVDQuant low-rank branch: ``W ~= L1 @ L2 + Q(W - L1 @ L2)`` with 16-bit factors of rank r.

Refinement: the first branch is the truncated SVD of ``W``; each further iteration takes the truncated SVD of
``W - Q(R)`` (what the quantized residual ``R = W - L1 L2`` misses), re-quantizes the new residual and scores the
whole layer output (activation quantization of the residual path included; the branch reads the unquantized
input). The best iterate is kept; with ``early_stop`` the loop ends at the first iteration that does not improve.

Large matrices use a randomized truncated SVD (Halko, Martinsson & Tropp 2011: Gaussian range finder with
power iterations and re-orthonormalisation, seeded for repeatability); small ones the full SVD.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..quant.formats import scale_dtype_from_name
from ..quant.functional import fake_quantize
from .search import quantize_inputs, quantized_linear_output, squared_error

__all__ = ["LowRankResult", "calibrate_lowrank", "lowrank_factors", "randomized_svd", "truncated_svd"]

logger = logging.getLogger(__name__)

_SVD_METHODS = ("auto", "full", "randomized")


def randomized_svd(a: torch.Tensor, rank: int, *, oversample: int = 16, niter: int = 4,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD ``a ~= U diag(S) V^T`` of ``a [m, n]``: returns ``U [m, r]``, ``S [r]``, ``V [n, r]``."""
    m, n = a.shape
    k = min(rank + oversample, m, n)
    generator = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(n, k, generator=generator, device=a.device, dtype=a.dtype)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    # SVD of the small wide matrix B = Q^T A [k, n] through B^T = Qb Rb: only a k x k SVD (cheap on every device).
    qb, rb = torch.linalg.qr((q.T @ a).T)
    ur, s, vrh = torch.linalg.svd(rb.T)
    return (q @ ur)[:, :rank], s[:rank], (qb @ vrh.T)[:, :rank]


def truncated_svd(a: torch.Tensor, rank: int, method: str = "auto"):
    """``U [m, r]``, ``S [r]``, ``V [n, r]`` by ``full`` SVD, ``randomized`` SVD or ``auto`` (randomized when
    the smaller side exceeds 4 (r + 16))."""
    if method not in _SVD_METHODS:
        raise ValueError(f"quant.low_rank.svd: expected one of {_SVD_METHODS}, got {method!r}")
    if not 0 < rank <= min(a.shape):
        raise ValueError(f"quant.low_rank.rank: {rank} is not in [1, {min(a.shape)}] for a {tuple(a.shape)} matrix")
    if method == "randomized" or (method == "auto" and min(a.shape) > 4 * (rank + 16)):
        return randomized_svd(a, rank)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank].T


def lowrank_factors(w: torch.Tensor, rank: int, method: str = "auto",
                    dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """``L1 = U sqrt(S)`` ``[out, r]`` and ``L2 = sqrt(S) V^T`` ``[r, in]``, rounded to ``dtype`` (the storage
    precision) and returned in ``w``'s dtype so that residuals account for the rounding."""
    u, s, v = truncated_svd(w, rank, method)
    root = s.sqrt()
    l1 = (u * root).to(dtype).to(w.dtype)
    l2 = (v * root).T.to(dtype).to(w.dtype)
    return l1, l2


@dataclass
class LowRankResult:
    """Outcome of ``calibrate_lowrank``.

    Attributes:
        l1, l2: Factors ``[out, r]`` and ``[r, in]`` in the storage dtype.
        residual: ``W - L1 @ L2`` (compute dtype), what the weight quantizer quantizes.
        errors: Objective of every iteration (squared output error, or squared weight error without inputs).
        best_iter: Index of the kept iteration.
    """

    l1: torch.Tensor
    l2: torch.Tensor
    residual: torch.Tensor
    errors: list[float] = field(default_factory=list)
    best_iter: int = 0


def calibrate_lowrank(w: torch.Tensor, xs: torch.Tensor | None, wcfg, lr_cfg, *, icfg=None,
                      y_ref: torch.Tensor | None = None, xq: torch.Tensor | None = None,
                      name: str = "weight") -> LowRankResult:
    """Fit and refine the low-rank branch of the (smoothed) weight ``w [out, in]``.

    Args:
        xs: Smoothed calibration inputs ``[tokens, in]``; without them the weight error is minimised.
        wcfg: Weight quantizer of the residual (round-to-nearest during the refinement).
        lr_cfg: ``LowRankConfig`` (rank, num_iters, early_stop, svd, dtype).
        icfg: Input quantizer of the residual path (None: unquantized inputs).
        y_ref: Reference output ``xs @ w^T`` (computed when omitted).
        xq: ``quantize_inputs(xs, icfg)`` if already computed.
    """
    factor_dtype = scale_dtype_from_name(lr_cfg.dtype, key="quant.low_rank.dtype")
    w = w.float() if w.dtype != torch.float64 else w
    wq_enabled = wcfg is not None and wcfg.dtype is not None
    if xs is not None:
        xs = xs.to(w.dtype)
        if y_ref is None:
            y_ref = xs @ w.T
        if xq is None:
            xq = quantize_inputs(xs, icfg)
    target = w
    result = None
    best_err = float("inf")
    errors = []
    # Errors of outputs divided by their largest value: squares of very large outputs would overflow float32.
    ref = w if xs is None else y_ref
    unit = ref.abs().amax().clamp_min(torch.finfo(ref.dtype).tiny) if ref.numel() else 1.0
    for it in range(max(1, lr_cfg.num_iters)):
        l1, l2 = lowrank_factors(target, lr_cfg.rank, lr_cfg.svd, factor_dtype)
        residual = w - l1 @ l2
        rq = fake_quantize(residual, wcfg, check=False) if wq_enabled else residual
        if xs is None:
            err = float(squared_error((rq + l1 @ l2) / unit, w / unit))
        else:
            err = float(squared_error(quantized_linear_output(xq, rq, xs, l1, l2) / unit, y_ref / unit))
        errors.append(err * float(unit) ** 2)  # reported in the outputs' units (a Python float does not overflow)
        if result is None or err < best_err:
            best_err = err
            result = LowRankResult(l1.to(factor_dtype), l2.to(factor_dtype), residual, best_iter=it)
        elif lr_cfg.early_stop:
            break
        target = w - rq
    result.errors = errors
    logger.debug("%s: low-rank errors per iteration %s (kept %d)", name, errors, result.best_iter)
    return result
