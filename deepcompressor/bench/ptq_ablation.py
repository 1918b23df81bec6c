"""Ablation of the PTQ methods: run ``ptq_infinity`` once per method and rank them by held-out fidelity.

    python -m deepcompressor.bench.ptq_ablation                      # the tiny default, CPU friendly
    python -m deepcompressor.bench.ptq_ablation --model configs/models/infinity-2b.yaml --no-fast

Every method is the chain ``<model> configs/collect/qdiff.yaml configs/svdquant/int4.yaml
[configs/svdquant/fast.yaml] configs/ablations/<method>.yaml`` (the ablation file stacked last), run to its own
artifact directory with its own fidelity report; the captured calibration data is shared. Methods:

- ``naive``: W4A4 round-to-nearest, groups of 64, nothing searched;
- ``smoothquant``: W4A4 with smoothing and range search;
- ``svdquant``: W4A4 with smoothing, the rank-32 low-rank branch and range search;
- ``w16``: the SVDQuant weight pipeline with 16-bit activations (W4A16 control).

``<method>+<recipe>`` stacks ``configs/methods/<recipe>.yaml`` after the ablation file: ``EXTENDED`` holds the
VAR-specific methods alone and on top of SVDQuant (``gps``, ``gps_grid``: gain-projected smoothing; ``beta_zero``;
``dgc``: distribution-guided prompt selection; ``mixed_precision``: the most sensitive layers at 8 bits;
``rotation``: online Hadamard rotation of the inputs). ``--methods all`` runs the four and ``EXTENDED``.

Prints a markdown table sorted by logit relative error (lower is better) with the bit agreement; ``--json PATH``
writes the numbers. Each method starts its run folder over (``output.resume: false``) unless ``--resume``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .cli import add_list_argument

__all__ = ["EXTENDED", "METHODS", "ablation_table", "main", "method_files", "run_ablation"]

REPO = Path(__file__).resolve().parents[2]
METHODS = ("naive", "smoothquant", "svdquant", "w16")
EXTENDED = ("smoothquant+gps", "smoothquant+gps_grid", "svdquant+gps", "svdquant+gps_grid", "svdquant+beta_zero",
            "naive+dgc", "svdquant+dgc", "naive+mixed_precision", "svdquant+mixed_precision", "naive+rotation",
            "svdquant+rotation")


def method_files(method: str) -> list[Path]:
    """The ablation file of ``method`` and the recipes stacked on it (``base+recipe+...``)."""
    base, *recipes = method.split("+")
    if base not in METHODS:
        raise ValueError(f"unknown method {method!r}: it must start with one of {', '.join(METHODS)}")
    files = [REPO / "configs" / "ablations" / f"{base}.yaml"]
    for recipe in recipes:
        path = REPO / "configs" / "methods" / f"{recipe}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (REPO / "configs" / "methods").glob("*.yaml"))
            raise ValueError(f"method {method!r}: no recipe {recipe!r} in configs/methods/ ({', '.join(known)})")
        files.append(path)
    return files


def run_ablation(model_file: str, methods, fast: bool, overrides: dict) -> list[dict]:
    from ..app.diffusion.ptq_infinity import run_ptq
    from ..config import load_config, run_dir

    rows = []
    for method in methods:
        files = [model_file, str(REPO / "configs" / "collect" / "qdiff.yaml"),
                 str(REPO / "configs" / "svdquant" / "int4.yaml")]
        if fast:
            files.append(str(REPO / "configs" / "svdquant" / "fast.yaml"))
        files += [str(path) for path in method_files(method)]
        cfg = load_config(files, overrides)
        start = time.perf_counter()
        result = run_ptq(cfg, run_dir(cfg, files))
        model_level = result.fidelity["model_level"]
        layer_errors = [row["error_final"] for row in result.fidelity["layers"]]
        rows.append({"method": method, "logit_rel_error": model_level["logit_rel_error"],
                     "bit_agreement": model_level["bit_agreement"],
                     "mean_layer_error": sum(layer_errors) / len(layer_errors),
                     "seconds": time.perf_counter() - start, "artifacts": str(result.directory)})
    return rows


def ablation_table(rows: list[dict]) -> str:
    lines = ["| rank | method | logit rel. error | bit agreement | mean layer rel. error | seconds |",
             "|---|---|---|---|---|---|"]
    ranked = sorted(rows, key=lambda r: r["logit_rel_error"])
    for i, r in enumerate(ranked, 1):
        lines.append(f"| {i} | {r['method']} | {r['logit_rel_error']:.4f} | {100 * r['bit_agreement']:.2f}% | "
                     f"{r['mean_layer_error']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepcompressor.bench.ptq_ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "configs" / "models" / "infinity-tiny.yaml"))
    add_list_argument(parser, "--methods", choices=(*METHODS, *EXTENDED, "all"), default=list(METHODS),
                      help="methods ('all': the four and the VAR-specific ones)")
    parser.add_argument("--no-fast", action="store_true", help="leave out configs/svdquant/fast.yaml")
    parser.add_argument("--output-root", default="", help="output.root of the runs (default: the config's)")
    parser.add_argument("--device", default="", help="pipeline.device (default: the config's)")
    parser.add_argument("--json", default="", help="write the rows as JSON here")
    parser.add_argument("--resume", action="store_true",
                        help="reuse finished or interrupted runs of the same config (default: start each run over)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    for handler in logging.getLogger().handlers:  # each run's ptq.log keeps the details
        handler.setLevel(logging.WARNING)
    methods = [m for m in args.methods if m != "all"]
    if "all" in args.methods:
        methods = list(dict.fromkeys([*METHODS, *EXTENDED, *methods]))
    # Every method runs from scratch (the seconds column times what it says), unless --resume.
    overrides = {"output.resume": bool(args.resume)}
    if args.output_root:
        overrides["output.root"] = args.output_root
    if args.device:
        overrides["pipeline.device"] = args.device
    rows = run_ablation(args.model, methods, not args.no_fast, overrides)
    print(ablation_table(rows))
    if args.json:
        from ..utils.files import write_json

        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
