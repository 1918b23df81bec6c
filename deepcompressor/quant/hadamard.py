"""Block-diagonal Hadamard rotation of linear inputs (QuaRot-style outlier spreading).

``R = diag(H_b, ..., H_b)`` with ``H_b`` the orthonormal Sylvester Hadamard matrix of size ``b`` (a power of two),
symmetric and its own inverse. A linear ``y = x W^T`` equals ``(x R)(W R)^T``: the rotated input spreads each
outlier channel over its block, and ``W R`` is folded into the weight offline. ``block_hadamard`` applies ``R`` to
the last dimension with the fast Walsh-Hadamard transform (``log2 b`` butterfly stages, no matrix).
"""

from __future__ import annotations

import torch

__all__ = ["block_hadamard", "check_block_size", "hadamard_matrix"]


def check_block_size(block: int, features: int, where: str = "quant.rotation.block_size") -> None:
    if block < 2 or block & (block - 1):
        raise ValueError(f"{where}: {block} is not a power of two >= 2")
    if features % block:
        raise ValueError(f"{where}: {block} does not divide the {features} input channels")


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of size ``n`` (a power of two)."""
    check_block_size(n, n)
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / n**0.5


def block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ R`` for the block-diagonal Hadamard ``R`` of block size ``block`` along the last dimension, in
    ``x``'s dtype (the butterflies run in float32 for 16-bit inputs)."""
    features = x.shape[-1]
    check_block_size(block, features)
    dtype = x.dtype
    y = x.float() if dtype in (torch.float16, torch.bfloat16) else x.clone()
    shape = y.shape
    y = y.reshape(-1, features // block, block)
    h = 1
    while h < block:
        y = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return (y.reshape(shape) / block**0.5).to(dtype)
