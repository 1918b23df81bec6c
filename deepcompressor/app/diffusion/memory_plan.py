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

from ...nn.offload import BlockOffloader, drop_device_caches, module_device_bytes

__all__ = [
    "EncodedPrompts",
    "MemoryPlan",
    "OffloadSession",
    "device_budget_bytes",
    "generation_work_bytes",
    "plan_memory",
    "prefer_expandable_segments",
    "resident_blocks_within",
    "search_bytes",
]

logger = logging.getLogger(__name__)

GiB = 2**30
# Kept free inside the budget: the CUDA context is outside the allocator's count, but fragmentation and the
# caching allocator's rounding are not.
_MARGIN_BYTES = GiB


def prefer_expandable_segments(memory_cfg) -> None:
    """Ask torch's CUDA allocator for expandable segments when offloading may happen (unless the user chose a
    setting): streamed blocks of many sizes fragment fixed segments (Infinity-8B with a 22 GiB budget reserved
    27 GiB for 19.5 GiB allocated). It must be set before the first CUDA allocation."""
    import os

    if memory_cfg.offload != "off" and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and not torch.cuda.is_initialized():
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def device_budget_bytes(memory_cfg, device: torch.device) -> int:
    """``memory.gpu_budget_gib`` in bytes, or the device's total memory when it is 0 (host RAM on the CPU)."""
    if memory_cfg.gpu_budget_gib > 0:
        return int(memory_cfg.gpu_budget_gib * GiB)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def generation_work_bytes(arch, schedule, rows: int = 2, dtype_bytes: int = 2, fake_quant: bool = False) -> int:
    """KV cache and activations of one generation with ``rows`` rows (2 with CFG) at ``schedule``.

    Cache: every scale but the last is stored (K and V, ``dtype_bytes`` each). At the last scale each layer's
    attention reads the cache and the current keys together (a transient copy of one layer's K and V), and the
    largest activations are the float32 residual stream, the bf16 QKV and the FFN's hidden layer before and after
    its GELU (Infinity-8B on an H200: 7.85 GiB measured, 8.2 GiB estimated). Fake-quantized layers
    (``fake_quant``) quantize their inputs through float32 temporaries: six copies of the FFN's hidden layer.
    """
    sizes = [int(t) * int(h) * int(w) for t, h, w in schedule]
    cached, last = sum(sizes[:-1]), sizes[-1]
    width, hidden = arch.embed_dim, arch.mlp_hidden
    cache = arch.depth * cached * rows * width * 2 * dtype_bytes
    attention = (cached + last) * rows * width * 2 * dtype_bytes
    activations = rows * last * (4 * width * 4 + 3 * width * dtype_bytes + 2 * hidden * dtype_bytes)
    if fake_quant:
        activations += 6 * rows * last * hidden * 4
    return cache + attention + activations


def has_fake_quant_inputs(model) -> bool:
    return any(getattr(m, "quant_inputs", False) for m in model.modules())


def search_bytes(arch, max_tokens: int) -> int:
    """Buffers of one layer's calibration: its float32 inputs, reference and candidate outputs and a few weight
    copies at the widest layer (``ffn.fc1``/``fc2``: ``embed_dim`` x ``mlp_hidden``)."""
    widest = max(arch.embed_dim, arch.mlp_hidden)
    return 4 * (6 * max_tokens * widest + 6 * arch.embed_dim * arch.mlp_hidden)


