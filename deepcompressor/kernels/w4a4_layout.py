"""Memory layout of the 4-bit weights read by the W4A4 GEMM kernel.

Weights are ``[N, K]`` codes (``N`` outputs, ``K`` inputs) quantized in groups of ``GROUP = 64`` inputs. The kernel
works on one group at a time and splits it into its two halves of 32 inputs, each fed to one int8 tensor-core
product. So that both halves come out of the same loaded bytes, byte ``j`` (``0 <= j < 32``) of group ``g`` holds
input ``64 g + j`` in its low nibble and input ``64 g + 32 + j`` in its high nibble: the codes are reordered inside
each group (``to_kernel_order``) and then packed with ``deepcompressor.quant.pack_int4`` (element ``2i`` in the low
nibble, ``2i + 1`` in the high nibble). The activations keep their natural order.
"""

from __future__ import annotations

import torch

from ..quant.packing import pack_int4, unpack_int4

__all__ = ["GROUP", "check_group_multiple", "from_kernel_order", "pack_weight", "to_kernel_order", "unpack_weight"]

GROUP = 64
_HALF = GROUP // 2


def check_group_multiple(k: int, what: str) -> None:
    if k % GROUP:
        raise ValueError(f"{what}: the input dimension {k} is not a multiple of the W4A4 group size {GROUP}")


def to_kernel_order(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` -> ``[N, K]`` with each group's inputs ordered ``0, 32, 1, 33, ..., 31, 63``."""
    n, k = codes.shape
    check_group_multiple(k, "to_kernel_order")
    return codes.reshape(n, k // GROUP, 2, _HALF).transpose(-1, -2).reshape(n, k)


def from_kernel_order(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_kernel_order``."""
    n, k = codes.shape
    check_group_multiple(k, "from_kernel_order")
    return codes.reshape(n, k // GROUP, _HALF, 2).transpose(-1, -2).reshape(n, k)


def pack_weight(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    """int8 / uint8 4-bit codes ``[N, K]`` -> the kernel's uint8 ``[N, K / 2]``."""
    if codes.dim() != 2:
        raise ValueError(f"pack_weight: expected [N, K] codes, got shape {tuple(codes.shape)}")
    return pack_int4(to_kernel_order(codes).contiguous(), signed)


def unpack_weight(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """The kernel's uint8 ``[N, K / 2]`` -> codes ``[N, K]`` (int8 when signed, else uint8)."""
    if packed.dim() != 2:
        raise ValueError(f"unpack_weight: expected [N, K / 2] packed codes, got shape {tuple(packed.shape)}")
    return from_kernel_order(unpack_int4(packed, signed))
