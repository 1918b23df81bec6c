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
numerics of ``deepcompressor.calib.kv.quantize_asymmetric`` (correctly rounded division, round half to even,
clamp).

``reference_kv_attention`` is the plain-PyTorch path (dequantize + ``scaled_dot_product_attention``), used on
the CPU and as the tests' reference.

``workspace_kv_attention`` is the second CUDA backend: one Triton pass (``dequantize_kv_segments``, memory-bound)
dequantizes the layer's cached codes and the tail into a 16-bit workspace ``[B, H, L, D]`` shared by every layer
(``kv_workspace``: one buffer per device and dtype, grown when a call needs more, never while a CUDA graph is being
captured), then ``scaled_dot_product_attention`` runs on it (flash / cuDNN / efficient, as PyTorch picks). Its
values are exactly ``dequantize_kv``'s; the attention differs from ``reference_kv_attention`` by SDPA's rounding.

``kv_attention`` dispatches between the backends (``ATTENTION_BACKENDS``): ``fused``, ``workspace``, ``torch``,
or ``auto``: on CUDA the faster of ``fused`` and ``workspace`` for this GPU, shape bucket and dtype, measured once
with CUDA events (outside CUDA-graph capture) and cached in memory and on disk (``kv_attention_dispatch.json``
under ``$VAR_COMPRESSOR_CACHE``, default ``~/.cache/var-compressor``); elsewhere ``torch``. While a graph is being
captured nothing is timed: an unmeasured shape takes the rule (``workspace`` when the workspace already has room,
else ``fused``). ``VAR_COMPRESSOR_KV_TUNE=0`` always takes the rule.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from ..quant import pack_int4, unpack_int4
from .choice_cache import ChoiceCache
from .triton_utils import HAS_TRITON, div_by, round_half_even, round_to, tl, triton, triton_backend

__all__ = [
    "ATTENTION_BACKENDS",
    "HAS_TRITON",
    "KVWorkspace",
    "attention_choices",
    "attention_flops",
    "cached_or_measured",
    "choose_attention_backend",
    "codes_width",
    "dequantize_kv",
    "dequantize_kv_segments",
    "kv_attention",
    "kv_attention_cache_path",
    "kv_workspace",
    "quantize_kv",
    "quantized_kv_attention",
    "reference_kv_attention",
    "resolve_attention_backend",
    "use_triton",
    "workspace_kv_attention",
]

logger = logging.getLogger(__name__)

