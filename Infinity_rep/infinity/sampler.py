"""KV-cached multi-scale sampler with classifier-free guidance on the logits (ARCHITECTURE.md §5).

For each scale: run the blocks on the scale's tokens (attending to the cached earlier scales), compute the bit
logits, divide by tau, mix the conditional and unconditional halves with the guidance scale, filter top-k/top-p
per bit, draw all bits of the scale with one ``torch.multinomial`` call on a dedicated generator, turn them into
codes, accumulate them at the final VAE grid and derive the next scale's input from the accumulated map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .codes import accumulate_scale, bits_to_code_map, token_bits_to_vae_bits, vae_scale_schedule
from .model import Infinity
from .rope import rope_table
from .schedules import scale_starts, tokens_per_scale

__all__ = ["SampleResult", "filter_top_k_top_p_", "per_scale", "sample", "sample_bits"]


@dataclass
class SampleResult:
    """Output of one generation.

    ``summed_codes [B, d, H, W]`` is the VAE decoder input; ``bits[k] [B, H_k, W_k, d]`` the sampled bits of scale k
    at its VAE grid; ``logits[k] [bs, h_k w_k, V]`` the raw head outputs of all CFG rows (if requested);
    ``next_inputs[k-1] [B, h_k w_k, d_vae]`` the word-embedding input of scale k (k >= 1).
    """

    summed_codes: torch.Tensor
    bits: list[torch.Tensor]
    logits: list[torch.Tensor] = field(default_factory=list)
    next_inputs: list[torch.Tensor] = field(default_factory=list)
    kv_cache_bytes: int = 0


def per_scale(value: float | Sequence[float], num_scales: int, name: str) -> list[float]:
    """A constant or a per-scale list -> a list of ``num_scales`` floats."""
    if isinstance(value, (int, float)):
        return [float(value)] * num_scales
    values = [float(v) for v in value]
    if len(values) != num_scales:
        raise ValueError(f"{name} has {len(values)} entries for a schedule of {num_scales} scales")
    return values


def filter_top_k_top_p_(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """In place: set to -inf the logits (last axis = the classes) outside the top-k and outside the top-p nucleus.

    Top-k keeps the logits >= the k-th largest (ties are kept). Top-p sorts ascending, removes the classes whose
    cumulative probability is <= 1 - top_p, and always keeps the most likely class.
    """
    num_classes = logits.shape[-1]
    if top_k > 0:
        kth_largest = logits.topk(min(top_k, num_classes), dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth_largest, float("-inf"))
    if top_p > 0:
        ascending, order = logits.sort(dim=-1, descending=False)
        drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1] = False
        logits.masked_fill_(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def sample_bits(logits: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """CFG-mixed logits ``[B, L, 2 d]`` -> bits ``[B, L, d]`` (int64), one multinomial draw for the whole tensor."""
    batch, length, width = logits.shape
    pairs = filter_top_k_top_p_(logits.reshape(batch, length * width // 2, 2), top_k, top_p)
    probs = pairs.softmax(dim=-1)
    drawn = torch.multinomial(probs.view(-1, 2), num_samples=1, replacement=True, generator=generator)
    return drawn.view(batch, length, width // 2)


@torch.no_grad()
def sample(
    model: Infinity,
    kv_compact: torch.Tensor,
    lens: list[int],
    scale_schedule,
    *,
    cfg: float | Sequence[float] = 3.0,
    tau: float | Sequence[float] = 1.0,
    top_k: int = 900,
    top_p: float = 0.97,
    seed: int | None = None,
    h_div_w: float | None = None,
    return_logits: bool = False,
    on_scale: Callable[[int, torch.Tensor], None] | None = None,
) -> SampleResult:
    """Generate the bits of every scale for ``B = len(lens)`` prompts.

    ``kv_compact [N, Ct5]`` are the packed text features of the prompts (``lens[b]`` rows each). The unconditional
    rows of the CFG batch come from the model's learned ``cfg_uncond``. ``seed`` seeds a dedicated generator on the
    model's device (None: the global RNG). ``on_scale(si, x)`` is called with the final hidden state of each scale.
    """
    arch = model.arch
    num_scales = len(scale_schedule)
    cfg_list = per_scale(cfg, num_scales, "cfg")
    tau_list = per_scale(tau, num_scales, "tau")
    batch = len(lens)
    use_cfg = any(c != 1.0 for c in cfg_list)
    device = model.device

    kv_compact = kv_compact.to(device, torch.float32)
    if use_cfg:
        kv_compact = torch.cat((kv_compact, model.uncond_text(lens).float()))
        lens = list(lens) + list(lens)
    text = model.encode_text(kv_compact, lens)
    context = text.context
    context.memo = {}

    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))

    sizes = tokens_per_scale(scale_schedule)
    starts = scale_starts(scale_schedule)
    cos, sin = rope_table(arch.head_dim, scale_schedule, h_div_w, device)
    vae_grids = vae_scale_schedule(scale_schedule, arch.patchify)
    blocks = model.blocks()
    cache = model.kv_cache_factory(model)
    if hasattr(cache, "reserve"):
        cache.reserve(sum(sizes[:-1]))

    result = SampleResult(summed_codes=None, bits=[])
    summed = None
    x = model.sos(text.cond)
    try:
        for si, (_, h, w) in enumerate(scale_schedule):
            last = si == num_scales - 1
            x = x + model.lvl_embed.weight[si]
            rope = (cos[starts[si] : starts[si] + sizes[si]], sin[starts[si] : starts[si] + sizes[si]])
            for block, layer_cache in zip(blocks, cache.layers):
                x = block(x, text.gss, context, rope, layer_cache, not last)
            if on_scale is not None:
                on_scale(si, x)
            logits = model.logits(x, text.cond)
            if return_logits:
                result.logits.append(logits)
            mixed = logits.mul(1.0 / tau_list[si])
            if use_cfg:
                mixed = (
                    mixed[:batch]
                    if cfg_list[si] == 1.0
                    else cfg_list[si] * mixed[:batch] + (1 - cfg_list[si]) * mixed[batch:]
                )
            bits = sample_bits(mixed, top_k, top_p, generator).view(batch, h, w, arch.d_vae)
            vae_bits = token_bits_to_vae_bits(bits, arch.patchify)
            result.bits.append(vae_bits)
            summed, next_input = accumulate_scale(summed, bits_to_code_map(vae_bits), si, vae_grids, arch.patchify)
            if next_input is not None:
                result.next_inputs.append(next_input)
                x = model.word_embed(next_input)
                if use_cfg:
                    x = torch.cat((x, x))
        result.kv_cache_bytes = cache.nbytes()
    finally:
        cache.reset()
        context.memo = None
    result.summed_codes = summed
    return result
