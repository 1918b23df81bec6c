"""Micro-benchmark of the W4A4 linear at the Infinity-2B/8B layer shapes, per backend, against bf16.

For every transformer-block linear shape (``sa.mat_qkv``, the C x C projections, ``ffn.fc1``, ``ffn.fc2``) and row
count M (default 2, 8, 32, 64, 256, 1024, 4608, 8192: rows = tokens x CFG rows), the time of one whole layer call:

- ``bf16``: ``F.linear`` of 16-bit activations, weights and bias (cuBLAS: the baseline);
- ``int``: the exact integer kernels (activation codes, int32 products per group; one fixed launch configuration,
  no autotuning); ``gemv`` (at most 128 rows), ``tiled`` and ``dequant``: the mixed-input backends; ``auto``: what
  ``W4A4Linear`` picks for this GPU and shape (``deepcompressor.kernels.w4a4_dispatch``).

Timing as in the model, whose scales replay CUDA graphs: one CUDA graph runs every call of a set of copies of the
layer (enough copies that their weights exceed twice the L2 cache, so weights come from HBM as in a real forward),
several times over; the time per call is the median replay time over the calls in it. Columns that cannot run at a
size (``gemv`` above 128 rows) are left empty. Also reported: the bytes each backend holds (the layer's packed
buffers, the shared workspaces), the check of the layer's output against the PyTorch path of the same arithmetic,
and, with ``--generation``, one 1024x1024 generation's linear work (every scale's rows, CFG included) per layer
type and per model, bf16 against ``auto``.

    python -m deepcompressor.bench.w4a4 --json docs/results/w4a4_kernels_h200.json      # GPU: 2B and 8B shapes
    python -m deepcompressor.bench.w4a4 --arch tiny --device cpu --rows 64               # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from .cli import add_list_argument
from .report import finish

logger = logging.getLogger("deepcompressor.bench.w4a4")

DEFAULT_ROWS = (2, 8, 32, 64, 256, 1024, 4608, 8192)
GPU_BACKENDS = ("bf16", "int", "gemv", "dequant", "auto")  # fused and tiled on request (--backends)
CHECK_ROWS = 256
L2_FLUSH_BYTES = 2 * 60 * 2**20  # twice an H100/H200 L2
GENERATION_PN = "1M"


def layer_shapes(arch_name: str) -> list[tuple[str, int, int, int]]:
    """``(layer, N, K, layers per block)`` of the quantized block linears that read image tokens (``ca.mat_kv``
    reads the text, once per generation)."""
    from infinity.arch import get_arch

    arch = get_arch(arch_name)
    c, hidden = arch.embed_dim, arch.mlp_hidden
    return [("sa.mat_qkv", 3 * c, c, 1), ("sa.proj|ca.mat_q|ca.proj", c, c, 3), ("ffn.fc1", hidden, c, 1),
            ("ffn.fc2", c, hidden, 1)]


def generation_rows(pn: str = GENERATION_PN, cfg_rows: int = 2) -> list[int]:
    from infinity.schedules import get_scale_schedule, tokens_per_scale

    return [t * cfg_rows for t in tokens_per_scale(get_scale_schedule(pn))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deepcompressor.bench.w4a4", description=__doc__.split("\n\n")[0])
    add_list_argument(parser, "--arch", choices=("tiny", "2b", "8b"), help="Architectures (default: 2b 8b on GPU, tiny on CPU)")
    parser.add_argument("--rows", nargs="+", type=int, default=None,
                        help="Rows M per call (default: 2 8 32 64 256 1024 4608 8192 on GPU, 64 on CPU)")
    parser.add_argument("--tokens", nargs="+", type=int, default=None,
                        help="Image tokens per CFG row instead of --rows (M = tokens x --cfg-rows)")
    parser.add_argument("--cfg-rows", type=int, default=2, help="Rows per token (2 with classifier-free guidance)")
    add_list_argument(parser, "--backends", choices=("bf16", "int", "fused", "gemv", "tiled", "dequant", "auto", "torch"),
                      help="Default: bf16 int gemv dequant auto on GPU, bf16 torch on CPU")
    parser.add_argument("--generation", action=argparse.BooleanOptionalAction, default=None,
                        help="Also time one 1024x1024 generation's linear work per layer type (default: on GPU)")
    parser.add_argument("--rank", type=int, default=32, help="Low-rank branch rank")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="Activation dtype: auto (bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--replays", type=int, default=None, help="Timed graph replays (default 7 GPU, 3 CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="Also record each backend's kernels (CUDA time per call, torch.profiler) per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None,
                        help="Write the results here (JSON; rewritten after every shape with complete=false, so a "
                        "run cut short keeps what it measured)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ timing


def graph_ms(calls: list[Callable[[], object]], device: torch.device, replays: int) -> float:
    from ..kernels.timing import graph_time_ms

    return graph_time_ms(calls, device, replays)


def _copies(nbytes: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return max(2, math.ceil(L2_FLUSH_BYTES / max(nbytes, 1)))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------ one shape


class ShapeBench:
    """The bf16 layer and its W4A4 form at one ``[N, K]`` shape, with copies for cold-weight timing."""

    def __init__(self, arch: str, layer: str, n: int, k: int, args, device: torch.device, dtype: torch.dtype):
        from ..config.schema import ActivationQuantConfig, QuantConfig, WeightQuantConfig
        from ..nn.w4a4_linear import synthetic_w4a4_linear

        self.arch, self.layer, self.n, self.k, self.device, self.dtype = arch, layer, n, k, device, dtype
        gen = torch.Generator(device=device).manual_seed(args.seed)
        self.linear = nn.Linear(k, n, device=device, dtype=dtype)
        with torch.no_grad():
            self.linear.weight.normal_(0.0, k**-0.5, generator=gen)
            self.linear.bias.normal_(0.0, 0.02, generator=gen)
        qcfg = QuantConfig(wgts=WeightQuantConfig(dtype="sint4", group_size=64),
                           ipts=ActivationQuantConfig(dtype="sint4", group_size=64))
        self.w4a4 = synthetic_w4a4_linear(self.linear, qcfg, args.rank, True, gen, name=f"{arch}.{layer}")
        self.gen = gen
        bf16_bytes = 2 * n * k
        self.bf16_copies = [self.linear] + [copy.deepcopy(self.linear) for _ in range(_copies(bf16_bytes, device) - 1)]
        self.w4a4_copies = [self.w4a4] + [copy.deepcopy(self.w4a4)
                                          for _ in range(_copies(self.w4a4.nbytes(), device) - 1)]

    def activations(self, m: int) -> torch.Tensor:
        x = torch.randn(m, self.k, device=self.device, generator=self.gen)
        x[:, :: max(1, self.k // 16)] *= 8  # a few outlier channels, as in the real layers
        return x.to(self.dtype)

    def time_backend(self, backend: str, x: torch.Tensor, replays: int) -> float | None:
        m = x.shape[0]
        if backend == "bf16":
            calls = [lambda lin=lin: torch.nn.functional.linear(x, lin.weight, lin.bias) for lin in self.bf16_copies]
        elif backend == "int":
            calls = [lambda lay=lay: _int_forward(lay, x) for lay in self.w4a4_copies]
        else:
            if (backend == "fused" and m > 16) or (backend == "gemv" and m > 128) or (backend == "tiled" and m > 2048):
                return None  # outside the backend's range (gemv) or its useful range (tiled: 2-4x slower there)
            if backend in ("fused", "gemv", "tiled", "dequant") and (self.device.type != "cuda" or x.dtype == torch.float32):
                return None
            for lay in self.w4a4_copies:
                lay.backend = backend
            calls = [lambda lay=lay: lay(x) for lay in self.w4a4_copies]
        with torch.no_grad():
            return graph_ms(calls, self.device, replays)


def _int_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The exact integer kernels (``W4A4Linear(backend="int")``: fixed launch configurations, no autotuning)."""
    backend = layer.backend
    layer.backend = "int"
    try:
        return layer(x)
    finally:
        layer.backend = backend


