"""Outlier and distribution statistics of activations and KV caches.

Two families live here:

* one-shot functions over a whole tensor (pure, vectorised, float64 math), which define the statistics;
* streaming accumulators that compute the same numbers while a model runs, one batch at a time, with bounded
  memory. They are checked against the one-shot functions in the tests.

Conventions (chosen to match NumPy/SciPy so the numbers can be cross-checked there):

* "tokens x channels": activations are viewed as a matrix ``[N, C]`` whose rows are tokens (every leading
  dimension flattened) and whose columns are the input channels of a linear layer (``as_token_matrix``). A K or V
  cache ``[B, H, L, c]`` becomes ``[B*L, H*c]``: one row per cached token, one column per (head, head channel)
  (``kv_token_matrix``).
* median: NumPy's (mean of the two middle values for an even count).
* kurtosis: Fisher's excess kurtosis with biased moments, ``m4 / m2**2 - 3`` (``scipy.stats.kurtosis`` default).
* skewness: Fisher-Pearson coefficient with biased moments, ``m3 / m2**1.5`` (``scipy.stats.skew`` default).
  A constant channel has no defined skewness: it is NaN and left out of the mean/max summaries (and counted).
* coefficient of variation: population standard deviation (``ddof=0``) over the mean.

Streaming design:

* Moments are merged batch by batch with the pairwise update of Pebay (2008) in float64: batch central moments
  are computed exactly (in chunks of bounded size) and combined, which is numerically stable where raw power sums
  are not (large means, heavy tails).
* Maxima/minima per channel are exact over every token seen.
* Medians need the data itself. Each accumulator keeps a fixed-size uniform sample of the tokens it has seen on
  the CPU (``TokenReservoir``): every token gets a key from a hash of its running index (and a seed), and the
  ``budget`` tokens with the smallest keys are kept ("bottom-k" sampling). This is a uniform sample without
  replacement across all calibration samples, independent of how the stream is split into batches, deterministic
  for a given seed, and memory is bounded by ``budget x channels`` per layer in the activation's own dtype. Only
  tokens that can still enter the sample leave the device. When fewer than ``budget`` tokens are seen, all of
  them are kept and the medians are exact.
* Hence, in the activation statistics, maxima and the kurtosis cover every token seen, medians the sampled tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from deepcompressor.calib.token_sample import TokenReservoir, select_token_sample, token_sample_keys

__all__ = [
    "ActivationAccumulator",
    "ActivationStats",
    "CentralMoments",
    "KVAccumulator",
    "KVStats",
    "TokenReservoir",
    "abs_max_to_median",
    "as_token_matrix",
    "channel_abs_max_to_median",
    "channel_dynamic_range",
    "channel_skewness",
    "coefficient_of_variation",
    "dynamic_range_cv",
    "excess_kurtosis",
    "kv_token_matrix",
    "median",
    "select_token_sample",
    "skewness_summary",
    "token_dynamic_range",
    "token_sample_keys",
]

# Elements per float64 chunk when moments are computed: bounds the temporary memory to ~128 MiB per buffer.
_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------------------------
# Layout helpers


def as_token_matrix(x: torch.Tensor) -> torch.Tensor:
    """View a linear layer's input ``[..., C]`` as ``[tokens, C]``."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"expected an activation [..., C] with C > 0, got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


def kv_token_matrix(kv: torch.Tensor) -> torch.Tensor:
    """View a cached K or V ``[B, H, L, c]`` as ``[B*L, H*c]`` (one row per cached token)."""
    if kv.dim() != 4:
        raise ValueError(f"expected a K/V tensor [B, H, L, c], got shape {tuple(kv.shape)}")
    b, h, length, c = kv.shape
    return kv.permute(0, 2, 1, 3).reshape(b * length, h * c)


def _check_matrix(x: torch.Tensor, what: str) -> None:
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what}: expected a non-empty [tokens, channels] matrix, got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# One-shot statistics


