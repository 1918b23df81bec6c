"""Quality of KV-cache quantizers: per-channel MSE, clipping and attention-output error on held-out K/V.

Data: the real cached K/V (and queries) of the tiny default Infinity model or of the model of a config chain (five
evenly spaced blocks of a large model), or skewed synthetic K/V shaped like a small model (labelled as such).
Static quantizers are fitted on the K/V of ``num_calibration`` generations (qdiff prompts ``0..n-1``, seeds
``0..n-1``; 12 by default, as ``collect.num_prompts`` of the calibration app) and evaluated on ``num_held_out``
other generations (prompts from ``eval_offset``, seeds ``1234 + i``; 4 by default). Several held-out generations
because the model shifts whole channels from prompt to prompt: one generation's error, divided by that generation's
own (small) channel variance, overstates the gap between calibration and use.

* ``minmax``: asymmetric per channel over [min, max];
* ``symmetric``: symmetric per channel, ``max|x|``;
* ``per_token``: dynamic asymmetric min-max per token and head (K and V);
* ``kivi``: K per channel (min-max), V per token (KIVI's split);
* ``layer_percentile``: one asymmetric range per (block, K/V) at the best grid percentile;
* ``ours``: the MSE-optimal per-channel clipping search (``calib.kv.search_clipping_bounds``).

Metrics, per method and bit width:

* MSE / channel variance, mean over channels, in-sample on the calibration rows (``fit_*``) and on the rows of all
  held-out generations together, each channel's MSE divided by its variance pooled over all of them;
* ``*_outside``: the share of held-out values outside a static quantizer's clipping range [lo, hi] (the smallest
  and largest values it represents; ``None`` for dynamic per-token quantizers, which clip nothing);
* attention error: every (block, scale) self-attention of every held-out generation recomputed in float64 with the
  quantized K/V of all scales so far (the current scale's too, as the cache reads them) against full precision:
  ``sqrt(sum |o_q - o|^2 / sum |o|^2)`` summed over all those calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..calib.kv import (
    fake_quantize_asymmetric,
    fake_quantize_per_token,
    minmax_asymmetric,
    per_group_percentile,
    search_clipping_bounds,
    symmetric_per_channel,
)

__all__ = [
    "METHODS",
    "AttentionCall",
    "KVData",
    "default_eval_blocks",
    "evaluate_methods",
    "held_out_rows",
    "model_kv_data",
    "real_kv_data",
    "synthetic_kv_data",
]

METHODS = ("minmax", "symmetric", "per_token", "kivi", "layer_percentile", "ours")


@dataclass
class AttentionCall:
    """One self-attention of a held-out generation: ``q, k, v [B, H, L, c]`` (float32, CPU)."""

    block: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


@dataclass
class KVData:
    """Calibration rows per (block, K/V) ``[N, H * c]`` and, per held-out generation, its attention calls in call
    order."""

    source: str
    depth: int
    num_heads: int
    head_dim: int
    calibration: dict  # (block, which) -> rows
    held_out: list[list[AttentionCall]]


class _CaptureLayer:
    """Records q, k, v of every attend call of one block, then delegates."""

    def __init__(self, inner, block: int, calls: list) -> None:
        self.inner, self.block, self.calls = inner, block, calls

    def attend(self, q, k, v, *, store: bool):
        self.calls.append(AttentionCall(self.block, q.detach().float().cpu(), k.detach().float().cpu(),
                                        v.detach().float().cpu()))  # fmt: skip
        return self.inner.attend(q, k, v, store=store)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def default_eval_blocks(depth: int) -> list[int]:
    """Every block of a small model, five evenly spaced blocks of a large one (bounds the captured q/k/v)."""
    if depth <= 8:
        return list(range(depth))
    return sorted({round(i * (depth - 1) / 4) for i in range(5)})


def model_kv_data(pipe, generate_kwargs: dict, source: str, num_calibration: int = 12, max_tokens: int = 4096,
                  eval_offset: int = 512, blocks: list[int] | None = None, num_held_out: int = 4,
                  held_out_seed: int = 1234) -> KVData:  # fmt: skip
    """Record a pipeline's cached K/V: calibration prompts 0..n-1 of qdiff (seeds 0..n-1), and q/k/v of every
    self-attention in ``blocks`` of the held-out prompts ``eval_offset + i`` (seeds ``held_out_seed + i``)."""
    from ..app.diffusion.capture import load_prompt_set
    from ..nn.kv_cache import KVRecorder

    if num_calibration < 1 or num_held_out < 1:
        raise ValueError(f"calibration and held-out prompts must be >= 1, got {num_calibration} and {num_held_out}")
    if eval_offset < num_calibration:
        raise ValueError(f"held-out prompts start at {eval_offset}, inside the calibration prompts "
                         f"0..{num_calibration - 1}")  # fmt: skip
    model, arch = pipe.transformer, pipe.arch
    blocks = default_eval_blocks(arch.depth) if blocks is None else blocks
    prompts = [caption for _, caption in load_prompt_set("qdiff", 0, num_calibration)]
    with KVRecorder(model, max_tokens, seed=0) as recorder:
        for i, caption in enumerate(prompts):
            pipe.generate([caption], seed=i, **generate_kwargs)
    calibration = {(blocks.index(b), which): rows for b, which, rows in recorder.blocks() if b in blocks}
    held_out: list[list[AttentionCall]] = []
    inner = model.kv_cache_factory

    def capture_factory(m):
        cache = inner(m)
        cache.layers = [_CaptureLayer(layer, blocks.index(i), held_out[-1]) if i in blocks else layer
                        for i, layer in enumerate(cache.layers)]  # fmt: skip
        return cache

    model.kv_cache_factory = capture_factory
    try:
        for i, (_, caption) in enumerate(load_prompt_set("qdiff", eval_offset, num_held_out)):
            held_out.append([])
            pipe.generate([caption], seed=held_out_seed + i, **generate_kwargs)
    finally:
        model.kv_cache_factory = inner
    label = (f"{source}, real K/V of blocks {blocks}; {num_calibration} calibration prompts, {num_held_out} held-out "
             f"prompts from {eval_offset}")  # fmt: skip
    return KVData(label, len(blocks), arch.num_heads, arch.head_dim, calibration, held_out)


def real_kv_data(num_calibration: int = 12, max_tokens: int = 4096, eval_offset: int = 512, device: str = "cpu",
                 config_files: list[str] | None = None, num_held_out: int = 4) -> KVData:  # fmt: skip
    """The tiny default model, or the model of a config chain (``configs/models/infinity-8b.yaml``: its files,
    resolution and sampling settings)."""
    if not config_files:
        from infinity.pipeline import load_pipeline

        pipe = load_pipeline("tiny", device=device)
        return model_kv_data(pipe, {}, "tiny model", num_calibration, max_tokens, eval_offset,
                             num_held_out=num_held_out)  # fmt: skip
    from infinity.pipeline import pipeline_from_config

    from ..config import load_config

    cfg = load_config(config_files)
    p = cfg.pipeline
    pipe = pipeline_from_config(p)
    kwargs = {"cfg": p.cfg, "tau": p.tau, "top_k": p.top_k, "top_p": p.top_p, "pn": p.pn, "h_div_w": p.h_div_w}
    return model_kv_data(pipe, kwargs, p.name, num_calibration, max_tokens, eval_offset, num_held_out=num_held_out)


def _synthetic_kv(gen, batch, heads, length, dim, k_offset, v_offset, v_spread):
    k = torch.randn(batch, heads, length, dim, generator=gen) + k_offset
    exponential = -torch.log(torch.rand(k.shape, generator=gen).clamp_min(1e-12)) / 2.0
    k = k + 3.0 * exponential * (k_offset > 1.5)  # right-skewed channels
    v = torch.randn(batch, heads, length, dim, generator=gen) * v_spread + v_offset
    outliers = torch.rand(batch, heads, length, dim, generator=gen) < 2e-3
    v = v + outliers * 8.0 * v_spread
    return F.normalize(k, dim=-1), v


def synthetic_kv_data(depth: int = 4, heads: int = 4, dim: int = 64, seed: int = 0, num_held_out: int = 2) -> KVData:
    """Skewed synthetic K/V on the 0.06M schedule (1..16x16 tokens), CFG batch 2; cos-attention queries; every
    held-out generation drawn from the calibration distribution."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 4, 16, 36, 64, 144, 256]
    offsets = []
    for _ in range(depth):
        k_offset = torch.randn(heads, 1, dim, generator=gen) * torch.rand(heads, 1, dim, generator=gen) * 2.5
        v_offset = torch.randn(heads, 1, dim, generator=gen)
        v_spread = 0.2 + torch.rand(heads, 1, dim, generator=gen) ** 3 * 3
        offsets.append((k_offset, v_offset, v_spread))
    calibration = {}
    for block, (ko, vo, vs) in enumerate(offsets):
        k, v = _synthetic_kv(gen, 8, heads, sum(sizes), dim, ko, vo, vs)
        calibration[(block, 0)] = k.permute(0, 2, 1, 3).reshape(-1, heads * dim)
        calibration[(block, 1)] = v.permute(0, 2, 1, 3).reshape(-1, heads * dim)
    held_out = []
    for _ in range(num_held_out):
        calls = []
        for size in sizes:
            for block, (ko, vo, vs) in enumerate(offsets):
                k, v = _synthetic_kv(gen, 2, heads, size, dim, ko, vo, vs)
                q = F.normalize(torch.randn(2, heads, size, dim, generator=gen) + ko, dim=-1) * 20
                calls.append(AttentionCall(block, q, k, v))
        held_out.append(calls)
    label = f"synthetic skewed K/V (no model), {num_held_out} held-out generations"
    return KVData(label, depth, heads, dim, calibration, held_out)


