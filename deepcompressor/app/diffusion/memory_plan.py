"""What the calibration apps keep on the GPU (``memory.*``): the decision to offload, and how much stays resident.

The estimates are deliberately simple sums over the architecture's shapes (documented next to each one), checked
against measured peaks by ``python -m deepcompressor.bench.ptq``:

- a generation holds the non-block parameters, the resident blocks, the KV cache of every stored scale (bf16,
  both CFG rows), the last scale's attention over the whole cache and its activations (``generation_work_bytes``);
- calibration holds the non-block parameters, one block (its float and fake-quantized layers at once), the
  captured block inputs and outputs when they are kept on the GPU, and the searches' buffers, which
  ``quant.max_tokens`` bounds (``search_bytes``).

``EncodedPrompts`` holds the text features of every prompt a run generates, so the text encoder can be freed
before the first generation.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from ...nn.offload import BlockOffloader, module_device_bytes

__all__ = [
    "EncodedPrompts",
    "MemoryPlan",
    "OffloadSession",
    "device_budget_bytes",
    "generation_work_bytes",
    "plan_memory",
    "resident_blocks_within",
    "search_bytes",
]

logger = logging.getLogger(__name__)

GiB = 2**30
# Kept free inside the budget: the CUDA context is outside the allocator's count, but fragmentation and the
# caching allocator's rounding are not.
_MARGIN_BYTES = GiB


def device_budget_bytes(memory_cfg, device: torch.device) -> int:
    """``memory.gpu_budget_gib`` in bytes, or the device's total memory when it is 0 (host RAM on the CPU)."""
    if memory_cfg.gpu_budget_gib > 0:
        return int(memory_cfg.gpu_budget_gib * GiB)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def generation_work_bytes(arch, schedule, rows: int = 2, dtype_bytes: int = 2) -> int:
    """KV cache and activations of one generation with ``rows`` rows (2 with CFG) at ``schedule``.

    Cache: every scale but the last is stored (K and V, ``dtype_bytes`` each). At the last scale each layer's
    attention reads the cache and the current keys together (a transient copy of one layer's K and V), and the
    largest activations are the float32 residual stream, the bf16 QKV and the FFN's hidden layer before and after
    its GELU (counted with 2x for the temporaries around them).
    """
    sizes = [int(t) * int(h) * int(w) for t, h, w in schedule]
    cached, last = sum(sizes[:-1]), sizes[-1]
    width, hidden = arch.embed_dim, arch.mlp_hidden
    cache = arch.depth * cached * rows * width * 2 * dtype_bytes
    attention = (cached + last) * rows * width * 2 * dtype_bytes
    activations = 2 * rows * last * (4 * width * 4 + 3 * width * dtype_bytes + 2 * hidden * dtype_bytes)
    return cache + attention + activations


def search_bytes(arch, max_tokens: int) -> int:
    """Buffers of one layer's calibration: its float32 inputs, reference and candidate outputs and a few weight
    copies at the widest layer (``ffn.fc1``/``fc2``: ``embed_dim`` x ``mlp_hidden``)."""
    widest = max(arch.embed_dim, arch.mlp_hidden)
    return 4 * (6 * max_tokens * widest + 6 * arch.embed_dim * arch.mlp_hidden)


