"""Triton availability and the device helpers shared by the quantization kernels."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional on CPU-only installs
    triton = None
    tl = None

__all__ = ["HAS_TRITON", "SCALE_KINDS", "dtype_kind", "quantize_group", "round_half_even", "round_to", "tl", "triton",
           "unpack_nibbles"]

import torch

HAS_TRITON = triton is not None

# Kernel constant for a 16/32-bit float dtype (round_to's KIND).
SCALE_KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def dtype_kind(dtype: torch.dtype) -> int:
    if dtype not in SCALE_KINDS:
        raise ValueError(f"W4A4 kernels: unsupported dtype {dtype} (float16, bfloat16 or float32)")
    return SCALE_KINDS[dtype]

if HAS_TRITON:

    @triton.jit
    def round_half_even(t):
        # torch.round semantics, so kernel codes equal the PyTorch quantizer's; libdevice.rint is not available
        # under the interpreter.
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
    def quantize_group(x, STATIC_SCALE, STATIC_ZERO, g, rows, STATIC: tl.constexpr, SYMMETRIC: tl.constexpr,
                       HAS_ZERO: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, QSYM: tl.constexpr,
                       SYM_ZERO: tl.constexpr, SCALE_KIND: tl.constexpr, TINY: tl.constexpr, FMAX: tl.constexpr):
        # One group of 64 inputs per row of x [BLOCK_M, 64] (float32) -> zero-point-centred codes (float32) and
        # the scale per row, with the arithmetic of deepcompressor.quant.core (dynamic ranges, or the calibrated
        # static ones of group g).
        zero = tl.zeros(rows.shape, dtype=tl.float32) + SYM_ZERO
        if STATIC:
            scale = tl.load(STATIC_SCALE + g + rows * 0)
            if HAS_ZERO:
                zero = tl.load(STATIC_ZERO + g + rows * 0)
        elif SYMMETRIC:
            absmax = tl.max(tl.abs(x), axis=1)
            scale = stored_scale(tl.math.div_rn(absmax, tl.zeros_like(absmax) + QSYM), SCALE_KIND, TINY, FMAX)
        else:
            xmin = tl.minimum(tl.min(x, axis=1), 0.0)
            xmax = tl.maximum(tl.max(x, axis=1), 0.0)
            span = tl.zeros_like(xmin) + (QMAX - QMIN)
            scale = stored_scale(tl.math.div_rn(xmax - xmin, span), SCALE_KIND, TINY, FMAX)
            zero = tl.minimum(tl.maximum(round_half_even(QMIN - tl.math.div_rn(xmin, scale)), QMIN), QMAX)
        q = round_half_even(tl.math.div_rn(x, scale[:, None])) + zero[:, None]
        q = tl.minimum(tl.maximum(q, QMIN), QMAX) - zero[:, None]
        return q, scale

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
    round_half_even = round_to = stored_scale = quantize_group = unpack_nibbles = None
