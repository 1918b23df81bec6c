"""Bit labels <-> VAE code maps and the multi-scale code arithmetic of the sampler.

Pure torch functions, no model state. Layout conventions:
* bits are 0/1 integers (or floats), channel-last: `[B, H, W, d]` (a singleton T axis `[B, 1, H, W, d]`, as the
  upstream sampler hands them to the VAE, is also accepted where noted);
* code maps are channel-first float tensors `[B, d, H, W]` (the VAE decoder input layout, T axis squeezed);
* a scale schedule is a sequence of `(t, h, w)` tuples (t is always 1 at inference).

With spatial patchify (8B) one transformer token carries the bits of a 2x2 patch of VAE positions: token channel
`4c + 2i + j` is VAE bit `c` at sub-position `(i, j)`. The VAE grid of token scale `(h, w)` is then `(2h, 2w)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "accumulate_scale",
    "bits_to_code_map",
    "bits_to_codes",
    "interpolate_codes",
    "pixel_shuffle_2x",
    "pixel_unshuffle_2x",
    "summed_codes_from_bits",
    "token_bits_to_vae_bits",
    "vae_scale_schedule",
]

ScaleSchedule = Sequence[Sequence[int]]


def bits_to_codes(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map bits `[..., d]` to BSQ codes `[..., d]`: `(2*bit - 1)/sqrt(d)`, L2-normalised over the last axis.

    Every entry is `±1/sqrt(d)`; the normalisation is kept because it fixes the float rounding of the released
    sampler (the summed code maps of the reference runs are reproduced bit-exactly this way).
    """
    if bits.dim() == 0:
        raise ValueError("bits_to_codes: bits must have a trailing bit axis, got a scalar")
    d = bits.shape[-1]
    codes = (2 * bits.to(dtype) - 1) / math.sqrt(d)
    return F.normalize(codes, p=2.0, dim=-1)


def bits_to_code_map(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bits `[B, H, W, d]` (or `[B, 1, H, W, d]`) -> channel-first code map `[B, d, H, W]` (channels-last memory)."""
    if bits.dim() == 5:
        if bits.shape[1] != 1:
            raise ValueError(f"bits_to_code_map: expected a singleton T axis in [B, 1, H, W, d], got {tuple(bits.shape)}")
        bits = bits[:, 0]
    if bits.dim() != 4:
        raise ValueError(f"bits_to_code_map: expected bits [B, H, W, d], got shape {tuple(bits.shape)}")
    # Computed in channel-last storage and returned as a permuted view (channels-last memory format): the
    # interpolation kernel picked for that layout is the one of the reference sampler, which makes the summed codes
    # and next-scale inputs bit-exact (a contiguous NCHW copy differs by ~1 ulp).
    return bits_to_codes(bits.contiguous(), dtype).permute(0, 3, 1, 2)


def interpolate_codes(code_map: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a code map `[B, d, H, W]` to `size = (H', W')` the way the released sampler does.

    Trilinear, `align_corners=False`, on the 5-D view `[B, d, 1, H, W]` (i.e. bilinear with half-pixel centres and no
    antialias); the same call serves up-sampling to the final grid and down-sampling to the next scale. Going through
    the 5-D trilinear kernel (not the 4-D bilinear one) keeps the rounding identical to the reference; so does
    keeping the memory format of the maps made by `bits_to_code_map` (do not call `.contiguous()` on them).
    """
    if code_map.dim() != 4:
        raise ValueError(f"interpolate_codes: expected [B, d, H, W], got shape {tuple(code_map.shape)}")
    h, w = int(size[0]), int(size[1])
    out = F.interpolate(code_map.unsqueeze(2), size=(1, h, w), mode="trilinear", align_corners=False)
    return out.squeeze(2)


def pixel_shuffle_2x(x: torch.Tensor) -> torch.Tensor:
    """`[B, 4c, h, w] -> [B, c, 2h, 2w]`: channel `4k + 2i + j` at `(y, x)` goes to channel `k` at `(2y+i, 2x+j)`."""
    if x.dim() != 4 or x.shape[1] % 4 != 0:
        raise ValueError(f"pixel_shuffle_2x: expected [B, 4c, h, w], got shape {tuple(x.shape)}")
    b, c4, h, w = x.shape
    c = c4 // 4
    return x.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)


