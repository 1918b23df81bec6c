"""Cost of KV-cache quantization: calibration search time, cache bytes, and the attention kernel's speed.

* ``calibration_time``: the clipping search (``calib.kv.search_clipping_bounds``) over synthetic skewed K/V of a
  given shape, block by block as the calibration app runs it (rows ``[tokens, H * c]`` in bf16 on the device);
  only the searches are timed.
* ``schedule_bytes`` / ``measured_bytes``: K/V bytes of a model at a resolution, computed from the schedule and
  measured on real cache objects (``infinity.kv_cache.LayerKVCache`` in bf16, ``QuantizedLayerKVCache`` INT8/INT4),
  reserved for the stored tokens and allocated by a first one-token store per block.
* ``kernel_timing`` (CUDA): attention over INT8/INT4 codes against bf16 SDPA on the same shapes, through each
  backend of ``kernels.kv_attention.kv_attention``: ``fused`` (``ms``), ``workspace`` (dequantization pass and SDPA
  timed together and apart, workspace bytes), the ``auto`` choice measured afresh, the ratios to bf16 SDPA; and the
  quantize-on-write kernel.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ..calib.kv import asymmetric_qparams, search_clipping_bounds
from ..kernels import kv_attention as kva
from ..utils.device import synchronize

__all__ = ["MODEL_SHAPES", "calibration_time", "kernel_timing", "measured_bytes", "schedule_bytes"]

# depth, width C, heads H (head dim 128) of the released models.
MODEL_SHAPES = {"2b": (32, 2048, 16), "8b": (40, 3584, 28)}
VALUE_BYTES = {"bf16": 2.0, "int8": 1.0, "int4": 0.5}




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
                synchronize(device)
                start = time.perf_counter()
                found = search_clipping_bounds(rows, bits, num_grids, golden_iters, device=device)
                synchronize(device)
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
            synchronize(device)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            q = torch.randn(batch_rows, heads, 1, head_dim, device=device, dtype=torch.bfloat16)
            for layer in cache.layers:
                layer.attend(q, q, q, store=True)
            synchronize(device)
            allocated = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else None
            scale = full_depth / depth
            result["bytes"][f"{fmt}/{name}"] = {
                "nbytes": int(cache.nbytes() * scale),
                "allocated": None if allocated is None else int(allocated * scale),
            }
            cache.reset()
            del cache, layers
    return result


# do_bench's warm-up and measurement windows (ms): the default, and --quick.
BENCH_WINDOWS = {"full": (25, 200), "quick": (10, 50)}


def _bench(fn, device: torch.device, quick: bool = False) -> float:
    """Median milliseconds of ``fn`` (CUDA events through triton's do_bench)."""
    import triton.testing

    warmup, rep = BENCH_WINDOWS["quick" if quick else "full"]
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _paired_ratio(fn, base, device: torch.device, quick: bool = False) -> float:
    """Median over rounds of time(fn) / time(base), the two timed back to back in each round (short windows), so
    that clock and thermal drift over the run, which moves single timings by several percent on an H200, cancels."""
    ratios = []
    for _ in range(3 if quick else 5):
        ratios.append(_bench(fn, device, quick=True) / _bench(base, device, quick=True))
    return statistics.median(ratios)


def _sdpa_backend_name(q, k, v) -> str | None:
    """The SDPA backend PyTorch runs for these operands (from the profiler's kernel names; None if unknown)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            F.scaled_dot_product_attention(q, k, v, scale=1.0)
            torch.cuda.synchronize(q.device)
        names = " ".join(e.key for e in prof.key_averages()).lower()
    except Exception:  # noqa: BLE001 - informational only
        return None
    for needle, name in (("cudnn", "cudnn"), ("flash", "flash"), ("fmha", "efficient"), ("efficient", "efficient")):
        if needle in names:
            return name
    return "other"


def kernel_timing(model: str, device: torch.device, queries: int = 4096, keys: int = 10521,
                  batch_rows: int = 2, quick: bool = False) -> dict:  # fmt: skip
    """Last-scale attention of one block at 1024x1024: INT8/INT4 through the fused kernel, the workspace backend
    and the ``auto`` choice, vs bf16 SDPA on the same shapes. ``quick``: shorter timing windows."""
    depth, width, heads = MODEL_SHAPES[model]
    head_dim = width // heads
    gen = torch.Generator(device=device).manual_seed(0)
    q = F.normalize(torch.randn(batch_rows, heads, queries, head_dim, generator=gen, device=device), dim=-1) * 20
    q = q.to(torch.bfloat16)
    k = F.normalize(torch.randn(batch_rows, heads, keys, head_dim, generator=gen, device=device) + 0.5, dim=-1)
    v = torch.randn(batch_rows, heads, keys, head_dim, generator=gen, device=device)
    k, v = k.to(torch.bfloat16), v.to(torch.bfloat16)
    flops = kva.attention_flops(batch_rows, heads, queries, keys, head_dim)
    out = {"shape": {"B": batch_rows, "H": heads, "M": queries, "N": keys, "D": head_dim}, "quick": quick,
           "torch": torch.__version__}  # fmt: skip
    ms = _bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=1.0), device, quick)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=1.0)
    out["sdpa_bf16"] = {"ms": ms, "tflops": flops / ms / 1e9, "backend": _sdpa_backend_name(q, k, v)}
    # Memory of the quantized path: the codes of all blocks plus one layer's 16-bit K/V (the shared workspace).
    bf16_layer = 2 * batch_rows * heads * keys * head_dim * 2
    out["bf16_kv_bytes_per_layer"] = bf16_layer
    out["bf16_kv_bytes_model"] = bf16_layer * depth
    for bits in (8, 4):
        kva.kv_workspace.release()  # each format's workspace held from scratch: its bytes are this shape's
        out[f"int{bits}"] = _time_format(q, k, v, ref, bits, flops, device, ms, depth, quick)
    kva.kv_workspace.release()
    out["layer_attend"] = layer_attend_timing(q, k, v, device, quick)
    kva.kv_workspace.release()
    return out


def layer_attend_timing(q, k, v, device: torch.device, quick: bool = False) -> dict:
    """One block's last-scale ``attend(store=False)`` as the sampler calls it, cache operations included: the
    bf16 ``LayerKVCache`` (``cat``: the prefix concatenated with the new keys, the sampler's default; ``reserved``:
    room reserved for the last scale, ``kv_reserve_last``) against ``QuantizedLayerKVCache`` INT8/INT4
    (``cat``: new keys quantized into a temporary tail; ``reserved``: into the buffer's room) per backend."""
    from infinity.kv_cache import LayerKVCache

    from ..nn.kv_cache import KVQuantParams, QuantizedLayerKVCache

    keys, new = k.shape[2], q.shape[2]
    prefix = keys - new
    k_new, v_new = k[:, :, prefix:].contiguous(), v[:, :, prefix:].contiguous()
    out = {"prefix": prefix, "new": new, "bf16": {}}

    def attend_fn(cache):
        cache.set_prefix(k[:, :, :prefix], v[:, :, :prefix])
        return lambda: cache.attend(q, k_new, v_new, store=False)

    def time_attend(cache) -> float:
        return _bench(attend_fn(cache), device, quick)

    bf16_fns = {}
    for mode, capacity in (("cat", 0), ("reserved", keys)):
        bf16_fns[mode] = attend_fn(LayerKVCache(capacity))
        out["bf16"][mode] = _bench(bf16_fns[mode], device, quick)
    for bits in (8, 4):
        scales = [asymmetric_qparams(x.float().amin(dim=(0, 2)), x.float().amax(dim=(0, 2)), bits) for x in (k, v)]
        params = KVQuantParams("uint8" if bits == 8 else "uint4", torch.stack([s for s, _ in scales])[None].cpu(),
                               torch.stack([z for _, z in scales])[None].cpu())  # fmt: skip
        entry = out[f"int{bits}"] = {}
        for backend in ("fused", "workspace", "auto"):
            kva.kv_workspace.release()
            entry[backend] = {mode: time_attend(QuantizedLayerKVCache(params, 0, capacity, backend=backend))
                              for mode, capacity in (("cat", 0), ("reserved", keys))}  # fmt: skip
        entry["ratio_vs_bf16"] = {mode: entry["auto"][mode] / out["bf16"][mode] for mode in ("cat", "reserved")}
        kva.kv_workspace.release()
        entry["ratio_vs_bf16_paired"] = {
            mode: _paired_ratio(attend_fn(QuantizedLayerKVCache(params, 0, capacity, backend="auto")), bf16_fns[mode],
                                device, quick)
            for mode, capacity in (("cat", 0), ("reserved", keys))
        }  # fmt: skip
    return out


def _time_format(q, k, v, ref, bits: int, flops: float, device: torch.device, sdpa_ms: float, depth: int = 1,
                 quick: bool = False) -> dict:  # fmt: skip
    keys = k.shape[2]
    k_scale, k_zero = asymmetric_qparams(k.float().amin(dim=(0, 2)), k.float().amax(dim=(0, 2)), bits)
    v_scale, v_zero = asymmetric_qparams(v.float().amin(dim=(0, 2)), v.float().amax(dim=(0, 2)), bits)
    kc = kva.quantize_kv(k, k_scale, k_zero, bits)
    vc = kva.quantize_kv(v, v_scale, v_zero, bits)
    args = (q, kc, vc, keys, k_scale, k_zero, v_scale, v_zero, bits)
    ms = _bench(lambda: kva.quantized_kv_attention(*args), device, quick)
    got = kva.quantized_kv_attention(*args).float()
    fake = kva.reference_kv_attention(q.float(), *args[1:])

    def rel_to(x, y):
        return ((x.float() - y.float()).norm() / y.float().norm()).item()

    def rel(x):
        return rel_to(x, fake)

    result = {
        "ms": ms,
        "tflops": flops / ms / 1e9,
        "rel_err_vs_fake_quant_fp32": rel(got),
        "rel_err_vs_bf16_unquantized": ((got - ref).norm() / ref.norm()).item(),
        "quantize_kv_ms_per_tensor": _bench(lambda: kva.quantize_kv(k, k_scale, k_zero, bits, out=kc), device, quick),
        "dequant_plus_sdpa_ms": _bench(lambda: kva.reference_kv_attention(*args), device, quick),
    }
    # Workspace backend: the whole call, then its two parts on the same workspace views.
    ws_ms = _bench(lambda: kva.workspace_kv_attention(*args), device, quick)
    ws_out = kva.workspace_kv_attention(*args)
    kw, vw = kva.kv_workspace.kv(q.device, q.dtype, *q.shape[:2], keys, q.shape[3])
    dequant_ms = _bench(lambda: kva.dequantize_kv_segments(*args[1:], out_k=kw, out_v=vw), device, quick)
    kva.dequantize_kv_segments(*args[1:], out_k=kw, out_v=vw)
    exact = all(torch.equal(w, kva.dequantize_kv(c, s, z, bits, q.dtype))
                for w, c, s, z in ((kw, kc, k_scale, k_zero), (vw, vc, v_scale, v_zero)))  # fmt: skip
    sdpa_part_ms = _bench(lambda: F.scaled_dot_product_attention(q, kw, vw, scale=1.0), device, quick)
    bf16_reference = kva.reference_kv_attention(*args)  # dequantized into bf16, SDPA: what the backend computes
    result["workspace"] = {
        "ms": ws_ms,
        "dequant_ms": dequant_ms,
        "sdpa_ms": sdpa_part_ms,
        "dequant_gbps": (kc.numel() + vc.numel() + kw.numel() * kw.element_size() * 2) / dequant_ms / 1e6,
        "bytes": 2 * kw.numel() * kw.element_size(),
        "bytes_held": kva.kv_workspace.nbytes(),
        "dequant_bit_exact": exact,
        "rel_err_vs_fake_quant_fp32": rel(ws_out),
        "rel_err_vs_reference_bf16": rel_to(ws_out, bf16_reference),
    }
    choice = kva.choose_attention_backend(*args, remeasure=True)
    auto_ms = _bench(lambda: kva.kv_attention(*args, backend="auto"), device, quick)
    result["auto"] = {"backend": choice["backend"], "source": choice["source"], "ms": auto_ms,
                      "choice_timings": choice.get("timings")}  # fmt: skip
    result["ratio_vs_sdpa"] = {"fused": ms / sdpa_ms, "workspace": ws_ms / sdpa_ms, "auto": auto_ms / sdpa_ms}
    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)

    result["ratio_vs_sdpa_paired"] = {
        "fused": _paired_ratio(lambda: kva.quantized_kv_attention(*args), sdpa, device, quick),
        "workspace": _paired_ratio(lambda: kva.workspace_kv_attention(*args), sdpa, device, quick),
        "auto": _paired_ratio(lambda: kva.kv_attention(*args, backend="auto"), sdpa, device, quick),
    }
    codes_layer = kc.numel() + vc.numel()
    result["memory"] = {
        "codes_bytes_per_layer": codes_layer,
        "codes_bytes_model": codes_layer * depth,
        "workspace_bytes": result["workspace"]["bytes"],
        "quantized_total_bytes_model": codes_layer * depth + result["workspace"]["bytes"],
    }
    return result


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