# Attention backends of ``kv_attention`` (``triton``, the name of the fused kernel before the workspace backend
# existed, is accepted as an alias of ``fused``).
ATTENTION_BACKENDS = ("auto", "fused", "workspace", "torch")
_BACKEND_ALIASES = {"triton": "fused"}

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

    ``auto``: on CUDA when triton is installed; ``triton`` (and the attention backends ``fused`` / ``workspace``,
    whose kernels are Triton's): always (CPU tensors need ``TRITON_INTERPRET=1``, which the tests use at small
    shapes); ``torch``: never.
    """
    if backend not in ("auto", "triton", "torch", "fused", "workspace"):
        raise ValueError(f"KV kernel backend must be auto, triton, fused, workspace or torch, got {backend!r}")
    return triton_backend(device, "triton" if backend in ("fused", "workspace") else backend, "KV attention")


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
        # Rows loaded whole (vectorized) for both widths; x / s correctly rounded through the per-channel
        # reciprocal (div_by: one multiply and two fmas on a GPU instead of an IEEE division per element).
        offs_d = tl.arange(0, D)
        x = tl.load(x_rows + offs_d[None, :], mask=row_mask, other=0.0).to(tl.float32)
        s = tl.load(S + h * D + offs_d)
        z = tl.load(Z + h * D + offs_d)
        inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
        q = round_half_even(div_by(x, s[None, :], inv[None, :])) + z[None, :]
        if BITS == 8:
            q = tl.minimum(tl.maximum(q, 0.0), 255.0)
            tl.store(o_rows + offs_d[None, :], q.to(tl.uint8), mask=row_mask)
        else:
            q = tl.minimum(tl.maximum(q, 0.0), 15.0).to(tl.uint8)
            q_lo, q_hi = tl.split(tl.reshape(q, (BLOCK_L, D // 2, 2)))  # channel 2i in the low nibble of byte i
            offs_p = tl.arange(0, D // 2)
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

    @triton.jit
    def _to_out(x, OUT_KIND: tl.constexpr):
        """float32 (float64 for OUT_KIND 3) values -> the workspace dtype, rounded to nearest even like PyTorch's
        casts (KIND 0 float16, 1 bfloat16, 2 float32, 3 float64)."""
        if OUT_KIND == 0:
            return x.to(tl.float16)
        elif OUT_KIND == 1:
            return round_to(x, 1).to(tl.bfloat16)  # exact: already rounded (the interpreter's cast truncates)
        elif OUT_KIND == 2:
            return x.to(tl.float32)
        else:
            return x.to(tl.float64)

    @triton.jit
    def _dequant_rows(
        SRC, DST, s_n, d_n, rows, n_rows, scale, zero,
        IS_CODES: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr,
        OUT_KIND: tl.constexpr,
    ):  # fmt: skip
        """Rows ``rows`` (< ``n_rows``) of one (batch, head) of a segment -> the workspace rows at ``DST``."""
        offs_d = tl.arange(0, D)
        row_mask = (rows < n_rows)[:, None]
        src = SRC + rows[:, None] * s_n
        if IS_CODES:
            if BITS == 8:
                codes = tl.load(src + offs_d[None, :], mask=row_mask, other=0)
            else:
                packed = tl.load(src + tl.arange(0, D // 2)[None, :], mask=row_mask, other=0)
                codes = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_L, D))
            # dequantize_kv: (q - z) * s in float32 (float64 for a float64 workspace), then one rounding.
            x = (codes.to(scale.dtype) - zero[None, :]) * scale[None, :]
        else:
            x = tl.load(src + offs_d[None, :], mask=row_mask, other=0.0)
            if OUT_KIND == 3:
                x = x.to(tl.float64)
            else:
                x = x.to(tl.float32)  # exact from any 16/32-bit source; a float64 tail is rounded once here
        tl.store(DST + rows[:, None] * d_n + offs_d[None, :], _to_out(x, OUT_KIND), mask=row_mask)

    @triton.jit
    def _dequant_kernel(
        K1, V1, K2, V2, KS, KZ, VS, VZ, KO, VO,
        sk1_b, sk1_h, sk1_n, sv1_b, sv1_h, sv1_n,
        sk2_b, sk2_h, sk2_n, sv2_b, sv2_h, sv2_n,
        so_b, so_h, so_n,
        H, N1, N2, BLOCKS1,
        D: tl.constexpr, BITS: tl.constexpr, TAIL_CODES: tl.constexpr, OUT_KIND: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_L rows of K and of V of one (batch, head); programs [0, BLOCKS1) cover the cache
        # segment, the others the tail (written after the cache's N1 rows).
        pid_l = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_d = tl.arange(0, D)
        if OUT_KIND == 3:
            k_scale = tl.load(KS + h * D + offs_d).to(tl.float64)
            k_zero = tl.load(KZ + h * D + offs_d).to(tl.float64)
            v_scale = tl.load(VS + h * D + offs_d).to(tl.float64)
            v_zero = tl.load(VZ + h * D + offs_d).to(tl.float64)
        else:
            k_scale = tl.load(KS + h * D + offs_d)
            k_zero = tl.load(KZ + h * D + offs_d)
            v_scale = tl.load(VS + h * D + offs_d)
            v_zero = tl.load(VZ + h * D + offs_d)
        ko = KO + b * so_b + h * so_h
        vo = VO + b * so_b + h * so_h
        if pid_l < BLOCKS1:
            rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
            _dequant_rows(K1 + b * sk1_b + h * sk1_h, ko, sk1_n, so_n, rows, N1, k_scale, k_zero,
                          True, BITS, D, BLOCK_L, OUT_KIND)  # fmt: skip
            _dequant_rows(V1 + b * sv1_b + h * sv1_h, vo, sv1_n, so_n, rows, N1, v_scale, v_zero,
                          True, BITS, D, BLOCK_L, OUT_KIND)  # fmt: skip
        else:
            rows = (pid_l - BLOCKS1) * BLOCK_L + tl.arange(0, BLOCK_L)
            _dequant_rows(K2 + b * sk2_b + h * sk2_h, ko + N1 * so_n, sk2_n, so_n, rows, N2, k_scale, k_zero,
                          TAIL_CODES, BITS, D, BLOCK_L, OUT_KIND)  # fmt: skip
            _dequant_rows(V2 + b * sv2_b + h * sv2_h, vo + N1 * so_n, sv2_n, so_n, rows, N2, v_scale, v_zero,
                          TAIL_CODES, BITS, D, BLOCK_L, OUT_KIND)  # fmt: skip


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


def _check_operands(batch, heads, head_dim, device, k_codes, v_codes, num_cached, k_scale, k_zero, v_scale, v_zero,
                    bits, k_tail, v_tail, tail_codes):  # fmt: skip
    """Shapes and dtypes of the cache and tail operands; returns ``(qparams float32 [H, D] x 4, k_tail, v_tail,
    num_tail, tail_codes)`` with an empty tail replaced by the cache codes (``num_tail = 0``)."""
    width = codes_width(head_dim, bits)
    for name, t in (("k_codes", k_codes), ("v_codes", v_codes)):
        _require_last_dim_contiguous(name, t)
        if t.dtype != torch.uint8 or t.shape[:2] != (batch, heads) or t.shape[3] != width:
            raise ValueError(f"{name}: expected uint8 [{batch}, {heads}, L, {width}], got {t.dtype} {tuple(t.shape)}")
        if t.shape[2] < num_cached:
            raise ValueError(f"{name} holds {t.shape[2]} tokens, fewer than num_cached = {num_cached}")
    qparams = [_check_qparams(n, t, heads, head_dim, device) for n, t in
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
            if tail_codes and t.dtype != torch.uint8:
                raise ValueError(f"{name}: tail codes must be uint8, got {t.dtype}")
    if num_cached + num_tail == 0:
        raise ValueError("attention over an empty KV cache")
    return qparams, k_tail, v_tail, num_tail, bool(tail_codes)


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
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"the Triton KV attention needs a power-of-two head dim >= 16, got {head_dim}")
    qparams, k_tail, v_tail, num_tail, tail_codes = _check_operands(
        batch, heads, head_dim, q.device, k_codes, v_codes, num_cached, k_scale, k_zero, v_scale, v_zero, bits,
        k_tail, v_tail, tail_codes)  # fmt: skip
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


# ------------------------------------------------------------------------------------------------ workspace backend

_OUT_KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_DEQUANT_BLOCK_L = 64


def _pow2_head_dim(head_dim: int) -> bool:
    return head_dim >= 16 and not head_dim & (head_dim - 1)


def dequantize_kv_segments(
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
    *,
    out_k: torch.Tensor | None = None,
    out_v: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values that attention sees, ``[cache[:num_cached]; tail]`` ``[B, H, num_cached + N2, D]``:
    the cache codes (and a tail of codes) dequantized exactly as :func:`dequantize_kv` does, a full-precision tail
    cast with ``.to(dtype)``, written into ``out_k``/``out_v`` (e.g. views of the shared workspace; last dim
    contiguous) or new tensors of ``dtype`` (float16, bfloat16, float32 or float64). Operands as in
    :func:`quantized_kv_attention`. ``backend`` as in :func:`use_triton`: one Triton launch for K and V (one
    memory-bound pass), or PyTorch."""
    batch, heads, _, width = k_codes.shape
    head_dim = 2 * width if bits == 4 else width
    if out_k is not None:
        head_dim = out_k.shape[-1]
    device = k_codes.device
    qparams, k_tail, v_tail, num_tail, tail_codes = _check_operands(
        batch, heads, head_dim, device, k_codes, v_codes, num_cached, k_scale, k_zero, v_scale, v_zero, bits,
        k_tail, v_tail, tail_codes)  # fmt: skip
    total = num_cached + num_tail
    if out_k is None:
        dtype = dtype or (k_tail.dtype if num_tail and not tail_codes else torch.float32)
        out_k = torch.empty(batch, heads, total, head_dim, dtype=dtype, device=device)
        out_v = torch.empty_like(out_k)
    for name, t in (("out_k", out_k), ("out_v", out_v)):
        _require_last_dim_contiguous(name, t)
        if t.shape != (batch, heads, total, head_dim) or t.dtype not in _OUT_KINDS:
            raise ValueError(f"{name}: expected a float16/bfloat16/float32/float64 {(batch, heads, total, head_dim)} "
                             f"tensor, got {t.dtype} {tuple(t.shape)}")  # fmt: skip
    if out_v.dtype != out_k.dtype or out_v.stride() != out_k.stride():
        raise ValueError("out_k and out_v must have the same dtype and strides")
    if not (use_triton(device, backend) and _pow2_head_dim(head_dim)):
        k_scale, k_zero, v_scale, v_zero = qparams
        n1 = num_cached
        out_k[:, :, :n1] = dequantize_kv(k_codes[:, :, :n1], k_scale, k_zero, bits, out_k.dtype)
        out_v[:, :, :n1] = dequantize_kv(v_codes[:, :, :n1], v_scale, v_zero, bits, out_v.dtype)
        if num_tail:
            if tail_codes:
                out_k[:, :, n1:] = dequantize_kv(k_tail, k_scale, k_zero, bits, out_k.dtype)
                out_v[:, :, n1:] = dequantize_kv(v_tail, v_scale, v_zero, bits, out_v.dtype)
            else:
                out_k[:, :, n1:] = k_tail.to(out_k.dtype)
                out_v[:, :, n1:] = v_tail.to(out_v.dtype)
        return out_k, out_v
    blocks1 = triton.cdiv(num_cached, _DEQUANT_BLOCK_L)
    blocks2 = triton.cdiv(num_tail, _DEQUANT_BLOCK_L)
    grid = (blocks1 + blocks2, batch * heads)
    _dequant_kernel[grid](
        k_codes, v_codes, k_tail, v_tail, *qparams, out_k, out_v,
        k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        v_codes.stride(0), v_codes.stride(1), v_codes.stride(2),
        k_tail.stride(0), k_tail.stride(1), k_tail.stride(2),
        v_tail.stride(0), v_tail.stride(1), v_tail.stride(2),
        out_k.stride(0), out_k.stride(1), out_k.stride(2),
        heads, num_cached, num_tail, blocks1,
        D=head_dim, BITS=bits, TAIL_CODES=tail_codes, OUT_KIND=_OUT_KINDS[out_k.dtype], BLOCK_L=_DEQUANT_BLOCK_L,
        num_warps=4,
    )  # fmt: skip
    return out_k, out_v


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class KVWorkspace:
    """The 16-bit K/V buffer the ``workspace`` backend dequantizes one layer into, shared by every layer and every
    cache: one flat buffer per (device, dtype) holding K then V, grown (never shrunk) to what a call needs, never
    reallocated while a CUDA graph is being captured (``reserve`` ahead of capture, or run the shapes once
    eagerly, as ``CudaGraphStepper``'s warm-up does). A buffer that a captured graph uses stays alive when a
    larger one replaces it (the graph may still be replayed); otherwise the old buffer is freed first."""

    def __init__(self) -> None:
        self.buffers: dict = {}
        self._captured: set = set()  # keys whose current buffer was handed out during a capture
        self._retired: list = []
        self.allocations = 0

    @staticmethod
    def _key(device: torch.device, dtype: torch.dtype) -> tuple:
        index = device.index
        if device.type == "cuda" and index is None:
            index = torch.cuda.current_device()
        return device.type, index, dtype

    def capacity(self, device: torch.device, dtype: torch.dtype) -> int:
        """Elements (K and V together) the buffer of (device, dtype) holds now."""
        buf = self.buffers.get(self._key(device, dtype))
        return 0 if buf is None else buf.numel()

    def has_room(self, device: torch.device, dtype: torch.dtype, batch: int, heads: int, length: int,
                 head_dim: int) -> bool:  # fmt: skip
        return self.capacity(device, dtype) >= 2 * batch * heads * length * head_dim

    def reserve(self, device: torch.device, dtype: torch.dtype, numel: int) -> bool:
        """Grow the buffer of (device, dtype) to at least ``numel`` elements (K and V together). False, and nothing
        allocated, when it is too small while a CUDA graph is being captured."""
        key = self._key(device, dtype)
        buf = self.buffers.get(key)
        if buf is not None and buf.numel() >= numel:
            return True
        if _capturing(device):
            return False
        if buf is not None:
            if key in self._captured:
                self._retired.append(buf)
                self._captured.discard(key)
            self.buffers[key] = buf = None  # freed before the larger one is allocated
        self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        self.allocations += 1
        return True

    def reserve_kv(self, device: torch.device, dtype: torch.dtype, batch: int, heads: int, length: int,
                   head_dim: int) -> bool:  # fmt: skip
        return self.reserve(device, dtype, 2 * batch * heads * length * head_dim)

    def kv(self, device: torch.device, dtype: torch.dtype, batch: int, heads: int, length: int,
           head_dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """Contiguous views ``K, V [B, H, length, D]`` of the buffer (grown if needed and allowed), else None."""
        numel = batch * heads * length * head_dim
        if not self.reserve(device, dtype, 2 * numel):
            return None
        key = self._key(device, dtype)
        if _capturing(device):
            self._captured.add(key)
        buf = self.buffers[key]
        shape = (batch, heads, length, head_dim)
        return buf[:numel].view(shape), buf[numel : 2 * numel].view(shape)

    def nbytes(self) -> int:
        """Bytes held (current buffers and those kept alive for captured graphs)."""
        return sum(t.numel() * t.element_size() for t in (*self.buffers.values(), *self._retired) if t is not None)

    def release(self) -> None:
        """Free every buffer (only when no captured graph that used them will be replayed)."""
        self.buffers.clear()
        self._captured.clear()
        self._retired.clear()


kv_workspace = KVWorkspace()


def workspace_kv_attention(
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
    workspace: KVWorkspace | None = None,
) -> torch.Tensor:
    """Same contract as :func:`quantized_kv_attention`: K and V dequantized into the shared workspace in q's
    dtype (one Triton pass on CUDA or under ``TRITON_INTERPRET=1``, else PyTorch), then
    ``scaled_dot_product_attention``. Raises RuntimeError when the workspace is too small during CUDA-graph
    capture."""
    workspace = kv_workspace if workspace is None else workspace
    batch, heads, _, head_dim = q.shape
    num_tail = 0 if k_tail is None else k_tail.shape[2]
    if q.dtype not in _OUT_KINDS:
        raise ValueError(f"workspace KV attention: unsupported query dtype {q.dtype}")
    views = workspace.kv(q.device, q.dtype, batch, heads, num_cached + num_tail, head_dim)
    if views is None:
        raise RuntimeError(
            f"the KV workspace ({workspace.capacity(q.device, q.dtype)} elements) has no room for "
            f"2 x {(batch, heads, num_cached + num_tail, head_dim)} while a CUDA graph is being captured: run the "
            "shape once before capture or reserve it (kv_workspace.reserve_kv)"
        )
    kernel = q.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    keys, values = dequantize_kv_segments(
        k_codes, v_codes, num_cached, k_scale, k_zero, v_scale, v_zero, bits, k_tail, v_tail, tail_codes,
        out_k=views[0], out_v=views[1], backend="triton" if kernel and HAS_TRITON else "torch",
    )  # fmt: skip
    return F.scaled_dot_product_attention(q, keys, values, scale=sm_scale)


# ------------------------------------------------------------------------------------------------ the choice

# Part of the keys of measured choices: a change of either kernel that moves the balance bumps it.
_KERNELS_VERSION = 1


def resolve_attention_backend(backend: str) -> str:
    """The canonical name of an attention backend (``triton`` -> ``fused``); ValueError listing the choices."""
    name = _BACKEND_ALIASES.get(backend, backend) if isinstance(backend, str) else backend
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"KV attention backend must be one of {', '.join(ATTENTION_BACKENDS)} (or 'triton', an alias of "
            f"'fused'), got {backend!r}"
        )
    return name