def median(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """NumPy-style median in float64 (mean of the two middle values for an even count); ``dim=None`` flattens."""
    if dim is None:
        x = x.reshape(-1)
        dim = 0
    n = x.shape[dim]
    if n == 0:
        raise ValueError("median of an empty tensor")
    x = x.detach()
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    middle = [n // 2] if n % 2 else [n // 2 - 1, n // 2]
    if x.device.type == "cpu":
        # NumPy's introselect is several times faster than torch.kthvalue on the CPU.
        part = np.partition(x.numpy(), middle, axis=dim)
        values = [torch.as_tensor(np.asarray(np.take(part, k, axis=dim), dtype=np.float64)) for k in middle]
    else:
        # On a GPU a full (segmented) radix sort beats torch.kthvalue by far on long slices.
        ordered = torch.sort(x, dim=dim).values
        values = [ordered.select(dim, k).double() for k in middle]
    return values[0] if len(values) == 1 else (values[0] + values[1]) / 2


def abs_max_to_median(x: torch.Tensor) -> float:
    """``max|X| / median|X|`` over every element (inf when the median of ``|X|`` is 0)."""
    a = x.reshape(-1).abs()
    if a.numel() == 0:
        raise ValueError("abs_max_to_median of an empty tensor")
    return _ratio(a.max().double().item(), median(a).item())


def excess_kurtosis(x: torch.Tensor) -> float:
    """Fisher excess kurtosis (biased moments) of every element; NaN for constant input."""
    moments = CentralMoments(order=4, per_channel=False)
    moments.update(x.reshape(-1, 1))
    return float(moments.excess_kurtosis())


def channel_abs_max_to_median(x: torch.Tensor) -> torch.Tensor:
    """Per channel (column of ``[tokens, C]``) ``max|X| / median|X|`` over tokens, float64 ``[C]``."""
    _check_matrix(x, "channel_abs_max_to_median")
    a = x.abs()
    return _safe_divide(a.amax(dim=0).double(), median(a, dim=0))


def channel_dynamic_range(x: torch.Tensor) -> torch.Tensor:
    """Per channel ``max - min`` over tokens, float64 ``[C]``."""
    _check_matrix(x, "channel_dynamic_range")
    x = x.double()
    return x.amax(dim=0) - x.amin(dim=0)


def token_dynamic_range(x: torch.Tensor) -> torch.Tensor:
    """Per token ``max - min`` over channels, float64 ``[N]``."""
    _check_matrix(x, "token_dynamic_range")
    x = x.double()
    return x.amax(dim=1) - x.amin(dim=1)


def coefficient_of_variation(values: torch.Tensor) -> float:
    """Population standard deviation over the mean of a set of values (NaN when the mean is 0)."""
    v = values.reshape(-1).double()
    if v.numel() == 0:
        raise ValueError("coefficient_of_variation of an empty tensor")
    mean = v.mean().item()
    std = v.std(correction=0).item()
    return std / mean if mean != 0 else math.nan


def dynamic_range_cv(x: torch.Tensor) -> tuple[float, float]:
    """``(CV_chan, CV_tok)``: the CV of the per-channel and of the per-token dynamic ranges of ``[tokens, C]``."""
    return coefficient_of_variation(channel_dynamic_range(x)), coefficient_of_variation(token_dynamic_range(x))


def channel_skewness(x: torch.Tensor) -> torch.Tensor:
    """Per-channel Fisher-Pearson skewness (biased) over tokens, float64 ``[C]``; NaN for constant channels."""
    _check_matrix(x, "channel_skewness")
    moments = CentralMoments(order=3, per_channel=True)
    moments.update(x)
    return moments.skewness()


def skewness_summary(gamma: torch.Tensor) -> tuple[float, float]:
    """``(mean |gamma|, max |gamma|)`` over the channels with a defined skewness (NaN if none)."""
    g = gamma.reshape(-1).double().abs()
    g = g[~torch.isnan(g)]
    if g.numel() == 0:
        return math.nan, math.nan
    return g.mean().item(), g.max().item()


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return math.inf if numerator > 0 else math.nan
    return numerator / denominator


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Elementwise ratio with x/0 = inf (x > 0) and 0/0 = NaN, without relying on IEEE division warnings."""
    out = numerator / torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    out = torch.where((denominator == 0) & (numerator > 0), torch.full_like(out, math.inf), out)
    return torch.where((denominator == 0) & (numerator <= 0), torch.full_like(out, math.nan), out)


# ---------------------------------------------------------------------------------------------------------------
# Streaming moments


@dataclass
class CentralMoments:
    """Running count, mean and sums of powers of deviations ``M_k = sum (x - mean)^k`` (float64).

    ``per_channel=False`` treats every element as one sample (scalar moments); ``per_channel=True`` keeps one set
    of moments per column of a ``[tokens, C]`` matrix. ``order`` (2..4) is the highest moment kept.
    """

    order: int = 4
    per_channel: bool = False
    n: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    m3: torch.Tensor | None = None
    m4: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.order not in (2, 3, 4):
            raise ValueError(f"CentralMoments.order must be 2, 3 or 4, got {self.order}")

    def update(self, x: torch.Tensor) -> None:
        """Add a batch: ``[tokens, C]`` (per-channel) or any shape (scalar moments over every element)."""
        if self.per_channel:
            _check_matrix(x, "CentralMoments.update")
            if self.mean is not None and x.shape[1] != self.mean.shape[0]:
                raise ValueError(f"CentralMoments.update: {x.shape[1]} channels, expected {self.mean.shape[0]}")
            rows = max(1, _CHUNK_ELEMENTS // x.shape[1])
            for chunk in x.split(rows, dim=0):
                self._merge(*_batch_moments(chunk.double(), 0, self.order))
        else:
            flat = x.reshape(-1)
            for chunk in flat.split(_CHUNK_ELEMENTS):
                self._merge(*_batch_moments(chunk.double(), 0, self.order))

    def _merge(self, nb: int, mean_b: torch.Tensor, *sums_b: torch.Tensor) -> None:
        if nb == 0:
            return
        m2b = sums_b[0]
        m3b = sums_b[1] if self.order >= 3 else None
        m4b = sums_b[2] if self.order >= 4 else None
        if self.n == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = nb, mean_b, m2b, m3b, m4b
            return
        # Pebay (2008), eqs. 3.1: exact merge of two sets of central moments.
        na, n = self.n, self.n + nb
        delta = mean_b - self.mean
        d_n = delta / n
        m2a, m3a, m4a = self.m2, self.m3, self.m4
        m2 = m2a + m2b + delta * d_n * na * nb
        if self.order >= 3:
            m3 = m3a + m3b + d_n * d_n * delta * na * nb * (na - nb) + 3 * d_n * (na * m2b - nb * m2a)
        if self.order >= 4:
            m4 = (
                m4a
                + m4b
                + d_n**3 * delta * na * nb * (na * na - na * nb + nb * nb)
                + 6 * d_n * d_n * (na * na * m2b + nb * nb * m2a)
                + 4 * d_n * (na * m3b - nb * m3a)
            )
            self.m4 = m4
        if self.order >= 3:
            self.m3 = m3
        self.m2 = m2
        self.mean = self.mean + d_n * nb
        self.n = n

    def _require(self, order: int) -> None:
        if self.n == 0:
            raise ValueError("CentralMoments: no data")
        if order > self.order:
            raise ValueError(f"CentralMoments: moment of order {order} needs order >= {order}, kept {self.order}")

    def variance(self) -> torch.Tensor:
        """Population variance (``ddof=0``)."""
        self._require(2)
        return self.m2 / self.n

    def skewness(self) -> torch.Tensor:
        """Biased Fisher-Pearson skewness ``m3 / m2**1.5``; NaN where the variance is 0."""
        self._require(3)
        m2, m3 = self.m2 / self.n, self.m3 / self.n
        return _nan_where_constant(m3 / m2.clamp_min(_TINY).pow(1.5), m2, self.mean)

    def excess_kurtosis(self) -> torch.Tensor:
        """Fisher excess kurtosis ``m4 / m2**2 - 3`` (biased); NaN where the variance is 0."""
        self._require(4)
        m2, m4 = self.m2 / self.n, self.m4 / self.n
        return _nan_where_constant(m4 / m2.clamp_min(_TINY).pow(2) - 3, m2, self.mean)


_TINY = torch.finfo(torch.float64).tiny


def _nan_where_constant(value: torch.Tensor, m2: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    # Same rule as SciPy: the data count as constant when the variance is at rounding level of the mean.
    constant = m2 <= (torch.finfo(torch.float64).resolution * mean) ** 2
    return torch.where(constant, torch.full_like(value, math.nan), value)


def _batch_moments(x: torch.Tensor, dim: int, order: int) -> tuple:
    """Count, mean and ``M_2..M_order`` of a float64 tensor along ``dim`` (exact two-pass)."""
    n = x.shape[dim]
    mean = x.mean(dim=dim)
    d = x - mean.unsqueeze(dim)
    d2 = d * d
    sums = [d2.sum(dim=dim)]
    if order >= 3:
        sums.append((d2 * d).sum(dim=dim))
    if order >= 4:
        sums.append((d2 * d2).sum(dim=dim))
    return (n, mean, *sums)


# ---------------------------------------------------------------------------------------------------------------
# Deterministic bounded token sample: deepcompressor.calib.token_sample (the KV calibrator uses it too)

# ---------------------------------------------------------------------------------------------------------------
# Accumulators


@dataclass
class ActivationStats:
    """Outlier statistics of one linear layer's input.

    ``abs_max`` and ``kurtosis`` cover every token seen, medians the ``num_sampled`` sampled tokens.
    ``channel_max_to_median_max`` / ``worst_channel`` are taken over the channels whose median |X| is not 0: a
    channel that is exactly 0 for most tokens (e.g. GELU outputs that underflow in bfloat16) has an infinite
    ratio that says nothing about its outliers; such channels are counted in ``num_zero_median_channels`` and
    keep ``inf`` in ``channel_max_to_median``.
    """

    num_tokens: int
    num_sampled: int
    channels: int
    abs_max: float
    abs_median: float
    max_to_median: float
    kurtosis: float
    channel_max_to_median_max: float
    worst_channel: int
    num_zero_median_channels: int
    channel_abs_max: torch.Tensor = field(repr=False)
    channel_max_to_median: torch.Tensor = field(repr=False)

    def scalars(self) -> dict:
        return {
            "num_tokens": self.num_tokens,
            "num_sampled": self.num_sampled,
            "channels": self.channels,
            "abs_max": self.abs_max,
            "abs_median": self.abs_median,
            "max_to_median": self.max_to_median,
            "kurtosis": self.kurtosis,
            "channel_max_to_median_max": self.channel_max_to_median_max,
            "worst_channel": self.worst_channel,
            "num_zero_median_channels": self.num_zero_median_channels,
        }


class ActivationAccumulator:
    """Streaming ``ActivationStats`` of a linear layer's input (``update`` with ``[..., C]`` batches)."""

    def __init__(self, token_budget: int, seed: int = 0, name: str = "") -> None:
        self.name = name
        self.moments = CentralMoments(order=4, per_channel=False)
        self.reservoir = TokenReservoir(token_budget, seed)
        self.channel_abs_max: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if not x.is_floating_point():
            raise TypeError(f"{self.name or 'ActivationAccumulator'}: expected a floating-point input, got {x.dtype}")
        rows = as_token_matrix(x)
        if self.channel_abs_max is not None and rows.shape[1] != self.channel_abs_max.shape[0]:
            raise ValueError(
                f"{self.name or 'ActivationAccumulator'}: input has {rows.shape[1]} channels, "
                f"earlier inputs had {self.channel_abs_max.shape[0]}"
            )
        self.moments.update(rows)
        batch_max = rows.abs().amax(dim=0).double()
        self.channel_abs_max = (
            batch_max if self.channel_abs_max is None else torch.maximum(self.channel_abs_max, batch_max)
        )
        self.reservoir.update(rows)

    def result(self) -> ActivationStats:
        if self.channel_abs_max is None:
            raise ValueError(f"{self.name or 'ActivationAccumulator'}: no data was recorded")
        # The medians are computed where the data came from (selection is much faster on a GPU).
        device = self.channel_abs_max.device
        sample = self.reservoir.unordered_rows.to(device).abs()
        if sample.dtype in (torch.float16, torch.bfloat16):
            sample = sample.float()
        abs_max = self.channel_abs_max.max().item()
        abs_median = median(sample).item()
        per_channel = _safe_divide(self.channel_abs_max, median(sample, dim=0)).cpu()
        channel_abs_max = self.channel_abs_max.cpu()
        del sample
        finite = torch.isfinite(per_channel)
        worst = int(torch.argmax(torch.where(finite, per_channel, -math.inf)).item())
        return ActivationStats(
            num_tokens=self.reservoir.seen,
            num_sampled=self.reservoir.num_rows,
            channels=channel_abs_max.numel(),
            abs_max=abs_max,
            abs_median=abs_median,
            max_to_median=_ratio(abs_max, abs_median),
            kurtosis=float(self.moments.excess_kurtosis()),
            channel_max_to_median_max=per_channel[worst].item() if finite.any() else math.nan,
            worst_channel=worst,
            num_zero_median_channels=int((~finite).sum().item()),
            channel_abs_max=channel_abs_max,
            channel_max_to_median=per_channel,
        )


@dataclass
class KVStats:
    """Dynamic-range and skewness statistics of one layer's cached K or V (over every token seen)."""

    num_tokens: int
    channels: int
    cv_chan: float
    cv_tok: float
    mean_abs_skew: float
    max_abs_skew: float
    worst_skew_channel: int
    num_constant_channels: int
    channel_range: torch.Tensor = field(repr=False)
    channel_skewness: torch.Tensor = field(repr=False)

    def scalars(self) -> dict:
        return {
            "num_tokens": self.num_tokens,
            "channels": self.channels,
            "cv_chan": self.cv_chan,
            "cv_tok": self.cv_tok,
            "mean_abs_skew": self.mean_abs_skew,
            "max_abs_skew": self.max_abs_skew,
            "worst_skew_channel": self.worst_skew_channel,
            "num_constant_channels": self.num_constant_channels,
        }


class KVAccumulator:
    """Streaming ``KVStats`` of ``[tokens, C]`` batches (see ``kv_token_matrix``); exact, no sampling needed."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.channel_moments = CentralMoments(order=3, per_channel=True)
        self.token_range_moments = CentralMoments(order=2, per_channel=False)
        self.channel_min: torch.Tensor | None = None
        self.channel_max: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        _check_matrix(x, self.name or "KVAccumulator")
        if self.channel_min is not None and x.shape[1] != self.channel_min.shape[0]:
            raise ValueError(
                f"{self.name or 'KVAccumulator'}: {x.shape[1]} channels, earlier batches had {self.channel_min.shape[0]}"
            )
        x64 = x.double()
        lo, hi = x64.amin(dim=0), x64.amax(dim=0)
        if self.channel_min is None:
            self.channel_min, self.channel_max = lo, hi
        else:
            self.channel_min = torch.minimum(self.channel_min, lo)
            self.channel_max = torch.maximum(self.channel_max, hi)
        self.token_range_moments.update(x64.amax(dim=1) - x64.amin(dim=1))
        self.channel_moments.update(x64)

    def result(self) -> KVStats:
        if self.channel_min is None:
            raise ValueError(f"{self.name or 'KVAccumulator'}: no data was recorded")
        channel_range = (self.channel_max - self.channel_min).cpu()
        tok = self.token_range_moments
        tok_mean = tok.mean.item()
        cv_tok = math.sqrt(tok.variance().item()) / tok_mean if tok_mean != 0 else math.nan
        gamma = self.channel_moments.skewness().cpu()
        mean_abs, max_abs = skewness_summary(gamma)
        abs_gamma = torch.nan_to_num(gamma.abs(), nan=-1.0)
        return KVStats(
            num_tokens=self.channel_moments.n,
            channels=channel_range.numel(),
            cv_chan=coefficient_of_variation(channel_range),
            cv_tok=cv_tok,
            mean_abs_skew=mean_abs,
            max_abs_skew=max_abs,
            worst_skew_channel=int(torch.argmax(abs_gamma).item()),
            num_constant_channels=int(torch.isnan(gamma).sum().item()),
            channel_range=channel_range,
            channel_skewness=gamma,
        )
