"""Triton availability and the device helpers shared by the quantization kernels."""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional on CPU-only installs
    triton = None
    tl = None

__all__ = ["HAS_TRITON", "SCALE_KINDS", "dequant_nibbles_bf16", "dequant_nibbles_f16", "div_by", "dtype_kind",
           "fast_dequant_mode", "quantize_group", "quantize_groups", "round_half_even", "round_to", "smooth_divide", "tl", "triton",
           "triton_backend", "unpack_nibbles"]

import torch

HAS_TRITON = triton is not None

def triton_backend(device: torch.device, backend: str, what: str) -> bool:
    """Whether ``what`` (e.g. ``W4A4``) runs its Triton kernels for tensors on ``device``: ``auto`` on CUDA when
    triton is installed; ``triton`` always (CPU tensors need ``TRITON_INTERPRET=1``, which the tests use at small
    shapes; a clear error otherwise); ``torch`` never."""
    if backend == "torch":
        return False
    if not HAS_TRITON:
        if backend == "triton":
            raise RuntimeError(f"the triton {what} backend was requested but triton is not installed")
        return False
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"the triton {what} backend needs CUDA tensors or TRITON_INTERPRET=1, got {device}")
        return True
    return device.type == "cuda"


# Kernel constant for a 16/32-bit float dtype (round_to's KIND).
SCALE_KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def dtype_kind(dtype: torch.dtype) -> int:
    if dtype not in SCALE_KINDS:
        raise ValueError(f"W4A4 kernels: unsupported dtype {dtype} (float16, bfloat16 or float32)")
    return SCALE_KINDS[dtype]

# ``fast_dequant_mode``: how the mixed-input kernels turn packed signed 4-bit weights into 16-bit operands.
DEQUANT_REFERENCE, DEQUANT_BF16, DEQUANT_F16 = 0, 1, 2


def fast_dequant_mode(out_dtype: torch.dtype, scale_dtype: torch.dtype, signed: bool, has_zero: bool,
                      interpreting: bool) -> int:
    """``DEQUANT_BF16`` / ``DEQUANT_F16`` where the packed-register conversion (``dequant_nibbles_*``) gives
    exactly ``round16(q * s)``: signed codes without zero points, 16-bit scales (bf16 outputs: float16 or bfloat16
    scales; float16 outputs: float16 scales), on a GPU. Else ``DEQUANT_REFERENCE`` (float32 arithmetic)."""
    if interpreting or not signed or has_zero:
        return DEQUANT_REFERENCE
    if out_dtype == torch.bfloat16 and scale_dtype in (torch.float16, torch.bfloat16):
        return DEQUANT_BF16
    if out_dtype == torch.float16 and scale_dtype == torch.float16:
        return DEQUANT_F16
    return DEQUANT_REFERENCE


