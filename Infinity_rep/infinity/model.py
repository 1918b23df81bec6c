"""The Infinity transformer: text projections, AdaLN cross-attention blocks, bitwise head.

Module names are the checkpoint names (``block_chunks.{k}.module.{j}.sa.mat_qkv`` ...). Every linear layer is a
plain ``nn.Linear`` called only as ``module(x)``, so quantization can swap it with ``model.set_submodule``.

Precision: the text projections, the residual stream, every LayerNorm/AdaLN modulation and the head run in
float32; the blocks' linears and attentions run in the blocks' dtype (bfloat16 on GPU by default). Queries and
keys are cos-normalised and rotated in float32 and then cast to the blocks' dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .arch import InfinityArch, get_arch
from .kernels import cos_attn_qkv_triton, use_triton
from .kv_cache import LayerKVCache, default_kv_cache_factory
from .rope import apply_rope, rope_table
from .schedules import tokens_per_scale

__all__ = [
    "FFN",
    "BlockConstants",
    "CrossAttention",
    "CrossAttnBlock",
    "Infinity",
    "SelfAttention",
    "TextConditioning",
    "TextContext",
    "block_causal_mask",
    "enable_compile",
]

COS_ATTN_MAX_LOG_SCALE = math.log(100.0)


# ------------------------------------------------------------------------------------------------ text context


@dataclass
class TextContext:
    """Cross-attention memory of a batch: packed rows of all samples plus what is needed to pad them.

    ``ca_kv [N, C]`` holds ``lens[b]`` rows per sample (``cu_seqlens`` offsets). Attention is batched by gathering
    every sample's rows into ``[bs, max_seqlen, ...]`` (``gather_index``) and masking the padding (``key_mask``,
    None when all samples have the same length). ``memo`` (set by the sampler for one generation only) lets each
    block reuse its projected text keys/values across scales.
    """

    ca_kv: torch.Tensor
    lens: list[int]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    gather_index: torch.Tensor
    key_mask: torch.Tensor | None
    memo: dict | None = field(default=None, repr=False)

    @classmethod
    def build(cls, ca_kv: torch.Tensor, lens: list[int]) -> TextContext:
        lens = [int(n) for n in lens]
        if not lens or min(lens) < 1:
            raise ValueError(f"every sample needs at least one text token, got lens={lens}")
        if sum(lens) != ca_kv.shape[0]:
            raise ValueError(f"text rows {ca_kv.shape[0]} do not match sum(lens)={sum(lens)} (lens={lens})")
        return cls(ca_kv, lens, *padding_plan(lens, ca_kv.device))

    @property
    def batch_size(self) -> int:
        return len(self.lens)

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """Packed ``[N, ...]`` -> padded ``[bs, max_seqlen, ...]`` (padding rows repeat real rows; mask them)."""
        return rows[self.gather_index]


def padding_plan(lens: list[int], device) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor | None]:
    """``(cu_seqlens int32 [bs+1], max_seqlen, gather_index [bs, max_seqlen], key_mask [bs,1,1,max_seqlen] | None)``."""
    lens_t = torch.tensor(lens, dtype=torch.int64)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens_t, 0)
    max_len = int(lens_t.max())
    pos = torch.arange(max_len)
    valid = pos[None, :] < lens_t[:, None]
    index = cu[:-1, None].long() + torch.minimum(pos[None, :], lens_t[:, None] - 1)
    key_mask = None if min(lens) == max_len else valid[:, None, None, :].to(device)
    return cu.to(device), max_len, index.to(device), key_mask


@dataclass
class TextConditioning:
    """Everything the blocks and the head need from the text: pooled condition, AdaLN modulation, memory."""

    cond: torch.Tensor  # [bs, C] float32 pooled condition (SOS token and head AdaLN input)
    gss: torch.Tensor  # [bs, 1, 6, C] float32 shared AdaLN modulation
    context: TextContext


# ------------------------------------------------------------------------------------------------ layers


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class TextPoolAttention(nn.Module):
    """Attentive pooling: one learned query per head attends to each sample's own text tokens."""

    def __init__(self, text_dim: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.mat_q = nn.Parameter(torch.empty(1, num_heads, self.head_dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.mat_kv = nn.Linear(text_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, text: torch.Tensor, context: TextContext) -> torch.Tensor:
        kv = self.mat_kv(text) + torch.cat((self.zero_k_bias, self.v_bias))
        kv = context.pad(kv).unflatten(-1, (2, self.num_heads, self.head_dim))  # [bs, M, 2, Hp, cp]
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # [bs, Hp, M, cp]
        q = self.mat_q.unsqueeze(2).expand(k.shape[0], -1, 1, -1).to(k.dtype)  # [bs, Hp, 1, cp]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=context.key_mask)
        return self.proj(out.flatten(1))


class TextAttentivePool(nn.Module):
    def __init__(self, text_dim: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.ca = TextPoolAttention(text_dim, dim, num_heads)

    def forward(self, text: torch.Tensor, context: TextContext) -> torch.Tensor:
        return self.ca(text, context)


# ------------------------------------------------------------------------------------------------ fused glue
# Elementwise work between the linears, written as pure functions so that ``enable_compile`` can hand them to
# torch.compile (one fused kernel each) while the linears stay plain, swappable modules called eagerly.


def _adaln(x: torch.Tensor, scale1p: torch.Tensor, shift: torch.Tensor, eps: float, dtype: torch.dtype):
    """``LN(x) * (1 + scale) + shift`` in float32, cast to the linears' dtype."""
    return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=eps), scale1p).to(dtype)


def _cos_attn_qkv(
    qkv: torch.Tensor, bias: torch.Tensor, qk_scale: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int
):
    """``mat_qkv`` output ``[bs, L, 3C]`` -> q, k (L2-normalised per head, q scaled, rotated) and v, each
    ``[bs, H, L, c]`` in the input dtype. ``qk_scale [2, H, 1]`` holds the q scales and ones for k."""
    bs, length, _ = qkv.shape
    qkv = (qkv + bias).view(bs, length, 3, num_heads, -1)
    qk = F.normalize(qkv[:, :, :2].float(), dim=-1) * qk_scale
    qk = apply_rope(qk, cos[:, None, None, :], sin[:, None, None, :]).to(qkv.dtype)
    return qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)


def _residual(x: torch.Tensor, out: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(x, out.float(), gamma)


def _residual_then_ln(x, out, gamma, weight, bias, eps: float, dtype: torch.dtype):
    """``x + out * gamma`` and its affine LayerNorm cast to ``dtype`` (input of the cross-attention)."""
    x = torch.addcmul(x, out.float(), gamma)
    return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(dtype)


def _residual_then_adaln(x, out, scale1p, shift, eps: float, dtype: torch.dtype):
    """``x + out`` and its AdaLN-modulated LayerNorm cast to ``dtype`` (input of the FFN)."""
    x = x + out.float()
    return x, torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=eps), scale1p).to(dtype)