def bench_shape(bench: ShapeBench, m: int, args) -> dict:
    from ..kernels import w4a4_dispatch as dispatch

    x = bench.activations(m)
    ms = {}
    errors = {}
    for backend in args.backends:
        if backend == "int" and bench.device.type != "cuda":
            continue
        try:
            value = bench.time_backend(backend, x, args.replays)
        except Exception as error:  # noqa: BLE001 - one failing backend leaves its column empty, named in the JSON
            logger.error("%s %s M=%d backend %s failed: %s", bench.arch, bench.layer, m, backend, error)
            errors[backend] = f"{type(error).__name__}: {error}"[:500]
            continue
        if value is not None:
            ms[backend] = value
    layer = bench.w4a4
    row = {"arch": bench.arch, "layer": bench.layer, "M": m, "N": bench.n, "K": bench.k, "rank": args.rank,
           "dtype": str(bench.dtype).removeprefix("torch."), "device": args.device_name, "ms": ms}
    if errors:
        row["errors"] = errors
    best = "auto" if "auto" in ms else ("torch" if "torch" in ms else None)
    row["speedup_layer_vs_bf16"] = ms["bf16"] / ms[best] if best and "bf16" in ms else None
    row["speedup_vs_bf16"] = {b: ms["bf16"] / t for b, t in ms.items() if b != "bf16" and "bf16" in ms}
    if bench.device.type == "cuda" and bench.dtype != torch.float32:
        key = dispatch._key(x, layer.operands(bench.dtype))
        row["auto_choice"] = dispatch.choices.get(key) or {"source": "rule"}
    # Bytes held between calls: the packed layer, and the workspaces the backends share across all layers.
    rank = layer.lowrank_l1t.shape[0] if layer.lowrank_l1t is not None else 0
    row["resident_bytes"] = {"bf16": 2 * bench.n * bench.k + 2 * bench.n, "w4a4_layer": layer.nbytes(),
                             "dequant_workspace_for_this_layer": 2 * bench.n * (bench.k + rank),
                             "gemv_partials_for_this_layer": _gemv_partial_bytes(m, bench.n, bench.k)}
    if args.profile and bench.device.type == "cuda":
        row["profile"] = {b: kernel_profile(bench, b, x) for b in ms}
    rows = x[:CHECK_ROWS]
    with torch.no_grad():
        layer.backend = "auto"
        y = layer(rows)
        layer.backend = "torch"
        torch_path = layer(rows)
        layer.backend = "auto"
        y16 = bench.linear(rows)
    row["check_vs_torch_path_rel"] = _relative(y, torch_path)
    row["quant_error_vs_16bit_rel"] = _relative(y, y16)
    return row


