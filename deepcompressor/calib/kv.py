"""Numerics of static KV-cache quantization: per-channel clipping-bound search and the baselines it is compared with.

Every cached key/value channel ``(layer, K/V, head, channel)`` gets its own static asymmetric b-bit quantizer

    s = (hi - lo) / (2^b - 1),   z = round(qmin - lo / s),
    q = clamp(round(x / s) + z, qmin, qmax),   x_hat = (q - z) * s        (qmin = 0, qmax = 2^b - 1)

with ``[lo, hi]`` chosen to minimise the channel's reconstruction MSE on calibration samples: a coarse scan over a
logarithmic grid of matching percentile pairs ``(1 - p, p)``, ``p = 0.99, 0.999, ..., 1 - 1e-6``, then golden-section
refinement of ``hi`` (``lo`` fixed) and of ``lo`` (``hi`` fixed) inside the bracket of the neighbouring grid points
(see :func:`search_sorted`). Every channel is searched independently but all channels are processed at once (loops
run over grid points and golden iterations only); channels are only chunked to bound memory.

Because ``z`` is rounded, the MSE as a function of one bound is a saw-tooth (the grid jumps by up to ``s / 2``
whenever ``round(-lo / s)`` does); the refinement therefore minimises the smooth surrogate with the grid anchored
exactly at ``lo`` (:func:`anchored_mse`) and picks the integer zero point at the end. The reported ``lo``/``hi``
are the integer quantizer's own range ``[(qmin - z) s, (qmax - z) s]``, so they recompute to the same ``s``, ``z``.

Percentiles are exact order statistics of the samples, interpolated linearly like ``torch.quantile``'s default
(position ``p * (n - 1)`` of the sorted samples), computed by sorting (``torch.quantile`` refuses large inputs).

Sample layout everywhere: ``x`` is ``[tokens, channels]``; results are per channel.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..quant import get_format

__all__ = [
    "KV_DTYPE_BITS",
    "ClipSearchResult",
    "SortedSearchTrace",
    "anchored_mse",
    "asymmetric_qparams",
    "bits_of",
    "bracket_levels",
    "channel_mse",
    "dequantize_asymmetric",
    "effective_bounds",
    "fake_quantize_asymmetric",
    "fake_quantize_per_token",
    "minmax_asymmetric",
    "per_group_percentile",
    "per_token_asymmetric_mse",
    "percentile_levels",
    "quantize_asymmetric",
    "search_clipping_bounds",
    "search_sorted",
    "sorted_quantile",
    "symmetric_per_channel",
    "uint_range",
]

logger = logging.getLogger(__name__)

# The cache stores unsigned codes (the zero point carries the offset); formats as in ``deepcompressor.quant``.
KV_DTYPE_BITS = {name: get_format(name).bits for name in ("uint8", "uint4")}

# Golden ratio conjugate: each golden-section iteration keeps this fraction of the bracket.
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def bits_of(dtype: str) -> int:
    """Bit width of a KV-cache integer format name (``uint8`` or ``uint4``)."""
    if dtype not in KV_DTYPE_BITS:
        raise ValueError(f"KV-cache dtype must be one of {sorted(KV_DTYPE_BITS)}, got {dtype!r}")
    return KV_DTYPE_BITS[dtype]


def uint_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of the unsigned b-bit codes."""
    if bits not in (4, 8):
        raise ValueError(f"only 4- and 8-bit KV quantization is supported, got {bits} bits")
    return 0, 2**bits - 1


def asymmetric_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer-valued, float) zero point of the asymmetric quantizer of ``[lo, hi]``.

    The zero point is not clamped to ``[qmin, qmax]``: an offset channel whose range excludes 0 keeps its full
    resolution (zero is then not representable, which the cache never needs). A degenerate range gets a scale floor
    relative to its magnitude, so that ``x / s`` stays far inside float32's exact-integer range.
    """
    qmin, qmax = uint_range(bits)
    dtype = torch.promote_types(lo.dtype, torch.float32)  # float64 samples keep float64 quantizers
    lo = lo.to(dtype)
    hi = torch.maximum(hi.to(dtype), lo)
    magnitude = torch.maximum(lo.abs(), hi.abs())
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-12)
    scale = torch.maximum(scale, magnitude * 2.0**-16)
    zero = torch.round(qmin - lo / scale)
    return scale, zero


def quantize_asymmetric(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (uint8, one code per element) of ``x``; scale/zero broadcast against ``x``."""
    qmin, qmax = uint_range(bits)
    q = torch.round(x.float() / scale) + zero
    return q.clamp_(qmin, qmax).to(torch.uint8)


