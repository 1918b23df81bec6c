"""End-to-end latency and peak memory of Infinity with the real W4A4 layers (and an INT8/INT4 KV cache) against the
16-bit baseline, in one process with the same prompt and sampling settings; what a quantized model needs of a
device, down to the smallest Jetson module that holds it.

    python infinity_w4a4_test.py configs/models/infinity-8b.yaml --base-path DIR --enable_kv_quant true \
        --prompt "A cinematic photo of a robot in Zurich" --seed 0            # the original project's command
    python infinity_w4a4_test.py configs/models/infinity-2b.yaml configs/svdquant/int4.yaml configs/edge/memory.yaml \
        --pipeline-random-init --kv-synthetic --json runs/bench/w4a4_2b_random.json
    python infinity_w4a4_test.py configs/models/infinity-tiny.yaml configs/svdquant/int4.yaml \
        --pipeline-device cpu --warmup 0 --repeats 1                              # CPU end-to-end check

``--base-path DIR`` (= ``--artifacts``) is a ``ptq_infinity`` artifact directory; ``--enable_kv_quant true|false``
(= ``--kv-enabled`` / ``--no-kv-enabled``) reads ``kv.calib_path`` (default ``runs/kv_scales/kv_quant_calib.pt``).

Variants, measured in this order (text encoder and VAE shared):

1. ``baseline``: the full-precision transformer (blocks in bfloat16 on GPU); ``--skip-baseline`` leaves it out;
2. ``w4a4``: every quantized block linear a ``W4A4Linear``. From artifacts the quantized transformer is built
   directly from them (``load_quantized_transformer``: no full-precision weights read; the load's peak is
   ``quantized_load_peak_gib``); without artifacts it is synthesized from the loaded weights with the ``quant``
   section's formats, rank and smoothing (``synthesize_w4a4``: the cost does not depend on the values);
3. ``w4a4_kv8`` / ``w4a4_kv4`` (with ``--kv-calib PATH``, ``kv.enabled`` or ``--kv-synthetic``): the same with the
   quantized KV cache, for each of ``--kv-dtypes`` (default: every format the calibration holds).
   ``--kv-synthetic`` writes per-channel scales that were not calibrated (keys in [-1, 1], values in [-4, 4]), for
   timing and memory only; the JSON says so.

Per variant: the median over ``--repeats`` timed generations (after ``--warmup`` untimed ones, which also tune the
kernels and capture CUDA graphs) of each stage (CUDA-synchronised: text encoder, transformer, VAE decode, total),
the peaks of ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the timed runs (and of one more
generation with a prompt not seen, ``new_prompt``: a released text encoder is loaded again), the resident bytes
of the transformer, KV cache, text encoder and VAE, the agreement of the sampled bits with the baseline's, and the
smallest Jetson module that holds the run (``deepcompressor.bench.edge_report``). Prints a table and writes the
JSON (``--json``, default ``<output.root>/w4a4_test/<pipeline.name>.json``), each variant's image next to it
(``<stem>.<variant>.png``) and, on the GPU, a bar chart of the peaks (``<stem>.memory.png``).
The memory options (``pipeline.release_text_encoder``, ``pipeline.vae_tiled``, ``pipeline.nonblock_dtype``) are
config keys; ``configs/edge/memory.yaml`` switches them all on.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..config import config_to_dict, parse_cli
from ..config.schema import RunConfig
from ..config.seed_flags import SeedFlagError, seed_bool_flags, translate_seed_flags
from ..utils.device import synchronize
from .edge_report import DEFAULT_RESERVE_GIB, format_report_table, jetson_fit, plot_peak_memory

__all__ = ["PROG", "main", "run", "synthetic_kv_calibration", "w4a4_from_artifacts"]

PROG = "infinity_w4a4_test"
STAGES = ("text_encoder", "transformer", "vae_decode", "total")
DEFAULT_PROMPT = "A photo of a red fox sitting in fresh snow, golden hour light, highly detailed"
SYNTHETIC_KV_RANGES = {"k": 1.0, "v": 4.0}
KV_VARIANTS = {"uint8": "w4a4_kv8", "uint4": "w4a4_kv4"}
# The original project's spelling of this program's flags.
SEED_VALUE_FLAGS = {"--base-path": "--artifacts"}
SEED_BOOL_FLAGS = seed_bool_flags({"kv": "kv-enabled"})
logger = logging.getLogger("deepcompressor.bench.w4a4_pipeline")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("W4A4 benchmark")
    group.add_argument("--artifacts", default=None,
                       help="PTQ artifact directory of this model (ptq_infinity output); also spelled --base-path")
    group.add_argument("--kv-calib", default=None,
                       help="KV calibration file (calibrate_cache_quantization output); the same as --kv-enabled "
                       "--kv-calib-path PATH (or --enable_kv_quant true)")
    group.add_argument("--kv-synthetic", action="store_true",
                       help="Quantize the KV cache with synthetic, uncalibrated per-channel scales (timing and "
                       "memory only)")
    group.add_argument("--kv-dtypes", nargs="+", default=None, choices=tuple(KV_VARIANTS),
                       help="KV formats to measure (default: every format the calibration holds)")
    group.add_argument("--kv-backend", default="auto", help="Quantized-KV attention backend (auto: measured)")
    group.add_argument("--prompt", default=DEFAULT_PROMPT)
    group.add_argument("--seed", type=int, default=0, help="Sampling seed (same for every variant)")
    group.add_argument("--warmup", type=int, default=2, help="Untimed generations per variant")
    group.add_argument("--repeats", type=int, default=3, help="Timed generations per variant (median reported)")
    group.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"), help="W4A4 kernels")
    group.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                       help="Replay per-scale CUDA graphs of the transformer (GPU)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the blocks' elementwise glue (every variant)")
    group.add_argument("--skip-baseline", action="store_true",
                       help="Measure the quantized variants only (no full-precision transformer is built)")
    group.add_argument("--save-images", default=None,
                       help="Folder of each variant's last image (default: next to the JSON)")
    group.add_argument("--json", dest="json_path", default=None,
                       help="Write the results here (default: <output.root>/w4a4_test/<pipeline.name>.json)")
    group.add_argument("--memory-breakdown", action="store_true",
                       help="Record the CUDA allocator's history and report, per variant, what was alive at the "
                       "timed runs' peak, by the line of code that allocated it (slower; bench.memory_breakdown)")
    group.add_argument("--jetson-reserve-gib", type=float, default=DEFAULT_RESERVE_GIB,
                       help="Shared memory a Jetson keeps for the OS and the CUDA context (feasible-module column)")


# ------------------------------------------------------------------------------------------------ pieces




def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (shared storages counted once)."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def text_encoder_bytes(text_encoder) -> int:
    """Bytes the text encoder holds between generations (its cached features only when it is released)."""
    if hasattr(text_encoder, "resident_bytes"):
        return text_encoder.resident_bytes
    return module_bytes(text_encoder.model)


def host_rss_gib() -> float:
    """The process's resident set now (Linux; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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