def kernel_profile(bench: ShapeBench, backend: str, x: torch.Tensor, calls: int = 3) -> list[dict]:
    """The CUDA kernels one call of ``backend`` launches, with their device time per call (eager calls under
    torch.profiler), longest first."""
    from torch.profiler import ProfilerActivity, profile

    if backend == "bf16":
        fn = lambda: torch.nn.functional.linear(x, bench.linear.weight, bench.linear.bias)
    elif backend == "int":
        fn = lambda: _int_forward(bench.w4a4, x)
    else:
        bench.w4a4.backend = backend
        fn = lambda: bench.w4a4(x)
    with torch.no_grad():
        fn()
        torch.cuda.synchronize(bench.device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize(bench.device)
    bench.w4a4.backend = "auto"
    kernels = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if device_us and event.count:
            kernels.append({"kernel": event.key[:120], "launches_per_call": event.count / calls,
                            "us_per_call": device_us / calls})
    return sorted(kernels, key=lambda k: -k["us_per_call"])[:12]


def _gemv_partial_bytes(m: int, n: int, k: int) -> int:
    from ..kernels.w4a4_mixed import GEMV_MAX_ROWS, default_gemv_config

    if m > GEMV_MAX_ROWS:
        return 0
    cfg = default_gemv_config(m, n, k)
    return 4 * m * n * cfg.splits if cfg.splits > 1 else 0


def bench_generation(bench: ShapeBench, per_block: int, depth: int, args) -> dict:
    """One generation's calls of this layer type: every scale's rows, ``per_block`` layers in each of ``depth``
    blocks; bf16 against ``auto``."""
    per_scale = []
    for m in generation_rows(cfg_rows=args.cfg_rows):
        x = bench.activations(m)
        bf16 = bench.time_backend("bf16", x, args.replays)
        auto = bench.time_backend("auto", x, args.replays)
        per_scale.append({"M": m, "bf16_ms": bf16, "auto_ms": auto})
    calls = per_block * depth
    bf16_total = calls * sum(s["bf16_ms"] for s in per_scale)
    auto_total = calls * sum(s["auto_ms"] for s in per_scale)
    return {"arch": bench.arch, "layer": bench.layer, "N": bench.n, "K": bench.k, "layers": calls,
            "bf16_ms": bf16_total, "auto_ms": auto_total, "speedup_vs_bf16": bf16_total / auto_total,
            "per_scale": per_scale}


def run(args: argparse.Namespace, on_shape: Callable[[dict], None] | None = None) -> dict:
    from infinity.arch import get_arch
    from infinity.checkpoints import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    on_gpu = device.type == "cuda"
    args.arch = args.arch or (["2b", "8b"] if on_gpu else ["tiny"])
    if args.tokens:
        args.rows = [t * args.cfg_rows for t in args.tokens]
    args.rows = args.rows or (list(DEFAULT_ROWS) if on_gpu else [64])
    args.backends = args.backends or (list(GPU_BACKENDS) if on_gpu else ["bf16", "torch"])
    args.replays = args.replays or (7 if on_gpu else 3)
    args.generation = on_gpu if args.generation is None else args.generation
    args.device_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    rows, generation = [], []
    shapes = [(arch, *shape) for arch in args.arch for shape in layer_shapes(arch)]
    for arch, layer, n, k, per_block in tqdm(shapes, desc="shapes"):
        bench = ShapeBench(arch, layer, n, k, args, device, dtype)
        for m in args.rows:
            row = bench_shape(bench, m, args)
            logger.info("%s %s M=%d: %s", arch, layer, m, {b: round(v, 4) for b, v in row["ms"].items()})
            rows.append(row)
        if args.generation:
            generation.append(bench_generation(bench, per_block, get_arch(arch).depth, args))
        if on_shape is not None:
            on_shape(_result(args, dtype, rows, generation, complete=False))
        del bench
        if on_gpu:
            torch.cuda.empty_cache()
    return _result(args, dtype, rows, generation, complete=True)


def _result(args, dtype: torch.dtype, rows: list[dict], generation: list[dict], complete: bool) -> dict:
    from ..kernels.w4a4_dispatch import dispatch_cache_path, nunchaku_status, resident_workspace_bytes

    totals = {}
    for arch in args.arch:
        parts = [g for g in generation if g["arch"] == arch]
        if parts:
            bf16, auto = sum(g["bf16_ms"] for g in parts), sum(g["auto_ms"] for g in parts)
            totals[arch] = {"bf16_ms": bf16, "auto_ms": auto, "speedup_vs_bf16": bf16 / auto}
    on_gpu = args.device_name != "cpu"
    return {
        "date": time.strftime("%Y-%m-%d"),
        "complete": complete,
        "device": args.device_name,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "timing": "CUDA-graph replays of calls on copies of the layer whose weights exceed 2x L2, median per call"
                  if on_gpu else "wall time per call",
        "replays": args.replays,
        "backends": args.backends,
        "dispatch_cache": str(dispatch_cache_path()),
        "resident_workspace_bytes": resident_workspace_bytes(),
        "nunchaku": nunchaku_status(),
        "rows": rows,
        "generation": generation,
        "generation_totals": totals,
    }


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def format_table(res: dict) -> str:
    backends = [b for b in res["backends"] if b != "bf16"]
    title = (f"W4A4 linear on {res['device']} ({res['dtype']}), ms per call ({res['timing']}); x bf16 = bf16 time "
             f"over the backend's")
    header = (f"{'arch':<4} {'layer':<25} {'M':>5} {'N':>6} {'K':>6} | {'bf16':>8} | "
              + " | ".join(f"{b:>8} {'x bf16':>6}" for b in backends) + f" | {'auto picks':<16} | {'chk':>7}")
    lines = [title, header]
    for row in res["rows"]:
        ms, speed = row["ms"], row["speedup_vs_bf16"]
        cells = []
        for b in backends:
            cells.append(f"{ms[b]:8.4f} {speed.get(b, float('nan')):6.2f}" if b in ms else f"{'':>8} {'':>6}")
        choice = row.get("auto_choice") or {}
        pick = choice.get("backend", "-")
        config = choice.get("config") or {}
        if "block_n" in config:
            pick += f" bn{config['block_n']}/s{config['splits']}"
        elif config.get("lowrank") == "separate":
            pick += " lr-sep"
        bf16 = f"{ms['bf16']:8.4f}" if "bf16" in ms else f"{'-':>8}"
        lines.append(f"{row['arch']:<4} {row['layer']:<25} {row['M']:>5} {row['N']:>6} {row['K']:>6} | {bf16} | "
                     + " | ".join(cells) + f" | {pick:<16} | {row['check_vs_torch_path_rel']:7.1e}")
    if res["generation"]:
        lines.append("")
        lines.append(f"One {GENERATION_PN} generation's linear work (every scale, CFG rows), bf16 vs auto:")
        lines.append(f"{'arch':<4} {'layer':<25} {'layers':>6} | {'bf16 ms':>9} {'auto ms':>9} {'x bf16':>6}")
        for g in res["generation"]:
            lines.append(f"{g['arch']:<4} {g['layer']:<25} {g['layers']:>6} | {g['bf16_ms']:9.2f} "
                         f"{g['auto_ms']:9.2f} {g['speedup_vs_bf16']:6.2f}")
        for arch, t in res["generation_totals"].items():
            lines.append(f"{arch:<4} {'all block linears':<25} {'':>6} | {t['bf16_ms']:9.2f} {t['auto_ms']:9.2f} "
                         f"{t['speedup_vs_bf16']:6.2f}")
    lines.append("chk: relative difference of the auto layer's output to the PyTorch path of the same quantized "
                 f"operands (first {CHECK_ROWS} rows); nunchaku: {res['nunchaku']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..utils.files import write_json

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    save = (lambda partial: write_json(args.json_path, partial)) if args.json_path else None
    res = run(args, on_shape=save)
    return finish(format_table(res), res, args.json_path)


if __name__ == "__main__":
    sys.exit(main())
