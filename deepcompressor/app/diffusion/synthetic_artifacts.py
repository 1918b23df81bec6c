"""PTQ artifacts in the real format without calibration, for measuring loading, latency and memory.

``write_synthetic_artifacts(cfg, directory)`` builds the configured model (normally ``pipeline.random_init``: the
cost of loading and running a quantized model does not depend on its values) and writes ``model.pt``,
``smooth.pt``, ``branch.pt``, ``config.yaml`` and ``manifest.json`` exactly as ``ptq_infinity`` does, with each
quantized layer made the way ``synthesize_w4a4`` makes it: seeded smoothing scales ``exp(U(-0.5, 0.5))``, a seeded
random low-rank branch, and the residual quantized round-to-nearest. The manifest says ``"synthetic": true``.
Nothing here is a calibration: the files are for benchmarks, not for images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ...config.schema import RunConfig
from ...nn.layer_map import is_block_kind, layer_kind
from ...nn.synthetic import synthetic_fake_linear

__all__ = ["write_synthetic_artifacts"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def write_synthetic_artifacts(cfg: RunConfig, directory: str | Path, pipe=None) -> Path:
    """Write synthetic artifacts of ``cfg``'s model (built with ``pipeline_from_config`` unless ``pipe`` is given;
    its transformer is modified in place) into ``directory``; returns the directory."""
    from infinity.pipeline import pipeline_from_config

    from ...calib.layer import quant_config_for_kind
    from .artifacts import write_artifacts, write_manifest
    from .capture import model_identity

    qcfg = cfg.quant
    if qcfg.wgts.dtype is None:
        raise ValueError("write_synthetic_artifacts: quant.wgts.dtype is null; stack configs/svdquant/int4.yaml")
    directory = Path(directory)
    pipe = pipe or pipeline_from_config(cfg.pipeline)
    model = pipe.transformer
    identity = model_identity(cfg.pipeline, model, pipe.text_encoder)
    fp_numel = sum(t.numel() for t in model.state_dict().values())
    rank = qcfg.low_rank.rank if qcfg.low_rank.enabled else 0
    generator = torch.Generator(device=model.device).manual_seed(int(cfg.pipeline.seed))
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    entries = {}
    for name, linear in tqdm(linears, desc="synthetic layers", unit="layer", leave=False):
        kind = layer_kind(name)
        if not is_block_kind(kind) or kind in qcfg.wgts.skips:
            continue
        fake = synthetic_fake_linear(linear, quant_config_for_kind(qcfg, kind), rank, qcfg.smooth.enabled,
                                     generator, name)
        s = fake.smooth_scale
        state, meta = fake.artifact_state(pack=True)
        smooth = None if s is None else {"scale": s, "alpha": 0.5, "beta": 0.5, "folded_into": None}
        entries[name] = {"kind": kind, "state": state, "meta": meta, "smooth": smooth}
        model.set_submodule(name, fake)
    if not entries:
        raise ValueError("write_synthetic_artifacts: no block linear is quantized by this config (quant.wgts.skips)")
    directory.mkdir(parents=True, exist_ok=True)
    write_artifacts(directory, cfg, model, entries, fp_numel)
    write_manifest(directory, {**identity, "name": cfg.pipeline.name}, {n: e["kind"] for n, e in entries.items()},
                   {"synthetic": True})
    logger.info("wrote synthetic artifacts of %d layers to %s", len(entries), directory)
    return directory
