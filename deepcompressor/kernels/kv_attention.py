"""Attention over a statically quantized KV cache (Triton), and the quantization of new keys/values into it.

Codes are unsigned (``uint8``: one per byte; ``uint4``: two per byte, channel ``2i`` in the low nibble of byte
``i`` and ``2i + 1`` in the high nibble, the layout of ``deepcompressor.quant.pack_int4``). Every (head, channel)
has a static scale ``s`` and integer-valued zero point ``z``: ``x_hat = (q - z) * s``.

``quantized_kv_attention`` is a flash-attention forward pass (online softmax, one program per block of queries of
one (batch, head)): key/value tiles are loaded as codes, dequantized in registers (float32, then float16 for the
tensor-core products) and never written back, so no full-precision copy of the cache exists. Keys come from up to
two segments: the cache (codes) and a tail that holds either codes (new tokens quantized but not stored) or
full-precision keys/values. Products run in float16 with float32 accumulation; the online softmax in float32 with
``exp2`` (the softmax scale folded into log2 units).

``quantize_kv`` writes codes of ``x [B, H, L, D]`` into a (possibly strided) destination in one pass, with the
numerics of ``deepcompressor.calib.kv.quantize_asymmetric`` (IEEE division, round half to even, clamp).

``reference_kv_attention`` is the plain-PyTorch path (dequantize + ``scaled_dot_product_attention``), used on
the CPU and as the tests' reference.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..quant import pack_int4, unpack_int4
from .triton_utils import HAS_TRITON, round_half_even, tl, triton

__all__ = [
    "HAS_TRITON",
    "attention_flops",
    "codes_width",
    "dequantize_kv",
    "quantize_kv",
    "quantized_kv_attention",
    "reference_kv_attention",
    "use_triton",
]

_LOG2E = 1.4426950408889634


def codes_width(head_dim: int, bits: int) -> int:
    """Bytes per cached (token, head): ``head_dim`` for 8 bits, ``head_dim / 2`` for 4 bits."""
    if bits == 8:
        return head_dim
    if bits == 4:
        if head_dim % 2:
            raise ValueError(f"4-bit KV codes need an even head dim, got {head_dim}")
        return head_dim // 2
    raise ValueError(f"KV codes are 4 or 8 bits, got {bits}")


def use_triton(device: torch.device, backend: str = "auto") -> bool:
    """Whether to run the Triton kernels for tensors on ``device``.

    ``auto``: on CUDA when triton is installed; ``triton``: always (CPU tensors need ``TRITON_INTERPRET=1``, which
    the tests use at small shapes); ``torch``: never.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"KV attention backend must be auto, triton or torch, got {backend!r}")
    if backend == "torch":
        return False
    if not HAS_TRITON:
        if backend == "triton":
            raise RuntimeError("the triton KV attention backend was requested but triton is not installed")
        return False
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"the triton KV attention backend needs CUDA tensors or TRITON_INTERPRET=1, got {device}"
            )
        return True
    return device.type == "cuda"


# ------------------------------------------------------------------------------------------------ plain PyTorch


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype):
    """Codes ``[B, H, L, Dp]`` -> ``(q - z) * s`` ``[B, H, L, D]`` (computed in float32, or float64 for a float64
    ``dtype``, then cast to ``dtype``); ``scale``/``zero`` are ``[H, D]``."""
    if bits == 4:
        codes = unpack_int4(codes, signed=False)
    work = torch.promote_types(dtype, torch.float32)
    return ((codes.to(work) - zero[:, None, :].to(work)) * scale[:, None, :].to(work)).to(dtype)


