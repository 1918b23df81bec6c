"""BSQ-VAE of Infinity (ARCHITECTURE §7): convolutional decoder, encoder and multi-scale bitwise quantiser.

Module names equal the released checkpoint names: every convolution wraps an inner `nn.Conv2d` called `.conv`, every
norm an inner `nn.GroupNorm` called `.norm`, and the quantiser is registered twice (`quantizer` and `quantize`, the
same module) owning the int64 buffer `lfq.mask`.

Only `decode` is needed for text-to-image generation; `decode(..., tiled=True)` gives the same image with a much
lower peak memory (section "Band-wise decode"). Checkpoints are loaded strictly (see `load_vae`): the model is built on
the meta device and its tensors are taken from the checkpoint, so weights are never initialised twice.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .codes import bits_to_code_map, interpolate_codes, summed_codes_from_bits

__all__ = [
    "BSQVAE",
    "DEFAULT_TILE_ROWS",
    "VAE_CONFIGS",
    "VAECheckpointError",
    "VAEConfig",
    "build_vae_from_state_dict",
    "image_to_uint8_bgr",
    "load_vae",
    "random_vae",
    "tiny_vae_config",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of a BSQ-VAE.

    codebook_dim: bits per latent position `d` (= z channels).
    stride: spatial down-sampling factor (upstream `patch_size`), a power of two.
    ch_mult: width multipliers per level (level i has width `base_ch * ch_mult[i]`).
    """

    codebook_dim: int
    stride: int
    ch_mult: tuple[int, ...]
    base_ch: int = 128
    num_res_blocks: int = 2
    image_channels: int = 3
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.codebook_dim < 1 or self.codebook_dim > 62:
            raise ValueError(f"VAEConfig: codebook_dim must be in [1, 62] (int64 bit mask), got {self.codebook_dim}")
        n_up = int(math.log2(self.stride)) if self.stride > 0 else -1
        if self.stride < 1 or 2**n_up != self.stride:
            raise ValueError(f"VAEConfig: stride must be a power of two, got {self.stride}")
        if n_up > len(self.ch_mult) - 1:
            raise ValueError(f"VAEConfig: stride {self.stride} needs at least {n_up + 1} levels, ch_mult={self.ch_mult}")
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))

    @property
    def num_resamples(self) -> int:
        """Number of 2x up-sampling (decoder) / down-sampling (encoder) stages."""
        return int(math.log2(self.stride))


# Released VAEs (§1) and the VAE of the golden test vectors (tests/data/infinity/golden, "tiny VAE").
VAE_CONFIGS: dict[str, VAEConfig] = {
    "d32": VAEConfig(codebook_dim=32, stride=16, ch_mult=(1, 2, 4, 4, 4), name="d32"),
    "d14_patchify": VAEConfig(codebook_dim=14, stride=8, ch_mult=(1, 2, 4, 4), name="d14_patchify"),
    "tiny_golden": VAEConfig(codebook_dim=6, stride=4, ch_mult=(1, 1, 2), base_ch=32, name="tiny_golden"),
}


