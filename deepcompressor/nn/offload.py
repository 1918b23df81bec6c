"""Blocks of a model kept in host memory and brought to the device only while they are needed.

``BlockOffloader`` moves whole blocks (every parameter and buffer of the module, whatever its layer types) between
the device and host memory (pinned on CUDA, so the copies run asynchronously):

- ``offload(i)`` copies block ``i``'s current tensors to the host and frees their device copies (use it after the
  block was changed on the device, e.g. calibrated);
- ``load(i)`` brings them to the device, keeping the host copy; ``release(i)`` drops the device copies again
  without copying anything back (the block must not have changed in between);
- ``streaming(resident)`` keeps blocks ``0 .. resident - 1`` on the device and streams the others through forward
  hooks: each one is loaded just before its forward and released right after it, and on CUDA the next streamed
  block's copy is started on a side stream while the current one computes, so at most two streamed blocks are on
  the device at a time.

Device-specific caches of the layers (``FakeQuantLinear``'s dequantized weight) are dropped whenever a block
leaves the device: they are rebuilt on the next forward there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BlockOffloader", "drop_device_caches", "module_device_bytes", "to_host"]

logger = logging.getLogger(__name__)


@dataclass
class _Slot:
    """One parameter or buffer of an offloaded block and its host copy."""

    module: nn.Module
    is_param: bool
    name: str
    host: torch.Tensor

    def point_to(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.module._parameters[self.name].data = tensor
        else:
            self.module._buffers[self.name] = tensor

    def current(self) -> torch.Tensor:
        return self.module._parameters[self.name].data if self.is_param else self.module._buffers[self.name]


def _layout(tensor: torch.Tensor) -> tuple[tuple[int, ...], int]:
    """Strides for the host copy (the tensor's own unless it is an expanded view) and the elements they span."""
    shape, stride = tuple(tensor.shape), tuple(tensor.stride())
    if 0 in stride and tensor.numel() > 1:
        stride = torch.empty(shape, device="meta").stride()
    span = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if tensor.numel() else 0
    return stride, span


def _identity(tensor: torch.Tensor) -> tuple:
    """What makes two parameter entries the same tensor (shared by several modules: copied once)."""
    return tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()


def _host_copy(tensor: torch.Tensor, pin: bool, non_blocking: bool) -> torch.Tensor:
    # Same strides as the original: a transposed weight copied into a contiguous one would send the matmuls down
    # another path and change the results in their last bits.
    tensor = tensor.detach()
    host = torch.empty_strided(tensor.shape, _layout(tensor)[0], dtype=tensor.dtype, device="cpu", pin_memory=pin)
    return host.copy_(tensor, non_blocking=non_blocking)


_ALIGN = 256  # bytes: every tensor of a host region starts at an offset its dtype can be viewed at


class _HostArena:
    """Host memory of the offloaded blocks: regions of large (pinned) slabs, reused when a block is offloaded
    again. Page-locking host memory is slow (about 1.5 GB/s on a cloud VM), so a run pays it once per byte."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._free: list[tuple[torch.Tensor, int, int]] = []  # (slab, offset, bytes)
        self.allocated = 0

    def reserve(self, nbytes: int) -> None:
        """Allocate one slab of at least ``nbytes`` for later ``take``s (fewer, larger page-locked allocations).

        Torch's pinned allocator rounds every allocation up to a power of two and locks all of it, so the slab is
        that size and the surplus is free room for later ``take``s rather than waste."""
        if nbytes > 0:
            if self.pin:
                nbytes = 1 << (nbytes - 1).bit_length()
            slab = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=self.pin)
            self.allocated += nbytes
            self._free.append((slab, 0, nbytes))

    def close(self) -> None:
        self._free.clear()

    def take(self, nbytes: int) -> tuple[torch.Tensor, int, int]:
        fitting = [k for k, r in enumerate(self._free) if r[2] >= nbytes]
        if not fitting:
            self.reserve(nbytes)
            fitting = [len(self._free) - 1]
        slab, offset, size = self._free.pop(min(fitting, key=lambda k: self._free[k][2]))
        rest = (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        if size - rest > 0:
            self._free.append((slab, offset + rest, size - rest))
        return slab, offset, min(size, rest)

    def give(self, region: tuple[torch.Tensor, int, int]) -> None:
        self._free.append(region)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of ``tensor`` with its strides: pinned and asynchronous for a CUDA tensor (ordered on the
    current stream, so a later copy back to the device on that stream reads the finished values)."""
    cuda = tensor.device.type == "cuda"
    return _host_copy(tensor, pin=cuda, non_blocking=cuda)


def drop_device_caches(block: nn.Module) -> None:
    for module in block.modules():
        if getattr(module, "_main_cache", None) is not None:
            module._main_cache = None


def module_device_bytes(module: nn.Module, *, with_cache: bool = True) -> int:
    """Bytes a module occupies on its device: parameters and buffers, plus (``with_cache``) the dequantized weight
    that a fake-quantized layer caches on its first forward."""
    total = sum(t.numel() * t.element_size() for t in module.parameters())
    total += sum(t.numel() * t.element_size() for t in module.buffers())
    if with_cache:
        total += sum(layer.in_features * layer.out_features * 2 for layer in module.modules()
                     if getattr(layer, "quant_weights", False) and getattr(layer, "qweight_codes", None) is not None)
    return total


class BlockOffloader:
    """Moves the blocks of a model between ``device`` and host memory (see the module docstring).

    Args:
        blocks: The blocks, in execution order.
        device: Where they compute.
        pin: Pin the host copies (default: on CUDA), which makes the copies asynchronous.
        prefetch: Copy the next streamed block on a side stream while the current one runs (CUDA only).
    """

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device | str, *, pin: bool | None = None,
                 prefetch: bool = True) -> None:
        self.blocks = list(blocks)
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.pin = cuda if pin is None else pin
        self._copy_stream = torch.cuda.Stream(self.device) if (cuda and prefetch) else None
        self._slots: dict[int, list[_Slot]] = {}  # blocks with a host copy
        self._regions: dict[int, tuple[torch.Tensor, int, int]] = {}  # where each host copy lives
        self._arena = _HostArena(self.pin)
        self._on_device: set[int] = set(range(len(self.blocks)))  # blocks whose tensors are on the device
        self._pending: dict[int, torch.cuda.Event] = {}  # prefetched blocks: copy not yet waited for
        self.bytes_copied = 0

    # -------------------------------------------------------------------- state

    def on_device(self, index: int) -> bool:
        return index in self._on_device

    def host_blocks(self) -> list[int]:
        return [i for i in range(len(self.blocks)) if i not in self._on_device]

    # -------------------------------------------------------------------- moves

    @property
    def host_bytes(self) -> int:
        """Host memory held for the blocks (allocated once, reused)."""
        return self._arena.allocated

    @staticmethod
    def _tensors(block: nn.Module) -> list[tuple[nn.Module, bool, str, torch.Tensor]]:
        found = []
        for module in block.modules():
            for is_param, table in ((True, module._parameters), (False, module._buffers)):
                for name, value in table.items():
                    if value is not None:
                        found.append((module, is_param, name, value.data if is_param else value))
        return found

    def _unique(self, index: int) -> tuple[list, dict[tuple, tuple[int, tuple, int]], int]:
        """The block's tensors, the host layout of each distinct one (offset, strides, span) and the bytes."""
        entries = self._tensors(self.blocks[index])
        layout, total = {}, 0
        for *_, tensor in entries:
            key = _identity(tensor)
            if key in layout:  # a tensor shared by several modules is copied once
                continue
            stride, span = _layout(tensor)
            layout[key] = (total, stride, span)
            total += (span * tensor.element_size() + _ALIGN - 1) // _ALIGN * _ALIGN
        return entries, layout, total

    def offload(self, index: int) -> None:
        """Copy block ``index``'s current tensors to the host and point the block at them (a no-op for a block
        already there)."""
        if index not in self._on_device and index in self._slots:
            return
        block = self.blocks[index]
        drop_device_caches(block)
        self._pending.pop(index, None)
        stale = self._regions.pop(index, None)
        if stale is not None:  # the block changed on the device: its old host copy is free for the new one
            self._arena.give(stale)
        entries, layout, total = self._unique(index)
        region = self._arena.take(total)
        slab, base, _ = region
        copies: dict[tuple, torch.Tensor] = {}
        slots = []
        for module, is_param, name, tensor in entries:
            key = _identity(tensor)
            host = copies.get(key)
            if host is None:
                offset, stride, span = layout[key]
                size = span * tensor.element_size()
                flat = slab[base + offset : base + offset + size].view(tensor.dtype)
                host = copies[key] = flat.as_strided(tuple(tensor.shape), stride)
                host.copy_(tensor.detach())
            slots.append(_Slot(module, is_param, name, host))
        for slot in slots:
            slot.point_to(slot.host)
        self._slots[index] = slots
        self._regions[index] = region
        self._on_device.discard(index)

    def load(self, index: int, *, stream: torch.cuda.Stream | None = None) -> None:
        """Bring block ``index`` to the device (a no-op if it is there); the host copy is kept for ``release``."""
        if index in self._on_device:
            return
        slots = self._slots[index]
        copies: dict[int, torch.Tensor] = {}
        context = torch.cuda.stream(stream) if stream is not None else _null_context()
        with context:
            for slot in slots:
                device_copy = copies.get(id(slot.host))
                if device_copy is None:
                    if self.device.type == "cpu":  # a copy of its own, as on a GPU (the host region gets reused)
                        device_copy = torch.empty_strided(slot.host.shape, slot.host.stride(), dtype=slot.host.dtype)
                        device_copy.copy_(slot.host)
                    else:
                        device_copy = slot.host.to(self.device, non_blocking=self.pin)
                    copies[id(slot.host)] = device_copy
                    self.bytes_copied += slot.host.numel() * slot.host.element_size()
                slot.point_to(device_copy)
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
            self._pending[index] = event
        self._on_device.add(index)

    def _wait(self, index: int) -> None:
        """Make the current stream wait for a prefetched copy, and tell the allocator the tensors are used there."""
        event = self._pending.pop(index, None)
        if event is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for slot in self._slots[index]:
            slot.current().record_stream(current)

    def release(self, index: int) -> None:
        """Drop block ``index``'s device copies (unchanged since ``load``): it points at its host copy again."""
        if index not in self._on_device:
            return
        if index not in self._slots:
            raise RuntimeError(f"block {index} has no host copy: offload it instead of releasing it")
        self._wait(index)
        drop_device_caches(self.blocks[index])
        for slot in self._slots[index]:
            slot.point_to(slot.host)
        self._on_device.discard(index)

    def keep(self, index: int) -> None:
        """Block ``index`` (on the device, changed there) stays on the device: its stale host copy is dropped."""
        if index not in self._on_device:
            raise RuntimeError(f"block {index} is not on the device")
        self._slots.pop(index, None)
        region = self._regions.pop(index, None)
        if region is not None:
            self._arena.give(region)

    def offload_all(self) -> None:
        self.offload_many(range(len(self.blocks)))

    def load_all(self) -> None:
        for index in range(len(self.blocks)):
            self.load(index)
            self._wait(index)
        # back on the device for good: the host copies go
        self._slots.clear()
        self._regions.clear()
        self._arena.close()
        self._arena = _HostArena(self.pin)

    def close(self) -> None:
        """Unlock the host memory and forget the host copies (blocks still pointing at them keep them as plain
        memory): the end of a run whose model is dropped."""
        self._slots.clear()
        self._regions.clear()
        self._arena.close()

    def offload_many(self, indices) -> None:
        """``offload`` each of ``indices`` that is on the device, from one host allocation."""
        indices = [i for i in indices if i in self._on_device]
        self._arena.reserve(sum(self._unique(i)[2] for i in indices))
        for index in indices:
            self.offload(index)

    # -------------------------------------------------------------------- streaming

    @contextmanager
    def streaming(self, resident: int | Sequence[int], *, drop_caches: bool = False):
        """The ``resident`` blocks (a count: the first ones) on the device, the others loaded around their forward
        (see the module docstring); on exit the streamed blocks are all back on the host. ``drop_caches`` drops
        every block's device-specific caches after its forward (fake-quantized blocks then hold only their codes)."""
        depth = len(self.blocks)
        keep = set(range(max(0, min(resident, depth)))) if isinstance(resident, int) else set(resident)
        for index in sorted(keep):
            self.load(index)
            self._wait(index)
        streamed = [i for i in range(depth) if i not in keep]
        for index in streamed:
            if index in self._on_device:
                self.offload(index)
        following = {index: streamed[(k + 1) % len(streamed)] for k, index in enumerate(streamed)}
        handles = []

        def before(index):
            def hook(_module, _args, _kwargs=None):
                self.load(index)
                self._wait(index)
                nxt = following[index]
                if self._copy_stream is not None and nxt != index and nxt not in self._on_device:
                    self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
                    self.load(nxt, stream=self._copy_stream)
            return hook

        def after(index):
            def hook(_module, _args, _output):
                self.release(index)
            return hook

        def drop(index):
            def hook(_module, _args, _output):
                drop_device_caches(self.blocks[index])
            return hook

        for index in streamed:
            handles.append(self.blocks[index].register_forward_pre_hook(before(index)))
            handles.append(self.blocks[index].register_forward_hook(after(index)))
        if drop_caches:
            handles += [self.blocks[index].register_forward_hook(drop(index)) for index in sorted(keep)]
        logger.info("streaming %d of %d blocks from host memory (%d resident on %s)", len(streamed), depth,
                    len(keep), self.device)
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for index in streamed:  # a forward that raised leaves its block (and a prefetched one) on the device
                self.release(index)


@contextmanager
def _null_context():
    yield
