"""Wall time and peak memory of PTQ (``ptq_infinity``) on random-init weights.

    python -m deepcompressor.bench.ptq --arch 8b --blocks 2      # time 2 blocks, extrapolate to all 40
    python -m deepcompressor.bench.ptq --arch 2b                 # the full run (artifacts and fidelity too)
    python -m deepcompressor.bench.ptq --arch tiny --device cpu --fast --threads 2

The chain is ``configs/models/infinity-<arch>.yaml configs/collect/qdiff.yaml configs/svdquant/int4.yaml`` (plus
``svdquant/fast.yaml`` with ``--fast`` and any ``--config`` files) with ``pipeline.random_init`` on, so no model
file is read. The calibration data is captured into a fresh cache folder, so the collection is timed too.

Reported: model build, collection (the full-precision generations of the calibration prompts), the held-out
reference generations, every calibrated block (replays and searches), artifacts and fidelity, and the peak
memory (CUDA ``max_memory_allocated``, or the peak RSS on the CPU). With ``--blocks N`` only N blocks are
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


def _peak_memory(device: torch.device) -> tuple[str, float]:
    if device.type == "cuda":
        return "CUDA max_memory_allocated", torch.cuda.max_memory_allocated(device) / 2**30
    return "peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_benchmark(cfg, blocks: int | None) -> dict:
    from ..app.diffusion.ptq_infinity import run_ptq
    from ..config import run_dir

    device = torch.device(cfg.pipeline.device if cfg.pipeline.device != "auto"
                          else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = run_ptq(cfg, run_dir(cfg, []), max_blocks=blocks)
    wall = time.perf_counter() - start
    t = result.timings
    block_times = [b["total"] for b in t["blocks"].values()]
    depth = {"2b": 32, "8b": 40}.get(cfg.pipeline.arch, 6)
    mean_block = sum(block_times) / len(block_times)
    calibration = sum(block_times)
    report = {
        "arch": cfg.pipeline.arch, "device": str(device), "threads": torch.get_num_threads(),
        "blocks_timed": len(block_times), "depth": depth, "complete": result.complete,
        "seconds": {"load": t["load"], "collect": t["collect"], "reference": t["reference"],
                    "blocks": block_times, "block_mean": mean_block,
                    "block_replay_mean": sum(b["replay"] for b in t["blocks"].values()) / len(block_times),
                    "block_search_mean": sum(b["calibrate"] for b in t["blocks"].values()) / len(block_times)},
    }
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
    what, peak = _peak_memory(device)
    report["peak_memory"] = {"what": what, "GiB": peak}
    report["model_pt_estimate"] = _size_estimate(cfg)
    return report


def _size_estimate(cfg) -> dict:
    """Tensor bytes of ``model.pt`` for this architecture and config, from the meta model (no weights)."""
    from infinity.checkpoints import build_meta_model, resolve_device, resolve_dtype

    from ..app.diffusion.artifacts import estimate_model_pt_bytes

    model = build_meta_model(cfg.pipeline.arch)
    model.block_chunks.to(resolve_dtype(cfg.pipeline.dtype, resolve_device(cfg.pipeline.device)))
    sizes = estimate_model_pt_bytes(model, cfg.quant)
    return {**sizes, "ratio_to_bf16": sizes["total"] / sizes["bf16"]}


def _table(report: dict) -> str:
    s = report["seconds"]
    extrapolated = not report["complete"]
    rows = [("model build", s["load"]), ("collection (calibration generations)", s["collect"]),
            ("held-out reference generations", s["reference"]),
            (f"calibration, mean per block ({report['blocks_timed']} timed)", s["block_mean"]),
            ("  of which replays", s["block_replay_mean"]), ("  of which searches", s["block_search_mean"])]
    if extrapolated:
        rows += [(f"calibration, {report['depth']} blocks (EXTRAPOLATED)", s["calibration_extrapolated"]),
                 ("fidelity (ESTIMATED as the reference time)", s["fidelity_estimated"]),
                 ("PTQ total (EXTRAPOLATED)", s["ptq_total_extrapolated"])]
    else:
        rows += [(f"calibration, {report['depth']} blocks", s["calibration"]), ("artifacts", s["artifacts"]),
                 ("fidelity", s["fidelity"]), ("PTQ total (measured)", s["ptq_total"])]
    lines = [f"PTQ benchmark: Infinity-{report['arch']} on {report['device']} ({report['threads']} threads)",
             f"{'stage':<52} {'seconds':>10}"]
    lines += [f"{name:<52} {value:>10.1f}" for name, value in rows]
    lines.append(f"{report['peak_memory']['what']}: {report['peak_memory']['GiB']:.2f} GiB")
    size = report["model_pt_estimate"]
    lines.append(f"model.pt (estimated from the shapes): {size['total'] / 2**30:.3f} GiB = {size['ratio_to_bf16']:.3f} "
                 f"of the bf16 transformer ({size['bf16'] / 2**30:.3f} GiB)")
    if report.get("sizes"):
        lines.append(f"model.pt (written): {report['sizes']['model_pt_over_bf16']:.3f} of the bf16 transformer")
    if report.get("fidelity"):
        f = report["fidelity"]
        lines.append(f"held-out logit rel. error {f['logit_rel_error']:.4g}, bit agreement "
                     f"{100 * f['bit_agreement']:.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepcompressor.bench.ptq", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("tiny", "2b", "8b"), default="tiny")
    parser.add_argument("--blocks", type=int, default=0, help="calibrate only N blocks and extrapolate (0: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--fast", action="store_true", help="stack configs/svdquant/fast.yaml")
    parser.add_argument("--config", action="append", default=[], help="extra config file (repeatable)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--workdir", default="", help="folder for the cache and run (default: a temporary one)")
    parser.add_argument("--json", default="", help="write the report as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-ptq-"))
    try:
        cfg = build_config(args.arch, args.device, args.fast, args.config, root, {})
        report = run_benchmark(cfg, args.blocks or None)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print(_table(report))
    if args.json:
        from ..utils.files import write_json

        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
