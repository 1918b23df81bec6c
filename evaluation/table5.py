"""The paper's Table 5 on one model: what each part of the quantization costs in image quality.

    python -m evaluation.table5                                              # the tiny default, CPU friendly
    python -m evaluation.table5 --model configs/models/infinity-2b.yaml --no-fast --out runs/table5-2b \\
        --set eval.benchmarks=[MJHQ] --set eval.num_samples=5000 --set eval.mjhq_root=/data/MJHQ-30K

Rows: FP16, naive W4A4, W4A16, SmoothQuant, SVDQuant, SVDQuant + KV8, SVDQuant + KV4. Steps, each skipped when its
output exists (delete a folder to redo it):

1. ``ptq_infinity`` per method (``<model> configs/collect/qdiff.yaml configs/svdquant/int4.yaml
   [configs/svdquant/fast.yaml] configs/ablations/<method>.yaml``) into ``<out>/ptq``;
2. ``calibrate_cache_quantization`` through the SVDQuant model into ``<out>/kv/kv_quant_calib.pt`` (INT8 and INT4);
3. ``benchmark_assembled_model`` per row into ``<out>/eval/<row>`` (FP16 first: the reference of the others).

Writes ``<out>/table5.md`` and ``<out>/table5.json`` (every metric of every row per benchmark) and
``<out>/table5_grid.png`` (rows = prompts, columns = the table's rows). ``--set KEY=VALUE`` (YAML value) applies
to every step (``eval.*`` picks prompts and metrics, ``pipeline.device`` the device).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = ["ROWS", "Row", "main", "run_table5", "table_markdown"]

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    label: str
    slug: str
    method: str | None  # the ablation config of its PTQ run (None: full precision)
    kv_dtype: str | None = None


ROWS = (
    Row("FP16", "fp16", None),
    Row("W4A4 (naive)", "naive", "naive"),
    Row("W4A16", "w4a16", "w16"),
    Row("SmoothQuant", "smoothquant", "smoothquant"),
    Row("SVDQuant", "svdquant", "svdquant"),
    Row("SVDQuant + KV8", "svdquant_kv8", "svdquant", "uint8"),
    Row("SVDQuant + KV4", "svdquant_kv4", "svdquant", "uint4"),
)


def _ptq_files(model: str, method: str, fast: bool) -> list[str]:
    files = [model, str(REPO / "configs" / "collect" / "qdiff.yaml"), str(REPO / "configs" / "svdquant" / "int4.yaml")]
    if fast:
        files.append(str(REPO / "configs" / "svdquant" / "fast.yaml"))
    return files + [str(REPO / "configs" / "ablations" / f"{method}.yaml")]


def _ptq(model: str, method: str, fast: bool, out: Path, overrides: dict) -> Path:
    from deepcompressor.app.diffusion.ptq_infinity import run_ptq
    from deepcompressor.config import load_config, run_dir

    files = _ptq_files(model, method, fast)
    cfg = load_config(files, {**overrides, "output.root": str(out / "ptq"), "output.resume": True})
    directory = run_dir(cfg, files)
    if (directory / "manifest.json").is_file():
        logger.info("PTQ %s: %s exists, skipped", method, directory)
        return directory
    logger.info("PTQ %s into %s", method, directory)
    return Path(run_ptq(cfg, directory).directory)


def _kv(model: str, artifacts: Path, fast: bool, out: Path, overrides: dict) -> Path:
    from deepcompressor.app.diffusion.calibrate_cache_quantization import run_calibration
    from deepcompressor.config import load_config

    path = out / "kv" / "kv_quant_calib.pt"
    if path.is_file():
        logger.info("KV calibration: %s exists, skipped", path)
        return path
    cfg = load_config(_ptq_files(model, "svdquant", fast),
                      {**overrides, "kv.calib_path": str(path), "kv.artifact_dir": str(artifacts)})
    run_calibration(cfg, progress=False)
    return path


def _benchmark(model: str, row: Row, artifacts: Path | None, kv_path: Path | None, fast: bool, out: Path,
               overrides: dict, models=None) -> dict:
    from deepcompressor.config import load_config

    from .benchmark_assembled_model import run

    files = _ptq_files(model, row.method or "svdquant", fast)
    values = {**overrides, "eval.gen_root": str(out / "eval" / row.slug)}
    if row.method is not None:
        values.update({"eval.artifacts": str(artifacts), "eval.enable_weight_quant": True,
                       "eval.enable_activation_quant": True, "eval.ref_root": str(out / "eval" / "fp16")})
    if row.kv_dtype is not None:
        values.update({"eval.enable_kv_quant": True, "kv.dtype": row.kv_dtype, "kv.calib_path": str(kv_path)})
    return run(load_config(files, values), models=models)


def run_table5(model: str, out: str | Path, *, fast: bool = True, overrides: dict | None = None,
               rows=ROWS, models=None) -> dict:
    """Every step of the module docstring; returns ``table5.json``'s content."""
    from deepcompressor.utils.files import write_json, write_text

    out = Path(out)
    overrides = dict(overrides or {})
    artifacts = {m: _ptq(model, m, fast, out, overrides) for m in dict.fromkeys(r.method for r in rows if r.method)}
    kv_path = None
    if any(r.kv_dtype for r in rows):
        kv_path = _kv(model, artifacts["svdquant"], fast, out, overrides)
    results = {}
    for row in rows:
        logger.info("benchmark: %s", row.label)
        results[row.slug] = _benchmark(model, row, artifacts.get(row.method), kv_path, fast, out, overrides, models)
    table = {"model": model, "rows": [{"label": r.label, "slug": r.slug, "artifacts": str(artifacts.get(r.method))
                                       if r.method else None, "kv_dtype": r.kv_dtype,
                                       "benchmarks": results[r.slug]["benchmarks"]} for r in rows]}
    write_json(out / "table5.json", table)
    write_text(out / "table5.md", table_markdown(table))
    _grid(rows, out)
    return table