def kv_attention_cache_path() -> Path:
    return attention_choices.path


def attention_choice_cache() -> ChoiceCache:
    """A cache of ``auto``'s measured choices: in memory, and on disk across processes (``kv_attention_cache_path``)."""
    return ChoiceCache("kv_attention_dispatch.json", "var-compressor.kv_attention_dispatch/1", "KV attention dispatch",
                       valid=lambda c: isinstance(c, dict) and c.get("backend") in ("fused", "workspace"))


attention_choices = attention_choice_cache()


def _bucket(n: int) -> int:
    bucket = 1
    while bucket < n:
        bucket *= 2
    return bucket


@functools.cache
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_properties(index).name


def _choice_key(q: torch.Tensor, num_keys: int, bits: int, tail: str) -> str:
    batch, heads, num_queries, head_dim = q.shape
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return (f"{_gpu_name(index)}|torch-{torch.__version__}|k{_KERNELS_VERSION}|BH{batch * heads}|"
            f"M{_bucket(num_queries)}|N{_bucket(num_keys)}|D{head_dim}|int{bits}|"
            f"{str(q.dtype).removeprefix('torch.')}|tail-{tail}")  # fmt: skip


def _rule(q: torch.Tensor, num_keys: int, workspace: KVWorkspace) -> dict:
    batch, heads, _, head_dim = q.shape
    room = workspace.has_room(q.device, q.dtype, batch, heads, num_keys, head_dim)
    return {"backend": "workspace" if room else "fused", "source": "rule"}


