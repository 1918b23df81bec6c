"""Distribution-guided calibration: the greedy entropy selection against a plain reference, and a tiny run."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from deepcompressor.calib.dgc import dgc_select, histogram_entropy, quantile_edges, subset_entropy, value_sample

ROOT = Path(__file__).resolve().parents[1]


def _reference(samples, k, bins):
    """The same selection in numpy float64, written out: quantile edges, histograms, greedy entropy."""
    pooled = np.concatenate([s.numpy().astype(np.float64) for s in samples])
    edges = np.quantile(pooled, np.linspace(0, 1, bins + 1)[1:-1])
    hists = [np.bincount(np.searchsorted(edges, s.numpy().astype(np.float64), side="left"), minlength=bins)
             for s in samples]

    def entropy(counts):
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    chosen, total = [], np.zeros(bins)
    for _ in range(k):
        scores = [(entropy(total + h), -i) for i, h in enumerate(hists) if i not in chosen]
        best = -max(scores)[1]
        chosen.append(best)
        total += hists[best]
    return chosen


@pytest.mark.parametrize("seed", (0, 1, 2))
def test_selection_matches_the_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    samples = [torch.randn(500, generator=gen) * (0.5 + i % 3) + (i % 4) for i in range(9)]
    chosen, entropies = dgc_select(samples, 4, bins=16)
    assert chosen == _reference(samples, 4, 16)
    assert subset_entropy(samples, chosen, bins=16) == pytest.approx(entropies[-1])


def test_a_diverse_prompt_is_preferred_to_a_duplicate():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2000, generator=gen)
    samples = [base, base.clone(), base.clone() + 6.0]  # the third covers the pool's other mode
    chosen, _ = dgc_select(samples, 2, bins=32)
    assert chosen == [0, 2]


def test_entropy_and_edges():
    assert histogram_entropy(torch.tensor([1.0, 1.0, 1.0, 1.0])) == pytest.approx(math.log(4))
    assert histogram_entropy(torch.zeros(3)) == 0.0
    edges = quantile_edges([torch.arange(100.0)], 4)
    assert edges.tolist() == pytest.approx([24.75, 49.5, 74.25])
    x = [torch.arange(10.0).reshape(2, 5), torch.arange(6.0)]
    assert torch.equal(value_sample(x, count=100), torch.cat([x[0].reshape(-1), x[1]]))
    a, b = value_sample(x, count=4, seed=3), value_sample(x, count=4, seed=3)
    assert torch.equal(a, b) and a.numel() == 4
    with pytest.raises(ValueError, match="cannot choose 5 of 2"):
        dgc_select([torch.zeros(3), torch.ones(3)], 5)


def test_dgc_recipe_calibrates_on_the_chosen_prompts(tmp_path):
    from test_methods import CHAIN, SMALL

    from deepcompressor.app.diffusion.ptq_infinity import main
    from deepcompressor.config import load_config

    chain = CHAIN + [str(ROOT / "configs/methods/dgc.yaml")]
    values = {**SMALL, "collect.candidates": 4, "output.root": str(tmp_path / "runs"),
              "collect.cache_dir": str(tmp_path / "c")}
    assert load_config(chain, values).collect.pool_size() == 4
    flags = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(chain + flags) == 0
    directory = tmp_path / "runs" / "infinity-tiny.qdiff.int4.fast.dgc"
    selection = json.loads((directory / "manifest.json").read_text())["calibration"]["selection"]
    assert selection["method"] == "dgc" and selection["candidates"] == 4 and len(selection["selected"]) == 2
    # the four candidates were captured (and cached); the log names the chosen ones
    assert len(list((tmp_path / "c").glob("*/prompt_*.pt"))) == 4
    assert "distribution-guided calibration: 2 of 4" in (directory / "ptq.log").read_text()


def test_a_dgc_pool_may_not_reach_the_evaluation_prompts():
    from deepcompressor.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="DGC pool"):
        load_config([str(ROOT / "configs/models/infinity-tiny.yaml")],
                    {"collect.selection": "dgc", "collect.num_prompts": 12, "collect.candidates": 600})
