"""End to end: ``python -m evaluation.activations_measurements`` on the tiny default with a small token budget."""

import json
import math
from pathlib import Path

import numpy as np
import yaml

from evaluation.activations_measurements import main
from evaluation.report_tables import BLOCK_KINDS

REPO = Path(__file__).resolve().parents[1]
PROMPTS, BUDGET, TOKENS_PER_ROW, LAST_SCALE_TOKENS = 2, 256, 521, 256  # '0.06M': 7 scales, the last 16x16


def _finite_numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _finite_numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _finite_numbers(v)]
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return [tree]
    return []


def test_app_on_the_tiny_default(tmp_path):
    argv = [
        str(REPO / "configs/models/infinity-tiny.yaml"),
        str(REPO / "configs/collect/qdiff.yaml"),
        "--pipeline-pn",
        "0.06M",
        "--pipeline-device",
        "cpu",
        "--collect-num-prompts",
        str(PROMPTS),
        "--eval-num-tokens",
        str(BUDGET),
        "--output-root",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = tmp_path / "diagnostics" / "infinity-tiny"
    for name in (
        "stats.json",
        "tables.md",
        "channel_profiles.npz",
        "config.yaml",
        "fig1_ffn_down_and_kv_skewness.png",
        "worst_layer_channel_absmax.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads((out / "stats.json").read_text())
    block_rows = [r for r in data["linear_layers"] if r["block"] is not None]
    assert len(block_rows) == 6 * len(BLOCK_KINDS)
    for row in block_rows:
        for key in ("abs_max", "abs_median", "max_to_median", "kurtosis", "channel_max_to_median_max"):
            assert row[key] is not None and math.isfinite(row[key]), (row["name"], key)
        if row["kind"] != "ca_kv":  # image tokens: prompts x CFG rows x tokens of the schedule
            assert row["num_tokens"] == PROMPTS * 2 * TOKENS_PER_ROW, row["name"]
            assert row["num_sampled"] == BUDGET
    assert len(data["kv_cache"]) == 6
    for row in data["kv_cache"]:
        for which in ("k", "v"):
            stats = row[which]
            assert stats["num_tokens"] == PROMPTS * 2 * (TOKENS_PER_ROW - LAST_SCALE_TOKENS)
            for key in ("cv_chan", "cv_tok", "mean_abs_skew", "max_abs_skew"):
                assert stats[key] is not None and math.isfinite(stats[key]), (row["name"], which, key)
    numbers = _finite_numbers(data["summary"])
    assert numbers and all(math.isfinite(x) for x in numbers)
    assert set(data["summary"]["linear"]) == {kind for kind, _, _ in BLOCK_KINDS}

    tables = (out / "tables.md").read_text()
    assert "## Table 1" in tables and "## Table 2" in tables
    for _, label, suffix in BLOCK_KINDS:
        assert f"{label} (`{suffix}`)" in tables
    assert data["worst_layer"] in tables

    profiles = np.load(out / "channel_profiles.npz")
    worst = profiles[f"{data['worst_layer']}/channel_abs_max"]
    assert worst.ndim == 1 and np.isfinite(worst).all()

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["eval"]["num_tokens"] == BUDGET and config["pipeline"]["pn"] == "0.06M"
    assert config["collect"]["num_prompts"] == PROMPTS
