"""Two 4-bit codes per byte.

Nibble order: along the last dimension, element ``2i`` goes to the LOW nibble (bits 0-3) and element ``2i + 1``
to the HIGH nibble (bits 4-7) of byte ``i``. Signed codes are stored as 4-bit two's complement (``-8 -> 0x8``,
``-1 -> 0xF``), unsigned codes as is. The last dimension must be even.
"""

from __future__ import annotations

import torch

__all__ = ["pack_int4", "unpack_int4"]


def pack_int4(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    """Pack int8 / uint8 codes ``[..., n]`` (n even) into uint8 ``[..., n // 2]``."""
    if codes.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"pack_int4: expected int8 or uint8 codes, got {codes.dtype}")
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dimension must be even to pack two codes per byte, got {tuple(codes.shape)}")
    wide = codes.to(torch.int16)
    lo, hi = (-8, 7) if signed else (0, 15)
    if codes.numel() and (bool((wide < lo).any()) or bool((wide > hi).any())):
        raise ValueError(f"pack_int4: codes outside the 4-bit range [{lo}, {hi}]")
    nibbles = wide & 0xF
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 ``[..., m]`` -> int8 (signed) or uint8 codes ``[..., 2m]``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4: expected uint8 packed data, got {packed.dtype}")
    wide = packed.to(torch.int16)
    nibbles = torch.stack((wide & 0xF, wide >> 4), dim=-1).flatten(-2)
    if signed:
        return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)
    return nibbles.to(torch.uint8)
