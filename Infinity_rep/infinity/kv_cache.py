"""Self-attention KV cache of the multi-scale sampler.

Each block keeps the (cos-normalised, rotated) keys and the values of every earlier scale; the queries of the
current scale attend to all of them plus the current scale's own tokens, without a mask. The plain cache keeps
them in the blocks' dtype in a buffer preallocated for the whole generation (``reserve``) and written in place,
so no per-scale concatenation of the growing prefix happens. The last scale is never stored (``store=False``):
nothing reads it again; if room was reserved for it the buffer tail serves as scratch, otherwise it is
concatenated to the prefix for its own attention only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["KVCache", "LayerKVCache", "default_kv_cache_factory"]


class LayerKVCache:
    """KV cache of one block.

    Args:
        capacity: Tokens to preallocate on the first store (0: exactly what the first store needs; the buffer
            grows if a later store does not fit).
    """

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self._k: torch.Tensor | None = None  # [B, H, capacity, c]
        self._v: torch.Tensor | None = None
        self.length = 0

    @property
    def prefix(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views of the cached ``(K, V)`` ``[B, H, length, c]``, or None when empty."""
        if self._k is None or self.length == 0:
            return None
        return self._k[:, :, : self.length], self._v[:, :, : self.length]

    def set_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Replace the content with ``k``/``v`` ``[B, H, L, c]`` (replay of a captured prefix)."""
        self.reset()
        self._append(k, v)

    def next_slots(
        self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, *, store: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Writable views ``[B, H, new, c]`` of the buffer where the next ``new`` tokens go, so a producer can
        write k/v in place (``attend`` then skips the copy). None when they would not fit without a
        concatenation (``store=False`` and no reserved room)."""
        batch, heads, new, dim = shape
        end = self.length + new
        if store:
            self._ensure_room(batch, heads, end, dim, dtype, device)
        elif self._k is None or end > self._k.shape[2] or self._k.dtype != dtype:
            return None
        return self._k[:, :, self.length : end], self._v[:, :, self.length : end]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, store: bool) -> torch.Tensor:
        if store:
            self._append(k, v)
            keys, values = self.prefix
        elif self._k is not None and self.length + k.shape[2] <= self._k.shape[2]:
            # Room reserved past the prefix: use it as scratch (no concatenation), the length stays.
            end = self.length + k.shape[2]
            self._write(k, v, end)
            keys, values = self._k[:, :, :end], self._v[:, :, :end]
        elif self.length:
            prefix_k, prefix_v = self.prefix
            keys = torch.cat((prefix_k, k.to(prefix_k.dtype)), dim=2)
            values = torch.cat((prefix_v, v.to(prefix_v.dtype)), dim=2)
        else:
            keys, values = k, v
        return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), scale=1.0)

    def reset(self) -> None:
        self._k = self._v = None
        self.length = 0

    def rewind(self) -> None:
        """Forget the content but keep the buffers (their addresses stay valid for replayed CUDA graphs)."""
        self.length = 0

    def nbytes(self) -> int:
        if self._k is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    def _ensure_room(self, batch: int, heads: int, end: int, dim: int, dtype, device) -> None:
        if self._k is not None and (self._k.shape[0] != batch or self._k.shape[1] != heads or self._k.shape[3] != dim):
            shape = (batch, heads, end - self.length, dim)
            raise ValueError(f"KV cache holds {tuple(self._k.shape)}, cannot append keys of shape {shape}")
        if self._k is None or end > self._k.shape[2]:
            size = max(end, self.capacity) if self._k is None else max(end, 2 * self._k.shape[2])
            grown_k = torch.empty(batch, heads, size, dim, dtype=dtype, device=device)
            grown_v = torch.empty(batch, heads, size, dim, dtype=dtype, device=device)
            if self.length:
                grown_k[:, :, : self.length] = self._k[:, :, : self.length]
                grown_v[:, :, : self.length] = self._v[:, :, : self.length]
            self._k, self._v = grown_k, grown_v

    def _write(self, k: torch.Tensor, v: torch.Tensor, end: int) -> None:
        for buffer, new in ((self._k, k), (self._v, v)):
            slot = buffer[:, :, self.length : end]
            if new.data_ptr() != slot.data_ptr() or new.stride() != slot.stride():  # not already written in place
                slot.copy_(new)

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        batch, heads, new, dim = k.shape
        end = self.length + new
        self._ensure_room(batch, heads, end, dim, k.dtype, k.device)
        self._write(k, v, end)
        self.length = end


class KVCache:
    """The caches of all blocks (``layers[i]`` belongs to block i)."""

    def __init__(self, layers: list[LayerKVCache]) -> None:
        self.layers = layers

    def reserve(self, num_tokens: int) -> None:
        """Preallocate room for ``num_tokens`` cached tokens per block on the first store."""
        for layer in self.layers:
            layer.capacity = num_tokens

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def default_kv_cache_factory(model) -> KVCache:
    return KVCache([LayerKVCache() for _ in range(len(model.blocks()))])


KVCacheFactory = Callable[..., KVCache]