_EAGER_GLUE = {
    "adaln": _adaln,
    "cos_attn_qkv": _cos_attn_qkv,
    "residual": _residual,
    "residual_then_ln": _residual_then_ln,
    "residual_then_adaln": _residual_then_adaln,
}
_glue = dict(_EAGER_GLUE)


def enable_compile(enabled: bool = True, **compile_kwargs) -> None:
    """Run the elementwise glue of every block through ``torch.compile``, or back in eager mode. The default
    automatic-dynamic mode keeps the width static (vectorised kernels) and makes the token count dynamic after the
    second scale, so a handful of graphs serve all scales. The linears and attention kernels are unaffected."""
    _glue.clear()
    if enabled:
        options = {"dynamic": None, "fullgraph": True, **compile_kwargs}
        _glue.update({name: torch.compile(fn, **options) for name, fn in _EAGER_GLUE.items()})
    else:
        _glue.update(_EAGER_GLUE)


# ------------------------------------------------------------------------------------------------ blocks


@dataclass
class BlockConstants:
    """Per-generation constants of one block (its parameters combined with the text's AdaLN modulation)."""

    gamma1: torch.Tensor  # [bs, 1, C] float32
    gamma2: torch.Tensor
    scale1p: torch.Tensor  # 1 + scale1
    scale2p: torch.Tensor
    shift1: torch.Tensor
    shift2: torch.Tensor
    qkv_bias: torch.Tensor  # [3C] = [q_bias; 0; v_bias] in the block dtype
    qk_scale: torch.Tensor  # [2, H, 1] float32: exp(min(s_h, ln 100)) for q, 1 for k
    ca_norm_weight: torch.Tensor  # [C] float32
    ca_norm_bias: torch.Tensor


