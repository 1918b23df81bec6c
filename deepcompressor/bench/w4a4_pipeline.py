"""End-to-end latency and peak memory of Infinity with the real W4A4 layers (and an INT8/INT4 KV cache) against the
16-bit baseline, in one process with the same prompt and sampling settings.

    python infinity_w4a4_test.py configs/models/infinity-8b.yaml configs/svdquant/int4.yaml --artifacts DIR \
        [--kv-calib PATH] --json runs/bench/w4a4_8b.json
    python infinity_w4a4_test.py configs/models/infinity-2b.yaml configs/svdquant/int4.yaml \
        --pipeline-random-init --kv-synthetic --json runs/bench/w4a4_2b_random.json
    python infinity_w4a4_test.py configs/models/infinity-tiny.yaml configs/svdquant/int4.yaml \
        --pipeline-device cpu --warmup 0 --repeats 1                              # CPU end-to-end check

Variants, measured in this order on one pipeline (text encoder and VAE shared):

1. ``baseline``: the pipeline as loaded (blocks in bfloat16 on GPU);
2. ``w4a4``: every quantized block linear replaced by ``W4A4Linear``: from the PTQ artifacts (``--artifacts``:
   ``load_artifacts`` + ``apply_artifacts`` + ``convert_to_w4a4``), or, without artifacts, synthesized from the
   loaded weights with the ``quant`` section's formats, rank and smoothing (``synthesize_w4a4``: the cost does not
   depend on the values; reported as ``synthetic``);
3. ``w4a4_kv`` (with ``--kv-calib PATH``, ``kv.enabled``, or ``--kv-synthetic``): the same with the quantized KV
   cache in ``kv.dtype`` (``attach_kv_qparams``). ``--kv-synthetic`` writes per-channel scales that were not calibrated (keys in
   [-1, 1], values in [-4, 4]), for timing and memory only; the JSON says so.

Per variant: the median over ``--repeats`` timed generations (after ``--warmup`` untimed ones, which also tune the
kernels and capture CUDA graphs) of each stage (CUDA-synchronised: text encoder, transformer, VAE decode, total),
the peak of ``torch.cuda.max_memory_allocated`` over the timed runs, the transformer's bytes, the KV cache's bytes,
and the agreement of the sampled bits with the baseline's. Prints a table; ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..config import config_to_dict, parse_cli
from ..config.schema import RunConfig

__all__ = ["PROG", "main", "run", "synthetic_kv_calibration", "w4a4_from_artifacts"]

PROG = "infinity_w4a4_test"
STAGES = ("text_encoder", "transformer", "vae_decode", "total")
DEFAULT_PROMPT = "A photo of a red fox sitting in fresh snow, golden hour light, highly detailed"
SYNTHETIC_KV_RANGES = {"k": 1.0, "v": 4.0}
logger = logging.getLogger("deepcompressor.bench.w4a4_pipeline")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("W4A4 benchmark")
    group.add_argument("--artifacts", default=None, help="PTQ artifact directory of this model (ptq_infinity output)")
    group.add_argument("--kv-calib", default=None,
                       help="KV calibration file (calibrate_cache_quantization output); the same as --kv-enabled "
                       "--kv-calib-path PATH. The format is kv.dtype (--kv-dtype)")
    group.add_argument("--kv-synthetic", action="store_true",
                       help="Quantize the KV cache (kv.dtype) with synthetic, uncalibrated per-channel scales "
                       "(timing and memory only)")
    group.add_argument("--prompt", default=DEFAULT_PROMPT)
    group.add_argument("--seed", type=int, default=0, help="Sampling seed (same for every variant)")
    group.add_argument("--warmup", type=int, default=2, help="Untimed generations per variant")
    group.add_argument("--repeats", type=int, default=3, help="Timed generations per variant (median reported)")
    group.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"), help="W4A4 kernels")
    group.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                       help="Replay per-scale CUDA graphs of the transformer (GPU)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the blocks' elementwise glue (every variant)")
    group.add_argument("--skip-baseline", action="store_true", help="Measure the quantized variants only")
    group.add_argument("--save-images", default=None, help="Write each variant's last image here (PNG)")
    group.add_argument("--json", dest="json_path", default=None, help="Write the results here (JSON)")


# ------------------------------------------------------------------------------------------------ pieces


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (shared storages counted once)."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def synthetic_kv_calibration(model) -> dict:
    """A calibration dict in ``deepcompressor.nn.kv_cache``'s format with per-channel ranges that were not
    calibrated: keys in [-1, 1] (cos-normalised keys have unit norm per head), values in [-4, 4]."""
    from ..nn.kv_cache import CALIB_FORMAT, kv_model_identity, validate_kv_calibration

    identity = kv_model_identity(model)
    shape = (identity["depth"], 2, identity["num_heads"], identity["head_dim"])
    hi = torch.empty(shape, dtype=torch.float32)
    hi[:, 0], hi[:, 1] = SYNTHETIC_KV_RANGES["k"], SYNTHETIC_KV_RANGES["v"]
    lo = -hi
    qparams = {}
    for dtype, qmax in (("uint8", 255.0), ("uint4", 15.0)):
        scale = (hi - lo) / qmax
        qparams[dtype] = {"scale": scale, "zero": torch.round(-lo / scale), "lo": lo, "hi": hi,
                          "mse": torch.zeros(shape, dtype=torch.float32)}
    data = {"format": CALIB_FORMAT, "model": identity, "default_dtype": "uint8", "current": "quantized",
            "qparams": qparams, "settings": {"synthetic": True, "ranges": dict(SYNTHETIC_KV_RANGES)}, "stats": {}}
    return validate_kv_calibration(data, "<synthetic KV scales>")


def _kv_calib_path(cfg: RunConfig, args) -> str | None:
    """The KV calibration file to use: ``--kv-calib``, else ``kv.calib_path`` when ``kv.enabled``."""
    if args.kv_calib:
        return args.kv_calib
    return cfg.kv.calib_path if cfg.kv.enabled else None


def _attach_kv(model, cfg: RunConfig, args, workdir: Path) -> dict:
    from ..nn.kv_cache import attach_kv_qparams
    from ..utils.files import save_pt

    if args.kv_synthetic:
        path = save_pt(workdir / "synthetic_kv_calib.pt", synthetic_kv_calibration(model))
        source = "synthetic (uncalibrated ranges: keys [-1, 1], values [-4, 4]; timing and memory only)"
    else:
        path = _kv_calib_path(cfg, args)
        source = str(path)
    params = attach_kv_qparams(model, path, cfg.kv.dtype)
    return {"source": source, "synthetic": bool(args.kv_synthetic), "dtype": params.dtype}


def w4a4_from_artifacts(model, directory: str | Path, backend: str = "auto"):
    """Load a PTQ artifact directory into the full-precision ``model`` (``load_artifacts`` + ``apply_artifacts``,
    which check that the model is the calibrated one) and convert its layers to ``W4A4Linear``; returns the bundle
    and the converted layer names."""
    from ..app.diffusion.artifacts import apply_artifacts, load_artifacts
    from ..nn.w4a4_linear import convert_to_w4a4

    bundle = load_artifacts(directory)
    apply_artifacts(model, bundle)
    return bundle, convert_to_w4a4(model, backend=backend)


def _quantize_transformer(pipe, cfg: RunConfig, args) -> dict:
    from ..nn.w4a4_linear import synthesize_w4a4, w4a4_layers

    model = pipe.transformer
    start = time.perf_counter()
    if args.artifacts:
        bundle, names = w4a4_from_artifacts(model, args.artifacts, args.backend)
        how = {"source": "artifacts", "artifacts": str(args.artifacts), "quant": config_to_dict(bundle.config)["quant"]}
    else:
        names = synthesize_w4a4(model, cfg.quant, seed=cfg.pipeline.seed, backend=args.backend)
        how = {"source": "synthetic", "note": "round-to-nearest residual of a seeded random low-rank branch and "
               "smoothing, built from the loaded weights: for latency and memory, not quality",
               "quant": config_to_dict(cfg)["quant"]}
    _sync(pipe.device)
    layers = w4a4_layers(model)
    how.update({"num_layers": len(names), "seconds": time.perf_counter() - start,
                "w4a4_inputs": sum(1 for m in layers.values() if m.ispec is not None),
                "weight_only": sum(1 for m in layers.values() if m.ispec is None)})
    return how


def _free_cached_graphs(pipe) -> None:
    """Drop the sampler's captured CUDA graphs (they hold the memory of the modules they were captured with)."""
    if getattr(pipe.transformer, "_cuda_graph_stepper", None) is not None:
        pipe.transformer._cuda_graph_stepper = None
    gc.collect()
    if pipe.device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def _measure(pipe, cfg: RunConfig, args, label: str) -> tuple[dict, object]:
    p, device = cfg.pipeline, pipe.device
    graphs = bool(args.cuda_graphs and device.type == "cuda")

    def generate():
        return pipe.generate([args.prompt], seed=args.seed, cfg=p.cfg, tau=p.tau, top_k=p.top_k, top_p=p.top_p,
                             pn=p.pn, h_div_w=p.h_div_w, cuda_graphs=graphs)

    warmup_seconds = []
    for _ in range(args.warmup):
        start = time.perf_counter()
        generate()
        warmup_seconds.append(time.perf_counter() - start)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs, result = [], None
    for i in range(args.repeats):
        result = generate()
        runs.append(dict(result.timings))
        logger.info("%s run %d: %s", label, i, {k: round(v, 4) for k, v in result.timings.items()})
    peak = _peak_gib(device)
    median = {stage: statistics.median(r[stage] for r in runs) for stage in STAGES}
    stats = {
        "median_seconds": median,
        "runs": runs,
        "warmup_seconds": warmup_seconds,
        "peak_memory_gib": peak,
        "resident_gib": torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "transformer_gib": module_bytes(pipe.transformer) / 2**30,
        "kv_cache_gib": result.sample.kv_cache_bytes / 2**30,
        "cuda_graphs": graphs,
        # Kernel compilation, backend measurement and graph capture happen in the first generation.
        "first_generation_extra_seconds": warmup_seconds[0] - median["total"] if warmup_seconds else None,
    }
    return stats, result


