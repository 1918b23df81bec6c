"""A deterministic, bounded, uniform sample of the token rows of a stream (the KV calibrator's and the diagnostics'
token sampler): every row gets a key ``hash(index, seed) * 2**31 + index``, and the sample is the ``budget`` rows
with the smallest keys, so it does not depend on how the stream is batched.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["TokenReservoir", "select_token_sample", "token_sample_keys"]

# Keys are (hash << 31) | index, so the running token index of one accumulator must stay below 2**31.
_MAX_TOKEN_INDEX = 1 << 31


def _check_matrix(x: torch.Tensor, what: str) -> None:
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what}: expected a non-empty [tokens, channels] matrix, got shape {tuple(x.shape)}")


def _hash32(x: np.ndarray) -> np.ndarray:
    """Integer avalanche hash of 32-bit values held in uint64 (products stay below 2**64, masked to 32 bits)."""
    mask = np.uint64(0xFFFFFFFF)
    x = x & mask
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & mask
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & mask
    x ^= x >> np.uint64(16)
    return x


def token_sample_keys(start: int, count: int, seed: int = 0) -> torch.Tensor:
    """Unique int64 sampling keys of the tokens with running indices ``start .. start+count-1``.

    The key is ``hash(index, seed) * 2**31 + index``: uniform pseudo-random order, ties broken by the index.
    """
    if start < 0 or count < 0:
        raise ValueError(f"token_sample_keys: start and count must be >= 0, got {start}, {count}")
    if start + count > _MAX_TOKEN_INDEX:
        raise ValueError(f"token_sample_keys: more than {_MAX_TOKEN_INDEX} tokens in one accumulator")
    index = np.arange(start, start + count, dtype=np.uint64)
    salt = _hash32(np.array([seed & 0xFFFFFFFF], dtype=np.uint64) + np.uint64(0x9E3779B9))
    h = _hash32(index ^ salt)
    return torch.from_numpy(((h << np.uint64(31)) | index).astype(np.int64))


def select_token_sample(num_tokens: int, budget: int, seed: int = 0) -> torch.Tensor:
    """Indices of the ``budget`` tokens (of ``num_tokens``) that ``TokenReservoir`` keeps, in key order."""
    keys = token_sample_keys(0, num_tokens, seed)
    order = torch.argsort(keys)[: min(budget, num_tokens)]
    return order


class TokenReservoir:
    """A fixed-size uniform sample of the rows of a stream of ``[tokens, C]`` batches, kept on the CPU.

    Rows are stored in the dtype they arrive in, in a buffer of at most ``budget`` rows: an update only copies the
    rows that enter the sample into the slots of the rows they evict (or into free slots), so its cost does not
    grow with the sample. ``rows`` / ``indices`` are in key order, so they equal
    ``x[select_token_sample(len(x), budget, seed)]`` of the concatenated stream.
    """

    def __init__(self, budget: int, seed: int = 0) -> None:
        if budget <= 0:
            raise ValueError(f"TokenReservoir: budget must be > 0, got {budget}")
        self.budget = budget
        self.seed = seed
        self.seen = 0
        self._count = 0  # filled slots
        self._keys = torch.empty(0, dtype=torch.int64)  # [capacity], valid up to _count
        self._buffer: torch.Tensor | None = None  # [capacity, C]

    def update(self, x: torch.Tensor) -> None:
        _check_matrix(x, "TokenReservoir.update")
        if self._buffer is not None and x.shape[1] != self._buffer.shape[1]:
            raise ValueError(f"TokenReservoir.update: {x.shape[1]} channels, expected {self._buffer.shape[1]}")
        keys = token_sample_keys(self.seen, x.shape[0], self.seed)
        self.seen += x.shape[0]
        held = self._keys[: self._count]
        if self._count >= self.budget:
            candidates = torch.nonzero(keys < held.max()).squeeze(1)
        else:
            candidates = torch.arange(keys.numel())
        if candidates.numel() > self.budget:
            candidates = candidates[torch.topk(keys[candidates], self.budget, largest=False).indices]
        if candidates.numel() == 0:
            return
        new_keys = keys[candidates]
        merged = torch.cat([held, new_keys])
        if merged.numel() <= self.budget:
            entering = torch.arange(new_keys.numel())
            slots = torch.arange(self._count, merged.numel())
        else:
            keep = torch.zeros(merged.numel(), dtype=torch.bool)
            keep[torch.topk(merged, self.budget, largest=False).indices] = True
            entering = torch.nonzero(keep[self._count :]).squeeze(1)
            evicted = torch.nonzero(~keep[: self._count]).squeeze(1)
            slots = torch.cat([torch.arange(self._count, self.budget), evicted])[: entering.numel()]
        if entering.numel() == 0:
            return
        rows = x.index_select(0, candidates[entering].to(x.device)).to("cpu")
        self._reserve(int(slots.max()) + 1, rows)
        self._buffer[slots] = rows
        self._keys[slots] = new_keys[entering]
        self._count = max(self._count, int(slots.max()) + 1)

    def _reserve(self, size: int, like: torch.Tensor) -> None:
        """Grow the buffer (doubling, at most ``budget`` rows) so that it holds ``size`` rows."""
        capacity = 0 if self._buffer is None else self._buffer.shape[0]
        if size <= capacity:
            return
        new_capacity = min(self.budget, max(size, 2 * capacity))
        buffer = like.new_empty(new_capacity, like.shape[1])
        keys = torch.empty(new_capacity, dtype=torch.int64)
        if self._count:
            buffer[: self._count] = self._buffer[: self._count]
            keys[: self._count] = self._keys[: self._count]
        self._buffer, self._keys = buffer, keys

    def _order(self) -> torch.Tensor:
        if self._count == 0:
            raise ValueError("TokenReservoir: no data")
        return torch.argsort(self._keys[: self._count])

    @property
    def num_rows(self) -> int:
        return self._count

    @property
    def unordered_rows(self) -> torch.Tensor:
        """View of the sampled rows in storage order (enough for order-free statistics such as medians)."""
        if self._count == 0:
            raise ValueError("TokenReservoir: no data")
        return self._buffer[: self._count]

    @property
    def rows(self) -> torch.Tensor:
        """The sampled rows ``[min(budget, seen), C]`` in key order (a copy)."""
        return self._buffer[self._order()]

    @property
    def indices(self) -> torch.Tensor:
        """Running indices (in the stream) of the sampled rows, in key order."""
        return self._keys[self._order()] & (_MAX_TOKEN_INDEX - 1)