def _check_kv_file(cfg: RunConfig, args) -> list[str]:
    """Read the KV calibration before any model is built; returns the formats to measure."""
    from ..nn.kv_cache import KVCalibrationError, load_kv_calibration

    path = _kv_calib_path(cfg, args)
    if args.kv_synthetic:
        if path:
            raise ValueError(f"--kv-synthetic and a KV calibration file ({path}) were both given")
        return list(args.kv_dtypes or KV_VARIANTS)
    if not path:
        return []
    flag = "--kv-calib" if args.kv_calib else "--enable_kv_quant / kv.enabled: kv.calib_path"
    if not Path(path).is_file():
        raise ValueError(f"{flag}: {path} does not exist (write it with python -m "
                         "deepcompressor.app.diffusion.calibrate_cache_quantization, or pass --kv-calib PATH)")
    try:
        data = load_kv_calibration(path)
    except KVCalibrationError as error:
        raise ValueError(f"{flag}: {error}") from None
    arch = data["model"].get("arch")
    if arch != cfg.pipeline.arch:
        raise ValueError(f"{flag}: {path} holds KV scales of Infinity-{arch}, this config builds "
                         f"Infinity-{cfg.pipeline.arch}")
    held = [d for d in KV_VARIANTS if d in data["qparams"]]
    wanted = args.kv_dtypes or held
    missing = [d for d in wanted if d not in held]
    if missing:
        raise ValueError(f"{flag}: {path} holds no {', '.join(missing)} scales (it has {', '.join(held)})")
    return list(wanted)


