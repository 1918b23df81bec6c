"""Quantize from Python in one call, and load a quantized model in one call.

    from deepcompressor import load_config, load_quantized, quantize
    from infinity.pipeline import pipeline_from_config

    cfg = load_config(["configs/models/infinity-tiny.yaml", "configs/svdquant/int4.yaml"],
                      {"pipeline.device": "cpu"})
    pipe = quantize(pipeline_from_config(cfg.pipeline), cfg, out_dir="runs/tiny-int4")  # PTQ, artifacts written
    image = pipe.generate(["a red fox in the snow"], seed=0).images[0]

    pipe = load_quantized("runs/tiny-int4", device="cpu")   # later: from the artifacts alone, real W4A4 layers

``quantize`` runs the same PTQ as ``python -m deepcompressor.app.diffusion.ptq_infinity`` (and the KV calibration
of ``calibrate_cache_quantization`` when ``kv.enabled``) on a pipeline already in memory; ``load_quantized``
builds the pipeline of an artifact directory without the full-precision transformer.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import ConfigError, ConfigIssue, config_to_dict, load_config
from .config.schema import RunConfig

__all__ = ["load_quantized", "quantize", "validate"]


def validate(config: RunConfig) -> RunConfig:
    """The checks the loader runs on files, run on a config built in code (types, choices, ranges, cross-field
    rules); returns the validated copy or raises ``ConfigError`` with one line per problem."""
    if not isinstance(config, RunConfig):
        raise TypeError(f"validate: expected a RunConfig, got {type(config).__name__}")
    return load_config([], config_to_dict(config))


def _as_config(config: RunConfig | Sequence[str | Path]) -> RunConfig:
    if isinstance(config, RunConfig):
        return validate(config)
    if isinstance(config, (str, Path)):
        config = [config]
    return load_config([str(path) for path in config])


def quantize(pipeline, config: RunConfig | Sequence[str | Path], *, out_dir: str | Path | None = None,
             calibration: str | None = None, real: bool = False, backend: str = "auto"):
    """Post-training quantization of ``pipeline`` (an ``InfinityPipeline``) with ``config``; returns the same
    pipeline, quantized in memory.

    Args:
        config: A ``RunConfig`` or a chain of YAML files (validated as the command line validates them). Its
            ``pipeline`` section must describe ``pipeline`` (architecture, files, seed): it is recorded in the
            artifacts as the model's identity.
        out_dir: Where the artifacts (``model.pt``, ``smooth.pt``, ``branch.pt``, ``config.yaml``, ``manifest.json``,
            the fidelity report; ``kv_quant_calib.pt`` with ``kv.enabled``) are written, and where an interrupted
            call resumes. None: a temporary folder, removed afterwards.
        calibration: A prompt set name or file for the calibration generations (``collect.prompts``).
        real: Replace the fake-quantized layers by ``W4A4Linear`` layers (the real 4-bit kernels).
        backend: The ``W4A4Linear`` backend when ``real``.

    The transformer's linears become ``FakeQuantLinear`` layers (``W4A4Linear`` with ``real``); with
    ``kv.enabled`` the KV cache is calibrated through the quantized model and attached.
    """
    from .app.diffusion.calibrate_cache_quantization import run_calibration
    from .app.diffusion.ptq_infinity import run_ptq
    from .nn.kv_cache import attach_kv_qparams
    from .nn.w4a4_linear import convert_to_w4a4

    cfg = _as_config(config)
    if calibration is not None:
        cfg = load_config([], {**config_to_dict(cfg), "collect.prompts": calibration})
    arch = getattr(getattr(pipeline.transformer, "arch", None), "name", None)
    if arch != cfg.pipeline.arch:
        raise ConfigError([ConfigIssue(f"the config builds Infinity-{cfg.pipeline.arch}, the pipeline is "
                                       f"Infinity-{arch}", key="pipeline.arch", source="quantize")])
    with tempfile.TemporaryDirectory(prefix="var-compressor-") as scratch:
        directory = Path(out_dir) if out_dir is not None else Path(scratch)
        result = run_ptq(cfg, directory, pipeline=pipeline)
        if cfg.kv.enabled:
            kv_path = directory / "kv_quant_calib.pt"
            kv_cfg = load_config([], {**config_to_dict(cfg), "kv.calib_path": str(kv_path), "kv.artifact_dir": ""})
            run_calibration(kv_cfg, pipeline_factory=lambda _: pipeline, progress=False)
            attach_kv_qparams(pipeline.transformer, kv_path, cfg.kv.dtype)
    if real:
        convert_to_w4a4(pipeline.transformer, backend=backend)
    pipeline.quantization = {"artifacts": str(out_dir) if out_dir is not None else None, "real": real,
                             "fidelity": (result.fidelity or {}).get("model_level")}
    return pipeline


def load_quantized(artifact_dir: str | Path, *, device: str | torch.device | None = None, real: bool = True,
                   kv: str | Path | None = None, kv_dtype: str | None = None, backend: str = "auto",
                   overrides: dict | None = None):
    """The ready ``InfinityPipeline`` of a PTQ artifact directory, without the full-precision transformer.

    Args:
        device: ``cpu``, ``cuda``, ... (default: the artifacts' ``pipeline.device``).
        real: ``W4A4Linear`` layers (real 4-bit kernels); False: ``FakeQuantLinear`` (the simulation).
        kv: A KV calibration file (``calibrate_cache_quantization`` output) to attach, in ``kv_dtype`` (default:
            the file's own). ``quantize`` with ``kv.enabled`` writes ``kv_quant_calib.pt`` into the directory: it is
            attached when ``kv`` is None.
        overrides: Dotted config keys applied over the artifacts' config (e.g. the memory options
            ``{"pipeline.release_text_encoder": True}``; the text encoder and VAE files come from its
            ``pipeline`` section).
    """
    from infinity.pipeline import pipeline_from_config

    from .app.diffusion.artifacts import CONFIG_FILE
    from .app.diffusion.quantized_model import load_quantized_transformer
    from .nn.kv_cache import attach_kv_qparams

    directory = Path(artifact_dir)
    values = dict(overrides or {})
    if device is not None:
        values["pipeline.device"] = str(device)
    cfg = load_config([str(directory / CONFIG_FILE)], values) if (directory / CONFIG_FILE).is_file() else None
    if cfg is None:
        from .app.diffusion.artifacts import ArtifactError

        raise ArtifactError(f"{directory / CONFIG_FILE}: missing (not a ptq_infinity artifact directory)")
    model, _, _ = load_quantized_transformer(directory, device=cfg.pipeline.device, dtype=cfg.pipeline.dtype,
                                             backend=backend, real=real)
    pipe = pipeline_from_config(cfg.pipeline, transformer=model)  # also casts the non-block linears
    kv_path = Path(kv) if kv is not None else directory / "kv_quant_calib.pt"
    if kv is not None or kv_path.is_file():
        attach_kv_qparams(model, kv_path, kv_dtype)
    return pipe
