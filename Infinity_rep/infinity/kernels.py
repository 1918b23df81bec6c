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
_on_cpu = False


def set_triton_enabled(enabled: bool, on_cpu: bool = False) -> None:
    """Switch the fused kernel on or off for CUDA tensors (off: the torch reference path everywhere).
    ``on_cpu`` also routes CPU tensors to it, which only works under the Triton interpreter (tests)."""
    global _enabled, _on_cpu
    _enabled, _on_cpu = bool(enabled), bool(on_cpu)


def use_triton(x: torch.Tensor) -> bool:
    return _enabled and triton is not None and (x.is_cuda or _on_cpu)


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
        q_sb,  # (batch, head, token) strides of the outputs; channels are contiguous
        q_sh,
        q_sl,
        k_sb,
        k_sh,
        k_sl,
        v_sb,
        v_sh,
        v_sl,
        length,
        num_heads,
        eps,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        row = tl.program_id(0)  # token index b * L + l
        b = row // length
        pos = row % length
        head_dim: tl.constexpr = 2 * HALF
        dim = num_heads * head_dim  # C
        heads = tl.arange(0, BLOCK_H)[:, None]
        chans = tl.arange(0, head_dim)[None, :]
        mask = (heads < num_heads) & (chans < head_dim)
        offs = heads * head_dim + chans  # channel within one third of qkv, contiguous per head
        src = qkv_ptr + row.to(tl.int64) * 3 * dim
        pairs = tl.arange(0, HALF)[None, :]
        cos = tl.load(cos_ptr + pos * HALF + pairs)
        sin = tl.load(sin_ptr + pos * HALF + pairs)
        for part in tl.static_range(3):
            x = tl.load(src + part * dim + offs, mask=mask, other=0.0).to(tl.float32)
            x += tl.load(bias_ptr + part * dim + offs, mask=mask, other=0.0).to(tl.float32)
            # The bias sum is rounded to the input dtype, as the reference adds it there; the rest is float32.
            x = x.to(qkv_ptr.dtype.element_ty).to(tl.float32)
            if part < 2:
                norm = tl.sqrt(tl.sum(x * x, axis=1))[:, None]
                factor = tl.load(scale_ptr + part * num_heads + heads, mask=heads < num_heads, other=1.0)
                x = x / tl.maximum(norm, eps) * factor
                even, odd = tl.split(tl.reshape(x, (BLOCK_H, HALF, 2)))
                x = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BLOCK_H, head_dim))
            b64, h64, l64 = b.to(tl.int64), heads.to(tl.int64), pos.to(tl.int64)
            if part == 0:
                dst = q_ptr + b64 * q_sb + h64 * q_sh + l64 * q_sl + chans
                tl.store(dst, x.to(q_ptr.dtype.element_ty), mask=mask)
            elif part == 1:
                dst = k_ptr + b64 * k_sb + h64 * k_sh + l64 * k_sl + chans
                tl.store(dst, x.to(k_ptr.dtype.element_ty), mask=mask)
            else:
                dst = v_ptr + b64 * v_sb + h64 * v_sh + l64 * v_sl + chans
                tl.store(dst, x.to(v_ptr.dtype.element_ty), mask=mask)


def cos_attn_qkv_triton(
    qkv: torch.Tensor,
    bias: torch.Tensor,
    qk_scale: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float = 1e-12,
    k_out: torch.Tensor | None = None,
    v_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qkv [bs, L, 3C]``, ``bias [3C]`` (qkv dtype), ``qk_scale [2, H, 1]`` float32, ``cos/sin [L, c/2]`` float32
    -> q, k, v ``[bs, H, L, c]`` in qkv's dtype. q is contiguous; k and v are written into ``k_out``/``v_out`` when
    given (any strides, e.g. the next slots of a KV cache), else into new contiguous tensors."""
    if triton is None:
        raise RuntimeError("Triton is not available")
    bs, length, width = qkv.shape
    head_dim = width // (3 * num_heads)
    half = head_dim // 2
    if half & (half - 1):
        raise ValueError(f"the fused kernel needs a power-of-two head dim, got {head_dim}")
    shape = (bs, num_heads, length, head_dim)
    outs = []
    for given in (None, k_out, v_out):
        if given is None:
            given = torch.empty(shape, device=qkv.device, dtype=qkv.dtype)
        elif tuple(given.shape) != shape or given.dtype != qkv.dtype or given.stride(-1) != 1:
            raise ValueError(f"output slot {tuple(given.shape)} {given.dtype} does not fit {shape} {qkv.dtype}")
        outs.append(given)
    strides = [st for t in outs for st in t.stride()[:3]]
    _cos_attn_qkv_kernel[(bs * length,)](
        qkv.contiguous(),
        bias.to(qkv.dtype).contiguous(),
        qk_scale.float().reshape(2, num_heads).contiguous(),
        cos.float().contiguous(),
        sin.float().contiguous(),
        outs[0],
        outs[1],
        outs[2],
        *strides,
        length,
        num_heads,
        eps,
        HALF=half,
        BLOCK_H=triton.next_power_of_2(num_heads),
    )
    return outs[0], outs[1], outs[2]