def _bit_agreement(reference, result) -> dict:
    per_scale = [float((a.cpu() == b.cpu()).float().mean()) for a, b in zip(reference.sample.bits, result.sample.bits)]
    total = sum(b.numel() for b in reference.sample.bits)
    equal = sum(int((a.cpu() == b.cpu()).sum()) for a, b in zip(reference.sample.bits, result.sample.bits))
    return {"overall": equal / total, "per_scale": per_scale}


def _save_image(result, directory: str, name: str) -> None:
    from infinity.generate import save_png

    path = Path(directory) / f"{name}.png"
    save_png(result.images[0], path)
    logger.info("wrote %s", path)


# ------------------------------------------------------------------------------------------------ run


def run(cfg: RunConfig, args) -> dict:
    from infinity.model import enable_compile
    from infinity.pipeline import pipeline_from_config
    from infinity.schedules import get_scale_schedule, tokens_per_scale

    kv_path = _kv_calib_path(cfg, args)
    if args.kv_synthetic and kv_path:
        raise ValueError(f"--kv-synthetic and a KV calibration file ({kv_path}) were both given")
    if args.artifacts is None and cfg.quant.wgts.dtype is None:
        raise ValueError("no --artifacts and quant.wgts.dtype is null: stack configs/svdquant/int4.yaml to synthesize "
                         "W4A4 layers, or give the PTQ artifact directory")
    if args.artifacts:
        from ..app.diffusion.artifacts import load_artifacts

        identity = load_artifacts(args.artifacts).manifest["model"]
        if identity["arch"] != cfg.pipeline.arch:
            raise ValueError(f"--artifacts {args.artifacts}: made for Infinity-{identity['arch']}, the config builds "
                             f"Infinity-{cfg.pipeline.arch}")
    start = time.perf_counter()
    pipe = pipeline_from_config(cfg.pipeline)
    _sync(pipe.device)
    load_seconds = time.perf_counter() - start
    enable_compile(args.compile)
    device = pipe.device
    schedule = get_scale_schedule(cfg.pipeline.pn, cfg.pipeline.h_div_w)
    res = {
        "arch": cfg.pipeline.arch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "block_dtype": str(pipe.transformer.block_dtype).removeprefix("torch."),
        "pn": cfg.pipeline.pn,
        "tokens": sum(tokens_per_scale(schedule)),
        "cfg": cfg.pipeline.cfg,
        "tau": cfg.pipeline.tau,
        "prompt": args.prompt,
        "seed": args.seed,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "backend": args.backend,
        "compile": bool(args.compile),
        "load_seconds": load_seconds,
        "variants": {},
    }
    variants = res["variants"]
    reference = None
    if not args.skip_baseline:
        variants["baseline"], reference = _measure(pipe, cfg, args, "baseline")
        res["image_hw"] = list(reference.images.shape[1:3])
        if args.save_images:
            _save_image(reference, args.save_images, "baseline")
    _free_cached_graphs(pipe)
    res["quantization"] = _quantize_transformer(pipe, cfg, args)
    _free_cached_graphs(pipe)
    stats, result = _measure(pipe, cfg, args, "w4a4")
    variants["w4a4"] = stats
    res["image_hw"] = list(result.images.shape[1:3])
    if reference is not None:
        stats["bit_agreement_vs_baseline"] = _bit_agreement(reference, result)
    if args.save_images:
        _save_image(result, args.save_images, "w4a4")
    if kv_path or args.kv_synthetic:
        with tempfile.TemporaryDirectory() as workdir:
            res["kv"] = _attach_kv(pipe.transformer, cfg, args, Path(workdir))
            _free_cached_graphs(pipe)
            stats, result = _measure(pipe, cfg, args, "w4a4_kv")
        variants["w4a4_kv"] = stats
        if reference is not None:
            stats["bit_agreement_vs_baseline"] = _bit_agreement(reference, result)
        if args.save_images:
            _save_image(result, args.save_images, "w4a4_kv")
    if "baseline" in variants:
        base = variants["baseline"]
        for name, stats in variants.items():
            if name == "baseline":
                continue
            stats["speedup_vs_baseline"] = {s: base["median_seconds"][s] / stats["median_seconds"][s] for s in STAGES}
            if base["peak_memory_gib"]:
                stats["peak_memory_ratio_vs_baseline"] = stats["peak_memory_gib"] / base["peak_memory_gib"]
            stats["transformer_bytes_ratio_vs_baseline"] = stats["transformer_gib"] / base["transformer_gib"]
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return res


