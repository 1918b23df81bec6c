"""The embedded tiny Infinity: seeded random weights that carry the outlier structure of the released models.

Shapes (arch preset ``tiny``): 6 blocks (2 chunks of 3), width 256, 4 heads of 64, FFN 1024, text width 256
(64 text tokens, a 2-layer seeded T5 with the shipped tokenizer), 16 VAE bits per token without patchify, a
stride-8 VAE (base width 32, ``ch_mult (1, 1, 2, 2)``). The '0.06M' schedule (7 scales up to 16x16 tokens, 521
tokens) gives 128x128 images; the whole pipeline runs in seconds on a CPU.

Weights (``build_tiny_transformer(seed)``), drawn on the CPU from ``torch.Generator().manual_seed(seed)`` in
state-dict order, then placed on the target device/dtype, so every device gets the same model:

1. Base: linear weights N(0, 1/fan_in) (the AdaLN linears ``shared_ada_lin.1`` / ``head_nm.ada_lin.1`` at a
   quarter of that, so modulations stay moderate), biases and q/v biases N(0, 0.02^2), norm weights
   1 + N(0, 0.05^2), ``ada_gss`` N(0, 0.1^2), cos-attention log-scales uniform in [ln 4, ln 40], ``cfg_uncond``
   N(0, 1) (like T5 features), ``pos_start`` and ``lvl_embed`` N(0, 0.5^2), ``mat_q`` of the text pooling N(0, 1).
2. Outlier structure, crafted on top (measured on the released models: FFN down-projection inputs with
   max|X|/median|X| in the hundreds and excess kurtosis above 100; post-RoPE key channels with skewness up to
   ~10; key ranges that vary by channel far more than by token):

   * Attention sink / massive activation: ``pos_start`` gets ``SINK_MAGNITUDE`` on one residual channel
     ``u`` (channel 0), so the SOS token's normalised hidden state points along ``u`` in every block.
   * Sink key channel: in heads ``SINK_HEADS`` of every block the key row of the lowest-frequency RoPE pair
     channel ``j = head_dim/2 - 1`` is replaced by ``SINK_KEY_GAIN * e_u`` and the other key rows of those heads
     drop their ``u`` weight. After cos-normalisation that channel is ~1 for the SOS token and small for every
     other token: a strongly right-skewed key channel (the rotation of that pair is negligible).
   * Key channel gains: every key channel pair of every head is scaled by ``exp(N(0, KEY_GAIN_SIGMA^2))``, so
     after normalisation a few channels carry most of each key's norm (channel-driven range variation).
   * FFN outliers: in blocks ``FFN_OUTLIER_BLOCKS`` a unit direction ``v`` is added to the block's AdaLN
     ``shift2`` (times ``FFN_SHIFT``), and ``FFN_OUTLIER_CHANNELS`` rows of ``fc1`` become ``gain * v`` with
     gains ``FFN_GAINS``: those hidden channels fire at tens of units after the GELU, token-dependently (the
     token's own LayerNorm-ed component along ``v`` adds to the common shift), while the others stay O(0.3).
     The matching ``fc2`` columns are scaled by ``FFN_DOWN_SCALE`` so the residual stream is not swamped.

``tests/test_infinity_tiny.py`` measures the statistics on generations from real prompts and holds the claims.
"""

from __future__ import annotations

import math

import torch

from .arch import get_arch
from .checkpoints import build_meta_model, resolve_device, resolve_dtype, set_tensor, tensor_dtype
from .model import Infinity

__all__ = [
    "TINY_ARCH",
    "TINY_TEXT_MAXLEN",
    "build_tiny_text_encoder",
    "build_tiny_transformer",
    "build_tiny_vae",
    "tiny_vae_config",
]

TINY_ARCH = get_arch("tiny")
TINY_TEXT_MAXLEN = TINY_ARCH.text_maxlen

SINK_CHANNEL = 0
SINK_MAGNITUDE = 400.0
SINK_HEADS = (0, 2)
SINK_KEY_GAIN = 0.9
KEY_GAIN_SIGMA = 0.8
FFN_OUTLIER_BLOCKS = {1: 22.0, 4: 14.0}  # block -> gain of its strongest outlier channel
FFN_OUTLIER_CHANNELS = (7, 301, 777)
FFN_GAINS = (1.0, 0.5, 0.25)  # relative gains of the outlier channels
FFN_SHIFT = 1.0
FFN_DOWN_SCALE = 0.2


