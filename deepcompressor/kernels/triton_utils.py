"""Triton availability and the device helpers shared by the quantization kernels."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional on CPU-only installs
    triton = None
    tl = None

__all__ = ["HAS_TRITON", "round_half_even", "tl", "triton"]

HAS_TRITON = triton is not None

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

else:  # pragma: no cover
    round_half_even = None
