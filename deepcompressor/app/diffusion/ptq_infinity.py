"""Post-training quantization of an Infinity model (SVDQuant-style W4A4 of the transformer blocks).

    python -m deepcompressor.app.diffusion.ptq_infinity configs/models/infinity-tiny.yaml \
        configs/collect/qdiff.yaml configs/svdquant/int4.yaml [flags] [--dump-config]

Steps (each logged, with progress bars; the log also goes to ``<run dir>/ptq.log``):

1. build the model (``pipeline``) and load the calibration prompts (``collect``) and held-out prompts (``eval``);
2. capture the calibration data with the full-precision model, or reuse it from ``collect.cache_dir``
   (``capture``);
3. generate the held-out prompts with the full-precision model (the fidelity reference);
4. calibrate and quantize the blocks one after the other (``calibrate_blocks``); every finished block is saved to
   ``<run dir>/state/block_XXX.pt``, so a killed run continues from its last finished block
   (``output.resume``; the state is tied to the model, calibration data and ``quant`` settings);
5. write the artifacts (``artifacts``), the fidelity report (``fidelity``) and the manifest, then print
   ``artifacts: <run dir>``.

Only the transformer blocks' linears are quantized; the other layer kinds (embed, adaln, text_proj, head) must
stay in ``quant.wgts.skips``.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ...config import config_to_dict, parse_cli, run_dir
from ...config.schema import RunConfig
from ...nn.layer_map import BLOCK_LAYERS, OTHER_LAYERS, layer_kind
from ...utils.device import synchronize
from ...utils.files import load_pt, save_pt, sha256_json, to_cpu, write_json, write_text
from .artifacts import ARTIFACT_FILES, MANIFEST_FILE, write_artifacts, write_manifest
from .calibrate_blocks import (
    ReplayPlan,
    SampleSelection,
    calibrate_block,
    install_block_state,
    replay_block,
    validate_block_state,
)
from .capture import CaptureError, CaptureSettings, PromptFileError, load_or_capture, load_prompt_set, model_identity
from .fidelity import FidelityReference, evaluate_model, fidelity_markdown, reference_generations
from .preflight import pipeline_path_problems

__all__ = ["PROG", "PTQError", "PTQResult", "main", "run_ptq"]

PROG = "ptq_infinity"
STATE_FORMAT = "var-compressor-ptq-state/1"
LOG_FILE = "ptq.log"
logger = logging.getLogger(__name__)


class PTQError(RuntimeError):
    """A run that cannot proceed (mismatched state, unsupported settings); the message says what to do."""


@dataclass
class PTQResult:
    """Outcome of :func:`run_ptq`.

    Attributes:
        directory: The run (and artifact) directory.
        complete: Whether every block was calibrated and the artifacts were written.
        blocks_calibrated: Blocks calibrated by this call (not loaded from an earlier run's state).
        timings: Seconds: ``load``, ``collect``, ``reference``, ``resume_replay``, ``blocks`` (per block, this call),
            ``artifacts``, ``fidelity``, ``total``.
        sizes: Artifact sizes (complete runs).
        fidelity: The fidelity report (complete runs).
        peaks: On CUDA, the peak allocated and reserved GiB of each stage (``load``, ``collect``, ``reference``,
            ``calibration``, ``artifacts``, ``fidelity``).
        memory: The memory plan (``memory.*``: offloading, resident blocks, estimates).
    """

    directory: Path
    complete: bool
    blocks_calibrated: list[int] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    sizes: dict | None = None
    fidelity: dict | None = None
    peaks: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ helpers


class ConfigCheckError(PTQError):
    """Problems found in the config before any work: one line each (``lines``)."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def quant_config_problems(cfg: RunConfig) -> list[str]:
    """Everything about ``quant`` that the architecture alone decides, one line per problem: only block linears
    are quantized, group sizes divide every quantized layer's inputs, the low-rank rank fits every layer."""
    from infinity.arch import get_arch

    from ...calib.layer import quant_config_for_kind
    from ...nn.layer_map import block_linear_shapes

    q = cfg.quant
    if q.wgts.dtype is None:
        return []
    problems = []
    others = sorted(set(OTHER_LAYERS.values()))
    missing = [kind for kind in others if kind not in q.wgts.skips]
    if missing:
        problems.append(f"quant.wgts.skips: PTQ quantizes the transformer blocks only; add {', '.join(missing)} "
                        f"(layer kinds outside the blocks: {', '.join(others)})")
    arch = get_arch(cfg.pipeline.arch)
    for kind, (n, k) in block_linear_shapes(arch).items():
        layer = quant_config_for_kind(q, kind)
        where = f"Infinity-{arch.name} {kind} ({n} outputs x {k} inputs)"
        for key, quantizer in (("quant.wgts.group_size", layer.wgts), ("quant.ipts.group_size", layer.ipts)):
            if quantizer.dtype is not None and quantizer.group_size > 0 and k % quantizer.group_size:
                problems.append(f"{key}: {quantizer.group_size} does not divide the {k} inputs of {where}")
        if layer.wgts.dtype is not None and q.low_rank.enabled and q.low_rank.rank > min(n, k):
            problems.append(f"quant.low_rank.rank: {q.low_rank.rank} exceeds the smaller side of {where}")
        quantized = layer.wgts.dtype is not None or layer.ipts.dtype is not None
        if q.rotation.enabled and quantized and k % q.rotation.block_size:
            problems.append(f"quant.rotation.block_size: {q.rotation.block_size} does not divide the {k} inputs of "
                            f"{where}")
    return problems


def check_quant_config(cfg: RunConfig) -> None:
    """Raise ``ConfigCheckError`` listing every problem of ``quant_config_problems``."""
    problems = quant_config_problems(cfg)
    if problems:
        raise ConfigCheckError(problems)


@contextmanager
def _log_file(path: Path):
    """Copy log records (INFO and above) to ``path`` while the run lasts."""
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    old_level = root.level
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()




_REPORT_FILES = ("fidelity.json", "fidelity.md")


def _unseal(out_dir: Path) -> None:
    """Remove a previous run's artifacts, the manifest first: a folder whose new run has not finished must never
    load as the old run's sealed result."""
    present = [name for name in (MANIFEST_FILE, *ARTIFACT_FILES, *_REPORT_FILES) if (out_dir / name).exists()]
    if not present:
        return
    logger.info("starting over in %s: removing the previous run's %s", out_dir, ", ".join(present))
    for name in present:
        (out_dir / name).unlink()


def _prepare_state(state_dir: Path, key_data: dict, resume: bool) -> None:
    """Create the state folder; refuse to mix runs of different configurations in one folder."""
    run_file = state_dir / "run.json"
    if run_file.is_file() and resume:
        import json

        try:
            stored = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = None
        if stored != json.loads(json.dumps(key_data)):
            differing = sorted(k for k in key_data if stored is None or stored.get(k) != key_data[k])
            raise PTQError(f"{state_dir}: holds the state of a run with a different model, calibration data or "
                           f"quant settings (differs in: {', '.join(differing) or 'format'}); choose another "
                           "output.dirname (--output-dirname) or pass --no-output-resume to start this folder over")
    else:
        # A new state: whatever the folder holds from an earlier run is not this run's result.
        _unseal(state_dir.parent)
        if state_dir.exists():
            if not resume:
                logger.info("output.resume is false: discarding the state in %s", state_dir)
            shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_file, key_data)


