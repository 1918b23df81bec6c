"""Cost of KV-cache quantization: calibration search time, cache bytes, and the attention kernel's speed.

* ``calibration_time``: the clipping search (``calib.kv.search_clipping_bounds``) over synthetic skewed K/V of a
  given shape, block by block as the calibration app runs it (rows ``[tokens, H * c]`` in bf16 on the device);
  only the searches are timed.
* ``schedule_bytes`` / ``measured_bytes``: K/V bytes of a model at a resolution, computed from the schedule and
  measured on real cache objects (``infinity.kv_cache.LayerKVCache`` in bf16, ``QuantizedLayerKVCache`` INT8/INT4),
  reserved for the stored tokens and allocated by a first one-token store per block.
* ``kernel_timing`` (CUDA): the fused attention over INT8/INT4 codes against bf16 SDPA on the same shapes, and the
  quantize-on-write kernel.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..calib.kv import asymmetric_qparams, search_clipping_bounds
from ..kernels import kv_attention as kva

__all__ = ["MODEL_SHAPES", "calibration_time", "kernel_timing", "measured_bytes", "schedule_bytes"]

# depth, width C, heads H (head dim 128) of the released models.
MODEL_SHAPES = {"2b": (32, 2048, 16), "8b": (40, 3584, 28)}
VALUE_BYTES = {"bf16": 2.0, "int8": 1.0, "int4": 0.5}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _skewed_rows(tokens: int, heads: int, head_dim: int, which: int, gen: torch.Generator, device) -> torch.Tensor:
    """Rows like the recorder's: unit-norm heads with offset, skewed channels (K), or offset heavy-tailed V."""
    channels = heads * head_dim
    offset = torch.randn(channels, generator=gen, device=device) * torch.rand(channels, generator=gen, device=device)
    x = torch.randn(tokens, channels, generator=gen, device=device) + 2 * offset
    if which == 0:
        skew = -torch.log(torch.rand(tokens, channels, generator=gen, device=device).clamp_min(1e-12))
        x = x + skew * (offset > 0.8)
        x = F.normalize(x.view(tokens, heads, head_dim), dim=-1).view(tokens, channels)
    else:
        x = x * (0.2 + torch.rand(channels, generator=gen, device=device) ** 3 * 3)
    return x.to(torch.bfloat16)


def calibration_time(depth: int, heads: int, head_dim: int, tokens: int, device: torch.device, bits_list=(8, 4),
                     num_grids: int = 5, golden_iters: int = 20, progress: bool = True) -> dict:  # fmt: skip
    """Seconds of the search over ``depth x 2 x heads x head_dim`` channels of ``tokens`` samples each."""
    from tqdm.auto import tqdm

    gen = torch.Generator(device=device).manual_seed(0)
    seconds = {bits: 0.0 for bits in bits_list}
    mean_mse = {bits: 0.0 for bits in bits_list}
    # Warm-up (allocator, kernels) on one small block, not timed.
    search_clipping_bounds(_skewed_rows(tokens, 1, head_dim, 0, gen, device), 8, num_grids, 2, device=device)
    for block in tqdm(range(depth), desc="calibration-time blocks", disable=not progress):
        for which in (0, 1):
            rows = _skewed_rows(tokens, heads, head_dim, which, gen, device)
            for bits in bits_list:
                _sync(device)
                start = time.perf_counter()
                found = search_clipping_bounds(rows, bits, num_grids, golden_iters, device=device)
                _sync(device)
                seconds[bits] += time.perf_counter() - start
                mean_mse[bits] += found.mse.mean().item() / (2 * depth)
    channels = depth * 2 * heads * head_dim
    return {
        "shape": {"depth": depth, "heads": heads, "head_dim": head_dim, "tokens": tokens, "channels": channels},
        "device": str(device),
        "seconds": {f"int{bits}": seconds[bits] for bits in bits_list},
        "mean_mse": {f"int{bits}": mean_mse[bits] for bits in bits_list},
    }


def schedule_bytes(model: str, pn: str = "1M", batch_rows: int = 2) -> dict:
    """K/V bytes computed from the schedule: with and without the last scale stored, per format."""
    from infinity.schedules import get_scale_schedule, tokens_per_scale

    depth, width, _ = MODEL_SHAPES[model]
    sizes = tokens_per_scale(get_scale_schedule(pn))
    tokens = {"with_last": sum(sizes), "without_last": sum(sizes[:-1])}
    out = {"tokens": tokens, "last_scale_tokens": sizes[-1], "bytes": {}}
    for fmt, per_value in VALUE_BYTES.items():
        for name, count in tokens.items():
            out["bytes"][f"{fmt}/{name}"] = int(2 * depth * batch_rows * count * width * per_value)
        if fmt != "bf16":
            # The unstored last scale is quantized into a transient tail of one block at a time.
            out["bytes"][f"{fmt}/transient_last_scale_tail"] = int(2 * batch_rows * sizes[-1] * width * per_value)
    out["bytes"]["quantizer_params"] = 2 * depth * width * 2 * 4  # scale + zero, float32, K and V
    return out