def _gib(value: float | None) -> str:
    return f"{value:8.2f}" if value is not None else f"{'-':>8}"


def format_table(res: dict) -> str:
    hw = res.get("image_hw", ["?", "?"])
    quant = res["quantization"]
    title = (f"Infinity-{res['arch']} {hw[0]}x{hw[1]} ({res['tokens']} tokens), {res['device']}, blocks "
             f"{res['block_dtype']}, cfg {res['cfg']}, backend {res['backend']}, median of {res['repeats']} after "
             f"{res['warmup']} warm-up")
    layers = (f"W4A4 layers: {quant['num_layers']} from {quant['source']} ({quant['w4a4_inputs']} with 4-bit inputs, "
              f"{quant['weight_only']} weight-only)")
    if "kv" in res:
        layers += f"; KV cache: {res['kv']['dtype']} {res['kv']['source']}"
    header = (f"{'variant':<10} {'text enc':>9} {'transf.':>9} {'vae':>9} {'total':>9} {'speedup':>8} | "
              f"{'peak GiB':>8} {'transf.GiB':>10} {'KV GiB':>8} | {'bits = base':>11}")
    lines = [title, layers, header]
    for name, stats in res["variants"].items():
        med = stats["median_seconds"]
        speed = stats.get("speedup_vs_baseline", {}).get("total")
        agree = stats.get("bit_agreement_vs_baseline", {}).get("overall")
        lines.append(
            f"{name:<10} {med['text_encoder']:9.3f} {med['transformer']:9.3f} {med['vae_decode']:9.3f} "
            f"{med['total']:9.3f} {(f'{speed:8.2f}' if speed else '-'):>8} | {_gib(stats['peak_memory_gib'])} "
            f"{stats['transformer_gib']:10.3f} {stats['kv_cache_gib']:8.3f} | "
            f"{(f'{agree:11.3f}' if agree is not None else '-'):>11}")
    if res["device"] == "cpu":
        lines.append(f"(CPU: no per-run peak; process peak RSS {res['peak_rss_gib']:.2f} GiB)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..utils.files import write_json

    cfg, args = parse_cli(PROG, argv, add_arguments=add_arguments,
                          description="Latency and memory of Infinity with real W4A4 layers vs the 16-bit baseline.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        res = run(cfg, args)
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    res["config"] = config_to_dict(cfg)
    print(format_table(res))
    if args.json_path:
        write_json(args.json_path, res)
        print(f"wrote {args.json_path}")
    return 0
