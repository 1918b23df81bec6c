"""KV-cached multi-scale sampler with classifier-free guidance on the logits (docs/infinity_architecture.md §5).

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
from .model import Infinity, TextConditioning, TextContext
from .rope import rope_table
from .schedules import scale_starts, tokens_per_scale

__all__ = [
    "CudaGraphStepper",
    "SampleResult",
    "ScaleStepper",
    "cuda_graph_stepper",
    "filter_top_k_top_p_",
    "per_scale",
    "sample",
    "sample_bits",
]


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


class ScaleStepper:
    """Runs one scale of the transformer: the scale's input tokens -> (final hidden state, raw logits of all rows).

    Scale 0's input is the SOS token; scale ``si > 0`` embeds ``next_input [B, h w, d_vae]`` (repeated to both CFG
    halves). The KV cache keeps every scale but the last.
    """

    def __init__(self, model: Infinity, text: TextConditioning, cache, scale_schedule, h_div_w, cfg_rows: bool):
        self.model, self.text, self.cache, self.cfg_rows = model, text, cache, cfg_rows
        self.blocks = model.blocks()
        self.sizes = tokens_per_scale(scale_schedule)
        self.starts = scale_starts(scale_schedule)
        self.cos, self.sin = rope_table(model.arch.head_dim, scale_schedule, h_div_w, model.device)

    def __call__(self, si: int, next_input: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        model, text = self.model, self.text
        if si == 0:
            x = model.sos(text.cond)
        else:
            # Contiguous so that eager runs and graph replays (which copy into a static buffer) share GEMM kernels.
            x = model.word_embed(next_input.contiguous())
            if self.cfg_rows:
                x = torch.cat((x, x))
        x = x + model.lvl_embed.weight[si]
        span = slice(self.starts[si], self.starts[si] + self.sizes[si])
        rope = (self.cos[span], self.sin[span])
        store = si < len(self.sizes) - 1
        for block, layer_cache in zip(self.blocks, self.cache.layers):
            x = block(x, text.gss, text.context, rope, layer_cache, store)
        return x, model.logits(x, text.cond)


class CudaGraphStepper:
    """The scales of one (schedule, text lengths, CFG) configuration captured as CUDA graphs, one per scale.
    Without ``keep_hidden`` a replay returns ``(None, logits)``: the final hidden states are not kept.

    Static inputs (pooled condition, AdaLN modulation, text memory, next-scale inputs) are copied in before the
    replays; the KV cache, the per-generation block constants and the text keys/values live in the graphs' memory
    and are recomputed by the replays. Requires a KV cache whose layers can ``rewind`` (keep their buffers).
    """

    def __init__(
        self,
        model: Infinity,
        lens: list[int],
        scale_schedule,
        h_div_w,
        cfg_rows: bool,
        batch: int,
        reserve_last: bool = False,
        keep_hidden: bool = True,
    ):
        device, arch = model.device, model.arch
        sizes = tokens_per_scale(scale_schedule)
        self.cond = torch.zeros(len(lens), arch.embed_dim, device=device)
        self.gss = torch.zeros(len(lens), 1, 6, arch.embed_dim, device=device)
        context = TextContext.build(torch.zeros(sum(lens), arch.embed_dim, device=device), lens)
        context.memo = {}
        self.text = TextConditioning(self.cond, self.gss, context)
        self.next_inputs = [None] + [torch.zeros(batch, n, arch.d_vae, device=device) for n in sizes[1:]]
        self.cache = model.kv_cache_factory(model)
        if not all(hasattr(layer, "rewind") for layer in self.cache.layers):
            raise TypeError("CUDA graphs need KV cache layers with rewind(); this cache factory has none")
        if hasattr(self.cache, "reserve"):
            self.cache.reserve(sum(sizes) if reserve_last else sum(sizes[:-1]))
        self.eager = ScaleStepper(model, self.text, self.cache, scale_schedule, h_div_w, cfg_rows)
        # Warm-up outside capture: allocates the cache, initialises library handles, compiles fused kernels.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for si in range(len(sizes)):
                self.eager(si, self.next_inputs[si])
        torch.cuda.current_stream(device).wait_stream(stream)
        self._rewind()
        pool = torch.cuda.graph_pool_handle()
        self.graphs, self.outputs = [], []
        for si in range(len(sizes)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden, logits = self.eager(si, self.next_inputs[si])
                if not keep_hidden:
                    # Freed inside the capture, the final hidden state's memory serves the next scales' graphs
                    # (a float32 [rows, tokens, C] per scale: 0.16 GiB at 2B, 0.28 GiB at 8B over a generation).
                    hidden = None
            self.graphs.append(graph)
            self.outputs.append((hidden, logits))
        self.kv_cache_bytes = self.cache.nbytes()

    def _rewind(self) -> None:
        for layer in self.cache.layers:
            layer.rewind()
        self.text.context.memo.clear()

    def load(self, text: TextConditioning) -> None:
        self.cond.copy_(text.cond)
        self.gss.copy_(text.gss)
        self.text.context.ca_kv.copy_(text.context.ca_kv)

    def __call__(self, si: int, next_input: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if si > 0:
            self.next_inputs[si].copy_(next_input)
        self.graphs[si].replay()
        return self.outputs[si]


def _graph_key(model: Infinity, lens, scale_schedule, h_div_w, cfg_rows: bool) -> tuple:
    # Any swapped module or re-materialised tensor changes the key, so stale graphs are never replayed.
    tensors = tuple(t.data_ptr() for t in model.state_dict(keep_vars=True).values())
    modules = tuple(id(m) for m in model.modules())
    schedule = tuple(tuple(int(v) for v in s) for s in scale_schedule)
    return (schedule, h_div_w, tuple(lens), cfg_rows, id(model.kv_cache_factory), tensors, modules)


def cuda_graph_stepper(
    model: Infinity, lens, scale_schedule, h_div_w, cfg_rows: bool, batch: int, reserve_last: bool = False,
    keep_hidden: bool = True,
):
    """The cached graphs of this configuration (captured on first use; one configuration is kept per model)."""
    key = (_graph_key(model, lens, scale_schedule, h_div_w, cfg_rows), reserve_last, keep_hidden)
    cached = getattr(model, "_cuda_graph_stepper", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    model._cuda_graph_stepper = None
    stepper = CudaGraphStepper(model, lens, scale_schedule, h_div_w, cfg_rows, batch, reserve_last, keep_hidden)
    model._cuda_graph_stepper = (key, stepper)
    return stepper


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
    cuda_graphs: bool = False,
    kv_reserve_last: bool = False,
) -> SampleResult:
    """Generate the bits of every scale for ``B = len(lens)`` prompts.

    ``kv_compact [N, Ct5]`` are the packed text features of the prompts (``lens[b]`` rows each). The unconditional
    rows of the CFG batch come from the model's learned ``cfg_uncond``. ``seed`` seeds a dedicated generator on the
    model's device (None: the global RNG). ``on_scale(si, x)`` is called with the final hidden state of each scale.
    ``cuda_graphs`` (CUDA only) replays per-scale CUDA graphs captured on the first call of a configuration.
    ``kv_reserve_last`` preallocates KV-cache room for the last scale too (more memory, no concatenation).
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

    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))

    vae_grids = vae_scale_schedule(scale_schedule, arch.patchify)
    graphed = cuda_graphs and device.type == "cuda"
    if graphed:
        step = cuda_graph_stepper(model, lens, scale_schedule, h_div_w, use_cfg, batch, kv_reserve_last,
                                  keep_hidden=on_scale is not None)
        step.load(text)
        cache = None
    else:
        cache = model.kv_cache_factory(model)
        if hasattr(cache, "reserve"):
            sizes = tokens_per_scale(scale_schedule)
            cache.reserve(sum(sizes) if kv_reserve_last else sum(sizes[:-1]))
        text.context.memo = {}
        step = ScaleStepper(model, text, cache, scale_schedule, h_div_w, use_cfg)

    result = SampleResult(summed_codes=None, bits=[])
    summed, next_input = None, None
    try:
        for si, (_, h, w) in enumerate(scale_schedule):
            x, logits = step(si, next_input)
            if on_scale is not None:
                on_scale(si, x)
            if return_logits:
                result.logits.append(logits.clone() if graphed else logits)
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
        result.kv_cache_bytes = step.kv_cache_bytes if graphed else cache.nbytes()
    finally:
        if cache is not None:
            cache.reset()
        text.context.memo = None
    result.summed_codes = summed
    return result