def tiny_vae_config(d: int, stride: int = 8) -> VAEConfig:
    """Small VAE for embedded tiny models: `d` bits per position, base width 32, `ch_mult` (1, 1, 2, ...).

    One level per resampling stage plus one: stride 8 -> (1, 1, 2, 2) (decoder widths 64, 64, 32, 32),
    stride 4 -> (1, 1, 2) (the architecture of the golden test VAE).
    """
    if stride < 2 or stride & (stride - 1):
        raise ValueError(f"tiny_vae_config: stride must be a power of two >= 2, got {stride}")
    levels = int(math.log2(stride)) + 1
    ch_mult = tuple(1 if i < 2 else 2 for i in range(levels))
    return VAEConfig(codebook_dim=d, stride=stride, ch_mult=ch_mult, base_ch=32, name=f"tiny_d{d}_s{stride}")


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def _num_groups(channels: int) -> int:
    return 32 if channels % 32 == 0 else 24


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class Conv(nn.Module):
    """2-D convolution wrapper (the released names carry an inner `.conv`)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Norm(nn.Module):
    """GroupNorm wrapper (32 groups, or 24 when the width is not a multiple of 32; eps 1e-6)."""

    def __init__(self, channels: int):
        super().__init__()
        groups = _num_groups(channels)
        if channels % groups != 0:
            raise ValueError(f"Norm: {channels} channels are divisible by neither 32 nor 24")
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = Norm(cin)
        self.conv1 = Conv(cin, cout, 3, padding=1)
        self.norm2 = Norm(cout)
        self.conv2 = Conv(cout, cout, 3, padding=1)
        self.nin_shortcut = Conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Level(nn.Module):
    """One resolution level: ResnetBlocks, optionally followed by a resampling stage (`upsample` / `downsample`)."""

    def __init__(self, widths: Sequence[tuple[int, int]], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin, cout) for cin, cout in widths)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_ch * m for m in cfg.ch_mult]
        top = widths[-1]
        self.conv_in = Conv(cfg.codebook_dim, top, 3, padding=1)
        self.mid = Mid(top)
        levels: list[Level] = [None] * len(widths)  # type: ignore[list-item]
        cin = top
        for i in reversed(range(len(widths))):
            cout = widths[i]
            blocks = [(cin, cout)] + [(cout, cout)] * cfg.num_res_blocks
            up = Upsample(cout) if 1 <= i <= cfg.num_resamples else None
            levels[i] = Level(blocks, up, "upsample")
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = Norm(widths[0])
        self.conv_out = Conv(widths[0], cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------------
# Band-wise decode ("tiled"): the same network and the same GroupNorm statistics, a lower peak memory
#
# The plain decoder keeps several full-resolution activations alive at once (block input, norm output, sigmoid,
# swish output, conv output ...). Tiling the whole network spatially would change the GroupNorm statistics, which
# are global over the image, so instead the network runs layer by layer on the full tensor and only each expensive
# op (3x3 conv with its norm + swish, nearest up-sampling + conv, the 1x1 shortcut) is computed over horizontal bands
# of rows, with the one-row halo a 3x3 conv needs. GroupNorm statistics are taken over the whole tensor first
# (band by band, in float32) and then applied band by band. A ResnetBlock thus holds only its input (needed for the
# residual) and one output-sized tensor, into which conv2 + shortcut are written back in place.
#
# Stages whose tensor is no taller than one band run the plain modules unchanged (the low-resolution mid block and
# small levels), so a band height >= the image height gives exactly the plain decode.

# Measured on an H200, 1024x1024 bf16 (d32 and d14_patchify): peak 2434 MiB plain; 819 / 867 / 965 MiB tiled with
# 32 / 64 / 128 rows, at 2.7x / 1.4x / 1.0x the plain time (per-band launches). 64 balances the two.
DEFAULT_TILE_ROWS = 64


def _bands(height: int, rows: int):
    """Row ranges `[r0, r1)` of at most `rows` rows covering `[0, height)`, top to bottom."""
    for r0 in range(0, height, rows):
        yield r0, min(r0 + rows, height)


def _norm_scale_shift(norm: Norm, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm of the whole `x` as a per-(sample, channel) affine map: `norm(x) == x * scale + shift`.

    Mean and variance are computed band by band in float32 (float64 for a float64 model; never a full-size float32
    copy of `x`) and merged with Chan et al.'s pairwise update, which is as accurate as one pass over the whole
    tensor. Returns `[B, C, 1, 1]` tensors in that accumulation dtype.
    """
    gn = norm.norm
    b, c, height, _ = x.shape
    groups = gn.num_groups
    acc = torch.promote_types(x.dtype, torch.float32)
    count = 0
    mean = torch.zeros(b, groups, dtype=acc, device=x.device)
    m2 = torch.zeros_like(mean)  # sum of squared deviations from `mean`
    for r0, r1 in _bands(height, rows):
        band = x[:, :, r0:r1].to(acc).reshape(b, groups, -1)
        var_b, mean_b = torch.var_mean(band, dim=-1, correction=0)
        n_b = band.shape[-1]
        total = count + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / total)
        m2 = m2 + var_b * n_b + delta.square() * (count * n_b / total)
        count = total
    rstd = torch.rsqrt(m2 / count + gn.eps)
    per_channel = c // groups
    scale = rstd.repeat_interleave(per_channel, dim=1) * gn.weight.to(acc)
    shift = gn.bias.to(acc) - mean.repeat_interleave(per_channel, dim=1) * scale
    return scale[:, :, None, None], shift[:, :, None, None]


