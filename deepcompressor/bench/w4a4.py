"""Micro-benchmark of the W4A4 linear at the Infinity-2B/8B layer shapes.

For every transformer-block linear shape (``sa.mat_qkv``, the C x C projections, ``ffn.fc1``, ``ffn.fc2``) and token
count ``M = tokens x CFG rows`` (default 4096 and 2304 tokens, the last two scales at 1024x1024, times 2), the
median latency of

- ``bf16``: ``torch.matmul`` of 16-bit activations and weights (the baseline);
- ``int8``: ``torch._int_mm`` of int8 activations and weights (plain INT8 tensor-core GEMM, no scales: a bound);
- ``w4a4_gemm``: the W4A4 GEMM kernel on already quantized activations (per-group int8 products, scaling), with
  the variant chosen by measurement, and each variant alone (``w4a4_gemm_ab``, ``w4a4_gemm_swapped``);
- ``w4a4_gemm_lr``: the same with the low-rank up projection and bias in the epilogue;
- ``act_quant`` / ``act_quant_nolr``: the activation kernel (smoothing, 4-bit quantization) with / without the fused
  low-rank down projection, and ``down_bf16``: that down projection as a separate 16-bit GEMM instead;
- ``layer``: the whole ``W4A4Linear`` forward (activation kernel + GEMM with epilogue);

with TFLOP/s (TOP/s for integer GEMMs) counted as ``2 M N K``, the weight bytes, and a check of the kernels against
the PyTorch path of the same arithmetic (and the quantization error against the 16-bit layer). Prints a table and
writes JSON (``--json``).

    python -m deepcompressor.bench.w4a4 --json runs/bench/w4a4_kernels.json      # GPU: 2B and 8B shapes
    python -m deepcompressor.bench.w4a4 --arch tiny --device cpu --tokens 64     # CPU smoke run (PyTorch path)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

logger = logging.getLogger("deepcompressor.bench.w4a4")

DEFAULT_TOKENS = (4096, 2304)
CHECK_ROWS = 256


def layer_shapes(arch_name: str) -> list[tuple[str, int, int]]:
    """``(layer, N, K)`` of the quantized block linears that read image tokens (``ca.mat_kv`` reads the text)."""
    from infinity.arch import get_arch

    arch = get_arch(arch_name)
    c, hidden = arch.embed_dim, arch.mlp_hidden
    return [("sa.mat_qkv", 3 * c, c), ("sa.proj|ca.mat_q|ca.proj", c, c), ("ffn.fc1", hidden, c),
            ("ffn.fc2", c, hidden)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deepcompressor.bench.w4a4", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=None, help="Architectures (default: 2b 8b on GPU, tiny on CPU)")
    parser.add_argument("--tokens", nargs="+", type=int, default=None,
                        help="Image tokens per row (default: 4096 2304 on GPU, 64 on CPU)")
    parser.add_argument("--cfg-rows", type=int, default=2, help="Rows per token (2 with classifier-free guidance)")
    parser.add_argument("--rank", type=int, default=32, help="Low-rank branch rank")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="Activation dtype: auto (bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    parser.add_argument("--warmup", type=int, default=None, help="Untimed calls first (default 10 GPU, 1 CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="Timed calls, median reported (50 GPU, 3 CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="Write the results here (JSON)")
    return parser.parse_args(argv)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events around each call on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def bench_shape(arch: str, layer: str, n: int, k: int, m: int, args, device: torch.device, dtype: torch.dtype
                ) -> dict:
    from ..config.schema import ActivationQuantConfig, QuantConfig, WeightQuantConfig
    from ..kernels import w4a4 as kernels
    from ..nn.w4a4_linear import synthetic_w4a4_linear

    gen = torch.Generator(device=device).manual_seed(args.seed)
    linear = nn.Linear(k, n, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.normal_(0.0, k**-0.5, generator=gen)
        linear.bias.normal_(0.0, 0.02, generator=gen)
    qcfg = QuantConfig(wgts=WeightQuantConfig(dtype="sint4", group_size=64),
                       ipts=ActivationQuantConfig(dtype="sint4", group_size=64))
    layer_mod = synthetic_w4a4_linear(linear, qcfg, args.rank, True, gen, name=f"{arch}.{layer}",
                                      backend=args.backend)
    # Activations with a few outlier channels, as in the real layers.
    x = torch.randn(m, k, device=device, generator=gen)
    x[:, :: max(1, k // 16)] *= 8
    x = x.to(dtype)
    w16 = linear.weight.detach()
    timing = {"device": device, "warmup": args.warmup, "repeats": args.repeats}
    flops = 2.0 * m * n * k
    results: dict[str, float] = {}

    results["bf16"] = median_ms(lambda: torch.matmul(x, w16.t()), **timing)
    if hasattr(torch, "_int_mm"):
        x8 = torch.randint(-8, 8, (m, k), dtype=torch.int8, device=device)
        w8t = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=device).t()  # column-major, as cuBLASLt wants
        results["int8"] = median_ms(lambda: torch._int_mm(x8, w8t), **timing)

    spec, backend = layer_mod.ispec, args.backend
    smooth = layer_mod._cast("smooth_scale", dtype)
    l1t, l2t = layer_mod._cast("lowrank_l1t", dtype), layer_mod._cast("lowrank_l2t", dtype)
    bias = layer_mod._cast("bias", dtype)
    act = kernels.quantize_activations(x, spec, backend=backend, smooth=smooth, l2t=l2t)
    weight = (layer_mod.weight_packed, layer_mod.weight_scale, layer_mod.weight_zero, layer_mod.wspec.fmt.signed)
    extra = {}
    if not kernels.use_triton(device, backend):
        extra["weight"] = layer_mod._cpu_weight()
    results["w4a4_gemm"] = median_ms(
        lambda: kernels.w4a4_matmul(act, *weight, backend=backend, out_dtype=dtype, **extra), **timing)
    if kernels.use_triton(device, backend):
        for variant in ("ab", "swapped"):
            results[f"w4a4_gemm_{variant}"] = median_ms(
                lambda v=variant: kernels.w4a4_matmul(act, *weight, backend=backend, out_dtype=dtype, variant=v),
                **timing)
    results["w4a4_gemm_lr"] = median_ms(
        lambda: kernels.w4a4_matmul(act, *weight, backend=backend, l1t=l1t, bias=bias, out_dtype=dtype, **extra),
        **timing)
    results["act_quant"] = median_ms(
        lambda: kernels.quantize_activations(x, spec, backend=backend, smooth=smooth, l2t=l2t), **timing)
    results["act_quant_nolr"] = median_ms(
        lambda: kernels.quantize_activations(x, spec, backend=backend, smooth=smooth), **timing)
    results["down_bf16"] = median_ms(lambda: torch.matmul(x, l2t), **timing)
    with torch.no_grad():
        results["layer"] = median_ms(lambda: layer_mod(x), **timing)

    # Checks on the first rows (quantization is per token, so a row slice gives the same rows).
    rows = x[:CHECK_ROWS]
    with torch.no_grad():
        y = layer_mod(rows)
        torch_path = _torch_path_output(layer_mod, rows)
        y16 = linear(rows)
    row = {
        "arch": arch, "layer": layer, "M": m, "N": n, "K": k, "rank": args.rank,
        "dtype": str(dtype).removeprefix("torch."),
        "ms": results,
        "tflops": {name: flops / (ms * 1e-3) / 1e12 for name, ms in results.items()
                   if name in ("bf16", "int8", "w4a4_gemm", "w4a4_gemm_ab", "w4a4_gemm_swapped", "w4a4_gemm_lr",
                               "layer")},
        "speedup_layer_vs_bf16": results["bf16"] / results["layer"],
        "weight_bytes": {"bf16": 2 * n * k, "w4a4_layer": layer_mod.nbytes()},
        "check_vs_torch_path_rel": _relative(y, torch_path),
        "quant_error_vs_16bit_rel": _relative(y, y16),
        "gemm_config": _gemm_config(kernels),
    }
    return row


def _torch_path_output(layer_mod, rows: torch.Tensor) -> torch.Tensor:
    backend = layer_mod.backend
    layer_mod.backend = "torch"
    try:
        return layer_mod(rows)
    finally:
        layer_mod.backend = backend


def _gemm_config(kernels) -> dict:
    """The autotuners' last choices and the variant choices made so far."""
    configs = {}
    for name in ("_w4a4_gemm_autotuned", "_w4a4_gemm_swapped_autotuned", "_act_quant_autotuned"):
        best = getattr(getattr(kernels, name, None), "best_config", None)
        if best is not None:
            configs[name.strip("_")] = str(best)
    configs["variants"] = {str(key[:3]): choice for key, choice in kernels._variant_choice.items()}
    return configs