class SelfAttention(nn.Module):
    """Cos-attention with 2-D RoPE: q, k L2-normalised per head, q scaled by a learned per-head factor, softmax
    scale 1."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def qkv_bias(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)).to(dtype)

    def qk_scale(self) -> torch.Tensor:
        q_scale = self.scale_mul_1H11.float().clamp_max(COS_ATTN_MAX_LOG_SCALE).exp().view(self.num_heads, 1)
        return torch.stack((q_scale, torch.ones_like(q_scale)))

    def qkv(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        bias: torch.Tensor | None = None,
        qk_scale: torch.Tensor | None = None,
        layer_cache: LayerKVCache | None = None,
        store: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h [bs, L, C]`` -> q, k (normalised, scaled, rotated) and v, each ``[bs, H, L, c]`` in h's dtype.

        On GPU the fused kernel writes k and v straight into the cache's next slots when the cache offers them.
        """
        qkv = self.mat_qkv(h)
        bias = self.qkv_bias(qkv.dtype) if bias is None else bias
        qk_scale = self.qk_scale() if qk_scale is None else qk_scale
        if use_triton(qkv):
            slots = None
            if layer_cache is not None and hasattr(layer_cache, "next_slots"):
                shape = (qkv.shape[0], self.num_heads, qkv.shape[1], self.head_dim)
                slots = layer_cache.next_slots(shape, qkv.dtype, qkv.device, store=store)
            k_out, v_out = slots if slots is not None else (None, None)
            return cos_attn_qkv_triton(qkv, bias, qk_scale, rope[0], rope[1], self.num_heads, k_out=k_out, v_out=v_out)
        return _glue["cos_attn_qkv"](qkv, bias.to(qkv.dtype), qk_scale, rope[0], rope[1], self.num_heads)

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        layer_cache: LayerKVCache | None = None,
        store: bool = True,
        attn_mask: torch.Tensor | None = None,
        constants: BlockConstants | None = None,
    ) -> torch.Tensor:
        bias, qk_scale = (None, None) if constants is None else (constants.qkv_bias, constants.qk_scale)
        q, k, v = self.qkv(h, rope, bias, qk_scale, layer_cache, store)
        if layer_cache is not None:
            out = layer_cache.attend(q, k, v, store=store)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
        return self.proj(out.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Queries of each sample attend to that sample's own text tokens (scaled dot product, no RoPE)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def text_kv(self, context: TextContext, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded text keys and values ``[bs, H, M, c]``."""
        kv = self.mat_kv(context.ca_kv.to(dtype))
        kv = kv + torch.cat((self.zero_k_bias, self.v_bias)).to(kv.dtype)
        kv = context.pad(kv).unflatten(-1, (2, self.num_heads, self.head_dim))
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x: torch.Tensor, context: TextContext) -> torch.Tensor:
        bs, length, _ = x.shape
        q = self.mat_q(x).view(bs, length, self.num_heads, self.head_dim).transpose(1, 2)
        memo = context.memo
        if memo is not None:
            kv = memo.get(id(self))
            if kv is None:
                kv = memo[id(self)] = self.text_kv(context, x.dtype)
        else:
            kv = self.text_kv(context, x.dtype)
        k, v = kv
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=context.key_mask)
        return self.proj(out.transpose(1, 2).flatten(2))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossAttnBlock(nn.Module):
    """One transformer block: AdaLN self-attention, cross-attention to the text, AdaLN FFN.

    Callable standalone (replay): ``block(x, gss, text_ctx, rope, layer_cache, store)`` with ``x [bs, L, C]``
    float32, ``gss [bs, 1, 6, C]``, ``rope = (cos, sin)`` for these L tokens; ``layer_cache`` None means attention
    over the L tokens only (or with ``attn_mask``, the block-causal mask of the teacher-forced forward).
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.norm_eps = dim, norm_eps
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, dim))
        self.sa = SelfAttention(dim, num_heads)
        self.ca = CrossAttention(dim, num_heads)
        self.ffn = FFN(dim, mlp_hidden)
        self.ca_norm = nn.LayerNorm(dim, eps=norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the block's linears and attention (the dtype its parameters are stored in)."""
        return self.ada_gss.dtype

    def constants(self, gss: torch.Tensor) -> BlockConstants:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss.float() + gss).unbind(2)
        return BlockConstants(
            gamma1,
            gamma2,
            1 + scale1,
            1 + scale2,
            shift1,
            shift2,
            self.sa.qkv_bias(self.dtype),
            self.sa.qk_scale(),
            self.ca_norm.weight.float(),
            self.ca_norm.bias.float(),
        )

    def forward(
        self,
        x: torch.Tensor,
        gss: torch.Tensor,
        text_ctx: TextContext,
        rope: tuple[torch.Tensor, torch.Tensor],
        layer_cache: LayerKVCache | None = None,
        store: bool = True,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype, eps = self.dtype, self.norm_eps
        memo = text_ctx.memo
        if memo is None:
            k = self.constants(gss)
        else:
            k = memo.get(id(self))
            if k is None:
                k = memo[id(self)] = self.constants(gss)
        h = _glue["adaln"](x, k.scale1p, k.shift1, eps, dtype)
        out = self.sa(h, rope, layer_cache, store, attn_mask, k)
        x, h = _glue["residual_then_ln"](x, out, k.gamma1, k.ca_norm_weight, k.ca_norm_bias, eps, dtype)
        x, h = _glue["residual_then_adaln"](x, self.ca(h, text_ctx), k.scale2p, k.shift2, eps, dtype)
        return _glue["residual"](x, self.ffn(h), k.gamma2)


class BlockChunk(nn.Module):
    """Container that only reproduces the checkpoint layout ``block_chunks.{k}.module.{j}``."""

    def __init__(self, blocks: list[CrossAttnBlock]) -> None:
        super().__init__()
        self.module = nn.ModuleList(blocks)


class AdaLNHeadNorm(nn.Module):
    def __init__(self, dim: int, cond_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.norm_eps = dim, norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)
        return layer_norm(x.float(), self.norm_eps) * (1 + scale) + shift


def block_causal_mask(schedule, device=None) -> torch.Tensor:
    """Boolean ``[L, L]`` mask: a token of scale i sees every token of scales j <= i."""
    levels = torch.repeat_interleave(torch.arange(len(schedule)), torch.tensor(tokens_per_scale(schedule)))
    return (levels[None, :] <= levels[:, None]).to(device)


# ------------------------------------------------------------------------------------------------ model


class Infinity(nn.Module):
    """The Infinity transformer (text projections, blocks, head); see docs/infinity_architecture.md §2.3, §3, §6."""

    def __init__(self, arch: str | InfinityArch) -> None:
        super().__init__()
        arch = get_arch(arch)
        self.arch = arch
        C, Ct5 = arch.embed_dim, arch.text_channels
        # Attribute order = checkpoint order of the released state dicts.
        self.cfg_uncond = nn.Parameter(torch.empty(arch.text_maxlen, Ct5))
        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        self.text_norm = RMSNorm(Ct5, eps=arch.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(Ct5, C, arch.pool_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct5, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.lvl_embed = nn.Embedding(arch.num_lvl_embed, C)
        self.word_embed = nn.Linear(arch.d_vae, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.head_nm = AdaLNHeadNorm(C, C, arch.norm_eps)
        self.head = nn.Linear(C, arch.head_out)
        per_chunk = arch.blocks_per_chunk
        self.block_chunks = nn.ModuleList(
            BlockChunk([CrossAttnBlock(C, arch.num_heads, arch.mlp_hidden, arch.norm_eps) for _ in range(per_chunk)])
            for _ in range(arch.block_chunks)
        )
        self.kv_cache_factory = default_kv_cache_factory

    # -------------------------------------------------------------------- structure

    def blocks(self) -> list[CrossAttnBlock]:
        return [block for chunk in self.block_chunks for block in chunk.module]

    def block_names(self) -> list[str]:
        per_chunk = self.arch.blocks_per_chunk
        return [f"block_chunks.{i // per_chunk}.module.{i % per_chunk}" for i in range(self.arch.depth)]

    @property
    def device(self) -> torch.device:
        return self.pos_start.device

    @property
    def block_dtype(self) -> torch.dtype:
        return self.blocks()[0].dtype

    # -------------------------------------------------------------------- pieces of the forward

    def encode_text(self, kv_compact: torch.Tensor, lens: list[int]) -> TextConditioning:
        """Packed text features ``[N, Ct5]`` (``lens[b]`` rows per sample) -> condition, modulation, memory."""
        text = self.text_norm(kv_compact.to(self.device, torch.float32))
        context = TextContext.build(self.text_proj_for_ca(text), lens)
        cond = self.text_proj_for_sos(text, context)
        gss = self.shared_ada_lin(cond).view(-1, 1, 6, self.arch.embed_dim)
        return TextConditioning(cond, gss, context)

    def uncond_text(self, lens: list[int]) -> torch.Tensor:
        """Learned unconditional text rows: the first ``lens[b]`` rows of ``cfg_uncond`` per sample, packed."""
        if max(lens) > self.cfg_uncond.shape[0]:
            raise ValueError(f"text of {max(lens)} tokens exceeds the {self.cfg_uncond.shape[0]} cfg_uncond rows")
        return torch.cat([self.cfg_uncond[:n] for n in lens])

    def sos(self, cond: torch.Tensor) -> torch.Tensor:
        """First input token ``[bs, 1, C]``."""
        return cond.unsqueeze(1) + self.pos_start

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Head: ``x [bs, L, C]`` -> bit logits ``[bs, L, 2 d_vae]`` (float32)."""
        return self.head(self.head_nm(x.float(), cond.float()))

    # -------------------------------------------------------------------- teacher-forced forward

    def forward(
        self,
        kv_compact: torch.Tensor,
        lens: list[int],
        x_wo_prefix: torch.Tensor,
        scale_schedule,
        h_div_w: float | None = None,
    ) -> torch.Tensor:
        """Teacher-forced forward over the whole multi-scale sequence with the block-causal mask.

        ``x_wo_prefix [B, L-1, d_vae]`` are the word-embedding inputs of scales 1..n-1; returns logits ``[B, L, V]``.
        """
        text = self.encode_text(kv_compact, lens)
        sizes = tokens_per_scale(scale_schedule)
        if x_wo_prefix.shape[1] != sum(sizes) - sizes[0]:
            raise ValueError(f"x_wo_prefix has {x_wo_prefix.shape[1]} tokens, schedule needs {sum(sizes) - sizes[0]}")
        x = torch.cat((self.sos(text.cond), self.word_embed(x_wo_prefix.to(self.device, torch.float32))), dim=1)
        levels = torch.repeat_interleave(
            torch.arange(len(sizes), device=self.device), torch.tensor(sizes, device=self.device)
        )
        x = x + self.lvl_embed(levels)
        rope = rope_table(self.arch.head_dim, scale_schedule, h_div_w, self.device)
        mask = block_causal_mask(scale_schedule, self.device)
        for block in self.blocks():
            x = block(x, text.gss, text.context, rope, None, False, mask)
        return self.logits(x, text.cond)