def _norm_swish(band: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`swish(norm(band))` with precomputed statistics; rounded to the band's dtype before the swish, as the plain
    path does (its GroupNorm returns the input dtype)."""
    y = (band * scale).add_(shift).to(band.dtype)
    return y.mul_(torch.sigmoid(y))


def _halo(r0: int, r1: int, height: int) -> tuple[int, int]:
    """Input rows `[a, b)` a 3x3 convolution needs for output rows `[r0, r1)`: one more on each side, inside the image."""
    return max(r0 - 1, 0), min(r1 + 1, height)


def _conv3x3_band(conv: Conv, src: torch.Tensor, r0: int, r1: int, height: int) -> torch.Tensor:
    """Rows `[r0, r1)` of `conv(V)` (3x3, padding 1) for an input `V` of `height` rows, given `src = V[:, :, a:b]`
    with `a, b = _halo(r0, r1, height)`.

    Zero padding is added vertically only at the image borders (horizontally as usual), so every output row sees
    exactly the inputs it sees in the full convolution.
    """
    inner = conv.conv
    if inner.kernel_size != (3, 3) or inner.padding != (1, 1) or inner.stride != (1, 1):
        raise ValueError(f"tiled decode: expected a 3x3 conv with padding 1, got {inner}")
    top, bottom = int(r0 == 0), int(r1 == height)
    if top or bottom:
        src = F.pad(src, (0, 0, top, bottom))
    return F.conv2d(src, inner.weight, inner.bias, padding=(0, 1))


def _conv_tiled(conv: Conv, x: torch.Tensor, rows: int) -> torch.Tensor:
    """`conv(x)` band by band (the latent-resolution `conv_in`)."""
    height = x.shape[2]
    if height <= rows:
        return conv(x)
    out = x.new_empty(x.shape[0], conv.conv.out_channels, height, x.shape[3])
    for r0, r1 in _bands(height, rows):
        a, b = _halo(r0, r1, height)
        out[:, :, r0:r1] = _conv3x3_band(conv, x[:, :, a:b], r0, r1, height)
    return out


def _resnet_block_tiled(blk: ResnetBlock, x: torch.Tensor, rows: int) -> torch.Tensor:
    """`blk(x)` holding only `x` and one output-sized tensor `h` at full size (plus band temporaries)."""
    height = x.shape[2]
    if height <= rows:
        return blk(x)
    scale1, shift1 = _norm_scale_shift(blk.norm1, x, rows)
    h = x.new_empty(x.shape[0], blk.conv1.conv.out_channels, height, x.shape[3])
    for r0, r1 in _bands(height, rows):
        a, b = _halo(r0, r1, height)
        h[:, :, r0:r1] = _conv3x3_band(blk.conv1, _norm_swish(x[:, :, a:b], scale1, shift1), r0, r1, height)
    # norm2 needs the statistics of the finished h; only then can conv2 start.
    scale2, shift2 = _norm_scale_shift(blk.norm2, h, rows)
    # conv2 + shortcut are written back into h from the top. Band [r0, r1) reads h rows r0-1 .. r1, but row r0-1 was
    # overwritten by the previous band, so its original value is kept in `carry` (one row) before each write.
    carry = None
    for r0, r1 in _bands(height, rows):
        a, b = _halo(r0, r1, height)
        src = h[:, :, a:b] if carry is None else torch.cat([carry, h[:, :, r0:b]], dim=2)
        out = _conv3x3_band(blk.conv2, _norm_swish(src, scale2, shift2), r0, r1, height)
        xb = x[:, :, r0:r1]
        out += xb if blk.nin_shortcut is None else blk.nin_shortcut(xb)  # a + b == b + a: same as `shortcut + h`
        carry = h[:, :, r1 - 1 : r1].clone()
        h[:, :, r0:r1] = out
    return h


def _upsampled_rows(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows `[a, b)` of the nearest 2x up-sampling of `x`: copies of x rows a//2 .. (b-1)//2."""
    lo, hi = a // 2, (b - 1) // 2 + 1
    band = F.interpolate(x[:, :, lo:hi], scale_factor=2.0, mode="nearest")
    return band[:, :, a - 2 * lo : b - 2 * lo]


def _upsample_tiled(up: Upsample, x: torch.Tensor, rows: int) -> torch.Tensor:
    """`up(x)` (nearest 2x + 3x3 conv) band by band; the up-sampled tensor exists only one band at a time."""
    height = 2 * x.shape[2]
    if height <= rows:
        return up(x)
    out = x.new_empty(x.shape[0], up.conv.conv.out_channels, height, 2 * x.shape[3])
    for r0, r1 in _bands(height, rows):
        a, b = _halo(r0, r1, height)
        out[:, :, r0:r1] = _conv3x3_band(up.conv, _upsampled_rows(x, a, b), r0, r1, height)
    return out


def _image_out_tiled(dec: Decoder, h: torch.Tensor, rows: int) -> torch.Tensor:
    """`conv_out(swish(norm_out(h)))` band by band, written straight into a float32 image clamped to [-1, 1]."""
    height = h.shape[2]
    if height <= rows:
        return dec.conv_out(swish(dec.norm_out(h))).float().clamp_(-1.0, 1.0)
    scale, shift = _norm_scale_shift(dec.norm_out, h, rows)
    img = torch.empty(h.shape[0], dec.conv_out.conv.out_channels, height, h.shape[3], device=h.device)
    for r0, r1 in _bands(height, rows):
        a, b = _halo(r0, r1, height)
        band = _conv3x3_band(dec.conv_out, _norm_swish(h[:, :, a:b], scale, shift), r0, r1, height)
        img[:, :, r0:r1] = band.float().clamp_(-1.0, 1.0)
    return img


@torch.no_grad()
def _decode_tiled(dec: Decoder, z: torch.Tensor, rows: int) -> torch.Tensor:
    """`Decoder` forward + float32 + clamp (as `BSQVAE.decode`), computed in bands of `rows` rows.

    Same layers in the same order as `Decoder.forward`; `h = stage(h)` drops each stage input as soon as the stage
    returns. Inference only: no autograd history is recorded.
    """
    h = _conv_tiled(dec.conv_in, z, rows)
    h = _resnet_block_tiled(dec.mid.block_1, h, rows)
    h = _resnet_block_tiled(dec.mid.block_2, h, rows)
    for level in reversed(dec.up):
        for blk in level.block:
            h = _resnet_block_tiled(blk, h, rows)
        up = getattr(level, level.resample_name, None)
        if up is not None:
            h = _upsample_tiled(up, h, rows)
    return _image_out_tiled(dec, h, rows)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_ch * m for m in cfg.ch_mult]
        self.conv_in = Conv(cfg.image_channels, cfg.base_ch, 3, padding=1)
        levels = []
        cin = cfg.base_ch
        for i, cout in enumerate(widths):
            blocks = [(cin, cout)] + [(cout, cout)] * (cfg.num_res_blocks - 1)
            down = Downsample(cout) if i < cfg.num_resamples else None
            levels.append(Level(blocks, down, "downsample"))
            cin = cout
        self.down = nn.ModuleList(levels)
        self.mid = Mid(widths[-1])
        self.norm_out = Norm(widths[-1])
        self.conv_out = Conv(widths[-1], cfg.codebook_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


def bit_mask(d: int, device: torch.device | str | None = None) -> torch.Tensor:
    """int64 `[2^(d-1), ..., 2, 1]`. Built from python ints: `2 ** arange` on the meta device would pull in the
    compiler stack (seconds of import time)."""
    return torch.tensor([1 << k for k in range(d - 1, -1, -1)], dtype=torch.int64, device=device)


class BinaryQuantizer(nn.Module):
    """Holds the bit-weight mask `[2^(d-1), ..., 2, 1]` (index <-> bits) and a constant zero (non-persistent)."""

    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.register_buffer("mask", bit_mask(d), persistent=True)
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    def bits_to_indices(self, bits: torch.Tensor) -> torch.Tensor:
        """Bits `[..., d]` -> int64 codebook indices `[...]` (bit 0 is the most significant)."""
        return (bits.to(torch.int64) * self.mask).sum(-1)

    def indices_to_bits(self, indices: torch.Tensor) -> torch.Tensor:
        return (indices.to(torch.int64).unsqueeze(-1) & self.mask).ne(0).to(torch.int64)


class MultiScaleBSQ(nn.Module):
    """Residual multi-scale binary spherical quantiser (§7.2); no weights since `dim == codebook_dim`."""

    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.lfq = BinaryQuantizer(d)

    def forward(
        self, z: torch.Tensor, vae_schedule: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Quantise `z [B, d, H, W]` over the schedule (last scale = full grid).

        Returns the accumulated codes `[B, d, H, W]` and the per-scale bits `[B, h_k, w_k, d]` (int64).
        """
        if z.dim() != 4 or z.shape[1] != self.d:
            raise ValueError(f"MultiScaleBSQ: expected z [B, {self.d}, H, W], got {tuple(z.shape)}")
        full = tuple(z.shape[2:])
        if tuple(int(v) for v in vae_schedule[-1][1:]) != full:
            raise ValueError(f"MultiScaleBSQ: last scale {tuple(vae_schedule[-1])} must equal the latent grid {full}")
        residual = z
        summed = torch.zeros_like(z)
        all_bits = []
        for _, h, w in vae_schedule:
            r = residual if (h, w) == full else F.interpolate(residual, size=(h, w), mode="area")
            r = F.normalize(r, dim=1)
            bits = (r > 0).to(torch.int64).permute(0, 2, 3, 1).contiguous()
            q = bits_to_code_map(bits, dtype=z.dtype)
            if (h, w) != full:
                q = interpolate_codes(q, full)
            residual = residual - q
            summed = summed + q
            all_bits.append(bits)
        return summed, all_bits


# ----------------------------------------------------------------------------------------------------------------
# The VAE


def _tile_rows_arg(tiled: bool, tile_rows: int | None) -> int | None:
    """Validated band height of `BSQVAE.decode`, or None for the plain decode."""
    # ValueError (not TypeError) for every bad argument, as documented.
    if not isinstance(tiled, bool):
        raise ValueError(f"BSQVAE.decode: tiled must be True or False, got {tiled!r}")  # noqa: TRY004
    if tile_rows is None:
        return DEFAULT_TILE_ROWS if tiled else None
    if not tiled:
        raise ValueError(f"BSQVAE.decode: tile_rows={tile_rows!r} is only used with tiled=True")
    if isinstance(tile_rows, bool) or not isinstance(tile_rows, int) or tile_rows < 1:
        raise ValueError(f"BSQVAE.decode: tile_rows must be a positive int, got {tile_rows!r}")
    return tile_rows


class BSQVAE(nn.Module):
    """BSQ-VAE. `decode(summed_codes [B, d, H, W])` -> image `[B, 3, stride·H, stride·W]` in [-1, 1] (float32)."""

    def __init__(self, cfg: VAEConfig, with_encoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg) if with_encoder else None
        self.decoder = Decoder(cfg)
        self.quantizer = MultiScaleBSQ(cfg.codebook_dim)
        # Registered a second time under the other released name; same module, so the mask exists once.
        self.quantize = self.quantizer

    @property
    def codebook_dim(self) -> int:
        return self.cfg.codebook_dim

    @property
    def stride(self) -> int:
        return self.cfg.stride

    def _check_latent(self, z: torch.Tensor, what: str) -> None:
        if z.dim() != 4 or z.shape[1] != self.cfg.codebook_dim:
            raise ValueError(f"BSQVAE.{what}: expected [B, {self.cfg.codebook_dim}, H, W], got {tuple(z.shape)}")

    def decode(self, summed_codes: torch.Tensor, tiled: bool = False, tile_rows: int | None = None) -> torch.Tensor:
        """Decoder + clamp to [-1, 1]; runs in the VAE's dtype, returns float32.

        tiled: lower the peak memory (for devices whose CPU and GPU share one memory). The network still runs layer
            by layer on the whole image and GroupNorm statistics stay global (float32, over the full tensor), but
            every convolution, its norm + swish and the up-sampling are computed over horizontal bands of rows, so
            at most a block's input and one output-sized tensor are alive at full resolution. The image equals the
            plain decode up to float rounding (within one uint8 level); inference only, no autograd history.
            False (default): the plain decode, unchanged.
        tile_rows: rows per band at every resolution (default `DEFAULT_TILE_ROWS` = 64); only with `tiled=True`.
            Stages no taller than one band run the plain modules, so `tile_rows >= image height` gives exactly
            the plain decode. Smaller bands: smaller band temporaries, more (smaller) kernel launches.
        """
        self._check_latent(summed_codes, "decode")
        rows = _tile_rows_arg(tiled, tile_rows)
        p = self.decoder.conv_in.conv.weight
        z = summed_codes.to(device=p.device, dtype=p.dtype)
        if rows is not None:
            return _decode_tiled(self.decoder, z, rows)
        img = self.decoder(z)
        return img.float().clamp_(-1.0, 1.0)

    def decode_from_bits(
        self, bits_per_scale: Sequence[torch.Tensor], vae_schedule: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Per-scale bits `[B, (1,) h_k, w_k, d]` at the VAE grid -> image (upstream `decode_from_indices`)."""
        for k, bits in enumerate(bits_per_scale):
            if bits.shape[-1] != self.cfg.codebook_dim:
                raise ValueError(
                    f"BSQVAE.decode_from_bits: scale {k} has {bits.shape[-1]} bits, the VAE has d={self.cfg.codebook_dim}"
                )
        return self.decode(summed_codes_from_bits(bits_per_scale, vae_schedule))

    def encode(
        self, image: torch.Tensor, vae_schedule: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image in [-1, 1] `[B, 3, H, W]` -> (summed codes `[B, d, H/s, W/s]`, per-scale bits `[B, h, w, d]`)."""
        if self.encoder is None:
            raise RuntimeError("BSQVAE.encode: this VAE was loaded without encoder weights (decoder-only)")
        p = self.encoder.conv_in.conv.weight
        z = self.encoder(image.to(device=p.device, dtype=p.dtype))
        return self.quantizer(z, vae_schedule)

    def forward(self, summed_codes: torch.Tensor) -> torch.Tensor:
        return self.decode(summed_codes)


# ----------------------------------------------------------------------------------------------------------------
# Loading


class VAECheckpointError(ValueError):
    """A VAE checkpoint does not match the architecture (names the offending tensors)."""


# Tensors a checkpoint may carry that the model does not load (non-persistent constant).
_IGNORABLE_SUFFIXES = ("lfq.zero",)


def _fmt_names(names: Sequence[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _extract_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The released file is `{"vae": state_dict, "ema": ...}`; a flat state dict is accepted as well."""
    if not isinstance(obj, Mapping):
        raise VAECheckpointError(f"{source}: expected a dict, got {type(obj).__name__}")
    if "vae" in obj:
        obj = obj["vae"]
        if not isinstance(obj, Mapping):
            raise VAECheckpointError(f"{source}: entry 'vae' is a {type(obj).__name__}, expected a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise VAECheckpointError(f"{source}: non-tensor entries in the VAE state dict: {_fmt_names(bad)}")
    return dict(obj)


def _canonical_names(
    sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Map "plain" spellings (`X.weight` of a conv / norm) onto the module names (`X.conv.weight` / `X.norm.weight`)."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in sd.items():
        if key.endswith(_IGNORABLE_SUFFIXES):
            continue
        name = key
        if key not in expected:
            prefix, _, leaf = key.rpartition(".")
            candidates = [f"{prefix}.{inner}.{leaf}" for inner in ("conv", "norm") if f"{prefix}.{inner}.{leaf}" in expected]
            if len(candidates) == 1:
                name = candidates[0]
        if name in out:
            raise VAECheckpointError(f"{source}: tensor {name!r} given twice (as {origin[name]!r} and {key!r})")
        out[name] = value
        origin[name] = key
    return out


def _check_against(
    sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str
) -> None:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [
        f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_fmt_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_fmt_names(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {len(misshaped)}: {_fmt_names(misshaped)}")
    if problems:
        raise VAECheckpointError(f"{source}: VAE state dict does not match the architecture; " + "; ".join(problems))


def _materialise_constants(model: BSQVAE, device: torch.device) -> None:
    """Non-persistent buffers are not in checkpoints: (re)create them on the target device."""
    lfq = model.quantizer.lfq
    lfq.register_buffer("zero", torch.tensor(0.0, device=device), persistent=False)


def build_vae_from_state_dict(
    cfg: VAEConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    strict_encoder: bool = True,
    source: str = "<state dict>",
) -> BSQVAE:
    """Build a `BSQVAE` on the meta device and take every tensor from `state_dict` (strict, see `load_vae`)."""
    device = torch.device(device)
    has_encoder = any(k.startswith("encoder.") for k in state_dict)
    with_encoder = strict_encoder or has_encoder
    with torch.device("meta"):
        model = BSQVAE(cfg, with_encoder=with_encoder)
    expected = model.state_dict()
    sd = _canonical_names(state_dict, expected, source)
    _check_against(sd, expected, source)
    mask_ref = bit_mask(cfg.codebook_dim, device="cpu")
    for key in ("quantizer.lfq.mask", "quantize.lfq.mask"):
        if not torch.equal(sd[key].cpu().to(torch.int64), mask_ref):
            raise VAECheckpointError(f"{source}: {key} is not the bit mask [2^{cfg.codebook_dim - 1}, ..., 2, 1]")
    ready = {k: v.detach().to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    model.load_state_dict(ready, strict=True, assign=True)
    _materialise_constants(model, device)
    return model.eval().requires_grad_(False)


def load_vae(
    path: str | os.PathLike,
    cfg: VAEConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    strict_encoder: bool = True,
) -> BSQVAE:
    """Load a VAE checkpoint file (`{"vae": state_dict, "ema": ...}` or a flat state dict).

    Both spellings of the released files are accepted (module names, or plain `X.weight` for a conv/norm `X`).
    Any missing, unexpected or mis-shaped tensor raises `VAECheckpointError` naming it; `ema` and the
    non-persistent `lfq.zero` are ignored. With `strict_encoder=False` a checkpoint without any `encoder.*`
    tensor gives a decoder-only VAE (a partial encoder is still an error).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VAE checkpoint not found: {path}")
    logger.info("loading VAE %s (%s) from %s", cfg.name, dtype, path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = _extract_state_dict(obj, path)
    return build_vae_from_state_dict(cfg, sd, device=device, dtype=dtype, strict_encoder=strict_encoder, source=path)


def _fan_in(t: torch.Tensor) -> int:
    return int(t[0].numel()) if t.dim() > 1 else 1


def random_vae(
    cfg: VAEConfig,
    seed: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    with_encoder: bool = True,
) -> BSQVAE:
    """Deterministic random weights (for benchmarks without checkpoints): same seed -> same weights on any device.

    Values are drawn on the CPU from a generator seeded with `seed`, in state-dict order: conv weights and biases
    uniform in ±1/sqrt(fan_in) (PyTorch's default scale), GroupNorm weight 1 and bias 0.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = BSQVAE(cfg, with_encoder=with_encoder)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    sd: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for name, meta in model.state_dict().items():
        if name.endswith("lfq.mask"):
            sd[name] = bit_mask(cfg.codebook_dim, device="cpu")
            continue
        owner = modules[name.rpartition(".")[0]]
        if isinstance(owner, nn.GroupNorm):
            value = torch.ones(meta.shape) if name.endswith(".weight") else torch.zeros(meta.shape)
        else:
            weight = owner.weight
            bound = 1.0 / math.sqrt(_fan_in(weight))
            value = torch.empty(meta.shape).uniform_(-bound, bound, generator=gen)
        sd[name] = value.to(dtype)
    return build_vae_from_state_dict(
        cfg, sd, device=device, dtype=dtype, strict_encoder=with_encoder, source=f"<random seed {seed}>"
    )


def image_to_uint8_bgr(image: torch.Tensor) -> torch.Tensor:
    """Decoded image `[B, 3, H, W]` in [-1, 1] -> `[B, H, W, 3]` uint8 BGR as the released sampler returns it.

    `((x + 1) / 2 * 255)` truncated toward zero, channels reversed (RGB -> BGR).
    """
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image_to_uint8_bgr: expected [B, 3, H, W], got {tuple(image.shape)}")
    x = (image.float().clamp(-1.0, 1.0) + 1) / 2
    return (x.permute(0, 2, 3, 1) * 255).to(torch.uint8).flip(-1)
