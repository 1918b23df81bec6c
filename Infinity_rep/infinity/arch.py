"""Architecture presets of the Infinity transformer.

A preset fixes every shape of the transformer (and names the VAE / text-encoder sizes that go with it). The
released models are ``2b`` and ``8b``; ``tiny`` is the embedded default of :mod:`infinity.tiny`; ``tiny_p0`` /
``tiny_p1`` are the shapes of the reference test vectors (2B-style and 8B-style, i.e. without / with spatial
patchify).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["ARCHS", "InfinityArch", "get_arch"]


@dataclass(frozen=True)
class InfinityArch:
    """Shapes of one Infinity transformer.

    Args:
        name: Preset name.
        depth: Number of blocks.
        embed_dim: Model width C (= condition width D).
        num_heads: Self/cross-attention heads H (head dim C / H).
        block_chunks: Blocks are stored as ``block_chunks.{k}.module.{j}`` with ``depth / block_chunks`` per chunk.
        vae_bits: Bits d per VAE latent position.
        patchify: 2x2 spatial patchify of the VAE latent into one transformer token (8B).
        text_channels: Width of the text features (T5 d_model).
        text_maxlen: Rows of the learned unconditional text embedding ``cfg_uncond``.
        mlp_ratio: FFN hidden width = round(C * mlp_ratio / 256) * 256.
        num_lvl_embed: Rows of the scale (level) embedding table.
        norm_eps: LayerNorm / RMSNorm epsilon.
        vae_stride: Downsampling factor of the VAE (pixels per latent position).
        default_pn: Resolution preset used when none is given.
    """

    name: str
    depth: int
    embed_dim: int
    num_heads: int
    block_chunks: int
    vae_bits: int
    patchify: bool
    text_channels: int = 2048
    text_maxlen: int = 512
    mlp_ratio: float = 4.0
    num_lvl_embed: int = 15
    norm_eps: float = 1e-6
    vae_stride: int = 16
    default_pn: str = "1M"

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"arch {self.name}: embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}"
            )
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"arch {self.name}: head dim must be a multiple of 4 for the 2-D RoPE")
        if self.block_chunks < 2 or self.depth % self.block_chunks:
            raise ValueError(
                f"arch {self.name}: depth {self.depth} must split into block_chunks {self.block_chunks} > 1"
            )
        if self.pool_heads < 1 or self.embed_dim % self.pool_heads:
            raise ValueError(f"arch {self.name}: text pooling needs embed_dim divisible by {self.pool_heads} heads")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks

    @property
    def d_vae(self) -> int:
        """Bits per transformer token (word_embed input width)."""
        return self.vae_bits * 4 if self.patchify else self.vae_bits

    @property
    def head_out(self) -> int:
        """Head output width V: two logits per token bit."""
        return 2 * self.d_vae

    @property
    def pool_heads(self) -> int:
        """Heads of the attentive text pooling (``text_proj_for_sos``)."""
        return self.text_channels // (64 if self.embed_dim > 4096 else 128)

    @property
    def pool_head_dim(self) -> int:
        return self.embed_dim // self.pool_heads

    def with_(self, **changes) -> InfinityArch:
        return replace(self, **changes)


ARCHS: dict[str, InfinityArch] = {
    "2b": InfinityArch("2b", depth=32, embed_dim=2048, num_heads=16, block_chunks=8, vae_bits=32, patchify=False),
    "8b": InfinityArch(
        "8b", depth=40, embed_dim=3584, num_heads=28, block_chunks=8, vae_bits=14, patchify=True, vae_stride=8
    ),
    # Embedded default (weights from infinity.tiny): 0.06M schedule -> 16x16 tokens -> 128x128 pixels.
    "tiny": InfinityArch(
        "tiny",
        depth=6,
        embed_dim=256,
        num_heads=4,
        block_chunks=2,
        vae_bits=16,
        patchify=False,
        text_channels=256,
        text_maxlen=64,
        vae_stride=8,
        default_pn="0.06M",
    ),
    # Shapes of the reference test vectors (tests/data/infinity/golden).
    "tiny_p0": InfinityArch(
        "tiny_p0",
        depth=4,
        embed_dim=64,
        num_heads=4,
        block_chunks=2,
        vae_bits=6,
        patchify=False,
        text_channels=256,
        text_maxlen=16,
        vae_stride=4,
    ),
    "tiny_p1": InfinityArch(
        "tiny_p1",
        depth=4,
        embed_dim=64,
        num_heads=4,
        block_chunks=2,
        vae_bits=6,
        patchify=True,
        text_channels=256,
        text_maxlen=16,
        vae_stride=4,
    ),
}


def get_arch(arch: str | InfinityArch) -> InfinityArch:
    if isinstance(arch, InfinityArch):
        return arch
    key = str(arch).lower()
    if key not in ARCHS:
        raise ValueError(f"unknown Infinity architecture {arch!r}; known: {', '.join(ARCHS)}")
    return ARCHS[key]
