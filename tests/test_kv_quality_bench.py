"""KV quantizer quality benchmark: held-out scoring over several generations (pooled variance), clipping share and
attention error against plain float64 references."""

import math

import pytest
import torch

from deepcompressor.bench import kv as kv_bench
from deepcompressor.bench import kv_quality
from deepcompressor.bench.kv_quality import AttentionCall, KVData

HEADS, DIM, DEPTH = 2, 4, 2


def _reference_minmax(calibration: torch.Tensor, bits: int):
    """Per-channel asymmetric min-max fake quantizer in float64, ``x [N, channels]``, and its representable range."""
    lo, hi = calibration.double().min(0).values, calibration.double().max(0).values
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-12)
    zero = torch.round(-lo / scale)

    def quantize(x):
        x = x.double()
        return (torch.clamp(torch.round(x / scale) + zero, 0, qmax) - zero) * scale

    return quantize, -zero * scale, (qmax - zero) * scale


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 1, 3).reshape(-1, HEADS * DIM)


def _data(gen: torch.Generator) -> KVData:
    """Two held-out generations whose channels are shifted by a per-generation offset (as the model's prompts do),
    larger than the within-generation spread."""
    calibration = {(b, w): torch.randn(64, HEADS * DIM, generator=gen) for b in range(DEPTH) for w in (0, 1)}
    held_out = []
    for shift in (-1.5, 2.0):
        calls = []
        for size in (1, 4):
            for block in range(DEPTH):
                k = 0.3 * torch.randn(1, HEADS, size, DIM, generator=gen) + shift
                v = 0.3 * torch.randn(1, HEADS, size, DIM, generator=gen) - shift
                q = torch.randn(1, HEADS, size, DIM, generator=gen)
                calls.append(AttentionCall(block, q, k, v))
        held_out.append(calls)
    return KVData("test", DEPTH, HEADS, DIM, calibration, held_out)


def _attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


def test_held_out_scores_pool_every_generation():
    data = _data(torch.Generator().manual_seed(0))
    result = kv_quality.evaluate_methods(data, bits_list=(4,), methods=("minmax", "per_token", "kivi"))
    minmax = result["minmax"][4]
    rel, outside, total = {0: [], 1: []}, {0: 0, 1: 0}, {0: 0, 1: 0}
    quantizers = {}
    for (block, which), calib in data.calibration.items():
        quantize, lo, hi = _reference_minmax(calib, 4)
        quantizers[(block, which)] = quantize
        rows = torch.cat([_rows(c.k if which == 0 else c.v) for calls in data.held_out for c in calls
                          if c.block == block]).double()  # fmt: skip
        err = (quantize(rows) - rows).square().mean(0)
        rel[which].append(err / rows.var(0))  # one variance over both generations
        outside[which] += int(((rows < lo) | (rows > hi)).sum())
        total[which] += rows.numel()
    for which, name in ((0, "k"), (1, "v")):
        assert minmax[f"{name}_rel_mse"] == pytest.approx(torch.cat(rel[which]).mean().item(), rel=1e-3)
        assert minmax[f"{name}_outside"] == pytest.approx(outside[which] / total[which])
        assert 0 < minmax[f"{name}_outside"] < 1
    assert result["per_token"][4]["k_outside"] is None and result["per_token"][4]["v_outside"] is None
    assert result["kivi"][4]["k_outside"] == minmax["k_outside"] and result["kivi"][4]["v_outside"] is None

    # attention: the cache restarts with every generation; sums over every call of every generation
    num = den = 0.0
    for calls in data.held_out:
        prefix = {b: ([], [], [], []) for b in range(DEPTH)}
        for call in calls:
            ks, vs, kqs, vqs = prefix[call.block]
            shape = call.k.shape
            kq = quantizers[(call.block, 0)](_rows(call.k)).view(1, shape[2], HEADS, DIM).permute(0, 2, 1, 3)
            vq = quantizers[(call.block, 1)](_rows(call.v)).view(1, shape[2], HEADS, DIM).permute(0, 2, 1, 3)
            ks.append(call.k.double())
            vs.append(call.v.double())
            kqs.append(kq)
            vqs.append(vq)
            q = call.q.double()
            ref = _attention(q, torch.cat(ks, 2), torch.cat(vs, 2))
            out = _attention(q, torch.cat(kqs, 2), torch.cat(vqs, 2))
            num += (out - ref).square().sum().item()
            den += ref.square().sum().item()
    assert minmax["attn_rel_err"] == pytest.approx(math.sqrt(num / den), rel=1e-3)


def test_fit_is_in_sample_and_minmax_clips_nothing_there():
    data = kv_quality.synthetic_kv_data(depth=1, heads=2, dim=8, num_held_out=2)
    assert len(data.held_out) == 2
    r = kv_quality.evaluate_methods(data, bits_list=(8,), methods=("minmax",))["minmax"][8]
    held = kv_quality.held_out_rows(data)
    assert held[(0, 0)].shape[0] == 2 * sum(c.k.shape[0] * c.k.shape[2] for c in data.held_out[0] if c.block == 0)
    assert r["fit_k_rel_mse"] < r["k_rel_mse"]  # in-sample min-max never clips
    assert r["k_outside"] > 0


def test_overlapping_prompts_are_refused():
    with pytest.raises(ValueError, match="inside the calibration prompts"):
        kv_quality.model_kv_data(None, {}, "x", num_calibration=12, eval_offset=8)
    with pytest.raises(ValueError, match=">= 1"):
        kv_quality.model_kv_data(None, {}, "x", num_held_out=0)


def test_cli_defaults_and_table():
    args = kv_bench.parse_args(["--sections", "quality"])
    assert (args.calib_prompts, args.held_out_prompts) == (12, 4)
    with pytest.raises(SystemExit):
        kv_bench.parse_args(["--held-out-prompts", "0"])
    data = _data(torch.Generator().manual_seed(1))
    results = kv_quality.evaluate_methods(data, bits_list=(8,), methods=("minmax", "per_token"))
    table = kv_bench.format_tables({"quality": {"data": data.source, "results": results}})
    minmax_row = next(line for line in table.splitlines() if line.startswith("| minmax |"))
    per_token_row = next(line for line in table.splitlines() if line.startswith("| per_token |"))
    assert f"{100 * results['minmax'][8]['k_outside']:.2f}%" in minmax_row
    assert per_token_row.split(" | ")[6:8] == ["-", "-"]
    assert "K fit (in-sample)" in table
