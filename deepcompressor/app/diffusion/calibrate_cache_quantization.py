"""Calibration of the static INT8/INT4 KV-cache quantizers of an Infinity model.

    python -m deepcompressor.app.diffusion.calibrate_cache_quantization configs/models/infinity-8b.yaml \
        configs/collect/qdiff.yaml [--kv-artifact-dir runs/<ptq run>] [--kv-calib-path PATH] [flags]

Steps (logged, with progress bars):

1. build the pipeline (``pipeline``); with ``kv.artifact_dir`` swap in the W4A4 layers of that PTQ artifact
   directory (``artifacts.load_artifacts`` / ``apply_artifacts``: the model must be the one it was made from);
2. generate the calibration prompts (``collect.prompts``, the first ``collect.num_prompts``; one prompt per
   generation with its CFG row; seed ``collect.seed + index``; release sampling settings ``pipeline.*``; the first
   ``collect.num_scales`` scales, 0 = all) while a recording cache factory (``nn.kv_cache.KVRecorder``) samples
   the cached K and V exactly as the cache receives them: cos-normalised rotated keys and values of every scale
   (with ``kv.current = full`` only the stored scales), both CFG rows, at most ``kv.max_tokens`` tokens per
   (block, K/V), the same token positions in every block;
3. search the clipping bounds of every (block, K/V, head, channel) for INT8 and INT4 (``calib.kv``), on the
   model's device;
4. write ``kv.calib_path`` atomically (format in ``nn.kv_cache``), the resolved config next to it
   (``<stem>.config.yaml``) and a summary (``<stem>.json``), and print a per-block table.

The file serves both formats; ``kv.dtype`` becomes its default. ``attach_kv_qparams(model, path)`` uses it.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ...calib.kv import KV_DTYPE_BITS, minmax_asymmetric, search_clipping_bounds
from ...config import config_to_dict, parse_cli, save_config
from ...config.schema import RunConfig
from ...nn.kv_cache import (
    CALIB_FORMAT,
    KVCalibrationError,
    KVRecorder,
    kv_model_identity,
    load_kv_calibration,
    validate_kv_calibration,
)
from ...utils.files import save_pt, write_json
from .capture import CaptureSettings, PromptFileError, load_prompt_set, weights_fingerprint
from .preflight import exit_on_problems, pipeline_path_problems

__all__ = ["PROG", "KVCalibrationResult", "KVCalibrationRunError", "calibrate_kv", "main", "run_calibration"]

PROG = "calibrate_cache_quantization"
logger = logging.getLogger(__name__)


class KVCalibrationRunError(RuntimeError):
    """A calibration run that cannot proceed (bad artifact directory, nothing recorded, ...)."""


class KVOutputInUseError(KVCalibrationRunError):
    """``kv.calib_path`` holds a file this run must not overwrite (another model's calibration, or no KV file)."""


_IDENTITY_MATCH = ("arch", "kv_fingerprint", "transformer_fingerprint")


def check_output_path(path: Path, arch: str, identity: dict | None = None, force: bool = False) -> None:
    """Refuse to overwrite ``path`` unless it is absent, holds a calibration of this model (``arch`` before the
    model is built; also its weights' fingerprints once ``identity`` is known), or ``force``."""
    if force or not path.exists():
        return
    hint = "choose another kv.calib_path (--kv-calib-path) or pass --force to overwrite it"
    try:
        existing = load_kv_calibration(path)["model"]
    except KVCalibrationError as error:
        raise KVOutputInUseError(f"kv.calib_path: {error}; not overwriting it: {hint}") from None
    if existing.get("arch") != arch:
        raise KVOutputInUseError(f"kv.calib_path: {path} holds the KV calibration of Infinity-{existing.get('arch')} "
                                 f"({existing.get('name', '?')}), this run calibrates Infinity-{arch}: {hint}")
    if identity is not None:
        differ = [key for key in _IDENTITY_MATCH if key in existing and existing[key] != identity.get(key)]
        if differ:
            raise KVOutputInUseError(f"kv.calib_path: {path} holds the KV calibration of another "
                                     f"Infinity-{arch} model ({existing.get('name', '?')}; {', '.join(differ)} "
                                     f"differ): {hint}")


@dataclass
class KVCalibrationResult:
    path: Path
    data: dict
    timings: dict


class _EnoughScales(Exception):
    """Raised from the sampler's per-scale callback once the wanted scales were generated."""


def _load_artifacts(artifact_dir: str):
    """Load and validate a PTQ artifact directory (before the model is built, so a bad one fails fast)."""
    try:
        from .artifacts import ArtifactError, load_artifacts
    except ImportError as error:  # the PTQ artifact loader is a separate module of the tool
        raise KVCalibrationRunError(
            f"kv.artifact_dir = {artifact_dir!r} was given, but the PTQ artifact loader is not available ({error})"
        ) from None
    try:
        return load_artifacts(artifact_dir)
    except (ArtifactError, FileNotFoundError) as error:
        raise KVCalibrationRunError(f"kv.artifact_dir: {error}") from None


def _apply_artifacts(model, bundle) -> dict:
    """Swap in the bundle's W4A4 layers (the model must be the one it was made from); returns what identifies it."""
    from .artifacts import ArtifactError, apply_artifacts

    try:
        apply_artifacts(model, bundle)
    except ArtifactError as error:
        raise KVCalibrationRunError(f"kv.artifact_dir: {error}") from None
    return {"artifact_dir": str(bundle.directory), "artifact_model": bundle.manifest.get("model", {})}


@torch.no_grad()
def _record(model, text_encoder, cfg: RunConfig, recorder: KVRecorder) -> int:
    """Generate the calibration prompts inside ``recorder``; returns the number of prompts."""
    from infinity.sampler import sample

    settings = CaptureSettings.from_config(cfg)
    prompts = load_prompt_set(cfg.collect.prompts, 0, cfg.collect.num_prompts)
    schedule = [list(s) for s in settings.schedule]

    def on_scale(si, _x):
        if si + 1 >= settings.num_scales:
            raise _EnoughScales

    with recorder:
        for index, (_, caption) in enumerate(tqdm(prompts, desc="kv calibration prompts", unit="prompt")):
            text = text_encoder.encode([caption])
            try:
                sample(model, text.kv_compact, text.lens, schedule, cfg=settings.cfg, tau=settings.tau,
                       top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed + index,
                       h_div_w=settings.h_div_w, on_scale=on_scale)  # fmt: skip
            except _EnoughScales:
                pass
    return len(prompts)


def calibrate_kv(recorder: KVRecorder, identity: dict, cfg: RunConfig, device: torch.device, progress: bool = True):
    """Search INT8 and INT4 quantizers of every recorded (block, K/V); returns ``(qparams, stats)``."""
    depth, heads, head_dim = identity["depth"], identity["num_heads"], identity["head_dim"]
    shape = (depth, 2, heads, head_dim)
    qparams = {dtype: {key: torch.empty(shape) for key in ("scale", "zero", "lo", "hi", "mse")}
               for dtype in KV_DTYPE_BITS}  # fmt: skip
    minmax_mse = {dtype: torch.empty(shape) for dtype in KV_DTYPE_BITS}
    blocks = list(recorder.blocks())
    bar = tqdm(total=len(blocks) * len(KV_DTYPE_BITS), desc="kv clip search", disable=not progress)
    for index, which, rows in blocks:
        if rows.shape[1] != heads * head_dim:
            raise KVCalibrationRunError(
                f"block {index}: recorded {rows.shape[1]} channels, expected {heads}x{head_dim}"
            )
        rows = rows.to(device)
        for dtype, bits in KV_DTYPE_BITS.items():
            found = search_clipping_bounds(rows, bits, cfg.kv.num_grids, cfg.kv.golden_iters, device=device)
            for key in ("scale", "zero", "lo", "hi", "mse"):
                qparams[dtype][key][index, which] = getattr(found, key).view(heads, head_dim)
            minmax_mse[dtype][index, which] = minmax_asymmetric(rows, bits, device=device).mse.view(heads, head_dim)
            bar.update()
        del rows
    bar.close()
    stats = {}
    for dtype in KV_DTYPE_BITS:
        mse = qparams[dtype]["mse"]
        stats[dtype] = {
            "mse_per_block": {"k": mse[:, 0].mean(dim=(1, 2)).tolist(), "v": mse[:, 1].mean(dim=(1, 2)).tolist()},
            "minmax_mse_per_block": {
                "k": minmax_mse[dtype][:, 0].mean(dim=(1, 2)).tolist(),
                "v": minmax_mse[dtype][:, 1].mean(dim=(1, 2)).tolist(),
            },
        }
    return qparams, stats


def _table(stats: dict, depth: int) -> str:
    columns = [f"{kv} {dtype} MSE | (min-max)" for dtype in ("int8", "int4") for kv in ("K", "V")]
    lines = ["| block | " + " | ".join(columns) + " |", "|---" * 9 + "|"]
    for i in range(depth):
        cells = []
        for dtype in ("uint8", "uint4"):
            for kv in ("k", "v"):
                cells += [f"{stats[dtype]['mse_per_block'][kv][i]:.3e}",
                          f"{stats[dtype]['minmax_mse_per_block'][kv][i]:.3e}"]  # fmt: skip
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_calibration(cfg: RunConfig, *, pipeline_factory=None, progress: bool = True,
                    force: bool = False) -> KVCalibrationResult:
    """The whole calibration (steps 1-4 of the module docstring); returns the written file and its contents.
    ``force`` overwrites a ``kv.calib_path`` that holds another model's calibration (see ``check_output_path``)."""
    from infinity.pipeline import pipeline_from_config

    from .memory_plan import OffloadSession, module_bytes, plan_memory

    check_output_path(Path(cfg.kv.calib_path), cfg.pipeline.arch, force=force)
    timings = {}
    start = time.perf_counter()
    bundle = _load_artifacts(cfg.kv.artifact_dir) if cfg.kv.artifact_dir else None
    pipe = (pipeline_factory or pipeline_from_config)(cfg.pipeline)
    model = pipe.transformer
    identity = kv_model_identity(model)
    identity.update(name=cfg.pipeline.name, transformer_fingerprint=weights_fingerprint(model))
    check_output_path(Path(cfg.kv.calib_path), cfg.pipeline.arch, identity, force=force)  # before recording
    calibrated_through = {"artifact_dir": None}
    if bundle is not None:
        calibrated_through = _apply_artifacts(model, bundle)
        logger.info("calibrating through the W4A4 model of %s", cfg.kv.artifact_dir)
    settings = CaptureSettings.from_config(cfg)
    plan = plan_memory(cfg.memory, model, settings.schedule, text_bytes=module_bytes(pipe.text_encoder)
                       + module_bytes(pipe.vae), capture_bytes=0, max_tokens=cfg.kv.max_tokens, device=model.device)
    logger.info(plan.describe(identity["depth"]))
    captions = [c for _, c in load_prompt_set(cfg.collect.prompts, 0, cfg.collect.num_prompts)]
    session = OffloadSession(plan, pipe, owned=pipeline_factory is None, captions=captions,
                             schedule=settings.schedule, resident_blocks=cfg.memory.resident_blocks)
    timings["build"] = time.perf_counter() - start
    try:
        start = time.perf_counter()
        recorder = KVRecorder(model, cfg.kv.max_tokens, seed=cfg.collect.seed, stored_only=cfg.kv.current == "full")
        sample_bytes = 2 * identity["depth"] * cfg.kv.max_tokens * identity["embed_dim"] * model.block_dtype.itemsize
        logger.info("K/V token samples take up to %.2f GiB of CPU memory", sample_bytes / 2**30)
        with session.generating():
            num_prompts = _record(model, session.text_encoder, cfg, recorder)
        if recorder.num_sampled < 2:
            raise KVCalibrationRunError(f"only {recorder.num_sampled} cached tokens were recorded; need at least 2")
        timings["record"] = time.perf_counter() - start
        logger.info("recorded %d cached tokens per block, sampled %d", recorder.num_seen, recorder.num_sampled)

        start = time.perf_counter()
        qparams, stats = calibrate_kv(recorder, identity, cfg, model.device, progress)
        timings["search"] = time.perf_counter() - start
    finally:
        session.restore()
    if model.device.type == "cuda":
        timings["peak_allocated_GiB"] = torch.cuda.max_memory_allocated(model.device) / 2**30
    timings["memory"] = plan.as_dict()

    data = {
        "format": CALIB_FORMAT,
        "model": identity | calibrated_through,
        "default_dtype": cfg.kv.dtype,
        "current": cfg.kv.current,
        "qparams": qparams,
        "settings": {
            "prompts": cfg.collect.prompts,
            "num_prompts": num_prompts,
            "sampling": settings.as_dict(),
            "tokens_seen_per_block": recorder.num_seen,
            "tokens_sampled_per_block": recorder.num_sampled,
            "max_tokens": cfg.kv.max_tokens,
            "num_grids": cfg.kv.num_grids,
            "golden_iters": cfg.kv.golden_iters,
            "block_dtype": str(model.block_dtype).removeprefix("torch."),
        },
        "stats": stats,
    }
    path = Path(cfg.kv.calib_path)
    validate_kv_calibration(data, path)
    save_pt(path, data)
    save_config(cfg, path.with_suffix(".config.yaml"))
    summary = {key: data[key] for key in ("format", "model", "default_dtype", "current", "settings", "stats")}
    write_json(path.with_suffix(".json"), summary | {"timings": timings, "config": config_to_dict(cfg)})
    logger.info("wrote %s (build %.1f s, record %.1f s, search %.1f s)", path, timings["build"], timings["record"],
                timings["search"])  # fmt: skip
    print(_table(stats, identity["depth"]))
    return KVCalibrationResult(path, data, timings)


def _add_arguments(parser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="Overwrite kv.calib_path even if it holds another model's calibration")


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_cli(PROG, argv, add_arguments=_add_arguments,
                          description="Calibrate the static INT8/INT4 KV-cache quantizers of Infinity.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    problems = pipeline_path_problems(cfg.pipeline)  # before any model is built
    for check in (lambda: load_prompt_set(cfg.collect.prompts, 0, cfg.collect.num_prompts),
                  lambda: check_output_path(Path(cfg.kv.calib_path), cfg.pipeline.arch, force=args.force)):
        try:
            check()
        except (PromptFileError, KVOutputInUseError) as error:
            problems.append(str(error))
    exit_on_problems(PROG, problems)
    from .memory_plan import prefer_expandable_segments

    prefer_expandable_segments(cfg.memory)
    try:
        result = run_calibration(cfg, force=args.force)
    except KVOutputInUseError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except (KVCalibrationRunError, FileNotFoundError, ValueError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    print(f"kv calibration: {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