def _time_candidates(calls: dict, device: torch.device, budget_ms: float = 20.0, max_reps: int = 25) -> dict:
    """Median ms per call of each candidate, CUDA events around single calls, candidates interleaved (so clock
    ramps and neighbours affect them alike); each warmed up first (compilation, workspace growth)."""
    for call in calls.values():
        call()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for call in calls.values():
        call()
    end.record()
    end.synchronize()
    reps = int(max(3, min(max_reps, budget_ms / max(start.elapsed_time(end), 1e-3))))
    events = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            pair[0].record()
            call()
            pair[1].record()
            events[name].append(pair)
    torch.cuda.synchronize(device)
    return {name: statistics.median(a.elapsed_time(b) for a, b in pairs) for name, pairs in events.items()}


def choose_attention_backend(
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
    workspace: KVWorkspace | None = None,
    remeasure: bool = False,
) -> dict:
    """What ``auto`` runs for this call: ``{"backend": ..., "source": ...}`` (plus the timings when measured).

    CPU tensors or no triton: ``torch``. CUDA: the cached choice of this GPU / torch version / shape bucket
    (B x H, next powers of two of the query and key counts, head dim) / bits / dtype / tail kind, else (outside
    CUDA-graph capture, unless ``VAR_COMPRESSOR_KV_TUNE=0``) both backends timed on this call's operands and the
    faster one stored; during capture an unmeasured shape takes the rule (``workspace`` if the workspace already
    has room for it, else ``fused``). ``remeasure`` times again and replaces the stored choice (benchmarks)."""
    workspace = kv_workspace if workspace is None else workspace
    if q.device.type != "cuda" or not HAS_TRITON:
        return {"backend": "torch", "source": "not CUDA" if HAS_TRITON else "no triton"}
    num_tail = 0 if k_tail is None else k_tail.shape[2]
    num_keys = num_cached + num_tail
    if not _pow2_head_dim(q.shape[-1]):
        return {"backend": "workspace", "source": "head dim unsupported by the fused kernel"}
    tail = "none" if not num_tail else ("codes" if tail_codes else "full")
    args = (q, k_codes, v_codes, num_cached, k_scale, k_zero, v_scale, v_zero, bits, k_tail, v_tail, tail_codes,
            sm_scale)  # fmt: skip

    def measure() -> dict:
        qc = q.contiguous()
        calls = {
            "fused": lambda: quantized_kv_attention(qc, *args[1:]),
            "workspace": lambda: workspace_kv_attention(*args, workspace=workspace),
        }
        return _time_candidates(calls, q.device)

    return cached_or_measured(_choice_key(q, num_keys, bits, tail), measure, lambda: _rule(q, num_keys, workspace),
                              capturing=_capturing(q.device), remeasure=remeasure)  # fmt: skip