def dequantize_asymmetric(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(q - z) * s`` in float32, then cast to ``dtype``."""
    return ((q.float() - zero) * scale).to(dtype)


def fake_quantize_asymmetric(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize (float32), the reference numerics of the quantized cache."""
    return dequantize_asymmetric(quantize_asymmetric(x, scale, zero, bits), scale, zero)


@dataclass
class ClipSearchResult:
    """Per-channel static quantizers (all ``[channels]``, float32, CPU).

    Args:
        scale: Quantization step ``s``.
        zero: Integer-valued zero point ``z`` (float).
        lo: Lower clipping bound: ``(qmin - z) * s``, the smallest value the quantizer represents.
        hi: Upper clipping bound: ``(qmax - z) * s``.
        mse: Reconstruction MSE of the channel's samples under this quantizer.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    mse: torch.Tensor


def percentile_levels(num_grids: int) -> list[float]:
    """Upper percentile levels ``1 - 10^-t`` for ``t`` evenly spaced in [2, 6] (``num_grids`` points)."""
    if num_grids < 1:
        raise ValueError(f"num_grids must be >= 1, got {num_grids}")
    if num_grids == 1:
        return [1.0 - 1e-2]
    return [1.0 - 10.0 ** -(2.0 + 4.0 * i / (num_grids - 1)) for i in range(num_grids)]


def sorted_quantile(xs_sorted: torch.Tensor, level: float) -> torch.Tensor:
    """Exact ``level`` quantile of each row of row-sorted samples (linear interpolation, torch.quantile's default)."""
    n = xs_sorted.shape[-1]
    pos = level * (n - 1)
    below = min(math.floor(pos), n - 1)
    above = min(below + 1, n - 1)
    frac = pos - below
    lo_val = xs_sorted[..., below]
    return lo_val + frac * (xs_sorted[..., above] - lo_val)


def channel_mse(
    xs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, scale_zero: tuple | None = None
) -> torch.Tensor:
    """Reconstruction MSE of each row of ``xs`` ``[channels, samples]`` (float32) under the integer quantizer of
    [lo, hi] (or of the given ``(scale, zero)``).

    Written with in-place ops on one temporary: the search calls it many times over the whole data.
    """
    qmin, qmax = uint_range(bits)
    scale, zero = asymmetric_qparams(lo, hi, bits) if scale_zero is None else scale_zero
    scale = scale[:, None]
    zero = zero[:, None]
    t = xs / scale
    t.round_().add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale).sub_(xs)
    return t.square_().mean(dim=1)


def anchored_mse(xs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """MSE under the grid ``lo + k * s`` anchored exactly at ``lo`` (the zero point left continuous).

    The integer zero point moves the grid by up to ``s / 2`` whenever ``round(-lo / s)`` jumps, which turns
    :func:`channel_mse` of a bound into a saw-tooth; this smooth surrogate is what golden-section refines.
    """
    _, qmax = uint_range(bits)
    scale = ((hi - lo) / qmax).clamp_min(1e-12)[:, None]
    lo = lo[:, None]
    t = xs - lo
    t.div_(scale).round_().clamp_(0, qmax).mul_(scale).add_(lo).sub_(xs)
    return t.square_().mean(dim=1)


def effective_bounds(scale: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The range ``[(qmin - z) s, (qmax - z) s]`` an integer quantizer represents (its bounds recompute to it)."""
    qmin, qmax = uint_range(bits)
    return (qmin - zero) * scale, (qmax - zero) * scale


def _golden_section(fn, a: torch.Tensor, b: torch.Tensor, iters: int, best_x: torch.Tensor, best_f: torch.Tensor):
    """Vectorised golden-section minimisation of ``fn`` (one value per channel) on per-channel brackets [a, b].

    Keeps, per channel, the best point seen so far (starting from ``best_x``/``best_f``), so the result is never
    worse than the start even where ``fn`` is not unimodal in the bracket. One evaluation per iteration.
    """
    x1 = b - _INV_PHI * (b - a)
    x2 = a + _INV_PHI * (b - a)
    f1 = fn(x1)
    f2 = fn(x2)
    for x, f in ((x1, f1), (x2, f2)):
        better = f < best_f
        best_x = torch.where(better, x, best_x)
        best_f = torch.where(better, f, best_f)
    for _ in range(iters):
        go_left = f1 < f2  # the minimum lies in [a, x2]
        b = torch.where(go_left, x2, b)
        a = torch.where(go_left, a, x1)
        new_x = torch.where(go_left, b - _INV_PHI * (b - a), a + _INV_PHI * (b - a))
        new_f = fn(new_x)
        x2, f2, x1, f1 = (
            torch.where(go_left, x1, new_x),
            torch.where(go_left, f1, new_f),
            torch.where(go_left, new_x, x2),
            torch.where(go_left, new_f, f2),
        )
        better = new_f < best_f
        best_x = torch.where(better, new_x, best_x)
        best_f = torch.where(better, new_f, best_f)
    return best_x, best_f


def _scan_bracket(fn, a: torch.Tensor, b: torch.Tensor, points: int, best_x: torch.Tensor, best_f: torch.Tensor):
    """Evaluate the ends and ``points`` evenly spaced interior points of [a, b] and narrow each channel's bracket to
    the two neighbours (among those and ``best_x``) of the best point. Guards golden section against an objective
    with several valleys in the grid bracket. Returns (a, b, best_x, best_f)."""
    if points <= 0:
        return a, b, best_x, best_f
    steps = torch.arange(0, points + 2, device=a.device, dtype=a.dtype)[:, None] / (points + 1)
    cand_x = torch.cat([a[None] + steps * (b - a)[None], best_x[None]])  # [P + 3, c]: a, interior, b, best
    cand_f = torch.cat([torch.stack([fn(x) for x in cand_x[:-1]]), best_f[None]])
    order = cand_x.argsort(dim=0, stable=True)
    cand_x = cand_x.gather(0, order)
    cand_f = cand_f.gather(0, order)
    best = cand_f.argmin(dim=0, keepdim=True)
    left = (best - 1).clamp_min(0)
    right = (best + 1).clamp_max(cand_x.shape[0] - 1)
    return cand_x.gather(0, left)[0], cand_x.gather(0, right)[0], cand_x.gather(0, best)[0], cand_f.gather(0, best)[0]


@dataclass
class SortedSearchTrace:
    """Every stage of the search of one chunk of channels (all ``[channels]``), for inspection and tests.

    Args:
        bracket_hi: Upper-bound percentiles at the bracket levels ``[G + 2, channels]`` (one decade below the grid,
            the grid, p = 1); ``bracket_lo`` the matching lower percentiles.
        grid_index: Index (into the grid, 0..G-1) of the best grid point under the integer quantizer.
        grid_mse: Its MSE.
        refined_lo / refined_hi: The golden-section optimum of the anchored (continuous-zero) surrogate.
        scale / zero / mse: The final integer quantizer and its MSE.
    """

    bracket_lo: torch.Tensor
    bracket_hi: torch.Tensor
    grid_index: torch.Tensor
    grid_mse: torch.Tensor
    refined_lo: torch.Tensor
    refined_hi: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    mse: torch.Tensor


def bracket_levels(levels: list[float]) -> list[float]:
    """The grid with one level a grid step (in decades of ``1 - p``) below it and ``p = 1`` above it."""
    step = 1.0 if len(levels) == 1 else math.log10(1.0 - levels[0]) - math.log10(1.0 - levels[1])
    below = 1.0 - 10.0 ** (math.log10(1.0 - levels[0]) + step)
    return [below, *levels, 1.0]


def search_sorted(
    xs: torch.Tensor, bits: int, levels: list[float], golden_iters: int, scan_points: int = 4
) -> SortedSearchTrace:
    """The clipping search on row-sorted float32 samples ``[channels, n]``.

    1. Grid: matching percentile pairs ``(1 - p, p)`` for every level, scored with the integer quantizer.
    2. Refinement on the anchored surrogate, first of ``hi`` in [hi(p_prev), hi(p_next)] with ``lo`` fixed, then of
       ``lo`` in [lo(p_next), lo(p_prev)] with the refined ``hi`` (p_prev / p_next: the best grid level's
       neighbours): the bracket's ends and ``scan_points`` evenly spaced points in it narrow it to the best
       one's neighbours, then ``golden_iters`` golden-section iterations.
    3. Integer zero point: the floor and the ceiling of the refined continuous zero are scored; the best of them,
       the grid's best and the min-max quantizer is kept, so the result is never worse than the grid or min-max.
    """
    ext = bracket_levels(levels)
    hi_ext = torch.stack([sorted_quantile(xs, p) for p in ext])  # [G + 2, c]
    lo_ext = torch.stack([sorted_quantile(xs, 1.0 - p) for p in ext])
    grid_mse = torch.stack([channel_mse(xs, lo_ext[g], hi_ext[g], bits) for g in range(1, len(ext) - 1)])
    grid_best, g_best = grid_mse.min(dim=0)
    g_ext = (g_best + 1)[None]
    lo = lo_ext.gather(0, g_ext)[0]
    hi = hi_ext.gather(0, g_ext)[0]
    scale, zero = asymmetric_qparams(lo, hi, bits)
    best_f = grid_best
    if golden_iters > 0:
        surrogate_f = anchored_mse(xs, lo, hi, bits)
        hi_a = hi_ext.gather(0, g_ext - 1)[0]
        hi_b = hi_ext.gather(0, g_ext + 1)[0]
        hi_fn = lambda h: anchored_mse(xs, lo, h, bits)
        hi_a, hi_b, hi, surrogate_f = _scan_bracket(hi_fn, hi_a, hi_b, scan_points, hi, surrogate_f)
        hi, surrogate_f = _golden_section(hi_fn, hi_a, hi_b, golden_iters, hi, surrogate_f)
        lo_a = lo_ext.gather(0, g_ext + 1)[0]
        lo_b = lo_ext.gather(0, g_ext - 1)[0]
        lo_fn = lambda v: anchored_mse(xs, v, hi, bits)
        lo_a, lo_b, lo, surrogate_f = _scan_bracket(lo_fn, lo_a, lo_b, scan_points, lo, surrogate_f)
        lo, _ = _golden_section(lo_fn, lo_a, lo_b, golden_iters, lo, surrogate_f)
        refined_scale, _ = asymmetric_qparams(lo, hi, bits)
        continuous_zero = uint_range(bits)[0] - lo / refined_scale
        candidates = [(refined_scale, torch.floor(continuous_zero)), (refined_scale, torch.ceil(continuous_zero))]
        candidates.append(asymmetric_qparams(lo_ext[-1], hi_ext[-1], bits))  # min-max: never worse than it
        for candidate_scale, candidate_zero in candidates:
            f = channel_mse(xs, lo, hi, bits, (candidate_scale, candidate_zero))
            better = f < best_f
            scale = torch.where(better, candidate_scale, scale)
            zero = torch.where(better, candidate_zero, zero)
            best_f = torch.where(better, f, best_f)
    return SortedSearchTrace(
        bracket_lo=lo_ext,
        bracket_hi=hi_ext,
        grid_index=g_best,
        grid_mse=grid_best,
        refined_lo=lo,
        refined_hi=hi,
        scale=scale,
        zero=zero,
        mse=best_f,
    )


def _channel_chunks(num_channels: int, num_samples: int, chunk_elems: int) -> list[tuple[int, int]]:
    per_chunk = max(1, chunk_elems // max(num_samples, 1))
    return [(c0, min(c0 + per_chunk, num_channels)) for c0 in range(0, num_channels, per_chunk)]


def _sorted_chunk(x: torch.Tensor, c0: int, c1: int, device: torch.device) -> torch.Tensor:
    dtype = torch.promote_types(x.dtype, torch.float32)  # float64 samples are searched in float64
    xs = x[:, c0:c1].to(device=device, dtype=dtype).t().contiguous()
    if not torch.isfinite(xs).all():
        raise ValueError(f"non-finite calibration samples in channels {c0}..{c1 - 1}")
    return torch.sort(xs, dim=1).values


def _default_device(x: torch.Tensor, device) -> torch.device:
    return torch.device(device) if device is not None else x.device


def search_clipping_bounds(
    x: torch.Tensor,
    bits: int = 8,
    num_grids: int = 5,
    golden_iters: int = 20,
    *,
    scan_points: int = 4,
    device: torch.device | str | None = None,
    chunk_elems: int = 1 << 26,
    progress: bool = False,
) -> ClipSearchResult:
    """MSE-optimal static asymmetric per-channel clipping bounds.

    Args:
        x: Samples ``[tokens, channels]`` (any float dtype, any device).
        bits: 8 (INT8) or 4 (INT4).
        num_grids: Points of the percentile grid ``1 - 10^-t``, ``t`` in [2, 6].
        golden_iters: Golden-section iterations for each bound (0: grid only). The refined bound is within
            ``bracket * 0.618^golden_iters`` of the bracket's local minimum.
        scan_points: Evenly spaced points scanned in each grid bracket before golden section.
        device: Where the search runs (default: ``x``'s device). Channels move there chunk by chunk.
        chunk_elems: Samples processed at once (bounds memory: about 5 float32 copies of a chunk).
        progress: Show a tqdm bar over chunks.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"expected samples [tokens >= 2, channels], got shape {tuple(x.shape)}")
    uint_range(bits)
    levels = percentile_levels(num_grids)
    device = _default_device(x, device)
    num_tokens, num_channels = x.shape
    scale, zero, mse = (torch.empty(num_channels) for _ in range(3))
    chunks = _channel_chunks(num_channels, num_tokens, chunk_elems)
    for c0, c1 in tqdm(chunks, desc=f"kv clip search (int{bits})", disable=not progress, leave=False):
        xs = _sorted_chunk(x, c0, c1, device)
        trace = search_sorted(xs, bits, levels, golden_iters, scan_points)
        scale[c0:c1], zero[c0:c1], mse[c0:c1] = trace.scale.cpu(), trace.zero.cpu(), trace.mse.cpu()
        del xs
    lo, hi = effective_bounds(scale, zero, bits)
    return ClipSearchResult(scale=scale, zero=zero, lo=lo, hi=hi, mse=mse)


def _static_result(x: torch.Tensor, bits: int, device, chunk_elems: int, bounds_fn, qparams_fn) -> ClipSearchResult:
    """Evaluate a closed-form per-channel quantizer chunk by chunk: bounds_fn(xs) -> (lo, hi) on sorted rows."""
    device = _default_device(x, device)
    num_tokens, num_channels = x.shape
    mse, scale, zero = (torch.empty(num_channels) for _ in range(3))
    for c0, c1 in _channel_chunks(num_channels, num_tokens, chunk_elems):
        xs = _sorted_chunk(x, c0, c1, device)
        lo_c, hi_c = bounds_fn(xs)
        s_c, z_c = qparams_fn(lo_c, hi_c)
        mse[c0:c1] = channel_mse(xs, lo_c, hi_c, bits, (s_c, z_c)).cpu()
        scale[c0:c1], zero[c0:c1] = s_c.cpu(), z_c.cpu()
    lo, hi = effective_bounds(scale, zero, bits)
    return ClipSearchResult(scale=scale, zero=zero, lo=lo, hi=hi, mse=mse)


def minmax_asymmetric(x: torch.Tensor, bits: int = 8, *, device=None, chunk_elems: int = 1 << 26) -> ClipSearchResult:
    """Baseline: asymmetric per channel over the full observed range [min, max]."""
    return _static_result(
        x, bits, device, chunk_elems, lambda xs: (xs[:, 0], xs[:, -1]), lambda lo, hi: asymmetric_qparams(lo, hi, bits)
    )


def symmetric_per_channel(
    x: torch.Tensor, bits: int = 8, *, device=None, chunk_elems: int = 1 << 26
) -> ClipSearchResult:
    """Baseline: symmetric per channel, ``s = max|x| / (2^(b-1) - 1)``, codes offset by ``2^(b-1)`` (zero fixed)."""
    half = 2 ** (bits - 1)

    def bounds(xs):
        amax = torch.maximum(xs[:, 0].abs(), xs[:, -1].abs())
        return -amax, amax

    def qparams(lo, hi):
        scale = (hi / (half - 1)).clamp_min(1e-12)
        return scale, torch.full_like(scale, float(half))

    return _static_result(x, bits, device, chunk_elems, bounds, qparams)


def fake_quantize_per_token(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Dynamic asymmetric min-max quantization of each token over groups of ``group_size`` consecutive channels
    (one group = one head of one token, as KIVI quantizes values). Float32 result, same shape as ``x``."""
    if x.shape[-1] % group_size:
        raise ValueError(f"channels ({x.shape[-1]}) must be a multiple of group_size ({group_size})")
    g = x.float().unflatten(-1, (-1, group_size))
    lo = g.amin(dim=-1, keepdim=True)
    hi = g.amax(dim=-1, keepdim=True)
    scale, zero = asymmetric_qparams(lo, hi, bits)
    return fake_quantize_asymmetric(g, scale, zero, bits).flatten(-2)


def per_token_asymmetric_mse(
    x: torch.Tensor, bits: int, group_size: int, *, device=None, token_chunk: int = 4096
) -> torch.Tensor:
    """Baseline: per-channel reconstruction MSE under dynamic per-token quantization (see
    :func:`fake_quantize_per_token`). Returns ``[channels]`` float32 on the CPU."""
    device = _default_device(x, device)
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    for t0 in range(0, x.shape[0], token_chunk):
        xt = x[t0 : t0 + token_chunk].to(device).float()
        err = fake_quantize_per_token(xt, bits, group_size) - xt
        total += err.square().sum(dim=0, dtype=torch.float64)
    return (total / x.shape[0]).float().cpu()


def per_group_percentile(
    x: torch.Tensor, bits: int, group_size: int, num_grids: int = 5, *, device=None
) -> ClipSearchResult:
    """Baseline: one asymmetric clipping range per group of ``group_size`` consecutive channels (one group = one
    layer's K or V), at the matching percentile pair of the grid that minimises the group's MSE.

    Group quantiles are exact (a sort of the group's samples). Returns per-channel results (channels of a group
    share their quantizer)."""
    num_channels = x.shape[1]
    if num_channels % group_size:
        raise ValueError(f"channels ({num_channels}) must be a multiple of group_size ({group_size})")
    device = _default_device(x, device)
    levels = percentile_levels(num_grids)
    lo, hi, mse = (torch.empty(num_channels) for _ in range(3))
    for c0 in range(0, num_channels, group_size):
        group = x[:, c0 : c0 + group_size].to(device).float()
        flat = torch.sort(group.reshape(1, -1), dim=1).values
        cols = group.t().contiguous()
        best = None
        for p in levels:
            g_lo = sorted_quantile(flat, 1.0 - p).expand(group_size)
            g_hi = sorted_quantile(flat, p).expand(group_size)
            ch_mse = channel_mse(cols, g_lo, g_hi, bits)
            if best is None or ch_mse.mean() < best[2].mean():
                best = (g_lo, g_hi, ch_mse)
        lo[c0 : c0 + group_size], hi[c0 : c0 + group_size], mse[c0 : c0 + group_size] = (t.cpu() for t in best)
    scale, zero = asymmetric_qparams(lo, hi, bits)
    lo, hi = effective_bounds(scale, zero, bits)
    return ClipSearchResult(scale=scale, zero=zero, lo=lo, hi=hi, mse=mse)
