"""Activation and KV-cache outlier diagnostics of an Infinity model (the paper's Tables 1-2 and Fig. 1).

    python -m evaluation.activations_measurements configs/models/infinity-8b.yaml configs/collect/qdiff.yaml
    python -m evaluation.activations_measurements configs/models/infinity-tiny.yaml --eval-num-tokens 2048

The model generates the step-aware calibration prompts (``collect.prompts``, the first ``collect.num_prompts``,
every scale, classifier-free guidance as configured by ``pipeline.cfg``) while

* a forward pre-hook on every ``nn.Linear`` of the transformer streams its input (viewed as tokens x channels)
  into an ``evaluation.stats.ActivationAccumulator``: max|X| and the float64 moments over every token, medians
  over a deterministic uniform sample of ``eval.num_tokens`` tokens per layer kept on the CPU;
* a recording KV-cache factory streams every self-attention K and V exactly as the cache stores them
  (cos-normalised and rotated keys, values, in the blocks' dtype) into a ``KVAccumulator`` per block. Only stored
  scales are recorded: the sampler never stores the last scale, so a quantized cache never holds it either.

Outputs, in ``output.root/diagnostics/<pipeline.name>/`` (or ``--out``): ``stats.json`` (every per-layer number,
the summaries and the run settings), ``tables.md`` (Tables 1 and 2, then every layer), ``channel_profiles.npz``
(per-channel max|X| and max/median of every linear input, per-channel range and skewness of every K/V),
``fig1_ffn_down_and_kv_skewness.png``, ``worst_layer_channel_absmax.png`` and the resolved ``config.yaml``.
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from deepcompressor.app.diffusion.capture import load_prompt_set
from deepcompressor.config import RunConfig, parse_cli, save_config
from deepcompressor.nn.kv_cache import RecordingLayerKVCache
from deepcompressor.nn.layer_map import block_index, layer_kind
from deepcompressor.utils.files import write_bytes_atomic, write_json, write_text

from .report_figures import plot_channel_profile, plot_depth_profiles
from .report_tables import markdown_report, summarize_kv, summarize_linear
from .stats import ActivationAccumulator, KVAccumulator, kv_token_matrix

__all__ = [
    "DiagnosticsRecorder",
    "diagnostics_dir",
    "main",
    "write_report",
]

PROG = "activations_measurements"
logger = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------------------------
# Output


def diagnostics_dir(cfg: RunConfig) -> Path:
    """``output.root/diagnostics/<pipeline.name>``."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", cfg.pipeline.name).strip("._") or "model"
    return Path(cfg.output.root) / "diagnostics" / name


# ---------------------------------------------------------------------------------------------------------------
# Recording


class DiagnosticsRecorder:
    """Context manager that records every linear input and every stored K/V of ``model`` while it runs.

    Args:
        model: The Infinity transformer (``blocks()``, ``block_names()``, ``kv_cache_factory``).
        token_budget: Tokens sampled per linear layer for the medians.
        seed: Seed of the token sample.
    """

    def __init__(self, model: nn.Module, token_budget: int, seed: int = 0) -> None:
        self.model = model
        self.linears: dict[str, ActivationAccumulator] = {
            name: ActivationAccumulator(token_budget, seed, name)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
        }
        if not self.linears:
            raise ValueError("the model has no nn.Linear layer to record")
        for name in self.linears:
            layer_kind(name)  # fail before the run on an unexpected layout
        self.block_names: list[str] = list(model.block_names())
        self.keys = [KVAccumulator(f"{name} K") for name in self.block_names]
        self.values = [KVAccumulator(f"{name} V") for name in self.block_names]
        self._handles: list = []
        self._inner_factory = None

    def memory_bound_bytes(self) -> int:
        """Upper bound of the CPU memory held by the token samples (every layer's budget filled)."""
        total = 0
        for name, acc in self.linears.items():
            module = self.model.get_submodule(name)
            total += acc.reservoir.budget * module.in_features * module.weight.element_size()
        return total

    def __enter__(self):
        for name, acc in self.linears.items():
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(self._linear_hook(acc)))
        self._inner_factory = self.model.kv_cache_factory
        self.model.kv_cache_factory = self._kv_cache_factory
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.model.kv_cache_factory = self._inner_factory

    @staticmethod
    def _linear_hook(acc: ActivationAccumulator):
        def hook(module: nn.Module, args: tuple) -> None:
            acc.update(args[0])

        return hook

    def _kv_cache_factory(self, model):
        cache = self._inner_factory(model)
        if len(cache.layers) != len(self.block_names):
            raise ValueError(f"KV cache has {len(cache.layers)} layers, the model {len(self.block_names)} blocks")
        cache.layers = [RecordingLayerKVCache(layer, self._kv_record(i)) for i, layer in enumerate(cache.layers)]
        return cache

    def _kv_record(self, index: int):
        def record(k: torch.Tensor, v: torch.Tensor) -> None:
            self.keys[index].update(kv_token_matrix(k))
            self.values[index].update(kv_token_matrix(v))

        return record

    def linear_rows(self) -> tuple[list[dict], dict[str, dict]]:
        """Per-layer scalar rows (module order) and the per-channel arrays of each layer."""
        per_chunk = self.model.arch.blocks_per_chunk
        rows, arrays = [], {}
        for name, acc in self.linears.items():
            if acc.channel_abs_max is None:
                logger.warning("linear layer %s never ran; left out of the report", name)
                continue
            result = acc.result()
            rows.append(
                {"name": name, "kind": layer_kind(name), "block": block_index(name, per_chunk)} | result.scalars()
            )
            arrays[name] = {
                "channel_abs_max": result.channel_abs_max.numpy(),
                "channel_max_to_median": result.channel_max_to_median.numpy(),
            }
        return rows, arrays

    def kv_rows(self) -> tuple[list[dict], dict[str, dict]]:
        rows, arrays = [], {}
        for i, name in enumerate(self.block_names):
            if self.keys[i].channel_min is None:
                logger.warning("block %s stored no K/V; left out of the report", name)
                continue
            k, v = self.keys[i].result(), self.values[i].result()
            rows.append({"name": name, "block": i, "k": k.scalars(), "v": v.scalars()})
            arrays[name] = {
                "k_channel_range": k.channel_range.numpy(),
                "k_channel_skewness": k.channel_skewness.numpy(),
                "v_channel_range": v.channel_range.numpy(),
                "v_channel_skewness": v.channel_skewness.numpy(),
            }
        return rows, arrays