def cached_or_measured(key: str, measure, rule, capturing: bool, remeasure: bool = False) -> dict:
    """The choice logic of ``auto`` for one key: the stored choice (unless ``remeasure``); else ``rule()`` while
    capturing or with ``VAR_COMPRESSOR_KV_TUNE=0``; else ``measure()`` (``{backend: ms}``) and the fastest stored
    (memory and disk). A failed measurement takes the rule and stores nothing."""
    choice = None if remeasure else attention_choices.get(key)
    if choice is not None:
        return choice
    if capturing or os.environ.get("VAR_COMPRESSOR_KV_TUNE", "1") == "0":
        return rule()
    try:
        timings = measure()
    except Exception as error:  # noqa: BLE001 - a kernel the compiler refuses must not stop inference
        logger.warning("KV attention %s: timing failed (%s); using the rule", key, error)
        return rule()
    best = min(timings, key=timings.get)
    choice = {"backend": best, "source": "measured", "ms": timings[best], "timings": timings}
    attention_choices.put(key, choice)
    logger.info("KV attention %s: %s (%s)", key, best, ", ".join(f"{n} {ms:.3f} ms" for n, ms in timings.items()))
    return choice


def kv_attention(
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
    backend: str = "auto",
    workspace: KVWorkspace | None = None,
) -> torch.Tensor:
    """Attention over the quantized cache (and tail) through ``backend`` (``ATTENTION_BACKENDS``; see the module
    docstring). Same contract as :func:`quantized_kv_attention`; returns q's dtype.

    ``fused``: :func:`quantized_kv_attention` (CUDA, or CPU under ``TRITON_INTERPRET=1``). ``workspace``:
    :func:`workspace_kv_attention` (any device; during CUDA-graph capture without room in the workspace it falls
    back to ``fused`` with a warning). ``torch``: :func:`reference_kv_attention`. ``auto``:
    :func:`choose_attention_backend`."""
    backend = resolve_attention_backend(backend)
    args = (q, k_codes, v_codes, num_cached, k_scale, k_zero, v_scale, v_zero, bits, k_tail, v_tail, tail_codes,
            sm_scale)  # fmt: skip
    workspace = kv_workspace if workspace is None else workspace
    if backend == "auto":
        backend = choose_attention_backend(*args, workspace=workspace)["backend"]
    if backend == "torch":
        return reference_kv_attention(*args)
    if backend == "workspace":
        batch, heads, _, head_dim = q.shape
        num_keys = num_cached + (0 if k_tail is None else k_tail.shape[2])
        if not (_capturing(q.device) and not workspace.has_room(q.device, q.dtype, batch, heads, num_keys,
                                                                 head_dim)):  # fmt: skip
            return workspace_kv_attention(*args, workspace=workspace)
        logger.warning("KV workspace too small for %s keys during CUDA-graph capture: using the fused kernel",
                       num_keys)  # fmt: skip
    use_triton(q.device, "fused")  # a clear error for CPU tensors without TRITON_INTERPRET=1
    return quantized_kv_attention(q.contiguous(), *args[1:])


def attention_flops(batch: int, heads: int, num_queries: int, num_keys: int, head_dim: int) -> float:
    """Multiply-adds x 2 of the two products (for throughput figures)."""
    return 4.0 * batch * heads * num_queries * num_keys * head_dim