def table_markdown(table: dict) -> str:
    first = table["rows"][0]["benchmarks"]
    lines = [f"# Table 5 on {table['model']}", ""]
    for bench, entry in first.items():
        metrics = list(entry["metrics"])
        lines += [f"## {bench} ({entry['num_samples']} samples)", "",
                  "| | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for row in table["rows"]:
            cells = []
            for name in metrics:
                m = row["benchmarks"][bench]["metrics"][name]
                value = m.get("value")
                cells.append("skipped" if "skipped" in m else ("-" if value is None else f"{value:.4f}"))
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    skipped = sorted({f"- {name}: {m['skipped']}" for row in table["rows"] for b in row["benchmarks"].values()
                      for name, m in b["metrics"].items() if "skipped" in m})
    if skipped:
        lines += ["Skipped:", *skipped, ""]
    return "\n".join(lines)


def _grid(rows, out: Path, prompts: int = 4) -> Path | None:
    from .grid import comparison_grid
    from .imageio import read_png

    folders = [out / "eval" / r.slug / "samples" for r in rows]
    bench_dirs = sorted(p for p in folders[0].iterdir() if p.is_dir()) if folders[0].is_dir() else []
    if not bench_dirs:
        return None
    ids = sorted(p.stem for p in bench_dirs[0].glob("*.png"))[:prompts]
    grid_rows = []
    for sample_id in ids:
        paths = [f / bench_dirs[0].name / f"{sample_id}.png" for f in folders]
        if all(p.is_file() for p in paths):
            grid_rows.append((sample_id, [read_png(p) for p in paths]))
    if not grid_rows:
        return None
    return comparison_grid(grid_rows, [r.slug for r in rows]).save_png(out / "table5_grid.png")


def _parse_sets(items: list[str]) -> dict:
    values = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"table5: error: --set {item!r}: expected KEY=VALUE")
        values[key.strip()] = yaml.safe_load(raw)
    return values


def main(argv: list[str] | None = None) -> int:
    from deepcompressor.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m evaluation.table5", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "configs" / "models" / "infinity-tiny.yaml"))
    parser.add_argument("--out", default="runs/table5", help="folder of every step's output (default runs/table5)")
    parser.add_argument("--no-fast", action="store_true", help="leave out configs/svdquant/fast.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config value for every step (YAML)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from .benchmark_assembled_model import EvalError

    try:
        table = run_table5(args.model, args.out, fast=not args.no_fast, overrides=_parse_sets(args.sets))
    except (ConfigError, EvalError) as error:
        print(f"table5: error: {error}", file=sys.stderr)
        return 2
    print(table_markdown(table))
    print(f"wrote {Path(args.out) / 'table5.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