def margin_bytes(budget: int) -> int:
    """Kept free inside the budget (fragmentation, the caching allocator's rounding): 1 GiB, or 5% of a small
    budget."""
    return min(GiB, budget // 20)


def resident_blocks_within(budget: int, fixed: int, block_bytes: int, depth: int, streamed_buffers: int = 2) -> int:
    """How many blocks fit next to ``fixed`` bytes, leaving room for ``streamed_buffers`` blocks in flight."""
    room = budget - margin_bytes(budget) - fixed
    if room >= depth * block_bytes:
        return depth
    return max(0, min(depth, room // max(block_bytes, 1) - streamed_buffers))


@dataclass(frozen=True)
class MemoryPlan:
    """The decisions of one run (logged, and recorded by the benchmark).

    Attributes:
        offload: Whether blocks may live in host memory.
        budget_bytes: The GPU memory the plan fits in.
        resident_blocks: Blocks kept on the GPU during the first generations (the others are streamed).
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
                f"host memory during generations; calibration keeps on the GPU the blocks that fit next to its "
                f"buffers; captured activations in {where}; text encoder and VAE freed once the prompts are "
                f"encoded; budget {self.budget_bytes / GiB:.1f} GiB")

    def as_dict(self) -> dict:
        return {"offload": self.offload, "budget_GiB": self.budget_bytes / GiB, "resident_blocks": self.resident_blocks,
                "activations_on_device": self.activations_on_device, "reason": self.reason,
                "estimates_GiB": {k: v / GiB for k, v in self.estimates.items()}}


def plan_memory(memory_cfg, model, schedule, *, text_bytes: int, capture_bytes: int, max_tokens: int,
                device: torch.device, quantized_later: bool = False) -> MemoryPlan:
    """Decide ``memory.offload`` (``auto``), the resident blocks and where the captured activations live.

    ``text_bytes``: the text encoder and VAE (freed when offloading); ``capture_bytes``: the captured block inputs
    of every calibration sample (calibration holds them and the block outputs); ``quantized_later``: the run
    generates with the fake-quantized model too (PTQ's fidelity pass), whose blocks hold their codes and a 16-bit
    weight cache (about 1.5x the bf16 blocks) and whose layers quantize their inputs through float32 temporaries.
    """
    blocks = model.blocks()
    depth = len(blocks)
    cached = sum(module_device_bytes(b) for b in blocks)  # what the blocks hold when nothing is offloaded
    plain = [module_device_bytes(b, with_cache=False) for b in blocks]
    nonblock = module_device_bytes(model, with_cache=False) - sum(plain)
    work = generation_work_bytes(model.arch, schedule, fake_quant=has_fake_quant_inputs(model))
    budget = device_budget_bytes(memory_cfg, device)
    margin = margin_bytes(budget)
    search = search_bytes(model.arch, max_tokens)
    estimates = {"blocks": cached, "block": max(plain), "nonblock": nonblock, "generation_work": work,
                 "text_encoder_and_vae": text_bytes, "captures": capture_bytes, "search": search}
    resident_need = nonblock + cached + work + text_bytes + margin
    if quantized_later:
        fake_work = generation_work_bytes(model.arch, schedule, fake_quant=True)
        resident_need = max(resident_need, nonblock + int(1.5 * cached) + fake_work + text_bytes + margin)
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
        resident = resident_blocks_within(budget, nonblock + work, max(plain), depth)
    on_device = nonblock + 2 * max(plain) + 2 * capture_bytes + search + margin <= budget
    estimates["calibration_work"] = 2 * max(plain) + search + (2 * capture_bytes if on_device else 0)
    return MemoryPlan(True, budget, resident, on_device, estimates, reason)


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

    With offloading: the prompts are encoded up front (``text_encoder`` answers for them) and the text encoder and
    VAE are freed (for a pipeline the caller keeps, ``owned=False``, they are parked in host memory and put back
    by ``restore``). Blocks stay on the GPU while the budget has room for them next to what the current phase
    needs, and live in (pinned) host memory otherwise: ``generating()`` streams the host blocks through the
    forward, ``calibrating()`` makes room for the calibration buffers, and ``block_on_device(i)`` holds block
    ``i`` on the GPU while it is calibrated (and keeps it there afterwards when it fits). Without offloading every
    method is a no-op.
    """

    def __init__(self, plan: MemoryPlan, pipe, *, owned: bool, captions: Sequence[str], schedule=None,
                 resident_blocks: int = -1) -> None:
        self.plan = plan
        self.schedule = schedule
        self.resident_override = resident_blocks if resident_blocks >= 0 else None
        self.pipe = pipe
        self.owned = owned
        self.model = pipe.transformer
        self.device = self.model.device
        self.text_encoder = pipe.text_encoder
        self.offloader: BlockOffloader | None = None
        self._parked: list = []
        self._budget = plan.budget_bytes - margin_bytes(plan.budget_bytes)
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
        self.offloader.offload_many(range(plan.resident_blocks, len(self.offloader.blocks)))
        free_cuda_cache(self.device)

    # -------------------------------------------------------------------- accounting

    def _device_block_bytes(self) -> int:
        return sum(module_device_bytes(b, with_cache=False) for i, b in enumerate(self.offloader.blocks)
                   if self.offloader.on_device(i))

    def _fits(self, need: int) -> bool:
        return self.plan.estimates["nonblock"] + self._device_block_bytes() + need <= self._budget

    def _make_room(self, need: int) -> None:
        """Offload blocks, the last ones first, until ``need`` bytes fit next to the blocks on the device."""
        blocks = self.offloader.blocks
        excess = self.plan.estimates["nonblock"] + self._device_block_bytes() + need - self._budget
        chosen = []
        for index in reversed(range(len(blocks))):
            if excess <= 0:
                break
            if self.offloader.on_device(index):
                chosen.append(index)
                excess -= module_device_bytes(blocks[index], with_cache=False)
        self.offloader.offload_many(chosen)
        free_cuda_cache(self.device)

    # -------------------------------------------------------------------- phases

    def generating(self):
        """Context of a generation: the blocks that fit stay on the device, the others are streamed; the blocks'
        caches (fake-quantized weights) are dropped after each forward."""
        if self.offloader is None:
            return nullcontext()
        return self._generating()

    @contextmanager
    def _generating(self):
        blocks = self.offloader.blocks
        streamed_room = 2 * max(module_device_bytes(b, with_cache=False) for b in blocks)
        cache_room = max(module_device_bytes(b) - module_device_bytes(b, with_cache=False) for b in blocks)
        work = self.plan.estimates["generation_work"]
        if self.schedule is not None:
            work = generation_work_bytes(self.model.arch, self.schedule, fake_quant=has_fake_quant_inputs(self.model))
        need = work + streamed_room + cache_room
        if self.resident_override is not None:
            resident = set(range(min(self.resident_override, len(blocks))))
        else:
            self._make_room(need)
            for index in range(len(blocks)):  # room left: more blocks resident, the first ones first
                if not self.offloader.on_device(index) and self._fits(need + module_device_bytes(
                        blocks[index], with_cache=False)):
                    self.offloader.load(index)
            resident = {i for i in range(len(blocks)) if self.offloader.on_device(i)}
        try:
            with self.offloader.streaming(sorted(resident), drop_caches=True):
                yield
        finally:
            free_cuda_cache(self.device)

    def calibrating(self) -> None:
        """Before calibration: offload the blocks the calibration buffers need the room of."""
        if self.offloader is not None:
            if self.resident_override is not None:
                self.offloader.offload_many(range(len(self.offloader.blocks)))
            self._make_room(self.plan.estimates["calibration_work"])

    @contextmanager
    def block_on_device(self, index: int, *, changes: bool = True):
        """Block ``index`` on the device inside the context. A block it ``changes`` stays on the device after it
        when it fits next to the calibration buffers (its host copy is dropped), and is copied to the host again
        otherwise; an unchanged block goes back to where it was."""
        if self.offloader is None:
            yield
            return
        was_on_device = self.offloader.on_device(index)
        self.offloader.load(index)
        try:
            yield
        finally:
            drop_device_caches(self.offloader.blocks[index])
            if not changes:
                if not was_on_device:
                    self.offloader.release(index)
            elif self.resident_override is None and self._fits(self.plan.estimates["calibration_work"]):
                self.offloader.keep(index)
            else:
                self.offloader.offload(index)

    def restore(self) -> None:
        """Blocks back on the device, parked parts back (a caller's pipeline leaves the run as it came, quantized)."""
        if self.offloader is None:
            return
        if self.owned:
            self.offloader.close()
            return
        self.offloader.load_all()
        for part in self._parked:
            part.to(self.device)
        self._parked.clear()