def _attach_kv(model, cfg: RunConfig, args, dtype: str, workdir: Path) -> dict:
    from ..nn.kv_cache import attach_kv_qparams
    from ..utils.files import save_pt

    if args.kv_synthetic:
        path = workdir / "synthetic_kv_calib.pt"
        if not path.exists():
            save_pt(path, synthetic_kv_calibration(model))
        source = "synthetic (uncalibrated ranges: keys [-1, 1], values [-4, 4]; timing and memory only)"
    else:
        path = _kv_calib_path(cfg, args)
        source = str(path)
    params = attach_kv_qparams(model, path, dtype, backend=args.kv_backend)
    return {"source": source, "synthetic": bool(args.kv_synthetic), "dtype": params.dtype}


def w4a4_from_artifacts(model, directory: str | Path, backend: str = "auto"):
    """Load a PTQ artifact directory into the full-precision ``model`` (``load_artifacts`` + ``apply_artifacts``,
    which check that the model is the calibrated one) and convert its layers to ``W4A4Linear``; returns the bundle
    and the converted layer names. ``load_quantized_transformer`` builds the same model without ``model``."""
    from ..app.diffusion.artifacts import apply_artifacts, load_artifacts
    from ..nn.w4a4_linear import convert_to_w4a4

    bundle = load_artifacts(directory)
    apply_artifacts(model, bundle)
    return bundle, convert_to_w4a4(model, backend=backend)


def _layer_counts(model) -> dict:
    from ..nn.w4a4_linear import w4a4_layers

    layers = w4a4_layers(model)
    return {"num_layers": len(layers), "w4a4_inputs": sum(1 for m in layers.values() if m.ispec is not None),
            "weight_only": sum(1 for m in layers.values() if m.ispec is None)}


