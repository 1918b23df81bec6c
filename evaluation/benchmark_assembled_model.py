"""Image quality of a fake-quantized Infinity model against its full-precision self.

    python -m evaluation.benchmark_assembled_model configs/models/infinity-tiny.yaml \
        --artifacts runs/infinity-tiny.qdiff.int4.fast [--out DIR] [--set eval.num_prompts=8]

The model of ``pipeline`` generates the held-out prompts (``collect.prompts`` from ``eval.prompt_offset``, the next
``eval.num_prompts``; seed ``eval.seed + i``; the sampling settings of ``pipeline.*``) three times, each with the
same prompts and seeds:

1. ``fp``: full precision;
2. ``quant``: after ``apply_artifacts`` swapped in the PTQ artifacts' fake-quant layers (W4A4);
3. ``quant_kv`` (only when ``kv.enabled``): the same model reading a quantized KV cache (``kv.calib_path``).

Every quantized image is scored against the full-precision one of its prompt: PSNR (dB, data range 255, float64)
and SSIM (torchmetrics, when installed; else left out), and the share of sampled bits that agree (free-running
generations: once one bit differs, later scales condition on different inputs, so this measures divergence, not a
teacher-forced error). PSNR of identical images is infinite: ``results.json`` stores it as ``null`` and the means
leave it out (``identical`` counts those prompts).

Outputs in ``--out`` (default ``<artifacts>/eval``): ``fp/<id>.png``, ``quant/<id>.png`` (``quant_kv/<id>.png``),
``results.json`` (per prompt, means, per-stage timings), ``results.md`` and the resolved ``config.yaml``.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from deepcompressor.app.diffusion.artifacts import IDENTITY_KEYS, ArtifactError, apply_artifacts, load_artifacts
from deepcompressor.app.diffusion.capture import load_prompt_set
from deepcompressor.config import RunConfig, parse_cli, save_config
from deepcompressor.utils.files import write_bytes_atomic, write_json, write_text

__all__ = [
    "PROG",
    "bit_agreement",
    "image_scores",
    "main",
    "psnr_float64",
    "run",
    "write_png",
]

PROG = "benchmark_assembled_model"
DATA_RANGE = 255.0
logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def psnr_float64(image: torch.Tensor, reference: torch.Tensor, data_range: float = DATA_RANGE) -> float:
    """PSNR in dB of ``image`` against ``reference`` (same shape, any dtype), computed in float64; ``inf`` when
    they are identical."""
    if image.shape != reference.shape:
        raise ValueError(f"image shape {tuple(image.shape)} differs from the reference's {tuple(reference.shape)}")
    mse = float((image.double() - reference.double()).square().mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range * data_range / mse)


def _torchmetrics_image():
    try:
        from torchmetrics.functional import image
    except ImportError:
        return None
    return image


def image_scores(image: torch.Tensor, reference: torch.Tensor) -> dict:
    """``{"psnr", "ssim", "backend"}`` of a ``[H, W, 3]`` uint8 image against its reference (data range 255).

    PSNR is always :func:`psnr_float64` (``inf`` for identical images): torchmetrics' PSNR returns a float32
    value, about 1e-8 relative off the float64 one. SSIM comes from torchmetrics on float64 ``[1, 3, H, W]`` tensors
    when it is installed, else it is ``None``."""
    psnr = psnr_float64(image, reference)
    metrics = _torchmetrics_image()
    if metrics is None:
        return {"psnr": psnr, "ssim": None, "backend": "float64"}
    x = image.double().permute(2, 0, 1).unsqueeze(0)
    y = reference.double().permute(2, 0, 1).unsqueeze(0)
    ssim = float(metrics.structural_similarity_index_measure(x, y, data_range=DATA_RANGE))
    return {"psnr": psnr, "ssim": ssim, "backend": "torchmetrics"}


def bit_agreement(bits: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Share of equal sampled bits over every scale (``SampleResult.bits``: ``[B, H_k, W_k, d]`` per scale)."""
    if len(bits) != len(reference):
        raise ValueError(f"{len(bits)} scales of bits vs {len(reference)} in the reference")
    equal = total = 0
    for a, b in zip(bits, reference):
        if a.shape != b.shape:
            raise ValueError(f"bits of shape {tuple(a.shape)} vs {tuple(b.shape)} in the reference")
        equal += int((a.cpu() == b.cpu()).sum())
        total += a.numel()
    return equal / total if total else float("nan")


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _mean(values) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


# ---------------------------------------------------------------------------------------------------------------
# Generation