def run(args: argparse.Namespace) -> dict:
    from infinity.checkpoints import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    on_gpu = device.type == "cuda"
    args.arch = args.arch or (["2b", "8b"] if on_gpu else ["tiny"])
    args.tokens = args.tokens or (list(DEFAULT_TOKENS) if on_gpu else [64])
    args.warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    args.repeats = args.repeats if args.repeats is not None else (50 if on_gpu else 3)
    cases = [(arch, layer, n, k, t * args.cfg_rows) for arch in args.arch for layer, n, k in layer_shapes(arch)
             for t in args.tokens]
    rows = []
    for arch, layer, n, k, m in tqdm(cases, desc="shapes"):
        row = bench_shape(arch, layer, n, k, m, args, device, dtype)
        logger.info("%s %s M=%d: %s", arch, layer, m, {name: round(v, 4) for name, v in row["ms"].items()})
        rows.append(row)
        if on_gpu:
            torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "backend": args.backend,
        "dtype": str(dtype).removeprefix("torch."),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "rows": rows,
    }


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _ms_tflops(row: dict, name: str) -> str:
    if name not in row["ms"]:
        return f"{'-':>15}"
    return f"{row['ms'][name]:7.3f} {row['tflops'][name]:7.3g}"


def _variants(ms: dict) -> str:
    if "w4a4_gemm_ab" not in ms:
        return f"{'-':>15}"
    return f"{ms['w4a4_gemm_ab']:7.3f} {ms['w4a4_gemm_swapped']:7.3f}"