def _load_quantized(cfg: RunConfig, args, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The W4A4 transformer straight from the artifacts, with the load's own peak memory."""
    from infinity.precision import cast_nonblock_linears

    from ..app.diffusion.quantized_model import load_quantized_transformer

    _free_memory(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = host_rss_gib()
    start = time.perf_counter()
    model, bundle, _ = load_quantized_transformer(args.artifacts, device=device, dtype=cfg.pipeline.dtype,
                                                  backend=args.backend)
    cast_nonblock_linears(model, cfg.pipeline.nonblock_dtype)
    synchronize(device)
    how = {"source": "artifacts", "artifacts": str(args.artifacts), "quant": config_to_dict(bundle.config)["quant"],
           "synthetic_artifacts": bool(bundle.manifest.get("synthetic", False)),
           "load_seconds": time.perf_counter() - start, "load_host_rss_increase_gib": host_rss_gib() - rss_before}
    if device.type == "cuda":
        how["load_peak_gib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
        how["load_process_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del bundle
    return model, how


def _synthesize(pipe, cfg: RunConfig, args) -> dict:
    from ..nn.w4a4_linear import synthesize_w4a4

    start = time.perf_counter()
    synthesize_w4a4(pipe.transformer, cfg.quant, seed=cfg.pipeline.seed, backend=args.backend)
    synchronize(pipe.device)
    return {"source": "synthetic", "note": "round-to-nearest residual of a seeded random low-rank branch and "
            "smoothing, built from the loaded weights: for latency and memory, not quality",
            "quant": config_to_dict(cfg)["quant"], "load_seconds": time.perf_counter() - start}


def _free_cached_graphs(pipe) -> None:
    """Drop the sampler's captured CUDA graphs (they hold the memory of the modules they were captured with)."""
    if getattr(pipe.transformer, "_cuda_graph_stepper", None) is not None:
        pipe.transformer._cuda_graph_stepper = None
    _free_memory(pipe.device)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure(pipe, cfg: RunConfig, args, label: str, host_base_gib: float) -> tuple[dict, object]:
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
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trace_start = _trace_length(device) if args.memory_breakdown else None
    runs, result = [], None
    for i in range(args.repeats):
        result = generate()
        runs.append(dict(result.timings))
        logger.info("%s run %d: %s", label, i, {k: round(v, 4) for k, v in result.timings.items()})
    cuda = device.type == "cuda"
    breakdown = _breakdown_since(device, trace_start) if trace_start is not None else None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    peak_reserved = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None
    # A prompt the text encoder has not seen: with pipeline.release_text_encoder the encoder is loaded again,
    # next to everything the transformer keeps, so this generation has its own peak.
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    pipe.generate([f"{args.prompt}, {label}"], seed=args.seed, cfg=p.cfg, tau=p.tau, top_k=p.top_k, top_p=p.top_p,
                  pn=p.pn, h_div_w=p.h_div_w, cuda_graphs=graphs)
    synchronize(device)
    new_prompt = {"seconds": time.perf_counter() - start,
                  "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                  "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None}
    median = {stage: statistics.median(r[stage] for r in runs) for stage in STAGES}
    host_model = host_rss_gib() - host_base_gib
    stats = {
        "median_seconds": median,
        "runs": runs,
        "warmup_seconds": warmup_seconds,
        "peak_memory_gib": peak,
        "peak_reserved_gib": peak_reserved,
        "new_prompt": new_prompt,
        "resident_gib": torch.cuda.memory_allocated(device) / 2**30 if cuda else None,
        "transformer_gib": module_bytes(pipe.transformer) / 2**30,
        "kv_cache_gib": result.sample.kv_cache_bytes / 2**30,
        "text_encoder_gib": text_encoder_bytes(pipe.text_encoder) / 2**30,
        "vae_gib": module_bytes(pipe.vae) / 2**30,
        "host_model_gib": host_model,
        "cuda_graphs": graphs,
        # Kernel compilation, backend measurement and graph capture happen in the first generation.
        "first_generation_extra_seconds": warmup_seconds[0] - median["total"] if warmup_seconds else None,
    }
    if breakdown is not None:
        stats["memory_breakdown"] = breakdown
        logger.info("%s: %.3f GiB allocated at the timed runs' peak: %s", label, breakdown["peak_gib"],
                    "; ".join(f"{row['gib']:.3f} {row['site']}" for row in breakdown["sites"][:12]))
    worst = max(peak_reserved, new_prompt["peak_reserved_gib"]) if cuda else None
    stats["jetson"] = jetson_fit(worst, host_model, args.jetson_reserve_gib)
    return stats, result


def _trace_length(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return len(torch.cuda.memory._snapshot()["device_traces"][device.index or 0])


def _breakdown_since(device: torch.device, start: int) -> dict:
    """What was alive at the largest allocated total since trace event ``start``, by allocation site."""
    from .memory_breakdown import peak_breakdown

    return peak_breakdown(torch.cuda.memory._snapshot()["device_traces"][device.index or 0], start=start)


def _bit_agreement(reference, result) -> dict:
    per_scale = [float((a.cpu() == b.cpu()).float().mean()) for a, b in zip(reference.sample.bits, result.sample.bits)]
    total = sum(b.numel() for b in reference.sample.bits)
    equal = sum(int((a.cpu() == b.cpu()).sum()) for a, b in zip(reference.sample.bits, result.sample.bits))
    return {"overall": equal / total, "per_scale": per_scale}


def _save_image(result, path: Path) -> str:
    from ..utils.files import write_png

    write_png(path, result.images[0])
    logger.info("wrote %s", path)
    return str(path)


def default_json_path(cfg: RunConfig) -> Path:
    return Path(cfg.output.root) / "w4a4_test" / f"{cfg.pipeline.name}.json"


# ------------------------------------------------------------------------------------------------ run


def _artifact_identity(directory: str) -> dict:
    """The model identity of an artifact directory's manifest (the files are checked when they are loaded)."""
    from ..app.diffusion.artifacts import read_manifest

    return read_manifest(directory)["model"]


def _check_inputs(cfg: RunConfig, args) -> list[str]:
    """Everything that can be checked before a model is built; returns the KV formats to measure."""
    if args.artifacts is None and cfg.quant.wgts.dtype is None:
        raise ValueError("no --artifacts / --base-path and quant.wgts.dtype is null: stack "
                         "configs/svdquant/int4.yaml to synthesize W4A4 layers, or give the PTQ artifact directory")
    if args.artifacts:
        identity = _artifact_identity(args.artifacts)
        if identity["arch"] != cfg.pipeline.arch:
            raise ValueError(f"--artifacts {args.artifacts}: made for Infinity-{identity['arch']}, the config builds "
                             f"Infinity-{cfg.pipeline.arch}")
    if args.warmup < 0 or args.repeats < 1:
        raise ValueError(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}")
    return _check_kv_file(cfg, args)


def run(cfg: RunConfig, args) -> dict:
    from infinity.model import enable_compile
    from infinity.pipeline import pipeline_from_config
    from infinity.schedules import get_scale_schedule, tokens_per_scale

    kv_dtypes = _check_inputs(cfg, args)
    image_dir = Path(args.save_images) if args.save_images else Path(args.json_path).parent
    image_stem = Path(args.json_path).stem
    device_probe = torch.device(cfg.pipeline.device if cfg.pipeline.device != "auto" else
                                ("cuda" if torch.cuda.is_available() else "cpu"))
    if device_probe.type == "cuda":
        torch.zeros(1, device=device_probe)  # the CUDA context belongs to the reserve, not to the model
    host_base = host_rss_gib()
    if args.memory_breakdown and device_probe.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=4_000_000)
    baseline = not args.skip_baseline
    start = time.perf_counter()
    quantized_how = None
    if baseline or not args.artifacts:
        pipe = pipeline_from_config(cfg.pipeline)
    else:
        model, quantized_how = _load_quantized(cfg, args, device_probe)
        pipe = pipeline_from_config(cfg.pipeline, transformer=model)
    synchronize(pipe.device)
    load_seconds = time.perf_counter() - start
    enable_compile(args.compile)
    device = pipe.device
    schedule = get_scale_schedule(cfg.pipeline.pn, cfg.pipeline.h_div_w)
    p = cfg.pipeline
    res = {
        "arch": p.arch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "block_dtype": str(pipe.transformer.block_dtype).removeprefix("torch."),
        "pn": p.pn, "tokens": sum(tokens_per_scale(schedule)), "cfg": p.cfg, "tau": p.tau,
        "prompt": args.prompt, "seed": args.seed, "warmup": args.warmup, "repeats": args.repeats,
        "backend": args.backend, "compile": bool(args.compile), "load_seconds": load_seconds,
        "memory_options": {"release_text_encoder": p.release_text_encoder, "vae_tiled": p.vae_tiled, "vae_tile_rows": p.vae_tile_rows,
                           "nonblock_dtype": p.nonblock_dtype, "cuda_graph_pool": "one pool shared by the scales"},
        "jetson_reserve_gib": args.jetson_reserve_gib,
        "host_base_gib": host_base,
        "variants": {},
        "images": {},
    }
    variants = res["variants"]
    reference = None

    def record(name: str, stats: dict, result) -> None:
        variants[name] = stats
        res["image_hw"] = list(result.images.shape[1:3])
        if reference is not None and name != "baseline":
            stats["bit_agreement_vs_baseline"] = _bit_agreement(reference, result)
        res["images"][name] = _save_image(result, image_dir / f"{image_stem}.{name}.png")

    if baseline:
        stats, reference = _measure(pipe, cfg, args, "baseline", host_base)
        record("baseline", stats, reference)
        _free_cached_graphs(pipe)
        if args.artifacts:
            pipe.transformer = None
            model, quantized_how = _load_quantized(cfg, args, device)
            pipe.transformer = model
    if quantized_how is None:
        quantized_how = _synthesize(pipe, cfg, args)
    res["quantization"] = {**quantized_how, **_layer_counts(pipe.transformer)}
    if "load_peak_gib" in quantized_how:
        res["quantized_load_peak_gib"] = quantized_how["load_peak_gib"]
        res["quantized_load_seconds"] = quantized_how["load_seconds"]
    _free_cached_graphs(pipe)
    stats, result = _measure(pipe, cfg, args, "w4a4", host_base)
    record("w4a4", stats, result)
    with tempfile.TemporaryDirectory() as workdir:
        for dtype in kv_dtypes:
            res["kv"] = _attach_kv(pipe.transformer, cfg, args, dtype, Path(workdir))
            _free_cached_graphs(pipe)
            stats, result = _measure(pipe, cfg, args, KV_VARIANTS[dtype], host_base)
            stats["kv_dtype"] = dtype
            record(KV_VARIANTS[dtype], stats, result)
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


def format_table(res: dict) -> str:
    table = format_report_table(res)
    if res["device"] == "cpu":
        table += f"\n(CPU: no per-run GPU peak; process peak RSS {res['peak_rss_gib']:.2f} GiB)"
    return table


def main(argv: list[str] | None = None) -> int:
    from ..utils.files import write_json

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv = translate_seed_flags(argv, value_flags=SEED_VALUE_FLAGS, bool_flags=SEED_BOOL_FLAGS)
    except SeedFlagError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    cfg, args = parse_cli(PROG, argv, add_arguments=add_arguments,
                          description="Latency and memory of Infinity with real W4A4 layers vs the 16-bit baseline.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args.json_path = str(args.json_path or default_json_path(cfg))
    try:
        res = run(cfg, args)
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    res["config"] = config_to_dict(cfg)
    print(format_table(res))
    chart = plot_peak_memory(res, Path(args.json_path).with_suffix(".memory.png"))
    if chart is not None:
        res["memory_chart"] = str(chart)
        print(f"wrote {chart}")
    write_json(args.json_path, res)
    print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
