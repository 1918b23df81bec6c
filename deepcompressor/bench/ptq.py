"""Wall time and peak memory of PTQ (``ptq_infinity``) on random-init weights.

    python -m deepcompressor.bench.ptq --arch 8b --blocks 2      # time 2 blocks, extrapolate to all 40
    python -m deepcompressor.bench.ptq --arch 2b                 # the full run (artifacts and fidelity too)
    python -m deepcompressor.bench.ptq --arch 8b --offload on off --gpu-budget-gib 22 --kv   # offloaded vs resident
    python -m deepcompressor.bench.ptq --arch tiny --device cpu --fast --threads 2

The chain is ``configs/models/infinity-<arch>.yaml configs/collect/qdiff.yaml configs/svdquant/int4.yaml`` (plus
``svdquant/fast.yaml`` with ``--fast`` and any ``--config`` files) with ``pipeline.random_init`` on, so no model
file is read. The calibration data is captured into a fresh cache folder, so the collection is timed too.

Reported: model build, collection (the full-precision generations of the calibration prompts), the held-out
reference generations, every calibrated block (replays and searches), artifacts and fidelity, and the peak
memory (CUDA ``max_memory_allocated`` of every stage and the largest of them, or the peak RSS on the CPU), and the
memory plan (``memory.*``: whether the blocks were offloaded, how many stayed resident). ``--offload on off`` runs
the same PTQ offloaded and resident, one after the other; ``--kv`` adds the KV calibration through the artifacts
with the same memory settings. With ``--blocks N`` only N blocks are
calibrated; the total is then extrapolated (mean block time x depth, fidelity estimated as the reference
generation time) and labelled as such. ``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["build_config", "main", "run_benchmark"]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


def build_config(arch: str, device: str, fast: bool, extra_files: list[str], root: Path, overrides: dict):
    from ..config import load_config

    configs = REPO / "configs"
    files = [configs / "models" / f"infinity-{arch}.yaml", configs / "collect" / "qdiff.yaml",
             configs / "svdquant" / "int4.yaml"]
    if fast:
        files.append(configs / "svdquant" / "fast.yaml")
    files += [Path(f) for f in extra_files]
    values = {"pipeline.random_init": True, "pipeline.device": device, "output.root": str(root / "runs"),
              "output.dirname": f"bench-{arch}", "collect.cache_dir": str(root / "cache"), "output.resume": False}
    if arch != "tiny":
        values.update({"pipeline.transformer_path": None, "pipeline.vae_path": None,
                       "pipeline.text_encoder_path": None})
    values.update(overrides)
    return load_config([str(f) for f in files], values)


def _peak_memory(device: torch.device, result) -> dict:
    """The run's peak: the largest stage peak on CUDA (allocated and reserved), the peak RSS on the CPU."""
    if device.type == "cuda" and result.peaks:
        return {"what": "CUDA max_memory_allocated (largest stage)",
                "GiB": max(p["allocated_GiB"] for p in result.peaks.values()),
                "reserved_GiB": max(p["reserved_GiB"] for p in result.peaks.values())}
    return {"what": "peak RSS", "GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _kv_calibration(cfg, artifact_dir: Path) -> dict:
    """``calibrate_cache_quantization`` through the run's artifacts with the same ``memory`` settings."""
    from ..app.diffusion.calibrate_cache_quantization import run_calibration
    from ..config import config_to_dict, load_config

    values = {**config_to_dict(cfg), "kv.artifact_dir": str(artifact_dir),
              "kv.calib_path": str(artifact_dir / "kv_quant_calib.pt")}
    kv_cfg = load_config([], values)
    device = _fresh_device(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = run_calibration(kv_cfg, progress=False)
    report = {"seconds": time.perf_counter() - start,
              "stages": {k: result.timings[k] for k in ("build", "record", "search")}}
    if device.type == "cuda":
        report["peak_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        report["peak_reserved_GiB"] = torch.cuda.max_memory_reserved(device) / 2**30
    report["memory"] = result.timings["memory"]
    return report


def _fresh_device(cfg) -> torch.device:
    """The run's device, with what an earlier run left in the CUDA cache freed."""
    from infinity.checkpoints import resolve_device

    from ..app.diffusion.memory_plan import free_cuda_cache

    device = resolve_device(cfg.pipeline.device)
    free_cuda_cache(device)
    return device


def run_benchmark(cfg, blocks: int | None, *, kv: bool = False) -> dict:
    from ..app.diffusion.ptq_infinity import run_ptq
    from ..config import run_dir

    device = _fresh_device(cfg)
    start = time.perf_counter()
    out_dir = run_dir(cfg, [])
    result = run_ptq(cfg, out_dir, max_blocks=blocks)
    wall = time.perf_counter() - start
    t = result.timings
    block_times = [b["total"] for b in t["blocks"].values()]
    depth = {"2b": 32, "8b": 40}.get(cfg.pipeline.arch, 6)
    mean_block = sum(block_times) / len(block_times)
    calibration = sum(block_times)
    report = {
        "arch": cfg.pipeline.arch, "device": str(device), "threads": torch.get_num_threads(),
        "blocks_timed": len(block_times), "depth": depth, "complete": result.complete,
        "offload": cfg.memory.offload, "memory_plan": result.memory,
        "seconds": {"load": t["load"], "collect": t["collect"], "reference": t["reference"],
                    "blocks": block_times, "block_mean": mean_block,
                    "block_replay_mean": sum(b["replay"] for b in t["blocks"].values()) / len(block_times),
                    "block_search_mean": sum(b["calibrate"] for b in t["blocks"].values()) / len(block_times)},
        "stage_peaks": result.peaks,
    }
    if device.type == "cuda":
        report["device_name"] = torch.cuda.get_device_name(device)
    if result.complete:
        report["seconds"].update({"calibration": calibration, "artifacts": t["artifacts"], "fidelity": t["fidelity"],
                                  "ptq_total": t["total"], "wall": wall})
        report["fidelity"] = {k: result.fidelity["model_level"][k] for k in ("logit_rel_error", "bit_agreement")}
        report["sizes"] = result.sizes
    else:
        calibration = mean_block * depth
        report["seconds"].update({
            "calibration_extrapolated": calibration,
            "fidelity_estimated": t["reference"],
            "ptq_total_extrapolated": t["load"] + t["collect"] + t["reference"] + calibration + t["reference"],
        })
    report["peak_memory"] = _peak_memory(device, result)
    report["model_pt_estimate"] = _size_estimate(cfg)
    if kv and result.complete:
        report["kv_calibration"] = _kv_calibration(cfg, out_dir)
    return report


def _size_estimate(cfg) -> dict:
    """Tensor bytes of ``model.pt`` for this architecture and config, from the meta model (no weights)."""
    from infinity.checkpoints import build_meta_model, resolve_device, resolve_dtype

    from ..app.diffusion.artifacts import estimate_model_pt_bytes

    model = build_meta_model(cfg.pipeline.arch)
    model.block_chunks.to(resolve_dtype(cfg.pipeline.dtype, resolve_device(cfg.pipeline.device)))
    sizes = estimate_model_pt_bytes(model, cfg.quant)
    return {**sizes, "ratio_to_bf16": sizes["total"] / sizes["bf16"]}


def plan_preview(cfg) -> dict:
    """The memory plan ``ptq_infinity`` would make for ``cfg`` on a GPU with ``memory.gpu_budget_gib``, from the
    shapes alone (meta tensors: no weights, no GPU). The VAE is left out (tens of MB)."""
    from infinity.checkpoints import build_meta_model
    from infinity.pipeline import FLAN_T5_XL_CONFIG
    from transformers import T5Config, T5EncoderModel

    from ..app.diffusion.capture import CaptureSettings
    from ..app.diffusion.memory_plan import plan_memory
    from ..app.diffusion.ptq_infinity import _capture_bytes

    if cfg.memory.gpu_budget_gib <= 0:
        raise ValueError("--plan-only needs --gpu-budget-gib (there is no GPU to read the memory of)")
    model = build_meta_model(cfg.pipeline.arch)
    model.block_chunks.to(torch.bfloat16)
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**FLAN_T5_XL_CONFIG, is_encoder_decoder=False, use_cache=False)).half()
    settings = CaptureSettings.from_config(cfg)
    plan = plan_memory(cfg.memory, model, settings.schedule, text_bytes=sum(p.numel() * 2 for p in t5.parameters()),
                       capture_bytes=_capture_bytes(cfg, settings, model.arch.embed_dim),
                       max_tokens=cfg.quant.max_tokens, device=torch.device("cuda"),
                       quantized_later=cfg.quant.wgts.dtype is not None or cfg.quant.ipts.dtype is not None)
    return {"arch": cfg.pipeline.arch, "depth": len(model.blocks()), "plan": plan.as_dict(),
            "describe": plan.describe(len(model.blocks()))}


def _table(report: dict) -> str:
    s = report["seconds"]
    peaks = report.get("stage_peaks") or {}
    extrapolated = not report["complete"]
    rows = [("model build", s["load"], "load"), ("collection (calibration generations)", s["collect"], "collect"),
            ("held-out reference generations", s["reference"], "reference"),
            (f"calibration, mean per block ({report['blocks_timed']} timed)", s["block_mean"], "calibration"),
            ("  of which replays", s["block_replay_mean"], None), ("  of which searches", s["block_search_mean"], None)]
    if extrapolated:
        rows += [(f"calibration, {report['depth']} blocks (EXTRAPOLATED)", s["calibration_extrapolated"], None),
                 ("fidelity (ESTIMATED as the reference time)", s["fidelity_estimated"], None),
                 ("PTQ total (EXTRAPOLATED)", s["ptq_total_extrapolated"], None)]
    else:
        rows += [(f"calibration, {report['depth']} blocks", s["calibration"], None),
                 ("artifacts", s["artifacts"], "artifacts"), ("fidelity", s["fidelity"], "fidelity"),
                 ("PTQ total (measured)", s["ptq_total"], None)]
    plan = report.get("memory_plan") or {}
    lines = [f"PTQ benchmark: Infinity-{report['arch']} on {report.get('device_name', report['device'])} "
             f"({report['threads']} threads), memory.offload {report.get('offload', 'auto')}"
             + (f" -> {'on' if plan.get('offload') else 'off'} ({plan.get('reason')})" if plan else ""),
             f"{'stage':<52} {'seconds':>10} {'peak GiB':>10}"]
    for name, value, stage in rows:
        peak = peaks.get(stage, {}).get("allocated_GiB") if stage else None
        lines.append(f"{name:<52} {value:>10.1f} {'' if peak is None else f'{peak:.2f}':>10}")
    peak = report["peak_memory"]
    reserved = f" (reserved {peak['reserved_GiB']:.2f} GiB)" if "reserved_GiB" in peak else ""
    lines.append(f"{peak['what']}: {peak['GiB']:.2f} GiB{reserved}")
    if plan.get("offload"):
        lines.append(f"offloading: {plan['resident_blocks']} of {report['depth']} blocks resident during generations, "
                     f"captured activations on {'the GPU' if plan['activations_on_device'] else 'the host'}, "
                     f"budget {plan['budget_GiB']:.1f} GiB")
    size = report["model_pt_estimate"]
    lines.append(f"model.pt (estimated from the shapes): {size['total'] / 2**30:.3f} GiB = {size['ratio_to_bf16']:.3f} "
                 f"of the bf16 transformer ({size['bf16'] / 2**30:.3f} GiB)")
    if report.get("sizes"):
        lines.append(f"model.pt (written): {report['sizes']['model_pt_over_bf16']:.3f} of the bf16 transformer")
    if report.get("fidelity"):
        f = report["fidelity"]
        lines.append(f"held-out logit rel. error {f['logit_rel_error']:.4g}, bit agreement "
                     f"{100 * f['bit_agreement']:.2f}%")
    if report.get("kv_calibration"):
        kv = report["kv_calibration"]
        peak_kv = f", peak {kv['peak_memory_GiB']:.2f} GiB" if "peak_memory_GiB" in kv else ""
        lines.append(f"KV calibration through the artifacts: {kv['seconds']:.1f} s{peak_kv}")
    return "\n".join(lines)


def _comparison(reports: dict[str, dict]) -> str:
    """Stage times and peaks of the runs side by side (one column pair per ``memory.offload`` value)."""
    modes = list(reports)
    stages = ("load", "collect", "reference", "calibration", "artifacts", "fidelity")
    head = f"{'stage':<14}" + "".join(f" {mode + ' s':>12} {mode + ' GiB':>12}" for mode in modes)
    lines = ["", "memory.offload side by side:", head]
    for stage in stages:
        cells = ""
        for mode in modes:
            r = reports[mode]
            seconds = r["seconds"].get(stage, r["seconds"].get("calibration_extrapolated") if stage == "calibration"
                                       else None)
            peak = (r.get("stage_peaks") or {}).get(stage, {}).get("allocated_GiB")
            cells += f" {'-' if seconds is None else f'{seconds:.1f}':>12} {'-' if peak is None else f'{peak:.2f}':>12}"
        lines.append(f"{stage:<14}{cells}")
    totals = ""
    for mode in modes:
        r = reports[mode]
        total = r["seconds"].get("ptq_total", r["seconds"].get("ptq_total_extrapolated"))
        totals += f" {total:>12.1f} {r['peak_memory']['GiB']:>12.2f}"
    lines.append(f"{'total / peak':<14}{totals}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .cli import add_list_argument
    from .report import finish

    parser = argparse.ArgumentParser(prog="deepcompressor.bench.ptq", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("tiny", "2b", "8b"), default="tiny")
    parser.add_argument("--blocks", type=int, default=0, help="calibrate only N blocks and extrapolate (0: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--fast", action="store_true", help="stack configs/svdquant/fast.yaml")
    parser.add_argument("--config", action="append", default=[], help="extra config file (repeatable)")
    add_list_argument(parser, "--offload", choices=("auto", "on", "off"), default=["auto"],
                      help="memory.offload of each run, in turn (e.g. 'on off' compares them); the JSON's top-level "
                           "keys are the first run's, every run is under 'runs'")
    parser.add_argument("--gpu-budget-gib", type=float, default=0.0,
                        help="memory.gpu_budget_gib (0: the device's memory)")
    parser.add_argument("--plan-only", action="store_true",
                        help="print the memory plan for --gpu-budget-gib from the shapes alone (no weights, no GPU)")
    parser.add_argument("--kv", action="store_true",
                        help="also run the KV calibration through the artifacts (complete runs), same memory settings")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--workdir", default="", help="folder for the cache and run (default: a temporary one)")
    parser.add_argument("--json", default="", help="write the report as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plan_only:
        previews = {mode: plan_preview(build_config(args.arch, "cuda", args.fast, args.config, Path("runs"),
                                                    {"memory.offload": mode,
                                                     "memory.gpu_budget_gib": args.gpu_budget_gib}))
                    for mode in args.offload}
        lines = []
        for mode, preview in previews.items():
            lines.append(f"memory.offload {mode}: {preview['describe']}")
            lines += [f"  {key}: {value:.2f} GiB" for key, value in preview["plan"]["estimates_GiB"].items()]
        return finish("\n".join(lines), previews, args.json or None)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-ptq-"))
    if any(mode != "off" for mode in args.offload):
        from ..app.diffusion.memory_plan import prefer_expandable_segments
        from ..config.schema import MemoryConfig

        prefer_expandable_segments(MemoryConfig())
    reports = {}
    try:
        for mode in args.offload:
            # each run captures its calibration data afresh, so the collection is timed with its own settings
            cfg = build_config(args.arch, args.device, args.fast, args.config, root / mode,
                               {"memory.offload": mode, "memory.gpu_budget_gib": args.gpu_budget_gib})
            reports[mode] = run_benchmark(cfg, args.blocks or None, kv=args.kv)
            print(_table(reports[mode]))
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    report = dict(reports[args.offload[0]])
    report["date"] = time.strftime("%Y-%m-%d")
    if len(reports) > 1:
        report["runs"] = reports
    return finish(_comparison(reports) if len(reports) > 1 else "", report, args.json or None)


if __name__ == "__main__":
    sys.exit(main())