def _static_quantizers(method: str, rows: torch.Tensor, bits: int, num_channels: int):
    if method == "minmax":
        return minmax_asymmetric(rows, bits)
    if method == "symmetric":
        return symmetric_per_channel(rows, bits)
    if method == "layer_percentile":
        return per_group_percentile(rows, bits, group_size=num_channels)
    if method == "ours":
        return search_clipping_bounds(rows, bits)
    raise ValueError(method)


def _fake_quantizer(method: str, which: int, found, bits: int, heads: int, dim: int):
    """x [B, H, L, c] -> fake-quantized x, for one (block, K/V)."""
    dynamic = method == "per_token" or (method == "kivi" and which == 1)
    if dynamic:
        return lambda x: fake_quantize_per_token(x, bits, dim)
    scale = found.scale.view(heads, 1, dim)
    zero = found.zero.view(heads, 1, dim)
    return lambda x: fake_quantize_asymmetric(x, scale, zero, bits)


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    b, h, length, c = x.shape
    return x.permute(0, 2, 1, 3).reshape(b * length, h * c)


def _channel_errors(quantize, rows: torch.Tensor, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel MSE and MSE / variance of ``rows [N, H * c]`` under ``quantize`` (x [1, H, N, c] -> x_hat); the
    variance is the channel's over all of ``rows`` (pooled over every generation they come from)."""
    x = rows.float().view(1, -1, heads, dim).permute(0, 2, 1, 3)
    err = (quantize(x) - x).square().mean(dim=2).reshape(-1)
    return err, err / x.var(dim=2).reshape(-1).clamp_min(1e-12)


def _outside_count(found, rows: torch.Tensor) -> int:
    """How many values of ``rows [N, channels]`` fall outside the per-channel clipping range ``[lo, hi]``."""
    return int(((rows < found.lo) | (rows > found.hi)).sum())


def held_out_rows(data: KVData) -> dict:
    """``(block, K/V) -> [N, H * c]``: the K or V rows of every held-out generation, concatenated."""
    rows = {}
    for which in (0, 1):
        for block in range(data.depth):
            tensors = [(c.k if which == 0 else c.v) for calls in data.held_out for c in calls if c.block == block]
            if not tensors:
                raise ValueError(f"no held-out attention call of block {block} in {data.source}")
            rows[(block, which)] = torch.cat([_token_rows(t) for t in tensors])
    return rows


def evaluate_methods(data: KVData, bits_list=(8, 4), methods=METHODS, device: str | torch.device = "cpu") -> dict:
    """``{method: {bits: metrics}}``: per-channel MSE in-sample on the calibration data (``fit_*``) and on all
    held-out generations (``k_mse``, ``v_mse``; ``*_rel_mse`` = MSE / channel variance pooled over the held-out
    generations; means over channels), the share of held-out values outside the static clipping ranges
    (``k_outside``, ``v_outside``; ``None`` for dynamic quantizers), and the attention error over every
    self-attention of the held-out generations (current scale's K/V quantized as the cache reads them, or in full
    precision), computed on ``device`` (float64 on the CPU, float32 elsewhere)."""
    heads, dim = data.num_heads, data.head_dim
    held_out = held_out_rows(data)
    results = {}
    for method in methods:
        results[method] = {}
        for bits in bits_list:
            quantizers, ranges = {}, {}
            for key, rows in data.calibration.items():
                dynamic = method == "per_token" or (method == "kivi" and key[1] == 1)
                found = None if dynamic else _static_quantizers("minmax" if method == "kivi" else method, rows, bits,
                                                                heads * dim)  # fmt: skip
                quantizers[key] = _fake_quantizer(method, key[1], found, bits, heads, dim)
                ranges[key] = found
            metrics = {}
            for split, source in (("fit", data.calibration), ("held_out", held_out)):
                errors = {0: ([], []), 1: ([], [])}
                for (block, which), rows in source.items():
                    err, rel = _channel_errors(quantizers[(block, which)], rows, heads, dim)
                    errors[which][0].append(err)
                    errors[which][1].append(rel)
                prefix = "" if split == "held_out" else "fit_"
                for which, name in ((0, "k"), (1, "v")):
                    metrics[f"{prefix}{name}_mse"] = torch.cat(errors[which][0]).mean().item()
                    metrics[f"{prefix}{name}_rel_mse"] = torch.cat(errors[which][1]).mean().item()
            for which, name in ((0, "k"), (1, "v")):
                keys = [key for key in held_out if key[1] == which]
                if any(ranges[key] is None for key in keys):
                    metrics[f"{name}_outside"] = None
                else:
                    outside = sum(_outside_count(ranges[key], held_out[key]) for key in keys)
                    metrics[f"{name}_outside"] = outside / sum(held_out[key].numel() for key in keys)
            metrics.update(_attention_error(data, quantizers, torch.device(device)))
            results[method][bits] = metrics
    return results


def _attention_error(data: KVData, quantizers: dict, device: torch.device) -> dict:
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    sums = {"all": [0.0, 0.0], "last": [0.0, 0.0], "current_full": [0.0, 0.0]}
    for calls in data.held_out:
        prefix = {block: ([], [], [], []) for block in range(data.depth)}  # fp k, fp v, quantized k, quantized v
        last_size = max(c.q.shape[2] for c in calls)
        for call in calls:
            ks, vs, kqs, vqs = prefix[call.block]
            k, v, q = (t.to(device, dtype) for t in (call.k, call.v, call.q))
            kq = quantizers[(call.block, 0)](call.k).to(device, dtype)
            vq = quantizers[(call.block, 1)](call.v).to(device, dtype)
            ref = F.scaled_dot_product_attention(q, torch.cat(ks + [k], 2), torch.cat(vs + [v], 2), scale=1.0)
            out = F.scaled_dot_product_attention(q, torch.cat(kqs + [kq], 2), torch.cat(vqs + [vq], 2), scale=1.0)
            out_full = F.scaled_dot_product_attention(q, torch.cat(kqs + [k], 2), torch.cat(vqs + [v], 2), scale=1.0)
            norm = ref.square().sum().item()
            for name, candidate, counted in (("all", out, True), ("last", out, call.q.shape[2] == last_size),
                                             ("current_full", out_full, True)):  # fmt: skip
                if counted:
                    sums[name][0] += (candidate - ref).square().sum().item()
                    sums[name][1] += norm
            ks.append(k)
            vs.append(v)
            kqs.append(kq)
            vqs.append(vq)
    return {
        "attn_rel_err": math.sqrt(sums["all"][0] / sums["all"][1]),
        "attn_rel_err_last": math.sqrt(sums["last"][0] / sums["last"][1]),
        "attn_rel_err_current_full": math.sqrt(sums["current_full"][0] / sums["current_full"][1]),
    }