def _load_block_states(model, state_dir: Path, run_key: str) -> list[dict]:
    """The saved states of blocks 0, 1, ... up to the first missing or invalid one (that and later ones go)."""
    names = model.block_names()
    states = []
    for index, name in enumerate(names):
        path = state_dir / f"block_{index:03d}.pt"
        if not path.is_file():
            break
        try:
            state = load_pt(path)
            validate_block_state(state, index, name, run_key, str(path))
        except ValueError as error:
            logger.warning("%s; calibrating from block %d again", error, index)
            break
        states.append(state)
    for stale in range(len(states), len(names)):
        (state_dir / f"block_{stale:03d}.pt").unlink(missing_ok=True)
    return states


def _references(model, text_encoder, cfg: RunConfig, settings: CaptureSettings, identity: dict,
                state_dir: Path) -> list[FidelityReference]:
    """Full-precision generations of the held-out prompts (cached in the state folder)."""
    prompts = load_prompt_set(cfg.collect.prompts, cfg.eval.prompt_offset, cfg.eval.num_prompts,
                              key="eval.prompt_offset")
    key = sha256_json({"model": identity, "prompts": prompts, "settings": settings.as_dict(), "seed": cfg.eval.seed})
    path = state_dir / "fp_reference.pt"
    if path.is_file():
        try:
            stored = load_pt(path)
            if stored.get("key") == key:
                return [FidelityReference.from_state(s) for s in stored["references"]]
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            logger.warning("%s: unusable (%s); generating the reference again", path, error)
    logger.info("generating %d held-out prompts with the full-precision model", len(prompts))
    refs = reference_generations(model, text_encoder, prompts, settings, cfg.eval.seed)
    save_pt(path, {"key": key, "references": [r.state() for r in refs]})
    return refs


