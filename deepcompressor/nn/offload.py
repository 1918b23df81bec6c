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

__all__ = ["BlockOffloader", "module_device_bytes", "to_host"]

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


def _host_copy(tensor: torch.Tensor, pin: bool, non_blocking: bool) -> torch.Tensor:
    # Same strides as the original: a transposed weight copied into a contiguous one would send the matmuls down
    # another path and change the results in their last bits.
    tensor = tensor.detach()
    if 0 in tensor.stride() and tensor.numel() > 1:  # an expanded view: its strides cannot be written to
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
    else:
        host = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu", pin_memory=pin)
    return host.copy_(tensor, non_blocking=non_blocking)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of ``tensor`` with its strides: pinned and asynchronous for a CUDA tensor (ordered on the
    current stream, so a later copy back to the device on that stream reads the finished values)."""
    cuda = tensor.device.type == "cuda"
    return _host_copy(tensor, pin=cuda, non_blocking=cuda)


def _drop_device_caches(block: nn.Module) -> None:
    for module in block.modules():
        if getattr(module, "_main_cache", None) is not None:
            module._main_cache = None


def module_device_bytes(module: nn.Module) -> int:
    """Bytes a module occupies on its device once it has run: parameters, buffers and the dequantized weight that
    a fake-quantized layer caches on its first forward."""
    total = sum(t.numel() * t.element_size() for t in module.parameters())
    total += sum(t.numel() * t.element_size() for t in module.buffers())
    for layer in module.modules():
        if getattr(layer, "quant_weights", False) and getattr(layer, "qweight_codes", None) is not None:
            total += layer.in_features * layer.out_features * 2  # the bf16 / fp16 main-weight cache
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
        self._on_device: set[int] = set(range(len(self.blocks)))  # blocks whose tensors are on the device
        self._pending: dict[int, torch.cuda.Event] = {}  # prefetched blocks: copy not yet waited for
        self.bytes_copied = 0

    # -------------------------------------------------------------------- state

    def on_device(self, index: int) -> bool:
        return index in self._on_device

    def host_blocks(self) -> list[int]:
        return [i for i in range(len(self.blocks)) if i not in self._on_device]

    # -------------------------------------------------------------------- moves

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        return _host_copy(tensor, self.pin, non_blocking=False)

    def offload(self, index: int) -> None:
        """Copy block ``index``'s current tensors to the host and point the block at them."""
        block = self.blocks[index]
        _drop_device_caches(block)
        self._pending.pop(index, None)
        copies: dict[tuple, torch.Tensor] = {}  # a tensor shared by several modules is copied once
        slots = []
        for module in block.modules():
            for is_param, table in ((True, module._parameters), (False, module._buffers)):
                for name, value in table.items():
                    if value is None:
                        continue
                    tensor = value.data if is_param else value
                    key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
                    host = copies.get(key) if tensor.numel() else None
                    if host is None:
                        host = copies[key] = self._to_host(tensor)
                    slots.append(_Slot(module, is_param, name, host))
        for slot in slots:
            slot.point_to(slot.host)
        self._slots[index] = slots
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
                    device_copy = copies[id(slot.host)] = slot.host.to(self.device, non_blocking=self.pin)
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
        _drop_device_caches(self.blocks[index])
        for slot in self._slots[index]:
            slot.point_to(slot.host)
        self._on_device.discard(index)

    def offload_all(self) -> None:
        for index in range(len(self.blocks)):
            if index in self._on_device:
                self.offload(index)

    def load_all(self) -> None:
        for index in range(len(self.blocks)):
            self.load(index)
            self._wait(index)
        self._slots.clear()  # back on the device for good: the host copies go

    # -------------------------------------------------------------------- streaming

    @contextmanager
    def streaming(self, resident: int):
        """Blocks ``0 .. resident - 1`` on the device, the others loaded around their forward (see the module
        docstring); on exit the streamed blocks are all back on the host."""
        resident = max(0, min(resident, len(self.blocks)))
        for index in range(resident):
            self.load(index)
            self._wait(index)
        streamed = list(range(resident, len(self.blocks)))
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

        for index in streamed:
            handles.append(self.blocks[index].register_forward_pre_hook(before(index)))
            handles.append(self.blocks[index].register_forward_hook(after(index)))
        logger.info("streaming %d of %d blocks from host memory (%d resident on %s)", len(streamed),
                    len(self.blocks), resident, self.device)
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
