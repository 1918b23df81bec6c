"""Image quality of a fake-quantized Infinity model, as the paper measures it.

Two steps, the same command with different toggles:

    # 1. the full-precision reference (every quantization toggle off) into REF
    python -m evaluation.benchmark_assembled_model configs/models/infinity-8b.yaml configs/svdquant/int4.yaml \\
        --gen-root REF --eval-benchmarks MJHQ DCI --eval-num-samples 5000
    # 2. the quantized model into GEN, scored against REF
    python -m evaluation.benchmark_assembled_model configs/models/infinity-8b.yaml configs/svdquant/int4.yaml \\
        --ref-root REF --gen-root GEN --base-path ARTIFACTS --enable_weight_quant true \\
        --enable_activation_quant true --enable_kv_quant true --eval-benchmarks MJHQ DCI \\
        --eval-num-samples 5000 --eval-gt-metrics clip_iqa clip_score fid image_reward psnr ssim lpips

Each toggle changes exactly what it names:

- ``--enable_weight_quant``: the PTQ artifacts' quantized weights (smoothing and low-rank branch as calibrated),
  16-bit layer inputs unless activations are on too;
- ``--enable_activation_quant``: 4-bit layer inputs; with weights off, the float weights (kept from the model)
  take the place of the quantized residual;
- ``--enable_kv_quant``: the quantized KV cache of ``kv.calib_path`` (default ``runs/kv_scales/kv_quant_calib.pt``;
  an error when it is missing).

Prompts: ``eval.benchmarks`` (MJHQ-30K and sDCI from local folders, ``eval.mjhq_root`` / ``eval.dci_root``, or a
YAML ``id: caption`` file), a seeded subset of ``eval.num_samples`` each (stratified by MJHQ category), without the
calibration prompts; none given: the shipped smoke set. Sample ``i`` of a benchmark is generated with seed
``eval.seed + i`` and the sampling settings of ``pipeline.*``, so REF and GEN hold the same prompts and seeds.

Outputs in ``--gen-root``: ``samples/<benchmark>/<id>.png`` (a re-run generates only the missing ones),
``results.json`` (every metric per benchmark, the resolved config, artifact and KV-file hashes, timings),
``results.md``, ``grid.png`` (rows = prompts, columns = reference and this run) and ``config.yaml``.

Several processes: ``torchrun --nproc-per-node N -m evaluation.benchmark_assembled_model ...`` shards the samples
over the ranks (gloo on CPU, NCCL on GPU); each rank writes its images, rank 0 computes the metrics after a barrier.

Today's flags stay: ``--artifacts`` (= ``--base-path``) and ``--out`` (= ``--gen-root``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepcompressor.app.diffusion.artifacts import IDENTITY_KEYS, ArtifactError, load_artifacts
from deepcompressor.app.diffusion.capture import PromptFileError, load_prompt_set
from deepcompressor.config import RunConfig, parse_cli, save_config
from deepcompressor.config.dump import config_to_dict
from deepcompressor.config.seed_flags import SeedFlagError, seed_bool_flags
from deepcompressor.config.seed_flags import translate_seed_flags as translate_flags
from deepcompressor.utils.files import sha256_file, sha256_json, write_json, write_text

from .distributed import DistContext, init_distributed
from .grid import comparison_grid
from .imageio import read_png, write_png

__all__ = ["PROG", "EvalError", "main", "run", "translate_seed_flags", "variant_name"]

PROG = "benchmark_assembled_model"
logger = logging.getLogger(__name__)
GRID_ROWS = 8


class EvalError(Exception):
    """A problem found before or during the benchmark, reported on one line (exit code 2 before any generation)."""


# ---------------------------------------------------------------------------------------------------------------
# The seed's flags


_VALUE_FLAGS = {"--ref-root": "--eval-ref-root", "--gen-root": "--eval-gen-root", "--base-path": "--eval-artifacts",
                "--artifacts": "--eval-artifacts", "--out": "--eval-gen-root"}
_BOOL_FLAGS = seed_bool_flags({what: f"eval-enable-{what}-quant" for what in ("weight", "activation", "kv")})
_LIST_FLAGS = ("--eval-benchmarks", "--eval-gt-metrics")


def translate_seed_flags(argv: list[str]) -> list[str]:
    """The seed's spelling -> this project's flags: ``--enable_weight_quant true`` -> ``--eval-enable-weight-quant``,
    space-separated lists (``--eval-benchmarks MJHQ DCI``) -> comma-separated, ``--base-path`` / ``--ref-root`` /
    ``--gen-root`` (and today's ``--artifacts`` / ``--out``) -> their ``eval.*`` keys."""
    try:
        return translate_flags(argv, value_flags=_VALUE_FLAGS, bool_flags=_BOOL_FLAGS, list_flags=_LIST_FLAGS)
    except SeedFlagError as error:
        raise EvalError(str(error)) from None


# ---------------------------------------------------------------------------------------------------------------
# What this run is


def variant_name(cfg: RunConfig) -> str:
    """``reference`` with every toggle off, else the quantized parts: ``w4a4``, ``w4a16``, ``a4``, ``+kv8``..."""
    e = cfg.eval
    parts = []
    if e.enable_weight_quant or e.enable_activation_quant:
        w = cfg.quant.wgts.dtype[-1] if e.enable_weight_quant and cfg.quant.wgts.dtype else "16"
        a = cfg.quant.ipts.dtype[-1] if e.enable_activation_quant and cfg.quant.ipts.dtype else "16"
        parts.append(f"w{w}a{a}")
    if e.enable_kv_quant:
        parts.append("kv" + ("8" if cfg.kv.dtype == "uint8" else "4"))
    return "+".join(parts) or "reference"


def _quantized(cfg: RunConfig) -> bool:
    return cfg.eval.enable_weight_quant or cfg.eval.enable_activation_quant


@dataclass(frozen=True)
class BenchmarkSet:
    name: str
    samples: list  # evaluation.benchmarks.Sample


def _calibration_captions(cfg: RunConfig) -> list[str]:
    try:
        return [c for _, c in load_prompt_set(cfg.collect.prompts, 0, cfg.collect.num_prompts)]
    except PromptFileError:
        return []  # no readable calibration set: nothing to exclude (the PTQ run checked its own)


def resolve_benchmarks(cfg: RunConfig) -> list[BenchmarkSet]:
    """The prompt sets of this run, each checked and subset (no image is read, no model built)."""
    from .benchmarks import (
        DatasetMissingError,
        canonical_benchmark,
        check_benchmark,
        load_samples,
        prompt_file_samples,
        smoke_samples,
    )

    e = cfg.eval
    exclude = _calibration_captions(cfg)
    if not e.benchmarks:
        return [BenchmarkSet("smoke", smoke_samples(e.num_samples, e.seed, exclude_captions=exclude))]
    sets = []
    for name in e.benchmarks:
        path = Path(name)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise EvalError(f"eval.benchmarks: prompt file {path} not found")
            try:
                samples = prompt_file_samples(path, e.num_samples, e.seed, exclude_captions=exclude)
            except ValueError as error:
                raise EvalError(str(error)) from None
            sets.append(BenchmarkSet(path.stem, samples))
            continue
        try:
            canonical = canonical_benchmark(name)
        except ValueError as error:
            raise EvalError(f"eval.benchmarks: {error}") from None
        key = "eval.mjhq_root" if canonical == "MJHQ" else "eval.dci_root"
        root = e.mjhq_root if canonical == "MJHQ" else e.dci_root
        try:
            check_benchmark(canonical, root or None, key)
            samples = load_samples(canonical, root=root or None, num_samples=e.num_samples, seed=e.seed, key=key,
                                   exclude_captions=exclude)
        except (DatasetMissingError, ValueError) as error:
            raise EvalError(str(error)) from None
        sets.append(BenchmarkSet(canonical, samples))
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise EvalError(f"eval.benchmarks: a benchmark is named twice ({', '.join(names)})")
    return sets


def _gen_root(cfg: RunConfig) -> Path:
    if cfg.eval.gen_root:
        return Path(cfg.eval.gen_root)
    if cfg.eval.artifacts and _quantized(cfg):
        return Path(cfg.eval.artifacts) / "eval" / variant_name(cfg)
    return Path(cfg.output.root) / "eval" / cfg.pipeline.name / variant_name(cfg)


@dataclass
class Preflight:
    gen_root: Path
    ref_root: Path | None
    benchmarks: list[BenchmarkSet]
    bundle: object | None
    kv_data: dict | None
    identity: dict


def preflight(cfg: RunConfig) -> Preflight:
    """Every check that needs no model: toggles against the files they read, datasets, the output folder's
    previous run."""
    from deepcompressor.nn.kv_cache import KVCalibrationError, load_kv_calibration

    e = cfg.eval
    bundle = None
    if _quantized(cfg):
        if not e.artifacts:
            raise EvalError("--enable_weight_quant / --enable_activation_quant read the PTQ artifacts: pass "
                            "--base-path DIR (the folder ptq_infinity printed)")
        try:
            bundle = load_artifacts(e.artifacts)
        except ArtifactError as error:
            raise EvalError(str(error)) from None
        differing = [k for k in IDENTITY_KEYS if getattr(cfg.pipeline, k) != getattr(bundle.config.pipeline, k)]
        if differing:
            raise EvalError(f"{e.artifacts}: the artifacts were made for another model (pipeline."
                            f"{', pipeline.'.join(differing)} differ from this config's)")
    kv_data = None
    if e.enable_kv_quant:
        try:
            kv_data = load_kv_calibration(cfg.kv.calib_path)
        except KVCalibrationError as error:
            raise EvalError(f"--enable_kv_quant: kv.calib_path: {error}") from None
        if kv_data["model"].get("arch") != cfg.pipeline.arch:
            raise EvalError(f"kv.calib_path: {cfg.kv.calib_path} holds KV scales of Infinity-"
                            f"{kv_data['model'].get('arch')}, this config builds Infinity-{cfg.pipeline.arch}")
    ref_root = Path(e.ref_root) if e.ref_root else None
    if ref_root is not None and not ref_root.is_dir():
        raise EvalError(f"--ref-root: {ref_root} is not a folder (the --gen-root of the reference run)")
    benchmarks = resolve_benchmarks(cfg)
    identity = _identity(cfg, bundle)
    gen_root = _gen_root(cfg)
    previous = gen_root / "generation.json"
    if previous.is_file():
        held = json.loads(previous.read_text())
        if held.get("fingerprint") != identity["fingerprint"]:
            changed = sorted(k for k in identity["settings"] if held.get("settings", {}).get(k)
                             != identity["settings"][k])
            raise EvalError(f"--gen-root: {gen_root} holds the images of another run (it differs in "
                            f"{', '.join(changed) or 'its settings'}); choose another folder or delete it")
    return Preflight(gen_root, ref_root, benchmarks, bundle, kv_data, identity)


def _identity(cfg: RunConfig, bundle) -> dict:
    """What decides the images: model, sampling, toggles and the files they read (a re-run may reuse images only
    when all of it is equal)."""
    p, e = cfg.pipeline, cfg.eval
    settings = {f"pipeline.{k}": getattr(p, k) for k in
                ("arch", "transformer_path", "vae_path", "text_encoder_path", "random_init", "seed", "dtype", "pn",
                 "h_div_w", "cfg", "tau", "top_k", "top_p")}
    settings.update({"eval.seed": e.seed, "variant": variant_name(cfg)})
    if bundle is not None:
        settings["artifacts.manifest_sha256"] = sha256_file(Path(e.artifacts) / "manifest.json")
    if e.enable_kv_quant:
        settings["kv.calib_sha256"] = sha256_file(cfg.kv.calib_path)
        settings["kv.dtype"] = cfg.kv.dtype
    return {"fingerprint": sha256_json(settings), "settings": settings}


# ---------------------------------------------------------------------------------------------------------------
# Generation


def _apply_variant(pipe, cfg: RunConfig, pre: Preflight) -> dict:
    """Swap in what the toggles name; returns counts for the results."""
    from deepcompressor.app.diffusion.artifacts import apply_artifacts
    from deepcompressor.nn.fake_linear import FakeQuantLinear
    from deepcompressor.nn.kv_cache import KVCalibrationError, attach_kv_qparams, check_kv_identity

    e = cfg.eval
    applied = {"quantized_layers": 0, "kv": None}
    if pre.kv_data is not None:  # checked against the model before its weights are swapped
        try:
            check_kv_identity(pre.kv_data, pipe.transformer, cfg.kv.calib_path)
        except KVCalibrationError as error:
            raise EvalError(f"kv.calib_path: {error}") from None
    if pre.bundle is not None:
        apply_artifacts(pipe.transformer, pre.bundle, keep_float_weight=not e.enable_weight_quant)
        for module in pipe.transformer.modules():
            if isinstance(module, FakeQuantLinear):
                module.quant_weights = e.enable_weight_quant and module.wgts is not None
                module.quant_inputs = e.enable_activation_quant and module.ipts is not None
                applied["quantized_layers"] += 1
    if pre.kv_data is not None:
        attach_kv_qparams(pipe.transformer, cfg.kv.calib_path, cfg.kv.dtype)
        applied["kv"] = cfg.kv.dtype
    return applied


def _image_path(root: Path, benchmark: str, sample_id: str) -> Path:
    return root / "samples" / benchmark / f"{sample_id}.png"


def _generate(pipe, cfg: RunConfig, pre: Preflight, dist: DistContext) -> dict:
    """This rank's share of every benchmark's missing images; returns counts and seconds."""
    from tqdm import tqdm

    p = cfg.pipeline
    work = [(bench.name, i, s) for bench in pre.benchmarks for i, s in enumerate(bench.samples)]
    mine = work[dist.rank :: dist.world_size]
    todo = [(b, i, s) for b, i, s in mine if not _image_path(pre.gen_root, b, s.sample_id).is_file()]
    start = time.perf_counter()
    for bench, index, sample in tqdm(todo, desc=f"generate (rank {dist.rank})" if dist.world_size > 1 else "generate",
                                     unit="image", disable=not todo):
        result = pipe.generate([sample.caption], seed=cfg.eval.seed + index, cfg=p.cfg, tau=p.tau, top_k=p.top_k,
                               top_p=p.top_p, pn=p.pn, h_div_w=p.h_div_w)
        write_png(_image_path(pre.gen_root, bench, sample.sample_id), result.images[0])
    seconds = time.perf_counter() - start
    return {"assigned": len(mine), "generated": len(todo), "reused": len(mine) - len(todo), "seconds": seconds}


# ---------------------------------------------------------------------------------------------------------------
# Metrics and reports


def _metric_models(cfg: RunConfig):
    from .metrics import MetricModels

    e = cfg.eval
    return MetricModels(inception=e.inception_weights or None, clip=e.clip_path or None,
                        lpips=e.lpips_weights or None, image_reward=e.image_reward_path or None)


def score(cfg: RunConfig, pre: Preflight, models=None) -> dict:
    """Every metric of ``eval.gt_metrics`` per benchmark, from the images on disk."""
    from PIL import Image

    from .metrics import PAIRED, compute_metrics

    e = cfg.eval
    models = models if models is not None else _metric_models(cfg)
    out = {}
    for bench in pre.benchmarks:
        images = [read_png(_image_path(pre.gen_root, bench.name, s.sample_id)) for s in bench.samples]
        captions = [s.caption for s in bench.samples]
        references, ref_note = None, "no --ref-root given (the --gen-root of the same command with every toggle off)"
        if pre.ref_root is not None:
            paths = [_image_path(pre.ref_root, bench.name, s.sample_id) for s in bench.samples]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                ref_note = f"{len(missing)} of {len(paths)} reference images missing in {pre.ref_root} (first: " \
                           f"{missing[0]})"
            else:
                references = [read_png(p) for p in paths]
        real = None  # the dataset's photos are read only for FID
        if "fid" in e.gt_metrics and all(s.image_path is not None and Path(s.image_path).is_file()
                                         for s in bench.samples):
            real = [np.asarray(Image.open(s.image_path).convert("RGB")) for s in bench.samples]
        fid_cache = Path(e.fid_cache) / f"{bench.name}.pt" if e.fid_cache and real is not None else None
        metrics = compute_metrics(e.gt_metrics, images=images, captions=captions, references=references,
                                  real_images=real, models=models, fid_cache=fid_cache,
                                  device=_device_of(cfg))
        if references is None:
            for name in PAIRED:
                if name in metrics and "skipped" in metrics[name]:
                    metrics[name] = {"skipped": f"{metrics[name]['skipped']}: {ref_note}"}
        out[bench.name] = {"num_samples": len(bench.samples), "metrics": metrics}
    return out


def _device_of(cfg: RunConfig) -> str:
    import torch

    device = cfg.pipeline.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_markdown(results: dict) -> str:
    metrics = results["config"]["eval"]["gt_metrics"]
    lines = [f"# Quality of {results['model']}: {results['variant']}", "",
             f"Images in `{results['gen_root']}`; paired metrics against `{results['ref_root'] or '-'}`.", "",
             "| benchmark | samples | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    skipped = []
    for bench, entry in results["benchmarks"].items():
        cells = []
        for name in metrics:
            m = entry["metrics"].get(name, {})
            if "skipped" in m:
                cells.append("skipped")
                skipped.append(f"- {bench} {name}: {m['skipped']}")
            else:
                cells.append(_fmt(m.get("value")))
        lines.append(f"| {bench} | {entry['num_samples']} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Skipped:", *skipped]
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings"].items()), ""]
    return "\n".join(lines)


def _write_grid(pre: Preflight, results_dir: Path) -> Path | None:
    """Rows = the first prompts of the first benchmark that both runs hold, columns = reference and this run."""
    if pre.ref_root is None:
        return None
    for bench in pre.benchmarks:
        rows = []
        for s in bench.samples[:GRID_ROWS]:
            ref, gen = _image_path(pre.ref_root, bench.name, s.sample_id), _image_path(pre.gen_root, bench.name,
                                                                                       s.sample_id)
            if ref.is_file() and gen.is_file():
                rows.append((s.sample_id, [read_png(ref), read_png(gen)]))
        if rows:
            return comparison_grid(rows, ["reference", "quantized"]).save_png(results_dir / "grid.png")
    return None


# ---------------------------------------------------------------------------------------------------------------
# Run


def run(cfg: RunConfig, *, dist: DistContext | None = None, models=None) -> dict | None:
    """Check, generate this rank's images, and (rank 0) score and write the reports. Returns the results on rank
    0, None elsewhere. Raises ``EvalError`` for every problem found before the generations."""
    from infinity.pipeline import pipeline_from_config

    dist = dist or DistContext()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    pre = preflight(cfg)  # every rank checks: a problem stops all of them before any model is built
    timings["preflight"] = time.perf_counter() - start
    if dist.rank == 0:
        pre.gen_root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, pre.gen_root / "config.yaml")
        write_json(pre.gen_root / "generation.json", pre.identity)
    dist.barrier()

    start = time.perf_counter()
    p = cfg.pipeline
    if dist.device is not None:
        p.device = dist.device
    logger.info("building %s (arch %s, device %s, dtype %s): %s", p.name, p.arch, p.device, p.dtype,
                variant_name(cfg))
    pipe = pipeline_from_config(p)
    applied = _apply_variant(pipe, cfg, pre)
    timings["build_model"] = time.perf_counter() - start
    generation = _generate(pipe, cfg, pre, dist)
    timings["generate"] = generation.pop("seconds")
    counts = dist.gather_object(generation)
    dist.barrier()
    if dist.rank != 0:
        return None

    start = time.perf_counter()
    benchmarks = score(cfg, pre, models)
    timings["metrics"] = time.perf_counter() - start
    results = {
        "model": p.name,
        "variant": variant_name(cfg),
        "toggles": {k: getattr(cfg.eval, k) for k in
                    ("enable_weight_quant", "enable_activation_quant", "enable_kv_quant")},
        "gen_root": str(pre.gen_root),
        "ref_root": str(pre.ref_root) if pre.ref_root else None,
        "world_size": dist.world_size,
        "applied": applied,
        "files": pre.identity["settings"],
        "benchmarks": benchmarks,
        "samples": {b.name: [s.sample_id for s in b.samples] for b in pre.benchmarks},
        "generation_per_rank": counts,
        "timings": timings,
        "config": config_to_dict(cfg),
    }
    write_json(pre.gen_root / "results.json", results)
    write_text(pre.gen_root / "results.md", results_markdown(results))
    grid = _write_grid(pre, pre.gen_root)
    if grid is not None:
        results["grid"] = str(grid)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = translate_seed_flags(argv)
    except EvalError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    # Every flag is a config key (--eval-*); the seed's spellings were translated above.
    cfg, _ = parse_cli(PROG, argv, description="Image quality of a fake-quantized model (FID, CLIP score, "
                       "CLIP-IQA, ImageReward, PSNR, SSIM, LPIPS) on MJHQ, sDCI or the shipped prompts.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    dist = init_distributed(cfg.pipeline.device)
    try:
        results = run(cfg, dist=dist)
    except EvalError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        dist.shutdown()
        return 2
    dist.shutdown()
    if results is not None:
        print(f"results: {Path(results['gen_root']) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
