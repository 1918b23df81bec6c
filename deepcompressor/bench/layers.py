"""Layer benchmark of the quantization methods on synthetic layers with Infinity-like activation outliers.

    python -m deepcompressor.bench.layers [--device cuda|cpu] [--sizes 2b,8b] [--json PATH]

For every layer (``bench.layers_synthetic``) and method it calibrates on ``--tokens`` calibration tokens, builds
the ``FakeQuantLinear`` and reports the relative output error ``||Y_q - Y|| / ||Y||`` on ``--eval-tokens``
held-out tokens, and the calibration wall time (device-synchronised). Methods (all INT4 symmetric, groups of 64
along the input dimension, fp16 scales, no range search):

- ``rtn``: W4A4 round-to-nearest;
- ``smoothquant``: W4A4 with the smoothing search;
- ``svdquant``: W4A4 with smoothing and the rank-32 low-rank branch (SVDQuant; rank 4 for the tiny layers);
- ``svdquant_gptq``: SVDQuant with GPTQ for the residual weight; its Hessian is accumulated over
  ``--gptq-tokens`` tokens (default 8 x in_features: GPTQ overfits with fewer tokens than that), and the
  accumulation time is included in its seconds;
- ``w4a16``: weight-only round-to-nearest (16-bit activations), the control;
- ``svdquant_beta0`` (not in the default ``--methods``): SVDQuant whose smoothing search also tries the
  ``(alpha, 0)`` candidates (``quant.smooth.beta_zero``).
- ``svdquant_gps`` / ``svdquant_gps_grid`` (not in the default ``--methods``): SVDQuant with the gain-projected
  smoothing scale alone, or added to the search (``quant.smooth.strategy`` ``gps`` / ``gps+grid``).

``--json PATH`` writes ``{layer: {method: {"rel_error": float, "seconds": float}}}`` atomically.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from tqdm import tqdm

from ..calib.gptq import accumulate_hessian
from ..calib.layer import calibrate_linear
from ..calib.search import relative_error, synchronize
from ..config.schema import QuantConfig
from ..nn.fake_linear import FakeQuantLinear
from ..utils.files import write_json
from .cli import add_list_argument
from .layers_synthetic import LAYER_SETS, SyntheticLayer, input_statistics, synthetic_inputs, synthetic_weight

__all__ = ["DEFAULT_METHODS", "METHODS", "main", "method_config", "run_benchmark"]

logger = logging.getLogger(__name__)

METHODS = ("rtn", "smoothquant", "svdquant", "svdquant_gptq", "w4a16", "svdquant_beta0", "svdquant_gps",
           "svdquant_gps_grid")
# What the command runs without --methods (the README's table).
DEFAULT_METHODS = METHODS[:5]
_DEFAULT_TOKENS = {"tiny": (1024, 512), "2b": (8192, 4096), "8b": (8192, 4096)}
# Rank of the branch: 32 for the real sizes (1-2% of the width); the tiny layers keep a similar share.
_DEFAULT_RANK = {"tiny": 4, "2b": 32, "8b": 32}


def method_config(method: str, max_tokens: int = 8192, rank: int = 32) -> QuantConfig:
    """The ``QuantConfig`` of a benchmark method."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    cfg = QuantConfig(max_tokens=max_tokens)
    cfg.wgts.dtype, cfg.wgts.group_size, cfg.wgts.symmetric = "sint4", 64, True
    cfg.ipts.dtype, cfg.ipts.group_size, cfg.ipts.symmetric = "sint4", 64, True
    cfg.calib_range.enabled = False
    svdquant_variants = ("svdquant", "svdquant_gptq", "svdquant_beta0", "svdquant_gps", "svdquant_gps_grid")
    cfg.smooth.enabled = method in ("smoothquant", *svdquant_variants)
    cfg.smooth.beta_zero = method == "svdquant_beta0"
    cfg.smooth.strategy = {"svdquant_gps": "gps", "svdquant_gps_grid": "gps+grid"}.get(method, "grid")
    cfg.low_rank.enabled = method in svdquant_variants
    cfg.low_rank.rank = rank
    cfg.gptq.enabled = method == "svdquant_gptq"
    if method == "w4a16":
        cfg.ipts.dtype = None
    return cfg


def _gptq_hessian(layer: SyntheticLayer, x_cal: torch.Tensor, gptq_tokens: int, device) -> tuple[torch.Tensor, float]:
    """Input Hessian over ``x_cal`` and further synthetic chunks up to ``gptq_tokens`` tokens, and the device
    seconds spent accumulating it (the generation of the synthetic tokens is not counted)."""
    hessian, count, seconds = None, 0, 0.0
    chunk_index = 0
    while count < gptq_tokens:
        size = min(x_cal.shape[0], gptq_tokens - count)
        chunk = x_cal[:size] if chunk_index == 0 else synthetic_inputs(layer, size, seed=1000 + chunk_index,
                                                                       device=device)
        synchronize(device)
        start = time.perf_counter()
        hessian, count = accumulate_hessian(hessian, count, chunk)
        synchronize(device)
        seconds += time.perf_counter() - start
        chunk_index += 1
    return hessian, seconds