def pixel_unshuffle_2x(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `pixel_shuffle_2x`: `[B, c, 2h, 2w] -> [B, 4c, h, w]`, channel `4k+2i+j` <- `(k, 2y+i, 2x+j)`."""
    if x.dim() != 4 or x.shape[2] % 2 != 0 or x.shape[3] % 2 != 0:
        raise ValueError(f"pixel_unshuffle_2x: expected [B, c, 2h, 2w], got shape {tuple(x.shape)}")
    b, c, h2, w2 = x.shape
    h, w = h2 // 2, w2 // 2
    return x.reshape(b, c, h, 2, w, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h, w)


def token_bits_to_vae_bits(bits: torch.Tensor, patchify: bool) -> torch.Tensor:
    """Sampled token bits `[B, h, w, d_vae]` -> VAE-grid bits `[B, H', W', d]`.

    Without patchify this is the identity (`d = d_vae`). With patchify `d_vae = 4d` and the 2x2 pixel shuffle
    places bit `k` of token `(y, x)` at VAE bit `k // 4`, position `(2y + (k % 4) // 2, 2x + k % 2)`.
    """
    if bits.dim() != 4:
        raise ValueError(f"token_bits_to_vae_bits: expected [B, h, w, d_vae], got shape {tuple(bits.shape)}")
    if not patchify:
        return bits
    return pixel_shuffle_2x(bits.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()


def vae_scale_schedule(scale_schedule: ScaleSchedule, patchify: bool) -> list[tuple[int, int, int]]:
    """Transformer token schedule `(t, h, w)` -> VAE latent schedule (`(t, 2h, 2w)` with patchify)."""
    f = 2 if patchify else 1
    out = []
    for entry in scale_schedule:
        if len(entry) != 3:
            raise ValueError(f"vae_scale_schedule: each scale must be (t, h, w), got {tuple(entry)}")
        t, h, w = (int(v) for v in entry)
        out.append((t, f * h, f * w))
    return out


def accumulate_scale(
    summed: torch.Tensor | None,
    code_map: torch.Tensor,
    si: int,
    vae_schedule: ScaleSchedule,
    patchify: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of the sampler's code accumulation (ARCHITECTURE §5 step 9).

    `summed` is the accumulated map at the final VAE grid (None before the first scale), `code_map` `[B, d, H', W']`
    the codes of scale `si` at its VAE grid. Returns the new `summed` and, unless `si` is the last scale, the
    word-embedding input of scale `si + 1` as tokens `[B, h·w, d_vae]` (row-major; pixel-unshuffled with patchify).
    """
    n = len(vae_schedule)
    if not 0 <= si < n:
        raise ValueError(f"accumulate_scale: scale index {si} outside a schedule of {n} scales")
    final_hw = tuple(vae_schedule[-1][1:])
    exp_hw = tuple(int(v) for v in vae_schedule[si][1:])
    if tuple(code_map.shape[2:]) != exp_hw:
        raise ValueError(f"accumulate_scale: scale {si} code map has grid {tuple(code_map.shape[2:])}, expected {exp_hw}")
    if si == n - 1:
        # The last scale is already on the final grid: added without interpolation.
        return (code_map if summed is None else summed + code_map), None
    up = interpolate_codes(code_map, final_hw)
    summed = up if summed is None else summed + up
    nxt = interpolate_codes(summed, vae_schedule[si + 1][1:])
    if patchify:
        nxt = pixel_unshuffle_2x(nxt)
    b, c = nxt.shape[:2]
    return summed, nxt.reshape(b, c, -1).transpose(1, 2)


def summed_codes_from_bits(bits_per_scale: Sequence[torch.Tensor], vae_schedule: ScaleSchedule) -> torch.Tensor:
    """Sum of the per-scale codes, each interpolated to the last scale's grid -> `[B, d, H, W]` (VAE decoder input).

    `bits_per_scale[k]` is `[B, h_k, w_k, d]` or `[B, 1, h_k, w_k, d]` at the VAE grid of scale k.
    """
    if len(bits_per_scale) != len(vae_schedule) or not bits_per_scale:
        raise ValueError(
            f"summed_codes_from_bits: {len(bits_per_scale)} bit tensors for a schedule of {len(vae_schedule)} scales"
        )
    summed = None
    for si, bits in enumerate(bits_per_scale):
        code_map = bits_to_code_map(bits)
        summed, _ = accumulate_scale(summed, code_map, si, vae_schedule, patchify=False)
    return summed
