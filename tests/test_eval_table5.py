"""The Table 5 grid command on the tiny model, with two of its rows (full precision and naive W4A4)."""

from __future__ import annotations

import contextlib
import io
import json

from evaluation.table5 import ROWS, run_table5, table_markdown

SMALL = {"pipeline.device": "cpu", "collect.num_prompts": 1, "eval.num_prompts": 1, "quant.num_samples": 4,
         "quant.max_tokens": 128, "eval.num_samples": 2, "eval.gt_metrics": ["psnr", "ssim", "fid"]}


def test_table5_rows_write_their_table_and_skip_finished_steps(tmp_path):
    rows = [r for r in ROWS if r.slug in ("fp16", "naive")]
    overrides = dict(SMALL, **{"collect.cache_dir": str(tmp_path / "cache")})
    with contextlib.redirect_stdout(io.StringIO()):
        table = run_table5("configs/models/infinity-tiny.yaml", tmp_path / "t5", overrides=overrides, rows=rows)
    assert [r["label"] for r in table["rows"]] == ["FP16", "W4A4 (naive)"]
    assert json.loads((tmp_path / "t5" / "table5.json").read_text()) == json.loads(json.dumps(table))
    fp16, naive = (r["benchmarks"]["smoke"]["metrics"] for r in table["rows"])
    assert "skipped" in fp16["psnr"]  # the reference has no reference
    assert naive["psnr"]["value"] > 0 and "inception" in naive["fid"]["skipped"].lower()
    md = (tmp_path / "t5" / "table5.md").read_text()
    assert md == table_markdown(table) and "| W4A4 (naive) |" in md and "skipped" in md
    assert (tmp_path / "t5" / "table5_grid.png").is_file()
    # a second run finds every step's output and only rescores
    artifacts = next((tmp_path / "t5" / "ptq").iterdir())
    stamp = (artifacts / "manifest.json").stat().st_mtime_ns
    with contextlib.redirect_stdout(io.StringIO()):
        again = run_table5("configs/models/infinity-tiny.yaml", tmp_path / "t5", overrides=overrides, rows=rows)
    assert (artifacts / "manifest.json").stat().st_mtime_ns == stamp
    assert again["rows"][1]["benchmarks"]["smoke"]["metrics"]["psnr"] == naive["psnr"]
