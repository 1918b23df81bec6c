"""BSQ-VAE of Infinity (ARCHITECTURE §7): convolutional decoder, encoder and multi-scale bitwise quantiser.

Module names equal the released checkpoint names: every convolution wraps an inner `nn.Conv2d` called `.conv`, every
norm an inner `nn.GroupNorm` called `.norm`, and the quantiser is registered twice (`quantizer` and `quantize`, the
same module) owning the int64 buffer `lfq.mask`.

Only `decode` is needed for text-to-image generation. Checkpoints are loaded strictly (see `load_vae`): the model is
built on the meta device and its tensors are taken from the checkpoint, so weights are never initialised twice.
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


# Released VAEs (§1) and the VAE of the golden test vectors (GOLDEN.md "tiny VAE").
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

    def decode(self, summed_codes: torch.Tensor) -> torch.Tensor:
        """Decoder + clamp to [-1, 1]; runs in the VAE's dtype, returns float32."""
        self._check_latent(summed_codes, "decode")
        p = self.decoder.conv_in.conv.weight
        img = self.decoder(summed_codes.to(device=p.device, dtype=p.dtype))
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