def _bench_layer(layer: SyntheticLayer, methods, tokens: int, eval_tokens: int, device, rank: int,
                 progress, gptq_tokens: int | None = None) -> dict:
    x_cal = synthetic_inputs(layer, tokens, seed=1, device=device)
    x_eval = synthetic_inputs(layer, eval_tokens, seed=2, device=device)
    weight = synthetic_weight(layer, device=device)
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=False, device=device)
    with torch.no_grad():
        linear.weight.copy_(weight)
    y_eval = x_eval @ weight.T
    stats = input_statistics(x_cal)
    logger.info("%s: %d -> %d, inputs absmax/median %.0f, kurtosis %.0f", layer.name, layer.in_features,
                layer.out_features, stats["absmax_over_median"], stats["kurtosis"])
    hessian, hessian_seconds = None, 0.0
    if "svdquant_gptq" in methods:
        gptq_tokens = max(tokens, gptq_tokens or 8 * layer.in_features)
        hessian, hessian_seconds = _gptq_hessian(layer, x_cal, gptq_tokens, device)
        logger.info("%s: GPTQ Hessian over %d tokens in %.3f s", layer.name, gptq_tokens, hessian_seconds)
    results = {}
    for method in methods:
        cfg = method_config(method, max_tokens=tokens, rank=rank)
        synchronize(device)
        start = time.perf_counter()
        calib = calibrate_linear(weight, None, x_cal, cfg, name=f"{layer.name}/{method}",
                                 hessian=hessian if cfg.gptq.enabled else None)
        synchronize(device)
        seconds = time.perf_counter() - start + (hessian_seconds if cfg.gptq.enabled else 0.0)
        module = FakeQuantLinear.from_linear(linear, calib, cfg, keep_float_weight=False, name=layer.name)
        with torch.no_grad():
            rel = relative_error(module(x_eval), y_eval)
        results[method] = {"rel_error": rel, "seconds": seconds}
        progress.update(1)
    return results


def run_benchmark(sizes, methods=DEFAULT_METHODS, device="cpu", tokens: int | None = None,
                  eval_tokens: int | None = None, rank: int | None = None, gptq_tokens: int | None = None) -> dict:
    """``{layer: {method: {"rel_error", "seconds"}}}`` for the layer sets ``sizes``."""
    layers = []
    for size in sizes:
        if size not in LAYER_SETS:
            raise ValueError(f"--sizes: unknown size {size!r}; expected some of {sorted(LAYER_SETS)}")
        layers += [(size, layer) for layer in LAYER_SETS[size]]
    if torch.device(device).type == "cuda":
        # First-use costs (cuBLAS / cuSOLVER handles, kernels) must not be charged to the first method.
        warm = SyntheticLayer("warmup", 256, 256, "ffn_up")
        calibrate_linear(synthetic_weight(warm, device), None, synthetic_inputs(warm, 512, 0, device),
                         method_config("svdquant_gptq", 512), name="warmup")
    results = {}
    with tqdm(total=len(layers) * len(methods), desc="layers x methods") as progress:
        for size, layer in layers:
            default_tokens, default_eval = _DEFAULT_TOKENS[size]
            results[layer.name] = _bench_layer(layer, methods, tokens or default_tokens, eval_tokens or default_eval,
                                               device, rank or _DEFAULT_RANK[size], progress, gptq_tokens)
    return results


def format_table(results: dict, methods=DEFAULT_METHODS) -> str:
    """Relative errors and seconds as a fixed-width table."""
    width = max(len(name) for name in results) + 2
    cells = {m: max(15, len(m) + 2) for m in methods}
    head = "layer".ljust(width) + "".join(f"{m:>{cells[m]}}" for m in methods)
    lines = ["relative output error ||Y_q - Y|| / ||Y|| (held-out tokens)", head]
    for name, row in results.items():
        lines.append(name.ljust(width) + "".join(f"{row[m]['rel_error']:>{cells[m]}.4f}" for m in methods))
    lines += ["", "calibration seconds", head]
    for name, row in results.items():
        lines.append(name.ljust(width) + "".join(f"{row[m]['seconds']:>{cells[m]}.3f}" for m in methods))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepcompressor.bench.layers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, cuda:<i> or cpu (default: cuda when available)")
    add_list_argument(parser, "--sizes", choices=("tiny", "2b", "8b"), default=["2b", "8b"], help="layer sets")
    add_list_argument(parser, "--methods", choices=METHODS, default=list(DEFAULT_METHODS),
                      help="methods (default: the first five)")
    parser.add_argument("--tokens", type=int, default=None, help="calibration tokens (default 8192; tiny 1024)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (default 4096; tiny 512)")
    parser.add_argument("--rank", type=int, default=None, help="low-rank branch rank (default 32; tiny 4)")
    parser.add_argument("--gptq-tokens", type=int, default=None,
                        help="tokens of the GPTQ Hessian (default 8 x in_features, at least --tokens)")
    parser.add_argument("--json", default=None, help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    methods, sizes = args.methods, args.sizes
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    try:
        results = run_benchmark(sizes, methods, args.device, args.tokens, args.eval_tokens, args.rank,
                                args.gptq_tokens)
    except ValueError as err:
        parser.error(str(err))
    print(format_table(results, methods))
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