def write_png(path: Path, image: torch.Tensor) -> Path:
    """``[H, W, 3]`` uint8 RGB -> PNG, written atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.cpu().numpy()), mode="RGB").save(buffer, format="PNG")
    return write_bytes_atomic(path, buffer.getvalue())


def _generate_all(pipe, prompts: list[tuple[str, str]], cfg: RunConfig, variant: str, out_dir: Path) -> list[dict]:
    """Generate every prompt (one per call) and save its PNG; returns image, bits and timings per prompt."""
    p = cfg.pipeline
    outputs = []
    for i, (prompt_id, caption) in enumerate(tqdm(prompts, desc=variant, unit="prompt")):
        result = pipe.generate([caption], seed=cfg.eval.seed + i, cfg=p.cfg, tau=p.tau, top_k=p.top_k,
                               top_p=p.top_p, pn=p.pn, h_div_w=p.h_div_w)
        image = result.images[0]
        write_png(out_dir / variant / f"{prompt_id}.png", image)
        outputs.append({"image": image, "bits": [b.cpu() for b in result.sample.bits], "timings": result.timings})
    return outputs


def _mean_timings(outputs: list[dict]) -> dict[str, float]:
    keys = outputs[0]["timings"].keys()
    return {k: sum(o["timings"][k] for o in outputs) / len(outputs) for k in keys}


def _compare(variant: str, outputs: list[dict], reference: list[dict], prompts) -> dict:
    rows = []
    for (prompt_id, caption), out, ref in zip(prompts, outputs, reference):
        scores = image_scores(out["image"], ref["image"])
        rows.append({"prompt_id": prompt_id, "caption": caption, "psnr": _finite_or_none(scores["psnr"]),
                     "identical": math.isinf(scores["psnr"]), "ssim": scores["ssim"],
                     "bit_agreement": bit_agreement(out["bits"], ref["bits"]), "backend": scores["backend"]})
    mean = {"psnr": _mean(r["psnr"] for r in rows), "ssim": _mean(r["ssim"] for r in rows),
            "bit_agreement": _mean(r["bit_agreement"] for r in rows),
            "identical": sum(r["identical"] for r in rows)}
    logger.info("%s vs fp: PSNR %s dB, SSIM %s, bit agreement %s", variant, _fmt(mean["psnr"], 2),
                _fmt(mean["ssim"]), _fmt(mean["bit_agreement"]))
    return {"per_prompt": rows, "mean": mean, "timings_per_prompt": _mean_timings(outputs)}


def _read_kv_calibration(cfg: RunConfig) -> dict | None:
    """The KV calibration file when ``kv.enabled`` (validated, and made for this architecture), else None."""
    if not cfg.kv.enabled:
        return None
    from deepcompressor.nn.kv_cache import KVCalibrationError, load_kv_calibration

    try:
        data = load_kv_calibration(cfg.kv.calib_path)
    except KVCalibrationError as error:
        raise ArtifactError(f"kv.calib_path: {error}") from None
    arch = data["model"].get("arch")
    if arch != cfg.pipeline.arch:
        raise ArtifactError(f"kv.calib_path: {cfg.kv.calib_path} holds KV scales of Infinity-{arch}, this config "
                            f"builds Infinity-{cfg.pipeline.arch}")
    return data


def run(cfg: RunConfig, artifacts_dir: str | Path, out_dir: str | Path) -> dict:
    """Generate and score (see the module docstring); returns the ``results.json`` content."""
    from infinity.pipeline import pipeline_from_config

    artifacts_dir, out_dir = Path(artifacts_dir), Path(out_dir)
    timings: dict = {}
    start = time.perf_counter()
    bundle = load_artifacts(artifacts_dir)  # validate before the (long) full-precision generations
    timings["load_artifacts"] = time.perf_counter() - start
    differing = [k for k in IDENTITY_KEYS if getattr(cfg.pipeline, k) != getattr(bundle.config.pipeline, k)]
    if differing:
        raise ArtifactError(f"{artifacts_dir}: the artifacts were made for another model (pipeline."
                            f"{', pipeline.'.join(differing)} differ from this config's)")
    prompts = load_prompt_set(cfg.collect.prompts, cfg.eval.prompt_offset, cfg.eval.num_prompts,
                              key="eval.prompt_offset")
    kv_data = _read_kv_calibration(cfg)  # a missing or foreign KV file stops the run before the generations
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")

    start = time.perf_counter()
    p = cfg.pipeline
    logger.info("building %s (arch %s, device %s, dtype %s)", p.name, p.arch, p.device, p.dtype)
    pipe = pipeline_from_config(p)
    timings["build_pipeline"] = time.perf_counter() - start
    if kv_data is not None:
        from deepcompressor.nn.kv_cache import KVCalibrationError, check_kv_identity

        try:
            check_kv_identity(kv_data, pipe.transformer, cfg.kv.calib_path)
        except KVCalibrationError as error:
            raise ArtifactError(f"kv.calib_path: {error}") from None

    logger.info("generating %d held-out prompts with the full-precision model", len(prompts))
    start = time.perf_counter()
    reference = _generate_all(pipe, prompts, cfg, "fp", out_dir)
    timings["generate_fp"] = time.perf_counter() - start

    start = time.perf_counter()
    apply_artifacts(pipe.transformer, bundle)
    timings["apply_artifacts"] = time.perf_counter() - start
    logger.info("applied %d quantized layers from %s", len(bundle.layers), artifacts_dir)

    variants = {}
    start = time.perf_counter()
    quant = _generate_all(pipe, prompts, cfg, "quant", out_dir)
    timings["generate_quant"] = time.perf_counter() - start
    variants["quant"] = _compare("quant", quant, reference, prompts)

    if cfg.kv.enabled:
        from deepcompressor.nn.kv_cache import attach_kv_from_config

        attach_kv_from_config(pipe.transformer, cfg.kv)
        logger.info("quantized KV cache attached (%s, %s)", cfg.kv.dtype, cfg.kv.calib_path)
        start = time.perf_counter()
        quant_kv = _generate_all(pipe, prompts, cfg, "quant_kv", out_dir)
        timings["generate_quant_kv"] = time.perf_counter() - start
        variants["quant_kv"] = _compare("quant_kv", quant_kv, reference, prompts)

    results = {
        "model": p.name,
        "artifacts": str(artifacts_dir),
        "method": bundle.config.quant.wgts.dtype,
        "eval": {"prompt_ids": [pid for pid, _ in prompts], "prompt_offset": cfg.eval.prompt_offset,
                 "seed": cfg.eval.seed, "pn": p.pn, "cfg": p.cfg, "tau": p.tau, "top_k": p.top_k, "top_p": p.top_p,
                 "h_div_w": p.h_div_w},
        "kv": {"enabled": cfg.kv.enabled, "dtype": cfg.kv.dtype if cfg.kv.enabled else None},
        "fp_timings_per_prompt": _mean_timings(reference),
        "variants": variants,
        "timings": timings,
    }
    write_json(out_dir / "results.json", results)
    write_text(out_dir / "results.md", results_markdown(results))
    return results


# ---------------------------------------------------------------------------------------------------------------
# Report


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def results_markdown(results: dict) -> str:
    """Per-prompt and mean scores of every variant, then the timings."""
    lines = [f"# Quality of {results['model']} (fake quant) vs full precision", "",
             (f"Artifacts: `{results['artifacts']}`; held-out prompts {', '.join(results['eval']['prompt_ids'])}, "
              f"seed {results['eval']['seed']} + i. PSNR in dB (float64)."), "",
             "| variant | prompt | PSNR | SSIM | bit agreement |", "|---|---|---|---|---|"]
    for name, variant in results["variants"].items():
        for row in variant["per_prompt"]:
            psnr = "identical" if row["identical"] else _fmt(row["psnr"], 2)
            lines.append(f"| {name} | {row['prompt_id']} | {psnr} | {_fmt(row['ssim'])} | "
                         f"{_fmt(100 * row['bit_agreement'], 2)}% |")
        mean = variant["mean"]
        agreement = None if mean["bit_agreement"] is None else 100 * mean["bit_agreement"]
        lines.append(f"| **{name}** | **mean** | {_fmt(mean['psnr'], 2)} | {_fmt(mean['ssim'])} | "
                     f"{_fmt(agreement, 2)}% |")
    lines += ["", "Seconds per prompt:", "", "| model | text encoder | transformer | VAE decode | total |",
              "|---|---|---|---|---|"]
    per_model = {"fp": results["fp_timings_per_prompt"]}
    per_model.update({name: v["timings_per_prompt"] for name, v in results["variants"].items()})
    for name, t in per_model.items():
        lines.append(f"| {name} | {t.get('text_encoder', 0):.3f} | {t.get('transformer', 0):.3f} | "
                     f"{t.get('vae_decode', 0):.3f} | {t.get('total', 0):.3f} |")
    lines += ["", "Stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in results["timings"].items()), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifacts", required=True, help="PTQ artifact directory (printed by ptq_infinity)")
    parser.add_argument("--out", default="", help="output folder (default: <artifacts>/eval)")


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_cli(PROG, argv, add_arguments=_add_arguments,
                          description="PSNR/SSIM of fake-quant generations against the full-precision model.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    out_dir = Path(args.out) if args.out else Path(args.artifacts) / "eval"
    try:
        results = run(cfg, args.artifacts, out_dir)
    except ArtifactError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    logger.info("results for %d prompts", len(results["eval"]["prompt_ids"]))
    print(f"results: {out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
