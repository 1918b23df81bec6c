"""Synthetic linear layers whose inputs carry the outlier structure measured on Infinity.

Inputs ``x [tokens, in]`` (seeded, deterministic):

- a correlated Gaussian core: ``0.8 z + 0.6 u B`` with ``z ~ N(0, I)`` and a 16-dimensional shared factor ``u B``
  (real activations are far from independent across channels, which is what GPTQ exploits);
- per-token magnitudes ``exp(N(0, 0.3^2))``;
- a few outlier channels whose scale carries their variance, log-uniform in ``outlier_range``; the other channels
  have scales in ``[0.5, 1.5]``;
- FFN down-projection inputs (after the GELU) are ``gelu(core + 1)``, skewed positive, with ``in / 2048`` (at
  least 2) outlier channels of scale 15-40: ``absmax / median(|x|)`` of about 350 and a kurtosis above 1000 on
  4096 tokens, as measured on the FFN down-projection inputs of Infinity;
- up-projection and qkv inputs (after the modulated LayerNorm) have ``in / 512`` (at least 2) outlier channels of
  scale 8-25 (``absmax / median`` of about 80-250).

Weights are ``N(0, 1/in)`` with mild outliers: 1% of the input columns scaled by 2.5 and 0.1% of the entries by 5.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

__all__ = ["LAYER_SETS", "SyntheticLayer", "input_statistics", "synthetic_inputs", "synthetic_weight"]


@dataclass(frozen=True)
class SyntheticLayer:
    name: str
    in_features: int
    out_features: int
    kind: str  # ffn_up, ffn_down or sa_qkv

    @property
    def outlier_range(self) -> tuple[float, float]:
        return (15.0, 40.0) if self.kind == "ffn_down" else (8.0, 25.0)

    @property
    def num_outliers(self) -> int:
        return max(2, self.in_features // (2048 if self.kind == "ffn_down" else 512))


def _set(size: str, width: int, hidden: int) -> list[SyntheticLayer]:
    return [
        SyntheticLayer(f"{size}.ffn_up", width, hidden, "ffn_up"),
        SyntheticLayer(f"{size}.ffn_down", hidden, width, "ffn_down"),
        SyntheticLayer(f"{size}.sa_qkv", width, 3 * width, "sa_qkv"),
    ]


LAYER_SETS: dict[str, list[SyntheticLayer]] = {
    "tiny": _set("tiny", 128, 512),
    "2b": _set("2b", 2048, 8192),
    "8b": _set("8b", 3584, 14336),
}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def synthetic_inputs(layer: SyntheticLayer, tokens: int, seed: int, device="cpu") -> torch.Tensor:
    """``[tokens, in]`` float32 inputs on ``device``. The channel structure depends on the layer only (the same
    outlier channels for calibration and held-out tokens); ``seed`` draws the tokens."""
    structure = _generator(zlib.crc32(layer.name.encode()))
    n = layer.in_features
    factors = torch.randn(16, n, generator=structure) / 4.0
    channel_scale = 0.5 + torch.rand(n, generator=structure)
    num_outliers = layer.num_outliers
    outliers = torch.randperm(n, generator=structure)[:num_outliers]
    lo, hi = layer.outlier_range
    log_scale = torch.rand(num_outliers, generator=structure) * (torch.tensor(hi / lo).log()) + torch.tensor(lo).log()
    channel_scale[outliers] = log_scale.exp()

    g = _generator(seed)
    core = 0.8 * torch.randn(tokens, n, generator=g) + 0.6 * (torch.randn(tokens, 16, generator=g) @ factors)
    if layer.kind == "ffn_down":
        core = torch.nn.functional.gelu(core + 1.0)
    token_scale = (0.3 * torch.randn(tokens, 1, generator=g)).exp()
    return (core * token_scale * channel_scale).to(device)


def synthetic_weight(layer: SyntheticLayer, device="cpu") -> torch.Tensor:
    """``[out, in]`` float32 weight: ``N(0, 1/in)`` with mild column and entry outliers."""
    g = _generator(zlib.crc32(layer.name.encode()) + 1)
    out, n = layer.out_features, layer.in_features
    w = torch.randn(out, n, generator=g) / n**0.5
    columns = torch.randperm(n, generator=g)[: max(1, n // 100)]
    w[:, columns] *= 2.5
    entries = torch.rand(out, n, generator=g) < 1e-3
    w[entries] *= 5.0
    return w.to(device)


def input_statistics(x: torch.Tensor) -> dict[str, float]:
    """``absmax / median(|x|)`` and the (non-excess) kurtosis of all entries."""
    flat = x.flatten().double()
    absx = flat.abs()
    centered = flat - flat.mean()
    kurtosis = float(centered.pow(4).mean() / centered.pow(2).mean().square())
    return {"absmax_over_median": float(absx.max() / absx.median()), "kurtosis": kurtosis}