if HAS_TRITON:
    from triton.language.extra import libdevice

    # On a GPU, rounding uses the hardware's round-to-nearest-even instructions; the interpreter (CPU tests) has
    # neither libdevice nor a rounding float32 -> bfloat16 cast, so there the same results come from arithmetic.
    NATIVE_ROUNDING = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")

    @triton.jit
    def dequant_nibbles_bf16(packed, s_hi, s_lo):
        # packed int8 (two signed 4-bit codes a byte) -> (low nibbles * s, high nibbles * s) in bfloat16, each
        # rounded once from the exact product, four bytes per 32-bit register:
        # - prmt/lop3 put two nibbles into two bfloat16 halves as 0x4300 | (q ^ 8) = 136 + q (exact), and one
        #   fma subtracts 136;
        # - s (float16 or bfloat16) = s_hi + s_lo with s_hi its nearest bfloat16 and s_lo the rest (at most 3
        #   significant bits), so q * s_lo is exact in bfloat16 and fma(q, s_hi, q * s_lo) = round(q * s).
        # sm_80 and newer (fma.rn.bf16x2). The integer-to-float conversions this avoids run at a quarter rate.
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 sh, t, q, p, one, nb, nz;
            mov.b32 one, 0x3F803F80;
            mov.b32 nb, 0xC308C308;
            mov.b32 nz, 0x80008000;
            shr.u32 sh, $4, 4;
            prmt.b32 t, $4, 0, 0x0100;
            lop3.b32 t, t, 0x000F000F, 0x43084308, 0x6a;
            fma.rn.bf16x2 q, t, one, nb;
            fma.rn.bf16x2 p, q, $7, nz;
            fma.rn.bf16x2 $0, q, $5, p;
            prmt.b32 t, $4, 0, 0x0302;
            lop3.b32 t, t, 0x000F000F, 0x43084308, 0x6a;
            fma.rn.bf16x2 q, t, one, nb;
            fma.rn.bf16x2 p, q, $8, nz;
            fma.rn.bf16x2 $1, q, $6, p;
            prmt.b32 t, sh, 0, 0x0100;
            lop3.b32 t, t, 0x000F000F, 0x43084308, 0x6a;
            fma.rn.bf16x2 q, t, one, nb;
            fma.rn.bf16x2 p, q, $7, nz;
            fma.rn.bf16x2 $2, q, $5, p;
            prmt.b32 t, sh, 0, 0x0302;
            lop3.b32 t, t, 0x000F000F, 0x43084308, 0x6a;
            fma.rn.bf16x2 q, t, one, nb;
            fma.rn.bf16x2 p, q, $8, nz;
            fma.rn.bf16x2 $3, q, $6, p;
            }""",
            constraints="=r,=r,=r,=r,r,r,r,r,r", args=[packed, s_hi, s_lo], dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True, pack=4)

    @triton.jit
    def dequant_nibbles_f16(packed, s):
        # dequant_nibbles_bf16 for float16 outputs and scales: 0x6400 | (q ^ 8) = 1032 + q, one fma subtracts
        # 1032, one fma with -0 multiplies by s rounding once.
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 sh, t, q, one, nb, nz;
            mov.b32 one, 0x3C003C00;
            mov.b32 nb, 0xE408E408;
            mov.b32 nz, 0x80008000;
            shr.u32 sh, $4, 4;
            prmt.b32 t, $4, 0, 0x0100;
            lop3.b32 t, t, 0x000F000F, 0x64086408, 0x6a;
            fma.rn.f16x2 q, t, one, nb;
            fma.rn.f16x2 $0, q, $5, nz;
            prmt.b32 t, $4, 0, 0x0302;
            lop3.b32 t, t, 0x000F000F, 0x64086408, 0x6a;
            fma.rn.f16x2 q, t, one, nb;
            fma.rn.f16x2 $1, q, $6, nz;
            prmt.b32 t, sh, 0, 0x0100;
            lop3.b32 t, t, 0x000F000F, 0x64086408, 0x6a;
            fma.rn.f16x2 q, t, one, nb;
            fma.rn.f16x2 $2, q, $5, nz;
            prmt.b32 t, sh, 0, 0x0302;
            lop3.b32 t, t, 0x000F000F, 0x64086408, 0x6a;
            fma.rn.f16x2 q, t, one, nb;
            fma.rn.f16x2 $3, q, $6, nz;
            }""",
            constraints="=r,=r,=r,=r,r,r,r", args=[packed, s], dtype=(tl.float16, tl.float16), is_pure=True,
            pack=4)

    @triton.jit
    def div_by(x, d, r):
        # x / d rounded to nearest (PyTorch's true division), with r = 1 / d rounded to nearest (computed once per
        # channel or group by the caller). On a GPU: one multiply and two fmas (Markstein: q = x r is within an
        # ulp of x / d, and q + r (x - q d) is then the correctly rounded quotient for operands and quotients in
        # the normal range); div.rn costs several more instructions and, for x = 0 (padded rows), a slow-path
        # call. The interpreter has no exact fma: it divides.
        if NATIVE_ROUNDING:
            q = x * r
            e = tl.fma(-q, d, x)
            return tl.fma(e, r, q)
        return tl.math.div_rn(x, d)

    @triton.jit
    def smooth_divide(x, s, KIND: tl.constexpr):
        # x / s rounded to x's dtype, as PyTorch divides a 16-bit tensor by the smoothing factors (s broadcast
        # against x; its reciprocal computed once per factor).
        inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
        return round_to(div_by(x, s, inv), KIND)

    @triton.jit
    def round_half_even(t):
        # torch.round semantics, so kernel codes equal the PyTorch quantizer's.
        if NATIVE_ROUNDING:
            return libdevice.rint(t)
        r = tl.floor(t)
        frac = t - r
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        up = (frac > 0.5) | ((frac == 0.5) & odd)
        return tl.where(up, r + 1.0, r)

    @triton.jit
    def round_to(v, KIND: tl.constexpr):
        # float32 -> the nearest value of a 16-bit dtype (KIND 0 float16, 1 bfloat16, 2 float32: unchanged), ties
        # to even. bfloat16 by bit arithmetic: the interpreter's float32 -> bfloat16 cast truncates.
        if KIND == 0:
            v = v.to(tl.float16).to(tl.float32)
        elif KIND == 1 and NATIVE_ROUNDING:
            v = v.to(tl.bfloat16).to(tl.float32)
        elif KIND == 1:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
        return v

    @triton.jit
    def stored_scale(scale, SCALE_KIND: tl.constexpr, TINY: tl.constexpr, FMAX: tl.constexpr):
        # Clamp into the storage dtype's normal range and round to it (quant.core._store_scale).
        scale = tl.minimum(tl.maximum(scale, TINY), FMAX)
        return round_to(scale, SCALE_KIND)

    @triton.jit
    def quantize_groups(x3, STATIC_SCALE, STATIC_ZERO, g, g_mask, STATIC: tl.constexpr, SYMMETRIC: tl.constexpr,
                         HAS_ZERO: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, QSYM: tl.constexpr,
                         SYM_ZERO: tl.constexpr, SCALE_KIND: tl.constexpr, TINY: tl.constexpr, FMAX: tl.constexpr):
        # x3 [BLOCK_M, G, 64] (float32), groups g [G] -> centred codes [BLOCK_M, G, 64] and scales [BLOCK_M, G]:
        # the arithmetic of deepcompressor.quant.core (dynamic ranges, or the calibrated static ones of groups g).
        zero = tl.zeros((x3.shape[0], x3.shape[1]), dtype=tl.float32) + SYM_ZERO
        if STATIC:
            scale = tl.zeros_like(zero) + tl.load(STATIC_SCALE + g, mask=g_mask, other=1.0)[None, :]
            if HAS_ZERO:
                zero = tl.zeros_like(zero) + tl.load(STATIC_ZERO + g, mask=g_mask, other=0.0)[None, :]
        elif SYMMETRIC:
            absmax = tl.max(tl.abs(x3), axis=2)
            qsym = tl.zeros_like(absmax) + QSYM
            scale = stored_scale(div_by(absmax, qsym, tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), qsym)),
                                 SCALE_KIND, TINY, FMAX)
        else:
            xmin = tl.minimum(tl.min(x3, axis=2), 0.0)
            xmax = tl.maximum(tl.max(x3, axis=2), 0.0)
            span = tl.zeros_like(xmin) + (QMAX - QMIN)
            scale = stored_scale(tl.math.div_rn(xmax - xmin, span), SCALE_KIND, TINY, FMAX)
            zero = tl.minimum(tl.maximum(round_half_even(QMIN - tl.math.div_rn(xmin, scale)), QMIN), QMAX)
        inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        q = round_half_even(div_by(x3, scale[:, :, None], inv[:, :, None])) + zero[:, :, None]
        q = tl.minimum(tl.maximum(q, QMIN), QMAX) - zero[:, :, None]
        return q, scale

    @triton.jit
    def quantize_group(x, STATIC_SCALE, STATIC_ZERO, g, rows, STATIC: tl.constexpr, SYMMETRIC: tl.constexpr,
                       HAS_ZERO: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, QSYM: tl.constexpr,
                       SYM_ZERO: tl.constexpr, SCALE_KIND: tl.constexpr, TINY: tl.constexpr, FMAX: tl.constexpr):
        # quantize_groups for the one group g of x [BLOCK_M, 64] -> codes [BLOCK_M, 64] and scales [BLOCK_M].
        groups = g + tl.arange(0, 1)
        q, scale = quantize_groups(tl.reshape(x, (x.shape[0], 1, 64)), STATIC_SCALE, STATIC_ZERO, groups, groups >= 0,
                                   STATIC, SYMMETRIC, HAS_ZERO, QMIN, QMAX, QSYM, SYM_ZERO, SCALE_KIND, TINY, FMAX)
        return tl.reshape(q, (x.shape[0], 64)), tl.reshape(scale, (x.shape[0],))

    @triton.jit
    def unpack_nibbles(packed, B_SIGNED: tl.constexpr):
        # int8 bytes -> (low nibbles, high nibbles) as int8, sign-extended for signed codes.
        if B_SIGNED:
            lo = ((packed << 4).to(tl.int8) >> 4).to(tl.int8)
            hi = (packed >> 4).to(tl.int8)
        else:
            lo = (packed & 15).to(tl.int8)
            hi = ((packed >> 4) & 15).to(tl.int8)
        return lo, hi

else:  # pragma: no cover
    dequant_nibbles_bf16 = dequant_nibbles_f16 = div_by = smooth_divide = None
    round_half_even = round_to = stored_scale = quantize_group = quantize_groups = unpack_nibbles = None
