"""Calibrate one linear, or several linears reading the same input, from calibration inputs.

Order (SVDQuant): smoothing search -> static input ranges (if configured) -> low-rank branch per weight ->
weight quantization of the residual ``W * s - L1 L2`` by round-to-nearest, range search, or GPTQ (whose Hessian
is that of the smoothed inputs, and which uses the searched clipping ratios when the range search is on).

Everything runs in float32 on the device of the inputs (or the one asked for). The searches use at most
``quant.max_tokens`` evenly spaced tokens; the GPTQ Hessian uses every token (or a Hessian accumulated by the
caller), because GPTQ overfits when it sees fewer tokens than several times the input width.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..quant.formats import resolve_spec
from ..quant.functional import fake_quantize, quantize
from ..quant.hadamard import block_hadamard
from ..quant.tensor import QuantTensor
from .gptq import accumulate_hessian, gptq_quantize
from .lowrank import calibrate_lowrank
from .range import calibrate_activation_range, search_weight_range
from .search import (
    StageTimer,
    input_quantizer_enabled,
    quantize_inputs,
    quantized_linear_output,
    relative_error,
    subsample_tokens,
)
from .smooth import search_smooth_scale

__all__ = ["LayerCalibResult", "LinearCalibResult", "calibrate_linear", "calibrate_linears", "quant_config_for_kind"]

logger = logging.getLogger(__name__)


@dataclass
class LinearCalibResult:
    """Calibration of one linear.

    Attributes:
        qweight: Quantized residual weight ``W * s - L1 @ L2`` (None when weights stay 16-bit).
        lowrank_l1, lowrank_l2: Branch factors ``[out, r]``, ``[r, in]`` in their storage dtype, or None.
        clip_ratio: Range-search result used for the weight (``[1, 1]`` or ``[out, G]``), or None.
        error_rtn: Relative output error ``||Y_q - Y|| / ||Y||`` on the calibration tokens of plain round-to-nearest
            with the same formats (no smoothing, branch, range search or GPTQ): the starting point.
        error_final: The same error with the calibrated layer.
        lowrank_errors: Squared output error of every low-rank refinement iteration.
    """

    qweight: QuantTensor | None
    lowrank_l1: torch.Tensor | None = None
    lowrank_l2: torch.Tensor | None = None
    clip_ratio: torch.Tensor | None = None
    error_rtn: float = float("nan")
    error_final: float = float("nan")
    lowrank_errors: list[float] = field(default_factory=list)


@dataclass
class LayerCalibResult:
    """Calibration of linears sharing one input.

    Attributes:
        smooth_scale: ``s [in]`` float32 (inputs divided, weight columns multiplied), or None.
        smooth_alpha, smooth_beta: Chosen exponents, or None.
        smooth_gamma: The exponent of the gain-projected scale when one was chosen (``quant.smooth.strategy``).
        rotation: Hadamard block size when the inputs are rotated (``quant.rotation``), or None.
        input_scale, input_zero: Static input-quantization parameters ``[1, G]``, or None (dynamic / 16-bit).
        linears: One result per weight, in order.
        timings: Seconds per stage (``smooth``, ``lowrank``, ``weights``, ``errors``, ``total``), device-synchronised.
        num_tokens: Calibration tokens used.
    """

    smooth_scale: torch.Tensor | None
    smooth_alpha: float | None
    smooth_beta: float | None
    input_scale: torch.Tensor | None
    input_zero: torch.Tensor | None
    linears: list[LinearCalibResult]
    timings: dict[str, float]
    num_tokens: int
    smooth_gamma: float | None = None
    rotation: int | None = None


def quant_config_for_kind(cfg, kind: str):
    """``cfg`` with weight / input quantization disabled when ``kind`` is in ``wgts.skips`` / ``ipts.skips``."""
    wgts, ipts = cfg.wgts, cfg.ipts
    if kind in wgts.skips:
        wgts = dataclasses.replace(wgts, dtype=None)
    if kind in ipts.skips:
        ipts = dataclasses.replace(ipts, dtype=None)
    if wgts is cfg.wgts and ipts is cfg.ipts:
        return cfg
    return dataclasses.replace(cfg, wgts=wgts, ipts=ipts)


def _validate_inputs(weights, biases, x, name):
    if not weights:
        raise ValueError(f"{name}: no weights to calibrate")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"{name}[{i}]: weight {tuple(w.shape)} does not read inputs with {x.shape[-1]} channels")
        if biases[i] is not None and biases[i].shape != (w.shape[0],):
            raise ValueError(f"{name}[{i}]: bias {tuple(biases[i].shape)} does not match {w.shape[0]} outputs")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: calibration inputs contain NaN or Inf")
    for i, w in enumerate(weights):
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{name}[{i}]: weight contains NaN or Inf")
        if biases[i] is not None and not bool(torch.isfinite(biases[i]).all()):
            raise ValueError(f"{name}[{i}]: bias contains NaN or Inf")


def _check_scale_range(t: torch.Tensor, qcfg, what: str) -> None:
    """A tensor whose range needs scales beyond the scale dtype's largest value would quantize saturated (a
    relative error near 1) with no error raised: refuse it, naming the layer and the way out."""
    if qcfg is None or qcfg.dtype is None:
        return
    spec = resolve_spec(qcfg)
    levels = spec.fmt.symmetric_qmax if spec.symmetric else (spec.fmt.qmax - spec.fmt.qmin) / 2
    largest = float(t.abs().amax()) if t.numel() else 0.0
    limit = torch.finfo(spec.scale_dtype).max * levels
    if largest > limit:
        raise ValueError(f"{what}: values up to {largest:.3g} need {spec.fmt.name} scales above the largest "
                         f"{str(spec.scale_dtype).removeprefix('torch.')} ({torch.finfo(spec.scale_dtype).max:.3g}); "
                         "set its scale_dtype to float32 or bring the values into range")


def _smoothed_hessian(hessian, x_all, s, device) -> torch.Tensor:
    """Hessian of the smoothed inputs ``x / s``: ``H / (s s^T)``, from the given raw Hessian or from all of ``x``."""
    if hessian is None:
        hessian = torch.zeros(x_all.shape[-1], x_all.shape[-1], dtype=torch.float32, device=device)
        count = 0
        for chunk in x_all.reshape(-1, x_all.shape[-1]).split(8192):
            hessian, count = accumulate_hessian(hessian, count, chunk.to(device))
    hessian = hessian.to(device=device, dtype=torch.float32)
    return hessian if s is None else hessian / torch.outer(s, s)


def calibrate_linears(weights: Sequence[torch.Tensor], x: torch.Tensor, cfg, *,
                      biases: Sequence[torch.Tensor | None] | None = None, name: str = "linear",
                      device: torch.device | str | None = None,
                      hessian: torch.Tensor | None = None) -> LayerCalibResult:
    """Calibrate the linears ``weights`` (each ``[out_i, in]``) that all read ``x [..., in]``.

    Args:
        cfg: ``QuantConfig`` (apply ``quant_config_for_kind`` first for per-kind skips).
        biases: Per weight bias or None (they only enter the reported relative errors).
        name: Layer name for logs and error messages.
        device: Where to compute (default: the device of ``x``); results live there.
        hessian: GPTQ only: ``2 X^T X / n`` of the raw (unsmoothed) inputs, accumulated by the caller over as many
            tokens as it has (``gptq.accumulate_hessian``); GPTQ needs several times more tokens than input
            channels, far more than the searches. Default: computed from every token of ``x`` (not subsampled).
    """
    weights = list(weights)
    biases = list(biases) if biases is not None else [None] * len(weights)
    if len(biases) != len(weights):
        raise ValueError(f"{name}: {len(biases)} biases for {len(weights)} weights")
    _validate_inputs(weights, biases, x, name)
    if hessian is not None and hessian.shape != (x.shape[-1], x.shape[-1]):
        raise ValueError(f"{name}: Hessian {tuple(hessian.shape)} does not match {x.shape[-1]} input channels")
    x_all = x
    device = torch.device(device) if device is not None else x.device
    timer = StageTimer(device)
    wcfg, icfg = cfg.wgts, cfg.ipts
    quantize_weights = wcfg.dtype is not None
    quantize_acts = input_quantizer_enabled(icfg)
    with timer.stage("total"):
        x = subsample_tokens(x, cfg.max_tokens).to(device=device, dtype=torch.float32)
        weights = [w.to(device=device, dtype=torch.float32) for w in weights]
        biases = [None if b is None else b.to(device=device, dtype=torch.float32) for b in biases]
        raw_x, raw_weights = x, weights  # the round-to-nearest baseline is the plain layer
        rotation = None
        if cfg.rotation.enabled and (quantize_weights or quantize_acts):
            # (x R)(W R)^T = x W^T: everything below (smoothing, branch, quantization) works on the rotated pair
            rotation = cfg.rotation.block_size
            x = block_hadamard(x, rotation)
            weights = [block_hadamard(w, rotation) for w in weights]
            if hessian is not None:  # R^T H R
                hessian = block_hadamard(block_hadamard(hessian.float(), rotation).T, rotation)
            elif cfg.gptq.enabled and quantize_weights:  # GPTQ's Hessian comes from every token
                x_all = block_hadamard(x_all.reshape(-1, x_all.shape[-1]).float(), rotation)
        y_refs = [x @ w.T for w in weights]

        s = alpha = beta = gamma = None
        if cfg.smooth.enabled and (quantize_weights or quantize_acts):
            with timer.stage("smooth"):
                found = search_smooth_scale(weights, x, cfg, y_refs=y_refs, name=name)
                s, alpha, beta, gamma = found.scale, found.alpha, found.beta, found.gamma
        xs = x if s is None else x / s
        smoothed = weights if s is None else [w * s for w in weights]
        if quantize_acts:
            _check_scale_range(xs, icfg, f"{name}: calibration inputs")
        if quantize_weights:
            for i, ws in enumerate(smoothed):
                _check_scale_range(ws, wcfg, f"{name}[{i}]: weight")

        input_scale = input_zero = None
        if quantize_acts and icfg.static:
            range_cfg = cfg.calib_range if cfg.calib_range.enabled else None
            input_scale, input_zero = calibrate_activation_range(xs, icfg, range_cfg, name=f"{name}.inputs")
        xq = quantize_inputs(xs, icfg, scale=input_scale, zero=input_zero)
        xq_rtn = quantize_inputs(raw_x, icfg)  # the round-to-nearest baseline quantizes the raw inputs

        results = []
        smoothed_hessian = None
        for i, (w, ws, y_ref, bias) in enumerate(zip(raw_weights, smoothed, y_refs, biases)):
            lname = f"{name}[{i}]" if len(weights) > 1 else name
            l1 = l2 = None
            residual = ws
            lowrank_errors = []
            if cfg.low_rank.enabled and quantize_weights:
                with timer.stage("lowrank"):
                    lr = calibrate_lowrank(ws, xs, wcfg, cfg.low_rank, icfg=icfg, y_ref=y_ref, xq=xq, name=lname)
                    l1, l2, residual, lowrank_errors = lr.l1, lr.l2, lr.residual, lr.errors

            qweight = clip = None
            with timer.stage("weights"):
                if quantize_weights:
                    if cfg.calib_range.enabled:
                        clip = search_weight_range(residual, wcfg, cfg.calib_range, xs, name=lname).clip_ratio
                    if cfg.gptq.enabled:
                        if smoothed_hessian is None:
                            smoothed_hessian = _smoothed_hessian(hessian, x_all, s, device)
                        qweight = gptq_quantize(residual, smoothed_hessian, wcfg, cfg.gptq, clip_ratio=clip,
                                                name=lname)
                    else:
                        qweight = quantize(residual, wcfg, clip_ratio=clip, name=lname, check=False)
            with timer.stage("errors"):
                w_main = qweight.dequantize() if qweight is not None else residual
                l1f = None if l1 is None else l1.float()
                l2f = None if l2 is None else l2.float()
                y_ref_b = y_ref if bias is None else y_ref + bias
                y_final = quantized_linear_output(xq, w_main, xs, l1f, l2f, bias)
                w_rtn = fake_quantize(w, wcfg, check=False) if quantize_weights else w
                y_rtn = quantized_linear_output(xq_rtn, w_rtn, bias=bias)
            results.append(LinearCalibResult(
                qweight=qweight, lowrank_l1=l1, lowrank_l2=l2, clip_ratio=clip,
                error_rtn=relative_error(y_rtn, y_ref_b), error_final=relative_error(y_final, y_ref_b),
                lowrank_errors=lowrank_errors,
            ))
            logger.info("%s: relative output error %.4g (round-to-nearest %.4g)", lname,
                        results[-1].error_final, results[-1].error_rtn)
    return LayerCalibResult(
        smooth_scale=s, smooth_alpha=alpha, smooth_beta=beta, input_scale=input_scale, input_zero=input_zero,
        linears=results, timings=dict(timer.seconds), num_tokens=x.shape[0], smooth_gamma=gamma,
        rotation=rotation,
    )


def calibrate_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, cfg, *,
                     name: str = "linear", device: torch.device | str | None = None,
                     hessian: torch.Tensor | None = None) -> LayerCalibResult:
    """``calibrate_linears`` for a single linear."""
    return calibrate_linears([weight], x, cfg, biases=[bias], name=name, device=device, hessian=hessian)