def resident_blocks_within(budget: int, fixed: int, block_bytes: int, depth: int, streamed_buffers: int = 2) -> int:
    """How many blocks fit next to ``fixed`` bytes, leaving room for ``streamed_buffers`` blocks in flight."""
    room = budget - _MARGIN_BYTES - fixed
    if room >= depth * block_bytes:
        return depth
    return max(0, min(depth, room // block_bytes - streamed_buffers))


@dataclass(frozen=True)
class MemoryPlan:
    """The decisions of one run (logged, and recorded by the benchmark).

    Attributes:
        offload: Whether blocks live in host memory.
        budget_bytes: The GPU memory the plan fits in.
        resident_blocks: Full-precision blocks kept on the GPU during the generations.
        activations_on_device: Whether the captured block inputs and outputs stay on the GPU during calibration.
        estimates: The byte estimates behind the decisions.
        reason: Why offloading is on or off.
    """

    offload: bool
    budget_bytes: int
    resident_blocks: int
    activations_on_device: bool
    estimates: dict[str, int] = field(default_factory=dict)
    reason: str = ""

    def describe(self, depth: int) -> str:
        if not self.offload:
            return f"memory: everything on the device ({self.reason})"
        where = "the GPU" if self.activations_on_device else "pinned host memory"
        return (f"memory: offloading ({self.reason}): {depth - self.resident_blocks} of {depth} blocks streamed from "
                f"host memory during generations, one block at a time on the GPU while calibrating, captured "
                f"activations in {where}; text encoder and VAE freed once the prompts are encoded; budget "
                f"{self.budget_bytes / GiB:.1f} GiB")

    def as_dict(self) -> dict:
        return {"offload": self.offload, "budget_GiB": self.budget_bytes / GiB, "resident_blocks": self.resident_blocks,
                "activations_on_device": self.activations_on_device, "reason": self.reason,
                "estimates_GiB": {k: v / GiB for k, v in self.estimates.items()}}


def plan_memory(memory_cfg, model, schedule, *, text_bytes: int, capture_bytes: int, max_tokens: int,
                device: torch.device) -> MemoryPlan:
    """Decide ``memory.offload`` (``auto``), the resident blocks and where the captured activations live.

    ``text_bytes``: the text encoder and VAE (freed when offloading); ``capture_bytes``: the captured block inputs
    of every calibration sample (calibration holds them and the block outputs).
    """
    blocks = model.blocks()
    depth = len(blocks)
    block_bytes = max(module_device_bytes(b) for b in blocks)
    all_blocks = sum(module_device_bytes(b) for b in blocks)
    nonblock = module_device_bytes(model) - all_blocks
    work = generation_work_bytes(model.arch, schedule)
    budget = device_budget_bytes(memory_cfg, device)
    estimates = {"blocks": all_blocks, "block": block_bytes, "nonblock": nonblock, "generation_work": work,
                 "text_encoder_and_vae": text_bytes, "captures": capture_bytes,
                 "search": search_bytes(model.arch, max_tokens)}
    resident_need = nonblock + all_blocks + work + text_bytes + _MARGIN_BYTES
    estimates["resident_generation"] = resident_need
    if memory_cfg.offload == "off":
        return MemoryPlan(False, budget, depth, True, estimates, "memory.offload is off")
    if memory_cfg.offload == "auto" and resident_need <= budget:
        return MemoryPlan(False, budget, depth, True, estimates,
                          f"the model generates in {resident_need / GiB:.1f} of {budget / GiB:.1f} GiB")
    reason = ("memory.offload is on" if memory_cfg.offload == "on" else
              f"generating needs ~{resident_need / GiB:.1f} GiB, the budget is {budget / GiB:.1f} GiB")
    if memory_cfg.resident_blocks >= 0:
        resident = min(memory_cfg.resident_blocks, depth)
    else:
        resident = resident_blocks_within(budget, nonblock + work, block_bytes, depth)
    calibration_need = nonblock + 2 * block_bytes + 2 * capture_bytes + estimates["search"] + _MARGIN_BYTES
    estimates["calibration_on_device"] = calibration_need
    return MemoryPlan(True, budget, resident, calibration_need <= budget, estimates, reason)


def module_bytes(module) -> int:
    """Parameter and buffer bytes of a module (0 for None or objects without tensors)."""
    if module is None:
        return 0
    model = getattr(module, "model", module)
    if not isinstance(model, torch.nn.Module):
        return 0
    return module_device_bytes(model)


class EncodedPrompts:
    """The text features of a fixed list of prompts, each encoded alone (as the generations encode it), so that
    the text encoder can be freed before the generations; ``encode`` answers for those prompts only."""

    def __init__(self, encoder, captions: Sequence[str]) -> None:
        self._batches = {}
        for caption in dict.fromkeys(captions):
            self._batches[caption] = encoder.encode([caption])
        self.out_dim = encoder.out_dim
        self.max_length = encoder.max_length

    def encode(self, prompts: Sequence[str]):
        if len(prompts) != 1 or prompts[0] not in self._batches:
            raise KeyError(f"EncodedPrompts holds single prompts encoded ahead of time; {list(prompts)!r} is not one")
        return self._batches[prompts[0]]


def free_cuda_cache(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class OffloadSession:
    """A ``MemoryPlan`` applied to a pipeline for the length of one run.

    With offloading: the prompts are encoded up front (``text_encoder`` answers for them), the text encoder and
    VAE are freed (for a pipeline the caller keeps, ``owned=False``, they are parked in host memory and put back
    by ``restore``), every block goes to host memory, ``generating()`` streams blocks and ``block_on_device(i)``
    holds block ``i`` on the GPU while it is calibrated. Without offloading every method is a no-op.
    """

    def __init__(self, plan: MemoryPlan, pipe, *, owned: bool, captions: Sequence[str],
                 resident_blocks: int = -1) -> None:
        self.plan = plan
        self.resident_override = resident_blocks if resident_blocks >= 0 else None
        self.pipe = pipe
        self.owned = owned
        self.model = pipe.transformer
        self.device = self.model.device
        self.text_encoder = pipe.text_encoder
        self.offloader: BlockOffloader | None = None
        self._parked: list = []
        if not plan.offload:
            return
        self.text_encoder = EncodedPrompts(pipe.text_encoder, captions)
        if owned:
            pipe.text_encoder = None
            pipe.vae = None
        else:
            for part in (pipe.text_encoder, pipe.vae):
                if isinstance(getattr(part, "model", part), torch.nn.Module):
                    part.to("cpu")
                    self._parked.append(part)
        self.offloader = BlockOffloader(self.model.blocks(), self.device)
        self.offloader.offload_all()
        free_cuda_cache(self.device)

    def generating(self, resident: int | None = None):
        """Context of a generation phase: the first ``resident`` blocks (default: the plan's) on the device, the
        others streamed."""
        if self.offloader is None:
            return nullcontext()
        return self._generating(self.plan.resident_blocks if resident is None else resident)

    @contextmanager
    def _generating(self, resident: int):
        try:
            with self.offloader.streaming(resident):
                yield
        finally:
            for index in range(len(self.offloader.blocks)):
                self.offloader.release(index)
            free_cuda_cache(self.device)

    @contextmanager
    def block_on_device(self, index: int, *, changes: bool = True):
        """Block ``index`` on the device inside the context; back to host memory after it (copied again when the
        context ``changes`` it)."""
        if self.offloader is None:
            yield
            return
        self.offloader.load(index)
        try:
            yield
        finally:
            if changes:
                self.offloader.offload(index)
            else:
                self.offloader.release(index)

    def resident_for_current_blocks(self) -> int:
        """Blocks that fit during a generation with the blocks as they are now (e.g. fake-quantized ones)."""
        if self.offloader is None:
            return len(self.model.blocks())
        if self.resident_override is not None:
            return min(self.resident_override, len(self.model.blocks()))
        blocks = self.model.blocks()
        block_bytes = max(module_device_bytes(b) for b in blocks)
        nonblock = self.plan.estimates["nonblock"]
        return resident_blocks_within(self.plan.budget_bytes, nonblock + self.plan.estimates["generation_work"],
                                      block_bytes, len(blocks))

    def restore(self) -> None:
        """Blocks back on the device, parked parts back (a caller's pipeline leaves the run as it came, quantized)."""
        if self.offloader is None or self.owned:
            return
        self.offloader.load_all()
        for part in self._parked:
            part.to(self.device)
        self._parked.clear()