def format_table(res: dict) -> str:
    title = (f"W4A4 linear micro-benchmark on {res['device']} ({res['dtype']}, backend {res['backend']}, median of "
             f"{res['repeats']}): ms and TFLOP/s (TOP/s for int8 / w4a4) at 2 M N K")
    header = (f"{'arch':<5} {'layer':<25} {'M':>6} {'N':>6} {'K':>6} | {'bf16':>15} | {'int8 _int_mm':>15} | "
              f"{'w4a4 gemm':>15} | {'ab / swapped ms':>15} | {'+lowrank':>8} | {'act q':>7} {'(nolr':>7} "
              f"{'+bf16 dn)':>9} | "
              f"{'layer':>15} | {'x bf16':>6} | {'chk':>7}")
    lines = [title, header]
    for row in res["rows"]:
        ms = row["ms"]
        lines.append(
            f"{row['arch']:<5} {row['layer']:<25} {row['M']:>6} {row['N']:>6} {row['K']:>6} | "
            f"{_ms_tflops(row, 'bf16')} | {_ms_tflops(row, 'int8')} | {_ms_tflops(row, 'w4a4_gemm')} | "
            f"{_variants(ms)} | {ms['w4a4_gemm_lr']:8.3f} | {ms['act_quant']:7.3f} {ms['act_quant_nolr']:7.3f} {ms['down_bf16']:9.3f} | "
            f"{_ms_tflops(row, 'layer')} | {row['speedup_layer_vs_bf16']:6.2f} | {row['check_vs_torch_path_rel']:7.1e}")
    lines.append("chk: relative difference of the layer's output to the PyTorch path of the same arithmetic; "
                 "act q: activation kernel with the fused low-rank down projection, (nolr: without it, +bf16 dn: "
                 "the down projection as a separate 16-bit GEMM)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..utils.files import write_json

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    res = run(args)
    print(format_table(res))
    if args.json_path:
        write_json(args.json_path, res)
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