# ---------------------------------------------------------------------------------------------------------------
# Report


FIGURE_DEPTH = "fig1_ffn_down_and_kv_skewness.png"
FIGURE_WORST = "worst_layer_channel_absmax.png"


def _worst_layer(rows: list[dict]) -> dict | None:
    """The linear layer with the largest finite max/median (ties: first)."""
    finite = [r for r in rows if r["max_to_median"] is not None and np.isfinite(r["max_to_median"])]
    return max(finite, key=lambda r: r["max_to_median"]) if finite else None


def write_report(
    out_dir: Path,
    title: str,
    run_info: dict,
    linear_rows: list[dict],
    linear_arrays: dict[str, dict],
    kv_rows: list[dict],
    kv_arrays: dict[str, dict],
) -> dict[str, Path]:
    """Write stats.json, tables.md, channel_profiles.npz and the figures; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    figures: list[tuple[str, str]] = []

    ffn_down = sorted((r for r in linear_rows if r["kind"] == "ffn_down"), key=lambda r: r["block"])
    if ffn_down or kv_rows:
        paths["figure_depth"] = plot_depth_profiles(
            [r["block"] for r in ffn_down],
            [r["channel_max_to_median_max"] for r in ffn_down],
            [r["max_to_median"] for r in ffn_down],
            [r["block"] for r in kv_rows],
            [r["k"]["max_abs_skew"] for r in kv_rows],
            [r["v"]["max_abs_skew"] for r in kv_rows],
            out_dir / FIGURE_DEPTH,
            title=title,
        )
        figures.append(("FFN down-projection outliers and max K/V channel skewness across depth", FIGURE_DEPTH))
    worst = _worst_layer(linear_rows)
    if worst is not None:
        paths["figure_worst"] = plot_channel_profile(
            linear_arrays[worst["name"]]["channel_abs_max"], worst["abs_median"], worst["name"], out_dir / FIGURE_WORST
        )
        figures.append((f"per-channel max|X| of the worst layer ({worst['name']})", FIGURE_WORST))

    flat_arrays = {f"{name}/{key}": value for name, d in linear_arrays.items() for key, value in d.items()}
    flat_arrays |= {f"kv/{name}/{key}": value for name, d in kv_arrays.items() for key, value in d.items()}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **flat_arrays)
    paths["profiles"] = write_bytes_atomic(out_dir / "channel_profiles.npz", buffer.getvalue())

    stats = {
        "title": title,
        "run": run_info,
        "summary": {"linear": summarize_linear(linear_rows), "kv": summarize_kv(kv_rows) if kv_rows else {}},
        "linear_layers": linear_rows,
        "kv_cache": kv_rows,
        "worst_layer": None if worst is None else worst["name"],
        "figures": {key: path.name for key, path in paths.items() if key.startswith("figure")},
    }
    paths["stats"] = write_json(out_dir / "stats.json", stats)
    meta = [f"{key}: {value}" for key, value in run_info.items()]
    paths["tables"] = write_text(
        out_dir / "tables.md", markdown_report(title, meta, linear_rows, kv_rows, figures)
    )
    return paths


# ---------------------------------------------------------------------------------------------------------------
# App


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="Output folder (default: output.root/diagnostics/<pipeline.name>).")


def _warn_non_finite(rows: list[dict], kv_rows: list[dict]) -> None:
    for r in rows:
        for key in ("max_to_median", "kurtosis", "channel_max_to_median_max"):
            if not np.isfinite(r[key]):
                logger.warning("%s: %s is %s (written as null)", r["name"], key, r[key])
    for r in kv_rows:
        for which in ("k", "v"):
            for key, value in r[which].items():
                if isinstance(value, float) and not np.isfinite(value):
                    logger.warning("%s %s: %s is %s (written as null)", r["name"], which.upper(), key, value)


def run(cfg: RunConfig, out_dir: Path) -> dict[str, Path]:
    """Build the pipeline, generate the calibration prompts while recording, write the report."""
    from infinity.pipeline import pipeline_from_config

    p = cfg.pipeline
    prompts = load_prompt_set(cfg.collect.prompts, 0, cfg.collect.num_prompts)
    logger.info(
        "loading %s (arch %s, random_init=%s, device %s, dtype %s)", p.name, p.arch, p.random_init, p.device, p.dtype
    )
    pipe = pipeline_from_config(p)
    model = pipe.transformer
    if p.cfg == 1.0:
        logger.warning("pipeline.cfg = 1: classifier-free guidance is off, only conditional rows are measured")
    recorder = DiagnosticsRecorder(model, cfg.eval.num_tokens, seed=cfg.collect.seed)
    logger.info(
        "recording %d linear layers and %d KV caches; token samples use up to %.2f GiB of CPU memory",
        len(recorder.linears),
        len(recorder.block_names),
        recorder.memory_bound_bytes() / 2**30,
    )
    with recorder, torch.inference_mode():
        for i, (prompt_id, caption) in enumerate(tqdm(prompts, desc="calibration prompts", unit="prompt")):
            logger.debug("prompt %s: %s", prompt_id, caption)
            pipe.generate(
                [caption],
                seed=cfg.collect.seed + i,
                cfg=p.cfg,
                tau=p.tau,
                top_k=p.top_k,
                top_p=p.top_p,
                pn=p.pn,
                h_div_w=p.h_div_w,
            )
    logger.info("computing statistics")
    linear_rows, linear_arrays = recorder.linear_rows()
    kv_rows, kv_arrays = recorder.kv_rows()
    _warn_non_finite(linear_rows, kv_rows)
    run_info = {
        "model": p.name,
        "arch": p.arch,
        "weights": f"random init (seed {p.seed})" if p.random_init else (p.transformer_path or "built-in default"),
        "device / dtype": f"{model.device} / {str(model.block_dtype).removeprefix('torch.')}",
        "prompts": f"{cfg.collect.prompts} (first {len(prompts)}: {prompts[0][0]} .. {prompts[-1][0]})",
        "resolution / h_div_w": f"{p.pn} / {p.h_div_w}",
        "cfg / tau / top_k / top_p": f"{p.cfg} / {p.tau} / {p.top_k} / {p.top_p}",
        "sampling seed": cfg.collect.seed,
        "token budget per layer (medians)": cfg.eval.num_tokens,
        "K/V tokens": "stored scales only (the last scale is never cached)",
    }
    paths = write_report(
        out_dir, f"Activation diagnostics: {p.name}", run_info, linear_rows, linear_arrays, kv_rows, kv_arrays
    )
    paths["config"] = save_config(cfg, out_dir / "config.yaml")
    return paths


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_cli(
        PROG,
        argv,
        add_arguments=_add_arguments,
        description="Outlier statistics of the linear-layer inputs and of the KV cache of an Infinity model.",
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from infinity.checkpoints import CheckpointError

    from deepcompressor.app.diffusion.capture import PromptFileError
    from deepcompressor.app.diffusion.preflight import exit_on_problems, pipeline_path_problems

    problems = pipeline_path_problems(cfg.pipeline)
    try:
        load_prompt_set(cfg.collect.prompts, 0, cfg.collect.num_prompts)
    except PromptFileError as error:
        problems.append(str(error))
    exit_on_problems(PROG, problems)
    out_dir = Path(args.out) if args.out else diagnostics_dir(cfg)
    try:
        paths = run(cfg, out_dir)
    except CheckpointError as error:
        exit_on_problems(PROG, [" ".join(str(error).split())])
    for key, path in paths.items():
        logger.info("wrote %s: %s", key, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