def reference_kv_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    v_codes: torch.Tensor,
    num_cached: int,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    bits: int,
    k_tail: torch.Tensor | None = None,
    v_tail: torch.Tensor | None = None,
    tail_codes: bool = True,
    sm_scale: float = 1.0,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Same contract as :func:`quantized_kv_attention`, by dequantizing into ``compute_dtype`` (default: q's dtype)
    and calling ``scaled_dot_product_attention``. Returns q's dtype."""
    dtype = compute_dtype or q.dtype
    keys = [dequantize_kv(k_codes[:, :, :num_cached], k_scale, k_zero, bits, dtype)]
    values = [dequantize_kv(v_codes[:, :, :num_cached], v_scale, v_zero, bits, dtype)]
    if k_tail is not None:
        if tail_codes:
            keys.append(dequantize_kv(k_tail, k_scale, k_zero, bits, dtype))
            values.append(dequantize_kv(v_tail, v_scale, v_zero, bits, dtype))
        else:
            keys.append(k_tail.to(dtype))
            values.append(v_tail.to(dtype))
    keys = torch.cat(keys, dim=2) if len(keys) > 1 else keys[0]
    values = torch.cat(values, dim=2) if len(values) > 1 else values[0]
    if keys.shape[2] == 0:
        raise ValueError("attention over an empty KV cache")
    out = F.scaled_dot_product_attention(q.to(dtype), keys, values, scale=sm_scale)
    return out.to(q.dtype)


# ------------------------------------------------------------------------------------------------ Triton

if HAS_TRITON:

    @triton.jit
    def _quantize_kernel(
        X, S, Z, OUT,
        sx_b, sx_h, sx_l,
        so_b, so_h, so_l,
        H, L,
        D: tl.constexpr, BITS: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        pid_l = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        row_mask = (offs_l < L)[:, None]
        x_rows = X + b * sx_b + h * sx_h + offs_l[:, None] * sx_l
        o_rows = OUT + b * so_b + h * so_h + offs_l[:, None] * so_l
        if BITS == 8:
            offs_d = tl.arange(0, D)
            x = tl.load(x_rows + offs_d[None, :], mask=row_mask, other=0.0).to(tl.float32)
            s = tl.load(S + h * D + offs_d)
            z = tl.load(Z + h * D + offs_d)
            q = round_half_even(tl.math.div_rn(x, s[None, :])) + z[None, :]
            q = tl.minimum(tl.maximum(q, 0.0), 255.0)
            tl.store(o_rows + offs_d[None, :], q.to(tl.uint8), mask=row_mask)
        else:
            offs_p = tl.arange(0, D // 2)
            even = 2 * offs_p
            x_lo = tl.load(x_rows + even[None, :], mask=row_mask, other=0.0).to(tl.float32)
            x_hi = tl.load(x_rows + even[None, :] + 1, mask=row_mask, other=0.0).to(tl.float32)
            s_lo = tl.load(S + h * D + even)
            s_hi = tl.load(S + h * D + even + 1)
            z_lo = tl.load(Z + h * D + even)
            z_hi = tl.load(Z + h * D + even + 1)
            q_lo = round_half_even(tl.math.div_rn(x_lo, s_lo[None, :])) + z_lo[None, :]
            q_hi = round_half_even(tl.math.div_rn(x_hi, s_hi[None, :])) + z_hi[None, :]
            q_lo = tl.minimum(tl.maximum(q_lo, 0.0), 15.0).to(tl.uint8)
            q_hi = tl.minimum(tl.maximum(q_hi, 0.0), 15.0).to(tl.uint8)
            tl.store(o_rows + offs_p[None, :], q_lo | (q_hi << 4), mask=row_mask)

    @triton.jit
    def _load_dequantized(ptr_rows, row_mask, scale, zero, BITS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
        """A [BLOCK_N, D] tile of codes -> (q - z) * s in float16 (masked rows read as code 0)."""
        if BITS == 8:
            codes = tl.load(ptr_rows + tl.arange(0, D)[None, :], mask=row_mask, other=0)
        else:
            packed = tl.load(ptr_rows + tl.arange(0, D // 2)[None, :], mask=row_mask, other=0)
            codes = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_N, D))
        return ((codes.to(tl.float32) - zero[None, :]) * scale[None, :]).to(tl.float16)

    @triton.jit
    def _attend_segment(
        acc, m_i, l_i, q,
        K, V, sk_n, sv_n, n_keys,
        k_scale, k_zero, v_scale, v_zero,
        IS_CODES: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Online-softmax update of (acc, m, l) with the keys/values ``[0, n_keys)`` of one segment.
        ``q`` (float16) already carries the softmax scale in log2 units."""
        offs_d = tl.arange(0, D)
        for start in range(0, n_keys, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            valid = offs_n < n_keys
            row_mask = valid[:, None]
            if IS_CODES:
                k = _load_dequantized(K + offs_n[:, None] * sk_n, row_mask, k_scale, k_zero, BITS, D, BLOCK_N)
                v = _load_dequantized(V + offs_n[:, None] * sv_n, row_mask, v_scale, v_zero, BITS, D, BLOCK_N)
            else:
                k = tl.load(K + offs_n[:, None] * sk_n + offs_d[None, :], mask=row_mask, other=0.0).to(tl.float16)
                v = tl.load(V + offs_n[:, None] * sv_n + offs_d[None, :], mask=row_mask, other=0.0).to(tl.float16)
            s = tl.dot(q, tl.trans(k))
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None]).to(tl.float16)
            # The normaliser sums the same rounded weights the product uses.
            l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
            acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _attention_kernel(
        Q, K1, V1, K2, V2, KS, KZ, VS, VZ, OUT,
        sq_b, sq_h, sq_m,
        sk1_b, sk1_h, sk1_n, sv1_b, sv1_h, sv1_n,
        sk2_b, sk2_h, sk2_n, sv2_b, sv2_h, sv2_n,
        so_b, so_h, so_m,
        H, M, N1, N2, qk_scale,
        D: tl.constexpr, BITS: tl.constexpr, TAIL_CODES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        m_mask = (offs_m < M)[:, None]
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :], mask=m_mask, other=0.0)
        q = (q.to(tl.float32) * qk_scale).to(tl.float16)
        k_scale = tl.load(KS + h * D + offs_d)
        k_zero = tl.load(KZ + h * D + offs_d)
        v_scale = tl.load(VS + h * D + offs_d)
        v_zero = tl.load(VZ + h * D + offs_d)
        acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc, m_i, l_i = _attend_segment(
            acc, m_i, l_i, q, K1 + b * sk1_b + h * sk1_h, V1 + b * sv1_b + h * sv1_h, sk1_n, sv1_n, N1,
            k_scale, k_zero, v_scale, v_zero, True, BITS, D, BLOCK_N,
        )  # fmt: skip
        acc, m_i, l_i = _attend_segment(
            acc, m_i, l_i, q, K2 + b * sk2_b + h * sk2_h, V2 + b * sv2_b + h * sv2_h, sk2_n, sv2_n, N2,
            k_scale, k_zero, v_scale, v_zero, TAIL_CODES, BITS, D, BLOCK_N,
        )  # fmt: skip
        out = acc / l_i[:, None]
        o_ptrs = OUT + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_mask)


def _check_qparams(name: str, t: torch.Tensor, heads: int, head_dim: int, device: torch.device) -> torch.Tensor:
    if t.shape != (heads, head_dim):
        raise ValueError(f"{name}: expected shape ({heads}, {head_dim}), got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32).contiguous()


def _require_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() != 4:
        raise ValueError(f"{name}: expected [B, H, L, D], got shape {tuple(t.shape)}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name}: the last dimension must be contiguous")


def quantize_kv(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Codes of ``x [B, H, L, D]`` with per-(head, channel) ``scale``/``zero`` ``[H, D]``, written into ``out``
    ``[B, H, L, Dp]`` (uint8, may be a strided view such as a slice of a cache buffer) or a new tensor.
    ``backend`` as in :func:`use_triton`; both give identical codes."""
    batch, heads, length, head_dim = x.shape
    width = codes_width(head_dim, bits)
    if out is None:
        out = torch.empty(batch, heads, length, width, dtype=torch.uint8, device=x.device)
    if out.shape != (batch, heads, length, width) or out.dtype != torch.uint8:
        raise ValueError(f"quantize_kv: out must be uint8 {(batch, heads, length, width)}, got {out.dtype} "
                         f"{tuple(out.shape)}")  # fmt: skip
    scale = _check_qparams("scale", scale, heads, head_dim, x.device)
    zero = _check_qparams("zero", zero, heads, head_dim, x.device)
    if length == 0:
        return out
    if not use_triton(x.device, backend):
        from ..calib.kv import quantize_asymmetric

        codes = quantize_asymmetric(x, scale[:, None, :], zero[:, None, :], bits)
        out.copy_(pack_int4(codes, signed=False) if bits == 4 else codes)
        return out
    _require_last_dim_contiguous("x", x)
    _require_last_dim_contiguous("out", out)
    block_l = 64 if length >= 64 else max(16, triton.next_power_of_2(length))
    grid = (triton.cdiv(length, block_l), batch * heads)
    _quantize_kernel[grid](
        x, scale, zero, out,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, length,
        D=head_dim, BITS=bits, BLOCK_L=block_l,
    )  # fmt: skip
    return out


def _launch_config(num_queries: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the query count of one call."""
    if num_queries >= 128:
        # Best of a sweep at the 8B last-scale shape on an H200 (bench.kv --sweep): 4.18 ms INT8, 5.93 ms INT4.
        return 128, 128, 8, 3
    block_m = max(16, triton.next_power_of_2(num_queries))
    return block_m, 64, 4, 3


def quantized_kv_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    v_codes: torch.Tensor,
    num_cached: int,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    bits: int,
    k_tail: torch.Tensor | None = None,
    v_tail: torch.Tensor | None = None,
    tail_codes: bool = True,
    sm_scale: float = 1.0,
    launch: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """``softmax(sm_scale * q K^T) V`` over ``[cache[:num_cached]; tail]``, K and V dequantized on the fly.

    Args:
        q: Queries ``[B, H, M, D]`` (any float dtype; the output has the same dtype).
        k_codes / v_codes: Cached codes ``[B, H, >= num_cached, Dp]`` (uint8; ``Dp = D`` or ``D / 2``).
        num_cached: How many cached tokens take part.
        k_scale / k_zero / v_scale / v_zero: Static quantizer ``[H, D]``.
        bits: 8 or 4.
        k_tail / v_tail: Optional second segment ``[B, H, N2, Dp]`` codes (``tail_codes``) or ``[B, H, N2, D]``
            full-precision keys/values.
        sm_scale: Softmax scale (Infinity's cos-attention uses 1).
        launch: Override of (BLOCK_M, BLOCK_N, num_warps, num_stages).
    """
    if not HAS_TRITON:
        raise RuntimeError("quantized_kv_attention needs triton; use reference_kv_attention on this machine")
    batch, heads, num_queries, head_dim = q.shape
    width = codes_width(head_dim, bits)
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"the Triton KV attention needs a power-of-two head dim >= 16, got {head_dim}")
    for name, t in (("k_codes", k_codes), ("v_codes", v_codes)):
        _require_last_dim_contiguous(name, t)
        if t.dtype != torch.uint8 or t.shape[:2] != (batch, heads) or t.shape[3] != width:
            raise ValueError(f"{name}: expected uint8 [{batch}, {heads}, L, {width}], got {t.dtype} {tuple(t.shape)}")
        if t.shape[2] < num_cached:
            raise ValueError(f"{name} holds {t.shape[2]} tokens, fewer than num_cached = {num_cached}")
    qparams = [_check_qparams(n, t, heads, head_dim, q.device) for n, t in
               (("k_scale", k_scale), ("k_zero", k_zero), ("v_scale", v_scale), ("v_zero", v_zero))]  # fmt: skip
    if k_tail is None:
        k_tail, v_tail, num_tail, tail_codes = k_codes, v_codes, 0, True
    else:
        num_tail = k_tail.shape[2]
        tail_width = width if tail_codes else head_dim
        for name, t in (("k_tail", k_tail), ("v_tail", v_tail)):
            _require_last_dim_contiguous(name, t)
            if t.shape != (batch, heads, num_tail, tail_width):
                raise ValueError(f"{name}: expected {(batch, heads, num_tail, tail_width)}, got {tuple(t.shape)}")
    if num_cached + num_tail == 0:
        raise ValueError("attention over an empty KV cache")
    _require_last_dim_contiguous("q", q)
    out = torch.empty_like(q)
    block_m, block_n, num_warps, num_stages = launch or _launch_config(num_queries)
    grid = (triton.cdiv(num_queries, block_m), batch * heads)
    _attention_kernel[grid](
        q, k_codes, v_codes, k_tail, v_tail, *qparams, out,
        q.stride(0), q.stride(1), q.stride(2),
        k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        v_codes.stride(0), v_codes.stride(1), v_codes.stride(2),
        k_tail.stride(0), k_tail.stride(1), k_tail.stride(2),
        v_tail.stride(0), v_tail.stride(1), v_tail.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, num_queries, num_cached, num_tail, float(sm_scale) * _LOG2E,
        D=head_dim, BITS=bits, TAIL_CODES=bool(tail_codes), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def attention_flops(batch: int, heads: int, num_queries: int, num_keys: int, head_dim: int) -> float:
    """Multiply-adds x 2 of the two products (for throughput figures)."""
    return 4.0 * batch * heads * num_queries * num_keys * head_dim
