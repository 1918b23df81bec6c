"""Diagnostics recorder (hooks + recording KV cache) on a real tiny Infinity, report tables and files."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from infinity.model import Infinity
from infinity.sampler import sample

from deepcompressor.nn.kv_cache import RecordingLayerKVCache
from evaluation import stats
from evaluation.activations_measurements import (
    DiagnosticsRecorder,
    write_report,
)
from evaluation.report_tables import format_number, markdown_report, summarize_kv, summarize_linear

DATA = Path(__file__).parent / "data" / "infinity" / "golden"
SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6)]
WATCHED = "block_chunks.1.module.0.ffn.fc2"


@pytest.fixture(scope="module")
def tiny_model():
    model = Infinity("tiny_p0")
    model.load_state_dict(torch.load(DATA / "tiny_p0_state_dict.pt", map_location="cpu", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_inputs():
    inputs = torch.load(DATA / "tiny_p0_inputs.pt", map_location="cpu", weights_only=True)
    return inputs["kv_compact"], inputs["lens"].tolist()


@pytest.fixture(scope="module")
def recorded(tiny_model, tiny_inputs):
    """Two CFG generations recorded by the recorder, with an independent capture of the same tensors."""
    model = tiny_model
    captured_inputs: list[torch.Tensor] = []
    caches = []
    prefixes: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def capturing_factory(m):
        cache = original_factory(m)
        caches.append(cache)
        return cache

    original_factory = model.kv_cache_factory
    model.kv_cache_factory = capturing_factory

    def on_scale(si, x):
        if si == len(SCHEDULE) - 2:  # everything that will ever be stored is in the cache now
            prefixes.append([tuple(t.clone() for t in layer.prefix) for layer in caches[-1].layers])

    handle = model.get_submodule(WATCHED).register_forward_pre_hook(lambda mod, args: captured_inputs.append(args[0]))
    recorder = DiagnosticsRecorder(model, token_budget=60, seed=5)
    try:
        with recorder, torch.inference_mode():
            for seed in (0, 1):
                sample(model, *tiny_inputs, SCHEDULE, cfg=3.0, tau=0.5, seed=seed, on_scale=on_scale)
    finally:
        handle.remove()
        model.kv_cache_factory = original_factory
    return recorder, captured_inputs, prefixes


def test_recorder_linear_stats_equal_one_shot_on_the_captured_inputs(recorded):
    recorder, captured, _ = recorded
    x = torch.cat([stats.as_token_matrix(t) for t in captured])
    acc = recorder.linears[WATCHED]
    result = acc.result()
    # Per generation: 2 prompts with CFG = 4 rows of 57 tokens; two generations.
    assert result.num_tokens == x.shape[0] == 2 * 4 * 57
    assert result.kurtosis == pytest.approx(scipy.stats.kurtosis(x.double().numpy().ravel()), rel=1e-9)
    assert result.abs_max == x.abs().max().item()
    sample_rows = x[stats.select_token_sample(x.shape[0], 60, seed=5)]
    assert result.abs_median == pytest.approx(np.median(sample_rows.abs().numpy()), rel=1e-12)
    ref = x.abs().amax(0).double() / stats.median(sample_rows.abs(), dim=0)
    np.testing.assert_allclose(result.channel_max_to_median.numpy(), ref.numpy(), rtol=1e-12)


def test_recorder_kv_stats_equal_one_shot_on_the_cached_prefix(recorded):
    recorder, _, prefixes = recorded
    assert len(prefixes) == 2
    for block in (0, 3):
        keys = torch.cat([stats.kv_token_matrix(p[block][0]) for p in prefixes])
        values = torch.cat([stats.kv_token_matrix(p[block][1]) for p in prefixes])
        # The last scale is never stored: 1 + 4 + 16 tokens per row, 4 rows, 2 generations.
        assert keys.shape[0] == 2 * 4 * 21
        for acc, ref in ((recorder.keys[block], keys), (recorder.values[block], values)):
            r = acc.result()
            assert r.num_tokens == ref.shape[0]
            cv_chan, cv_tok = stats.dynamic_range_cv(ref)
            assert r.cv_chan == pytest.approx(cv_chan, rel=1e-12)
            assert r.cv_tok == pytest.approx(cv_tok, rel=1e-10)
            gamma = scipy.stats.skew(ref.double().numpy(), axis=0)
            np.testing.assert_allclose(r.channel_skewness.numpy(), gamma, rtol=1e-8, atol=1e-12)


def test_recorder_covers_every_linear_and_removes_its_hooks(recorded, tiny_model):
    recorder, _, _ = recorded
    linears = {n for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(recorder.linears) == linears
    assert all(not m._forward_pre_hooks for m in tiny_model.modules())
    assert not isinstance(tiny_model.kv_cache_factory(tiny_model).layers[0], RecordingLayerKVCache)
    rows, arrays = recorder.linear_rows()
    assert [r["name"] for r in rows] == list(recorder.linears)
    fc2 = next(r for r in rows if r["name"] == WATCHED)
    assert (fc2["kind"], fc2["block"]) == ("ffn_down", 2)
    assert arrays[WATCHED]["channel_abs_max"].shape == (256,)


def test_recording_cache_delegates_attributes_and_only_records_stores():
    from infinity.kv_cache import LayerKVCache

    seen = []
    inner = LayerKVCache()
    layer = RecordingLayerKVCache(inner, lambda k, v: seen.append(k.shape[2]))
    layer.capacity = 16
    assert inner.capacity == 16
    q = torch.randn(1, 2, 3, 4)
    out = layer.attend(q, q, q, store=True)
    layer.attend(q, q, q, store=False)
    assert seen == [3] and layer.length == 3 and out.shape == q.shape
    layer.reset()
    assert inner.length == 0 and layer.prefix is None


def _linear_row(name, kind, block, ratio, kurt, chan):
    return {
        "name": name,
        "kind": kind,
        "block": block,
        "num_tokens": 10,
        "num_sampled": 5,
        "abs_max": 1.0,
        "max_to_median": ratio,
        "kurtosis": kurt,
        "channel_max_to_median_max": chan,
        "worst_channel": 0,
        "num_zero_median_channels": 0,
    }


def test_summaries_are_mean_and_max_across_blocks():
    rows = [
        _linear_row("b0.fc2", "ffn_down", 0, 100.0, 5.0, 300.0),
        _linear_row("b1.fc2", "ffn_down", 1, 300.0, 9.0, 100.0),
        _linear_row("b0.qkv", "sa_qkv", 0, 4.0, math.nan, 8.0),
        _linear_row("head", "head", None, 1e6, 1e6, 1e6),  # not a block layer: left out of Table 1
    ]
    s = summarize_linear(rows)
    assert list(s) == ["sa_qkv", "ffn_down"]
    assert s["ffn_down"] == {
        "num_layers": 2,
        "max_to_median_mean": 200.0,
        "max_to_median_max": 300.0,
        "kurtosis_mean": 7.0,
        "kurtosis_max": 9.0,
        "channel_max_to_median_max_mean": 200.0,
        "channel_max_to_median_max_max": 300.0,
    }
    assert math.isnan(s["sa_qkv"]["kurtosis_mean"])
    kv = [
        {"name": "b0", "block": 0, "k": {"cv_chan": 1.0, "cv_tok": 0.1, "mean_abs_skew": 2.0, "max_abs_skew": 9.0},
         "v": {"cv_chan": 0.5, "cv_tok": 0.2, "mean_abs_skew": 0.1, "max_abs_skew": 0.5}},
        {"name": "b1", "block": 1, "k": {"cv_chan": 3.0, "cv_tok": 0.3, "mean_abs_skew": 4.0, "max_abs_skew": 3.0},
         "v": {"cv_chan": 0.7, "cv_tok": 0.4, "mean_abs_skew": 0.3, "max_abs_skew": 0.2}},
    ]  # fmt: skip
    k = summarize_kv(kv)["k"]
    assert (k["cv_chan_mean"], k["cv_tok_mean"], k["mean_abs_skew_mean"], k["max_abs_skew_max"]) == (2.0, 0.2, 3.0, 9.0)


def test_format_number():
    assert format_number(None) == format_number(math.nan) == "n/a"
    assert format_number(math.inf) == "inf"
    assert format_number(12345.6) == "12,346"
    assert format_number(456.7) == "457"
    assert format_number(45.67) == "45.7"
    assert format_number(4.567) == "4.57"
    assert format_number(0.001234) == "1.23e-03"
    assert format_number(12288) == "12,288"


def test_markdown_tables_have_consistent_columns():
    rows = [_linear_row("block_chunks.0.module.0.ffn.fc2", "ffn_down", 0, 100.0, 5.0, 300.0)]
    kv = [{"name": "b0", "block": 0, "k": {m: 1.0 for m in ("cv_chan", "cv_tok", "mean_abs_skew", "max_abs_skew")}}]
    kv[0]["k"]["num_tokens"] = 3
    kv[0]["v"] = dict(kv[0]["k"])
    text = markdown_report("T", ["a: 1"], rows, kv, [("fig", "f.png")])
    for block in text.split("\n\n"):
        table = [line for line in block.splitlines() if line.startswith("|")]
        if table:
            assert len({line.count("|") for line in table}) == 1, block
    assert "FFN down (`ffn.fc2`)" in text and "`f.png`" in text


def test_write_report_files(recorded, tmp_path):
    recorder, _, _ = recorded
    linear_rows, linear_arrays = recorder.linear_rows()
    kv_rows, kv_arrays = recorder.kv_rows()
    paths = write_report(tmp_path, "tiny_p0", {"model": "tiny_p0"}, linear_rows, linear_arrays, kv_rows, kv_arrays)
    for key in ("stats", "tables", "profiles", "figure_depth", "figure_worst"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    assert paths["figure_depth"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["stats"].read_text())
    assert len(data["linear_layers"]) == len(linear_rows) and len(data["kv_cache"]) == 4
    assert data["summary"]["linear"]["ffn_down"]["num_layers"] == 4
    worst = max(linear_rows, key=lambda r: r["max_to_median"])
    assert data["worst_layer"] == worst["name"]
    profiles = np.load(paths["profiles"])
    np.testing.assert_array_equal(profiles[f"{WATCHED}/channel_abs_max"], linear_arrays[WATCHED]["channel_abs_max"])
    assert profiles["kv/block_chunks.0.module.0/k_channel_skewness"].shape == (64,)
    assert not list(tmp_path.glob(".*.tmp"))