def _method_summary(cfg: RunConfig) -> str:
    q = cfg.quant
    fmt = lambda c: "16-bit" if c.dtype is None else f"{c.dtype} g{c.group_size}"
    parts = [f"weights {fmt(q.wgts)}", f"inputs {fmt(q.ipts)}"]
    parts.append(f"smoothing {'on' if q.smooth.enabled else 'off'}")
    parts.append(f"low-rank {'r' + str(q.low_rank.rank) if q.low_rank.enabled else 'off'}")
    parts.append(f"range search {'on' if q.calib_range.enabled else 'off'}")
    parts.append(f"GPTQ {'on' if q.gptq.enabled else 'off'}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------ the run


def prompt_range_problems(cfg: RunConfig) -> list[str]:
    """Whether the calibration and held-out prompt ranges exist in ``collect.prompts``, one line per problem (cheap:
    it runs before any model is built)."""
    problems = []
    for key, offset, count in (("collect.prompts", 0, cfg.collect.num_prompts),
                               ("eval.prompt_offset", cfg.eval.prompt_offset, cfg.eval.num_prompts)):
        try:
            load_prompt_set(cfg.collect.prompts, offset, count, key=key)
        except PromptFileError as error:
            if str(error) not in problems:
                problems.append(str(error))
    return problems


def check_prompt_ranges(cfg: RunConfig) -> None:
    problems = prompt_range_problems(cfg)
    if problems:
        raise ConfigCheckError(problems)


def run_ptq(cfg: RunConfig, out_dir: str | Path, *, max_blocks: int | None = None,
            on_block_done: Callable[[int], None] | None = None, pipeline=None) -> PTQResult:
    """Quantize the model of ``cfg`` into ``out_dir`` (resuming a run of the same configuration there).

    Args:
        pipeline: The ``InfinityPipeline`` to quantize (its transformer's linears become ``FakeQuantLinear``);
            default: built from ``cfg.pipeline``, which describes the model either way.
        max_blocks: Stop after this many blocks have been calibrated by this call (no artifacts); for timing.
        on_block_done: Called with the block index after each block's state is saved.
    """
    from infinity.pipeline import pipeline_from_config

    check_quant_config(cfg)
    check_prompt_ranges(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.output.resume:
        _unseal(out_dir)  # before the model is built: an interrupted start-over leaves no stale sealed folder
    with _log_file(out_dir / LOG_FILE):
        factory = pipeline_from_config if pipeline is None else (lambda _: pipeline)
        return _run(cfg, out_dir, factory, max_blocks, on_block_done, owned=pipeline is None)


class _StageMeter:
    """Seconds of each stage in ``timings`` and, on CUDA, its peak allocated and reserved memory in ``peaks``."""

    def __init__(self, device: torch.device, timings: dict) -> None:
        self.device = device
        self.timings = timings
        self.peaks: dict[str, dict[str, float]] = {}

    @contextmanager
    def stage(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        if cuda:
            peak = {"allocated_GiB": torch.cuda.max_memory_allocated(self.device) / 2**30,
                    "reserved_GiB": torch.cuda.max_memory_reserved(self.device) / 2**30}
            old = self.peaks.get(name, {})
            self.peaks[name] = {k: max(v, old.get(k, 0.0)) for k, v in peak.items()}


def _capture_bytes(cfg: RunConfig, settings: CaptureSettings, width: int) -> int:
    """Float32 first-block inputs of every calibration sample (both CFG rows)."""
    sizes = [t * h * w for t, h, w in settings.schedule[: settings.num_scales]]
    return cfg.collect.num_prompts * sum(sizes) * 2 * width * 4


def _run(cfg, out_dir, pipeline_from_config, max_blocks, on_block_done, owned: bool = True) -> PTQResult:
    from infinity.checkpoints import resolve_device


    start_total = time.perf_counter()
    timings: dict = {"blocks": {}}
    p = cfg.pipeline
    logger.info("loading %s (arch %s, random_init=%s, device %s, dtype %s)", p.name, p.arch, p.random_init,
                p.device, p.dtype)
    meter = _StageMeter(resolve_device(p.device), timings)
    with meter.stage("load"):
        pipe, session, identity, settings, prompts, fp_numel = _load(cfg, pipeline_from_config, owned)
    model = pipe.transformer
    try:
        return _calibrate(cfg, out_dir, model, session.text_encoder, session, meter, identity, settings, prompts,
                          fp_numel, len(model.blocks()), max_blocks, on_block_done, start_total)
    finally:
        session.restore()


def _load(cfg, pipeline_from_config, owned: bool):
    """Build the pipeline, identify it, load the prompts and apply the memory plan (the ``load`` stage)."""
    from .memory_plan import OffloadSession, module_bytes, plan_memory

    p = cfg.pipeline
    pipe = pipeline_from_config(p)
    model, text_encoder = pipe.transformer, pipe.text_encoder
    device = model.device
    for name in (n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)):
        layer_kind(name)  # fail early on an unexpected layout
    fp_numel = sum(t.numel() for t in model.state_dict().values())
    identity = model_identity(p, model, text_encoder)
    settings = CaptureSettings.from_config(cfg)
    prompts = load_prompt_set(cfg.collect.prompts, 0, cfg.collect.pool_size())  # the DGC pool with dgc
    eval_prompts = load_prompt_set(cfg.collect.prompts, cfg.eval.prompt_offset, cfg.eval.num_prompts,
                                   key="eval.prompt_offset")
    depth = len(model.blocks())
    plan = plan_memory(cfg.memory, model, settings.schedule,
                       text_bytes=module_bytes(text_encoder) + module_bytes(pipe.vae),
                       capture_bytes=_capture_bytes(cfg, settings, model.arch.embed_dim),
                       max_tokens=cfg.quant.max_tokens, device=device,
                       quantized_later=cfg.quant.wgts.dtype is not None or cfg.quant.ipts.dtype is not None)
    logger.info(plan.describe(depth))
    session = OffloadSession(plan, pipe, owned=owned, captions=[c for _, c in prompts + eval_prompts],
                             schedule=settings.schedule, resident_blocks=cfg.memory.resident_blocks)
    return pipe, session, identity, settings, prompts, fp_numel


def _dgc_selection(captures, prompts, count: int):
    """Distribution-guided calibration (``collect.selection: dgc``, ``deepcompressor.calib.dgc``): the ``count``
    captures of the pool that cover its activation distribution best."""
    from ...calib.dgc import dgc_select, subset_entropy, value_sample

    samples = [value_sample(c.xs, seed=index) for index, c in enumerate(captures)]
    chosen, entropies = dgc_select(samples, count)
    order = sorted(chosen)  # pool order: each prompt keeps the seed of its pool position
    ids = [prompts[i][0] for i in order]
    logger.info("distribution-guided calibration: %d of %d candidate prompts (entropy %.4f; first %d: %.4f): %s",
                count, len(prompts), entropies[-1], count,
                subset_entropy(samples, range(count)), ", ".join(ids))
    selection = {"method": "dgc", "candidates": len(prompts), "selected": ids, "entropy": entropies[-1]}
    return [captures[i] for i in order], [prompts[i] for i in order], selection


def _mixed_precision(model, inputs, replay_plan, selection, qcfg, session, state_dir: Path, *, resumed: bool):
    """``quant.mixed_precision``: the sensitivity of every quantized block linear (``calib.mixed_precision``),
    measured through the full-precision blocks before any is calibrated, and the layers kept at the higher
    precision; saved in the state folder (a resumed run reads it back). Returns ``({name: QuantConfig}, report)``."""
    import json

    from ...calib.layer import quant_config_for_kind
    from ...calib.mixed_precision import choose_layers, high_precision_config, layer_sensitivity, weight_bytes
    from .calibrate_blocks import block_layer_inputs, layer_needs_calibration

    mp = qcfg.mixed_precision
    path = state_dir / "mixed_precision.json"
    if path.is_file():
        report = json.loads(path.read_text(encoding="utf-8"))
    elif resumed:
        raise PTQError(f"{path}: missing, but blocks were already calibrated; pass --no-output-resume to start over")
    else:
        sensitivity, extra, base = {}, {}, 0
        layers = {suffix: kind for suffix, kind in BLOCK_LAYERS if layer_needs_calibration(qcfg, kind)}
        xs = inputs
        for index, (block, block_name) in enumerate(tqdm(list(zip(model.blocks(), model.block_names())),
                                                         desc="sensitivity", unit="block", leave=False)):
            with session.block_on_device(index, changes=False):
                found, xs = block_layer_inputs(block, block_name, xs, replay_plan, selection, layers,
                                               host_outputs=session.plan.offload)
                for suffix, kind in layers.items():
                    name, linear = f"{block_name}.{suffix}", block.get_submodule(suffix)
                    layer_cfg = quant_config_for_kind(qcfg, kind)
                    sensitivity[name] = layer_sensitivity(linear.weight, found.pop(name), layer_cfg, linear.bias)
                    shape = (linear.out_features, linear.in_features)
                    low = weight_bytes(*shape, layer_cfg.wgts)
                    extra[name] = weight_bytes(*shape, high_precision_config(layer_cfg, mp.precision).wgts) - low
                    base += low
        del xs
        chosen = choose_layers(sensitivity, extra, base, mp.keep, mp.max_extra_bytes_ratio)
        report = {"precision": mp.precision, "layers": chosen, "extra_bytes": sum(extra[n] for n in chosen),
                  "base_bytes": base, "sensitivity": sensitivity}
        write_json(path, report)
    chosen = report["layers"]
    logger.info("mixed precision: %d layers kept at %s (+%.1f%% weight bytes), the most sensitive first: %s",
                len(chosen), report["precision"], 100 * report["extra_bytes"] / max(report["base_bytes"], 1),
                ", ".join(f"{n} ({report['sensitivity'][n]:.3g})" for n in chosen[:8]) + (" ..." if len(chosen) > 8
                                                                                           else ""))
    configs = {name: high_precision_config(quant_config_for_kind(qcfg, layer_kind(name)), report["precision"])
               for name in chosen}
    return configs, report


def _mixed_precision_record(state_dir: Path) -> dict | None:
    """What the manifest records of mixed precision: the kept layers and their format (None without it)."""
    import json

    path = state_dir / "mixed_precision.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    return {key: report[key] for key in ("precision", "layers", "extra_bytes", "base_bytes")}


def _calibrate(cfg, out_dir, model, text_encoder, session, meter, identity, settings, prompts, fp_numel, depth,
               max_blocks, on_block_done, start_total) -> PTQResult:
    p = cfg.pipeline
    timings = meter.timings
    device = model.device
    with meter.stage("collect"), session.generating():
        captures, cache_folder = load_or_capture(model, text_encoder, prompts, settings, identity,
                                                 cfg.collect.cache_dir)
    prompt_selection = None
    if cfg.collect.selection == "dgc":
        captures, prompts, prompt_selection = _dgc_selection(captures, prompts, cfg.collect.num_prompts)

    state_dir = out_dir / "state"
    key_data = {"format": STATE_FORMAT, "model": identity, "capture": cache_folder.name,
                "quant": config_to_dict(cfg)["quant"]}
    if prompt_selection is not None:
        key_data["selected_prompts"] = prompt_selection["selected"]
    run_key = sha256_json(key_data)
    _prepare_state(state_dir, key_data, cfg.output.resume)

    with meter.stage("reference"), session.generating():
        references = _references(model, text_encoder, cfg, settings, identity, state_dir)

    states = _load_block_states(model, state_dir, run_key)
    for index, state in enumerate(states):
        with session.block_on_device(index):
            install_block_state(model, state)
    if states:
        logger.info("resuming: blocks 0..%d loaded from %s", len(states) - 1, state_dir)

    calibrated: list[int] = []
    if len(states) < depth:
        session.calibrating()
        plan = ReplayPlan.build(captures, settings, model)
        if session.plan.activations_on_device:
            inputs = [[x.to(device) for x in c.xs] for c in captures]
        else:
            inputs = [[x.pin_memory() if device.type == "cuda" else x for x in c.xs] for c in captures]
        del captures
        sizes = [x.shape[1] for x in inputs[0]]
        selection = SampleSelection.build(len(inputs), sizes, inputs[0][0].shape[0], cfg.quant.num_samples,
                                          cfg.quant.max_tokens, device)
        layer_configs = None
        if cfg.quant.mixed_precision.enabled:
            with meter.stage("sensitivity"):
                layer_configs, _ = _mixed_precision(model, inputs, plan, selection, cfg.quant, session, state_dir,
                                                    resumed=bool(states))
        start = time.perf_counter()
        for index in range(len(states)):  # inputs of the first block to calibrate
            with session.block_on_device(index, changes=False):
                inputs = replay_block(model.blocks()[index], plan, inputs, keep_outputs=True)
        synchronize(device)
        timings["resume_replay"] = time.perf_counter() - start
        logger.info("calibrating blocks %d..%d on %d samples, %d search tokens per layer", len(states), depth - 1,
                    len(selection.selected), selection.num_tokens)
        total_layers = (depth - len(states)) * len(BLOCK_LAYERS)
        with meter.stage("calibration"), tqdm(total=total_layers, desc="layers", unit="layer",
                                              leave=False) as layer_bar:
            for index in tqdm(range(len(states), depth), desc="blocks", unit="block"):
                if max_blocks is not None and len(calibrated) >= max_blocks:
                    break
                start = time.perf_counter()
                with session.block_on_device(index):
                    result = calibrate_block(model, index, inputs, plan, selection, cfg.quant, run_key,
                                             progress=layer_bar, layer_configs=layer_configs)
                inputs = result.outputs
                state = to_cpu(result.state)  # the finished blocks' states wait for the artifacts in host memory
                save_pt(state_dir / f"block_{index:03d}.pt", state)
                states.append(state)
                synchronize(device)
                timings["blocks"][index] = {"total": time.perf_counter() - start, **result.timings}
                calibrated.append(index)
                if on_block_done is not None:
                    on_block_done(index)
        del inputs
    if len(states) < depth:
        timings["total"] = time.perf_counter() - start_total
        logger.info("stopped after %d of %d blocks (max_blocks)", len(states), depth)
        return PTQResult(out_dir, False, calibrated, timings, peaks=meter.peaks, memory=session.plan.as_dict())

    with meter.stage("artifacts"):
        entries = {name: entry for state in states for name, entry in state["layers"].items()}
        sizes = write_artifacts(out_dir, cfg, model, entries, fp_numel)
    logger.info("model.pt is %.3f of the bfloat16 transformer (%.3f with smooth.pt and branch.pt)",
                sizes["model_pt_over_bf16"], sizes["all_over_bf16"])

    with meter.stage("fidelity"), session.generating():
        model_level = evaluate_model(model, references, settings)
    layer_rows = [entry["report"] for entry in entries.values()]
    fidelity = {
        "model": p.name, "method": _method_summary(cfg),
        "eval": {"prompt_ids": [r.prompt_id for r in references], "seed": cfg.eval.seed,
                 "prompt_offset": cfg.eval.prompt_offset},
        "model_level": model_level, "layers": layer_rows,
    }
    write_json(out_dir / "fidelity.json", fidelity)
    write_text(out_dir / "fidelity.md", fidelity_markdown(fidelity))
    logger.info("held-out logit relative error %.4g, bit agreement %.2f%%", model_level["logit_rel_error"],
                100 * model_level["bit_agreement"])
    timings["total"] = time.perf_counter() - start_total
    layers = {name: entry["kind"] for name, entry in entries.items()}
    write_manifest(out_dir, {**identity, "name": p.name}, layers,
                   {"sizes": sizes, "calibration": {"cache": cache_folder.name, "prompts": len(prompts),
                                                    "scales": settings.num_scales,
                                                    "selection": prompt_selection or {"method": "first"},
                                                    "mixed_precision": _mixed_precision_record(state_dir)}})
    return PTQResult(out_dir, True, calibrated, timings, sizes, fidelity, peaks=meter.peaks,
                     memory=session.plan.as_dict())


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_cli(PROG, argv, description="Post-training quantization (SVDQuant W4A4) of Infinity.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from infinity.checkpoints import CheckpointError

    # Everything that can be checked without a model, all at once, before anything is built or written.
    problems = pipeline_path_problems(cfg.pipeline) + quant_config_problems(cfg) + prompt_range_problems(cfg)
    if problems:
        for line in problems:
            print(f"{PROG}: error: {line}", file=sys.stderr)
        return 2
    out_dir = run_dir(cfg, args.config_files)
    from .memory_plan import prefer_expandable_segments

    prefer_expandable_segments(cfg.memory)
    try:
        result = run_ptq(cfg, out_dir)
    except (CheckpointError, CaptureError) as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except PTQError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    t = result.timings
    logger.info("done in %.1f s (collect %.1f s, blocks %.1f s, fidelity %.1f s)", t["total"], t["collect"],
                sum(b["total"] for b in t["blocks"].values()), t.get("fidelity", 0.0))
    print(ptq_summary(result, args.config_files))
    return 0


def ptq_summary(result: PTQResult, config_files: list[str]) -> str:
    """What a finished run produced, how good it is, and what to run next (printed at the end of a run)."""
    lines = [f"artifacts: {result.directory}"]
    if result.complete and result.fidelity:
        model_level = result.fidelity["model_level"]
        layers = result.fidelity["layers"]
        lines.append(f"held-out fidelity ({len(result.fidelity['eval']['prompt_ids'])} prompts, teacher-forced on the "
                     f"full-precision bits): logit relative error {model_level['logit_rel_error']:.4g}, bit agreement "
                     f"{100 * model_level['bit_agreement']:.2f}% (fidelity.md has it per scale and per layer)")
        if layers:
            rtn = statistics.median(r["error_rtn"] for r in layers)
            final = statistics.median(r["error_final"] for r in layers)
            lines.append(f"layer output error on the calibration tokens, median of {len(layers)} layers: {final:.4g} "
                         f"calibrated vs {rtn:.4g} round-to-nearest")
    chain = " ".join(config_files)
    lines += [
        "next:",
        (f"  python -m deepcompressor.app.diffusion.calibrate_cache_quantization {chain} "
         f"--kv-artifact-dir {result.directory}      # KV-cache scales through this model"),
        (f"  python -m evaluation.benchmark_assembled_model {chain} --base-path {result.directory} "
         "--enable_weight_quant true --enable_activation_quant true --ref-root REF      # image quality against a "
         "reference run (the same command without the toggles, --gen-root REF)"),
        (f"  python infinity_w4a4_test.py {chain} --artifacts {result.directory}      # real W4A4 kernels: "
         "latency and memory"),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