def _base_value(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    randn = torch.randn(shape, generator=gen)
    if name.endswith("zero_k_bias"):
        return torch.zeros(shape)
    if name.endswith("scale_mul_1H11"):
        return math.log(4.0) + torch.rand(shape, generator=gen) * math.log(10.0)
    if name.endswith(("norm.weight",)):
        return 1 + 0.05 * randn
    if name.endswith("ada_gss"):
        return 0.1 * randn
    if name == "cfg_uncond" or name.endswith("mat_q") and name.startswith("text_proj_for_sos"):
        return randn
    if name in ("pos_start", "lvl_embed.weight"):
        return 0.5 * randn
    if name.endswith("bias"):
        return 0.02 * randn
    if name.endswith("weight") and len(shape) == 2:
        std = shape[1] ** -0.5
        if name.startswith(("shared_ada_lin", "head_nm")):
            std *= 0.25
        return std * randn
    raise KeyError(f"tiny recipe has no rule for {name} {tuple(shape)}")


def tiny_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The float32 state dict of the tiny transformer (see the module docstring for the recipe)."""
    arch = TINY_ARCH
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    meta = build_meta_model(arch)
    sd = {name: _base_value(name, ref.shape, gen) for name, ref in meta.state_dict().items()}
    C, c = arch.embed_dim, arch.head_dim
    names = meta.block_names()

    # Attention sink: a massive activation of the SOS token on residual channel u.
    u = SINK_CHANNEL
    sd["pos_start"][0, 0, u] = SINK_MAGNITUDE
    # Per-channel key gains (pairs share a gain so the RoPE rotation keeps them together).
    for block in names:
        qkv = sd[f"{block}.sa.mat_qkv.weight"]  # rows [q (C) ; k (C) ; v (C)]
        gains = torch.exp(KEY_GAIN_SIGMA * torch.randn(C // 2, generator=gen)).repeat_interleave(2)
        qkv[C : 2 * C] *= gains[:, None]
        for head in SINK_HEADS:
            rows = slice(C + head * c, C + (head + 1) * c)
            qkv[rows, u] = 0.0
            sink_row = C + head * c + c // 2 - 1
            qkv[sink_row] = 0.0
            qkv[sink_row, u] = SINK_KEY_GAIN
    # FFN down-projection input outliers.
    for b, max_gain in FFN_OUTLIER_BLOCKS.items():
        block = names[b]
        v = torch.randn(C, generator=gen)
        v[u] = 0.0
        v /= v.norm()
        sd[f"{block}.ada_gss"][0, 0, 5] += FFN_SHIFT * v  # chunk 5 = shift2
        for ch, gain in zip(FFN_OUTLIER_CHANNELS, FFN_GAINS):
            sd[f"{block}.ffn.fc1.weight"][ch] = max_gain * gain * v
            sd[f"{block}.ffn.fc1.bias"][ch] = 0.0
            sd[f"{block}.ffn.fc2.weight"][:, ch] *= FFN_DOWN_SCALE
    return sd


def build_tiny_transformer(
    seed: int = 0, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"
) -> Infinity:
    """The tiny transformer on ``device`` with blocks in ``dtype`` (``auto``: bf16 on CUDA, fp32 on CPU)."""
    device = resolve_device(device)
    block_dtype = resolve_dtype(dtype, device)
    model = build_meta_model(TINY_ARCH)
    for name, value in tiny_weights(seed).items():
        set_tensor(model, name, value.to(device=device, dtype=tensor_dtype(name, block_dtype)))
    return model


def tiny_vae_config():
    """Stride-8 BSQ-VAE with 16 bits per position (decoder widths 64, 64, 32, 32)."""
    from .vae import VAEConfig

    return VAEConfig(
        codebook_dim=TINY_ARCH.vae_bits, stride=TINY_ARCH.vae_stride, ch_mult=(1, 1, 2, 2), base_ch=32, name="tiny"
    )


def build_tiny_vae(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    from .vae import random_vae

    return random_vae(tiny_vae_config(), seed, device=device, dtype=dtype, with_encoder=False)


def build_tiny_text_encoder(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    from .text import TextEncoder

    return TextEncoder.tiny(
        seed=seed, d_model=TINY_ARCH.text_channels, device=device, dtype=dtype, max_length=TINY_TEXT_MAXLEN
    )