def measured_bytes(model: str, device: torch.device, pn: str = "1M", batch_rows: int = 2,
                   depth: int | None = None) -> dict:  # fmt: skip
    """Allocate real caches of ``depth`` blocks (default: the model's) for the schedule and report their bytes
    (``nbytes`` and, on CUDA, the allocator's growth)."""
    from infinity.kv_cache import KVCache, LayerKVCache
    from infinity.schedules import get_scale_schedule, tokens_per_scale

    from ..nn.kv_cache import KVQuantParams, QuantizedLayerKVCache

    full_depth, width, heads = MODEL_SHAPES[model]
    depth = depth or full_depth
    head_dim = width // heads
    sizes = tokens_per_scale(get_scale_schedule(pn))
    result = {"depth_measured": depth, "depth_model": full_depth, "bytes": {}}
    ones = torch.ones(depth, 2, heads, head_dim)
    for fmt in VALUE_BYTES:
        for name, count in (("with_last", sum(sizes)), ("without_last", sum(sizes[:-1]))):
            if fmt == "bf16":
                layers = [LayerKVCache() for _ in range(depth)]
            else:
                params = KVQuantParams("uint8" if fmt == "int8" else "uint4", ones * 0.01, ones * 128)
                layers = [QuantizedLayerKVCache(params, i) for i in range(depth)]
            cache = KVCache(layers)
            cache.reserve(count)
            _sync(device)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            q = torch.randn(batch_rows, heads, 1, head_dim, device=device, dtype=torch.bfloat16)
            for layer in cache.layers:
                layer.attend(q, q, q, store=True)
            _sync(device)
            allocated = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else None
            scale = full_depth / depth
            result["bytes"][f"{fmt}/{name}"] = {
                "nbytes": int(cache.nbytes() * scale),
                "allocated": None if allocated is None else int(allocated * scale),
            }
            cache.reset()
            del cache, layers
    return result


def _bench(fn, device: torch.device) -> float:
    """Median milliseconds of ``fn`` (CUDA events through triton's do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def kernel_timing(model: str, device: torch.device, queries: int = 4096, keys: int = 10521,
                  batch_rows: int = 2) -> dict:  # fmt: skip
    """Last-scale attention of one block at 1024x1024: INT8/INT4 fused kernel vs bf16 SDPA (same shapes)."""
    _, width, heads = MODEL_SHAPES[model]
    head_dim = width // heads
    gen = torch.Generator(device=device).manual_seed(0)
    q = F.normalize(torch.randn(batch_rows, heads, queries, head_dim, generator=gen, device=device), dim=-1) * 20
    q = q.to(torch.bfloat16)
    k = F.normalize(torch.randn(batch_rows, heads, keys, head_dim, generator=gen, device=device) + 0.5, dim=-1)
    v = torch.randn(batch_rows, heads, keys, head_dim, generator=gen, device=device)
    k, v = k.to(torch.bfloat16), v.to(torch.bfloat16)
    flops = kva.attention_flops(batch_rows, heads, queries, keys, head_dim)
    out = {"shape": {"B": batch_rows, "H": heads, "M": queries, "N": keys, "D": head_dim}}
    ms = _bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=1.0), device)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=1.0)
    out["sdpa_bf16"] = {"ms": ms, "tflops": flops / ms / 1e9}
    for bits in (8, 4):
        out[f"int{bits}"] = _time_format(q, k, v, ref, bits, flops, device)
    return out


def _time_format(q, k, v, ref, bits: int, flops: float, device: torch.device) -> dict:
    keys = k.shape[2]
    k_scale, k_zero = asymmetric_qparams(k.float().amin(dim=(0, 2)), k.float().amax(dim=(0, 2)), bits)
    v_scale, v_zero = asymmetric_qparams(v.float().amin(dim=(0, 2)), v.float().amax(dim=(0, 2)), bits)
    kc = kva.quantize_kv(k, k_scale, k_zero, bits)
    vc = kva.quantize_kv(v, v_scale, v_zero, bits)
    args = (q, kc, vc, keys, k_scale, k_zero, v_scale, v_zero, bits)
    ms = _bench(lambda: kva.quantized_kv_attention(*args), device)
    got = kva.quantized_kv_attention(*args).float()
    fake = kva.reference_kv_attention(q.float(), *args[1:])
    return {
        "ms": ms,
        "tflops": flops / ms / 1e9,
        "rel_err_vs_fake_quant_fp32": ((got - fake).norm() / fake.norm()).item(),
        "rel_err_vs_bf16_unquantized": ((got - ref).norm() / ref.norm()).item(),
        "quantize_kv_ms_per_tensor": _bench(lambda: kva.quantize_kv(k, k_scale, k_zero, bits, out=kc), device),
        "dequant_plus_sdpa_ms": _bench(lambda: kva.reference_kv_attention(*args), device),
    }


SWEEP_CONFIGS = ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2))


def kernel_sweep(model: str, device: torch.device, configs=SWEEP_CONFIGS, queries: int = 4096, keys: int = 10521):
    """Median ms of the fused kernel per launch configuration (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    _, width, heads = MODEL_SHAPES[model]
    q, k, v = (t.to(torch.bfloat16) for t in (torch.randn(2, heads, n, width // heads, device=device)
                                               for n in (queries, keys, keys)))  # fmt: skip
    out = {}
    for bits in (8, 4):
        k_scale, k_zero = asymmetric_qparams(k.float().amin(dim=(0, 2)), k.float().amax(dim=(0, 2)), bits)
        v_scale, v_zero = asymmetric_qparams(v.float().amin(dim=(0, 2)), v.float().amax(dim=(0, 2)), bits)
        kc, vc = kva.quantize_kv(k, k_scale, k_zero, bits), kva.quantize_kv(v, v_scale, v_zero, bits)
        for config in configs:
            args = (q, kc, vc, keys, k_scale, k_zero, v_scale, v_zero, bits)
            try:
                ms = _bench(lambda a=args, c=config: kva.quantized_kv_attention(*a, launch=c), device)
            except Exception as error:  # noqa: BLE001 - a configuration the compiler refuses is reported, not fatal
                ms = f"failed: {type(error).__name__}"
            out[f"int{bits}/{'x'.join(map(str, config))}"] = ms
            print(f"sweep {model} int{bits} {config}: {ms}", flush=True)
    return out
