"""GPTQ (Frantar et al. 2023): column-by-column quantization with second-order error feedback.

With ``H = 2 X^T X / tokens`` (accumulated in float32, dampened by ``damp * mean(diag H)``), ``U`` the upper
Cholesky factor of ``H^-1``, every column ``i`` is quantized, its error ``(w_i - q_i) / U_ii`` is spread onto the
columns not yet quantized through row ``i`` of ``U``, inside a block of ``block_size`` columns, and the block's
accumulated error reaches the later columns in one matrix product (lazy batch updates).

Groups: with ``group_size = k > 0`` and the natural column order, the parameters of a group are computed from the
error-updated weights when its first column is reached (the block size is rounded up to a multiple of k so that a
group never straddles two blocks). With ``act_order`` (columns in decreasing ``diag H``) the groups stay the groups
of the original column order and their parameters are computed up front from the weight before any update
("static groups"), so the result is an ordinary group-wise ``QuantTensor``. Per-row and per-tensor parameters are
always computed up front. Explicit ``scale`` / ``zero`` (e.g. from a range search) are used as given.

The codes are produced by ``quant.core``'s arithmetic: ``result.dequantize()`` is exactly the weight GPTQ chose.
"""

from __future__ import annotations

import logging

import torch

from ..quant.core import compute_qparams, dequantize_codes, group_view, num_groups, quantize_codes
from ..quant.formats import resolve_spec
from ..quant.tensor import QuantTensor

__all__ = ["accumulate_hessian", "gptq_quantize", "hessian_from_inputs"]

logger = logging.getLogger(__name__)


def accumulate_hessian(hessian: torch.Tensor | None, count: int, x: torch.Tensor,
                       chunk: int = 8192) -> tuple[torch.Tensor, int]:
    """Running ``2 X^T X / n`` over batches: returns the updated Hessian (float32) and token count."""
    x = x.reshape(-1, x.shape[-1])
    if hessian is None:
        hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    new_count = count + x.shape[0]
    if new_count == 0:
        return hessian, 0
    hessian = hessian * (count / new_count)
    for start in range(0, x.shape[0], chunk):
        xc = x[start:start + chunk].float()
        hessian.addmm_(xc.T, xc, alpha=2.0 / new_count)
    return hessian, new_count


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """``2 X^T X / tokens`` (float32) of calibration inputs ``x [..., in]``."""
    return accumulate_hessian(None, 0, x)[0]


def _inverse_cholesky(hessian: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``, raising the damping if H is not definite."""
    mean_diag = hessian.diagonal().mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(4):
        factor, info = torch.linalg.cholesky_ex(hessian + (damp * 10**attempt) * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                if attempt:
                    logger.warning("%s: Hessian needed damping %.3g to be positive definite", name, damp * 10**attempt)
                return upper
    raise ValueError(f"{name}: the Hessian is not positive definite even with damping {damp * 1000:.3g}; "
                     "check the calibration inputs")


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, wcfg, gptq_cfg, *,
                  clip_ratio: torch.Tensor | float | None = None, scale: torch.Tensor | None = None,
                  zero: torch.Tensor | None = None, name: str = "weight") -> QuantTensor:
    """GPTQ-quantize ``w [out, in]`` given the Hessian ``[in, in]`` of its inputs.

    Args:
        wcfg: Weight quantizer (format, groups, symmetry, scale dtype).
        gptq_cfg: ``GPTQConfig`` (damp, block_size, act_order).
        clip_ratio: Scalar or ``[out, G]`` factor on computed ranges (range search result).
        scale, zero: Fixed parameters ``[out or 1, G]``; then nothing is recomputed.
    """
    spec = resolve_spec(wcfg)
    if w.dim() != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"{name}: weight {tuple(w.shape)} and Hessian {tuple(hessian.shape)} do not match")
    if not bool(torch.isfinite(w).all()) or not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"{name}: the weight or the Hessian contains NaN or Inf")
    cdtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    out_features, in_features = w.shape
    k = spec.group_size
    groups = num_groups(in_features, k)
    grouped = k > 0
    W = w.to(cdtype).clone()
    H = hessian.to(cdtype).clone()

    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static_params = scale is not None or not grouped or gptq_cfg.act_order
    if scale is not None:
        if scale.dim() != 2 or scale.shape[1] != groups or scale.shape[0] not in (1, out_features):
            raise ValueError(f"{name}: given scale {tuple(scale.shape)} does not fit [{out_features}, {groups}]")
        if spec.has_zero != (zero is not None):
            raise ValueError(f"{name}: zero point {'missing' if spec.has_zero else 'not expected'} for this format")
        scale = scale.to(spec.scale_dtype).expand(out_features, groups)
        zero = None if zero is None else zero.to(cdtype).expand(out_features, groups)
    elif static_params:
        scale, zero = compute_qparams(group_view(W, k), spec, clip_ratio)
        scale = scale.expand(out_features, groups) if k == 0 else scale
        zero = None if zero is None else zero.expand(out_features, groups) if k == 0 else zero
    else:
        scale = torch.empty(out_features, groups, dtype=spec.scale_dtype, device=W.device)
        zero = torch.empty(out_features, groups, dtype=cdtype, device=W.device) if spec.has_zero else None
        if clip_ratio is not None and not isinstance(clip_ratio, float):
            clip_ratio = clip_ratio.to(cdtype).expand(out_features, groups)

    perm = None
    if gptq_cfg.act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    # Group of every processed column, in processing order (python ints: one sync, no per-column syncs).
    column_group = (perm if perm is not None else torch.arange(in_features, device=W.device))
    column_group = ((column_group // k) if grouped else torch.zeros_like(column_group)).tolist()

    # Parameters in the compute dtype (exact copies of the stored ones) so the column loop does no casts.
    scale_c = scale.to(cdtype)
    U = _inverse_cholesky(H, gptq_cfg.damp, name)
    block_size = gptq_cfg.block_size
    if grouped and not static_params:
        block_size = -(-block_size // k) * k
    codes = torch.empty_like(W)

    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            g = column_group[i1 + i]
            if not static_params and (i1 + i) % k == 0:
                ratio = clip_ratio[:, g:g + 1] if isinstance(clip_ratio, torch.Tensor) else clip_ratio
                s_g, z_g = compute_qparams(W1[:, i:i + k].unsqueeze(1), spec, ratio)
                scale[:, g:g + 1] = s_g
                scale_c[:, g:g + 1] = s_g
                if zero is not None:
                    zero[:, g:g + 1] = z_g
            col = W1[:, i].reshape(-1, 1, 1)
            s_col = scale_c[:, g:g + 1]
            z_col = None if zero is None else zero[:, g:g + 1]
            c = quantize_codes(col, s_col, z_col, spec)
            q = dequantize_codes(c, s_col, z_col)
            codes[:, i1 + i] = c.reshape(-1)
            e = (col - q).reshape(-1) / U1[i, i]
            W1[:, i:].addr_(e, U1[i, i:], alpha=-1)
            err1[:, i] = e
        W[:, i2:].addmm_(err1, U[i1:i2, i2:], alpha=-1)

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    storage = spec.fmt.storage_dtype
    if k == 0:
        scale, zero = scale[:1, :1].contiguous(), None if zero is None else zero[:1, :1].contiguous()
    return QuantTensor(
        codes=codes.to(storage),
        scale=scale.contiguous(),
        zero=None if zero is None else zero.to(storage).contiguous(),
        dtype=spec.fmt.name,
        group_size=k,
        shape=tuple(w.shape),
    )
