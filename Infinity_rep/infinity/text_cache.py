"""A text encoder that holds no device memory between generations.

The flan-t5-xl encoder is ~2.3 GiB in float16 and runs once per prompt list, while the transformer runs for every
scale. On a module whose CPU and GPU share one memory (Jetson), parking it on the CPU saves nothing, so
``ReleasingTextEncoder`` builds the encoder when a prompt list needs encoding, encodes, and frees it again. The
features of the most recent prompt lists are kept (a few MiB each), so repeating a prompt list - every benchmark
repeat, every seed of one prompt - reloads nothing.
"""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from .text import TextBatch, TextEncoder

__all__ = ["ReleasingTextEncoder"]

logger = logging.getLogger(__name__)


class ReleasingTextEncoder:
    """Same ``encode`` / ``out_dim`` / ``max_length`` as :class:`TextEncoder`, with the encoder built by ``load``
    only while encoding prompt lists that are not in the cache of the last ``cache_size`` lists.

    ``load`` must return the same encoder every time (a local folder, or seeded random weights). It is called once
    at construction to learn the output width and device, and the encoder is freed right away.
    """

    def __init__(self, load: Callable[[], TextEncoder], cache_size: int = 16):
        if cache_size < 0:
            raise ValueError(f"ReleasingTextEncoder: cache_size must be >= 0, got {cache_size}")
        self._load = load
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple[str, ...], TextBatch] = OrderedDict()
        self.loads = 0
        encoder = self._build()
        self.out_dim = encoder.out_dim
        self.max_length = encoder.max_length
        self.device = encoder.device
        self.dtype = encoder.dtype
        del encoder
        self._free()

    def _build(self) -> TextEncoder:
        self.loads += 1
        return self._load()

    def _free(self) -> None:
        # Without emptying the allocator's cache the freed blocks stay reserved by this process.
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextmanager
    def loaded(self) -> Iterator[TextEncoder]:
        """The encoder, built for the duration of the ``with`` block (e.g. to fingerprint its weights)."""
        encoder = self._build()
        try:
            yield encoder
        finally:
            del encoder
            self._free()

    @property
    def resident_bytes(self) -> int:
        """Bytes held between calls: the cached features only."""
        return sum(b.kv_compact.numel() * b.kv_compact.element_size() for b in self._cache.values())

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextBatch:
        if isinstance(prompts, str):
            raise TypeError("ReleasingTextEncoder: pass a list of prompts, not a single string")
        key = tuple(prompts)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        logger.info("loading the text encoder for %d new prompt(s); it is freed after encoding", len(key))
        encoder = self._build()
        encoder.max_length = self.max_length
        try:
            batch = encoder.encode(list(prompts))
        finally:
            del encoder
            self._free()
        if self.cache_size:
            self._cache[key] = batch
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return batch

    def __call__(self, prompts: Sequence[str]) -> TextBatch:
        return self.encode(prompts)
