"""Fused GPU kernel of the self-attention input: bias, cos-normalisation, q scale and 2-D RoPE in one pass.

``cos_attn_qkv_triton`` reads the ``mat_qkv`` output ``[bs, L, 3C]`` once and writes q, k, v as contiguous
``[bs, H, L, c]`` (the layout the KV cache and the attention kernels read fastest). It computes exactly what
``infinity.model._cos_attn_qkv`` computes (bias added in the input dtype, the rest in float32, results cast
back). Used for CUDA tensors when Triton is importable; the reference torch function serves everything else.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA builds of torch
    triton = None

__all__ = ["cos_attn_qkv_triton", "set_triton_enabled", "use_triton"]

_enabled = True


def set_triton_enabled(enabled: bool) -> None:
    """Switch the fused kernel on or off for CUDA tensors (off: the torch reference path everywhere)."""
    global _enabled
    _enabled = bool(enabled)


def use_triton(x: torch.Tensor) -> bool:
    return _enabled and triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _cos_attn_qkv_kernel(
        qkv_ptr,
        bias_ptr,
        scale_ptr,
        cos_ptr,
        sin_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        length,
        num_heads,
        eps,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        row = tl.program_id(0)  # token index b * L + l
        b = row // length
        pos = row % length
        dim = 2 * num_heads * HALF  # C
        heads = tl.arange(0, BLOCK_H)[:, None]
        pairs = tl.arange(0, HALF)[None, :]
        mask = (heads < num_heads) & (pairs < HALF)
        even = heads * (2 * HALF) + 2 * pairs  # channel of the pair's first element within a third of qkv
        src = qkv_ptr + row.to(tl.int64) * 3 * dim
        dst = ((b * num_heads + heads).to(tl.int64) * length + pos) * (2 * HALF) + 2 * pairs
        cos = tl.load(cos_ptr + pos * HALF + pairs)
        sin = tl.load(sin_ptr + pos * HALF + pairs)
        for part in tl.static_range(2):
            x_in = tl.load(src + part * dim + even, mask=mask, other=0.0)
            y_in = tl.load(src + part * dim + even + 1, mask=mask, other=0.0)
            x_b = tl.load(bias_ptr + part * dim + even, mask=mask, other=0.0)
            y_b = tl.load(bias_ptr + part * dim + even + 1, mask=mask, other=0.0)
            # The bias sum is rounded to the input dtype (as the reference adds it there), the rest is float32.
            x = (x_in.to(tl.float32) + x_b.to(tl.float32)).to(x_in.dtype).to(tl.float32)
            y = (y_in.to(tl.float32) + y_b.to(tl.float32)).to(y_in.dtype).to(tl.float32)
            norm = tl.sqrt(tl.sum(x * x + y * y, axis=1))[:, None]
            factor = tl.load(scale_ptr + part * num_heads + heads, mask=heads < num_heads, other=1.0)
            x = x / tl.maximum(norm, eps) * factor
            y = y / tl.maximum(norm, eps) * factor
            first = (x * cos - y * sin).to(q_ptr.dtype.element_ty)
            second = (x * sin + y * cos).to(q_ptr.dtype.element_ty)
            if part == 0:
                tl.store(q_ptr + dst, first, mask=mask)
                tl.store(q_ptr + dst + 1, second, mask=mask)
            else:
                tl.store(k_ptr + dst, first, mask=mask)
                tl.store(k_ptr + dst + 1, second, mask=mask)
        x_v = tl.load(src + 2 * dim + even, mask=mask, other=0.0).to(tl.float32)
        y_v = tl.load(src + 2 * dim + even + 1, mask=mask, other=0.0).to(tl.float32)
        x_v += tl.load(bias_ptr + 2 * dim + even, mask=mask, other=0.0).to(tl.float32)
        y_v += tl.load(bias_ptr + 2 * dim + even + 1, mask=mask, other=0.0).to(tl.float32)
        tl.store(v_ptr + dst, x_v.to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + dst + 1, y_v.to(v_ptr.dtype.element_ty), mask=mask)


def cos_attn_qkv_triton(
    qkv: torch.Tensor,
    bias: torch.Tensor,
    qk_scale: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qkv [bs, L, 3C]``, ``bias [3C]`` (qkv dtype), ``qk_scale [2, H, 1]`` float32, ``cos/sin [L, c/2]`` float32
    -> contiguous q, k, v ``[bs, H, L, c]`` in qkv's dtype."""
    if triton is None:
        raise RuntimeError("Triton is not available")
    bs, length, width = qkv.shape
    head_dim = width // (3 * num_heads)
    half = head_dim // 2
    if half & (half - 1):
        raise ValueError(f"the fused kernel needs a power-of-two head dim, got {head_dim}")
    qkv = qkv.contiguous()
    out = torch.empty(3, bs, num_heads, length, head_dim, device=qkv.device, dtype=qkv.dtype)
    _cos_attn_qkv_kernel[(bs * length,)](
        qkv,
        bias.to(qkv.dtype).contiguous(),
        qk_scale.float().reshape(2, num_heads).contiguous(),
        cos.float().contiguous(),
        sin.float().contiguous(),
        out[0],
        out[1],
        out[2],
        length,
        num_heads,
        eps,
        HALF=half,
        BLOCK_H=triton.next_power_of_2(num_heads),
    )
    return out[0], out[1], out[2]
